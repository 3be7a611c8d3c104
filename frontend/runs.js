// Shared by the training pages (runs, new run, run, compare): authorised API calls and the curves.
"use strict";

// The API token (if the server has one) is kept in this browser's localStorage for the run pages.
function authHeaders() {
  const token = localStorage.getItem("saeKitToken") || "";
  return token ? {Authorization: `Bearer ${token}`} : {};
}

function bindTokenBox() {
  const box = document.getElementById("token");
  if (!box) return;
  box.value = localStorage.getItem("saeKitToken") || "";
  box.addEventListener("change", () => localStorage.setItem("saeKitToken", box.value.trim()));
}

// A browse-only server (sae-kit demo, sae-kit serve --max-runs 0) has no /api/runs: ask once, and
// say so instead of calling routes that are not there.
let serverInfo = null;
async function serverTrains() {
  serverInfo = serverInfo || api("/api/server");
  return (await serverInfo).trains;
}

function showBrowseOnly() {
  const main = document.querySelector("main");
  if (main.dataset.browseOnly) return;
  main.dataset.browseOnly = "1";
  main.replaceChildren(el("h1", {text: "Training"}), el("div", {class: "card", id: "browse-only"},
    el("p", {}, el("b", {text: "This server only browses features: it does not train."})),
    el("p", {text: "It was started without training runs (sae-kit demo and sae-kit serve --max-runs 0 serve read-only). " +
                   "To start, watch and compare training runs from the browser, start a server that trains, for example:"}),
    el("pre", {class: "config", text: "sae-kit serve FOLDER            # trains one run at a time (the default)\nsae-kit serve FOLDER --max-runs 2"}),
    el("p", {class: "muted", text: "Runs are kept under FOLDER/runs; set SAE_KIT_API_TOKEN to require a token."})));
}

async function runApi(path, body) {
  if (!(await serverTrains())) {
    showBrowseOnly();
    throw new Error("this server does not train");
  }
  const options = {headers: authHeaders()};
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({detail: response.statusText}));
  if (!response.ok) throw new Error(`${response.status}: ${data.detail || response.statusText}`);
  return data;
}

const FINAL = ["finished", "failed", "cancelled", "interrupted"];
const BASE_KEYS = new Set(["step", "tokens", "lr", "loss", "reconstruction", "l0", "dead_fraction"]);

// The charts: each a list of metric keys (a function of the records for the auxiliary losses).
const CURVES = [
  {id: "fvu", title: "FVU (train: normalised MSE; eval: held-out FVU)", keys: () => ["reconstruction", "eval/fvu"]},
  {id: "l0", title: "L0 (active latents per token)", keys: () => ["l0", "eval/l0_mean"]},
  {id: "dead", title: "dead fraction", keys: () => ["dead_fraction"]},
  {id: "aux", title: "auxiliary losses and plugin terms", keys: records => auxiliaryKeys(records)},
];

function auxiliaryKeys(records) {
  const keys = new Set();
  for (const r of records) for (const k of Object.keys(r)) if (!BASE_KEYS.has(k) && !k.startsWith("eval/")) keys.add(k);
  return [...keys].sort();
}

function series(records, key) {
  const rows = records.filter(r => typeof r[key] === "number");
  return {x: rows.map(r => r.step), y: rows.map(r => r[key])};
}

// runs: [{label, records}]; one chart per CURVES entry, every run's series overlaid.
function drawCurves(container, runs) {
  for (const curve of CURVES) {
    let div = document.getElementById(`curve-${curve.id}`);
    if (!div) {
      div = el("div", {id: `curve-${curve.id}`, class: "curve"});
      container.append(div);
    }
    const traces = [];
    for (const run of runs) {
      for (const key of curve.keys(run.records)) {
        const {x, y} = series(run.records, key);
        if (x.length) traces.push({type: "scatter", mode: x.length > 1 ? "lines" : "markers", x, y,
                                   name: runs.length > 1 ? `${run.label}: ${key}` : key});
      }
    }
    Plotly.react(div, traces, {title: {text: curve.title, font: {size: 13}}, height: 300,
      margin: {l: 55, r: 10, t: 35, b: 40}, xaxis: {title: {text: "step", standoff: 4}}, legend: {orientation: "h", y: -0.4},
      yaxis: {type: curve.id === "fvu" ? "log" : "linear"}}, {displayModeBar: false, responsive: true});
  }
}

function statusPill(status) {
  return el("span", {class: `status ${status}`, text: status});
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

function plugins(run) {
  return (run.config.plugins || []).map(p => typeof p === "string" ? p.split(":")[0] : p.name).join(", ") || "none";
}

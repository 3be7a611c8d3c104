// Shared helpers of the sae-kit pages: API calls, the SAE picker, token highlighting.
"use strict";

const params = new URLSearchParams(location.search);

async function api(path, body, headers = {}) {
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json", ...headers}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({detail: response.statusText}));
  if (!response.ok) throw new Error(`${response.status}: ${data.detail || response.statusText}`);
  return data;
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(target, error) {
  target.replaceChildren(el("div", {class: "error", text: String(error.message || error)}));
}

// Every page works on one SAE, named in the URL (?sae=...) and picked in the header.
async function pickSae(onChange) {
  const listed = await api("/api/saes");
  // SAE folders the server could not serve come last, each with its problem: shown, not pickable.
  const saes = listed.filter(s => s.served !== false);
  const broken = listed.filter(s => s.served === false);
  const select = document.getElementById("sae");
  for (const sae of saes) {
    select.append(el("option", {value: sae.id, text: `${sae.id} (${sae.d_sae} features, ${sae.hook_out ? `transcoder ${sae.hook} → ${sae.hook_out}` : sae.hook})`}));
  }
  for (const sae of broken) {
    select.append(el("option", {value: sae.id, disabled: "", title: sae.problem, text: `${sae.id} (not served)`}));
  }
  if (broken.length) {
    const notice = el("div", {class: "error broken-saes"},
      el("div", {text: `${broken.length} SAE folder(s) cannot be served:`}),
      ...broken.map(sae => el("div", {text: `${sae.id}: ${sae.problem}`})));
    (document.querySelector("main") || document.body).prepend(notice);
  }
  const wanted = params.get("sae");
  const analysed = saes.find(s => s.analysed);
  select.value = saes.some(s => s.id === wanted) ? wanted : (analysed || saes[0]).id;
  for (const link of document.querySelectorAll("header nav a")) link.href = `${link.dataset.page}?sae=${encodeURIComponent(select.value)}`;
  select.addEventListener("change", () => {
    params.set("sae", select.value);
    location.search = params.toString();
  });
  const current = saes.find(s => s.id === select.value);
  if (onChange) await onChange(current, saes);
  return current;
}

function shownToken(token) {
  return token.replace(/\n/g, "↵\n") || "∅";
}

// A token on one line (in pills and tables).
function tokenLabel(token) {
  return token.replace(/\n/g, "↵").replace(/\t/g, "⇥") || "∅";
}

// One span per token, background by activation relative to `scale`.
function tokenSpans(tokens, values, scale, maxIndex = -1) {
  const line = el("div", {class: "example"});
  tokens.forEach((token, i) => {
    const value = values[i] || 0;
    const alpha = scale > 0 ? Math.min(1, Math.max(0, value / scale)) : 0;
    const span = el("span", {class: "tok" + (i === maxIndex ? " max" : ""), title: `${JSON.stringify(token)}: ${value.toFixed(3)}`,
                             "data-value": value.toFixed(4), text: shownToken(token)});
    span.style.background = `rgba(var(--hot), ${(0.85 * alpha).toFixed(3)})`;
    line.append(span);
  });
  return line;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (value !== 0 && Math.abs(value) < 1e-3) return value.toExponential(2);
  return value.toFixed(digits);
}

function percent(value) {
  return value < 1e-4 && value > 0 ? `${(100 * value).toExponential(1)}%` : `${(100 * value).toFixed(3)}%`;
}

// Explanations next to feature ids: one request for many ids; a Map index -> {explanation, score}.
async function explanationsFor(saeId, ids) {
  const unique = [...new Set(ids)].filter(i => Number.isInteger(i) && i >= 0);
  if (!unique.length) return new Map();
  try {
    const rows = await api(`/api/saes/${encodeURIComponent(saeId)}/explanations?ids=${unique.slice(0, 500).join(",")}`);
    return new Map(rows.map(r => [r.index, r]));
  } catch (error) { return new Map(); }  // an unanalysed SAE: ids stay bare
}

// Mean detection/fuzzing balanced accuracy: 0.5 is chance.
function scoreBadge(score) {
  if (score === null || score === undefined) return el("span", {class: "score none", text: "unscored", title: "not scored"});
  const level = score >= 0.75 ? "good" : score >= 0.6 ? "fair" : "poor";
  return el("span", {class: `score ${level}`, text: score.toFixed(2), title: "mean balanced accuracy of detection and fuzzing (chance 0.50)"});
}

function explanationNote(entry) {
  if (!entry || !entry.explanation) return el("span", {class: "expl muted", text: "no explanation yet"});
  return el("span", {class: "expl"}, el("span", {text: entry.explanation + " "}), scoreBadge(entry.score));
}

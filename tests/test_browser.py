"""The web UI in real headless Chromium (Debian's `chromium`, driven by Playwright): a served tiny
model and SAE (tests/tiny_served.py) behind `sae-kit serve` in a subprocess; the feature list, a
feature page, a search and a steering request, each checked against the API and saved as a
screenshot (in $SAE_KIT_SCREENSHOTS, else the test's temporary folder).

Skipped when /usr/bin/chromium is missing, unless SAE_KIT_REQUIRE_BROWSER=1 (set in CI) makes
that a failure. Never runs `playwright install`: the browser is the system's.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tiny_served import D_SAE, build_served_root

CHROMIUM = Path(os.environ.get("SAE_KIT_CHROMIUM", "/usr/bin/chromium"))
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

if not CHROMIUM.exists():
    if os.environ.get("SAE_KIT_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium`")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


@contextmanager
def running_server(root: Path, *extra_args: str) -> Iterator[str]:
    """`sae-kit serve root` in a subprocess on a free port, until it answers /api/health; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "sae_kit.cli", "serve", str(root), "--port", str(port),
                                "--threads", "1", *extra_args], env={**os.environ, "SAE_KIT_API_TOKEN": ""},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                _get(f"{url}/api/health")
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"sae-kit serve exited: {process.stdout.read()}")
                time.sleep(0.1)
        else:
            raise RuntimeError("sae-kit serve did not answer within 60 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


@contextmanager
def browser_page(server: str) -> Iterator:
    """A headless Chromium page that records requests leaving ``server`` and console errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(60_000)
        page.outside_requests, page.console_errors = [], []
        page.on("request", lambda r: None if r.url.startswith(server) else page.outside_requests.append(r.url))
        page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def served_root(tmp_path_factory):
    """The tiny served folder, its features explained by the token rule (no model: about a second)."""
    from sae_kit.explain import ExplainConfig, run_explain

    root = build_served_root(tmp_path_factory.mktemp("browser"))
    run_explain(root / "saes" / "main", ExplainConfig(backend="none", progress=False))
    return root


@pytest.fixture(scope="module")
def server(served_root):
    with running_server(served_root) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    with browser_page(server) as page:
        yield page


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("SAE_KIT_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_feature_list_sorts_and_pages(page, server, shots):
    page.goto(f"{server}/")
    page.wait_for_selector("#features tr.feature")
    assert page.locator("#features tr.feature").count() == 50
    assert page.inner_text("#range") == f"1–50 of {D_SAE} features"
    page.select_option("#sort", "density")
    page.select_option("#order", "desc")
    page.click("#filters button[type=submit]")
    expected = _get(f"{server}/api/saes/saes.main/features?sort=density&order=desc&limit=50")["features"]
    first_index = str(expected[0]["index"])
    page.wait_for_function("i => document.querySelector('#features tr.feature td a')?.textContent === i", arg=first_index)
    shown = page.locator("#features tr.feature td:first-child a").all_inner_texts()
    assert shown == [str(f["index"]) for f in expected]
    page.click("#next")
    page.wait_for_function("() => document.querySelector('#range')?.textContent.startsWith('51')")
    assert page.locator("#features tr.feature").count() == D_SAE - 50
    page.screenshot(path=str(shots / "feature_list.png"), full_page=True)
    assert not page.outside_requests and not page.console_errors


def test_feature_page_shows_charts_examples_and_tries_a_text(page, server, shots):
    busiest = _get(f"{server}/api/saes/saes.main/features?sort=fire_count&order=desc&limit=1")["features"][0]["index"]
    feature = _get(f"{server}/api/saes/saes.main/features/{busiest}")
    page.goto(f"{server}/ui/index.html?sae=saes.main&sort=fire_count&order=desc")
    page.click(f"#features tr.feature td a:text-is('{busiest}')")
    page.wait_for_selector("#histogram .plotly .bars")
    page.wait_for_selector("#density .plotly .bars")
    assert page.inner_text("#title") == f"Feature {busiest} of saes.main"
    assert page.locator("#top-examples .example").count() == len(feature["top_examples"]) > 0
    first = page.locator("#top-examples .example").first
    assert first.inner_text().replace("↵", "") == "".join(feature["top_examples"][0]["tokens"])
    assert first.locator(".tok.max").count() == 1
    assert page.locator("#quantiles .example").count() == sum(len(q["examples"]) for q in feature["quantile_examples"])
    assert page.locator("#neighbours a").count() == len(feature["neighbours"])
    assert feature["pos_logits"][0]["token"] in page.inner_text("#logits") or feature["pos_logits"][0]["token"].strip() == ""
    text = "Wherefore art thou Romeo? Deny thy father and refuse thy name."
    page.fill("#own-text", text)
    page.click("#own-run")
    page.wait_for_selector("#own-result .example")
    encoded = _post(f"{server}/api/encode", {"sae": "saes.main", "text": text, "features": [busiest]})
    values = [float(v) for v in page.locator("#own-result .tok").evaluate_all("s => s.map(x => x.dataset.value)")]
    assert values == pytest.approx([row[0] for row in encoded["values"]], abs=1e-3)
    page.screenshot(path=str(shots / "feature_page.png"), full_page=True)
    assert not page.outside_requests and not page.console_errors


def test_search_page_highlights_tokens_and_lists_features(page, server, shots):
    text = "Now is the winter of our discontent"
    page.goto(f"{server}/ui/search.html?sae=saes.main")
    page.fill("#text", text)
    page.click("#run")
    page.wait_for_selector("#tokens .tok")
    found = _post(f"{server}/api/search", {"sae": "saes.main", "text": text, "top_k": 5, "top_features": 20})
    assert page.locator("#tokens .tok").all_inner_texts() == found["tokens"]
    shown = page.locator("#top-features td:first-child a").all_inner_texts()
    assert shown == [str(f["index"]) for f in found["top_features"]]
    page.locator("#tokens .tok").nth(2).click()
    assert str(found["token_features"][2][0]["index"]) in page.inner_text("#token-detail")
    page.screenshot(path=str(shots / "search.png"), full_page=True)
    assert not page.outside_requests and not page.console_errors


def test_steering_playground_shows_default_and_steered_text(page, server, shots):
    page.goto(f"{server}/ui/steer.html?sae=saes.main&index=7&strength=60")
    page.wait_for_selector(".feature-row")
    page.fill("#prompt", "Now is the winter of our discontent")
    page.fill("#max_new_tokens", "8")
    page.fill("#temperature", "0")
    page.click("#run")
    page.wait_for_function("() => !document.querySelector('#run').disabled && document.querySelector('#steered')?.textContent.length > 1")
    expected = _post(f"{server}/api/steer", {"prompt": "Now is the winter of our discontent", "max_new_tokens": 8,
                                             "temperature": 0, "seed": 0, "method": "additive",
                                             "features": [{"sae": "saes.main", "index": 7, "strength": 60}]})
    assert page.inner_text("#default") == expected["prompt"] + expected["default"]
    assert page.inner_text("#steered") == expected["prompt"] + expected["steered"]
    assert expected["default"] != expected["steered"]
    page.screenshot(path=str(shots / "steer.png"), full_page=True)
    page.fill(".f-strength", "5000")  # beyond the server's limit: the error is shown, not swallowed
    page.click("#run")
    page.wait_for_selector("#problem .error")
    assert "strength" in page.inner_text("#problem .error")
    page.screenshot(path=str(shots / "steer_error.png"), full_page=True)
    assert not page.outside_requests



def test_explanations_in_list_search_feature_page_and_steering(page, server, shots):
    page.console_errors.clear()  # the steering test ends on a refused request, on purpose
    by_score = _get(f"{server}/api/saes/saes.main/features?sort=score&order=desc&limit=50")["features"]
    assert by_score[0]["score"] is not None and by_score[0]["explanation"]
    page.goto(f"{server}/ui/index.html?sae=saes.main&sort=score&order=desc")
    page.wait_for_function("i => document.querySelector('#features tr.feature td a')?.textContent === i",
                           arg=str(by_score[0]["index"]))
    assert page.locator("#features tr.feature td.expl").first.inner_text() == by_score[0]["explanation"]
    assert page.locator("#features tr.feature .score").first.inner_text() == f"{by_score[0]['score']:.2f}"
    page.screenshot(path=str(shots / "feature_list_explanations.png"), full_page=True)

    # Search by explanation: a word of the best feature's explanation finds it, ranked as the API ranks.
    word = next(t for t in by_score[0]["explanation"].split('"')[1::2] if t.strip().isalnum())
    hits = _get(f"{server}/api/saes/saes.main/explanations/search?q={urllib.request.quote(word)}&limit=20")
    assert hits["total"] >= 1 and by_score[0]["index"] in [h["index"] for h in hits["results"]] or hits["total"] > 20
    page.goto(f"{server}/ui/search.html?sae=saes.main")
    page.fill("#eq", word)
    page.click("#explain-search button")
    page.wait_for_selector("#explanation-hits tr.hit")
    shown = page.locator("#explanation-hits tr.hit td:first-child a").all_inner_texts()
    assert shown == [str(h["index"]) for h in hits["results"]]
    page.fill("#text", "Now is the winter of our discontent")
    page.click("#run")
    page.wait_for_selector("#top-features tr td .expl")
    page.screenshot(path=str(shots / "search_explanations.png"), full_page=True)

    # The feature page: explanation, its controls, each scored example's verdict; the button re-explains.
    index = by_score[0]["index"]
    page.goto(f"{server}/ui/feature.html?sae=saes.main&index={index}")
    page.wait_for_selector("#explanation-scores")
    assert by_score[0]["explanation"] in page.inner_text("#explanation")
    assert page.locator("#explanation-scores tr.role-shuffled-\\(chance\\)").count() == 1
    feature = _get(f"{server}/api/saes/saes.main/features/{index}")
    verdicts = feature["explanations"]["explanation"]["verdicts"]
    assert page.locator("#verdict-table tr.verdict-row").count() == len(verdicts) > 0
    right = sum((v["p_yes"] >= 0.5) == v["label"] for v in verdicts)
    assert page.locator("#verdict-table td.verdict.right").count() == right
    page.wait_for_selector("#density .plotly .bars")
    page.click("#explain")
    page.wait_for_function("() => document.querySelector('#explain-status')?.textContent === 'done'")
    page.click("#verdicts-box summary")
    page.screenshot(path=str(shots / "feature_explanation.png"), full_page=True)

    page.goto(f"{server}/ui/steer.html?sae=saes.main&index={index}")
    page.wait_for_selector(".feature-row .f-note .expl")
    assert by_score[0]["explanation"] in page.inner_text(".feature-row .f-note")
    assert not page.outside_requests and not page.console_errors


def test_training_tab_of_a_browse_only_server_says_so(page, served_root, shots):
    with running_server(served_root, "--max-runs", "0") as url:
        statuses = []
        record = lambda r: statuses.append((r.status, r.url))
        page.on("response", record)
        for name in ("runs.html", "run_new.html", "run.html?id=x", "compare.html?runs=a,b"):
            page.goto(f"{url}/ui/{name}")
            page.wait_for_selector("#browse-only")
            assert "does not train" in page.inner_text("#browse-only")
            assert "--max-runs" in page.inner_text("#browse-only")
        page.screenshot(path=str(shots / "training_browse_only.png"), full_page=True)
        assert not [s for s in statuses if s[0] >= 400], statuses
        assert not any("/api/runs" in u for _, u in statuses)
        page.remove_listener("response", record)
        page.outside_requests.clear()  # this server is not the module's

"""Training runs in real headless Chromium (the set-up of tests/test_browser.py): start a small run on a
synthetic store with a plugin from the generated form, watch its live curves until it finishes,
analyse its SAE against a tiny model of the same width and open its feature list, then compare it
with a baseline run. Screenshots go to $SAE_KIT_SCREENSHOTS, else the test's temporary folder."""
from __future__ import annotations

import time

import pytest

# page and shots are test_browser's fixtures; page uses this module's server.
from test_browser import _get, _post, page, running_server, shots  # noqa: F401 (fixtures)  # skips this module too when Chromium is missing
from tiny_served import HOOK, write_tiny_model

D_IN = 32
SMALL = {"k": 4, "expansion": 2, "batch_size": 128, "tokens": 128 * 120, "log_every": 5, "eval_every": 40,
         "eval_tokens": 512, "checkpoint_every": 20, "init_tokens": 1024, "warmup_steps": 5, "threads": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from sae_kit.eval.synthetic import make_dataset, write_synthetic_store

    root = tmp_path_factory.mktemp("training")
    write_synthetic_store(root / "stores" / "synth", make_dataset("sharkey", d=D_IN, n_features=64), tokens=8192)
    write_tiny_model(root / "model")
    with running_server(root, "--max-runs", "1") as url:
        yield url


def test_start_a_run_with_a_plugin_watch_it_and_open_its_features(page, server, shots):
    page.goto(f"{server}/ui/run_new.html")
    page.wait_for_selector("#plugin-usage_entropy")
    assert page.locator("#architecture option").count() == len(_get(f"{server}/api/runs/schema")["architectures"])
    page.fill("#run-name", "entropy")
    page.fill("#f-activations", "stores/synth")
    for name, value in SMALL.items():
        page.fill(f"#f-{name}", str(value))
    page.check("#plugin-usage_entropy")
    page.fill("#plugin-usage_entropy-coefficient", "0.01")
    page.click("body")  # the last edit is committed (change event) before the screenshot
    page.screenshot(path=str(shots / "run_form.png"), full_page=True)
    page.click("#start")
    try:
        page.wait_for_url("**/run.html?id=*")
    except Exception:
        page.screenshot(path=str(shots / "run_form_failed.png"), full_page=True)
        raise AssertionError(f"the form did not start a run: {page.url} {page.content()[-3000:]}")
    run_id = page.url.split("id=")[1]
    run = _get(f"{server}/api/runs/{run_id}")
    assert run["config"] == {"architecture": "topk", "activations": "stores/synth", **SMALL,
                             "plugins": [{"name": "usage_entropy", "coefficient": 0.01}]}
    page.wait_for_function("() => document.querySelector('#progress').value > 0")
    page.screenshot(path=str(shots / "run_live.png"), full_page=True)
    page.wait_for_selector("#status .status.finished", timeout=180_000)
    page.wait_for_function("() => document.querySelector('#progress-text')?.textContent.startsWith('step 120 of 120')")
    # The curves hold what metrics.jsonl holds: the train normalised MSE every 5 steps, the held-out FVU every 40.
    records = _get(f"{server}/api/runs/{run_id}/metrics")["records"]
    traces = page.evaluate("() => document.getElementById('curve-fvu').data.map(t => [t.name, t.x.length])")
    assert traces == [["reconstruction", sum("reconstruction" in r for r in records)],
                      ["eval/fvu", sum("eval/fvu" in r for r in records)]] and traces[0][1] == 24
    aux = page.evaluate("() => document.getElementById('curve-aux').data.map(t => t.name)")
    assert "usage_entropy/h_batch" in aux and "auxk" in aux
    assert page.locator("#curves .plotly .scatterlayer .trace").count() >= 6
    page.screenshot(path=str(shots / "run_finished.png"), full_page=True)

    # Trained on synthetic activations: analysed against the tiny model (d_model 32), then browsed.
    page.fill("#an-model", "model")
    page.fill("#an-hook", HOOK)
    page.fill("#an-tokens", "256")
    page.fill("#an-context", "32")
    page.click("#an-run")
    page.wait_for_selector("#open-sae", timeout=180_000)
    page.click("#open-sae")
    page.wait_for_selector("#features tr.feature")
    sae_id = f"runs.{run_id}.sae"
    assert page.input_value("#sae") == sae_id
    assert page.inner_text("#range") == "1–50 of 64 features"
    expected = _get(f"{server}/api/saes/{sae_id}/features?limit=50&order=asc")["features"]
    assert page.locator("#features tr.feature td:first-child a").all_inner_texts() == [str(f["index"]) for f in expected]
    page.screenshot(path=str(shots / "run_sae_features.png"), full_page=True)
    assert not page.outside_requests and not page.console_errors


def test_compare_two_finished_runs_on_the_same_data(page, server, shots):
    baseline = _post(f"{server}/api/runs", {"config": {"activations": "stores/synth", **SMALL}, "name": "baseline"})
    for _ in range(900):
        baseline = _get(f"{server}/api/runs/{baseline['id']}")
        if baseline["status"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert baseline["status"] == "finished", baseline
    runs = {r["name"]: r for r in _get(f"{server}/api/runs")}
    page.goto(f"{server}/ui/runs.html")
    page.wait_for_selector("#runs tr.run")
    for name in ("entropy", "baseline"):
        page.check(f"#runs tr.run[data-id='{runs[name]['id']}'] input.pick")
    page.click("#compare")
    page.wait_for_selector("#comparison")
    page.wait_for_selector("#curve-fvu .plotly .scatterlayer .trace")
    header = page.locator("#comparison thead th a").all_inner_texts()
    assert sorted(header) == ["baseline", "entropy"]
    fvu_row = page.locator("#comparison tr.metric", has_text="held-out FVU").locator("td").all_inner_texts()
    by_name = dict(zip(header, fvu_row))
    assert by_name == {name: f"{runs[name]['sae']['eval']['fvu']:.3f}" for name in header}
    plugins_row = page.locator("#comparison tr.metric", has_text="plugins").locator("td").all_inner_texts()
    assert dict(zip(header, plugins_row)) == {"entropy": "usage_entropy", "baseline": "none"}
    names = page.evaluate("() => document.getElementById('curve-fvu').data.map(t => t.name)")
    assert {"entropy: eval/fvu", "baseline: eval/fvu", "entropy: reconstruction", "baseline: reconstruction"} == set(names)
    assert not page.locator("#warning .error").count()
    page.screenshot(path=str(shots / "compare.png"), full_page=True)
    assert not page.outside_requests and not page.console_errors


def test_a_new_train_config_field_appears_in_the_run_form(page, server, monkeypatch):
    """The form is built from GET /api/runs/schema: serve the schema of TrainConfig plus one declared
    field (tests/test_structure.py) and the field is there, with its choices, and is sent."""
    from test_structure import _extended_train_config

    from sae_kit import runs

    monkeypatch.setattr(runs, "TrainConfig", _extended_train_config())
    schema = runs.config_schema()
    page.route(f"{server}/api/runs/schema", lambda route: route.fulfill(json=schema))
    try:
        page.goto(f"{server}/ui/run_new.html")
        page.wait_for_selector("#f-warmup_shape")
        assert page.locator("#f-warmup_shape option").all_inner_texts() == ["linear", "cosine"]
        assert "warm-up" in page.locator("label", has=page.locator("#f-warmup_shape")).inner_text()
        assert "warmup_shape" not in page.evaluate("collect()")  # defaults are not sent
        page.select_option("#f-warmup_shape", "cosine")
        assert page.evaluate("collect()")["warmup_shape"] == "cosine"
    finally:
        page.unroute(f"{server}/api/runs/schema")

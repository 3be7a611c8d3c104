"""Training runs through the REST API (sae_kit.runs behind server/runs.py): the lifecycle on tiny
synthetic stores (create, progress, cancel, a server restart marking runs interrupted, resume to the
same SAE as an uninterrupted run), analysis into the feature browser, and bad configurations."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sae_kit.config import ConfigError
from sae_kit.eval.synthetic import make_dataset, write_synthetic_store
from sae_kit.runs import DB_FILE, RunStore
from sae_kit.server.app import create_app

D_IN = 32
# Tiny and quick: a run's time is mostly the child process importing torch.
CONFIG = {"activations": "stores/synth", "architecture": "topk", "k": 4, "expansion": 2, "batch_size": 128,
          "tokens": 128 * 120, "log_every": 5, "eval_every": 40, "eval_tokens": 512, "checkpoint_every": 20,
          "init_tokens": 1024, "warmup_steps": 5, "threads": 1, "plugins": ["usage_entropy:coefficient=0.01"]}
LONG = {**CONFIG, "tokens": 128 * 100_000, "plugins": []}


def _make_root(root: Path) -> Path:
    write_synthetic_store(root / "stores" / "synth", make_dataset("sharkey", d=D_IN, n_features=64), tokens=8192)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return _make_root(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def client(root):
    app = create_app(root, max_runs=1)
    yield TestClient(app)
    app.state.runs.close()


def test_server_info_says_it_trains_and_how_many_runs_at_once(client):
    assert client.get("/api/server").json() == {"trains": True, "max_runs": 1, "needs_token": False}


def wait_for(client, run_id, done, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/api/runs/{run_id}").json()
        if done(run):
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not get there in {timeout} s: {run}")


def finished(run):
    assert run["status"] in ("queued", "running", "finished"), run
    return run["status"] == "finished"


def has_checkpoint(root, run_id):
    return lambda run: (root / "runs" / run_id / "checkpoint" / "state.json").is_file() and run["progress"]["step"] >= 20


def test_a_run_trains_with_a_plugin_reports_progress_and_its_sae(client, root):
    created = client.post("/api/runs", json={"config": CONFIG, "name": "entropy"})
    assert created.status_code == 201, created.text
    run = created.json()
    assert run["status"] in ("queued", "running") and run["name"] == "entropy" and run["config"] == CONFIG
    assert run["progress"]["total_steps"] == 120
    seen = []
    run = wait_for(client, run["id"], lambda r: seen.append(r["progress"]["step"]) or finished(r))
    assert seen == sorted(seen) and run["progress"] == {"step": 120, "total_steps": 120, "fraction": 1.0, "eta_seconds": None}
    run_dir = root / "runs" / run["id"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["out"] == str(run_dir) and saved["plugins"] == [{"name": "usage_entropy", "coefficient": 0.01}]  # typed
    eval_json = json.loads((run_dir / "sae" / "eval.json").read_text())
    assert run["sae"]["eval"] == eval_json and run["sae"]["path"] == f"runs/{run['id']}/sae"
    assert run["latest"]["eval/fvu"] == pytest.approx(eval_json["fvu"], rel=1e-6)  # the last held-out evaluation
    assert "usage_entropy/h_batch" in run["latest"] and run["latest"]["l0"] == 4.0
    records = client.get(f"/api/runs/{run['id']}/metrics").json()["records"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records == lines and [r["step"] for r in records if "loss" in r] == list(range(5, 121, 5))
    later = client.get(f"/api/runs/{run['id']}/metrics", params={"since_step": 100}).json()["records"]
    assert later == [r for r in lines if r["step"] > 100]
    assert [r["id"] for r in client.get("/api/runs").json()] == [run["id"]]


def test_cancel_a_queued_and_a_running_run_then_resume(client, root):
    running = client.post("/api/runs", json={"config": LONG}).json()
    queued = client.post("/api/runs", json={"config": CONFIG}).json()  # max_runs=1: waits for the first
    assert client.get(f"/api/runs/{queued['id']}").json()["status"] == "queued"
    cancelled = client.post(f"/api/runs/{queued['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and "before it started" in cancelled["error"]
    wait_for(client, running["id"], has_checkpoint(root, running["id"]))
    client.post(f"/api/runs/{running['id']}/cancel")
    stopped = wait_for(client, running["id"], lambda r: r["status"] != "running")
    assert stopped["status"] == "cancelled" and stopped["sae"] is None and stopped["progress"]["step"] < 100_000
    assert client.post(f"/api/runs/{running['id']}/cancel").status_code == 409
    # The queued run never started: resuming it trains from scratch to the end.
    client.post(f"/api/runs/{queued['id']}/resume")
    assert wait_for(client, queued["id"], finished)["attempts"] == 1
    assert client.post(f"/api/runs/{queued['id']}/resume").status_code == 409


def test_a_restart_marks_runs_interrupted_and_resume_continues_from_the_checkpoint(tmp_path, root, client):
    first = TestClient(create_app(root, max_runs=1))
    run = first.post("/api/runs", json={"config": CONFIG}).json()
    wait_for(first, run["id"], has_checkpoint(root, run["id"]))
    first.app.state.runs.close()  # the server stops: its running run is stopped and marked
    store = RunStore(root / DB_FILE)
    assert store.get(run["id"])["status"] == "interrupted"
    store.update(run["id"], status="running")  # as a server killed without a chance to record anything leaves it
    store.close()

    second = TestClient(create_app(root, max_runs=1))
    try:
        interrupted = second.get(f"/api/runs/{run['id']}").json()
        assert interrupted["status"] == "interrupted" and "resume" in interrupted["error"]
        step_before = interrupted["progress"]["step"]
        assert 20 <= step_before < 120
        second.post(f"/api/runs/{run['id']}/resume")
        done = wait_for(second, run["id"], finished)
        assert done["attempts"] == 2
        log = (root / "runs" / run["id"] / "train.log").read_text()
        assert "--resume" in log
        steps = [r["step"] for r in second.get(f"/api/runs/{run['id']}/metrics").json()["records"] if "loss" in r]
        assert steps == list(range(5, 121, 5))  # each step once, the interrupted tail dropped
        # On CPU a resumed run is bit-exact: the same SAE as the uninterrupted run of the first test.
        reference = [r for r in client.get("/api/runs").json() if r["name"] == "entropy"][0]
        assert done["sae"]["eval"]["fvu"] == reference["sae"]["eval"]["fvu"]
    finally:
        second.app.state.runs.close()


def test_a_finished_run_is_analysed_into_the_feature_browser(client, root):
    from tiny_served import HOOK, write_tiny_model

    run = next(r for r in client.get("/api/runs").json() if r["name"] == "entropy")
    assert not run["sae"]["served"] and "synthetic activations" in run["sae"]["problem"]
    refused = client.post(f"/api/runs/{run['id']}/analyze", json={})
    assert refused.status_code == 422 and "synthetic" in refused.json()["detail"]
    write_tiny_model(root / "model")  # d_model 32, the store's width
    started = client.post(f"/api/runs/{run['id']}/analyze", json={"model": "model", "hook": HOOK, "tokens": 256,
                                                                  "context": 32})
    assert started.status_code == 202 and started.json()["analysis"] == "running"
    done = wait_for(client, run["id"], lambda r: r["analysis"] != "running")
    assert done["analysis"] == "done", done["analysis_error"]
    assert done["sae"]["analysed"] and done["sae"]["served"] and done["sae"]["problem"] is None
    sae_id = done["sae"]["id"]
    served = client.get(f"/api/saes/{sae_id}").json()
    assert served["analysed"] and served["d_sae"] == 2 * D_IN and served["hook"] == HOOK
    page = client.get(f"/api/saes/{sae_id}/features", params={"limit": 10}).json()
    assert page["total"] == 2 * D_IN and len(page["features"]) == 10
    outside = client.post(f"/api/runs/{run['id']}/analyze", json={"model": "../../model", "hook": HOOK})
    assert outside.status_code == 422 and "outside" in outside.json()["detail"]


BAD = [
    ({**CONFIG, "learning_rate": 1}, "unknown training setting(s) ['learning_rate']"),
    ({**CONFIG, "out": "/tmp/x"}, "chosen by the server"),
    ({**CONFIG, "k": "many"}, "k: expected an integer, got 'many'"),
    ({**CONFIG, "k": 0}, "k must be >= 1"),
    ({**CONFIG, "architecture": "nope"}, "unknown architecture 'nope'"),
    ({**CONFIG, "options": {"selection": "batch"}}, "unknown option(s) ['selection'] for architecture 'topk'"),
    ({**CONFIG, "plugins": ["nope"]}, "unknown plugin 'nope'"),
    ({**CONFIG, "plugins": ["usage_entropy:temperature=0"]}, "temperature must be > 0"),
    ({**CONFIG, "activations": "../../etc"}, "outside the server's data folder"),
    ({**CONFIG, "activations": "/etc"}, "outside the server's data folder"),
    ({**CONFIG, "activations": "stores/missing"}, "does not exist in the server's data folder"),
    ({**CONFIG, "activations": "stores"}, "manifest.json"),
    ({**CONFIG, "model": "smollm2", "hook": "blocks.1.hook_resid_post"}, "not both"),
    ({**{k: v for k, v in CONFIG.items() if k != "activations"}, "model": "smollm2"}, "model needs hook"),
    ({**{k: v for k, v in CONFIG.items() if k != "activations"}}, "no activations"),
    ({**CONFIG, "activations": ["stores/synth", "stores/synth"]}, "one activation store per run"),
]


@pytest.mark.parametrize("config, message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_configurations_are_refused_with_what_is_wrong(client, root, config, message):
    before = sorted(p.name for p in (root / "runs").iterdir())
    response = client.post("/api/runs", json={"config": config})
    assert response.status_code == 422 and message in response.json()["detail"], response.text
    assert sorted(p.name for p in (root / "runs").iterdir()) == before  # nothing created


def test_malformed_requests_and_unknown_runs(client):
    assert client.post("/api/runs", json={"config": [1, 2]}).status_code == 422
    assert client.post("/api/runs", json={"config": CONFIG, "extra": 1}).status_code == 422
    assert client.post("/api/runs", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
    missing = client.get("/api/runs/no-such-run")
    assert missing.status_code == 404 and "GET /api/runs" in missing.json()["detail"]
    assert client.post("/api/runs/no-such-run/cancel").status_code == 404
    assert client.get("/api/runs/..%2F..%2Fetc").status_code in (404, 422)


def test_runs_need_the_api_token_when_the_server_has_one(root):
    app = create_app(root, max_runs=1, api_token="tok")
    try:
        guarded = TestClient(app)
        assert guarded.get("/api/runs").status_code == 401
        assert guarded.post("/api/runs", json={"config": {"k": 0}}).status_code == 401
        ok = guarded.get("/api/runs", headers={"Authorization": "Bearer tok"})
        assert ok.status_code == 200 and ok.json()
        assert guarded.get("/api/saes").status_code == 200  # browsing stays open
    finally:
        app.state.runs.close()


def test_schema_is_derived_from_train_config_architectures_and_plugins(client):
    from sae_kit.plugins.api import available_plugins
    from sae_kit.sae import ARCHITECTURES

    schema = client.get("/api/runs/schema").json()
    fields = schema["train_config"]["properties"]
    assert "out" not in fields and fields["k"]["type"] == "integer" and fields["k"]["default"] == 32
    assert "active latents" in fields["k"]["description"]
    assert [a["name"] for a in schema["architectures"]] == sorted(ARCHITECTURES)
    gba = next(a for a in schema["architectures"] if a["name"] == "gba")
    assert {"groups", "tied"} <= {o["name"] for o in gba["options"]}
    plugins = {p["name"]: p for p in schema["plugins"]}
    assert set(plugins) == set(available_plugins())
    entropy = plugins["usage_entropy"]
    assert entropy["paper"].startswith("GigaTok") and entropy["summary"]
    assert {"name": "coefficient", "default": 1e-3, "type": "number"}.items() <= entropy["options"][0].items()


def test_a_training_server_starts_beside_sae_folders_it_cannot_serve_yet(root, client):
    # root holds the SAEs trained above on synthetic activations: no model to browse them with yet.
    app = create_app(root, max_runs=1)
    try:
        skipped = app.state.registry.skipped
        finished = [r["sae"] for r in client.get("/api/runs").json() if r["sae"]]
        analysed = [sae["id"] for sae in finished if sae["analysed"]]
        assert len(finished) == 3 and len(analysed) == 1  # the one analysed against the tiny model is served
        assert set(skipped) == {sae["id"] for sae in finished} - set(analysed)
        assert all("synthetic activations" in problem for problem in skipped.values())
        listed = TestClient(app).get("/api/saes").json()
        assert [s["id"] for s in listed if s["served"]] == analysed
        assert {s["id"]: s["problem"] for s in listed if not s["served"]} == skipped  # listed with their problem
    finally:
        app.state.runs.close()
    with pytest.raises(FileNotFoundError, match="no SAE folder"):  # a browsing-only server still needs an SAE
        create_app(root / "stores")


def test_a_corrupt_run_registry_is_reported_not_replaced(tmp_path):
    (tmp_path / DB_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="not a readable run registry.*move it away"):
        create_app(tmp_path, max_runs=1)
    assert (tmp_path / DB_FILE).read_bytes() == b"this is not sqlite" * 100


def test_a_killed_server_takes_its_training_child_along_and_the_next_one_resumes_it(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    root = _make_root(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "sae_kit.cli", "serve", str(root), "--port", str(port),
                               "--max-runs", "1"], env={**os.environ, "SAE_KIT_API_TOKEN": ""},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api/runs"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(0.1)
        request = urllib.request.Request(url, data=json.dumps({"config": {**CONFIG, "tokens": 128 * 400}}).encode(),
                                         headers={"Content-Type": "application/json"})
        run_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["id"]
        checkpoint = root / "runs" / run_id / "checkpoint" / "state.json"
        deadline = time.monotonic() + 120
        while not checkpoint.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        children = [int(pid) for task in Path(f"/proc/{server.pid}/task").iterdir()
                    for pid in (task / "children").read_text().split()]
        assert len(children) == 1 and checkpoint.is_file()
    finally:
        server.send_signal(signal.SIGKILL)  # no chance to record anything
        server.wait(timeout=30)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{children[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{children[0]}").exists() or "Z" in Path(f"/proc/{children[0]}/stat").read_text().split()[2]

    app = create_app(root, max_runs=1)
    client = TestClient(app)
    try:
        run = client.get(f"/api/runs/{run_id}").json()
        assert run["status"] == "interrupted" and "server stopped" in run["error"]
        assert 0 < run["progress"]["step"] < 400
        client.post(f"/api/runs/{run_id}/resume")
        etas = []
        done = wait_for(client, run_id, lambda r: etas.append(r["progress"]["eta_seconds"]) or finished(r))
        steps = [r["step"] for r in client.get(f"/api/runs/{run_id}/metrics").json()["records"] if "loss" in r]
        assert steps == list(range(5, 401, 5)) and done["attempts"] == 2
        timed = [eta for eta in etas if eta is not None]
        assert timed and all(eta >= 0 for eta in timed)  # estimated once two logged steps are apart in time
    finally:
        app.state.runs.close()


@pytest.mark.timeout(600)
def test_generated_requests_to_the_run_endpoints_get_no_server_error(root):
    """schemathesis on the /api/runs operations (as tests/test_api_fuzz.py does for the browsing ones):
    valid and invalid requests, every documented check but positive_data_acceptance (a schema-valid
    config naming no store in the data folder is rightly a 422)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import positive_data_acceptance

    app = create_app(root, max_runs=1, api_token="fuzz")
    auth = {"Authorization": "Bearer fuzz"}
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [r.ok() for r in schema.get_all_operations() if r.ok().path.startswith("/api/runs")]
        assert len(operations) == 8
        runs_before = len(TestClient(app).get("/api/runs", headers=auth).json())
        for operation in operations:
            for mode in schemathesis.GenerationMode:
                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
                def check(case):
                    case.call_and_validate(headers=auth, excluded_checks=[positive_data_acceptance])

                try:
                    check()
                except Unsatisfiable:
                    assert mode == schemathesis.GenerationMode.NEGATIVE
        # No generated config names a real store, so nothing started.
        assert len(TestClient(app).get("/api/runs", headers=auth).json()) == runs_before
    finally:
        app.state.runs.close()

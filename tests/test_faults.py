"""Fault injection: what a careless user or an attacker does to sae-kit, and what must still hold.

One test per defect of issue 13 (``test_defect_NN_...``; each failed on the main of that day), then
the fault classes around them that already held: damaged activation stores, killed harvests and
training runs, corrupt SAE folders and feature stores, oversized and chunked bodies, NUL bytes and
lone surrogates in every string field of every endpoint, path escapes in every path-like field.
Everything is tiny (32-wide planted stores, the 2-layer model of tiny_served.py) so the file runs in
about a minute on a free machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from sae_kit.cli import main as cli
from sae_kit.config import ConfigError
from sae_kit.eval.synthetic import SyntheticSource, make_dataset
from sae_kit.store import MANIFEST_NAME, ActivationStore, StoreError, write_store

D_IN = 32
RUN = {"activations": "stores/synth", "architecture": "topk", "k": 4, "expansion": 2, "batch_size": 128,
       "tokens": 128 * 40, "log_every": 5, "eval_every": 40, "eval_tokens": 512, "checkpoint_every": 20,
       "init_tokens": 1024, "warmup_steps": 5, "threads": 1}


def synthetic_store(directory: Path, tokens: int = 4096, shard_tokens: int = 1024) -> Path:
    dataset = make_dataset("sharkey", d=D_IN, n_features=64)
    rows = SyntheticSource(dataset).sample(tokens, seed=0)
    write_store(directory, rows, shard_tokens=shard_tokens, model_name="synthetic:sharkey", hook_name="synthetic")
    return directory


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return synthetic_store(tmp_path_factory.mktemp("store") / "synth")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, store) -> Path:
    """A tiny SAE trained on ``store`` (its folder)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli(["train", "--config", _write(out.parent / "c.yaml", {**RUN, "activations": str(store)}),
                "--out", str(out), "--no-progress"]) == 0
    return out / "sae"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, store) -> Path:
    root = tmp_path_factory.mktemp("runs_root")
    shutil.copytree(store, root / "stores" / "synth")
    return root


@pytest.fixture(scope="module")
def outside(tmp_path_factory, store) -> Path:
    """A folder outside the served root holding a valid store, a text file and an SAE."""
    place = tmp_path_factory.mktemp("outside")
    shutil.copytree(store, place / "store")
    (place / "secret.txt").write_text("top secret: not a store\n")
    return place


FAKE_TRAINER = """#!{python}
# Stands in for `python -m sae_kit.cli train`: takes a moment, then leaves a finished run's SAE.
import json, pathlib, sys, time
time.sleep({delay})
config = pathlib.Path(sys.argv[sys.argv.index("--config") + 1])
sae = config.parent / "sae"
sae.mkdir(exist_ok=True)
(sae / "cfg.json").write_text(json.dumps({{"d_in": 1, "d_sae": 1, "architecture": "topk"}}))
"""


def fake_python(directory: Path, delay: float = 1.0) -> str:
    path = directory / "fake-python"
    path.write_text(FAKE_TRAINER.format(python=sys.executable, delay=delay))
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def runs_app(runs_root, tmp_path_factory):
    """A training server whose children are the fake trainer (nothing here needs real training)."""
    from sae_kit.server.app import create_app

    app = create_app(runs_root, max_runs=1)
    app.state.runs.python = fake_python(tmp_path_factory.mktemp("fake"), delay=0.5)
    yield app
    app.state.runs.close()


@pytest.fixture(scope="module")
def runs_client(runs_app):
    return TestClient(runs_app, raise_server_exceptions=False)


def _write(path: Path, data: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def run_count(client) -> int:
    return len(client.get("/api/runs").json())


# ============================================================================ the twelve defects
# ---------------------------------------------------------------------------- 1. confinement
@pytest.mark.parametrize("change", [
    {"plugins": ["color_filter:target={outside}/store"]},
    {"plugins": [{"name": "color_filter", "target": "../{outside_name}/store"}]},
    {"plugins": ["color_filter:target={outside}/secret.txt"]},
    {"plugins": ["arl:sources=stores/synth+{outside}/store"]},
    {"plugins": ["mask_tune:pretrain_data={outside}/store"]},
    {"plugins": ["mask_tune:pretrained={outside}"]},
    {"plugins": ["preference:pairs={outside}/secret.txt"]},
    {"plugins": ["downstream_kl:model={outside}"]},
    {"plugins": ["text_aug:dataset={outside}/secret.txt"]},
    {"plugins": ["color_filter:target=~/store"]},
    {"model": "~", "hook": "blocks.0.hook_resid_post", "activations": None},
    {"model": "~/", "hook": "blocks.0.hook_resid_post", "activations": None},
    {"dataset": "~", "model": "smollm2", "hook": "blocks.0.hook_resid_post", "activations": None},
    {"activations": "~"},
    {"activations": "stores/link-out"},
    {"targets": "{outside}/store"},
    {"targets": "~"},
    {"targets": "stores/link-out"},
])
def test_defect_01_every_path_a_run_reaches_is_confined_before_it_is_queued(runs_client, runs_root, outside, change):
    link = runs_root / "stores" / "link-out"
    if not link.exists():
        link.symlink_to(outside / "store")
    text = json.dumps(change).replace("{outside}", str(outside)).replace("{outside_name}", os.path.relpath(outside, runs_root))
    config = {**RUN, **json.loads(text)}
    config = {key: value for key, value in config.items() if value is not None}
    before = run_count(runs_client)
    response = runs_client.post("/api/runs", json={"config": config})
    assert response.status_code == 422, response.text
    assert "outside the server's data folder" in response.json()["detail"], response.json()
    assert "top secret" not in response.text
    assert run_count(runs_client) == before  # refused before anything was queued


@pytest.mark.parametrize("model_name", ["{outside}", "~", "~/models/tiny", "../{outside_name}"])
@pytest.mark.parametrize("plugin", ["downstream_kl", "auglocal", "text_aug", None])
def test_defect_01_a_plugin_model_defaulting_to_the_store_model_name_is_confined(runs_client, runs_root, outside,
                                                                                  model_name, plugin):
    """A plugin whose ``model`` option is left empty runs the store's model_name, and without plugins the
    finished run's SAE records it (the browser then loads that model): that path is confined too."""
    name = model_name.replace("{outside}", str(outside)).replace("{outside_name}", os.path.relpath(outside, runs_root))
    store = runs_root / "stores" / f"named-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    if not store.exists():
        write_store(store, torch.zeros(256, D_IN), shard_tokens=128, model_name=name, hook_name="blocks.0.hook_resid_post")
    before = run_count(runs_client)
    response = runs_client.post("/api/runs", json={"config": {**RUN, "activations": str(store.relative_to(runs_root)),
                                                              "plugins": [plugin] if plugin else []}})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "outside the server's data folder" in detail and "model_name" in detail, detail
    assert run_count(runs_client) == before


def test_a_plugin_model_defaulting_to_a_store_model_name_inside_the_root_runs_that_model(runs_client, runs_root):
    """The store's model_name inside the data folder is accepted, and the child is handed the checked path."""
    (runs_root / "models" / "tiny").mkdir(parents=True, exist_ok=True)
    store = runs_root / "stores" / "named-inside"
    if not store.exists():
        write_store(store, torch.zeros(256, D_IN), shard_tokens=128, model_name="models/tiny",
                    hook_name="blocks.0.hook_resid_post")
    response = runs_client.post("/api/runs", json={"config": {**RUN, "activations": "stores/named-inside",
                                                              "plugins": ["downstream_kl"]}})
    assert response.status_code == 201, response.text
    recorded = json.loads((runs_root / "runs" / response.json()["id"] / "config.json").read_text())
    assert recorded["plugins"][0]["model"] == str((runs_root / "models" / "tiny").resolve())
    runs_client.post(f"/api/runs/{response.json()['id']}/cancel")


# ---------------------------------------------------------------------------- 2. NUL bytes
@pytest.mark.parametrize("field", ["activations", "model", "dataset", "plugins"])
def test_defect_02_a_nul_byte_in_a_run_path_is_a_422(runs_client, field):
    value = ["color_filter:target=stores/synth\x00"] if field == "plugins" else "stores/synth\x00"
    config = {**RUN, field: value}
    if field in ("model", "dataset"):
        config.update({"activations": None, "model": "smollm2\x00" if field == "model" else "smollm2",
                       "hook": "blocks.0.hook_resid_post"})
        config = {k: v for k, v in config.items() if v is not None}
    response = runs_client.post("/api/runs", json={"config": config})
    assert response.status_code == 422, response.text
    assert "NUL" in response.json()["detail"]


# ---------------------------------------------------------------------------- 3. checksums
def _flip_inside(path: Path, count: int = 64) -> None:
    """Flip ``count`` bytes in the middle of a shard's data, keeping its size (and its header) intact."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_defect_03_a_flipped_shard_is_caught_by_train_and_eval(tmp_path, trained, capsys):
    store = synthetic_store(tmp_path / "s")
    shard = store / "shard_00003.safetensors"  # the held-out tail: eval reads it, so does training
    size = shard.stat().st_size
    _flip_inside(shard)
    assert shard.stat().st_size == size
    with pytest.raises(StoreError, match="shard_00003.safetensors.*checksum"):
        ActivationStore(store).read(3072, 3100)
    code = cli(["eval", str(trained), "--activations", str(store), "--tokens", "512", "--batch-size", "128",
                "--json", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err
    assert code == 2 and "shard_00003.safetensors" in err and "re-harvest" in err, err
    assert not (tmp_path / "eval.json").exists()
    code = cli(["train", "--config", _write(tmp_path / "c.yaml", {**RUN, "activations": str(store)}),
                "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "shard_00003.safetensors" in err, err


def test_defect_03_eval_checks_every_shard_against_the_manifest_at_open(tmp_path, trained, capsys):
    # A wrong row count in a shard eval never reads (the total still adds up)...
    store = synthetic_store(tmp_path / "rows")
    manifest = json.loads((store / MANIFEST_NAME).read_text())
    manifest["shards"][0]["n_tokens"] += 8
    manifest["shards"][1]["n_tokens"] -= 8
    (store / MANIFEST_NAME).write_text(json.dumps(manifest))
    code = cli(["eval", str(trained), "--activations", str(store), "--tokens", "256", "--batch-size", "128",
                "--json", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err
    assert code == 2 and "shard_00000.safetensors" in err and "1024 rows" in err, err
    # ... and a corrupt header in one (same size).
    store = synthetic_store(tmp_path / "header")
    shard = store / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:16] = b"#garbage"
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard_00000.safetensors"):
        ActivationStore(store)


# ---------------------------------------------------------------------------- 4. write_store
def test_defect_04_write_store_leaves_nothing_behind_when_it_refuses(tmp_path):
    bad = torch.randn(64, D_IN)
    bad[10, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        write_store(tmp_path / "s", bad)
    assert not (tmp_path / "s").exists()
    assert write_store(tmp_path / "s", torch.randn(64, D_IN)).n_tokens == 64  # the retry works
    # A folder that existed before the call is kept (only what the call created goes).
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError):
        write_store(tmp_path / "mine", bad)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------- 5. --out with an sae/
def test_defect_05_an_out_folder_holding_an_sae_is_not_overwritten(tmp_path, store, trained, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out / "sae")
    before = {p.name: p.read_bytes() for p in (out / "sae").iterdir()}
    code = cli(["train", "--config", _write(tmp_path / "c.yaml", {**RUN, "activations": str(store)}),
                "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "sae" in err and "--out" in err, err
    assert {p.name: p.read_bytes() for p in (out / "sae").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == ["sae"]


# ---------------------------------------------------------------------------- 6. k > d_sae
def test_defect_06_k_larger_than_d_sae_is_refused_at_config_time(tmp_path, store, runs_client, capsys):
    from sae_kit.train.trainer import TrainConfig

    with pytest.raises(ConfigError, match="k.*d_sae"):
        TrainConfig(k=500, d_sae=96)
    out = tmp_path / "run"
    code = cli(["train", "--config", _write(tmp_path / "c.yaml", {**RUN, "activations": str(store), "k": 100}),
                "--out", str(out), "--no-progress"])  # expansion 2 x 32 = 64 latents
    err = capsys.readouterr().err
    assert code == 2 and "k=100" in err and "d_sae=64" in err, err
    assert not out.exists()
    before = run_count(runs_client)
    response = runs_client.post("/api/runs", json={"config": {**RUN, "k": 100}})
    assert response.status_code == 422 and "d_sae=64" in response.json()["detail"], response.text
    assert run_count(runs_client) == before


# ---------------------------------------------------------------------------- 7. wrong types
@pytest.mark.parametrize("field, value, expected", [
    ("lr", "fast", "number"), ("warmup_steps", "ten", "integer"), ("heldout_fraction", "a tenth", "number"),
    ("grad_clip", "one", "number"), ("options", 5, "mapping"), ("plugins", 7, "list"),
    ("adam_betas", 0.9, "two numbers"), ("batch_size", [1, 2], "integer"), ("tokens", "lots", "integer"),
    ("k", True, "integer"), ("seed", 1.5, "integer"), ("activations", 3, "string"),
])
def test_defect_07_a_wrong_type_in_a_config_file_names_the_field(tmp_path, store, capsys, field, value, expected):
    config = {**RUN, "activations": str(store), field: value}
    code = cli(["train", "--config", _write(tmp_path / "c.yaml", config), "--out", str(tmp_path / "run"),
                "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip()
    assert "\n" not in line and f"{field}:" in line and expected in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value", [("warmup_steps", "10"), ("heldout_fraction", "0.1"), ("grad_clip", "1")])
def test_defect_07_numbers_written_as_strings_are_read_as_numbers(field, value):
    from sae_kit.train.trainer import TrainConfig

    assert getattr(TrainConfig.from_dict({field: value}), field) == float(value)


# ---------------------------------------------------------------------------- 8. cfg.json
@pytest.mark.parametrize("key, value, words", [
    ("metadata", ["not", "a", "mapping"], "metadata"),
    ("d_sae", 1e9, "d_sae"),
    ("d_in", 10**7, "d_in"),
    ("k", "four", "k"),
    ("sae_kit", 3, "sae_kit"),
])
def test_defect_08_a_damaged_cfg_json_names_the_key(tmp_path, trained, capsys, key, value, words):
    from sae_kit.sae import load_sae

    sae_dir = shutil.copytree(trained, tmp_path / "sae")
    data = json.loads((sae_dir / "cfg.json").read_text())
    data[key] = value
    (sae_dir / "cfg.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=rf"cfg\.json.*\b{words}\b"):
        load_sae(sae_dir)
    store = trained.parent.parent  # any path: the SAE fails before the store is read
    code = cli(["eval", str(sae_dir), "--activations", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and words in err, err


# ---------------------------------------------------------------------------- 9-11. server
@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    from tiny_served import build_served_root

    return build_served_root(tmp_path_factory.mktemp("served"), analysis_tokens=256)


def _copy_served(served: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(served, tmp_path / "root", symlinks=True))


def test_defect_09_browse_only_serves_the_good_saes_and_lists_the_broken_ones(served, tmp_path):
    from sae_kit.server.app import create_app

    root = _copy_served(served, tmp_path)
    broken = root / "saes" / "broken"
    shutil.copytree(root / "saes" / "fresh", broken)
    (broken / "sae_weights.safetensors").write_bytes(b"not safetensors")
    client = TestClient(create_app(root))  # browse-only (max_runs=0), as `sae-kit demo` serves
    saes = {entry["id"]: entry for entry in client.get("/api/saes").json()}
    assert saes["saes.main"]["analysed"] and saes["saes.main"]["problem"] is None
    assert saes["saes.broken"]["served"] is False
    assert "sae_weights.safetensors" in saes["saes.broken"]["problem"]
    assert client.get("/api/saes/saes.broken/features").status_code == 404
    assert "saes.broken" in client.get("/api/saes/saes.broken").json()["detail"]
    ui = (Path(__file__).parents[1] / "frontend" / "app.js").read_text()
    assert "problem" in ui


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "delete"])
def test_defect_10_a_feature_store_damaged_at_run_time_is_a_503_naming_the_fix(served, tmp_path, damage):
    from sae_kit.server.app import create_app

    root = _copy_served(served, tmp_path)
    client = TestClient(create_app(root), raise_server_exceptions=False)
    assert client.get("/api/saes/saes.main/features/3").status_code == 200
    store = root / "saes" / "main" / "features.sqlite"
    if damage == "overwrite":
        store.write_bytes(os.urandom(store.stat().st_size))
    elif damage == "truncate":
        with open(store, "r+b") as handle:
            handle.truncate(store.stat().st_size // 3)
    else:
        store.unlink()
    for url in ("/api/saes/saes.main/features/3", "/api/saes/saes.main/features?limit=5&sort=density"):
        response = client.get(url)
        assert response.status_code in (503, 404), (url, response.status_code, response.text)
        detail = response.json()["detail"]
        assert "features.sqlite" in detail and "sae-kit analyze" in detail, detail
    health = client.get("/api/health").json()
    assert health["status"] == "degraded" and "saes.main" in health["problems"], health


def test_defect_11_a_chunked_body_over_the_limit_is_a_413(served):
    from sae_kit.server.app import Limits, create_app

    client = TestClient(create_app(served, limits=Limits(max_body_bytes=64 * 1024)))
    body = json.dumps({"sae": "saes.main", "text": "x" * 70_000}).encode()

    def chunks():
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    response = client.post("/api/encode", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert "65536" in response.json()["detail"]
    response = client.post("/api/encode", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413


# ---------------------------------------------------------------------------- 12. cancel vs start
def test_defect_12_cancelling_right_after_creating_is_never_lost(runs_root, tmp_path):
    from sae_kit.runs import RunService

    service = RunService(runs_root, max_runs=1, python=fake_python(tmp_path, delay=1.0))
    try:
        # The worst interleaving, forced: the worker starts the child just after cancel has read the row
        # (each side waits at most 2 s for the other, so a correct, atomic cancel is only slowed down).
        read, start = service.store.get, service._start
        cancel_has_read = threading.Event()
        in_cancel = threading.local()

        def get(run_id):
            row = read(run_id)
            if getattr(in_cancel, "on", False):
                cancel_has_read.set()
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline and read(run_id)["status"] == "queued":
                    time.sleep(0.01)
            return row

        def late_start(row):
            cancel_has_read.wait(2.0)
            return start(row)

        service.store.get, service._start = get, late_start
        original_cancel = service.cancel

        def cancel(run_id):
            in_cancel.on = True
            try:
                return original_cancel(run_id)
            finally:
                in_cancel.on = False

        run = service.create({**RUN})
        reply = cancel(run["id"])
        # A child started behind cancel's back would finish (and mark the run) within its 1 s delay.
        settle = time.monotonic() + 3.0
        while time.monotonic() < settle or run["id"] in service._processes:
            time.sleep(0.05)
        final = service.describe(run["id"])
        assert final["status"] == "cancelled", (reply["status"], final["status"], final["error"])
        assert not (runs_root / "runs" / run["id"] / "sae").exists()  # the child did not train to the end
    finally:
        service.close()


# ---------------------------------------------------------------------------- found by benchmarks/soak.py
@pytest.mark.parametrize("eval_text", ["", '{"fvu": 0.1', "\x00\xff"], ids=["empty", "half", "binary"])
def test_listing_runs_while_a_run_writes_its_eval_json_is_never_a_500(runs_client, runs_root, eval_text):
    """A finished run writes sae/eval.json after sae/cfg.json: a GET /api/runs in between read a
    half-written file and answered 500 (the soak caught one in 14,600 requests)."""
    run = runs_client.post("/api/runs", json={"config": RUN}).json()
    deadline = time.monotonic() + 30
    while runs_client.get(f"/api/runs/{run['id']}").json()["status"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.05)
    (runs_root / "runs" / run["id"] / "sae" / "eval.json").write_bytes(eval_text.encode("latin-1"))
    for path in ("/api/runs", f"/api/runs/{run['id']}"):
        response = runs_client.get(path)
        assert response.status_code == 200, response.text
        described = response.json()[0] if path == "/api/runs" else response.json()
        assert described["id"] == run["id"] and described["sae"]["eval"] is None


def test_the_trainer_writes_eval_json_atomically(tmp_path, store, monkeypatch):
    """Whole or absent: the final metrics go through fileio.atomic_write like every other file a reader polls."""
    import sae_kit.fileio as fileio
    import sae_kit.train.trainer as trainer_module

    written = []
    real = fileio.atomic_write
    monkeypatch.setattr(trainer_module, "atomic_write", lambda path, write: written.append(Path(path).name) or real(path, write),
                        raising=False)
    assert cli(["train", "--config", _write(tmp_path / "c.yaml", {**RUN, "activations": str(store), "tokens": 128 * 10}),
                "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "eval.json" in written
    assert json.loads((tmp_path / "run" / "sae" / "eval.json").read_text())["fvu"] >= 0


# ---------------------------------------------------------------------------- run children and the data folder
SHADOW_CLI = """import pathlib, sys
pathlib.Path("SHADOWED").write_text(" ".join(sys.argv))
sys.exit(3)
"""


def test_a_run_child_never_imports_python_files_from_the_data_folder(store, tmp_path, monkeypatch):
    """Children run ``python -m sae_kit.cli`` with the data folder as working directory; without
    PYTHONSAFEPATH, ``-m`` puts that folder first on sys.path, so a ``sae_kit/`` (or the repo's
    ``kernels/``, shadowing the package transformers imports) there would run instead of ours."""
    from sae_kit.runs import RunService

    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)  # what a server started from a shell sees
    root = tmp_path / "root"
    shutil.copytree(store, root / "stores" / "synth")
    (root / "sae_kit").mkdir()
    (root / "sae_kit" / "__init__.py").write_text("")
    (root / "sae_kit" / "cli.py").write_text(SHADOW_CLI)
    service = RunService(root, max_runs=1)  # the real interpreter: a real (tiny) training run
    try:
        run = service.create({**RUN, "tokens": 128 * 10, "eval_every": 10, "checkpoint_every": 10})
        deadline = time.monotonic() + 120
        while service.describe(run["id"])["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
        final = service.describe(run["id"])
    finally:
        service.close()
    assert not (root / "SHADOWED").exists(), "the run child imported sae_kit from the data folder"
    assert final["status"] == "finished", final["error"]


# ============================================================================ fault classes that hold
# ---------------------------------------------------------------------------- activation stores
def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


STORE_DAMAGE = {
    "truncated shard": (lambda s: _truncate(s / "shard_00001.safetensors"), "shard_00001.safetensors"),
    "deleted shard": (lambda s: (s / "shard_00002.safetensors").unlink(), "shard_00002.safetensors"),
    "flipped shard": (lambda s: _flip_inside(s / "shard_00000.safetensors"), "shard_00000.safetensors"),
    "manifest not JSON": (lambda s: (s / MANIFEST_NAME).write_text("{not json"), MANIFEST_NAME),
    "manifest total": (lambda s: (s / MANIFEST_NAME).write_text(
        (s / MANIFEST_NAME).read_text().replace('"total_tokens": 4096', '"total_tokens": 5000')), "total_tokens"),
    "manifest escape": (lambda s: (s / MANIFEST_NAME).write_text(
        (s / MANIFEST_NAME).read_text().replace('"shard_00000.safetensors"', '"../../etc/passwd"')), "plain file name"),
    "manifest deleted": (lambda s: (s / MANIFEST_NAME).unlink(), MANIFEST_NAME),
}


@pytest.mark.parametrize("damage", sorted(STORE_DAMAGE))
def test_a_damaged_store_stops_training_with_the_file_named(tmp_path, capsys, damage):
    store = synthetic_store(tmp_path / "s")
    harm, words = STORE_DAMAGE[damage]
    harm(store)
    code = cli(["train", "--config", _write(tmp_path / "c.yaml", {**RUN, "activations": str(store)}),
                "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "sae").exists()


def test_a_verified_shard_is_hashed_once_per_process_and_again_after_a_change(tmp_path, monkeypatch):
    import sae_kit.store as store_module

    store = synthetic_store(tmp_path / "s")
    hashed = []
    real = store_module._sha256_of_file
    monkeypatch.setattr(store_module, "_sha256_of_file", lambda path: hashed.append(path.name) or real(path))
    for _ in range(3):  # three readers (train, eval, a plugin) of one store in one process
        ActivationStore(store).read(0, 2000)
    assert sorted(hashed) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    _flip_inside(store / "shard_00001.safetensors")
    os.utime(store / "shard_00001.safetensors", ns=(1, 1))  # even with an old mtime the stamp differs (inode)...
    with pytest.raises(StoreError, match="shard_00001"):
        ActivationStore(store).read(1500, 1600)


def test_a_writer_killed_mid_store_leaves_a_readable_prefix_and_resumes_to_the_same_bytes(tmp_path):
    """The crash safety the harvest is built on: SIGKILL between shards, then the same writes again."""
    from sae_kit.store import ActivationStoreWriter

    rows = torch.randn(6 * 256, D_IN, generator=torch.Generator().manual_seed(3))
    script = textwrap.dedent(f"""
        import os, signal, torch
        from sae_kit.store import ActivationStoreWriter
        rows = torch.randn(6 * 256, {D_IN}, generator=torch.Generator().manual_seed(3))
        with ActivationStoreWriter({str(tmp_path / 'killed')!r}, d_in={D_IN}, shard_tokens=256) as writer:
            for start in range(0, len(rows), 128):
                writer.append(rows[start:start + 128])
                if writer.tokens_written >= 3 * 256:
                    os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    killed = ActivationStore(tmp_path / "killed")
    killed.verify()
    assert killed.n_tokens == 3 * 256 and torch.equal(killed.read(0, 768), rows[:768])
    for name in ("killed", "whole"):  # the same appends again: the killed one resumes after its last shard
        with ActivationStoreWriter(tmp_path / name, d_in=D_IN, shard_tokens=256) as writer:
            for start in range(writer.tokens_written, len(rows), 128):
                writer.append(rows[start:start + 128])
    for name in sorted(p.name for p in (tmp_path / "whole").iterdir()):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_training_run_killed_mid_run_resumes_to_the_uninterrupted_sae(tmp_path, store):
    from safetensors.torch import load_file

    config = _write(tmp_path / "c.yaml", {**RUN, "activations": str(store), "tokens": 128 * 60})
    victim = tmp_path / "victim"
    child = subprocess.Popen([sys.executable, "-m", "sae_kit.cli", "train", "--config", config, "--out", str(victim),
                              "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if (victim / "checkpoint" / "state.json").is_file():
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    child.wait(30)
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (victim / "sae").exists()
    assert cli(["train", "--config", config, "--out", str(victim), "--resume", "--no-progress"]) == 0
    assert cli(["train", "--config", config, "--out", str(tmp_path / "whole"), "--no-progress"]) == 0
    resumed = load_file(str(victim / "sae" / "sae_weights.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "sae" / "sae_weights.safetensors"))
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)


# ---------------------------------------------------------------------------- SAE folders
SAE_DAMAGE = {
    "weights truncated": (lambda d: _truncate(d / "sae_weights.safetensors"), "sae_weights.safetensors"),
    "weights deleted": (lambda d: (d / "sae_weights.safetensors").unlink(), "sae_weights.safetensors"),
    "weights of another SAE": (lambda d: (d / "sae_weights.safetensors").write_bytes(
        _other_weights()), "sae_weights.safetensors"),
    "cfg.json empty": (lambda d: (d / "cfg.json").write_text(""), "cfg.json"),
    "cfg.json not JSON": (lambda d: (d / "cfg.json").write_text("{oops"), "cfg.json"),
    "cfg.json a list": (lambda d: (d / "cfg.json").write_text("[1, 2]"), "cfg.json"),
    "unknown architecture": (lambda d: _edit_cfg(d, architecture="nope"), "architecture"),
    "options not a mapping": (lambda d: _edit_cfg(d, sae_kit={"options": [1]}), "options"),
    "negative k": (lambda d: _edit_cfg(d, k=-3), "k"),
}


def _other_weights() -> bytes:
    from safetensors.torch import save

    return save({"W_enc": torch.zeros(7, 9), "W_dec": torch.zeros(9, 7), "b_enc": torch.zeros(9), "b_dec": torch.zeros(7)})


def _edit_cfg(directory: Path, **changes) -> None:
    data = json.loads((directory / "cfg.json").read_text())
    data.update(changes)
    (directory / "cfg.json").write_text(json.dumps(data))


@pytest.mark.parametrize("damage", sorted(SAE_DAMAGE))
def test_a_damaged_sae_folder_is_refused_naming_the_file(tmp_path, trained, store, capsys, damage):
    sae_dir = Path(shutil.copytree(trained, tmp_path / "sae"))
    harm, words = SAE_DAMAGE[damage]
    harm(sae_dir)
    code = cli(["eval", str(sae_dir), "--activations", str(store), "--tokens", "256", "--batch-size", "128"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err


def test_a_browse_only_server_lists_every_damaged_sae_folder(served, tmp_path):
    from sae_kit.server.app import create_app

    root = _copy_served(served, tmp_path)
    for index, damage in enumerate(sorted(SAE_DAMAGE)):
        if damage == "weights deleted":  # no longer an SAE folder at all: not listed
            continue
        target = Path(shutil.copytree(root / "saes" / "fresh", root / "saes" / f"broken{index}"))
        SAE_DAMAGE[damage][0](target)
    client = TestClient(create_app(root))
    listed = {entry["id"]: entry for entry in client.get("/api/saes").json()}
    assert listed["saes.main"]["served"] and listed["saes.fresh"]["served"]
    broken = {sae_id: entry for sae_id, entry in listed.items() if not entry["served"]}
    # cfg.json files that are not an SAE config (empty, not JSON, a list) are not SAE folders.
    assert len(broken) >= 5 and all(entry["problem"] for entry in broken.values()), broken
    all_broken = _copy_served(served, tmp_path / "all")
    for name in ("main", "fresh"):
        SAE_DAMAGE["weights truncated"][0](all_broken / "saes" / name)
    with pytest.raises(ConfigError, match="none of the SAE folders.*saes.main"):
        create_app(all_broken)


# ---------------------------------------------------------------------------- feature stores
def test_a_feature_store_damaged_before_start_is_reported_not_served(served, tmp_path):
    from sae_kit.server.app import create_app

    root = _copy_served(served, tmp_path)
    (root / "saes" / "main" / "features.sqlite").write_bytes(b"\x00" * 4096)
    client = TestClient(create_app(root))
    sae = client.get("/api/saes/saes.main").json()
    assert not sae["analysed"] and "features.sqlite" in sae["store_problem"]
    response = client.get("/api/saes/saes.main/features")
    assert response.status_code == 404 and "sae-kit analyze" in response.json()["detail"]
    assert client.post("/api/encode", json={"sae": "saes.main", "text": "still encodes"}).status_code == 200


def test_a_feature_store_rebuilt_while_served_is_served_again(served, tmp_path):
    from sae_kit.server.app import create_app

    root = _copy_served(served, tmp_path)
    client = TestClient(create_app(root), raise_server_exceptions=False)
    store = root / "saes" / "main" / "features.sqlite"
    good = store.read_bytes()
    _truncate(store)
    assert client.get("/api/saes/saes.main/features/1").status_code == 503
    assert client.get("/api/health").json()["status"] == "degraded"
    replacement = store.with_suffix(".new")
    replacement.write_bytes(good)
    replacement.replace(store)  # what `sae-kit analyze` does: a whole new file renamed into place
    assert client.get("/api/saes/saes.main/features/1").status_code == 200
    assert client.get("/api/health").json() == {"status": "ok"}


# ---------------------------------------------------------------------------- every endpoint
@pytest.fixture(scope="module")
def full_root(served, tmp_path_factory, store, trained) -> Path:
    """The tiny served folder plus an activation store and a finished run, for a server that trains."""
    root = Path(shutil.copytree(served, tmp_path_factory.mktemp("full") / "root", symlinks=True))
    shutil.copytree(store, root / "stores" / "synth")
    return root


@pytest.fixture(scope="module")
def full(full_root, tmp_path_factory):
    """(client, a finished run's id) on a server that browses and trains (its children: the fake trainer)."""
    from sae_kit.server.app import create_app

    app = create_app(full_root, max_runs=1)
    app.state.runs.python = fake_python(tmp_path_factory.mktemp("fake-full"), delay=0.1)
    client = TestClient(app, raise_server_exceptions=False)
    run = client.post("/api/runs", json={"config": RUN}).json()
    deadline = time.monotonic() + 30
    while client.get(f"/api/runs/{run['id']}").json()["status"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.05)
    # A real SAE in the finished run's folder, so analyze reaches its model and hook checks.
    from tiny_served import write_tiny_sae

    shutil.rmtree(full_root / "runs" / run["id"] / "sae")
    write_tiny_sae(full_root / "runs" / run["id"] / "sae", "model")
    yield client, run["id"]
    app.state.runs.close()


def valid_bodies(run_id: str) -> dict[tuple[str, str], dict]:
    """One valid JSON body per operation that takes one."""
    return {
        ("post", "/api/search"): {"sae": "saes.main", "text": "It was a bright cold day", "top_k": 3},
        ("post", "/api/encode"): {"sae": "saes.main", "text": "It was a bright cold day", "features": [1, 2]},
        ("post", "/api/steer"): {"prompt": "Once upon", "features": [{"sae": "saes.main", "index": 3, "strength": 4}],
                                 "max_new_tokens": 2, "method": "additive"},
        ("post", "/api/runs"): {"config": {**RUN, "plugins": ["usage_entropy:coefficient=0.01"]}, "name": "probe"},
        ("post", "/api/saes/{sae_id}/features/{index}/explain"): {"explainer": "token-rule"},
        ("post", "/api/runs/{run_id}/analyze"): {"model": "model", "hook": "blocks.1.hook_resid_post", "tokens": 64,
                                                 "context": 8},
    }


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def string_fields(spec: dict, schema: dict, prefix: tuple = ()) -> set[tuple]:
    """Paths (keys, with 0 for a list item) of every string field a request schema declares."""
    schema = _resolve(spec, schema)
    found = set()
    for option in schema.get("anyOf", []):
        found |= string_fields(spec, option, prefix)
    if schema.get("type") == "string":
        found.add(prefix)
    if schema.get("type") == "array" and "items" in schema:
        found |= string_fields(spec, schema["items"], (*prefix, 0))
    for name, sub in schema.get("properties", {}).items():
        found |= string_fields(spec, sub, (*prefix, name))
    return found


def run_config_string_fields(client) -> set[tuple]:
    """TrainConfig's string fields, from GET /api/runs/schema (RunRequest.config is a free mapping)."""
    schema = client.get("/api/runs/schema").json()["train_config"]
    return {("config", *path) for path in string_fields(schema, schema)}


def _set(body, path, value):
    """``body`` with the field at ``path`` set to ``value`` (a list item: the list becomes ``[value]``)."""
    body = json.loads(json.dumps(body))
    target = body
    keys = path[:-1] if path[-1] != 0 else path[:-2]
    for key in keys:
        target = target[key]
    if path[-1] == 0:
        target[path[-2]] = [value]
    else:
        target[path[-1]] = value
    return body


def _operations(client):
    spec = client.app.openapi()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield spec, path, method, operation


from urllib.parse import quote  # noqa: E402

BAD_TEXT = {"NUL": "stores/synth\x00.txt", "lone surrogate": "caf\ud800é"}


@pytest.mark.parametrize("bad", sorted(BAD_TEXT))
def test_nul_and_lone_surrogates_in_every_string_field_of_every_endpoint_get_a_4xx(full, bad):
    client, run_id = full
    bodies = valid_bodies(run_id)
    probed = 0
    for spec, path, method, operation in _operations(client):
        url = path.replace("{run_id}", run_id).replace("{sae_id}", "saes.main").replace("{index}", "3")
        schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        cases = []
        if schema is not None:
            body = bodies[(method, path)]
            fields = string_fields(spec, schema) | (run_config_string_fields(client) if path == "/api/runs" else set())
            for field in fields:
                plugin = field[:2] == ("config", "plugins")
                value = f"usage_entropy:coefficient=0.01{BAD_TEXT[bad]}" if plugin else BAD_TEXT[bad]
                cases.append(("json", field, _set(body, ("config", "plugins", 0) if plugin else field, value)))
        for parameter in operation.get("parameters", []):
            if string_fields(spec, parameter["schema"]):
                cases.append((parameter["in"], parameter["name"], BAD_TEXT[bad]))
        for kind, field, value in cases:
            if kind == "json":
                payload = json.dumps(value)  # \u escapes: a lone surrogate travels as valid JSON text
                response = client.request(method, url, content=payload, headers={"Content-Type": "application/json"})
            else:  # a lone surrogate in a URL: its UTF-8-ish bytes, percent-encoded (what a client may send)
                quoted = quote(value.encode("utf-8", "surrogatepass"), safe="")
                if kind == "query":
                    response = client.request(method, f"{url}?{field}={quoted}")
                else:
                    response = client.request(method, path.replace("{" + field + "}", quoted).replace(
                        "{run_id}", run_id).replace("{sae_id}", "saes.main").replace("{index}", "3"))
            probed += 1
            # In a URL a lone surrogate cannot survive decoding (it arrives as U+FFFD): no error needed there.
            lowest = 200 if kind != "json" and bad == "lone surrogate" else 400
            assert lowest <= response.status_code < 500, (method, path, field, response.status_code, response.text)
            assert response.status_code < 400 or "detail" in response.json()
    assert probed >= 25  # every string field of every operation, run settings included


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_every_post_endpoint_refuses_an_oversized_body(full, chunked):
    client, run_id = full
    body = b'{"text": "' + b"y" * (70 * 1024) + b'"}'
    posts = [path for _, path, method, _ in _operations(client) if method == "post"]
    assert len(posts) >= 7
    for path in posts:
        content = iter([body[i:i + 4096] for i in range(0, len(body), 4096)]) if chunked else body
        response = client.post(path.replace("{run_id}", run_id), content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 413, (path, response.status_code, response.text)


PATH_ESCAPES = ["/etc", "../../..", "~", "~/x", "~root", "stores/../../..", "stores/link-out", "model/../../.."]


def path_settings() -> list[tuple[str, str | None]]:
    """Every path-like setting of a run: TrainConfig's, and each plugin option declared option(path=...)."""
    from sae_kit.plugins.api import available_plugins, path_options

    settings = [("activations", None), ("targets", None), ("model", None), ("dataset", None)]
    for name, cls in available_plugins().items():
        settings += [(name, option) for option in path_options(cls)]
    return settings


def test_every_path_like_plugin_option_is_declared_as_a_path():
    """A new plugin option that names a store, folder, file, model or dataset must say so (option(path=...)),
    or the server would not confine it."""
    import dataclasses

    from sae_kit.plugins.api import available_plugins

    words = ("store", "folder", "file", "model", "dataset", "directory", "path", "text for", "text to")
    for name, cls in available_plugins().items():
        for option in dataclasses.fields(cls.Options):
            doc = option.metadata.get("doc", "").lower()
            if option.type in (str, "str") and not option.name.endswith("hook") and any(word in doc for word in words):
                assert "path" in option.metadata, f"plugin {name} option {option.name} looks like a path: {doc!r}"
    assert len(path_settings()) >= 14


def test_path_escapes_in_every_path_like_field_are_refused(full, full_root, outside):
    client, run_id = full
    link = full_root / "stores" / "link-out"
    if not link.exists():
        link.symlink_to(outside / "store")
    before = run_count(client)
    for owner, option in path_settings():
        for escape in PATH_ESCAPES:
            if option is None:
                config = {**RUN, owner: escape}
                if owner != "activations":
                    config = {**{k: v for k, v in RUN.items() if k != "activations"}, owner: escape,
                              "hook": "blocks.1.hook_resid_post", **({"model": "smollm2"} if owner == "dataset" else {})}
                if owner == "model" and "/" not in escape and not escape.startswith("~"):
                    continue  # a bare name is a model name (smollm2, gpt2), not a path
            else:
                config = {**RUN, "plugins": [{"name": owner, option: escape}]}
            response = client.post("/api/runs", json={"config": config})
            assert response.status_code == 422, (owner, option, escape, response.text)
            assert "outside the server's data folder" in response.json()["detail"], (owner, option, escape, response.text)
    for escape in PATH_ESCAPES:
        if "/" not in escape and not escape.startswith("~"):
            continue
        response = client.post(f"/api/runs/{run_id}/analyze", json={"model": escape, "hook": "blocks.1.hook_resid_post"})
        assert response.status_code == 422 and "outside" in response.json()["detail"], (escape, response.text)
    assert run_count(client) == before


def test_analysing_a_run_whose_sae_was_damaged_is_a_409(runs_client):
    run = runs_client.post("/api/runs", json={"config": RUN}).json()
    deadline = time.monotonic() + 30
    while runs_client.get(f"/api/runs/{run['id']}").json()["status"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.05)
    # The fake trainer leaves a cfg.json without weights: as if the weights were deleted after the run.
    response = runs_client.post(f"/api/runs/{run['id']}/analyze", json={"model": "model", "hook": "blocks.1.hook_resid_post"})
    assert response.status_code == 409 and "sae_weights.safetensors" in response.json()["detail"], response.text

"""Fault injection: what a careless user or an attacker does to sae-kit, and what must still hold.

One test per defect of issue 13 (``test_defect_NN_...``; each failed on the main of that day), then
the fault classes around them that already held: damaged activation stores, killed harvests and
training runs, corrupt SAE folders and feature stores, oversized and chunked bodies, NUL bytes and
lone surrogates in every string field of every endpoint, path escapes in every path-like field.
Everything is tiny (32-wide planted stores, the 2-layer model of tiny_served.py) so the file runs in
about a minute on a free machine.
"""
from __future__ import annotations

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

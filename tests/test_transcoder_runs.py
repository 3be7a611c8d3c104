"""A transcoder run made the two ways a user makes one without typing flags: the server's run form
(POST /api/runs, whose form is generated from GET /api/runs/schema) and a YAML config file with
``targets:``. Both train for real (a child ``sae-kit train`` for the server) on a planted pair of
stores and must leave an SAE folder that loads as a transcoder of the right hooks and widths.

The pair: x Gaussian at the "input hook", y = A·x + a sparse ReLU code of x decoded at the "output
hook", the same token ids on both sides (what ``sae-kit harvest --hook IN --hook OUT`` writes).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from sae_kit import cli
from sae_kit.sae import load_sae
from sae_kit.store import write_store

D_IN, D_OUT, ROWS = 16, 12, 8192
IN_HOOK, OUT_HOOK = "blocks.3.mlp.hook_in", "blocks.3.hook_mlp_out"
SMALL = {"expansion": 4, "batch_size": 256, "tokens": 256 * 120, "log_every": 10, "eval_every": 10**6,
         "checkpoint_every": 10**6, "eval_tokens": 1024, "init_tokens": 2048, "warmup_steps": 10, "threads": 1}


def write_pair(root: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, D_IN, generator=g)
    E = torch.randn(32, D_IN, generator=g) / D_IN ** 0.5
    pre = x @ E.T
    codes = torch.where(pre > pre.quantile(0.9, dim=1, keepdim=True), pre, 0.0)
    y = codes @ torch.randn(32, D_OUT, generator=g) + x @ (0.5 * torch.randn(D_OUT, D_IN, generator=g)).T
    tokens = torch.randint(0, 500, (ROWS,), generator=g)
    common = {"token_ids": tokens, "model_name": "planted", "context_size": 64, "shard_tokens": 2048}
    inputs, targets = root / "stores" / "pair" / IN_HOOK, root / "stores" / "pair" / OUT_HOOK
    write_store(inputs, x, hook_name=IN_HOOK, **common)
    write_store(targets, y, hook_name=OUT_HOOK, **common)
    return inputs, targets


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    write_pair(root)
    return root


def assert_trained_transcoder(sae_dir: Path, architecture: str, skip: bool) -> dict:
    sae = load_sae(sae_dir)
    assert sae.is_transcoder and sae.cfg.architecture == architecture
    assert (sae.cfg.d_in, sae.d_out, sae.cfg.d_sae) == (D_IN, D_OUT, 4 * D_IN)
    assert sae.cfg.metadata["hook_name"] == IN_HOOK and sae.cfg.metadata["hook_name_out"] == OUT_HOOK
    assert bool(sae.cfg.skip_connection) == skip
    if skip:
        assert sae.W_skip.shape == (D_OUT, D_IN) and sae.W_skip.abs().sum() > 0  # trained off its zero init
    metrics = json.loads((sae_dir / "eval.json").read_text())
    # Scored against the output store: a model that learned nothing has FVU >= 1 (its own d_in would not fit).
    assert 0 < metrics["fvu"] < 0.8, metrics
    return metrics


def test_the_run_form_schema_offers_the_transcoder_settings(root) -> None:
    from sae_kit.server.app import create_app

    app = create_app(root, max_runs=1)
    try:
        properties = TestClient(app).get("/api/runs/schema").json()["train_config"]["properties"]
    finally:
        app.state.runs.close()
    # The form draws one input per property: a text box for targets, a checkbox for skip_connection.
    types = {p.get("type") for p in properties["targets"].get("anyOf", [properties["targets"]])}
    assert "string" in types and properties["targets"].get("default") is None
    assert properties["skip_connection"]["type"] == "boolean" and properties["skip_connection"]["default"] is False
    assert "target_l0" in properties


def run_to_the_end(client, config: dict, name: str) -> dict:
    """POST a run as the form does and wait until it has finished; its final record."""
    created = client.post("/api/runs", json={"config": config, "name": name})
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    deadline = time.monotonic() + 240
    while (run := client.get(f"/api/runs/{run_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, run
        time.sleep(0.3)
    assert run["status"] == "finished", run
    return run


def test_a_skip_transcoder_run_from_the_server_trains_and_loads(root, tmp_path) -> None:
    from sae_kit.server.app import create_app

    app = create_app(root, max_runs=1)
    client = TestClient(app)
    try:
        # What the form sends: only the fields that differ from the schema's defaults.
        config = {"architecture": "jumprelu", "activations": f"stores/pair/{IN_HOOK}",
                  "targets": f"stores/pair/{OUT_HOOK}", "skip_connection": True, "target_l0": 4, **SMALL}
        run = run_to_the_end(client, config, "skip-transcoder")
        run_dir = root / "runs" / run["id"]
        saved = json.loads((run_dir / "config.json").read_text())
        assert Path(saved["targets"]) == (root / "stores" / "pair" / OUT_HOOK).resolve()
        metrics = assert_trained_transcoder(run_dir / "sae", "jumprelu", skip=True)
        assert run["sae"]["eval"] == metrics

        # The output store is a path the run reads: confined to the data folder like --activations.
        outside = tmp_path / "outside"
        _, outside_targets = write_pair(outside)
        refused = client.post("/api/runs", json={"config": {**config, "targets": str(outside_targets)}})
        assert refused.status_code == 422 and "outside the server's data folder" in refused.json()["detail"], refused.text
        # A target store that is not the same tokens is refused before anything is queued.
        (root / "stores" / "other").mkdir()
        write_store(root / "stores" / "other" / OUT_HOOK, torch.randn(ROWS, D_OUT), hook_name=OUT_HOOK,
                    token_ids=torch.zeros(ROWS, dtype=torch.long), model_name="planted", context_size=64,
                    shard_tokens=2048)
        before = len(client.get("/api/runs").json())
        mismatched = client.post("/api/runs", json={"config": {**config, "targets": f"stores/other/{OUT_HOOK}"}})
        assert mismatched.status_code == 422 and "different tokens" in mismatched.json()["detail"], mismatched.text
        for architecture, options, message in (("gba", {"groups": 0}, "gba groups must be between 1"),
                                                ("topafa", {"epsilon": -1}, "topafa epsilon must be >= 0")):
            bad = client.post("/api/runs", json={"config": {**config, "architecture": architecture, "options": options}})
            assert bad.status_code == 422 and message in bad.json()["detail"], bad.text
        assert len(client.get("/api/runs").json()) == before
    finally:
        app.state.runs.close()


def test_a_transcoder_from_a_yaml_config_with_targets_trains_and_loads(root, tmp_path) -> None:
    out = tmp_path / "yaml-run"
    config = {"activations": str(root / "stores" / "pair" / IN_HOOK), "targets": str(root / "stores" / "pair" / OUT_HOOK),
              "architecture": "matryoshka", "k": 4, "options": {"widths": [16, 32]}, "out": str(out),
              "progress": False, **SMALL}
    path = tmp_path / "transcoder.yaml"
    path.write_text(yaml.safe_dump(config))
    assert "targets:" in path.read_text()
    assert cli.main(["train", "--config", str(path)]) == 0
    assert_trained_transcoder(out / "sae", "matryoshka", skip=False)
    assert load_sae(out / "sae").widths == [16, 32, 4 * D_IN]  # YAML's list of widths, d_sae appended
    assert json.loads((out / "config.json").read_text())["targets"] == config["targets"]


def assert_trained_sae(sae_dir: Path, architecture: str) -> dict:
    """A plain SAE (no targets) of the input store: reconstructs its own hook."""
    sae = load_sae(sae_dir)
    assert not sae.is_transcoder and sae.cfg.architecture == architecture
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, 4 * D_IN)
    assert sae.cfg.metadata["hook_name"] == IN_HOOK
    return json.loads((sae_dir / "eval.json").read_text())


def test_jumprelu_and_matryoshka_saes_train_from_the_cli_the_run_form_and_a_yaml_config(root, tmp_path) -> None:
    """The issue's 'the three train from the CLI, the server's run form and a config file' for the two new
    architectures as SAEs (the transcoder tests above cover --targets): each way's own spelling of the
    architecture's settings (--opt widths=, a form's options, YAML's target_l0) reaches the saved SAE."""
    from sae_kit.server.app import create_app

    inputs = str(root / "stores" / "pair" / IN_HOOK)
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()]

    # CLI: Matryoshka with its prefix widths as an --opt string.
    out = tmp_path / "cli-matryoshka"
    assert cli.main(["train", "--activations", inputs, "--arch", "matryoshka", "--k", "4", "--opt", "widths=8,16",
                     "--no-progress", "--out", str(out), *flags]) == 0
    assert_trained_sae(out / "sae", "matryoshka")
    assert load_sae(out / "sae").widths == [8, 16, 4 * D_IN]

    # YAML: JumpReLU at a target L0 (the top-level target_l0 setting becomes the controller's option).
    out = tmp_path / "yaml-jumprelu"
    path = tmp_path / "jumprelu.yaml"
    path.write_text(yaml.safe_dump({"activations": inputs, "architecture": "jumprelu", "target_l0": 6,
                                    "out": str(out), "progress": False, **SMALL}))
    assert cli.main(["train", "--config", str(path)]) == 0
    metrics = assert_trained_sae(out / "sae", "jumprelu")
    sae = load_sae(out / "sae")
    assert sae.opts.target_l0 == 6
    assert sae.threshold.dtype == torch.float32 and sae.threshold.std() > 0  # per-latent θ, trained apart
    assert 0.5 * 6 <= metrics["l0_mean"] <= 1.5 * 6, metrics  # the controller steers even a 120-step run

    # The run form: Matryoshka with group fractions in the options object the form sends.
    app = create_app(root, max_runs=1)
    client = TestClient(app)
    try:
        config = {"architecture": "matryoshka", "activations": f"stores/pair/{IN_HOOK}", "k": 4,
                  "options": {"group_fractions": "0.25,0.75"}, **SMALL}
        run_id = run_to_the_end(client, config, "matryoshka")["id"]
        assert_trained_sae(root / "runs" / run_id / "sae", "matryoshka")
        assert load_sae(root / "runs" / run_id / "sae").widths == [16, 4 * D_IN]
        # Bad options from the form are a 422 naming them, before anything is queued (not a failed child).
        before = len(client.get("/api/runs").json())
        bad = client.post("/api/runs", json={"config": {**config, "options": {"widths": "32,16"}}})
        assert bad.status_code == 422 and "widths must strictly increase" in bad.json()["detail"], bad.text
        bad = client.post("/api/runs", json={"config": {**config, "architecture": "jumprelu", "options": {},
                                                        "target_l0": 4 * D_IN + 1}})
        assert bad.status_code == 422 and f"target_l0={4 * D_IN + 1} exceeds d_sae" in bad.json()["detail"], bad.text
        for architecture, options, message in (("gba", {"groups": 0}, "gba groups must be between 1"),
                                                ("topafa", {"epsilon": -1}, "topafa epsilon must be >= 0")):
            bad = client.post("/api/runs", json={"config": {**config, "architecture": architecture, "options": options}})
            assert bad.status_code == 422 and message in bad.json()["detail"], bad.text
        assert len(client.get("/api/runs").json()) == before
    finally:
        app.state.runs.close()

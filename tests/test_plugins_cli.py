"""Every registered plugin runs end to end from the CLI (`sae-kit train --plugin NAME`) on a small
synthetic store: it trains, checkpoints, saves the SAE and writes eval.json."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sae_kit.cli import main
from sae_kit.eval.synthetic import make_dataset
from sae_kit.plugins.api import available_plugins
from sae_kit.store import write_store

# Options that keep a plugin's CI run small (its defaults are sized for real runs).
SMALL_OPTIONS: dict[str, str] = {}

RUN = ["--arch", "topk", "--k", "4", "--d-sae", "64", "--batch-size", "128", "--tokens", str(128 * 16),
       "--warmup-steps", "4", "--eval-every", "8", "--eval-tokens", "256", "--checkpoint-every", "8",
       "--log-every", "4", "--dead-tokens-threshold", "1000", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    data = make_dataset("sharkey", seed=0, d=32, n_features=64).sample(4096, torch.Generator().manual_seed(5))[0]
    path = tmp_path_factory.mktemp("plugins-cli") / "acts"
    write_store(path, data, shard_tokens=4096)
    return path


@pytest.mark.parametrize("name", sorted(available_plugins()))
def test_plugin_runs_from_the_cli(name, store_dir, tmp_path):
    spec = f"{name}:{SMALL_OPTIONS[name]}" if name in SMALL_OPTIONS else name
    out = tmp_path / "run"
    assert main(["train", "--activations", str(store_dir), "--out", str(out), *RUN, "--plugin", spec]) == 0
    evaluation = json.loads((out / "sae" / "eval.json").read_text())
    assert math.isfinite(evaluation["fvu"]) and evaluation["fvu"] < 1.0
    assert json.loads((out / "config.json").read_text())["plugins"][0]["name"] == name
    assert (out / "checkpoint" / "plugins" / f"{name}.json").is_file()

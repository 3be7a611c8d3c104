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

# Options that keep a plugin's CI run small (its defaults are sized for real runs); {pool}, {aux} and
# {target} are the synthetic stores below (the run's data, another dictionary, a reversed profile),
# {llama} a tiny random language model of the data's width.
SMALL_OPTIONS: dict[str, str] = {
    "color_filter": "target={target},helper_steps=8,target_steps=8",
    "exp3_flad": "sources={pool}+{aux},every=4",
    "ucb1_flad": "sources={pool}+{aux},every=4",
    "distill": "teachers=2",
    "arl": "sources={pool}+{aux}",
    "mask_tune": "pretrain_data={target},pretrain_steps=8",
    "downstream_kl": "model={llama},hook=blocks.0.hook_resid_post,context=16,windows=2,phase=0.25,eval_tokens=256",
    "auglocal": "model={llama},hook=blocks.0.hook_resid_post,context=16,windows=2,eval_tokens=256",
    "text_aug": "model={llama},hook=blocks.0.hook_resid_post,context=16,windows=2",
    "preference": "pairs={pairs}",
    "maid": "tokens=256,steps=3",
}

RUN = ["--arch", "topk", "--k", "4", "--d-sae", "64", "--batch-size", "128", "--tokens", str(128 * 16),
       "--warmup-steps", "4", "--eval-every", "8", "--eval-tokens", "256", "--checkpoint-every", "8",
       "--log-every", "4", "--dead-tokens-threshold", "1000", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    from sae_kit.plugins._sources import reversed_profile, synthetic_variants

    dataset = make_dataset("sharkey", seed=0, d=32, n_features=64)
    root = tmp_path_factory.mktemp("plugins-cli")
    sources = {"pool": synthetic_variants(dataset, 2)[0], "aux": synthetic_variants(dataset, 2)[1],
               "target": reversed_profile(dataset)}
    paths = {}
    for name, source in sources.items():
        paths[name] = root / name
        write_store(paths[name], next(source.iter_batches(4096, seed=5)), shard_tokens=4096)
    from tiny_lm import write_tiny_llama

    paths["llama"] = write_tiny_llama(root / "llama")
    from sae_kit.plugins.preference import synthetic_pairs, write_pairs

    pairs = synthetic_pairs(dataset.features, next(sources["pool"].iter_batches(64, seed=6)), 2, 1.0,
                            torch.Generator().manual_seed(0))
    paths["pairs"] = write_pairs(root / "pairs.safetensors", pairs["preferred"], pairs["rejected"], pairs["concept"])
    return paths


@pytest.mark.parametrize("name", sorted(available_plugins()))
def test_plugin_runs_from_the_cli(name, stores, tmp_path):
    spec = f"{name}:{SMALL_OPTIONS[name].format(**stores)}" if name in SMALL_OPTIONS else name
    out = tmp_path / "run"
    assert main(["train", "--activations", str(stores["pool"]), "--out", str(out), *RUN, "--plugin", spec]) == 0
    evaluation = json.loads((out / "sae" / "eval.json").read_text())
    assert math.isfinite(evaluation["fvu"]) and evaluation["fvu"] < 1.0
    assert json.loads((out / "config.json").read_text())["plugins"][0]["name"] == name
    assert (out / "checkpoint" / "plugins" / f"{name}.json").is_file()

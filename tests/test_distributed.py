"""Data-parallel training under torchrun: 2 CPU ranks (gloo) give the same SAE as 1 process with
the same global batch — batch-level selections, dead-latent statistics, Zipf densities and GBA's
buffers included — and an interrupted 2-rank run resumes to the same result. Spread mode and the
helpers' single-process behaviour are checked in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_kit.eval.synthetic import make_dataset
from sae_kit.sae import load_sae
from sae_kit.store import ActivationStore, write_store
from sae_kit.train import distributed
from sae_kit.train.trainer import TrainConfig, Trainer

D_IN, D_SAE, BATCH, STEPS = 32, 64, 128, 24
CONFIGS = {
    # 256 latents, k=2, dead after one idle step (128 tokens): AuxK and its batch variance are active
    "topk": dict(architecture="topk", d_sae=256, k=2, dead_tokens_threshold=128),
    "batchtopk": dict(architecture="batchtopk"),
    "abstopk_batch": dict(architecture="abstopk", options={"selection": "batch"}),
    "feature_choice_zipf": dict(architecture="feature_choice", options={"capacity": "zipf"}),
    "mutual_choice": dict(architecture="mutual_choice"),
    "gba": dict(architecture="gba", options={"adapt_every": 4, "groups": 4}),
}
WORKER = Path(__file__).parent / "helpers" / "data_parallel_worker.py"


def tiny_config(out: Path, **overrides) -> TrainConfig:
    settings = dict(out=str(out), k=4, d_sae=D_SAE, batch_size=BATCH, tokens=BATCH * STEPS, warmup_steps=4,
                    eval_every=1000, eval_tokens=256, log_every=4, checkpoint_every=5, init_tokens=1024,
                    dead_tokens_threshold=600, threads=1, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


class InterruptingSource:
    """A store that fails after ``after`` training batches, as a killed job would stop."""

    class Interrupted(Exception):
        pass

    def __init__(self, store, after: int):
        self.store, self.after = store, after

    def __getattr__(self, name):
        return getattr(self.store, name)

    def iter_batches(self, *args, **kwargs):
        for i, batch in enumerate(self.store.iter_batches(*args, **kwargs)):
            if i == self.after:
                raise self.Interrupted()
            yield batch


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    data = make_dataset("sharkey", seed=0, d=D_IN, n_features=64).sample(6000, torch.Generator().manual_seed(1))[0]
    return write_store(tmp_path_factory.mktemp("store") / "acts", data, shard_tokens=2500)


@pytest.fixture(scope="module")
def two_rank_runs(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(store.directory), str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def assert_close_saes(a, b, atol=2e-5):
    ta, tb = a.tensors_to_save(), b.tensors_to_save()
    assert set(ta) == set(tb)
    for name in ta:
        assert torch.allclose(ta[name].double(), tb[name].double(), atol=atol, rtol=1e-4), \
            f"{name}: max diff {(ta[name].double() - tb[name].double()).abs().max():.3g}"


def metric_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_gloo_ranks_train_the_same_sae_as_one_process(two_rank_runs, store, tmp_path, name):
    single = Trainer(tiny_config(tmp_path / name, **CONFIGS[name]), store).run()
    parallel = load_sae(two_rank_runs / name / "sae")
    assert_close_saes(parallel, single)
    ours, theirs = metric_lines(tmp_path / name), metric_lines(two_rank_runs / name)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        for key in ("loss", "l0", "dead_fraction"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    if name == "topk":  # AuxK was active, so its global batch variance was exercised
        assert any(r.get("auxk", 0) > 0 for r in theirs)


def test_an_interrupted_two_rank_run_resumes_to_the_same_sae(two_rank_runs, store, tmp_path):
    single = Trainer(tiny_config(tmp_path / "ref", **CONFIGS["batchtopk"]), store).run()
    assert_close_saes(load_sae(two_rank_runs / "resumed" / "sae"), single)
    assert [r["step"] for r in metric_lines(two_rank_runs / "resumed")] == [r["step"] for r in metric_lines(tmp_path / "ref")]


def test_one_process_helpers_are_identities():
    ctx = distributed.setup()
    assert not ctx.enabled and ctx.is_main
    batch = torch.arange(12.0).view(6, 2)
    assert distributed.shard(batch, ctx) is batch
    assert distributed.my_share(list("abcde"), ctx) == list("abcde")
    spread = distributed.DistributedContext(rank=1, world_size=2)
    assert distributed.shard(batch, spread).tolist() == batch[3:].tolist()
    assert distributed.my_share(list("abcde"), spread) == ["b", "d"]
    with pytest.raises(Exception, match="not divisible"):
        distributed.check_batch_size(10, distributed.DistributedContext(world_size=4))


def test_spread_mode_trains_one_sae_per_store_and_shares_them_out(store, tmp_path, monkeypatch):
    from sae_kit.cli import main
    from sae_kit.train.spread import spread_configs

    second = write_store(tmp_path / "stores" / "blocks.1.hook_resid_post", store.read(0, 3000))
    args = ["train", "--activations", str(store.directory), "--activations", str(second.directory),
            "--out", str(tmp_path / "runs"), "--d-sae", "64", "--k", "4", "--batch-size", "128", "--tokens", "512",
            "--eval-tokens", "128", "--threads", "1", "--no-progress"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 1 of 2 takes the second store only, with no process group
    assert main(args) == 0
    assert not (tmp_path / "runs" / "acts").exists()
    assert load_sae(tmp_path / "runs" / "blocks.1.hook_resid_post" / "sae").cfg.d_sae == 64
    cfg = TrainConfig(out=str(tmp_path / "x"))
    with pytest.raises(Exception, match="share a folder name"):
        spread_configs(cfg, [str(tmp_path / "a" / "s"), str(tmp_path / "b" / "s")])

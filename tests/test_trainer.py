"""The training loop: exact resume, divergence handling, the learning-rate schedule, config checks.

Everything runs on tiny SAEs (d_in 32, d_sae 64, batches of 128) with one torch thread, so the whole
file takes a few seconds on a loaded 2-core machine.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_kit.config import ConfigError
from sae_kit.eval.synthetic import SyntheticSource, make_dataset
from sae_kit.store import ActivationStore, write_store
from sae_kit.train.checkpoint import find_checkpoint, load_checkpoint
from sae_kit.train.trainer import TrainConfig, Trainer, TrainingDiverged, train

D_IN = 32
D_SAE = 64
BATCH = 128
STEPS = 100
ARCH_OPTIONS = {
    "topk": {},
    # adapt_every=8 puts the checkpoints (multiples of 35) in the middle of an adaptation window,
    # so the accumulated frequencies / peaks must travel in the checkpoint.
    "gba": {"adapt_every": 8, "groups": 4},
    "batchtopk": {},
}



@pytest.fixture(scope="module")
def dataset():
    return make_dataset("sharkey", seed=0, d=D_IN, n_features=64)


@pytest.fixture(scope="module")
def store(dataset, tmp_path_factory) -> ActivationStore:
    # 8192 rows in 3 shards: 7782 train rows = 60 batches of 128 per epoch, so a 100-step run
    # crosses an epoch boundary and the resume point (step 70) lies inside the second epoch.
    data = dataset.sample(8192, torch.Generator().manual_seed(123))[0]
    return write_store(tmp_path_factory.mktemp("store") / "acts", data, shard_tokens=3000)


def tiny_config(out: Path, **overrides) -> TrainConfig:
    settings = dict(
        out=str(out), architecture="topk", k=4, d_sae=D_SAE, batch_size=BATCH, tokens=BATCH * STEPS,
        warmup_steps=10, eval_every=30, eval_tokens=256, log_every=5, checkpoint_every=35,
        init_tokens=1024, dead_tokens_threshold=2000, threads=1, progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


class Interrupted(Exception):
    pass


class WrappedSource:
    """Delegates to a real source; its train stream raises or yields a poisoned batch at ``at``."""

    def __init__(self, source, at: int, action: str = "interrupt"):
        self.source = source
        self.d_in = source.d_in
        self.at = at
        self.action = action

    def sample(self, *args, **kwargs):
        return self.source.sample(*args, **kwargs)

    def iter_batches(self, batch_size, **kwargs):
        inner = self.source.iter_batches(batch_size, **kwargs)
        if kwargs.get("split", "train") != "train":
            yield from inner
            return
        for index, batch in enumerate(inner, start=kwargs.get("start_batch", 0)):
            if index == self.at:
                if self.action == "interrupt":
                    raise Interrupted(f"stopped before batch {index}")
                batch = batch.clone()
                batch[3, 5] = float(self.action)  # "nan" or "inf"
            yield batch


def read_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def check_run_outputs(run: Path, cfg: TrainConfig) -> None:
    """metrics.jsonl, report.html and sae/eval.json of a finished run (also used after resumes)."""
    records = read_records(run)
    total = cfg.total_steps
    train_steps = [r["step"] for r in records if "loss" in r]
    eval_steps = [r["step"] for r in records if "eval/fvu" in r]
    expected_train = sorted({s for s in range(cfg.log_every, total + 1, cfg.log_every)} | {total})
    expected_eval = sorted({s for s in range(cfg.eval_every, total + 1, cfg.eval_every)} | {total})
    assert train_steps == expected_train  # no duplicates, no gaps, in order
    assert eval_steps == expected_eval
    assert records[-1]["step"] == total
    assert all(r["tokens"] == r["step"] * cfg.batch_size for r in records)
    assert all(math.isfinite(r["eval/fvu"]) for r in records if "eval/fvu" in r)
    report = (run / "report.html").read_text()
    assert "plotly" in report.lower()
    assert '"name":"eval\\u002ffvu"' in report  # the held-out FVU curve is plotted (JSON-escaped "/")
    evaluation = json.loads((run / "sae" / "eval.json").read_text())
    for key in ("fvu", "l0_mean", "dead_fraction"):
        assert isinstance(evaluation[key], float) and math.isfinite(evaluation[key]), key
    assert evaluation["fvu"] < 1.0  # it learned something


# --------------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("source_kind", ["store", "synthetic"])
@pytest.mark.parametrize("arch", sorted(ARCH_OPTIONS))
def test_resume_is_bit_exact(arch, source_kind, store, dataset, tmp_path):
    source = store if source_kind == "store" else SyntheticSource(dataset)
    options = ARCH_OPTIONS[arch]
    reference_cfg = tiny_config(tmp_path / "reference", architecture=arch, options=options)
    reference = Trainer(reference_cfg, source).run()

    cfg = tiny_config(tmp_path / "resumed", architecture=arch, options=options)
    with pytest.raises(Interrupted):
        Trainer(cfg, WrappedSource(source, at=80)).run()
    run = Path(cfg.out)
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 70
    assert not (run / "sae").exists()
    assert max(r["step"] for r in read_records(run)) == 80  # lines past the checkpoint, to be dropped

    resumed_trainer = Trainer(cfg, source, resume=True)
    assert resumed_trainer.step == 70
    resumed = resumed_trainer.run()

    expected, got = reference.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"tensors differ after resume: {different}"
    on_disk = [load_file(str(Path(c.out) / "sae" / "sae_weights.safetensors")) for c in (reference_cfg, cfg)]
    assert on_disk[0].keys() == on_disk[1].keys()
    assert all(torch.equal(on_disk[0][name], on_disk[1][name]) for name in on_disk[0])
    # The very same curves, including the held-out evaluations, and no step logged twice.
    assert read_records(run) == read_records(Path(reference_cfg.out))
    check_run_outputs(run, cfg)

    # The state that must travel in the checkpoint is really in use (otherwise the test proves little).
    if arch == "gba":
        assert (resumed.b_enc != 0).any(), "no bias adaptation happened"
        assert int(resumed.steps_since_adaptation) == STEPS % options["adapt_every"]
    if arch == "batchtopk":
        assert float(resumed.threshold_weight) > 0 and (resumed.threshold > 0).any()


def test_resume_of_a_finished_run_only_finishes(store, tmp_path):
    cfg = tiny_config(tmp_path / "run", tokens=BATCH * 20, checkpoint_every=10, eval_every=10)
    first = Trainer(cfg, store).run()
    trainer = Trainer(cfg, store, resume=True)
    assert trainer.step == 20
    again = trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    check_run_outputs(Path(cfg.out), cfg)


def test_fresh_start_refuses_existing_run_and_resume_needs_checkpoint(store, tmp_path):
    cfg = tiny_config(tmp_path / "run", tokens=BATCH * 10, checkpoint_every=5, eval_every=5)
    train(cfg, store)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(cfg, store)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny_config(tmp_path / "empty"), store, resume=True)


def test_train_needs_activations():
    with pytest.raises(ConfigError, match="activations"):
        train(TrainConfig(activations=None, progress=False))


def test_small_store_trains_with_default_init_tokens(dataset, tmp_path):
    # init_tokens defaults to 32768; a store with fewer training rows still trains (on all of them).
    data = dataset.sample(3000, torch.Generator().manual_seed(7))[0]
    small = write_store(tmp_path / "small", data)
    cfg = tiny_config(tmp_path / "run", tokens=BATCH * 10, eval_every=5, checkpoint_every=5)
    cfg.init_tokens = TrainConfig.init_tokens
    sae = Trainer(cfg, small).run()
    assert torch.isfinite(sae.b_dec).all()


# ------------------------------------------------------------------------------------ divergence


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_non_finite_batch_raises_and_keeps_last_good_checkpoint(poison, dataset, tmp_path):
    cfg = tiny_config(tmp_path / "run", checkpoint_every=10)
    source = WrappedSource(SyntheticSource(dataset), at=27, action=poison)
    with pytest.raises(TrainingDiverged) as caught:
        Trainer(cfg, source).run()
    message = str(caught.value)
    checkpoint = find_checkpoint(Path(cfg.out))
    assert checkpoint is not None
    # Batch 27 is the 28th optimizer step (metrics.jsonl numbering); the checkpoint holds 20 steps.
    assert "at step 28" in message
    assert str(checkpoint) in message and "step 20" in message
    assert "nan" in message.lower() or "inf" in message.lower()

    sae, optimizer_state, state = load_checkpoint(checkpoint)
    assert state["step"] == 20 < 28
    assert all(torch.isfinite(t).all() for t in sae.state_dict().values() if t.is_floating_point())
    assert not (Path(cfg.out) / "sae").exists()
    assert max(r["step"] for r in read_records(Path(cfg.out))) <= 27

    # The run resumes from the good checkpoint once the data is fixed.
    resumed = Trainer(cfg, SyntheticSource(dataset), resume=True)
    assert resumed.step == 20
    resumed.run()
    check_run_outputs(Path(cfg.out), cfg)


def test_divergence_before_first_checkpoint_says_so(dataset, tmp_path):
    cfg = tiny_config(tmp_path / "run", checkpoint_every=10)
    with pytest.raises(TrainingDiverged, match=r"at step 4\b.*no checkpoint was written yet"):
        Trainer(cfg, WrappedSource(SyntheticSource(dataset), at=3, action="nan")).run()
    assert find_checkpoint(Path(cfg.out)) is None


# ----------------------------------------------------------------------------- learning rate


def test_learning_rate_schedule_warmup_constant_decay():
    cfg = TrainConfig(batch_size=64, tokens=64 * 100, warmup_steps=10, decay_fraction=0.2, progress=False)
    base = 3e-4
    lrs = [cfg.learning_rate(base, step) for step in range(cfg.total_steps)]
    assert cfg.total_steps == 100
    # Linear warm-up from base/10 to base over the first 10 steps.
    assert lrs[:10] == pytest.approx([base * (s + 1) / 10 for s in range(10)])
    # Constant until the last 20% ...
    assert lrs[10:81] == pytest.approx([base] * 71)
    # ... then a linear decay towards 0: equal decrements, last step at base/20, next would be 0.
    decay = lrs[80:]
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert steps == pytest.approx([base / 20] * 19)
    assert decay[-1] == pytest.approx(base / 20)
    assert cfg.learning_rate(base, cfg.total_steps) == pytest.approx(0.0, abs=1e-15)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    # No decay with decay_fraction=0, no warm-up with warmup_steps=0.
    flat = TrainConfig(batch_size=64, tokens=64 * 100, warmup_steps=0, decay_fraction=0.0, progress=False)
    assert {flat.learning_rate(base, s) for s in range(100)} == {base}


def test_default_lr_and_logged_schedule(dataset, tmp_path):
    cfg = tiny_config(tmp_path / "run", tokens=BATCH * 40, warmup_steps=8, log_every=1, eval_every=40,
                      checkpoint_every=40, decay_fraction=0.25)
    trainer = Trainer(cfg, SyntheticSource(dataset))
    expected_base = 2e-4 / math.sqrt(D_SAE / 2**14)
    assert trainer.base_lr == pytest.approx(expected_base)
    trainer.run()
    logged = {r["step"]: r["lr"] for r in read_records(Path(cfg.out)) if "lr" in r}
    assert sorted(logged) == list(range(1, 41))
    for step, lr in logged.items():  # record at step s is the update made by step index s - 1
        assert lr == pytest.approx(cfg.learning_rate(expected_base, step - 1))
    assert logged[8] == pytest.approx(expected_base) and logged[40] == pytest.approx(expected_base / 10)

    explicit = Trainer(tiny_config(tmp_path / "explicit", lr=1e-3), SyntheticSource(dataset))
    assert explicit.base_lr == 1e-3


# ------------------------------------------------------------------------------ config checks


def test_unknown_architecture_is_refused():
    with pytest.raises(ConfigError, match="unknown architecture 'nope'"):
        TrainConfig(architecture="nope")
    with pytest.raises(ConfigError, match="unknown architecture"):
        TrainConfig.from_dict({"architecture": "nope"})
    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainConfig.from_dict({"architecure": "topk"})


@pytest.mark.parametrize(
    "setting, value",
    [
        ("k", 0), ("batch_size", 0), ("tokens", -5), ("checkpoint_every", 0), ("eval_every", 0),
        ("lr", -1e-3), ("lr", 0.0), ("decay_fraction", 1.5), ("heldout_fraction", 0.0),
        ("heldout_fraction", 1.0), ("eval_tokens", 0), ("warmup_steps", -1), ("grad_clip", -1.0),
        ("threads", 0),
    ],
)
def test_out_of_range_setting_is_refused(setting, value, tmp_path):
    with pytest.raises(ConfigError, match=setting):
        tiny_config(tmp_path / "run", **{setting: value})


@pytest.mark.parametrize(
    "arch, options, match",
    [
        ("gba", {"groups": 1000}, "groups"),
        ("topk", {"bogus": 1}, "unknown option"),
        ("abstopk", {"selection": "sideways"}, "selection"),
    ],
)
def test_trainer_refuses_bad_architecture_options(arch, options, match, dataset, tmp_path):
    # Typed options (unknown names, wrong values) fail when the config is built, before any data is
    # opened; checks that need d_in (gba's groups vs d_sae) when the SAE is built, before any step.
    with pytest.raises(ConfigError, match=match):
        cfg = tiny_config(tmp_path / "run", architecture=arch, options=options)
        Trainer(cfg, SyntheticSource(dataset))
    assert find_checkpoint(tmp_path / "run") is None


def test_options_are_typed_in_the_config(tmp_path):
    cfg = tiny_config(tmp_path / "run", architecture="gba", options={"groups": "4"},
                      plugins=["usage_entropy:coefficient=0.01"])
    assert cfg.options == {"groups": 4}
    assert cfg.plugins == [{"name": "usage_entropy", "coefficient": 0.01}]
    with pytest.raises(ConfigError, match="option groups expects a int"):
        tiny_config(tmp_path / "run", architecture="gba", options={"groups": "four"})


def test_k_above_d_sae_is_refused_when_the_config_is_built(tmp_path):
    with pytest.raises(ConfigError, match="k=65 exceeds d_sae=64"):
        tiny_config(tmp_path / "run", k=65)


def test_wrong_types_in_a_config_file_name_the_field():
    with pytest.raises(ConfigError, match="batch_size: expected an integer, got 'many'"):
        TrainConfig.from_dict({"batch_size": "many"})
    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainConfig.from_dict({"config_version": 2, "nope": 1})


def test_an_old_config_json_still_loads(tmp_path):
    """A run folder's config.json from before config_version (plugin options as typed strings)."""
    old = {
        "activations": "store", "model": None, "hook": None, "dataset": "default", "context": 128, "out": "runs/x",
        "architecture": "topk", "k": 8, "expansion": 8, "d_sae": 64, "normalize_activations": None, "options": {},
        "lr": None, "batch_size": 256, "tokens": 25600, "warmup_steps": 100, "decay_fraction": 0.2,
        "grad_clip": 1.0, "adam_betas": [0.9, 0.999], "adam_eps": 6.25e-10, "dead_tokens_threshold": 10000000,
        "aux_coefficient": 0.03125, "k_aux": None, "heldout_fraction": 0.05, "eval_every": 500,
        "eval_tokens": 65536, "log_every": 10, "checkpoint_every": 500, "init_tokens": 32768, "seed": 0,
        "threads": None, "progress": True, "plugins": [{"name": "usage_entropy", "coefficient": "0.01"}],
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    from sae_kit.config import load_config_file

    cfg = TrainConfig.from_dict(load_config_file(path))
    assert cfg.k == 8 and cfg.adam_betas == (0.9, 0.999)
    assert cfg.plugins == [{"name": "usage_entropy", "coefficient": 0.01}]  # migrated to a typed value
    written = cfg.to_dict()
    assert written["config_version"] == 2 and TrainConfig.from_dict(json.loads(json.dumps(written))) == cfg

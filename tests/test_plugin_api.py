"""The plugin API: registry (built-ins and entry points), specs and conflicts, every hook in the
trainer, plugin state and parametrisations through checkpoints and an exact resume, the CLI flag."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.nn.utils import parametrize

from sae_kit.cli import main
from sae_kit.config import ConfigError
from sae_kit.eval.synthetic import SyntheticSource, make_dataset
from sae_kit.plugins import api
from sae_kit.plugins.api import Batch, Plugin, option, options_schema
from sae_kit.train import plugin_set
from sae_kit.train.plugin_set import build_plugins, parse_plugin_spec
from sae_kit.store import write_store
from sae_kit.train.trainer import TrainConfig, Trainer

D_IN, D_SAE, BATCH, STEPS = 32, 64, 128, 40


def tiny_config(out: Path, **overrides) -> TrainConfig:
    settings = dict(out=str(out), architecture="topk", k=4, d_sae=D_SAE, batch_size=BATCH, tokens=BATCH * STEPS,
                    warmup_steps=5, eval_every=20, eval_tokens=256, log_every=5, checkpoint_every=15,
                    init_tokens=1024, dead_tokens_threshold=2000, threads=1, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def source():
    return SyntheticSource(make_dataset("sharkey", seed=0, d=D_IN, n_features=64))


class RowMask(nn.Module):
    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, W: torch.Tensor) -> torch.Tensor:  # W_enc is [d_in, d_sae]: mask columns (latents)
        return W * self.keep


class Recorder(Plugin):
    """Uses every hook and every kind of state, and records what it saw."""

    name = "recorder"

    @dataclass
    class Options:
        scale: float = option(0.5, "weight of the predictor's loss")
        masked: int = option(8, "latents masked off by the parametrisation")

    def setup(self, trainer):
        keep = torch.ones(D_SAE)
        keep[: self.opts.masked] = 0
        parametrize.register_parametrization(trainer.sae, "W_enc", RowMask(keep))
        self.modules["predictor"] = nn.Linear(D_IN, 1)
        self.calls = []
        self.steps_seen = 0
        self.sum_of_x = torch.zeros(D_IN)

    def hyperparameters(self, hp, trainer):
        self.calls.append("hyperparameters")
        hp["k"] = 3  # a controller: the SAE runs with k = 3 whatever the config says

    def transform_batch(self, batch, trainer):
        self.calls.append("transform_batch")
        weight = torch.ones(batch.x.shape[0])
        weight[: batch.x.shape[0] // 2] = 3.0
        return Batch(batch.x, weight=weight)

    def loss_terms(self, ctx):
        self.calls.append("loss_terms")
        assert ctx.out.codes.l0().max() <= 3
        prediction = self.modules["predictor"](ctx.batch.x).squeeze(-1)
        per_token = (ctx.out.x_hat_n - ctx.out.x_n).pow(2).sum(1).detach()
        return {"predictor": self.opts.scale * (prediction - per_token).pow(2).mean()}

    def after_backward(self, ctx):
        self.calls.append("after_backward")
        original = ctx.sae.parametrizations.W_enc.original
        assert original.grad is not None and torch.all(original.grad[:, : self.opts.masked] == 0)

    def after_step(self, ctx):
        self.calls.append("after_step")
        self.steps_seen += 1
        self.sum_of_x += ctx.batch.x.sum(0)
        ctx.logs["recorder/steps_seen"] = self.steps_seen

    def posthoc(self, sae, trainer):
        self.calls.append("posthoc")
        return sae

    def evaluate(self, sae, trainer):
        return {"steps_seen": self.steps_seen}

    def state_dict(self):
        return {**super().state_dict(), "steps_seen": self.steps_seen, "sum_of_x": self.sum_of_x}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.steps_seen = state["steps_seen"]
        self.sum_of_x = state["sum_of_x"].clone()


class Selector(Plugin):
    name = "selector"
    oversample = 2

    def transform_batch(self, batch, trainer):
        keep = batch.x.norm(dim=1).argsort(descending=True)[: trainer.cfg.batch_size]
        return Batch(batch.x[keep])


class Broken(Plugin):
    name = "broken_selector"
    oversample = 2


class Masker(Recorder):
    name = "masker"


class Excluder(Plugin):
    name = "excluder"
    conflicts = frozenset({"selector"})


@pytest.fixture
def registry(monkeypatch):
    plugins = dict(api.available_plugins())
    for cls in (Recorder, Selector, Broken, Masker, Excluder):
        plugins[cls.name] = cls
    monkeypatch.setattr(api, "_REGISTRY", plugins)
    return plugins


# ----------------------------------------------------------------------------------- registry
def test_builtin_plugins_are_found_by_scanning_the_package():
    registry = api.available_plugins(refresh=True)
    assert {"usage_entropy", "ols_refit"} <= set(registry)
    assert all(cls.name == name for name, cls in registry.items())


def test_entry_point_plugin_from_an_installed_distribution(tmp_path, monkeypatch):
    (tmp_path / "third_party_plugin.py").write_text(
        "from sae_kit.plugins.api import Plugin\n"
        "class Halver(Plugin):\n"
        "    name = 'halver'\n"
        "    summary = 'third-party test plugin'\n"
    )
    dist = tmp_path / "third_party_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sae_kit.plugins]\nhalver = third_party_plugin:Halver\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry = api.available_plugins(refresh=True)
        assert registry["halver"].__module__ == "third_party_plugin"
        assert "usage_entropy" in registry
    finally:
        sys.modules.pop("third_party_plugin", None)
        monkeypatch.undo()
        api.available_plugins(refresh=True)


def test_options_schema_has_types_defaults_and_docs():
    schema = {entry["name"]: entry for entry in options_schema(api.get_plugin("usage_entropy"))}
    assert schema["coefficient"]["type"] == "number" and schema["coefficient"]["default"] == 1e-3
    assert schema["temperature"]["doc"]


# -------------------------------------------------------------------------------- specs, conflicts
def test_parse_plugin_spec():
    assert parse_plugin_spec("usage_entropy:coefficient=0.1,temperature=0.5") == {
        "name": "usage_entropy", "coefficient": "0.1", "temperature": "0.5"}
    assert parse_plugin_spec("ols_refit") == {"name": "ols_refit"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_plugin_spec("usage_entropy:coefficient")
    plugin = build_plugins(["usage_entropy:coefficient=0.1"])[0]
    assert plugin.opts.coefficient == 0.1


@pytest.mark.parametrize("specs, message", [
    (["nonexistent"], "unknown plugin 'nonexistent'"),
    (["usage_entropy:nope=1"], "unknown option"),
    (["usage_entropy:coefficient=abc"], "expects a float"),
    (["usage_entropy:temperature=0"], "temperature must be > 0"),
    (["usage_entropy", "usage_entropy"], "more than once"),
    (["selector", "excluder"], "cannot run together"),
    (["selector", "broken_selector"], "both select"),
    ([{"coefficient": 1}], "'name' key"),
])
def test_bad_plugin_specs_are_reported_at_setup(registry, specs, message):
    with pytest.raises(ConfigError, match=message):
        build_plugins(specs)


def test_two_plugins_parametrising_one_tensor_conflict(registry, source, tmp_path):
    with pytest.raises(ConfigError, match="both parametrise the SAE tensor 'W_enc'"):
        Trainer(tiny_config(tmp_path / "run", plugins=["recorder", "masker"]), source)


# ------------------------------------------------------------------------------------ the trainer
def test_every_hook_runs_and_state_survives_an_exact_resume(registry, source, tmp_path):
    reference_trainer = Trainer(tiny_config(tmp_path / "reference", plugins=["recorder:scale=0.25"]), source)
    reference = reference_trainer.run()
    plugin = reference_trainer.plugins.plugins[0]
    assert plugin.calls[:5] == ["hyperparameters", "transform_batch", "loss_terms", "after_backward", "after_step"]
    assert plugin.calls[-1] == "posthoc" and plugin.steps_seen == STEPS

    # The final SAE has plain weights with the mask baked in; k was the controller's.
    assert not parametrize.is_parametrized(reference)
    weights = load_file(str(tmp_path / "reference" / "sae" / "sae_weights.safetensors"))
    assert set(weights) == set(reference.state_dict()) and torch.all(weights["W_enc"][:, :8] == 0)
    evaluation = json.loads((tmp_path / "reference" / "sae" / "eval.json").read_text())
    assert evaluation["recorder/steps_seen"] == STEPS and evaluation["l0_mean"] <= 3
    records = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["recorder/predictor"] > 0 and records[0]["recorder/steps_seen"] == 5
    # The predictor trained in its own optimizer group.
    assert reference_trainer.optimizer.param_groups[1]["plugin"] == "recorder"

    class Stop(Exception):
        pass

    cfg = tiny_config(tmp_path / "resumed", plugins=["recorder:scale=0.25"])
    interrupted = Trainer(cfg, source)
    original_step = interrupted.train_step

    def step_then_stop(x):
        if interrupted.step == 25:
            raise Stop
        return original_step(x)

    interrupted.train_step = step_then_stop
    with pytest.raises(Stop):
        interrupted.run()
    checkpoint = Path(cfg.out) / "checkpoint"
    assert (checkpoint / "plugins" / "recorder.safetensors").is_file()
    assert "W_enc" in load_file(str(checkpoint / "sae" / "sae_weights.safetensors"))  # free tensor, plain name

    resumed_trainer = Trainer(cfg, source, resume=True)
    assert resumed_trainer.step == 15 and resumed_trainer.plugins.plugins[0].steps_seen == 15
    resumed = resumed_trainer.run()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    resumed_plugin = resumed_trainer.plugins.plugins[0]
    assert torch.equal(resumed_plugin.sum_of_x, plugin.sum_of_x)
    for name, tensor in plugin.modules.state_dict().items():
        assert torch.equal(tensor, resumed_plugin.modules.state_dict()[name]), name


def test_resume_without_the_plugin_says_which_plugin(registry, source, tmp_path):
    cfg = tiny_config(tmp_path / "run", tokens=BATCH * 15)
    Trainer(cfg, source).run()
    with pytest.raises(ConfigError, match="no state for plugin 'usage_entropy'"):
        Trainer(tiny_config(tmp_path / "run", tokens=BATCH * 30, plugins=["usage_entropy"]), source, resume=True)


def test_selection_plugin_gets_an_oversampled_batch(registry, source, tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", tokens=BATCH * 3), source)
    plain = next(source.iter_batches(BATCH, seed=0))
    selecting = Trainer(tiny_config(tmp_path / "sel", tokens=BATCH * 3, plugins=["selector"]), source)
    drawn = next(source.iter_batches(2 * BATCH, seed=0))
    kept = selecting.plugins.transform_batch(Batch(drawn), selecting)
    assert kept.x.shape == plain.shape
    assert kept.x.norm(dim=1).mean() > drawn.norm(dim=1).mean()
    selecting.run()
    trainer.run()
    with pytest.raises(ValueError, match="cut the oversampled batch"):
        broken = Trainer(tiny_config(tmp_path / "broken", tokens=BATCH * 3, plugins=["broken_selector"]), source)
        broken.run()


def test_weighted_and_targeted_reconstruction_loss(source, tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", tokens=BATCH * 3), source)
    x = next(source.iter_batches(BATCH, seed=3))
    out = trainer.sae.training_forward(x, trainer.input_variance)
    per_token = (out.x_hat_n - out.x_n).pow(2).sum(1) / trainer.input_variance
    weight = torch.rand(BATCH)
    loss = plugin_set.reconstruction_loss(trainer.sae, out, Batch(x, weight=weight), trainer.input_variance)
    assert torch.allclose(loss, (per_token * weight).sum() / weight.sum())
    target = x * 0.5
    loss = plugin_set.reconstruction_loss(trainer.sae, out, Batch(x, target=target), trainer.input_variance)
    assert torch.allclose(loss, (out.x_hat_n - target).pow(2).sum(1).mean() / trainer.input_variance)
    assert torch.allclose(plugin_set.reconstruction_loss(trainer.sae, out, Batch(x), trainer.input_variance), out.parts["reconstruction"])


# -------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    data = make_dataset("sharkey", seed=0, d=D_IN, n_features=64).sample(4096, torch.Generator().manual_seed(1))[0]
    path = tmp_path_factory.mktemp("plugin-store") / "acts"
    write_store(path, data, shard_tokens=4096)
    return path


SMALL_RUN = ["--arch", "topk", "--k", "4", "--d-sae", "64", "--batch-size", "128", "--tokens", str(128 * 20),
             "--warmup-steps", "5", "--eval-every", "10", "--eval-tokens", "256", "--checkpoint-every", "10",
             "--log-every", "5", "--threads", "1", "--no-progress"]


def test_cli_plugin_flags_and_config_file(store_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("plugins:\n  - {name: usage_entropy, coefficient: 0.5}\n  - ols_refit:steps=20\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--activations", str(store_dir), "--out", str(out), *SMALL_RUN,
                 "--plugin", "usage_entropy:temperature=0.1"]) == 0
    saved = json.loads((out / "config.json").read_text())["plugins"]
    # config.json records typed option values (the flags' strings are converted when the config is built).
    assert saved == [{"name": "usage_entropy", "coefficient": 0.5, "temperature": 0.1},
                     {"name": "ols_refit", "steps": 20}]
    evaluation = json.loads((out / "sae" / "eval.json").read_text())
    assert evaluation["ols_refit/fvu"] <= evaluation["ols_refit/fvu_encoder"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("usage_entropy/entropy" in r for r in records if "loss" in r)
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "bad"), "--activations", str(store_dir), *SMALL_RUN,
                 "--plugin", "no_such_plugin"]) == 2
    assert "unknown plugin 'no_such_plugin'" in capsys.readouterr().err


def test_cli_lists_plugins(capsys):
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "usage_entropy:" in text and "coefficient=0.001" in text and "ols_refit:" in text

"""The trainer's side of the plugin API: building plugins from specs, calling their hooks, their state.

A plugin author needs none of this (see sae_kit/plugins/api.py); the trainer knows no plugin by name
and talks to them only through ``PluginSet``.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from sae_kit.config import ConfigError, parse_key_values
from sae_kit.fileio import atomic_write
from sae_kit.plugins.api import Batch, Plugin, StepContext, TrainingRun, get_plugin

if TYPE_CHECKING:
    from sae_kit.sae.base import SAE, TrainingOutput

STATE_DIR = "plugins"


# ------------------------------------------------------------- specifications
def parse_plugin_spec(text: str) -> dict[str, Any]:
    """``"NAME:key=value,key=value"`` (the --plugin flag) -> ``{"name": NAME, key: value, ...}``."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"--plugin expects NAME[:key=value,...], got {text!r}")
    items = [item for item in rest.split(",") if item.strip()] if rest else []
    return {"name": name, **parse_key_values(items, what=f"--plugin {name}")}


def normalize_specs(specs: list[Any] | None) -> list[dict[str, Any]]:
    """Config entries (a name, ``NAME:k=v`` or a mapping with ``name``) -> ``[{"name": ..., **options}]``."""
    result = []
    for spec in specs or []:
        if isinstance(spec, str):
            spec = parse_plugin_spec(spec)
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"a plugins entry must be a name or a mapping with a 'name' key, got {spec!r}")
        result.append(dict(spec))
    return result


def merge_plugin_specs(configured: list[Any] | None, flags: list[str]) -> list[dict[str, Any]]:
    """The config file's plugins, then the --plugin flags; a flag naming a configured plugin updates it."""
    merged = normalize_specs(configured)
    for spec in normalize_specs(flags):
        same = [entry for entry in merged if entry["name"] == spec["name"]]
        if same:
            same[0].update(spec)
        else:
            merged.append(spec)
    return merged


def build_plugins(specs: list[Any] | None) -> list[Plugin]:
    """Instantiate the configured plugins in order and report conflicts before anything runs."""
    plugins = []
    for spec in normalize_specs(specs):
        options = {key: value for key, value in spec.items() if key != "name"}
        plugins.append(get_plugin(spec["name"])(options))
    names = [p.name for p in plugins]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"plugin(s) {duplicates} enabled more than once; give each plugin once with all its options")
    for plugin in plugins:
        clash = sorted(plugin.conflicts & set(names))
        if clash:
            raise ConfigError(f"plugin {plugin.name!r} cannot run together with {clash}; enable only one of them")
    selecting = [p.name for p in plugins if p.oversample > 1]
    if len(selecting) > 1:
        raise ConfigError(f"plugins {selecting} both select from an oversampled batch; enable only one of them")
    return plugins


def typed_specs(plugins: list[Plugin]) -> list[dict[str, Any]]:
    """The built plugins as config entries with typed option values (what config.json records)."""
    return [{"name": p.name, **{name: getattr(p.opts, name) for name in p.given_options}} for p in plugins]


# ------------------------------------------------------------ trainer glue
class PluginSet:
    """The enabled plugins, in order; the trainer calls these methods and knows no plugin by name."""

    def __init__(self, plugins: list[Plugin]):
        self.plugins = plugins

    def __bool__(self) -> bool:
        return bool(self.plugins)

    def __iter__(self) -> Iterator[Plugin]:
        return iter(self.plugins)

    @property
    def oversample(self) -> int:
        return max([p.oversample for p in self.plugins] + [1])

    def setup(self, trainer: TrainingRun) -> None:
        owners: dict[tuple[int, str], str] = {}
        if any(p.needs_dense_pre_activations for p in self.plugins):
            trainer.sae.sparse_training = False
        for plugin in self.plugins:
            counts = _parametrization_counts(trainer.sae)
            plugin.setup(trainer)
            for key, count in _parametrization_counts(trainer.sae).items():
                if count <= counts.get(key, 0):
                    continue
                earlier = owners.get(key)
                # Two parametrisations of one tensor compose in list order; only a declared pairing may.
                if earlier and earlier not in plugin.stacks_on:
                    raise ConfigError(
                        f"plugins {earlier!r} and {plugin.name!r} both parametrise the SAE tensor {key[1]!r}; "
                        f"enable only one of them (or declare {earlier!r} in {plugin.name}.stacks_on)"
                    )
                owners[key] = plugin.name

    def parameter_groups(self, exclude: list[nn.Parameter]) -> list[dict[str, Any]]:
        taken = {id(p) for p in exclude}
        groups = []
        for plugin in self.plugins:
            params = [p for p in plugin.modules.parameters() if p.requires_grad and id(p) not in taken]
            taken.update(id(p) for p in params)
            if params:
                groups.append({"params": params, "lr_scale": plugin.lr_scale, "plugin": plugin.name})
        return groups

    def active(self, trainer: TrainingRun) -> list[Plugin]:
        return [p for p in self.plugins if p.active(trainer.step, trainer.cfg.total_steps)]

    def hyperparameters(self, hp: dict[str, Any], trainer: TrainingRun) -> dict[str, Any]:
        for plugin in self.active(trainer):
            plugin.hyperparameters(hp, trainer)
        return hp

    def transform_batch(self, batch: Batch, trainer: TrainingRun) -> Batch:
        for plugin in self.active(trainer):
            batch = plugin.transform_batch(batch, trainer)
            if not isinstance(batch, Batch):
                raise TypeError(f"plugin {plugin.name!r}: transform_batch must return a Batch")
        expected = trainer.cfg.batch_size // trainer.dist.world_size  # each rank holds its slice
        if batch.x.shape[0] != expected or batch.x.dim() != 2:
            raise ValueError(
                f"after the plugins' transform_batch the batch has shape {tuple(batch.x.shape)}, expected "
                f"[{expected}, d_in]; a selecting plugin must cut the oversampled batch back to batch_size"
            )
        return batch

    def loss_terms(self, ctx: StepContext) -> None:
        """Replace the reconstruction term when the batch carries a target or weights, add plugin terms."""
        out, batch = ctx.out, ctx.batch
        if batch.target is not None or batch.weight is not None:
            reconstruction = reconstruction_loss(ctx.trainer.sae, out, batch, ctx.trainer.input_variance)
            out.loss = out.loss - out.parts["reconstruction"] + reconstruction
            out.parts["reconstruction"] = reconstruction
        for plugin in self.active(ctx.trainer):
            for term, value in plugin.loss_terms(ctx).items():
                if value.dim() != 0:
                    raise ValueError(f"plugin {plugin.name!r}: loss term {term!r} must be a scalar, got shape {tuple(value.shape)}")
                out.parts[f"{plugin.name}/{term}"] = value
                out.loss = out.loss + value

    def after_backward(self, ctx: StepContext) -> None:
        for plugin in self.active(ctx.trainer):
            plugin.after_backward(ctx)

    def after_step(self, ctx: StepContext) -> None:
        for plugin in self.active(ctx.trainer):
            plugin.after_step(ctx)

    def posthoc(self, sae: "SAE", trainer: TrainingRun) -> "SAE":
        for plugin in self.plugins:
            sae = plugin.posthoc(sae, trainer)
        bake_parametrizations(sae)
        return sae

    def evaluate(self, sae: "SAE", trainer: TrainingRun) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for plugin in self.plugins:
            metrics.update({f"{plugin.name}/{key}": value for key, value in plugin.evaluate(sae, trainer).items()})
        return metrics

    # ---------------------------------------------------------- checkpoint
    def save_state(self, checkpoint_dir: Path) -> None:
        """Write each plugin's state as ``plugins/<name>.safetensors`` + ``plugins/<name>.json``."""
        if not self.plugins:
            return
        directory = checkpoint_dir / STATE_DIR
        directory.mkdir(parents=True, exist_ok=True)
        for plugin in self.plugins:
            state = plugin.state_dict()
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
            plain = {k: v for k, v in state.items() if not torch.is_tensor(v)}
            text = json.dumps(plain)  # fails loudly here, not at resume, if a value is not JSON
            atomic_write(directory / f"{plugin.name}.safetensors", lambda p: save_file(tensors, str(p)))
            atomic_write(directory / f"{plugin.name}.json", lambda p: Path(p).write_text(text))

    def load_state(self, checkpoint_dir: Path) -> None:
        directory = checkpoint_dir / STATE_DIR
        for plugin in self.plugins:
            tensor_file, json_file = directory / f"{plugin.name}.safetensors", directory / f"{plugin.name}.json"
            if not (tensor_file.is_file() and json_file.is_file()):
                raise ConfigError(
                    f"the checkpoint in {checkpoint_dir} holds no state for plugin {plugin.name!r}: resume with "
                    "the plugins the run was started with (they are listed in its config.json)"
                )
            try:
                state: dict[str, Any] = json.loads(json_file.read_text())
                state.update(load_file(str(tensor_file)))
            except (OSError, ValueError) as exc:
                raise ValueError(f"plugin state {tensor_file} is corrupt ({exc}); restore the checkpoint or restart") from None
            plugin.load_state_dict(state)


def reconstruction_loss(sae: "SAE", out: "TrainingOutput", batch: Batch, input_variance: float) -> torch.Tensor:
    """The normalised-MSE reconstruction term against ``batch.target`` with per-token ``batch.weight``."""
    target_n = out.x_n
    if batch.target is not None:
        if batch.target.shape != batch.x.shape:
            raise ValueError(f"batch.target has shape {tuple(batch.target.shape)}, expected {tuple(batch.x.shape)}")
        # The target goes through the input's own normalisation so both live in one space.
        _, norm = sae.normalize(batch.x)
        target_n = (batch.target.to(out.x_n.dtype) - norm.shift) / norm.scale
    per_token = (out.x_hat_n - target_n).pow(2).sum(1) / input_variance
    if batch.weight is None:
        return per_token.mean()
    weight = batch.weight.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp_min(1e-12)


# ------------------------------------------------------------ parametrisations
def _parametrization_counts(module: nn.Module) -> dict[tuple[int, str], int]:
    return {(id(m), name): len(m.parametrizations[name]) for m in module.modules()
            if parametrize.is_parametrized(m) for name in m.parametrizations}


@contextmanager
def free_parameters(module: nn.Module) -> Iterator[None]:
    """Temporarily show the free (unparametrised) tensors under their plain names, e.g. to save them.

    The parametrisation objects and the ``original`` parameters themselves are kept, so optimizer
    references and plugin state survive the round trip.
    """
    removed = []
    for m in list(module.modules()):
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations):
                removed.append((m, name, list(m.parametrizations[name])))
                parametrize.remove_parametrizations(m, name, leave_parametrized=False)
    try:
        yield
    finally:
        for m, name, chain in removed:
            for parametrization in chain:
                parametrize.register_parametrization(m, name, parametrization, unsafe=True)


def bake_parametrizations(module: nn.Module) -> None:
    """Replace every parametrised tensor by its current value (the final SAE has plain weights)."""
    for m in list(module.modules()):
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)

"""The training-plugin API: hook points in the training loop, declared options, a registry.

A plugin is a ``Plugin`` subclass in its own file. The trainer calls its hooks in this order:

    setup(trainer)                 once, after the SAE exists and before the optimizer is built
                                   (fresh run and resumed run alike; ``trainer.resumed`` tells which)
    every step, for plugins whose ``window`` holds the step's fraction of the run:
      hyperparameters(hp, trainer) may rewrite {"lr", "k"} for this step (controllers, schedules)
      transform_batch(batch, trainer) -> Batch   augment / select / weight / set a target
      loss_terms(ctx) -> {name: tensor}          extra loss terms, added to the loss and logged
      after_backward(ctx)                        gradient surgery (before clipping and the step)
      after_step(ctx)                            EMA, bandits, schedules, targets
    posthoc(sae, trainer) -> SAE   after the last step, before the final SAE is saved (refits)
    evaluate(sae, trainer) -> dict extra metrics, merged into ``sae/eval.json`` as ``<name>/<key>``

Plugin-owned trainable modules live in ``self.modules`` (an ``nn.ModuleDict``): their parameters get
their own optimizer group (learning rate × ``lr_scale``) and, with ``state_dict``, travel in the
checkpoint. Weight parametrisations go through ``torch.nn.utils.parametrize``; the trainer saves the
free tensors in checkpoints and bakes the parametrisation into the final SAE.

Plugins are found by name: every module of the ``sae_kit.plugins`` package (a new file needs no
registry edit) and the entry-point group ``sae_kit.plugins`` (third-party packages).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import pkgutil
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from sae_kit.config import ConfigError, parse_key_values, parse_options
from sae_kit.fileio import atomic_write

if TYPE_CHECKING:
    from sae_kit.sae.base import SAE, TrainingOutput
    from sae_kit.train.trainer import Trainer

ENTRY_POINT_GROUP = "sae_kit.plugins"
STATE_DIR = "plugins"


# What a path option names (``option(path=...)``); "stores" is several activation stores joined by "+".
PATH_KINDS = ("store", "stores", "sae", "file", "model", "dataset")


def option(default: Any, doc: str, *, path: str | None = None) -> Any:
    """A plugin option with its documentation (shown by ``sae-kit plugins`` and usable for UI forms).

    ``path`` (one of ``PATH_KINDS``) declares that the option names files: a server that trains
    confines it to its data folder like the run's own paths. The default value of a path option is a
    keyword, never a path ("auto", "" for "the run's", "default" for the bundled corpus).
    """
    if path is not None and path not in PATH_KINDS:
        raise ValueError(f"option(path=...) must be one of {PATH_KINDS}, got {path!r}")
    return field(default=default, metadata={"doc": doc, **({"path": path} if path else {})})


def path_options(cls: type["Plugin"]) -> dict[str, tuple[str, Any]]:
    """The plugin's options that name files: {option: (kind, default keyword)}."""
    return {f.name: (f.metadata["path"], f.default) for f in dataclasses.fields(cls.Options) if "path" in f.metadata}


@dataclass
class NoOptions:
    pass


@dataclass
class Ablation:
    """What ``sae-kit ablate`` measures for a plugin: the metric it is meant to move and the setting."""

    metric: str  # a key of eval.json (or of the plugin's evaluate() output, see plugin_metric)
    higher_is_better: bool = False
    # The key read from the plugin run when the plugin reports its own version of the metric
    # (e.g. the least-squares refit's FVU); None means the same key as the baseline's.
    plugin_metric: str | None = None
    dataset: str = "sharkey"  # planted dataset for --data synthetic
    # Options passed to the plugin in the ablation (on top of its defaults).
    options: dict[str, Any] = field(default_factory=dict)
    # TrainConfig overrides for both runs (e.g. more steps, a lower dead-latent threshold).
    train: dict[str, Any] = field(default_factory=dict)
    # With --data synthetic: train on a finite store of this many tokens (multi-epoch regime) instead
    # of an endless stream.
    cache_tokens: int | None = None
    # When set, the baseline run also enables the plugin with these options: a measuring-only mode
    # (e.g. uniform mixing, no selection) so the baseline reports the same plugin metric.
    baseline_options: dict[str, Any] | None = None
    # "measurement": the plugin measures rather than changes training (no helps/hurts verdict).
    kind: str = "training"


@dataclass
class Batch:
    """One training batch as the plugins see it; the engine reconstructs ``target`` (default ``x``)."""

    x: torch.Tensor  # [B, d_in] the SAE's input
    target: torch.Tensor | None = None  # [B, d_in] reconstruction target (denoising, mixup, distillation)
    weight: torch.Tensor | None = None  # [B] per-token loss weight, mean 1 by convention
    source: torch.Tensor | None = None  # [B] int64 source id (multi-source mixing)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    """What the per-step hooks after the forward pass receive."""

    trainer: "Trainer"
    batch: Batch
    out: "TrainingOutput"
    step: int  # the step being taken, counted from 0
    logs: dict[str, float] = field(default_factory=dict)  # written to metrics.jsonl with the step

    @property
    def sae(self) -> "SAE":
        return self.trainer.sae


class Plugin:
    """Base class: override the hooks you need; every default does nothing."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # the seed paper, for docs/plugins.md
    summary: ClassVar[str] = ""  # what it changes in SAE training, one line
    Options: ClassVar[type] = NoOptions
    # Names of plugins that cannot run in the same training run (checked both ways at set-up).
    conflicts: ClassVar[frozenset[str]] = frozenset()
    # Rows drawn per step = batch_size × oversample; a plugin with oversample > 1 must cut the batch
    # back to batch_size in transform_batch (selection). Two selecting plugins conflict.
    oversample: ClassVar[int] = 1
    # Plugins whose parametrisation of the same SAE tensor this one may be stacked on (in list order).
    stacks_on: ClassVar[frozenset[str]] = frozenset()
    # The fraction of the run (by step) in which the per-step hooks run.
    window: tuple[float, float] = (0.0, 1.0)
    lr_scale: float = 1.0
    ablation: ClassVar[Ablation | None] = None

    def __init__(self, options: dict[str, Any] | None = None):
        self.opts = parse_options(self.Options, dict(options or {}), f"plugin {self.name!r}")
        self.modules = nn.ModuleDict()
        self.validate()

    def validate(self) -> None:
        """Check option values; raise ConfigError with what is wrong and what to do."""

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: "Trainer") -> None: ...

    def hyperparameters(self, hp: dict[str, Any], trainer: "Trainer") -> None: ...

    def transform_batch(self, batch: Batch, trainer: "Trainer") -> Batch:
        return batch

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, ctx: StepContext) -> None: ...

    def after_step(self, ctx: StepContext) -> None: ...

    def posthoc(self, sae: "SAE", trainer: "Trainer") -> "SAE":
        return sae

    def evaluate(self, sae: "SAE", trainer: "Trainer") -> dict[str, Any]:
        return {}

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: tensors go to safetensors, the rest must be JSON-serialisable.

        The default holds ``self.modules``; override and extend with ``super().state_dict()``.
        """
        return {f"modules.{key}": value for key, value in self.modules.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        prefix = "modules."
        modules = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if modules or len(self.modules):
            self.modules.load_state_dict(modules)

    def active(self, step: int, total_steps: int) -> bool:
        start, end = self.window
        fraction = step / max(total_steps, 1)
        return start <= fraction < end or (end >= 1.0 and fraction >= 1.0)


# -------------------------------------------------------------------- registry
def _builtin_plugins() -> dict[str, type[Plugin]]:
    import sae_kit.plugins as package

    found: dict[str, type[Plugin]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name in ("api", "ablate", "docs"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Plugin) and value is not Plugin
                    and value.__module__ == module.__name__ and value.name):
                if value.name in found:
                    raise ConfigError(f"two built-in plugins are named {value.name!r} ({found[value.name]} and {value})")
                found[value.name] = value
    return found


def _entry_point_plugins() -> dict[str, type[Plugin]]:
    found: dict[str, type[Plugin]] = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
        except Exception as exc:  # a broken third-party package must not hide the built-ins
            raise ConfigError(f"plugin entry point {entry.name!r} ({entry.value}) failed to load: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise ConfigError(f"plugin entry point {entry.name!r} ({entry.value}) is not a sae_kit Plugin subclass")
        found[cls.name or entry.name] = cls
    return found


_REGISTRY: dict[str, type[Plugin]] | None = None


def available_plugins(refresh: bool = False) -> dict[str, type[Plugin]]:
    """Every plugin by name: the built-ins, then entry points (a clash with a built-in is an error)."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        registry = _builtin_plugins()
        for name, cls in _entry_point_plugins().items():
            if name in registry and registry[name] is not cls:
                raise ConfigError(f"plugin {name!r} from an entry point clashes with the built-in one; rename it")
            registry[name] = cls
        _REGISTRY = dict(sorted(registry.items()))
    return _REGISTRY


def get_plugin(name: str) -> type[Plugin]:
    registry = available_plugins()
    if name not in registry:
        raise ConfigError(f"unknown plugin {name!r}; available plugins: {sorted(registry)} (see `sae-kit plugins`)")
    return registry[name]


def options_schema(cls: type[Plugin]) -> list[dict[str, Any]]:
    """The plugin's options as a list of {name, type, default, doc, choices}: enough for a form."""
    hints = typing.get_type_hints(cls.Options)
    schema = []
    for f in dataclasses.fields(cls.Options):
        hint = hints.get(f.name)
        entry = {"name": f.name, "default": f.default, "doc": f.metadata.get("doc", "")}
        if "path" in f.metadata:
            entry["path"] = f.metadata["path"]
        if typing.get_origin(hint) is typing.Literal:
            entry["type"], entry["choices"] = "choice", list(typing.get_args(hint))
        else:
            entry["type"] = getattr(hint, "__name__", str(hint))
        schema.append(entry)
    return schema


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

    def setup(self, trainer: "Trainer") -> None:
        owners: dict[tuple[int, str], str] = {}
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

    def active(self, trainer: "Trainer") -> list[Plugin]:
        return [p for p in self.plugins if p.active(trainer.step, trainer.cfg.total_steps)]

    def hyperparameters(self, hp: dict[str, Any], trainer: "Trainer") -> dict[str, Any]:
        for plugin in self.active(trainer):
            plugin.hyperparameters(hp, trainer)
        return hp

    def transform_batch(self, batch: Batch, trainer: "Trainer") -> Batch:
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

    def posthoc(self, sae: "SAE", trainer: "Trainer") -> "SAE":
        for plugin in self.plugins:
            sae = plugin.posthoc(sae, trainer)
        bake_parametrizations(sae)
        return sae

    def evaluate(self, sae: "SAE", trainer: "Trainer") -> dict[str, Any]:
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

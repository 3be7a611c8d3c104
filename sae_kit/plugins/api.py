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

The trainer is seen through ``TrainingRun``: the step, the config, the SAE, the batch source (and a
way to replace it), a way to train a helper SAE. Building plugins from specs and calling their hooks
is the trainer's business (sae_kit/train/plugin_set.py).

Plugins are found by name: every module of the ``sae_kit.plugins`` package (a new file needs no
registry edit) and the entry-point group ``sae_kit.plugins`` (third-party packages).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn as nn

from sae_kit import config
from sae_kit.config import ConfigError, parse_options

if TYPE_CHECKING:
    from sae_kit.config import TrainConfig
    from sae_kit.sae.base import SAE, TrainingOutput

ENTRY_POINT_GROUP = "sae_kit.plugins"


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
    return {f.name: (f.metadata["path"], f.default) for f in fields(cls.Options) if "path" in f.metadata}


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


class TrainingRun(Protocol):
    """What a plugin may read and do in the run it is part of (the trainer implements it)."""

    cfg: "TrainConfig"
    sae: "SAE"
    step: int  # steps taken so far
    step_k: int  # the k of the current (or last) step: cfg.k unless a plugin's hyperparameters() moved it
    resumed: bool  # whether setup() runs on a resumed run
    input_variance: float  # the loss scale of the normalised inputs
    run_dir: Path
    optimizer: torch.optim.Optimizer

    @property
    def source(self) -> Any:
        """The batch source (iter_batches / sample / d_in); read-only: use replace_source."""

    @property
    def base_lr(self) -> float: ...

    def replace_source(self, source: Any) -> None:
        """Train on ``source`` from now on (called in setup, before the first batch is drawn)."""

    def train_helper(self, cfg: "TrainConfig", source: Any, init: "SAE | None" = None) -> "SAE":
        """Train another SAE to completion (a prior, a teacher, a second seed) and return it;
        ``init`` starts it from that SAE's weights instead of a fresh initialisation."""


@dataclass
class StepContext:
    """What the per-step hooks after the forward pass receive."""

    trainer: TrainingRun
    batch: Batch
    out: "TrainingOutput"
    step: int  # the step being taken, counted from 0
    logs: dict[str, float] = field(default_factory=dict)  # written to metrics.jsonl with the step
    k: int = 0  # this step's k (after the plugins' hyperparameters)

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
    # A loss term that needs the gradient of every pre-activation (not only the selected ones) turns
    # the SAE's sparse training path off for the run.
    needs_dense_pre_activations: ClassVar[bool] = False
    ablation: ClassVar[Ablation | None] = None

    def __init__(self, options: dict[str, Any] | None = None):
        self.given_options = tuple(options or {})
        self.opts = parse_options(self.Options, dict(options or {}), f"plugin {self.name!r}")
        self.modules = nn.ModuleDict()
        self.validate()

    def validate(self) -> None:
        """Check option values; raise ConfigError with what is wrong and what to do."""

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: TrainingRun) -> None: ...

    def hyperparameters(self, hp: dict[str, Any], trainer: TrainingRun) -> None: ...

    def transform_batch(self, batch: Batch, trainer: TrainingRun) -> Batch:
        return batch

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, ctx: StepContext) -> None: ...

    def after_step(self, ctx: StepContext) -> None: ...

    def posthoc(self, sae: "SAE", trainer: TrainingRun) -> "SAE":
        return sae

    def evaluate(self, sae: "SAE", trainer: TrainingRun) -> dict[str, Any]:
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
        if info.name.startswith("_") or info.name == "api":
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
    """The plugin's options as {name, type (JSON Schema), default, doc, choices}: enough for a form."""
    return config.options_schema(cls.Options)

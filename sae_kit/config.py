"""Every setting is declared once, here, as a typed dataclass field with its help text.

From these declarations derive: the command-line flags (``add_arguments``), YAML/JSON loading and its
validation with messages naming the field (``from_mapping``), the server's JSON schema and so the UI's
run form (``json_schema``), and the checkpoint's cfg.json. Architecture and plugin options are typed
dataclasses too and use the same JSON-Schema vocabulary (``options_schema``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

# mean_norm: every input divided by one constant, the mean input norm of the initial sample.
NORMALIZATIONS = ("none", "unit_norm", "layer_norm", "mean_norm")
DTYPES = ("float32", "float16", "bfloat16")
# config.json of a training run: 1 = plugin options as the strings typed on the command line,
# 2 = typed values and this key.
CONFIG_VERSION = 2


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            flags: tuple[str, ...] | None = None, choices: Any = None, cli: bool = True, metavar: str | None = None,
            required: bool = False) -> Any:
    """A declared setting: its default, its help (CLI ``--help``, schema description, UI label).

    ``flags`` overrides the flag names (default ``--field-name``; for a bool whose default is True the
    flag switches it off, e.g. ``--no-progress``); ``choices`` is a tuple or a function returning one
    (resolved late, e.g. the registered architectures); ``cli=False`` keeps a setting out of the flags
    (it is set through a file or a dedicated flag such as ``--opt``); ``required`` makes the flag
    mandatory on the command line although the library has a default.
    """
    metadata = {"help": help, "flags": flags, "choices": choices, "cli": cli, "metavar": metavar, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _choices(f: dataclasses.Field) -> tuple | None:
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def check_choices(obj: Any) -> None:
    """Every field declared with ``choices`` holds one of them (or None where None is its default)."""
    for f in fields(obj):
        choices, value = _choices(f), getattr(obj, f.name)
        if choices and value not in choices and not (value is None and _default(f) is None):
            raise ConfigError(f"{f.name} must be one of {list(choices)}, got {value!r}")


def check_positive(obj: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    """The one rule for counts: an int (not a bool) >= minimum, named in the error."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer (>= {minimum}), got {value!r}")
        if value < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")


# ------------------------------------------------------------------ the SAE's settings
@dataclass(kw_only=True)
class SAESettings:
    """The SAE settings a training run chooses; SAEConfig adds the shapes and provenance, TrainConfig inherits them."""

    architecture: str = setting("topk", "SAE architecture", flags=("--arch", "--architecture"),
                                choices=lambda: sorted(registered_architectures()))
    k: int = setting(32, "active latents per token (TopK family; budget k·B for batch-level rules)")
    # None means "the architecture's default" and is resolved when the SAE is built.
    normalize_activations: str | None = setting(None, "input normalisation (default: the architecture's)",
                                                flags=("--normalize",), choices=NORMALIZATIONS)
    # A latent is dead once it has not fired for this many training tokens (Gao et al.: 10M).
    dead_tokens_threshold: int = setting(10_000_000, "a latent is dead after this many tokens without firing")
    aux_coefficient: float = setting(1 / 32, "weight of the dead-latent auxiliary loss")
    # Latents used by the dead-latent auxiliary loss; None means d_in // 2 (Gao et al. App. B.1).
    k_aux: int | None = setting(None, "latents in the auxiliary loss (default d_in/2)")
    # Skip transcoders (Paulo et al. 2025): an affine W_skip [d_out, d_in] beside the sparse path.
    skip_connection: bool = setting(False, "skip transcoder: train an affine W_skip beside the sparse path "
                                           "(with --targets or --target-hook)")
    # Architecture-specific settings, typed by the architecture's ``Options`` dataclass when the config is built.
    options: dict[str, Any] = setting(factory=dict, help="architecture options (--opt KEY=VALUE)", cli=False)

    def check_sae_settings(self, d_sae: int | None) -> None:
        """k, k_aux, normalisation and the architecture's options: checked once, where the config is built."""
        architectures = registered_architectures()
        if self.architecture not in architectures:
            raise ConfigError(f"unknown architecture {self.architecture!r}; choose one of {sorted(architectures)}")
        if self.normalize_activations is not None and self.normalize_activations not in NORMALIZATIONS:
            raise ConfigError(
                f"normalize_activations must be one of {NORMALIZATIONS}, got {self.normalize_activations!r}")
        check_positive(self, ("k",))
        if d_sae is not None and architectures[self.architecture].uses_k and self.k > d_sae:
            raise ConfigError(f"k={self.k} exceeds d_sae={d_sae}: choose k <= d_sae (the number of latents)")
        if self.k_aux is not None:
            check_positive(self, ("k_aux",))
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be a mapping of architecture options, got {self.options!r}")
        # Typed now: config.json and cfg.json hold 4, not "4"; a bad option fails before data is opened.
        opts = parse_options(architectures[self.architecture].Options, self.options,
                             f"architecture {self.architecture!r}")
        self.options = {name: getattr(opts, name) for name in self.options}

    def sae_settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(SAESettings)}


@dataclass(kw_only=True)
class SAEConfig(SAESettings):
    """Everything needed to rebuild an SAE's forward pass (saved as cfg.json beside the weights)."""

    d_in: int
    d_sae: int
    dtype: str = "float32"
    # Transcoders: the output hook's width (None: an SAE, which reconstructs its own input).
    d_out: int | None = None
    # Provenance: model_name, hook_name, context_size, dataset_path... (SAELens metadata keys).
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_positive(self, ("d_in", "d_sae"))
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        self.check_sae_settings(self.d_sae)
        if self.d_out is not None:
            check_positive(self, ("d_out",))
            if self.normalize_activations not in (None, "none"):
                raise ConfigError("transcoders read and predict raw activations: use normalize_activations none")
        if self.skip_connection and self.d_out is None:
            raise ConfigError("skip_connection is for transcoders: give the output width d_out (train with --targets)")


def registered_architectures() -> dict[str, type]:
    from sae_kit.sae.base import ARCHITECTURES
    import sae_kit.sae  # noqa: F401  (registers every architecture)

    return ARCHITECTURES


# ------------------------------------------------------------------ a training run's settings
@dataclass(kw_only=True)
class TrainConfig(SAESettings):
    """Every setting of a training run: the ``sae-kit train`` flags, config files, the server's run form.

    Adding a field here (with ``setting(default, help)``) adds its flag, its config-file key, its
    entry in GET /api/runs/schema and its input in the web UI's run form.
    """

    activations: str | list[str] | None = setting(
        None, "activation store folder (from `sae-kit harvest` or `sae-kit store synth`); repeat it to train "
              "one SAE per store into OUT/<store name>, spread over torchrun's ranks")
    # Or train straight from a model, without a cache (harvest on the fly):
    model: str | None = setting(None, "train straight from this model's activations, without a cache (with --hook)")
    hook: str | None = setting(None, "hook name for --model, e.g. blocks.6.hook_resid_post")
    # Transcoders: the output hook's store (rows aligned with --activations'), or its hook with --model.
    targets: str | None = setting(None, "transcoder: the output hook's store, harvested with --activations' hook in one "
                                        "run (e.g. blocks.6.hook_mlp_out beside blocks.6.ln2.hook_normalized)")
    target_hook: str | None = setting(None, "transcoder from --model: the output hook to predict "
                                            "(e.g. blocks.6.hook_mlp_out)")
    dataset: str = setting("default", "text dataset for --model: 'default', a local file/folder, or a hub name")
    context: int = setting(128, "tokens per context window for --model")
    out: str = setting("runs/sae", "run folder (checkpoints, metrics, report, final SAE)")
    target_l0: int | None = setting(None, "train at about this mean L0: sets the architecture's own sparsity knob "
                                          "(k, or JumpReLU's L0 controller)")
    expansion: int = setting(8, "d_sae = expansion × d_in")
    d_sae: int | None = setting(None, "number of latents (overrides --expansion)")
    lr: float | None = setting(None, "Adam learning rate (default: the architecture's, 2e-4/sqrt(d_sae/2^14) for TopK)")
    batch_size: int = setting(4096, "tokens per step")
    tokens: int = setting(10_000_000, "training tokens in total")
    warmup_steps: int = setting(100, "linear learning-rate warm-up steps")
    decay_fraction: float = setting(0.2, "final fraction of steps with linear decay to 0")
    grad_clip: float | None = setting(1.0, "gradient-norm clip (0 disables)")
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "Adam's beta1 and beta2")
    adam_eps: float = setting(6.25e-10, "Adam's epsilon")
    heldout_fraction: float = setting(0.05, "fraction of the store held out for evaluation")
    eval_every: int = setting(500, "held-out evaluation every N steps")
    eval_tokens: int = setting(65_536, "held-out tokens per evaluation")
    log_every: int = setting(10, "training metrics every N steps")
    checkpoint_every: int = setting(500, "checkpoint every N steps")
    init_tokens: int = setting(32_768, "sample for b_dec's geometric median and the loss scale")
    seed: int = setting(0, "random seed (initialisation and data order)")
    threads: int | None = setting(None, "torch CPU threads")
    progress: bool = setting(True, "hide the progress bar", flags=("--no-progress",))
    # Training plugins, in hook order: names, "NAME:key=value,..." or {name: NAME, key: value} (sae_kit/plugins);
    # stored as [{"name": NAME, option: typed value}].
    plugins: list[Any] = setting(factory=list, help="training plugins in hook order (--plugin NAME[:KEY=VALUE,...])",
                                 cli=False)

    def __post_init__(self) -> None:
        check_positive(self, ("expansion", "batch_size", "tokens", "eval_every", "eval_tokens", "log_every",
                              "checkpoint_every", "init_tokens", "context"))
        check_positive(self, ("warmup_steps",), minimum=0)
        if self.d_sae is not None:
            check_positive(self, ("d_sae",))
        if self.target_l0 is not None:
            self.apply_target_l0()
        self.check_sae_settings(self.d_sae)
        check_choices(self)
        if self.targets and isinstance(self.activations, list):
            raise ConfigError("--targets pairs one input store with one output store: give one --activations")
        # A negative clip norm would flip every gradient (clip_grad_norm_ scales by max_norm / norm).
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 or None disables it), got {self.grad_clip!r}")
        if self.grad_clip == 0:
            self.grad_clip = None
        if self.threads is not None:
            check_positive(self, ("threads",))
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {self.decay_fraction!r}")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        self.adam_betas = tuple(self.adam_betas)
        from sae_kit.train.plugin_set import build_plugins, typed_specs

        # Built once here: unknown names, bad options and conflicts are reported before any data is
        # opened, and the trainer takes these instances.
        self._built_plugins = build_plugins(self.plugins)
        self.plugins = typed_specs(self._built_plugins)

    def apply_target_l0(self) -> None:
        """Fold ``target_l0`` into the architecture's own knob: its ``sparsity_settings(N)`` overrides
        (``{"k": N}`` for the TopK family, options such as JumpReLU's ``target_l0``)."""
        check_positive(self, ("target_l0",))
        cls = registered_architectures().get(self.architecture)
        if cls is None:
            return  # check_sae_settings names the unknown architecture
        knob = getattr(cls, "sparsity_settings", None)
        if knob is None and not cls.uses_k:
            raise ConfigError(f"architecture {self.architecture!r} has no target-L0 setting; tune its own options")
        for name, value in (knob(self.target_l0) if knob else {"k": self.target_l0}).items():
            setattr(self, name, {**self.options, **value} if name == "options" else value)

    def take_plugins(self) -> list:
        """The plugins built with this config (for the first trainer), fresh ones after that."""
        built, self._built_plugins = getattr(self, "_built_plugins", None), None
        if built is None:
            from sae_kit.train.plugin_set import build_plugins

            built = build_plugins(self.plugins)
        return built

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """From a config file, config.json (any version, migrated) or the API; errors name the field."""
        data = dict(data)
        version = data.pop("config_version", 1)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ConfigError(f"config_version {version!r} is newer than this sae-kit understands ({CONFIG_VERSION}); upgrade sae-kit")
        # Version 1 stored plugin options as the strings typed on the command line; they are typed
        # when the plugins are built (same coercion as --plugin), so no other migration is needed.
        return from_mapping(cls, data, what="training setting")

    def to_dict(self) -> dict[str, Any]:
        """What config.json holds: every field with typed values, and the format version."""
        return {"config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def sae_config(self, d_in: int, metadata: dict[str, Any], d_out: int | None = None) -> SAEConfig:
        return SAEConfig(d_in=d_in, d_out=d_out, d_sae=self.d_sae or self.expansion * d_in, metadata=metadata,
                         **{**self.sae_settings(), "options": dict(self.options)})

    def learning_rate(self, base_lr: float, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        decay_steps = int(self.total_steps * self.decay_fraction)
        decay_start = self.total_steps - decay_steps
        decay = 1.0 if step < decay_start or decay_steps == 0 else (self.total_steps - step) / decay_steps
        return base_lr * warmup * decay


# ------------------------------------------------------------------ options of architectures and plugins
def parse_options(options_cls: type, given: dict[str, Any], owner: str) -> Any:
    """Build an options dataclass from a dict, rejecting unknown keys with the list of valid ones."""
    valid = {f.name: f for f in fields(options_cls)}
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for {owner}; valid options: {sorted(valid) or 'none'}"
        )
    converted = {}
    for name, value in given.items():
        default = valid[name].default
        like = None if default is dataclasses.MISSING else default
        converted[name] = _coerce(value, like, f"{owner} option {name}")
    options = options_cls(**converted)
    # Options typed Literal[...] accept only the listed values.
    for name, hint in typing.get_type_hints(options_cls).items():
        if typing.get_origin(hint) is typing.Literal and getattr(options, name) not in typing.get_args(hint):
            raise ConfigError(f"{owner} option {name} must be one of {typing.get_args(hint)}, got {getattr(options, name)!r}")
    return options


def _coerce(value: Any, like: Any, what: str) -> Any:
    """Convert strings from the CLI (``key=value``) to the type of the default value."""
    if like is None or isinstance(like, str):
        return value
    if not isinstance(value, str):  # typed already (YAML/JSON, config.json): check, do not convert
        numeric = isinstance(like, (int, float))
        if numeric and (isinstance(like, bool) != isinstance(value, bool)
                        or not isinstance(value, (int, float))
                        or (isinstance(like, int) and not isinstance(value, int))):
            raise ConfigError(f"{what} expects a {type(like).__name__}, got {value!r}")
        return float(value) if isinstance(like, float) else value
    try:
        if isinstance(like, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return type(like)(value)
    except ValueError:
        raise ConfigError(f"{what} expects a {type(like).__name__}, got {value!r}") from None


def check_types(cls: type, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``data`` with each value converted to its dataclass field's declared type, or one ConfigError line
    naming every field that does not fit and the type it expects.

    Conversion follows pydantic's lax rules, as the server's request validation does: ``"10"`` for an
    integer is 10, ``"0.1"`` for a number is 0.1. A true/false given for a number is refused (``k: yes``
    is a slip, not a 1). Keys that are not fields are left for the caller to report.
    """
    from pydantic import ValidationError

    hints = typing.get_type_hints(cls)
    converted, problems = dict(data), []
    for name, value in data.items():
        hint = hints.get(name)
        if hint is None:
            continue
        try:
            if isinstance(value, bool) and not _admits_bool(hint):
                raise ValueError
            converted[name] = _adapter(hint).validate_python(value)
        except (ValidationError, ValueError):
            problems.append(f"{name}: expected {describe_type(hint)}, got {value!r}")
    if problems:
        raise ConfigError(f"{where}{'; '.join(problems)}")
    return converted


def check_text(value: Any, what: str) -> Any:
    """Refuse strings no file system, database or log takes, anywhere in ``value`` (nested mappings and
    lists too): NUL bytes and lone surrogates (invalid Unicode, e.g. a JSON ``"\\ud800"``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_text(key, what)
            check_text(item, f"{what}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_text(item, f"{what}[{index}]")
    elif isinstance(value, str):
        if "\x00" in value:
            raise ConfigError(f"{what} {value!r} contains a NUL byte; remove it")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{what} {value!r} contains a lone surrogate (invalid Unicode); send valid UTF-8 text") from None
    return value


def describe_type(hint: Any) -> str:
    """A reader's name for a declared type: ``float | None`` -> "a number or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is tuple and args and Ellipsis not in args:
        kinds = {describe_type(arg) for arg in args}
        number = {"a number": "numbers", "an integer": "integers", "a string": "strings"}.get(kinds.pop(), "values") \
            if len(kinds) == 1 else "values"
        return f"{_COUNT.get(len(args), len(args))} {number} [a, b{', ...' if len(args) > 2 else ''}]"
    if origin is list or hint is list:
        if not args or args[0] is typing.Any:
            return "a list"
        return f"a list of {describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or hint is dict:
        return "a mapping (key: value)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null", typing.Any: "any value"}.get(hint, getattr(hint, "__name__", str(hint)))


_COUNT = {2: "two", 3: "three", 4: "four"}
_ADAPTERS: dict[Any, Any] = {}


def _adapter(hint: Any) -> Any:
    from pydantic import TypeAdapter

    key = repr(hint)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = TypeAdapter(hint)
    return _ADAPTERS[key]


def _admits_bool(hint: Any) -> bool:
    if hint is bool or hint is typing.Any:
        return True
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return union and any(_admits_bool(arg) for arg in typing.get_args(hint))


def options_schema(options_cls: type) -> list[dict[str, Any]]:
    """An options dataclass as a list of {name, type (JSON Schema), default, doc, choices}: enough for a form."""
    hints = typing.get_type_hints(options_cls)
    schema = []
    for f in fields(options_cls):
        entry = {"name": f.name, "default": f.default, "doc": f.metadata.get("doc", "")}
        if "path" in f.metadata:  # the option names files (plugins' option(path=...)): servers confine it
            entry["path"] = f.metadata["path"]
        entry.update(_json_type(hints[f.name], f.default))
        schema.append(entry)
    return schema


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", tuple: "array",
               dict: "object"}


def _json_type(hint: Any, default: Any = None) -> dict[str, Any]:
    """One type vocabulary (JSON Schema) for every declared setting and option."""
    if typing.get_origin(hint) is typing.Literal:
        values = list(typing.get_args(hint))
        return {"type": _JSON_TYPES.get(type(values[0]), "string"), "choices": values}
    base = _base_type(hint)
    if base is None and default is not None and default is not MISSING:
        base = type(default)
    return {"type": _JSON_TYPES.get(base, "string")}


def _base_type(hint: Any) -> type | None:
    """int for ``int``, ``int | None``; list for ``list[str]``, ``str | list[str]``; None for Any."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        bases = [_base_type(a) for a in args]
        return list if list in bases else bases[0] if len(bases) == 1 else None
    if origin is not None:
        return origin if isinstance(origin, type) else None
    return hint if isinstance(hint, type) and hint is not typing.Any else None


# ------------------------------------------------------------------ command-line flags, files, schema
def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per CLI-visible field of ``cls``; a flag not given leaves no value (the file or default wins)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if not f.metadata.get("cli", True) or f.name in skip:
            continue
        hint, default = hints[f.name], _default(f)
        base = _base_type(hint)
        flags = f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",)
        helptext = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if base is bool:
            # The flag flips the default: --no-progress, --keep-bos.
            kwargs.update(action="store_const", const=not default)
        else:
            if base is list:
                element = [a for a in typing.get_args(hint) if a is not type(None)]
                kwargs["action"] = "append"
                kwargs["type"] = str if not element else _element_type(element)
            elif base is tuple:
                kwargs.update(nargs=len(typing.get_args(hint)), type=typing.get_args(hint)[0])
            elif base in (int, float):
                kwargs["type"] = base
            choices = _choices(f)
            if choices:
                kwargs["choices"] = choices
            if f.metadata.get("metavar"):
                kwargs["metavar"] = f.metadata["metavar"]
            if default is MISSING or f.metadata.get("required"):
                kwargs["required"] = True
            elif default is not None and default != [] and "%" not in helptext:
                helptext += f" (default: {default})"
        parser.add_argument(*flags, help=helptext, **kwargs)


def _element_type(args: list) -> type:
    for arg in args:
        if typing.get_origin(arg) is list:
            return typing.get_args(arg)[0]
    return str


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def args_to_settings(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def from_mapping(cls: type, data: Any, what: str = "setting") -> Any:
    """Build ``cls`` from a mapping (YAML/JSON/API): unknown keys and wrong types are named."""
    check_known_keys(cls, data, what)
    return cls(**check_types(cls, data))


def check_known_keys(cls: type, data: Any, what: str = "setting", hidden: tuple[str, ...] = ()) -> None:
    """``data`` is a mapping whose keys are fields of ``cls``; the error lists the valid ones (less ``hidden``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"the {what}s must be a mapping of {cls.__name__} fields, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what}(s) {unknown}; valid settings: {sorted(known - set(hidden))}")


def json_schema(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON schema of ``cls`` with each field's help as its description and its choices as an enum."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(cls).json_schema()
    for f in fields(cls):
        if f.name in skip:
            schema["properties"].pop(f.name, None)
            continue
        prop = schema["properties"].get(f.name)
        if prop is None:
            continue
        if f.metadata.get("help"):
            prop["description"] = f.metadata["help"]
        choices = _choices(f)
        if choices:
            prop["enum"] = list(choices) + ([None] if _default(f) is None else [])  # null: "the default"
    if "required" in schema:
        schema["required"] = [name for name in schema["required"] if name not in skip]
    return schema


# ------------------------------------------------------------------ small file helpers
def parse_key_values(items: list[str] | None, what: str = "--opt") -> dict[str, str]:
    """Parse ``["a=1", "b=x"]`` into a dict, with a clear error for malformed items."""
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} expects key=value, got {item!r}")
        result[key.strip()] = value.strip()
    return result


def load_config_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML or JSON file (YAML is a superset of JSON) that must hold a mapping of settings."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def to_json(obj: Any) -> str:
    return json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj, indent=2, sort_keys=True)

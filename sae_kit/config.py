"""Configuration dataclasses. The CLI, YAML/JSON files and the checkpoint's cfg.json read the same ones."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

NORMALIZATIONS = ("none", "unit_norm", "layer_norm")
DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE's forward pass (saved as cfg.json beside the weights)."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 32
    # None means "the architecture's default" and is resolved when the SAE is built.
    normalize_activations: str | None = None
    dtype: str = "float32"
    # A latent is dead once it has not fired for this many training tokens (Gao et al.: 10M).
    dead_tokens_threshold: int = 10_000_000
    aux_coefficient: float = 1 / 32
    # Latents used by the dead-latent auxiliary loss; None means d_in // 2 (Gao et al. App. B.1).
    k_aux: int | None = None
    # Architecture-specific settings, validated against the architecture's ``Options`` dataclass.
    options: dict[str, Any] = field(default_factory=dict)
    # Provenance: model_name, hook_name, context_size, dataset_path... (SAELens metadata keys).
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.normalize_activations is not None and self.normalize_activations not in NORMALIZATIONS:
            raise ConfigError(
                f"normalize_activations must be one of {NORMALIZATIONS}, got {self.normalize_activations!r}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.k_aux is not None and self.k_aux < 1:
            raise ConfigError(f"k_aux must be a positive integer, got {self.k_aux!r}")


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
    if not isinstance(value, str) or like is None or isinstance(like, str):
        return value
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

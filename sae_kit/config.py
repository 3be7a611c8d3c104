"""Configuration dataclasses. The CLI, YAML/JSON files and the checkpoint's cfg.json read the same ones."""
from __future__ import annotations

import dataclasses
import json
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
    # Transcoders: the output hook's width (None: an SAE, which reconstructs its own input), and an
    # affine skip W_skip [d_out, d_in] beside the sparse path (skip transcoders, Paulo et al. 2025).
    d_out: int | None = None
    skip_connection: bool = False
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
        if self.d_out is not None and (not isinstance(self.d_out, int) or self.d_out < 1):
            raise ConfigError(f"d_out must be a positive integer (or None for an SAE), got {self.d_out!r}")
        if self.skip_connection and self.d_out is None:
            raise ConfigError("skip_connection is for transcoders: give the output width d_out (train with --targets)")
        if self.d_out is not None and self.normalize_activations not in (None, "none"):
            raise ConfigError("transcoders read and predict raw activations: use normalize_activations none")
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

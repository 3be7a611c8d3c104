"""What every format converter shares: the converted form, the sidecar, and normalisation mapping.

A converter turns a foreign checkpoint into a ``Converted`` (our cfg.json dict + our tensors), and
one of our SAEs into the foreign files. Foreign formats hold only the inference weights, so an
export also writes a sidecar, ``sae_kit.json`` (our cfg.json) and ``sae_kit_state.safetensors``
(our whole state, with what the format has no place for: dead-latent counters, EMA weights, GBA's
buffers, and the weights before any rescaling the format needed). Foreign tools ignore both files;
``import`` uses them only after checking that the foreign weights beside them are still exactly
what the sidecar's SAE exports to, so an export followed by an import gives back the same SAE bit
for bit.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_kit.config import DTYPES, ConfigError
from sae_kit.fileio import atomic_write
from sae_kit.sae import SAE, create_sae, sae_config_from_dict

SIDECAR_CONFIG = "sae_kit.json"
SIDECAR_STATE = "sae_kit_state.safetensors"


class FormatError(ConfigError):
    """A checkpoint cannot be converted: unreadable, or an architecture the target cannot express."""


@dataclass
class Converted:
    """Our cfg.json dict and the tensors of the SAE it describes (state not given stays at init)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)

    def build(self) -> SAE:
        """Our SAE in eval mode; state the conversion did not give keeps its initial value."""
        sae = create_sae(sae_config_from_dict(self.config))
        state = {name: t.detach().clone() for name, t in sae.state_dict().items()}
        for name, tensor in self.tensors.items():
            if name in sae.derived_tensors:
                continue
            if name not in state:
                raise FormatError(f"converted tensor {name!r} has no place in a {self.config['architecture']} SAE")
            if tensor.shape != state[name].shape:
                raise FormatError(f"converted tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(state[name].shape)}")
            state[name] = tensor.to(state[name].dtype)
        sae.load_tensors(state)
        return sae.eval()


def our_config(d_in: int, d_sae: int, architecture: str, *, k: int = 32, normalize: str = "none",
               dtype: str = "float32", metadata: dict[str, Any] | None = None, d_out: int | None = None,
               skip_connection: bool = False) -> dict[str, Any]:
    config = {"d_in": int(d_in), "d_sae": int(d_sae), "architecture": architecture, "k": int(k),
              "normalize_activations": normalize, "dtype": dtype, "metadata": dict(metadata or {})}
    if d_out is not None:  # a transcoder (sae_config_from_dict reads these keys)
        config.update(d_out=int(d_out), sae_kit={"transcoder": True, "skip_connection": bool(skip_connection)})
    return config


def dtype_name(tensor: torch.Tensor) -> str:
    """Our dtype string for a tensor; other dtypes (float64...) are converted to float32."""
    name = str(tensor.dtype).removeprefix("torch.")
    return name if name in DTYPES else "float32"


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FormatError(f"{path} not found: {what}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path} is not valid JSON ({exc}); re-export the checkpoint") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FormatError(f"{path} not found: {what}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{path} is not a readable safetensors file ({exc}); re-export the checkpoint") from None


def require(tensors: dict[str, torch.Tensor], names: tuple[str, ...], source: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise FormatError(f"{source} lacks tensor(s) {missing}; found {sorted(tensors)}")


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True)
    atomic_write(path, lambda p: Path(p).write_text(text))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


def write_sidecar(directory: Path, sae: SAE) -> None:
    """Our cfg.json and our whole state beside the foreign files, for an exact re-import."""
    write_safetensors(directory / SIDECAR_STATE, sae.tensors_to_save())
    write_json(directory / SIDECAR_CONFIG, sae.config_dict())


def write_export(out: Path, sae: SAE, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                 config_file: str, weights_file: str, sidecar: bool = True) -> Path:
    """One exported folder: the format's config and weights, plus our sidecar for exact round trips."""
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / weights_file, tensors)
    write_json(out / config_file, config)
    if sidecar:
        write_sidecar(out, sae)
    return out


def restore_from_sidecar(directory: Path, converted: Converted,
                         export_tensors: Callable[[SAE], dict[str, torch.Tensor]],
                         foreign: dict[str, torch.Tensor]) -> Converted:
    """Our exact SAE if a sidecar sits beside foreign weights that it still exports to bit for bit,
    else ``converted`` (with a note saying why the sidecar was not used)."""
    if not (directory / SIDECAR_CONFIG).is_file() or not (directory / SIDECAR_STATE).is_file():
        return converted
    try:
        config = read_json(directory / SIDECAR_CONFIG, "sidecar config")
        sae = create_sae(sae_config_from_dict(config))
        sae.load_tensors(read_safetensors(directory / SIDECAR_STATE, "sidecar state"), source=SIDECAR_STATE)
        again = export_tensors(sae)
    except (ConfigError, ValueError, TypeError) as exc:
        return replace_notes(converted, f"sidecar ignored: {exc}")
    same = set(again) == set(foreign) and all(
        again[n].dtype == foreign[n].dtype and torch.equal(again[n], foreign[n]) for n in foreign)
    if not same:
        return replace_notes(converted, "sidecar ignored: the weights changed since sae-kit exported them")
    derived = set(sae.derived_tensors)
    tensors = {n: t.detach().clone() for n, t in sae.tensors_to_save().items() if n not in derived}
    return Converted(config, tensors, ["restored exactly from the sae-kit sidecar"])


def replace_notes(converted: Converted, note: str) -> Converted:
    return Converted(converted.config, converted.tensors, converted.notes + [note])


def rescale_normalized_space(tensors: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """Re-express an SAE whose normalised input is ``factor`` × ours in our normalised space.

    With theirs x_s = factor·x_n: u = (x_s − b)·W_enc + b_enc = (x_n − b/factor)·(factor·W_enc) + b_enc,
    and their decode (z·W_dec + b)/factor in our space is z·(W_dec/factor) + b/factor. The latents
    are unchanged; only rounding differs.
    """
    out = dict(tensors)
    out["W_enc"] = tensors["W_enc"] * factor
    out["W_dec"] = tensors["W_dec"] / factor
    out["b_dec"] = tensors["b_dec"] / factor
    return out


def unbiased_layer_norm_factor(d_in: int) -> float:
    """SAELens' and OpenAI's layer norm divide by the unbiased std (ours: the biased one), so their
    normalised input is ours × sqrt((d−1)/d), up to where the 1e-5 epsilon sits: they add it to the
    unbiased std on the way in and leave it out on the way out, which moves a reconstruction by a
    relative ~1e-5/std (below float32 resolution for residual streams of std ≳ 1)."""
    return math.sqrt((d_in - 1) / d_in)


def fold_input_bias(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint that does not subtract b_dec from its input (u = x·W_enc + b_enc) in our form:
    u = (x − b_dec)·W_enc + (b_enc + b_dec·W_enc)."""
    out = dict(tensors)
    out["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    return out

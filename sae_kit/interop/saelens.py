"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (v6, and the flat pre-6 configs).

Same tensor names and orientations as ours (W_enc [d_in, d_sae], W_dec [d_sae, d_in]).

Export (ours → SAELens), inference-exact:
- ``topk`` → ``topk`` (rescale_acts_by_decoder_norm false); ``relu`` → ``standard``;
  ``abstopk`` with per-token selection → ``abstopk``;
- ``jumprelu`` → ``jumprelu`` (the same rule; θ ≥ 0 kept in fp32 by us, cast to the SAE's dtype);
- ``batchtopk``, ``matryoshka``, ``mutual_choice``, ``feature_choice`` → ``jumprelu`` with our inference threshold:
  SAELens computes relu(u)·1[u > θ], ours keeps relu(u) where relu(u) > θ, the same for every θ;
- ``gba`` → ``jumprelu`` with b_enc = 0, θ = −b·a and W_enc scaled by the per-latent scale a
  (the gate y0 > −b is y0·a > −b·a when a > 0; refused otherwise).
Our ``unit_norm`` inputs become SAELens' ``constant_norm_rescale`` (norm sqrt(d_in) instead of 1) with
the weights rescaled to match (common.rescale_normalized_space; the latents are the same).
Refused: ``topafa`` (a per-token k from the input norm), batch-level ``abstopk`` (a signed global
threshold on |u|), and our ``layer_norm`` inputs (SAELens' layer norm uses the unbiased std and a
differently placed epsilon).

Import (SAELens → ours): ``topk`` (decoder-norm rescaling folded into the weights), ``standard``
(ReLU) → ``relu``, ``jumprelu`` → ``jumprelu`` (its STE scale and bandwidth set from the median
threshold, for continued training), ``abstopk`` → ``abstopk``; input normalisation
``none``, ``expected_average_only_in`` (an identity in SAELens' inference forward), ``layer_norm`` and
``constant_norm_rescale`` are mapped onto ours (see common.rescale_normalized_space);
``apply_b_dec_to_input: false`` is folded into b_enc. Anything else is refused with its name.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sae_kit.interop.common import (
    write_export,
    Converted,
    FormatError,
    dtype_name,
    fold_input_bias,
    our_config,
    read_json,
    read_safetensors,
    require,
    rescale_normalized_space,
    restore_from_sidecar,
    unbiased_layer_norm_factor,
)
from sae_kit.sae import ARCHITECTURES, SAE
from sae_kit.sae.base import NotExportable

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The v6 layout we write; SAELens treats a config without a version as pre-6 and converts it.
FORMAT_VERSION = "6.0.0"


# ------------------------------------------------------------------------------------------ export
def export_config_and_tensors(sae: SAE) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = sae.cfg
    if cfg.normalize_activations == "layer_norm":
        raise FormatError(
            "SAELens cannot express this SAE's layer_norm input normalisation exactly (SAELens divides by the "
            "unbiased std and places the epsilon differently); train with --normalize none or unit_norm to export")
    base = {name: getattr(sae, name).detach().clone() for name in ("W_dec", "b_dec")}
    base["W_enc"] = sae.encoder_weight().detach().clone()
    base["b_enc"] = sae.b_enc.detach().clone()
    try:  # each architecture maps itself (SAE.saelens_export in its own file)
        saelens_arch, extra = sae.saelens_export(base)
    except NotExportable as exc:
        exportable = sorted(name for name, cls in ARCHITECTURES.items() if cls.saelens_export is not SAE.saelens_export)
        raise FormatError(f"{exc}; exportable: {', '.join(exportable)}") from None
    if sae.is_transcoder:
        saelens_arch, extra = transcoder_export(sae, saelens_arch, extra, base)
    normalize = "none"
    if cfg.normalize_activations == "unit_norm":
        # SAELens' constant_norm_rescale scales inputs to norm sqrt(d_in) where ours scales to 1.
        normalize = "constant_norm_rescale"
        base = rescale_normalized_space(base, 1 / math.sqrt(cfg.d_in))
    elif cfg.normalize_activations == "mean_norm":
        # SAELens sees the raw input: fold our one constant into the weights.
        base = rescale_normalized_space(base, 1 / float(sae.input_scale))
    metadata = {**cfg.metadata, "sae_lens_version": FORMAT_VERSION}
    config = {"architecture": saelens_arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype,
              "device": "cpu", "apply_b_dec_to_input": not sae.is_transcoder, "normalize_activations": normalize,
              "reshape_activations": "none", "metadata": metadata, **extra}
    return config, {name: t.contiguous() for name, t in base.items()}


# SAELens' transcoders: the ReLU and JumpReLU rules, each with or without W_skip.
TRANSCODERS = {"standard": ("transcoder", "skip_transcoder"), "jumprelu": ("jumprelu_transcoder", "jumprelu_skip_transcoder")}


def transcoder_export(sae: SAE, saelens_arch: str, extra: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """A transcoder as SAELens' (jumprelu_)(skip_)transcoder: d_out, W_dec [d_sae, d_out], b_dec [d_out],
    W_skip [d_out, d_in] applied as x·W_skipᵀ, no b_dec on the input; hook_name_out in the metadata."""
    if saelens_arch not in TRANSCODERS:
        raise FormatError(f"SAELens has ReLU and JumpReLU transcoders only; a {sae.cfg.architecture!r} transcoder "
                          f"computes {saelens_arch!r} (export a topk transcoder to sparsify instead)")
    if sae.cfg.skip_connection:
        tensors["W_skip"] = sae.W_skip.detach().clone()
    return TRANSCODERS[saelens_arch][sae.cfg.skip_connection], {**extra, "d_out": sae.d_out}


def export_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    return export_config_and_tensors(sae)[1]


def export(sae: SAE, out: Path, sidecar: bool = True) -> Path:
    config, tensors = export_config_and_tensors(sae)
    return write_export(out, sae, config, tensors, CONFIG_FILE, WEIGHTS_FILE, sidecar)


# ------------------------------------------------------------------------------------------ import
def upgrade_pre6(cfg: dict[str, Any]) -> dict[str, Any]:
    """Flat pre-6 configs (most Hub SAEs) in v6 terms, as SAELens' handle_pre_6_0_config reads them."""
    cfg = dict(cfg)
    for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index"),
                     ("activation_fn_str", "activation_fn")):
        if old in cfg and new not in cfg:
            cfg[new] = cfg.pop(old)
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("architecture", "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
    elif cfg["architecture"] == "standard" and cfg.get("activation_fn", "relu") != "relu":
        raise FormatError(f"pre-6 SAELens config with activation_fn={cfg['activation_fn']!r}: only relu and topk import")
    if isinstance(cfg.get("normalize_activations"), bool) or cfg.get("normalize_activations") is None:
        cfg["normalize_activations"] = "expected_average_only_in" if cfg.get("normalize_activations") else "none"
    metadata = dict(cfg.get("metadata") or {})
    for key in ("model_name", "hook_name", "hook_head_index", "context_size", "dataset_path", "prepend_bos",
                "neuronpedia_id", "sae_lens_training_version"):
        if key in cfg and key not in metadata and cfg[key] is not None:
            metadata[key] = cfg[key]
    cfg["metadata"] = metadata
    return cfg


def is_pre6(cfg: dict[str, Any]) -> bool:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if not version:
        return True
    try:
        return int(str(version).split(".")[0]) < 6
    except ValueError:
        return True


def convert(path: Path) -> tuple[Converted, dict[str, torch.Tensor]]:
    cfg = read_json(path / CONFIG_FILE, f"a SAELens folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    foreign = read_safetensors(path / WEIGHTS_FILE, f"a SAELens folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    if is_pre6(cfg):
        cfg = upgrade_pre6(cfg)
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise FormatError(f"{path / CONFIG_FILE}: {key} must be an integer, got {cfg.get(key)!r}")
    foreign_arch = cfg.get("architecture")  # SAELens' names (topk, abstopk, standard, jumprelu), not ours
    if cfg.get("reshape_activations", "none") != "none":
        raise FormatError(f"{path}: reshape_activations={cfg['reshape_activations']!r} (hook_z SAEs) is not supported; "
                          "our SAEs read flat [tokens, d_in] activations")
    # A transcoder is its encoder's rule plus d_out (and W_skip): import the rule, then the output side.
    transcoder = next((rule for rule, names in TRANSCODERS.items() if foreign_arch in names), None)
    skip = transcoder is not None and "skip" in foreign_arch
    if transcoder is not None:
        if not isinstance(cfg.get("d_out"), int) or cfg.get("normalize_activations", "none") != "none":
            raise FormatError(f"{path / CONFIG_FILE}: a {foreign_arch} needs an integer d_out and no input normalisation")
        foreign_arch = transcoder
    require(foreign, ("W_enc", "W_dec", "b_dec") + (("W_skip",) if skip else ()), path / WEIGHTS_FILE)
    tensors = {name: foreign[name].clone() for name in ("W_enc", "W_dec", "b_dec")}
    tensors["b_enc"] = foreign["b_enc"].clone() if "b_enc" in foreign else torch.zeros(cfg["d_sae"], dtype=foreign["W_enc"].dtype)
    for legacy in ("scaling_factor", "finetuning_scaling_factor"):
        if legacy in foreign and not bool((foreign[legacy] == 1).all()):
            raise FormatError(f"{path}: legacy tensor {legacy!r} is not all ones; load it in SAELens and save it again "
                              "(SAELens folds it into the weights) before importing")
    notes: list[str] = []
    options: dict[str, Any] = {}
    if foreign_arch == "topk":
        ours, k = "topk", int(cfg.get("k", 32))
        if cfg.get("rescale_acts_by_decoder_norm"):
            norms = tensors["W_dec"].norm(dim=1)
            tensors["W_enc"] = tensors["W_enc"] * norms
            tensors["b_enc"] = tensors["b_enc"] * norms
            tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
            notes.append("rescale_acts_by_decoder_norm folded into W_enc/b_enc/W_dec")
    elif foreign_arch == "abstopk":
        ours, k = "abstopk", int(cfg.get("k", 32))
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise FormatError(f"{path}: abstopk with rescale_acts_by_decoder_norm is not supported")
    elif foreign_arch == "standard":
        ours, k = "relu", 32
    elif foreign_arch == "jumprelu":
        require(foreign, ("threshold",), path / WEIGHTS_FILE)
        ours, k = "jumprelu", int(cfg.get("k", 32))
        threshold = foreign["threshold"].float()
        if bool((threshold < 0).any()):
            # SAELens gates on θ.relu(); ours keeps θ >= 0 (a negative θ is the same gate as 0).
            threshold = threshold.clamp_min(0)
            notes.append("negative thresholds clamped to 0 (SAELens gates on threshold.relu())")
        tensors["threshold"] = threshold
        # For continued training: the STE's scale s and bandwidth from the thresholds (jumprelu.py).
        positive = threshold[threshold > 0]
        scale = float(positive.median()) if positive.numel() else 1.0
        tensors["data_scale"] = torch.tensor(scale, dtype=torch.float32)
        tensors["bandwidth"] = torch.tensor(0.1 * scale, dtype=torch.float32)
    else:
        raise FormatError(f"{path}: SAELens architecture {foreign_arch!r} has no sae-kit counterpart; "
                          "importable: topk, abstopk, standard, jumprelu and the four transcoders")
    if transcoder is not None:
        if skip:
            tensors["W_skip"] = foreign["W_skip"].clone()
        # Continued training renormalises decoder rows to this norm (base.py); SAELens keeps them as they are.
        tensors["decoder_norm"] = foreign["W_dec"].float().norm(dim=1).mean()
    elif not cfg.get("apply_b_dec_to_input", True):
        tensors = fold_input_bias(tensors)
        notes.append("apply_b_dec_to_input=false folded into b_enc")
    normalize = cfg.get("normalize_activations", "none")
    if normalize in ("none", "expected_average_only_in"):
        ours_norm = "none"
    elif normalize == "layer_norm":
        ours_norm = "layer_norm"
        tensors = rescale_normalized_space(tensors, unbiased_layer_norm_factor(cfg["d_in"]))
        notes.append("layer_norm (unbiased std) mapped onto ours (biased std) by rescaling the weights")
    elif normalize == "constant_norm_rescale":
        ours_norm = "unit_norm"
        tensors = rescale_normalized_space(tensors, math.sqrt(cfg["d_in"]))
        notes.append("constant_norm_rescale (norm sqrt(d_in)) mapped onto unit_norm by rescaling the weights")
    else:
        raise FormatError(f"{path}: normalize_activations={normalize!r} is not supported")
    config = our_config(cfg["d_in"], cfg["d_sae"], ours, k=k, normalize=ours_norm,
                        dtype=dtype_name(foreign["W_enc"]), metadata=cfg.get("metadata") or {},
                        d_out=cfg["d_out"] if transcoder is not None else None, skip_connection=skip)
    config["metadata"].pop("sae_lens_version", None)
    config["sae_kit"] = {**config.get("sae_kit", {}), "options": options}
    return Converted(config, tensors, notes), foreign


def load(path: Path) -> Converted:
    converted, foreign = convert(path)
    return restore_from_sidecar(path, converted, export_tensors, foreign)

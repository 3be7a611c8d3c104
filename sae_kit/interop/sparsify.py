"""EleutherAI sparsify folders: ``cfg.json`` + ``sae.safetensors`` (``SparseCoder.save_to_disk``).

sparsify's SAE: u = relu((x − b_dec)·encoder.weightᵀ + encoder.bias), the top k of u, then
x̂ = Σ z_j·W_dec[j] + b_dec. ``W_dec`` is [num_latents, d_in] — latents are rows, the same
orientation as ours, so it is *not* transposed — and b_dec is subtracted from the input whenever
the coder is not a transcoder, whatever ``normalize_decoder`` says. (SAELens' own sparsify loader
transposes W_dec and ties the b_dec subtraction to normalize_decoder; both are wrong and not copied.)
Taking the top k of relu(u) or relu of the top k of u keeps the same values, so our ``topk`` SAE
is the same function.

Transcoders (``transcode: true``): the encoder reads x as is, the decoder predicts the hooked module's
output, and ``skip_connection: true`` adds x·W_skipᵀ with W_skip [d_in, d_in] (sparsify's transcoders
have d_out = d_in). Both directions: our ``topk`` transcoders with d_out = d_in export, sparsify
transcoders import (hook names from the hookpoint: ``layers.N.mlp`` reads ``blocks.N.mlp.hook_in`` and
writes ``blocks.N.hook_mlp_out``).

Export: only ``topk`` SAEs without input normalisation; sparsify has no thresholds, biases adapted
by a rule (GBA), signed codes, per-token k or input normalisation, so everything else is refused.
Import: ``activation: topk`` SAEs and transcoders, including the first 2024 layout (``W_enc``
[d_in, d_sae], ``b_enc``); GroupMax and signed coders are refused. ``multi_topk``
only changes sparsify's training loss and imports as plain TopK.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from sae_kit.interop.common import (
    write_export,
    Converted,
    FormatError,
    dtype_name,
    our_config,
    read_json,
    read_safetensors,
    require,
    restore_from_sidecar,
)
from sae_kit.sae import SAE

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def export_config_and_tensors(sae: SAE) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = sae.cfg
    if not sae.sparsify_exportable:
        raise FormatError(
            f"sparsify cannot express a {cfg.architecture!r} SAE: its only sparsifier is a per-token TopK (or GroupMax) "
            "with no thresholds, adapted biases or signed codes; export it to SAELens instead, or train --arch topk")
    if cfg.normalize_activations != "none":
        raise FormatError(f"sparsify has no input normalisation, and this SAE uses {cfg.normalize_activations!r}; "
                          "train with --normalize none to export to sparsify")
    if sae.is_transcoder and sae.d_out != cfg.d_in:
        raise FormatError(f"sparsify's transcoders predict an output as wide as their input; this one maps "
                          f"{cfg.d_in} -> {sae.d_out} (export it to SAELens instead)")
    config = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in),
              "normalize_decoder": not sae.is_transcoder, "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False,
              "skip_connection": cfg.skip_connection, "transcode": sae.is_transcoder, "d_in": cfg.d_in}
    tensors = {
        "encoder.weight": sae.W_enc.detach().T.contiguous(),
        "encoder.bias": sae.b_enc.detach().clone(),
        "W_dec": sae.W_dec.detach().clone(),
        "b_dec": sae.b_dec.detach().clone(),
    }
    if cfg.skip_connection:
        tensors["W_skip"] = sae.W_skip.detach().clone()
    return config, tensors


def export_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    return export_config_and_tensors(sae)[1]


def export(sae: SAE, out: Path, sidecar: bool = True) -> Path:
    config, tensors = export_config_and_tensors(sae)
    return write_export(out, sae, config, tensors, CONFIG_FILE, WEIGHTS_FILE, sidecar)


def hook_name_for(folder: str) -> str | None:
    """sparsify's hookpoints are HF module names; ``layers.N`` is decoder block N's output."""
    match = re.fullmatch(r"(?:model\.)?layers\.(\d+)", folder)
    return f"blocks.{match.group(1)}.hook_resid_post" if match else None


def transcoder_hooks_for(folder: str) -> dict[str, str]:
    """A transcoder on ``layers.N.mlp`` reads the MLP's input and predicts its output (bridge names)."""
    match = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.mlp", folder)
    return {"hook_name": f"blocks.{match.group(1)}.mlp.hook_in",
            "hook_name_out": f"blocks.{match.group(1)}.hook_mlp_out"} if match else {}


def convert(path: Path) -> tuple[Converted, dict[str, torch.Tensor]]:
    what = f"a sparsify folder needs {CONFIG_FILE} and {WEIGHTS_FILE}"
    cfg = read_json(path / CONFIG_FILE, what)
    foreign = read_safetensors(path / WEIGHTS_FILE, what)
    if cfg.get("signed"):
        raise FormatError(f"{path}: signed=true is not supported (signed codes)")
    transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    if cfg.get("activation", "topk") != "topk":
        raise FormatError(f"{path}: activation={cfg['activation']!r} is not supported; only topk imports")
    if not isinstance(cfg.get("d_in"), int) or not isinstance(cfg.get("k", 32), int):
        raise FormatError(f"{path / CONFIG_FILE}: d_in and k must be integers")
    if "encoder.weight" in foreign:
        require(foreign, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path / WEIGHTS_FILE)
        W_enc, b_enc = foreign["encoder.weight"].T.contiguous(), foreign["encoder.bias"].clone()
    else:  # the first (June 2024) layout
        require(foreign, ("W_enc", "b_enc", "W_dec", "b_dec"), path / WEIGHTS_FILE)
        W_enc, b_enc = foreign["W_enc"].clone(), foreign["b_enc"].clone()
    d_in = cfg["d_in"]
    d_sae = W_enc.shape[1]
    if W_enc.shape[0] != d_in or foreign["W_dec"].shape != (d_sae, d_in):
        raise FormatError(f"{path / WEIGHTS_FILE}: encoder {tuple(W_enc.shape)} / W_dec {tuple(foreign['W_dec'].shape)} "
                          f"do not fit d_in={d_in}")
    metadata: dict[str, Any] = {"sparsify_hookpoint": path.name}
    hook = hook_name_for(path.name)
    if hook:
        metadata["hook_name"] = hook
    if transcode:
        metadata.update(transcoder_hooks_for(path.name))
    notes = ["multi_topk only shapes sparsify's training loss; imported as TopK"] if cfg.get("multi_topk") else []
    config = our_config(d_in, d_sae, "topk", k=cfg.get("k", 32), dtype=dtype_name(W_enc), metadata=metadata,
                        d_out=d_in if transcode else None, skip_connection=skip)
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": foreign["W_dec"].clone(), "b_dec": foreign["b_dec"].clone()}
    if skip:
        require(foreign, ("W_skip",), path / WEIGHTS_FILE)
        if foreign["W_skip"].shape != (d_in, d_in):
            raise FormatError(f"{path / WEIGHTS_FILE}: W_skip {tuple(foreign['W_skip'].shape)} is not [{d_in}, {d_in}]")
        tensors["W_skip"] = foreign["W_skip"].clone()
    if transcode:
        # sparsify does not renormalise a transcoder's decoder: continued training keeps rows at their mean norm.
        tensors["decoder_norm"] = foreign["W_dec"].float().norm(dim=1).mean()
        if not transcoder_hooks_for(path.name):
            notes.append(f"hookpoint {path.name!r} is not layers.N.mlp: set hook_name/hook_name_out in cfg.json")
    elif skip:
        raise FormatError(f"{path}: skip_connection=true without transcode is not supported")
    return Converted(config, tensors, notes), foreign


def load(path: Path) -> Converted:
    converted, foreign = convert(path)
    return restore_from_sidecar(path, converted, export_tensors, foreign)

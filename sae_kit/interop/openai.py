"""OpenAI sparse_autoencoder checkpoints (``Autoencoder.state_dict()`` saved with ``torch.save``).

Read with ``torch.load(weights_only=True)``: the file holds tensors plus the plain entries
``activation`` ("TopK" / "ReLU" / "Identity") and ``activation_state_dict`` ({"k", "postact_fn"}),
which the restricted unpickler accepts; anything else in the pickle is refused unexecuted.

OpenAI's model: latents = act(encoder(x − pre_bias) + latent_bias), recons = decoder(latents) + pre_bias,
with ``encoder.weight`` [n_latents, d_model] and ``decoder.weight`` [d_model, n_latents]. TopK
checkpoints also layer-norm each input (x − μ)/(σ + 1e-5) with the *unbiased* σ, and multiply the
reconstruction back by σ and add μ. Ours uses the biased σ, so the import rescales the weights by
sqrt((d−1)/d) (common.rescale_normalized_space): the latents are the same and reconstructions agree
up to the epsilon's placement (relative ~1e-5/σ). ReLU checkpoints (v1/v4) have no normalisation and
map exactly onto our ``relu`` SAE. Identity activations and TopK with an identity post-activation
(signed codes) are refused.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from sae_kit.interop.common import (
    Converted,
    FormatError,
    dtype_name,
    our_config,
    rescale_normalized_space,
    unbiased_layer_norm_factor,
)


def read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise FormatError(f"{path} not found: pass an OpenAI autoencoder .pt file (a saved state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FormatError(f"{path} holds objects other than tensors and plain values, which are never unpickled "
                          f"here ({str(exc).splitlines()[0]}); save the autoencoder's state_dict() instead") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise FormatError(f"{path} is not a readable torch checkpoint ({exc})") from None
    if not isinstance(state, dict):
        raise FormatError(f"{path} holds a {type(state).__name__}, expected an autoencoder state dict")
    return state


def load(path: Path) -> Converted:
    state = read_state_dict(path)
    for key in ("encoder.weight", "pre_bias", "latent_bias"):
        if not torch.is_tensor(state.get(key)):
            raise FormatError(f"{path} lacks tensor {key!r}; found {sorted(state)}")
    encoder = state["encoder.weight"]
    decoder = state.get("decoder.weight")
    if decoder is None and torch.is_tensor(state.get("decoder.linear.weight")):  # a tied autoencoder
        decoder = state["decoder.linear.weight"].T
    if decoder is None:
        raise FormatError(f"{path} lacks tensor 'decoder.weight'; found {sorted(state)}")
    n_latents, d_model = encoder.shape
    if decoder.shape != (d_model, n_latents):
        raise FormatError(f"{path}: decoder.weight has shape {tuple(decoder.shape)}, expected {(d_model, n_latents)}")
    tensors = {"W_enc": encoder.T.contiguous(), "b_enc": state["latent_bias"].clone(),
               "W_dec": decoder.T.contiguous(), "b_dec": state["pre_bias"].clone()}
    activation = state.get("activation", "ReLU")
    notes: list[str] = []
    if activation == "TopK":
        settings = state.get("activation_state_dict") or {}
        if "k" not in settings:
            raise FormatError(f"{path}: a TopK checkpoint needs activation_state_dict['k']")
        if settings.get("postact_fn", "ReLU") != "ReLU":
            raise FormatError(f"{path}: TopK with postact_fn={settings['postact_fn']!r} (signed codes) is not supported")
        architecture, k, normalize = "topk", int(settings["k"]), "layer_norm"
        tensors = rescale_normalized_space(tensors, unbiased_layer_norm_factor(d_model))
        notes.append("OpenAI's layer norm (unbiased std) mapped onto ours by rescaling the weights")
    elif activation == "ReLU":
        architecture, k, normalize = "relu", 32, "none"
    else:
        raise FormatError(f"{path}: activation {activation!r} is not supported; OpenAI TopK and ReLU autoencoders import")
    config = our_config(d_model, n_latents, architecture, k=k, normalize=normalize, dtype=dtype_name(encoder),
                        metadata={"source": f"openai:{path.name}"})
    return Converted(config, tensors, notes)

"""A language model cut at one residual-stream point: run the shared prefix once, the suffix per variant.

Evaluating interventions at ``blocks.L.hook_resid_post`` (clean, SAE-spliced, zero- and mean-ablated)
runs blocks 0..L identically for every variant: ``ResidualSplit.prefix`` runs them once and returns
the residual there (float32 ``[batch, pos, d_model]``, what a replacement function sees), and
``ResidualSplit.suffix`` continues from an (edited) residual to the logits, running blocks L+1.. and
the unembedding only.

Supported cut points: ``blocks.L.hook_resid_post`` and ``blocks.L.hook_resid_pre`` (L >= 1, the same
point as ``blocks.{L-1}.hook_resid_post``), on a HookedTransformer (its ``stop_at_layer`` /
``start_at_layer``) and on a bridged HF model with an unwrapped twin (the twin's decoder blocks, where
blocks 0..L stand aside for the suffix). ``split_at`` returns None for anything else (other hooks, a
bridge without twin): callers fall back to full forward passes.

A transcoder (reads at an input hook, writes at an output hook of the same or a later layer) fits the
same way: the prefix also records its input hook, and its write is expressed as an edit of the
residual at the cut (``blocks.L.hook_mlp_out`` replaced by y is ``resid_mid_L + y`` at resid_post L).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from sae_kit.language_model import _KIND_BRIDGE, _KIND_HOOKED, LanguageModel, _decoder_layers

_RESIDUAL = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


class _StopForward(Exception):
    pass


class ResidualSplit:
    """``prefix(tokens) -> residual`` after block ``layer``; ``suffix(tokens, residual) -> logits``."""

    def __init__(self, model: LanguageModel, layer: int):
        self.model, self.layer = model, layer

    def prefix(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def suffix(self, tokens: Tensor, residual: Tensor) -> Tensor:
        raise NotImplementedError


class _HookedTransformerSplit(ResidualSplit):
    def prefix(self, tokens: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model.model(tokens, stop_at_layer=self.layer + 1).to(torch.float32)

    def suffix(self, tokens: Tensor, residual: Tensor) -> Tensor:
        dtype = next(self.model.model.parameters()).dtype
        with torch.no_grad():
            return self.model.model(residual.to(dtype), start_at_layer=self.layer + 1).to(torch.float32)


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder block whose output the suffix already has."""

    def __init__(self, output: Tensor | None = None):
        super().__init__()
        self.output = output

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states if self.output is None else self.output


class _HFTwinSplit(ResidualSplit):
    """On the bridge's unwrapped HF twin (same weights): a forward hook stops the prefix after block
    L; for the suffix blocks 0..L are swapped for stand-ins (the last one returns the residual), so the
    model still builds its own masks and position embeddings."""

    def __init__(self, model: LanguageModel, layer: int, layers: torch.nn.ModuleList):
        super().__init__(model, layer)
        self.twin, self.layers = model._generation_model, layers

    def prefix(self, tokens: Tensor) -> Tensor:
        seen: list[Tensor] = []

        def stop(module, args, output):
            seen.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        handle = self.layers[self.layer].register_forward_hook(stop)
        try:
            with torch.no_grad():
                self.twin(input_ids=tokens, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not seen:
            raise RuntimeError(f"block {self.layer} of {self.model.name} did not run")
        return seen[0].to(torch.float32)

    def suffix(self, tokens: Tensor, residual: Tensor) -> Tensor:
        originals = [self.layers[i] for i in range(self.layer + 1)]
        dtype = next(self.twin.parameters()).dtype
        try:
            for i in range(self.layer):
                self.layers[i] = _PassThrough()
            self.layers[self.layer] = _PassThrough(residual.to(dtype))
            with torch.no_grad():
                output = self.twin(input_ids=tokens, use_cache=False)
        finally:
            for i, block in enumerate(originals):
                self.layers[i] = block
        return getattr(output, "logits", output).to(torch.float32)


def split_at(model: LanguageModel, hook: str) -> ResidualSplit | None:
    """The model cut at ``hook``, or None where only full forward passes can evaluate it."""
    match = _RESIDUAL.match(hook)
    if match is None:
        return None
    layer = int(match.group(1)) - (match.group(2) == "pre")
    if layer < 0:
        return None  # blocks.0.hook_resid_pre is the embedding: nothing to share
    if model._kind == _KIND_HOOKED:
        return _HookedTransformerSplit(model, layer)
    if model._kind == _KIND_BRIDGE:
        layers = _decoder_layers(model._generation_model, model.n_layers)
        if layers is not None:
            return _HFTwinSplit(model, layer, layers)
    return None

"""Consistency under an undesirable update ("Learning from the undesirable" (LfU), representation-
steering variant).

LfU builds an auxiliary model by one *normalised gradient-ascent* step on the training loss
(θ_aux = θ + α·∇/‖∇‖, through LoRA or a shared steering vector "RepS") and adds a consistency term
between the internal representations of θ and θ_aux, so the model becomes robust to updates that make
it worse.

SAE adaptation [plugins.md B23; our choices marked]: the steering vector is a shift δ ∈ R^{d_sae} of
the pre-activations u (equivalently of b_enc). Its ascent direction is exact and cheap:
g = ∂L_rec/∂δ = Σ_b ∂L_rec/∂u_b, which only the selected latents receive, so it is the gradient of
the reconstruction loss with respect to the selected codes, scattered onto their latents
(``torch.autograd.grad`` with the graph kept). Then

    δ* = radius · g / ‖g‖,   radius = alpha · rms(u) · √d_sae   [ours: the shift's rms per latent is alpha·rms(u)]
    z' = select(u + δ*)      (the SAE's own rule, its running statistics left untouched)
    ℓ_cons = Σ_b ‖z_b − z'_b‖² / Σ_b ‖z_b‖²   (‖z‖² detached)

added with weight ``coefficient``. Gradients reach the SAE through both branches (z and z' are
gathered from the same encoder); δ* itself is a constant, as LfU's ascent step is. The squared
distance between two sparse codes is computed on the supports (‖z‖² + ‖z'‖² − 2⟨z, z'⟩), never densely.

Defaults [chosen]: ``alpha=0.05``, ``coefficient=0.1``. The low-rank (LoRA-like ΔW_enc) variant is
not implemented.

Measured [ablations/lfu-topk.json; `sae-kit ablate --plugin lfu --data synthetic --seeds 3`: topk,
planted sharkey d=64, d_sae 512, k 5, 500 steps over a finite cache of 8192 tokens]: held-out FVU
0.4204 → 0.4098 (paired difference −0.0106 ± 0.0015; "helps"), FRR@0.9 0.106 → 0.122, dead fraction
0.089 → 0.108.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError
from sae_kit.plugins.api import Ablation, Plugin, StepContext, option


@contextmanager
def untouched_buffers(module: torch.nn.Module) -> Iterator[None]:
    """Restore every buffer afterwards: an extra selection must not move thresholds or frequencies."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def sparse_squared_distance(a: SparseCodes, b: SparseCodes) -> torch.Tensor:
    """Per token ‖a − b‖² [B] from the padded supports (padding has value 0 and adds nothing)."""
    same = a.indices.unsqueeze(2) == b.indices.unsqueeze(1)  # [B, K, K']
    dot = (a.values.unsqueeze(2) * b.values.unsqueeze(1) * same).sum((1, 2))
    return a.values.pow(2).sum(1) + b.values.pow(2).sum(1) - 2 * dot


def ascent_direction(loss: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
    """∂loss/∂δ for a shift δ [d_sae] of the pre-activations: the code gradient scattered onto latents."""
    (gradient,) = torch.autograd.grad(loss, codes.values, retain_graph=True)
    direction = torch.zeros(codes.d_sae, dtype=gradient.dtype, device=gradient.device)
    return direction.index_add_(0, codes.indices.flatten(), (gradient * codes.active).flatten())


def shifted_codes(sae, out, shift: torch.Tensor) -> SparseCodes:
    """The SAE's codes for pre-activations u + shift, values with gradients to the SAE's weights."""
    with torch.no_grad(), untouched_buffers(sae):
        selected = sae.select(out.pre_activations.detach() + shift, out.x_n)
    gathered = out.gather_pre(selected.indices) + shift[selected.indices]
    return SparseCodes(selected.indices, sae.code_values(gathered, selected), selected.d_sae)


class LfU(Plugin):
    name = "lfu"
    paper = "Learning from the undesirable (LfU)"
    summary = "loss: codes consistent under a normalised gradient-ascent shift of the pre-activations"
    # The paper's regime: limited data, seen for many epochs.
    ablation = Ablation(metric="fvu", cache_tokens=8192)

    @dataclass
    class Options:
        coefficient: float = option(0.1, "weight λ of the consistency term")
        alpha: float = option(0.05, "ascent step: the shift's rms per latent, as a fraction of rms(u)")

    def validate(self) -> None:
        if self.opts.coefficient < 0 or self.opts.alpha < 0:
            raise ConfigError("lfu: coefficient and alpha must be >= 0")

    def undesirable_shift(self, out) -> torch.Tensor:
        g = ascent_direction(out.parts["reconstruction"], out.codes).detach()
        norm = g.norm()
        if norm == 0:
            return g
        radius = self.opts.alpha * out.pre_activations.detach().pow(2).mean().sqrt() * math.sqrt(g.numel())
        return radius * g / norm

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.out
        shift = self.undesirable_shift(out)
        perturbed = shifted_codes(ctx.sae, out, shift)
        distance = sparse_squared_distance(out.codes, perturbed).sum()
        consistency = distance / out.codes.values.detach().pow(2).sum().clamp_min(1e-12)
        ctx.logs["lfu/consistency"] = consistency.item()
        return {"consistency": self.opts.coefficient * consistency}

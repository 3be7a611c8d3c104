"""ReLU + L1 baseline ("standard" SAE, Bricken et al. 2023 / SAELens).

z = ReLU(u); the sparsity penalty is λ·mean_b Σ_j z_j·||W_dec,j||, divided by sqrt(input variance)
so λ is independent of the activations' scale (the reconstruction term is already normalised).
With ``target_l0`` set, λ is a controlled variable instead (dual ascent on the constraint
mean L0 = target): after every training batch λ is multiplied by (L0_batch / target)^rate, clipped
to a factor in [0.9, 1.1]; ``l1_coefficient`` is then its starting value. ``sparsity_settings``
uses this, so "ReLU at L0 ≈ N" needs no sweep over λ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_kit.codes import SparseCodes
from sae_kit.sae.base import SAE, TrainingOutput, register


@dataclass
class ReluOptions:
    l1_coefficient: float = 0.1
    target_l0: float | None = None
    l1_control_rate: float = 0.05


@register
class ReluSAE(SAE):
    architecture = "relu"
    # Every positive pre-activation is a code: nothing to gain from the sparse kernels.
    sparse_training = False
    uses_k = False
    Options = ReluOptions
    # Unit-normed inputs: b_enc is a threshold on the inputs' scale and Adam moves it by ~lr per step,
    # so without normalisation activations ×100 train a different SAE (measured: L0 0.7 vs 58).
    default_normalization = "unit_norm"

    def saelens_export(self, tensors):
        return "standard", {}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("l1_scale", torch.ones((), dtype=torch.float64))

    @classmethod
    def sparsity_settings(cls, target_l0: int) -> dict:
        return {"options": {"target_l0": float(target_l0)}}

    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        acts = pre.relu()
        return SparseCodes.from_mask(acts, acts > 0)

    def auxiliary_losses(self, out: TrainingOutput, input_variance) -> dict[str, torch.Tensor]:
        norms = self.W_dec.norm(dim=1)
        l1 = (out.codes.values.abs() * norms[out.codes.indices]).sum(dim=1).mean()
        if not torch.is_tensor(input_variance):
            input_variance = torch.tensor(float(input_variance))
        if self.training and self.opts.target_l0:
            with torch.no_grad():
                ratio = out.codes.l0().double().mean().clamp_min(1e-3) / self.opts.target_l0
                self.l1_scale *= ratio.pow(self.opts.l1_control_rate).clamp(0.9, 1.1)
        coefficient = self.opts.l1_coefficient * float(self.l1_scale)
        return {"l1": coefficient * l1 / input_variance.sqrt()}

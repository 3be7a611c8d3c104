"""ReLU + L1 baseline ("standard" SAE, Bricken et al. 2023 / SAELens).

z = ReLU(u); the sparsity penalty is λ·mean_b Σ_j z_j·||W_dec,j||, divided by sqrt(input variance)
so λ is independent of the activations' scale (the reconstruction term is already normalised).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_kit.codes import SparseCodes
from sae_kit.sae.base import SAE, TrainingOutput, register


@dataclass
class ReluOptions:
    l1_coefficient: float = 0.1


@register
class ReluSAE(SAE):
    architecture = "relu"
    # Every positive pre-activation is a code: nothing to gain from the sparse kernels.
    sparse_training = False
    uses_k = False

    def saelens_export(self, tensors):
        return "standard", {}
    Options = ReluOptions

    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        acts = pre.relu()
        return SparseCodes.from_mask(acts, acts > 0)

    def auxiliary_losses(self, out: TrainingOutput, input_variance) -> dict[str, torch.Tensor]:
        norms = self.W_dec.norm(dim=1)
        l1 = (out.codes.values.abs() * norms[out.codes.indices]).sum(dim=1).mean()
        if not torch.is_tensor(input_variance):
            input_variance = torch.tensor(float(input_variance))
        return {"l1": self.opts.l1_coefficient * l1 / input_variance.sqrt()}

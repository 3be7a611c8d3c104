"""top-AFA SAE (Lee, Davies, Canby & Hockenmaier 2025): k per token from the input's norm.

Under ε-quasi-orthogonal decoder directions ||x|| ≈ ||f||, so each token keeps the shortest prefix
of its activations (ranked by a_i·||W_dec,i||) whose norm is nearest to ||x_n − b_dec||
(the reference code's "nearest index" rule; the last prefix norm is forced to 1e4 so the search
always ends). There is no k hyperparameter and inference equals training.
Losses, following SewoongLee/top-afa-sae: reconstruction + AuxK + L_AFA, with
L_AFA = λ·mean_b(||z_b|| − ||x_b||)² (λ = ``afa_coefficient`` = 1/32, the paper's best). We divide
L_AFA by the per-dimension input variance so the balance against our normalised MSE matches the
reference's on standardised inputs at any scale. As in the reference, there is no encoder bias
(b_enc stays zero) and inputs are layer-normed by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_kit.codes import SparseCodes
from sae_kit.sae.base import SAE, TrainingOutput, register

LAST_PREFIX_NORM = 1e4


@dataclass
class TopAFAOptions:
    afa_coefficient: float = 1 / 32


def afa_select(acts: torch.Tensor, decoder_norms: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token, keep the prefix of activations whose norm is nearest ``target``.

    ``acts`` [B, F] >= 0, ``decoder_norms`` [F], ``target`` [B]. Returns (indices [B, K], values
    [B, K] with zeros past each token's k, k [B]) with K = max k.
    """
    contributions = (acts * decoder_norms).pow(2)
    sorted_contrib, order = contributions.sort(dim=1, descending=True)
    prefix_norms = sorted_contrib.cumsum(dim=1).sqrt()
    prefix_norms[:, -1] = LAST_PREFIX_NORM
    k = (prefix_norms - target[:, None]).abs().argmin(dim=1) + 1
    width = int(k.max().item())
    indices = order[:, :width]
    keep = torch.arange(width, device=acts.device)[None, :] < k[:, None]
    values = acts.gather(1, indices) * keep.to(acts.dtype)
    return indices, values, k


@register
class TopAFASAE(SAE):
    architecture = "topafa"
    uses_k = False
    Options = TopAFAOptions
    default_normalization = "layer_norm"
    trains_encoder_bias = False

    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        target = (x_n - self.b_dec).norm(dim=1).detach()
        norms = self.W_dec.detach().norm(dim=1)
        indices, values, _ = afa_select(pre.relu(), norms, target)
        return SparseCodes(indices, values, self.cfg.d_sae)

    def auxiliary_losses(self, out: TrainingOutput, input_variance) -> dict[str, torch.Tensor]:
        per_dimension_variance = input_variance / self.cfg.d_in
        gap = out.codes.values.norm(dim=1) - out.x_n.norm(dim=1)
        losses = {"afa": self.opts.afa_coefficient * gap.pow(2).mean() / per_dimension_variance}
        losses.update(self.dead_latent_loss(out))
        return losses

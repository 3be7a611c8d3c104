"""Feature Choice SAE (Ayonrinde 2024): each latent picks the tokens it fires on.

Training: latent j keeps its m_j largest positive activations over the batch's tokens (a token may
get any number of latents, including none). Capacities:
- ``uniform``: m = max(1, round(k·B / d_sae)), so the budget is k·B up to rounding;
- ``zipf``: m_j = k·B · ρ̂(rank_j) with the Zipf profile of zipf.py and ranks from the EMA densities
  (clipped to [1, B]); before any density is known ranks follow latent order.
Inference [unverified in the paper; our choice]: per-latent thresholds θ_j, a bias-corrected EMA of
the m_j-th largest activation per batch, applied JumpReLU-style: z_j = a_j·1[a_j > θ_j].
Auxiliary loss: aux_zipf_loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sae_kit import data_parallel
from sae_kit.codes import SparseCodes
from sae_kit.config import SAEConfig
from sae_kit.sae.base import SAE, register
from sae_kit.sae.zipf import ZipfAuxMixin, ZipfOptions, density_ranks, zipf_profile


@dataclass
class FeatureChoiceOptions(ZipfOptions):
    capacity: Literal["uniform", "zipf"] = "uniform"
    # Feature Choice keeps the earlier aux_zipf: with the fitted target and dead-first slots its L0
    # on SmolLM2 fell to 0.50-0.67x of k (blocks.6/20, x100 scale; docs/no_collapse.md).
    target: Literal["fitted", "normalised"] = "normalised"
    dead_first: bool = False


@register
class FeatureChoiceSAE(ZipfAuxMixin, SAE):
    architecture = "feature_choice"
    saelens_export = SAE.saelens_threshold_export
    Options = FeatureChoiceOptions
    feature_major_pre_activations = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_threshold()

    def capacities(self, batch_size: int) -> torch.Tensor:
        budget = self.k * batch_size
        if self.opts.capacity == "uniform":
            return torch.full((self.cfg.d_sae,), max(1, round(budget / self.cfg.d_sae)), dtype=torch.int64)
        profile = zipf_profile(self.cfg.d_sae, self.opts.zipf_alpha, self.opts.zipf_beta)
        per_rank = (profile * budget).round().clamp(1, batch_size).to(torch.int64)
        return per_rank[density_ranks(self.feature_density.cpu())]

    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        # Selected entries are > 0 (thresholds are >= 0), so u stands for ReLU(u) throughout.
        if not self.training:
            return SparseCodes.from_mask(pre, pre > self.threshold)
        if data_parallel.active():
            return self.select_over_ranks(pre)
        capacity = self.capacities(pre.shape[0]).to(pre.device)
        depth = min(int(capacity.max().item()), pre.shape[0])
        top_values, top_tokens = pre.topk(depth, dim=0)  # [depth, d_sae]; contiguous reads when feature-major
        rank = torch.arange(depth, device=pre.device)[:, None]
        keep = (rank < capacity[None, :]) & (top_values > 0)
        cutoff_row = (capacity.clamp(max=depth) - 1)[None, :]
        self.observe_threshold(top_values.detach().gather(0, cutoff_row).squeeze(0).clamp_min(0), self.opts.threshold_beta)
        slot, latents = keep.nonzero(as_tuple=True)
        tokens = top_tokens[slot, latents]
        order = torch.argsort(tokens * self.cfg.d_sae + latents)
        return SparseCodes.from_coordinates(pre, tokens[order], latents[order])

    def select_over_ranks(self, pre: torch.Tensor) -> SparseCodes:
        """Data-parallel training: latent j keeps its entries at or above its m_j-th largest
        activation over the global batch (m_j from the global batch size)."""
        capacity = self.capacities(data_parallel.global_rows(pre.shape[0])).to(pre.device)
        top_values = data_parallel.global_column_top(pre.detach(), int(capacity.max().item()))
        cutoff = top_values.gather(0, (capacity.clamp(max=top_values.shape[0]) - 1)[None, :])
        self.observe_threshold(cutoff.squeeze(0).clamp_min(0), self.opts.threshold_beta)
        tokens, latents = ((pre.detach() >= cutoff) & (pre.detach() > 0)).nonzero(as_tuple=True)
        return SparseCodes.from_coordinates(pre, tokens, latents)

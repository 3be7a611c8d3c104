"""aux_zipf_loss (Ayonrinde 2024), shared by Feature Choice and Mutual Choice.

The paper says aux_zipf_loss "generalises aux_k_loss to mitigate dead and underutilised features",
motivated by feature densities that follow a Zipf law except at the low-density tail. The exact
formula is not public; this is our reconstruction (documented as an engine approximation):

1. Keep bias-corrected EMA densities ρ_j (fraction of tokens on which latent j fires).
2. Target: a Zipf profile over density ranks, ρ̂(r) ∝ 1/(r + 1 + β)^α, scaled so Σρ̂ = Σρ.
3. Under-utilisation weight w_j = clamp(1 − ρ_j / ρ̂(rank_j), 0, 1); dead latents get w_j = 1.
4. AuxK with those weights: the top-k_aux latents by w·u model the detached residual (no b_dec),
   normalised by the residual's variance, times ``aux_coefficient`` (1/32 as for AuxK).
5. Dead latents first: alive latents' weights are multiplied by ``alive_priority`` (0.1), so an
   under-used but alive latent, whose pre-activations are larger, takes an auxiliary slot only
   where no dead latent is nearly as active (``alive_priority=1``: rank them alike). Measured with
   Mutual Choice (docs/no_collapse.md): dead 0.535 -> 0.50 on GBA's imbalanced set (TopK: 0),
   0.413 -> 0.41 on Sharkey (TopK 0.44): a small gain, not the fix of Mutual Choice's dead latents
   on the imbalanced set. The weights only rank candidates: the decoded values are raw u.
6. Session 3: the fixed profile of 2. calls the densest latents under-used when densities are
   flat (GBA's set: every feature at 0.09), so auxiliary slots went to the head. ``target="fitted"``
   (Mutual Choice's default) fits the Zipf law to the densest half of the alive latents and flags
   what falls below it (the tail); ``dead_first`` gives dead latents the slots before any alive one.
   Mutual Choice dead 0.50 -> 0.227 on GBA's set (TopK 0): better, still above TopK's.
With w = 1[dead] this is exactly AuxK. The same profile sets Feature Choice's Zipf capacities.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sae_kit import data_parallel
from sae_kit.codes import SparseCodes
from sae_kit.config import SAEConfig
from sae_kit.sae.base import TrainingOutput, update_ema


@dataclass
class ZipfOptions:
    zipf_alpha: float = 1.0
    zipf_beta: float = 0.0
    density_beta: float = 0.99
    threshold_beta: float = 0.999
    alive_priority: float = 0.1  # 1.0: rank alive and dead candidates alike
    # "fitted": the Zipf law fitted to the densest half of the alive latents (slope and level);
    # "normalised": the fixed profile 1/(r+1+β)^α scaled to Σρ (the earlier reconstruction).
    target: Literal["fitted", "normalised"] = "fitted"
    dead_first: bool = True  # dead latents take auxiliary slots before any alive one


def zipf_profile(n: int, alpha: float, beta: float) -> torch.Tensor:
    """Probabilities over ranks 0..n-1 proportional to 1 / (rank + 1 + beta)^alpha (float64)."""
    ranks = torch.arange(n, dtype=torch.float64)
    weights = (ranks + 1 + beta).pow(-alpha)
    return weights / weights.sum()


def fitted_zipf(density: torch.Tensor) -> torch.Tensor:
    """Expected density per rank (0 = densest) from a least-squares fit of log ρ on log(rank + 1)
    over the densest half of the alive latents: the law the head follows, extended to the tail.
    Uniform densities fit a flat law (α ≈ 0); with fewer than 2 alive latents, their mean."""
    ordered = torch.sort(density.double(), descending=True).values
    alive = int((ordered > 0).sum())
    head = max(alive // 2, min(alive, 2))
    ranks = torch.arange(ordered.numel(), dtype=torch.float64, device=density.device)
    if head < 2:
        return torch.full_like(ordered, float(ordered[:max(alive, 1)].mean()))
    x, y = (ranks[:head] + 1).log(), ordered[:head].log()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum().clamp_min(1e-12)
    slope = slope.clamp(max=0.0)  # densities sorted descending: a law that never rises with rank
    return (y.mean() + slope * ((ranks + 1).log() - x.mean())).exp()


def density_ranks(density: torch.Tensor) -> torch.Tensor:
    """Rank of each latent by density, 0 = densest; ties broken by index (stable)."""
    order = torch.sort(density, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


class ZipfAuxMixin:
    """Adds EMA feature densities and the aux_zipf_loss to an SAE (list it before the SAE base)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("feature_density", torch.zeros(cfg.d_sae, dtype=torch.float32))
        self.register_buffer("density_weight", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update_fire_stats(self, codes: SparseCodes) -> None:
        super().update_fire_stats(codes)
        counts = data_parallel.global_fire_counts(codes.fire_counts())
        batch_density = counts.to(torch.float32) / data_parallel.global_rows(codes.batch_size)
        update_ema(self.feature_density, self.density_weight, batch_density, self.opts.density_beta)

    @torch.no_grad()
    def zipf_target(self, density: torch.Tensor) -> torch.Tensor:
        """Each latent's expected density at its rank under the Zipf law."""
        ranks = density_ranks(density)
        if self.opts.target == "normalised":
            profile = zipf_profile(density.numel(), self.opts.zipf_alpha, self.opts.zipf_beta).to(density.device)
            return profile[ranks] * density.sum()
        return fitted_zipf(density)[ranks]

    @torch.no_grad()
    def underutilisation_weights(self) -> torch.Tensor:
        density = self.feature_density.double()
        target = self.zipf_target(density)
        weights = (1 - density / target.clamp_min(1e-30)).clamp(0, 1) * self.opts.alive_priority
        weights[self.dead_mask()] = 1.0
        return weights.to(self.dtype_)

    def auxiliary_losses(self, out: TrainingOutput, input_variance) -> dict[str, torch.Tensor]:
        if not self.training:
            return {}
        priority = self.dead_mask() if self.opts.dead_first else None
        return self.dead_latent_loss(out, weights=self.underutilisation_weights(), name="aux_zipf", priority=priority)

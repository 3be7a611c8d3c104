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
7. Session 5 diagnosis (docs/no_collapse.md): on GBA's set Mutual Choice's latents do not die in
   training (1.8 % flagged at the end) but fire rarely (median EMA density 1e-4, < 1 fire in the
   16k held-out tokens); the auxiliary slots given to alive under-used latents cause it: with
   ``alive_priority=0`` (= AuxK) held-out dead is 0.072 (BatchTopK's) against 0.225. The residual
   they regress is small, so their large pre-activations are pulled down. ``aux_slots="deficit"``
   (few slots, to dying latents only) measured worse (0.438); with ``alive_gradient="raise"`` (drop
   the gradient that lowers an alive latent's u) it measured 0.025 on GBA's set and 0.397 on Sharkey
   (TopK 0, 0.438). Over seeds 0-2 on the four planted sets (docs/no_collapse.md) it is Mutual
   Choice's default: GBA's set 0.025/0.047/0.012 (TopK 0: still above it), Sharkey 0.40-0.44
   (TopK 0.41-0.44), signed 0 (0), zipf 0.10-0.14 (TopK 0.50). Feature Choice's capacities already
   left no latent dead with "per_row"; with "deficit" it has the same L0, FVU (within 0.01) and
   dead fraction (0-0.003) on the four sets at seeds 0-1, and its step costs 1.07x TopK's instead of
   2.20x (benchmarks/train_step.py), so both default to it.
8. Session 7: the residual regression fits a dying latent's u to the residual, which is small, so u
   stays below the inference threshold θ and the latent still fires once per ~10k tokens (84 % of
   Mutual Choice's latents sat below the tail density on GBA's set). aux_zipf's aim is a density
   that follows the Zipf law, so ``lift_dying`` (Mutual Choice's default) adds a squared hinge
   (1 − u/θ)₊² on the dying latents' deficit slots: on the tokens where a latent falls short of the
   tail density its u is pulled up to θ, where it fires, and the reconstruction loss then trains it
   like any firing latent. "helps" (the default) lifts only where a fire at θ lowers the residual,
   2⟨e, d_j⟩ > θ, so forced fires cost less reconstruction (FVU over "off", seed 0: Sharkey +0.002
   against "all"'s +0.015; GBA's set +0.009-0.011 either way, where most latents are below the floor).
   It costs one d_in dot product per dying slot beyond the deficit slots already gathered.
   Results over seeds 0-2: docs/no_collapse.md, session 7.
With w = 1[dead] this is exactly AuxK. The same profile sets Feature Choice's Zipf capacities.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sae_kit import data_parallel
from sae_kit.codes import SparseCodes
from sae_kit.config import SAEConfig
from sae_kit.kernels import sparse_decode
from sae_kit.sae.base import TrainingOutput, mean_squared_error, top_weighted_columns, update_ema


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
    # "deficit" (default, 7. above): dead latents get AuxK's slots and an alive latent below the Zipf
    # law's tail density gets as many tokens as it falls short of it (cheap: ~0 entries when densities
    # follow the law); with alive_gradient="full" it measured worse than per_row. "per_row": every
    # under-used latent competes for k_aux slots per row by weight·u (the reconstruction of 1.-6.);
    # target, dead_first and alive_priority apply to it only.
    aux_slots: Literal["deficit", "per_row"] = "deficit"
    # "raise": the auxiliary gradient may raise an alive latent's pre-activation, never lower it (a
    # small residual would otherwise pull a dying latent's u down, and it fires even less);
    # "full": the plain gradient, as for dead latents.
    alive_gradient: Literal["raise", "full"] = "raise"
    # Deficit slots only: also pull a dying latent's pre-activation up to the inference threshold θ on
    # the tokens it falls short on (a squared hinge on 1 − u/θ), so it fires there at inference and its
    # density rises towards the Zipf tail density. The residual regression alone fits u to the (small)
    # residual, which leaves it below θ: a rare latent that misses held-out rows (8. above).
    # "helps": only on tokens where firing at θ would lower the reconstruction error, 2⟨e, d_j⟩ > θ
    # (e the residual, d_j the unit decoder row); "all": on every deficit slot; "off": no lift.
    lift_dying: Literal["off", "all", "helps"] = "off"


class RaiseOnly(torch.autograd.Function):
    """Identity whose gradient only raises its input: positive gradients (which a descent step
    turns into a decrease) are dropped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(max=0)


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

    @torch.no_grad()
    def tail_density(self, density: torch.Tensor) -> torch.Tensor:
        """The least density a Zipf law with this total gives any rank: Σρ · p(n−1)."""
        profile = zipf_profile(density.numel(), self.opts.zipf_alpha, self.opts.zipf_beta)
        return density.sum() * float(profile[-1])

    @torch.no_grad()
    def deficit_slots(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, K] auxiliary indices and their bool mask: AuxK's per-row top-k_aux over the dead latents,
        then each dying latent j (alive, ρ_j below the tail density ρ_min) on its m_j = ⌈(ρ_min − ρ_j)·B⌉
        largest-u tokens. Nothing dead or dying: K = 0 (no auxiliary pass at all)."""
        batch = pre.shape[0]
        dead = self.dead_mask()
        density = self.feature_density
        floor = self.tail_density(density.double())
        dying = ((density.double() < floor) & ~dead).nonzero().squeeze(1)
        parts, masks = [], []
        dead_columns = dead.nonzero().squeeze(1)
        if dead_columns.numel():
            if dead_columns.numel() <= self.k_aux:
                parts.append(dead_columns.expand(batch, -1))
            else:
                parts.append(top_weighted_columns(pre, dead_columns, pre.new_ones(dead_columns.numel()), self.k_aux))
            masks.append(torch.ones_like(parts[-1], dtype=torch.bool))
        if dying.numel():
            shortfall = ((floor - density.double()[dying]) * batch).ceil().clamp(1, batch).to(torch.int64)
            depth = int(shortfall.max())
            top_tokens = pre.index_select(1, dying).topk(depth, dim=0).indices  # [depth, n_dying]
            slot, column = (torch.arange(depth, device=pre.device)[:, None] < shortfall[None, :]).nonzero(as_tuple=True)
            tokens, latents = top_tokens[slot, column], dying[column]
            order = torch.argsort(tokens * pre.shape[1] + latents)
            codes = SparseCodes.from_coordinates(pre, tokens[order], latents[order])
            parts.append(codes.indices)
            masks.append(codes.active)
        if not parts:
            empty = torch.zeros(batch, 0, dtype=torch.int64, device=pre.device)
            return empty, empty.bool()
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    def deficit_loss(self, out: TrainingOutput) -> torch.Tensor:
        indices, mask = self.deficit_slots(out.pre_activations.detach())
        if indices.shape[1] == 0:
            return out.x_n.new_zeros(())
        raw_pre = out.gather_pre(indices.contiguous())
        alive = ~self.dead_mask()[indices]
        pre = torch.where(alive, RaiseOnly.apply(raw_pre), raw_pre) if self.opts.alive_gradient == "raise" else raw_pre
        values = torch.where(mask, pre.relu(), 0)
        target = (out.x_n - out.x_hat_n).detach()
        estimate = sparse_decode(indices, values, self.W_dec)
        loss = mean_squared_error(estimate, target) / data_parallel.batch_variance(target)
        if self.opts.lift_dying != "off":
            loss = loss + self.lift_loss(raw_pre, indices, mask & alive, target)
        return torch.nan_to_num(loss, nan=0.0, posinf=0.0)

    def lift_loss(self, pre: torch.Tensor, indices: torch.Tensor, dying_slot: torch.Tensor,
                  residual: torch.Tensor) -> torch.Tensor:
        """Mean squared hinge (1 − u/θ)₊² over the dying latents' deficit slots (θ: the inference
        threshold), restricted with "helps" to the slots where a fire at θ lowers ||residual||²."""
        threshold = self.threshold.detach()[indices]
        valid = dying_slot & (threshold > 0)  # no threshold observed yet: nothing to lift to
        if self.opts.lift_dying == "helps":
            rows, slots = valid.nonzero(as_tuple=True)
            alignment = (residual[rows] * self.W_dec.detach()[indices[rows, slots]]).sum(1)
            valid[rows, slots] = 2 * alignment > threshold[rows, slots]
        shortfall = (1 - pre / threshold.clamp_min(1e-12)).relu()
        return torch.where(valid, shortfall, 0).pow(2).sum() / valid.sum().clamp_min(1)

    def auxiliary_losses(self, out: TrainingOutput, input_variance) -> dict[str, torch.Tensor]:
        if not self.training:
            return {}
        if self.opts.aux_slots == "deficit":
            return {"aux_zipf": self.cfg.aux_coefficient * self.deficit_loss(out)}
        priority = self.dead_mask() if self.opts.dead_first else None
        return self.dead_latent_loss(out, weights=self.underutilisation_weights(), name="aux_zipf", priority=priority)

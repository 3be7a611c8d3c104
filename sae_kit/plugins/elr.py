"""Early-learning regularisation with per-token temporal-ensemble targets (after "Early-Learning
Regularization Prevents Memorization of Noisy Labels", ELR).

ELR keeps, for every training example i, a target t_i ← β·t_i + (1 − β)·p̂_i/Σp̂_i (p̂ its detached,
clamped prediction; t starts at 0 and is updated before the loss) and adds λ·mean log(1 − ⟨t_i, p_i⟩),
which keeps the model near its own early-learning predictions instead of memorising noise
[plugins.md B16, from ELR/model/loss.py]. For an SAE on a finite, multi-epoch cache [our adaptation]:

- p_i is the token's code as a distribution over latents: |z_i| / Σ|z_i| (sparse, with gradients);
- t_i is stored sparse, its top ``2k`` (index, value) entries in float16 (the clamp of ELR's softmax
  has no analogue for sparse codes: inactive latents have p = 0 exactly) [chosen];
- the reconstruction target's unexplainable residue plays the noisy label; the term discourages late
  latents from memorising it. It raises training FVU by design; the claim is about held-out FVU.

Tokens are identified by content: a 64-bit hash of the float32 row (the activation stores shuffle and
carry no row ids), looked up by binary search in a sorted key table. At most ``max_tokens`` tokens get
a target (the table costs ~(8 + 6·2k) bytes per token); later new tokens are not regularised.
Defaults λ = 0.3, β = 0.7 [plugins.md B16; λ is ELR's 3 scaled for a loss of order 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError
from sae_kit.plugins.api import Ablation, Plugin, StepContext, option
from sae_kit.seeding import derived_generator


def token_keys(x: torch.Tensor) -> torch.Tensor:
    """[B] int64 hash of each float32 row's bits (fixed random odd multipliers; wraps mod 2^64)."""
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    generator = derived_generator("elr-token-keys", x.shape[1])
    multipliers = torch.randint(-2**62, 2**62, (x.shape[1],), generator=generator, dtype=torch.int64) | 1
    return (bits * multipliers).sum(1)


def code_distribution(codes: SparseCodes) -> torch.Tensor:
    """[B, K] |z| / Σ|z| per token (0 where the token has no active latent)."""
    magnitude = codes.values.abs()
    return magnitude / magnitude.sum(1, keepdim=True).clamp_min(1e-12)


class TargetTable:
    """Sparse per-token targets keyed by token hash: keys [N] sorted, indices/values [N, width]."""

    def __init__(self, width: int, capacity: int):
        self.width, self.capacity = width, capacity
        self.keys = torch.empty(0, dtype=torch.int64)
        self.indices = torch.empty(0, width, dtype=torch.int64)
        self.values = torch.empty(0, width, dtype=torch.float16)

    def __len__(self) -> int:
        return self.keys.numel()

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot [B], found [B]): where each key sits in the table."""
        slot = torch.searchsorted(self.keys, keys).clamp_max(max(len(self) - 1, 0))
        found = self.keys[slot] == keys if len(self) else torch.zeros_like(keys, dtype=torch.bool)
        return slot, found

    def insert(self, keys: torch.Tensor) -> None:
        """Add unseen keys (with empty targets) while capacity lasts."""
        _, found = self.lookup(keys)
        new = keys[~found].unique()[: max(self.capacity - len(self), 0)]
        if new.numel() == 0:
            return
        keys = torch.cat([self.keys, new])
        order = keys.argsort()
        self.keys = keys[order]
        self.indices = torch.cat([self.indices, torch.zeros(new.numel(), self.width, dtype=torch.int64)])[order]
        self.values = torch.cat([self.values, torch.zeros(new.numel(), self.width, dtype=torch.float16)])[order]

    def update(self, keys: torch.Tensor, prediction: SparseCodes, beta: float) -> tuple[torch.Tensor, SparseCodes]:
        """t ← β·t + (1 − β)·p for the table's keys, kept sparse; returns (found [B], targets)."""
        self.insert(keys)
        slot, found = self.lookup(keys)
        t_idx, t_val = self.indices[slot], beta * self.values[slot].float()
        p_idx, p_val = prediction.indices, (1 - beta) * prediction.values.detach().float()
        # A target's nonzero entries have distinct latents, so each prediction entry matches at most one.
        match = (t_idx[:, :, None] == p_idx[:, None, :]) & (t_val != 0)[:, :, None]  # [B, W, K]
        t_val = t_val + (match * p_val[:, None, :]).sum(2)
        p_val = p_val * ~match.any(1)
        top = torch.cat([t_val, p_val], 1).topk(self.width, dim=1)
        new_idx = torch.cat([t_idx, p_idx], 1).gather(1, top.indices)
        new_val = top.values * found[:, None]
        rows = slot[found]
        self.indices[rows], self.values[rows] = new_idx[found], new_val[found].to(torch.float16)
        return found, SparseCodes(new_idx, new_val, prediction.d_sae)


def inner_product(p: SparseCodes, t: SparseCodes) -> torch.Tensor:
    """[B] ⟨p, t⟩ of two sparse code rows (t's nonzero entries have distinct latents)."""
    match = (p.indices[:, :, None] == t.indices[:, None, :]) & (t.values != 0)[:, None, :]  # [B, K, W]
    return (p.values * (match * t.values[:, None, :]).sum(2)).sum(1)


def elr_term(agreement: torch.Tensor) -> torch.Tensor:
    """mean log(1 − ⟨p, t⟩): minimising it raises the agreement with the targets."""
    return torch.log1p(-agreement.clamp_max(1 - 1e-4)).mean()


class EarlyLearningRegularization(Plugin):
    name = "elr"
    paper = "Early-Learning Regularization Prevents Memorization of Noisy Labels (ELR)"
    summary = "per-token EMA targets of the code distribution; λ·log(1 − ⟨p, t⟩) keeps codes near early learning"
    # A finite cache seen ~15 times: the multi-epoch regime where memorisation can happen.
    ablation = Ablation(metric="fvu", cache_tokens=8192)

    @dataclass
    class Options:
        coefficient: float = option(0.3, "λ, weight of log(1 − ⟨p, t⟩)")
        beta: float = option(0.7, "β, the targets' EMA decay per visit of a token")
        max_tokens: int = option(2_000_000, "tokens that get a target (memory ≈ (8 + 12k) bytes each)")

    def validate(self) -> None:
        if self.opts.coefficient < 0 or not 0 <= self.opts.beta < 1 or self.opts.max_tokens < 1:
            raise ConfigError("elr: coefficient must be >= 0, beta in [0, 1), max_tokens >= 1")

    def setup(self, trainer) -> None:
        self.table = TargetTable(width=2 * trainer.sae.cfg.k, capacity=self.opts.max_tokens)

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        codes = ctx.out.codes
        p = code_distribution(codes)
        p_codes = SparseCodes(codes.indices, p, codes.d_sae)
        found, target = self.table.update(token_keys(ctx.batch.x), p_codes, self.opts.beta)
        ctx.logs["elr/tokens"] = float(len(self.table))
        if not bool(found.any()):
            return {}
        agreement = inner_product(p_codes, target)[found]
        ctx.logs["elr/agreement"] = float(agreement.detach().mean())
        return {"elr": self.opts.coefficient * elr_term(agreement)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "keys": self.table.keys, "indices": self.table.indices,
                "values": self.table.values}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.table.keys, self.table.indices, self.table.values = state["keys"], state["indices"], state["values"]

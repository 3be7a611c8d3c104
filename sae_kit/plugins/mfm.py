"""Masked Feature Modeling: rebuild masked latents and decode them with the SAE's own decoder ("Masked
feature modeling for unsupervised domain adaptation", MFM).

MFM masks features in feature space, re-fills them with a lightweight Rebuilder, and passes the
rebuilt features through the *main* decoder under the main task loss; the Rebuilder is dropped at
inference. The SAE adaptation [plugins.md B20; our choices]:

- mask: each active latent slot is dropped with probability ``mask_ratio`` (a seeded generator per step);
- Rebuilder R: low rank, d_sae → rank → d_sae, evaluated sparsely: the kept codes are embedded through
  ``sparse_decode`` (an embedding bag, [B, rank]) and read out only at the dropped slots' latents
  (unconstrained values [ours]);
- ``L_mfm = ‖W_dec·(z⊙m + R(z⊙m)⊙(1−m)) + b_dec − x‖² / Var(x)``, weight ``coefficient``; gradients
  reach the encoder (through z), the decoder and the Rebuilder (a plugin module, own optimizer group).

Risk, as the reference notes: the term rewards latents that are predictable from each other
(redundancy). ``evaluate`` reports ``fvu_dropped``: held-out FVU of the SAE alone when ``mask_ratio``
of the active latents are dropped (no Rebuilder), the robustness MFM is meant to bring, and
``fvu_rebuilt`` with the Rebuilder filling them. ``coefficient=0`` only measures (ablation baseline).
Defaults [chosen]: ``mask_ratio=0.15``, ``rank=64``, ``coefficient=0.1``.

Measured [ablations/mfm-topk.json; `sae-kit ablate --plugin mfm --data synthetic --seeds 3`: topk,
planted sharkey d=64, d_sae 512, k 5, 500 steps]: neutral. fvu_dropped 0.4323 → 0.4317 (paired
difference −0.0007 ± 0.0008), FVU 0.3611 → 0.3604.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError
from sae_kit.eval.metrics import ReconstructionMetrics
from sae_kit.kernels import sparse_decode
from sae_kit.plugins._heldout import heldout_batches
from sae_kit.plugins.api import Ablation, Plugin, StepContext, option
from sae_kit.seeding import derived_generator


class Rebuilder(nn.Module):
    """Low-rank predictor of dropped latents from the kept ones, evaluated on the supports only."""

    def __init__(self, d_sae: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(d_sae, rank, generator=generator) / rank ** 0.5)
        self.read = nn.Parameter(torch.zeros(d_sae, rank))  # starts by predicting 0: no effect at step 0
        self.bias = nn.Parameter(torch.zeros(d_sae))

    def forward(self, codes: SparseCodes, keep: torch.Tensor) -> torch.Tensor:
        """[B, K] values: the kept ones as they are, the dropped ones rebuilt from the kept ones."""
        kept = torch.where(keep, codes.values, 0)
        hidden = sparse_decode(codes.indices, kept, self.embed.to(kept.dtype))  # [B, rank]
        # Unconstrained (no ReLU even for non-negative codes): the read-out starts at 0, where a ReLU
        # would have no gradient.
        rebuilt = (hidden.unsqueeze(1) * self.read[codes.indices]).sum(-1) + self.bias[codes.indices]
        dropped = codes.active & ~keep
        return torch.where(dropped, rebuilt.to(kept.dtype), kept)


def drop_mask(codes: SparseCodes, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """[B, K] True for slots kept: each active slot is dropped with probability ``ratio``."""
    dropped = torch.rand(codes.values.shape, generator=generator).to(codes.values.device) < ratio
    return ~(dropped & codes.active)


class MFM(Plugin):
    name = "mfm"
    paper = "Masked feature modeling (MFM) for unsupervised domain adaptation"
    summary = "loss: drop active latents, rebuild them with a low-rank Rebuilder, reconstruct through the SAE's decoder"
    ablation = Ablation(metric="mfm/fvu_dropped", baseline_options={"coefficient": 0.0})

    @dataclass
    class Options:
        coefficient: float = option(0.1, "weight λ of the masked reconstruction term")
        mask_ratio: float = option(0.15, "probability of dropping each active latent")
        rank: int = option(64, "Rebuilder rank")

    def validate(self) -> None:
        if self.opts.coefficient < 0 or not 0 < self.opts.mask_ratio < 1 or self.opts.rank < 1:
            raise ConfigError("mfm: need coefficient >= 0, 0 < mask_ratio < 1 and rank >= 1")

    def setup(self, trainer) -> None:
        generator = derived_generator(self.name, trainer.cfg.seed)
        self.modules["rebuilder"] = Rebuilder(trainer.sae.cfg.d_sae, self.opts.rank, generator)

    def masked_loss(self, sae, codes: SparseCodes, x_n: torch.Tensor, keep: torch.Tensor,
                    input_variance: float) -> torch.Tensor:
        values = self.modules["rebuilder"](codes, keep)
        x_hat = sae.decode_normalized(SparseCodes(codes.indices, values, codes.d_sae))
        return (x_hat - x_n).pow(2).sum(1).mean() / input_variance

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.opts.coefficient == 0:
            return {}
        codes = ctx.out.codes
        keep = drop_mask(codes, self.opts.mask_ratio, derived_generator(self.name, ctx.trainer.cfg.seed, ctx.step))
        loss = self.masked_loss(ctx.sae, codes, ctx.out.x_n, keep, ctx.trainer.input_variance)
        return {"masked": self.opts.coefficient * loss}

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        was_training = sae.training
        sae.eval()
        dropped_metrics, rebuilt_metrics = ReconstructionMetrics(sae.cfg.d_sae), ReconstructionMetrics(sae.cfg.d_sae)
        generator = derived_generator(self.name, "eval", trainer.cfg.seed)
        for x in heldout_batches(trainer):
            x_n, norm = sae.normalize(x)
            codes = sae.select(sae.pre_activations(x_n), x_n)
            keep = drop_mask(codes, self.opts.mask_ratio, generator)
            dropped = SparseCodes(codes.indices, torch.where(keep, codes.values, 0), codes.d_sae)
            rebuilt = SparseCodes(codes.indices, self.modules["rebuilder"](codes, keep), codes.d_sae)
            dropped_metrics.update(x, norm.undo(sae.decode_normalized(dropped)), dropped)
            rebuilt_metrics.update(x, norm.undo(sae.decode_normalized(rebuilt)), rebuilt)
        sae.train(was_training)
        return {"fvu_dropped": dropped_metrics.compute()["fvu"], "fvu_rebuilt": rebuilt_metrics.compute()["fvu"]}

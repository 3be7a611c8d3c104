"""BA-LoRA's diversity regulariser as code decorrelation ("BA-LoRA: bias-alleviating low-rank
adaptation"; the released ``CustomTrainer``'s NLU diversity term).

BA-LoRA penalises the off-diagonal entries of the batch covariance of the model's outputs,
``Σ_{i≠j} C_ij² / dim`` (λ₂ = 3e-4), so that output dimensions do not carry the same information.
For an SAE the outputs are the codes: two latents that fire together with proportional values
(duplicated or absorbing features) have a large covariance. The term here is

    coefficient · Σ_{i≠j} C_ij² / m,   C = cov_b(z[:, S])   (torch.cov over the batch)

with S the latents active in the batch, capped at ``max_latents`` drawn at random per step (a
seeded generator) so the [m, m] covariance stays small [plugins.md B25; our adaptation]. Codes are
taken in units of their batch standard deviation when ``normalize=true`` (then C is a correlation
matrix and the term does not reward shrinking all codes) [our choice, the default].

Defaults [chosen]: ``coefficient=1e-4`` (relative to the normalised MSE, as the reference suggests),
``max_latents=4096``. BA-LoRA's consistency term needs a reference model (see mask_tune) and its SVD
term is not implemented: it pushes codes toward low rank, against an over-complete dictionary.

``evaluate`` reports the redundancy the term targets, on held-out tokens: ``max_decoder_cosine``
(mean over latents of the largest |cos| to another decoder row) and ``code_correlation`` (mean squared
off-diagonal correlation among the latents that fire). ``coefficient=0`` measures only (the
ablation's baseline).

Measured [ablations/decorrelate-topk.json; `sae-kit ablate --plugin decorrelate --data synthetic
--seeds 3`: topk, planted sharkey d=64, d_sae 512, k 5, 500 steps, coefficient 1e-2]: code_correlation
0.00032 → 0.00028 (paired difference −0.00004, all 3 seeds; "helps"), at a cost: FVU 0.361 → 0.373,
MMCS 0.662 → 0.644; FRR@0.9 0.160 → 0.171.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_kit.config import ConfigError
from sae_kit.plugins.api import Ablation, Plugin, StepContext, option
from sae_kit.seeding import derived_generator


def offdiagonal_covariance_penalty(dense: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Σ_{i≠j} C_ij² / m for the [B, m] codes ``dense`` (C: covariance, or correlation if ``normalize``)."""
    if dense.shape[1] < 2:
        return dense.new_zeros(())
    if normalize:
        dense = dense / dense.std(0, keepdim=True).detach().clamp_min(1e-6)
    covariance = torch.cov(dense.T)
    off_diagonal = covariance - torch.diag_embed(torch.diagonal(covariance))
    return off_diagonal.pow(2).sum() / dense.shape[1]


def dense_columns(codes, columns: torch.Tensor) -> torch.Tensor:
    """The codes of latents ``columns`` as a dense [B, m] matrix, with gradients to ``codes.values``."""
    position = torch.full((codes.d_sae,), -1, dtype=torch.int64, device=codes.indices.device)
    position[columns] = torch.arange(columns.numel(), device=columns.device)
    slot = position[codes.indices]  # [B, K], -1 where the latent is not among the columns
    keep = slot >= 0
    dense = codes.values.new_zeros(codes.batch_size, columns.numel())
    rows = torch.arange(codes.batch_size, device=slot.device).unsqueeze(1).expand_as(slot)
    return dense.index_put((rows[keep], slot[keep]), codes.values[keep], accumulate=True)


def max_decoder_cosine(W_dec: torch.Tensor) -> float:
    directions = W_dec.detach().float()
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = (directions @ directions.T).abs().fill_diagonal_(0)
    return float(cosine.max(1).values.mean())


class Decorrelate(Plugin):
    name = "decorrelate"
    paper = "BA-LoRA (diversity regulariser)"
    summary = "loss: squared off-diagonal covariance of the active latents' codes (decorrelate co-firing latents)"
    ablation = Ablation(metric="decorrelate/code_correlation", options={"coefficient": 1e-2},
                        baseline_options={"coefficient": 0.0})

    @dataclass
    class Options:
        coefficient: float = option(1e-4, "weight of the decorrelation term, relative to the normalised MSE")
        max_latents: int = option(4096, "at most this many active latents (drawn per step) enter the covariance")
        normalize: bool = option(True, "penalise correlations (codes in units of their batch std), not covariances")
        eval_tokens: int = option(8192, "held-out tokens for the redundancy metrics")

    def validate(self) -> None:
        if self.opts.coefficient < 0 or self.opts.max_latents < 2 or self.opts.eval_tokens < 2:
            raise ConfigError("decorrelate: need coefficient >= 0, max_latents >= 2 and eval_tokens >= 2")

    def columns(self, codes, step: int, seed: int) -> torch.Tensor:
        active = codes.fired().nonzero().squeeze(1)
        if active.numel() > self.opts.max_latents:
            pick = torch.randperm(active.numel(), generator=derived_generator(self.name, seed, step))
            active = active[pick[: self.opts.max_latents]].sort().values
        return active

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.opts.coefficient == 0:
            return {}
        codes = ctx.out.codes
        dense = dense_columns(codes, self.columns(codes, ctx.step, ctx.trainer.cfg.seed))
        penalty = offdiagonal_covariance_penalty(dense, self.opts.normalize)
        return {"covariance": self.opts.coefficient * penalty}

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        cfg = trainer.cfg
        x = next(trainer.source.iter_batches(min(self.opts.eval_tokens, cfg.eval_tokens), split="heldout",
                                             seed=cfg.seed, epochs=1, drop_last=False,
                                             heldout_fraction=cfg.heldout_fraction)).float()
        was_training = sae.training
        sae.eval()
        codes = sae.encode(x)
        sae.train(was_training)
        fired = codes.fired().nonzero().squeeze(1)
        dense = dense_columns(codes, fired)
        correlation = torch.corrcoef(dense.T).nan_to_num(0.0).fill_diagonal_(0) if fired.numel() > 1 else dense.new_zeros(1, 1)
        m = max(fired.numel(), 2)
        return {"max_decoder_cosine": max_decoder_cosine(sae.W_dec),
                "code_correlation": float(correlation.pow(2).sum() / (m * (m - 1)))}

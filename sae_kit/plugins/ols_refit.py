"""Gauss–Markov least-squares refit of the codes on the encoder's support, and the residual diagnostic
(after "The Gauss–Markov adjunction", whose object is the OLS estimator and its orthogonal residual).

An SAE encoder is amortised: it picks a support S(x) and magnitudes in one pass. Keeping the support
(so L0 is unchanged) and solving ``z_S = argmin ‖x_n − b_dec − D_Sᵀ z‖²`` gives, per token, a residual
no larger than the encoder's. The gap between the two FVUs is the amortisation gap.

- Signed codes (AbsTopK): the normal equations ``(D_S D_Sᵀ + εI) z = D_S (x_n − b_dec)`` by
  ``torch.linalg.solve``.
- Non-negative codes (every other architecture): projected gradient descent on the same objective,
  started from the encoder's values with step ``1/λ_max(D_S D_Sᵀ)``. Each step cannot increase the
  residual, so the guarantee holds; clamping the unconstrained solution would not keep it [our choice].

The plugin changes no training step. ``evaluate`` reports, on held-out tokens, ``fvu`` (refit),
``fvu_encoder``, ``amortization_gap`` = fvu_encoder − fvu, ``residual_span_encoder`` / ``residual_span``
= mean ‖D_S r‖ / ‖r‖ (0 at the unconstrained optimum: the residual is orthogonal to the support's span)
and ``shrinkage`` = Σ z_enc / Σ z_refit on the support. ``refit_codes`` is the inference-time encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError
from sae_kit.eval.metrics import ReconstructionMetrics
from sae_kit.plugins.api import Ablation, Plugin, option

if TYPE_CHECKING:
    from sae_kit.sae.base import SAE

RIDGE = 1e-6


@torch.no_grad()
def refit_codes(sae: "SAE", x_n: torch.Tensor, codes: SparseCodes, steps: int = 100,
                signed: bool | None = None) -> SparseCodes:
    """Least-squares magnitudes on the support of ``codes`` (normalised space); same indices, same L0."""
    signed = sae.signed_codes if signed is None else signed
    active = codes.active
    # Padding slots get zero rows: with the ridge their solution is exactly 0, so they stay inactive.
    D = sae.W_dec.detach()[codes.indices] * active.unsqueeze(-1).to(sae.W_dec.dtype)  # [B, K, d]
    target = (x_n - sae.b_dec.detach()).unsqueeze(-1)  # [B, d, 1]
    gram = D @ D.transpose(1, 2) + RIDGE * torch.eye(D.shape[1], dtype=D.dtype)
    rhs = (D @ target).squeeze(-1)
    if signed:
        values = torch.linalg.solve(gram, rhs)
    else:
        step = 1.0 / torch.linalg.eigvalsh(gram)[:, -1:].clamp_min(RIDGE)  # [B, 1]
        values = codes.values.detach().clone()
        for _ in range(steps):
            gradient = (gram @ values.unsqueeze(-1)).squeeze(-1) - rhs
            values = (values - step * gradient).clamp_min(0)
        # A slot whose optimum is 0 leaves the support; L0 can only fall, never rise.
    values = torch.where(active, values, torch.zeros_like(values))
    return SparseCodes(codes.indices, values, codes.d_sae)


def residual_span(sae: "SAE", x_n: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
    """Per token ‖D_S r‖ / ‖r‖ with r the residual: how much of it the support could still explain."""
    residual = x_n - sae.decode_normalized(codes)
    D = sae.W_dec.detach()[codes.indices] * codes.active.unsqueeze(-1).to(sae.W_dec.dtype)
    return (D @ residual.unsqueeze(-1)).squeeze(-1).norm(dim=1) / residual.norm(dim=1).clamp_min(1e-12)


class OLSRefit(Plugin):
    name = "ols_refit"
    paper = "The Gauss–Markov Adjunction"
    summary = "post-hoc: least-squares code magnitudes on the encoder's support (same L0); amortisation gap"
    ablation = Ablation(metric="fvu", plugin_metric="ols_refit/fvu")

    @dataclass
    class Options:
        steps: int = option(100, "projected-gradient steps for non-negative codes")
        tokens: int = option(16384, "held-out tokens for the evaluation (at most the run's eval_tokens)")

    def validate(self) -> None:
        if self.opts.steps < 1 or self.opts.tokens < 1:
            raise ConfigError("ols_refit: steps and tokens must be >= 1")

    @torch.no_grad()
    def evaluate(self, sae: "SAE", trainer) -> dict[str, Any]:
        cfg = trainer.cfg
        n_tokens = min(self.opts.tokens, cfg.eval_tokens)
        batch_size = min(cfg.batch_size, n_tokens)
        batches = trainer.source.iter_batches(batch_size, split="heldout", seed=cfg.seed, epochs=1, drop_last=False,
                                              heldout_fraction=cfg.heldout_fraction)
        was_training = sae.training
        sae.eval()
        encoder, refit = ReconstructionMetrics(sae.cfg.d_sae), ReconstructionMetrics(sae.cfg.d_sae)
        span_enc = span_refit = enc_sum = refit_sum = 0.0
        seen = 0
        try:
            for x in batches:
                x = x[: n_tokens - seen].to(torch.float32)
                x_n, norm = sae.normalize(x)
                codes = sae.select(sae.pre_activations(x_n), x_n)
                better = refit_codes(sae, x_n, codes, self.opts.steps)
                encoder.update(x, norm.undo(sae.decode_normalized(codes)), codes)
                refit.update(x, norm.undo(sae.decode_normalized(better)), better)
                span_enc += residual_span(sae, x_n, codes).sum().item()
                span_refit += residual_span(sae, x_n, better).sum().item()
                both = codes.active & better.active
                enc_sum += codes.values[both].abs().sum().item()
                refit_sum += better.values[both].abs().sum().item()
                seen += x.shape[0]
                if seen >= n_tokens:
                    break
        finally:
            sae.train(was_training)
        if seen == 0:
            raise ValueError("ols_refit: the source has no held-out tokens to evaluate on")
        enc, ref = encoder.compute(), refit.compute()
        return {
            "fvu": ref["fvu"], "fvu_encoder": enc["fvu"], "amortization_gap": enc["fvu"] - ref["fvu"],
            "l0_mean": ref["l0_mean"], "l0_mean_encoder": enc["l0_mean"],
            "residual_span": span_refit / seen, "residual_span_encoder": span_enc / seen,
            "shrinkage": enc_sum / max(refit_sum, 1e-12), "n_tokens": seen,
        }

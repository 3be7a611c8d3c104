"""ARL's inverse-variance weighting of sources ("Asymmetric representation learning", ARL; after the
official ``main_arl_variance.py``).

ARL weighs each modality branch by a softmax of its inverse uncertainty, ``softmax(T · w)`` with
T = 8 and w ∝ 1/variance (the theory: the optimal dependence ratio is inversely proportional to the
variance ratio), switched on after a warm-up, and adds each branch's own loss (a bias term).

SAE adaptation [plugins.md B26; our choices marked]: the "modalities" are activation sources
reconstructed through one code (an SAE on mixed corpora, several models' or layers' stores of one
width). Each step draws ``batch_size / S`` rows from each of the S sources; then

- σ̂_s² = EMA (``beta``) of source s's per-dimension squared reconstruction error
  mean_b ‖x_b − x̂_b‖² / d [ours: the error variance of a zero-mean residual];
- w_s = S · softmax_s(T · (1/σ̂_s²) / Σ_r 1/σ̂_r²) (mean 1), uniform during the first ``warmup``
  fraction of the run, as per-token loss weights (``batch.weight``);
- the bias term ``gamma · Σ_s ‖mean_{b ∈ s}(x_b − x̂_b)‖² / Var(x)`` (ARL's per-branch term: each
  source's systematic offset is paid for separately).

``weighting=uniform`` keeps the same sources and the bias term, with w_s = 1 (the ablation's baseline).
``evaluate`` reports each source's held-out FVU, their mean and the worst. Sources: activation-store
folders joined by ``+``, or ``auto`` on synthetic data (the run's planted set and ``count − 1`` sets
with other dictionaries). For a single source ARL would reduce to whitening; that is not offered.

Measured [ablations/arl-topk.json; `sae-kit ablate --plugin arl --data synthetic --seeds 3`: topk,
two planted sources with different dictionaries, d=64, d_sae 512, k 5, 500 steps; baseline: the same
sources with uniform weights]: mean per-source FVU 0.49158 → 0.49184 (paired difference +0.00027 ±
0.00007, "hurts", a tiny effect); the run's own source (source 0) 0.4893 → 0.4831.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from sae_kit.config import ConfigError
from sae_kit.eval.metrics import ReconstructionMetrics
from sae_kit.plugins._sources import SourceCursor, open_sources
from sae_kit.plugins.api import Ablation, Batch, Plugin, StepContext, option


def arl_weights(variances: torch.Tensor, temperature: float) -> torch.Tensor:
    """S · softmax(T · (1/σ²) / Σ 1/σ²): mean 1, larger for the sources reconstructed with less error."""
    inverse = 1.0 / variances.clamp_min(1e-12)
    return variances.numel() * torch.softmax(temperature * inverse / inverse.sum(), 0)


def per_source_bias(residual: torch.Tensor, source: torch.Tensor, sources: int) -> torch.Tensor:
    """Σ_s ‖mean_{b ∈ s} residual_b‖² over the sources present in the batch."""
    sums = residual.new_zeros(sources, residual.shape[1]).index_add(0, source, residual)
    counts = torch.bincount(source, minlength=sources).clamp_min(1).to(residual.dtype)
    return (sums / counts.unsqueeze(1)).pow(2).sum()


class ARL(Plugin):
    name = "arl"
    paper = "Asymmetric representation learning (ARL)"
    summary = "multi-source: per-source loss weights from inverse error variance (softmax, T=8) plus a per-source bias term"
    conflicts = frozenset({"exp3_flad", "ucb1_flad"})  # both choose where the batch comes from
    ablation = Ablation(metric="arl/mean_fvu", baseline_options={"weighting": "uniform"})

    @dataclass
    class Options:
        sources: str = option("auto", "activation-store folders joined by '+', or auto (synthetic data)", path="stores")
        count: int = option(2, "number of synthetic sources with sources=auto")
        temperature: float = option(8.0, "softmax temperature T on the normalised inverse variances")
        warmup: float = option(0.05, "fraction of the run with uniform weights")
        beta: float = option(0.99, "EMA factor of the per-source error variance")
        gamma: float = option(1.0, "weight of the per-source bias term")
        weighting: Literal["arl", "uniform"] = option("arl", "arl, or uniform weights (the ablation's baseline)")

    def validate(self) -> None:
        o = self.opts
        if o.count < 2 or o.temperature < 0 or not 0 <= o.warmup < 1 or not 0 <= o.beta < 1 or o.gamma < 0:
            raise ConfigError("arl: need count >= 2, temperature >= 0, 0 <= warmup < 1, 0 <= beta < 1, gamma >= 0")

    def setup(self, trainer) -> None:
        cfg = trainer.cfg
        sources = open_sources(self.opts.sources, trainer, self.opts.count)
        self.S = len(sources)
        if cfg.batch_size % self.S:
            raise ConfigError(f"arl: batch_size={cfg.batch_size} must be divisible by the number of sources ({self.S})")
        self.cursor = SourceCursor(sources, cfg.batch_size // self.S, cfg.seed, cfg.heldout_fraction, self.name)
        self.variances = torch.ones(self.S, dtype=torch.float64)
        self.seen = torch.zeros(self.S, dtype=torch.bool)
        self.weights = torch.ones(self.S, dtype=torch.float64)

    def transform_batch(self, batch: Batch, trainer) -> Batch:
        x = torch.cat([self.cursor.next(s) for s in range(self.S)])
        source = torch.arange(self.S).repeat_interleave(x.shape[0] // self.S)
        return Batch(x, weight=self.weights.float()[source], source=source)

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        out, source = ctx.out, ctx.batch.source.to(ctx.out.x_n.device)
        residual = out.x_n - out.x_hat_n
        with torch.no_grad():  # this step's per-source error, for the variance EMA in after_step
            error = residual.pow(2).mean(1).double()
            counts = torch.bincount(source, minlength=self.S).clamp_min(1)
            self._errors = torch.zeros(self.S, dtype=torch.float64).index_add(0, source.cpu(), error.cpu()) / counts.cpu()
        if self.opts.gamma == 0:
            return {}
        return {"bias": self.opts.gamma * per_source_bias(residual, source, self.S) / ctx.trainer.input_variance}

    def update(self, errors: torch.Tensor, fraction: float) -> None:
        """Fold one step's per-source errors into σ̂² and recompute the weights (exposed for tests)."""
        beta = self.opts.beta
        self.variances = torch.where(self.seen, beta * self.variances + (1 - beta) * errors, errors)
        self.seen[:] = True
        if self.opts.weighting == "arl" and fraction >= self.opts.warmup:
            self.weights = arl_weights(self.variances, self.opts.temperature)

    def after_step(self, ctx: StepContext) -> None:
        self.update(self._errors, (ctx.step + 1) / ctx.trainer.cfg.total_steps)
        for s in range(self.S):
            ctx.logs[f"arl/weight_{s}"] = float(self.weights[s])

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        cfg = trainer.cfg
        was_training = sae.training
        sae.eval()
        result: dict[str, Any] = {}
        for s, source in enumerate(self.cursor.sources):
            metrics = ReconstructionMetrics(sae.cfg.d_sae)
            seen = 0
            for x in source.iter_batches(min(cfg.batch_size, cfg.eval_tokens), split="heldout", seed=cfg.seed,
                                         epochs=1, drop_last=False, heldout_fraction=cfg.heldout_fraction):
                x = x[: cfg.eval_tokens - seen].float()
                x_n, norm = sae.normalize(x)
                codes = sae.select(sae.pre_activations(x_n), x_n)
                metrics.update(x, norm.undo(sae.decode_normalized(codes)), codes)
                seen += x.shape[0]
                if seen >= cfg.eval_tokens:
                    break
            result[f"fvu_source_{s}"] = metrics.compute()["fvu"]
            result[f"weight_{s}"] = float(self.weights[s])
        fvus = [result[f"fvu_source_{s}"] for s in range(self.S)]
        sae.train(was_training)
        return {**result, "mean_fvu": sum(fvus) / len(fvus), "worst_fvu": max(fvus)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "variances": self.variances, "seen": self.seen, "weights": self.weights,
                "position": self.cursor.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key in ("variances", "seen", "weights"):
            setattr(self, key, state[key].clone())
        self.cursor.restore(state["position"])

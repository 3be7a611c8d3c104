"""Hard-token mining with a learned loss predictor (after "Bootstrap Masked Visual Modeling via Hard
Patches Mining", HPM).

HPM adds a branch that predicts each patch's reconstruction loss, trained with a *relative* objective
(for pairs (i, j): BCE(σ(p_i − p_j), 1[L_i > L_j]), so only the ranking is learned), and masks the
patches it predicts hardest, a share that grows easy → hard over training [plugins.md B9, from
models_mae_learn_loss.py]. For an SAE [our adaptation]:

- predictor h_φ: a 2-layer MLP (d_in → ``hidden`` → 1) on the normalised input, a plugin module; its
  loss is the pairwise BCE over ``pairs`` random pairs of the batch against the detached per-token
  reconstruction losses. It sees detached inputs, so it never changes the SAE's gradients.
- ``mode=select`` (default): the engine draws 2·B candidates; the plugin keeps the ``α_t·B`` with the
  highest predicted loss and fills the rest uniformly at random from the others, with
  α_t = ``hardness`` · t / T (HPM's 0.5·(epoch+1)/epochs ramp, per step).
- ``mode=weight``: no oversampling; per-token loss weights 1 + α_t·rank_pct(h(x)), mean 1.
- Outliers: tokens whose norm exceeds ``outlier_factor`` × the batch's median norm (BOS, massive
  activations) are never ranked hard, so they cannot dominate the selection [plugins.md B9 caveat].

``evaluate`` reports on held-out tokens ``tail_fvu`` (the worst decile of tokens' squared error over
their own variance about the mean: where rare directions live) and ``predictor_spearman`` (rank
correlation of predicted and actual per-token loss: whether the predictor learned anything).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from sae_kit.config import ConfigError
from sae_kit.plugins._heldout import heldout_tokens
from sae_kit.plugins.api import Ablation, Batch, Plugin, StepContext, option
from sae_kit.seeding import derived_generator


def pairwise_ranking_loss(predicted: torch.Tensor, loss: torch.Tensor, pairs: int, generator: torch.Generator) -> torch.Tensor:
    """HPM's relative objective: mean BCE(σ(p_i − p_j), 1[L_i > L_j]) over random pairs with L_i ≠ L_j."""
    n = predicted.shape[0]
    i = torch.randint(0, n, (pairs,), generator=generator)
    j = torch.randint(0, n, (pairs,), generator=generator)
    valid = loss[i] != loss[j]
    if not bool(valid.any()):
        return predicted.sum() * 0.0
    i, j = i[valid], j[valid]
    label = (loss[i] > loss[j]).to(predicted.dtype)
    return F.binary_cross_entropy_with_logits(predicted[i] - predicted[j], label)


def select_hard(predicted: torch.Tensor, keep: int, hard: int, generator: torch.Generator,
                eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of ``keep`` rows: the ``hard`` highest-predicted eligible rows, the rest uniformly at random."""
    score = predicted.detach().clone()
    if eligible is not None:
        score[~eligible] = -torch.inf
    hard = min(hard, keep, int(torch.isfinite(score).sum()))
    chosen = score.topk(hard).indices if hard > 0 else torch.empty(0, dtype=torch.int64)
    rest = torch.ones(predicted.shape[0], dtype=torch.bool)
    rest[chosen] = False
    others = rest.nonzero().squeeze(1)
    others = others[torch.randperm(others.numel(), generator=generator)[: keep - hard]]
    return torch.cat([chosen, others])


class HardTokens(Plugin):
    name = "hard_tokens"
    paper = "Bootstrap Masked Visual Modeling via Hard Patches Mining (HPM)"
    summary = "a loss predictor (pairwise ranking BCE) picks the predicted-hardest tokens, a share growing easy → hard"
    oversample = 2
    lr_scale = 10.0
    ablation = Ablation(metric="hard_tokens/tail_fvu", baseline_options={"hardness": 0.0})

    @dataclass
    class Options:
        mode: Literal["select", "weight"] = option("select", "select the predicted-hard tokens from 2·B candidates, or up-weight them")
        hardness: float = option(0.5, "final share α_T of predicted-hard tokens (select) or weight slope (weight)")
        hidden: int = option(64, "hidden width of the loss predictor")
        pairs: int = option(256, "random token pairs per step for the ranking loss")
        outlier_factor: float = option(4.0, "tokens above this × the median norm are never ranked hard")

    def validate(self) -> None:
        if not 0.0 <= self.opts.hardness <= 1.0 and self.opts.mode == "select":
            raise ConfigError(f"hard_tokens: hardness must be in [0, 1] for mode=select, got {self.opts.hardness}")
        if self.opts.hardness < 0 or self.opts.hidden < 1 or self.opts.pairs < 1 or self.opts.outlier_factor <= 0:
            raise ConfigError("hard_tokens: hardness must be >= 0, hidden and pairs >= 1, outlier_factor > 0")
        self.oversample = 2 if self.opts.mode == "select" else 1

    def setup(self, trainer) -> None:
        d = trainer.sae.cfg.d_in
        with torch.random.fork_rng():  # seeded init that leaves the run's (checkpointed) RNG stream alone
            torch.manual_seed(trainer.cfg.seed)
            self.modules["predictor"] = nn.Sequential(nn.Linear(d, self.opts.hidden), nn.GELU(),
                                                      nn.Linear(self.opts.hidden, 1))
        self.trainer = trainer

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted loss scores [B] for raw activations (only their order matters)."""
        x_n, _ = self.trainer.sae.normalize(x)
        return self.modules["predictor"](x_n.detach()).squeeze(1)

    def share(self, step: int) -> float:
        return self.opts.hardness * step / max(self.trainer.cfg.total_steps, 1)

    def transform_batch(self, batch: Batch, trainer) -> Batch:
        generator = derived_generator("hard_tokens", trainer.cfg.seed, trainer.step)
        with torch.no_grad():
            predicted = self.predict(batch.x)
            norms = batch.x.norm(dim=1)
            eligible = norms <= self.opts.outlier_factor * norms.median()
        alpha = self.share(trainer.step)
        if self.opts.mode == "select":
            keep = trainer.cfg.batch_size
            rows = select_hard(predicted, keep, round(alpha * keep), generator, eligible)
            batch.x = batch.x[rows]
            batch.extras["hard_tokens/hard"] = round(alpha * keep)
            return batch
        rank = predicted.argsort().argsort().to(torch.float32) / max(predicted.numel() - 1, 1)
        weight = 1.0 + alpha * torch.where(eligible, rank, torch.zeros_like(rank))
        batch.weight = weight / weight.mean() if batch.weight is None else batch.weight * weight / weight.mean()
        return batch

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.out
        per_token = (out.x_hat_n - out.x_n).pow(2).sum(1).detach()
        predicted = self.modules["predictor"](out.x_n.detach()).squeeze(1)
        generator = derived_generator("hard_tokens-pairs", ctx.trainer.cfg.seed, ctx.step)
        loss = pairwise_ranking_loss(predicted, per_token, self.opts.pairs, generator)
        ctx.logs["hard_tokens/share"] = self.share(ctx.step)
        return {"ranking": loss}

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        from scipy.stats import spearmanr

        x = heldout_tokens(trainer)
        was_training = sae.training
        sae.eval()
        try:
            x_hat = sae(x)
        finally:
            sae.train(was_training)
        error = (x - x_hat).pow(2).sum(1)
        spread = (x - x.mean(0)).pow(2).sum(1)
        worst = error.topk(max(1, x.shape[0] // 10)).indices
        predicted = self.predict(x)
        return {"tail_fvu": float(error[worst].sum() / spread[worst].sum()),
                "predictor_spearman": float(spearmanr(predicted.numpy(), error.numpy()).statistic)}

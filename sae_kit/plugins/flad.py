"""EXP3-FLAD and UCB1-FLAD: bandit mixing of activation sources ("Improving few-shot generalization by
exploring and exploiting auxiliary data", FLAD; after the official batched trainers).

Each step trains on a whole batch from one source a ~ π (the paper's batched FLAD). The source's
gradient sketch ∇_a (reconstruction gradient on a fixed random subset of decoder rows) is kept as a
running mean. Every ``every`` steps the target's gradient ∇_T is taken on a sample of the run's own
data (the target domain) and each source's reward is smoothed:
``R̂_a ← (1 − β)·R̂_a + β·cos(∇_T, ∇_a)``.

- EXP3: ``Ĝ_a += R̂_a / π_a``; ``ε_t = min(1/K, √(ln K / (K·t)))``;
  ``π = (1 − K·ε_t)·softmax(ε_{t−1}·Ĝ) + ε_t`` (t = number of reward updates; the code's t counts
  steps × 10, our choice follows the paper's notation).
- UCB1: play each source once, then ``argmax_a R̂_a + √(2 ln t / n_a)`` (n_a = plays).

SAE adaptation [plugins.md A2]: sources are activation sources (stores joined by ``+``, or
``auto`` on synthetic data: the run's planted set plus ``count − 1`` sets with other dictionaries),
the target is the run's own data, gradients are of the reconstruction loss only (detached from the
training step's other terms: ``torch.func.grad`` of a fresh forward pass in eval mode, so no
running statistic moves). ``policy=uniform`` draws sources uniformly (the baseline).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.distributions import Categorical
from torch.func import functional_call, grad

from sae_kit.config import ConfigError
from sae_kit.plugins._sources import SourceCursor, open_sources
from sae_kit.plugins.api import Ablation, Batch, Plugin, StepContext, option
from sae_kit.seeding import derived_generator


def reconstruction_gradient(sae, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The reconstruction loss's gradient on the decoder rows ``rows``, flattened.

    ``torch.func.grad`` over ``functional_call`` with the decoder as the only argument, in eval mode:
    no ``.grad`` is touched and no running statistic moves.
    """
    was_training = sae.training
    sae.eval()

    def loss(W_dec: torch.Tensor) -> torch.Tensor:
        return (functional_call(sae, {"W_dec": W_dec}, (x,)) - x).pow(2).sum(1).mean()

    try:
        with torch.enable_grad():
            gradient = grad(loss)(sae.W_dec.detach())
    finally:
        sae.train(was_training)
    return gradient.detach()[rows].flatten()


def exp3_probabilities(gains: torch.Tensor, eps_previous: float, eps: float) -> torch.Tensor:
    K = gains.numel()
    return (1 - K * eps) * torch.softmax(eps_previous * gains, 0) + eps


class _FLAD(Plugin):
    algorithm: str = ""
    ablation = Ablation(metric="fvu", baseline_options={"policy": "uniform"})

    @dataclass
    class Options:
        sources: str = option("auto", "activation-store folders joined by '+', or auto (synthetic data)", path="stores")
        count: int = option(4, "number of synthetic sources with sources=auto")
        every: int = option(10, "steps between reward updates (the paper's G)")
        beta: float = option(0.5, "reward smoothing β")
        rows: int = option(256, "decoder rows in the gradient sketch")
        target_tokens: int = option(1024, "target-domain tokens per reward update")
        policy: Literal["bandit", "uniform"] = option("bandit", "bandit, or uniform mixing (the ablation's baseline)")

    def validate(self) -> None:
        if self.opts.every < 1 or self.opts.rows < 1 or self.opts.count < 2 or not 0 < self.opts.beta <= 1:
            raise ConfigError(f"{self.name}: need every >= 1, rows >= 1, count >= 2 and 0 < beta <= 1")

    def setup(self, trainer) -> None:
        cfg = trainer.cfg
        self.seed = cfg.seed
        self.cursor = SourceCursor(open_sources(self.opts.sources, trainer, self.opts.count), cfg.batch_size,
                                   cfg.seed, cfg.heldout_fraction, self.name)
        K = len(self.cursor.sources)
        self.K = K
        d_sae = trainer.sae.cfg.d_sae
        self.rows = torch.randperm(d_sae, generator=derived_generator(self.name, cfg.seed))[: min(self.opts.rows, d_sae)]
        self.pi = torch.full((K,), 1.0 / K, dtype=torch.float64)
        self.gains = torch.zeros(K, dtype=torch.float64)
        self.rewards = torch.zeros(K, dtype=torch.float64)
        self.plays = torch.zeros(K, dtype=torch.int64)
        self.sketches = torch.zeros(K, len(self.rows) * trainer.sae.cfg.d_in)
        self.has_sketch = torch.zeros(K, dtype=torch.bool)
        self.updates = 0
        self.eps = 1.0 / K
        self.arm = 0

    def choose(self, step: int) -> int:
        if self.opts.policy == "uniform" or self.algorithm == "exp3":
            pi = torch.full((self.K,), 1.0 / self.K) if self.opts.policy == "uniform" else self.pi
            generator = derived_generator(self.name, "arm", self.seed, step)
            return int(torch.multinomial(pi.float(), 1, generator=generator))
        unplayed = (self.plays == 0).nonzero()
        if len(unplayed):
            return int(unplayed[0])
        t = max(int(self.plays.sum()), 1)
        return int((self.rewards + torch.sqrt(2 * math.log(t) / self.plays.double())).argmax())

    def transform_batch(self, batch: Batch, trainer) -> Batch:
        self.arm = self.choose(trainer.step)
        self.plays[self.arm] += 1
        x = self.cursor.next(self.arm)
        return Batch(x, source=torch.full((x.shape[0],), self.arm, dtype=torch.int64))

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        if self.opts.policy == "uniform" or ctx.sae.W_dec.grad is None:
            return
        sketch = reconstruction_gradient(ctx.sae, ctx.batch.x, self.rows)
        a = self.arm
        self.sketches[a] = sketch if not self.has_sketch[a] else 0.5 * (self.sketches[a] + sketch)
        self.has_sketch[a] = True

    def after_step(self, ctx: StepContext) -> None:
        for a in range(self.K):
            ctx.logs[f"{self.name}/pi_{a}"] = float(self.pi[a])
        if self.opts.policy == "uniform" or (ctx.step + 1) % self.opts.every:
            return
        trainer = ctx.trainer
        x = trainer.source.sample(self.opts.target_tokens, seed=trainer.cfg.seed + 1 + self.updates,
                                  heldout_fraction=trainer.cfg.heldout_fraction).to(torch.float32)
        target = reconstruction_gradient(ctx.sae, x, self.rows)
        self.update(target)

    def update(self, target_gradient: torch.Tensor) -> None:
        """One reward update from the target gradient (exposed for tests)."""
        for a in range(self.K):
            if self.has_sketch[a]:
                cosine = F.cosine_similarity(target_gradient, self.sketches[a], dim=0).double()
                self.rewards[a] = (1 - self.opts.beta) * self.rewards[a] + self.opts.beta * cosine
        self.updates += 1
        if self.algorithm == "exp3":
            self.gains += self.rewards / self.pi
            eps_previous, self.eps = self.eps, min(1.0 / self.K, math.sqrt(math.log(self.K) / (self.K * self.updates)))
            self.pi = exp3_probabilities(self.gains, eps_previous, self.eps)
        else:
            t = max(int(self.plays.sum()), 1)
            scores = self.rewards + torch.sqrt(2 * math.log(t) / self.plays.clamp_min(1).double())
            self.pi = torch.nn.functional.one_hot(scores.argmax(), self.K).double()

    def evaluate(self, sae, trainer) -> dict[str, Any]:
        result = {f"pi_{a}": float(self.pi[a]) for a in range(self.K)}
        result["entropy"] = float(Categorical(probs=self.pi).entropy())
        result.update({f"plays_{a}": int(self.plays[a]) for a in range(self.K)})
        return result

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pi": self.pi, "gains": self.gains, "rewards": self.rewards,
                "plays": self.plays, "sketches": self.sketches, "has_sketch": self.has_sketch,
                "updates": self.updates, "eps": self.eps, "position": self.cursor.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key in ("pi", "gains", "rewards", "plays", "sketches", "has_sketch"):
            setattr(self, key, state[key].clone())
        self.updates, self.eps = state["updates"], state["eps"]
        self.cursor.restore(state["position"])


class EXP3FLAD(_FLAD):
    name = "exp3_flad"
    algorithm = "exp3"
    paper = "FLAD: exploring and exploiting auxiliary data (EXP3-FLAD)"
    summary = "mix activation sources with an EXP3 bandit rewarded by gradient agreement with the target"
    conflicts = frozenset({"ucb1_flad"})


class UCB1FLAD(_FLAD):
    name = "ucb1_flad"
    algorithm = "ucb1"
    paper = "FLAD: exploring and exploiting auxiliary data (UCB1-FLAD)"
    summary = "mix activation sources with a UCB1 bandit rewarded by gradient agreement with the target"
    conflicts = frozenset({"exp3_flad"})

"""MixUp code-linearity consistency, with AdaMixUp's intrusion guard (after "MixUp as Locally Linear
Out-Of-Manifold Regularization", AdaMixUp).

MixUp trains on x_mix = λx_i + (1 − λ)x_j with the labels mixed the same way; AdaMixUp learns the
mixing policy together with an *intrusion discriminator* that tells mixed points from real ones, and
drops mixes that collide with the data manifold. For an autoencoder the label of x_mix is x_mix itself,
so plain MixUp has no label conflict; the SAE form is the linear-representation hypothesis made a
regulariser [our adaptation, plugins.md B17]:

    L = coefficient · mean_pairs ‖z(x_mix) − top_k(λ z(x_i) + (1 − λ) z(x_j))‖² / mean ‖target‖²

with λ ~ Beta(α, α) (α = 0.2: near 0 or 1, away from intrusion), pairs drawn within the batch
(``fraction`` of the batch size), the target codes detached (they are this step's codes of the real
tokens). The mixture's union support can hold 2k latents while a TopK-family SAE codes x_mix with k, so
the target is cut to its top k by magnitude [chosen; plugins.md offers this or k_mix = 2k]; rules
without a k (top-AFA, GBA, ReLU) compare the full target. The mixed codes come from the SAE's inference
rule (no side effects on batch statistics) with gradients through the gathered pre-activations. The
divisor makes the term scale-free [chosen].

``discriminator=true`` adds AdaMixUp's guard: a small MLP D_ψ trained (BCE, its own term) to tell real
from mixed inputs; mixes it scores as real (σ(D_ψ(x_mix)) > 0.5: intrusions) are left out of the
consistency term. ``evaluate`` reports ``linearity_error`` on held-out pairs (the term's value without
the coefficient, λ ~ U(0, 1)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Beta

from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError
from sae_kit.plugins._heldout import heldout_tokens
from sae_kit.plugins.api import Ablation, Plugin, StepContext, option
from sae_kit.seeding import derived_generator


def mixed_target(first: SparseCodes, second: SparseCodes, lam: torch.Tensor, k: int | None) -> torch.Tensor:
    """Dense [M, d_sae] λ·z_i + (1 − λ)·z_j, cut to its top-k entries by magnitude when k is given."""
    target = lam[:, None] * first.to_dense() + (1 - lam[:, None]) * second.to_dense()
    if k is not None and k < target.shape[1]:
        keep = target.abs().topk(k, dim=1).indices
        target = torch.zeros_like(target).scatter(1, keep, target.gather(1, keep))
    return target


def codes_with_gradient(sae, x: torch.Tensor) -> torch.Tensor:
    """Dense [M, d_sae] codes of ``x`` by the SAE's inference rule, with gradients to the encoder."""
    x_n, _ = sae.normalize(x)
    pre = sae.pre_activations(x_n)
    was_training = sae.training
    sae.eval()  # the inference rule: no running statistics are touched by the mixed tokens
    try:
        with torch.no_grad():
            selected = sae.select(pre.detach(), x_n)
    finally:
        sae.train(was_training)
    values = sae.code_values(pre.gather(1, selected.indices), selected)
    return SparseCodes(selected.indices, values, sae.cfg.d_sae).to_dense()


def consistency(mixed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (mixed - target).pow(2).sum(1).mean() / target.pow(2).sum(1).mean().clamp_min(1e-12)


class MixUp(Plugin):
    name = "mixup"
    paper = "MixUp as Locally Linear Out-Of-Manifold Regularization (AdaMixUp)"
    summary = "consistency: codes of λx_i + (1−λ)x_j match λz_i + (1−λ)z_j (λ ~ Beta(α, α)); optional intrusion guard"
    lr_scale = 10.0
    ablation = Ablation(metric="mmcs", higher_is_better=True)

    @dataclass
    class Options:
        coefficient: float = option(0.1, "weight of the consistency term")
        alpha: float = option(0.2, "λ ~ Beta(α, α)")
        fraction: float = option(0.25, "mixed pairs per step, as a fraction of the batch size")
        discriminator: bool = option(False, "AdaMixUp intrusion guard: drop mixes a real-vs-mixed MLP scores as real")
        hidden: int = option(32, "hidden width of the discriminator")

    def validate(self) -> None:
        if self.opts.coefficient < 0 or not self.opts.alpha > 0 or not 0 < self.opts.fraction <= 1 or self.opts.hidden < 1:
            raise ConfigError("mixup: coefficient must be >= 0, alpha > 0, fraction in (0, 1], hidden >= 1")

    def setup(self, trainer) -> None:
        if self.opts.discriminator:
            d = trainer.sae.cfg.d_in
            with torch.random.fork_rng():
                torch.manual_seed(trainer.cfg.seed)
                self.modules["discriminator"] = nn.Sequential(nn.Linear(d, self.opts.hidden), nn.GELU(),
                                                              nn.Linear(self.opts.hidden, 1))

    def pairs(self, batch: int, step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = derived_generator("mixup", seed, step)
        count = max(1, round(self.opts.fraction * batch))
        i = torch.randint(0, batch, (count,), generator=generator)
        j = torch.randint(0, batch, (count,), generator=generator)
        # Beta draws from a Dirichlet under the global RNG; seed it from (seed, step) for a pure function.
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
            lam = Beta(torch.tensor(self.opts.alpha), torch.tensor(self.opts.alpha)).sample((count,))
        return i, j, lam

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        sae, x = ctx.sae, ctx.batch.x
        i, j, lam = self.pairs(x.shape[0], ctx.step, ctx.trainer.cfg.seed)
        x_mix = lam[:, None] * x[i] + (1 - lam[:, None]) * x[j]
        codes = ctx.out.codes.detach()
        rows = lambda index: SparseCodes(codes.indices[index], codes.values[index], codes.d_sae)  # noqa: E731
        target = mixed_target(rows(i), rows(j), lam.to(codes.values.dtype), ctx.k if sae.uses_k else None)
        terms = {}
        keep = torch.ones(x_mix.shape[0], dtype=torch.bool)
        if self.opts.discriminator:
            critic = self.modules["discriminator"]
            real, fake = critic(x.detach()).squeeze(1), critic(x_mix.detach()).squeeze(1)
            terms["discriminator"] = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                                      + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
            keep = torch.sigmoid(fake.detach()) <= 0.5
            ctx.logs["mixup/intrusions"] = float((~keep).float().mean())
        if bool(keep.any()):
            terms["consistency"] = self.opts.coefficient * consistency(codes_with_gradient(sae, x_mix[keep]), target[keep])
        return terms

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        x = heldout_tokens(trainer, 2048)
        generator = derived_generator("mixup-eval", trainer.cfg.seed)
        i, j = torch.randperm(x.shape[0], generator=generator), torch.randperm(x.shape[0], generator=generator)
        lam = torch.rand(x.shape[0], generator=generator)
        was_training = sae.training
        sae.eval()
        try:
            first, second = sae.encode(x[i]), sae.encode(x[j])
            target = mixed_target(first, second, lam, sae.cfg.k if sae.uses_k else None)
            mixed = sae.encode(lam[:, None] * x[i] + (1 - lam[:, None]) * x[j]).to_dense()
        finally:
            sae.train(was_training)
        return {"linearity_error": float(consistency(mixed, target))}

"""Weight Compander reparametrisation of the encoder (after "Weight Compander: A Simple Weight
Reparameterization for Regularization", Cakaj, Mehnert, Yang 2023).

The paper replaces each weight by a nonlinear function of a free parameter that restricts the
weight's magnitude and pushes it away from zero, with learnable shape hyperparameters. Its closed form
could not be retrieved (plugins.md B11 marks it unverified), so we chose one with the shape the abstract
describes: odd, bounded, steeper than the identity at 0,

    W_enc = β · tanh(α · W̃ / β),      |W_enc| < β,   dW_enc/dW̃ = α at W̃ = 0 (α > 1 expands small weights),

registered with ``torch.nn.utils.parametrize`` on ``W_enc`` only: the decoder's rows are renormalised
every step, which a compander would fight [plugins.md B11]. β starts at ``bound`` × max|W_enc| (so
the initial weights are representable: W̃ = β/α · atanh(W_enc/β)) and α at ``alpha``; with
``learnable=true`` both are trained (as log α, log β, in the plugin's optimizer group). A near-zero
weight's gradient is multiplied by α (it is "reactivated"), a large weight's by α·sech² → 0 (its
magnitude is restricted). The final SAE holds the companded weights (the parametrisation is baked).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from sae_kit.config import ConfigError
from sae_kit.plugins.api import Ablation, Plugin, StepContext, option


class CompanderShape(nn.Module):
    """The compander's shape (log α, log β): plugin state, optionally trained."""

    def __init__(self, alpha: float, beta: float, learnable: bool):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)), requires_grad=learnable)
        self.log_beta = nn.Parameter(torch.tensor(math.log(beta)), requires_grad=learnable)

    def forward(self, free: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.log_alpha.exp().to(free.dtype), self.log_beta.exp().to(free.dtype)
        return beta * torch.tanh(alpha * free / beta)

    @torch.no_grad()
    def inverse(self, weight: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.log_alpha.exp(), self.log_beta.exp()
        return beta / alpha * torch.atanh((weight / beta).clamp(-1 + 1e-6, 1 - 1e-6))


class Compand(nn.Module):
    """The parametrisation: applies a ``CompanderShape`` it does not own (the plugin's module does)."""

    def __init__(self, shape: CompanderShape):
        super().__init__()
        self._shape = (shape,)  # a tuple, so the shape is not a submodule of the SAE

    def forward(self, free: torch.Tensor) -> torch.Tensor:
        return self._shape[0](free)


class WeightCompander(Plugin):
    name = "compander"
    paper = "Weight Compander: A Simple Weight Reparameterization for Regularization"
    summary = "encoder weights W = β·tanh(αW̃/β): bounded, expanded near 0 (revives near-zero weights); α, β learned"
    ablation = Ablation(metric="dead_fraction")

    @dataclass
    class Options:
        alpha: float = option(2.0, "initial slope at 0 (> 1 pushes small weights away from zero)")
        bound: float = option(1.5, "initial magnitude bound β as a multiple of the initial max |W_enc|")
        learnable: bool = option(True, "train α and β with the SAE")

    def validate(self) -> None:
        if not self.opts.alpha > 0:
            raise ConfigError(f"compander: alpha must be > 0, got {self.opts.alpha}")
        if not self.opts.bound > 1:
            raise ConfigError(f"compander: bound must be > 1 (the initial weights must lie inside it), got {self.opts.bound}")

    def setup(self, trainer) -> None:
        sae = trainer.sae
        beta = self.opts.bound * float(sae.W_enc.detach().abs().max())
        self.modules["shape"] = CompanderShape(self.opts.alpha, beta, self.opts.learnable)
        if not trainer.resumed:  # a resumed checkpoint already holds the free tensor W̃
            with torch.no_grad():
                sae.W_enc.copy_(self.modules["shape"].inverse(sae.W_enc))
        parametrize.register_parametrization(sae, "W_enc", Compand(self.modules["shape"]))

    def after_step(self, ctx: StepContext) -> None:
        shape = self.modules["shape"]
        ctx.logs["compander/alpha"] = shape.log_alpha.exp().item()
        ctx.logs["compander/beta"] = shape.log_beta.exp().item()

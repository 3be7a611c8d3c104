"""Self-Tuning Networks: tune hyperparameters online through a learned best-response of the weights
("Self-tuning networks: bilevel optimization of hyperparameters using structured best-response
functions", STN).

STN gates hidden units by a linear function of the hyperparameters λ, so the weights approximate
their best response ŵ(λ), and alternates: ``every`` training steps on L_train(ŵ(λ̂)) with perturbed
λ̂ = λ + σ ⊙ ε, then one step on L_val(ŵ(λ)) − τ · H[N(λ, σ²)] with respect to (λ, log σ). The
hyperparameters themselves need not be differentiable in the training loss (augmentation strengths,
discrete choices): only the best-response carries the gradient.

SAE adaptation [plugins.md B22; our choices marked]:
- λ = (log aux_coefficient, log noise): the AuxK weight and the strength of a denoising augmentation
  (training input x + e^{λ₁} · std(x) · ε, target the clean x) [ours: two hyperparameters that do not
  set the sparsity/fidelity trade-off itself; k is the user's and is not tuned];
- best response, bias only (flat memory): b_enc(λ̂) = b_enc + U (λ̂ − λ₀), U ∈ R^{d_sae × 2} starting
  at 0 (a plugin module, trained with the SAE), λ₀ the initial λ, via ``torch.nn.utils.parametrize``
  [ours: STN's (U λ̂) ⊙ b′ with b′ folded into U];
- validation step: FVU-normalised reconstruction of a held-out batch of the run's data at the fixed k
  (eval mode, clean input), gradient to λ through U (``torch.autograd.grad``: the SAE's .grad untouched);
  the Gaussian entropy Σ log σ + const is subtracted with weight τ [the reference marks this term from
  memory; we use the perturbation distribution's entropy] and (λ, log σ) take one Adam step.

Defaults [the reference's]: every = 5 (T_train = 5, T_val = 1), hyper_lr = 3e-3, τ = 1e-3; [chosen]:
initial noise 0.05, initial σ = 0.5 (log-space). The final SAE keeps b_enc at λ (no perturbation) and
its cfg.json records the tuned aux_coefficient; ``evaluate`` reports the final λ as numbers.

Measured [ablations/stn-topk.json; `sae-kit ablate --plugin stn --data synthetic --seeds 3`: topk,
planted sharkey d=64, d_sae 512, k 5, 500 steps]: neutral. FVU 0.3611 → 0.3607 (paired difference
−0.0004 ± 0.0009).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from sae_kit.config import ConfigError
from sae_kit.plugins.api import Ablation, Batch, Plugin, StepContext, option
from sae_kit.seeding import derived_generator

HYPERPARAMETERS = ("aux_coefficient", "noise")


class BiasResponse(nn.Module):
    """b ↦ b + U (λ̂ − λ₀): the encoder bias's linear response to the hyperparameters."""

    def __init__(self, plugin: "STN"):
        super().__init__()
        self._plugin = [plugin]  # a plain reference: U lives in the plugin's modules

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        plugin = self._plugin[0]
        offset = (plugin.current - plugin.reference).to(bias.dtype)
        return bias + plugin.modules["response"].weight @ offset


class STN(Plugin):
    name = "stn"
    paper = "Self-tuning networks (STN)"
    summary = "tune the AuxK weight and a denoising-noise level online through a learned encoder-bias best response"
    ablation = Ablation(metric="fvu")

    @dataclass
    class Options:
        every: int = option(5, "training steps per hyperparameter step (T_train; T_val = 1)")
        hyper_lr: float = option(3e-3, "Adam learning rate of (λ, log σ)")
        entropy: float = option(1e-3, "weight τ of the perturbation entropy")
        noise: float = option(0.05, "initial denoising noise, as a fraction of std(x)")
        sigma: float = option(0.5, "initial perturbation scale σ of λ (log space)")
        val_tokens: int = option(1024, "held-out tokens per hyperparameter step")

    def validate(self) -> None:
        o = self.opts
        if o.every < 1 or o.hyper_lr <= 0 or o.entropy < 0 or o.noise <= 0 or o.sigma <= 0 or o.val_tokens < 1:
            raise ConfigError("stn: need every >= 1, hyper_lr > 0, entropy >= 0, noise > 0, sigma > 0, val_tokens >= 1")

    def setup(self, trainer) -> None:
        sae = trainer.sae
        if not sae.trains_encoder_bias:
            raise ConfigError(f"stn: the {sae.architecture} architecture sets its encoder bias by its own rule; "
                              "the best response lives in b_enc, so use an architecture that trains it (topk, batchtopk...)")
        self.seed = trainer.cfg.seed
        initial = [math.log(max(trainer.cfg.aux_coefficient, 1e-12)), math.log(self.opts.noise)]
        self.reference = torch.tensor(initial)
        self.hyper = torch.tensor(initial, requires_grad=True)
        self.log_sigma = torch.full((2,), math.log(self.opts.sigma), requires_grad=True)
        self.hyper_optimizer = torch.optim.Adam([self.hyper, self.log_sigma], lr=self.opts.hyper_lr)
        self.current = self.hyper.detach().clone()
        self.updates = 0
        response = nn.Linear(2, sae.cfg.d_sae, bias=False)
        nn.init.zeros_(response.weight)
        self.modules["response"] = response
        parametrize.register_parametrization(sae, "b_enc", BiasResponse(self), unsafe=True)

    def hyperparameters(self, hp: dict[str, Any], trainer) -> None:
        noise = torch.randn(2, generator=derived_generator(self.name, self.seed, trainer.step))
        self.current = (self.hyper + self.log_sigma.exp() * noise).detach()
        trainer.sae.cfg.aux_coefficient = float(self.current[0].exp())

    def transform_batch(self, batch: Batch, trainer) -> Batch:
        generator = derived_generator(self.name, "noise", self.seed, trainer.step)
        scale = float(self.current[1].exp()) * batch.x.std().item()
        noise = torch.randn(batch.x.shape, generator=generator).to(batch.x)
        target = batch.x if batch.target is None else batch.target
        return Batch(batch.x + scale * noise, target=target, weight=batch.weight, source=batch.source, extras=batch.extras)

    def validation_loss(self, sae, x: torch.Tensor, input_variance: float) -> torch.Tensor:
        """Held-out reconstruction at λ (no perturbation, clean input), differentiable in λ through U."""
        self.current = self.hyper
        was_training = sae.training
        sae.eval()
        try:
            with torch.enable_grad():
                return sae.training_forward(x, input_variance).parts["reconstruction"]
        finally:
            sae.train(was_training)

    def hyper_step(self, sae, x: torch.Tensor, input_variance: float) -> float:
        """One step of (λ, log σ) on L_val − τ·H (exposed for tests); returns L_val before the step."""
        val = self.validation_loss(sae, x, input_variance)
        objective = val - self.opts.entropy * self.log_sigma.sum()  # H = Σ log σ + const
        grads = torch.autograd.grad(objective, [self.hyper, self.log_sigma], allow_unused=True)
        for tensor, grad in zip((self.hyper, self.log_sigma), grads):
            tensor.grad = torch.zeros_like(tensor) if grad is None else grad
        self.hyper_optimizer.step()
        self.current = self.hyper.detach().clone()
        self.updates += 1
        return val.item()

    def after_step(self, ctx: StepContext) -> None:
        ctx.logs["stn/aux_coefficient"] = float(self.hyper.detach()[0].exp())
        ctx.logs["stn/noise"] = float(self.hyper.detach()[1].exp())
        if (ctx.step + 1) % self.opts.every:
            return
        cfg = ctx.trainer.cfg
        x = next(ctx.trainer.source.iter_batches(self.opts.val_tokens, split="heldout", seed=cfg.seed + 1 + self.updates,
                                                 epochs=1, drop_last=False, heldout_fraction=cfg.heldout_fraction))
        ctx.logs["stn/val_loss"] = self.hyper_step(ctx.sae, x.float(), ctx.trainer.input_variance)

    def posthoc(self, sae, trainer):
        self.current = self.hyper.detach().clone()  # the baked b_enc is the response at λ
        sae.cfg.aux_coefficient = float(self.hyper.detach()[0].exp())
        return sae

    def evaluate(self, sae, trainer) -> dict[str, Any]:
        return {"aux_coefficient": float(self.hyper.detach()[0].exp()), "noise": float(self.hyper.detach()[1].exp()),
                "sigma_aux": float(self.log_sigma.detach()[0].exp()), "sigma_noise": float(self.log_sigma.detach()[1].exp())}

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "hyper": self.hyper.detach(), "log_sigma": self.log_sigma.detach(),
                 "updates": self.updates}
        for index, tensor in enumerate((self.hyper, self.log_sigma)):
            for key, value in self.hyper_optimizer.state.get(tensor, {}).items():
                state[f"adam.{index}.{key}"] = value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.hyper.copy_(state["hyper"])
            self.log_sigma.copy_(state["log_sigma"])
        self.updates = state["updates"]
        for index, tensor in enumerate((self.hyper, self.log_sigma)):
            entries = {key.split(".", 2)[2]: value.clone() for key, value in state.items()
                       if key.startswith(f"adam.{index}.")}
            if entries:
                self.hyper_optimizer.state[tensor] = entries
        self.current = self.hyper.detach().clone()

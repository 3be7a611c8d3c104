"""VA-π-style downstream alignment: a final phase that trains the SAE, spliced into its language model,
on the model's output distribution ("VA-π: variational policy alignment for pixel-aware autoregressive
generation").

VA-π fixes the mismatch between a tokenizer trained for reconstruction and a generator that consumes
its tokens with a short post-training phase on the downstream objective, keeping reconstruction as an
ELBO-style regulariser. The SAE has the same mismatch: it is trained on MSE, while what matters is the
model's behaviour with x̂ spliced in. In the last ``phase`` of the run (5 % by default) each step adds

    kl_weight · KL(p_model(· | x) ‖ p_model(· | x̂ spliced at the hook))

on ``windows`` fresh text windows, to the usual reconstruction loss (the anchor, β = 1). The KL is
differentiable in x̂ through the frozen model, so we use exact gradients where the paper, whose
tokens are discrete, uses REINFORCE: the adaptation keeps the objective and the schedule, not the
estimator [plugins.md A7]. BOS positions are left untouched, as in the in-model evaluation.
The engine's schedule decays the learning rate to 0 at the end of the run, so the phase runs at a
constant ``phase_lr`` × the base rate instead (0.3, the reference's "0.3× the main lr" [our choice]);
with ``kl_weight=0`` the same phase runs on the MSE alone: the control with the same extra steps.

``model`` / ``hook`` default to the run's (``--model/--hook``) or the store's provenance; ``evaluate``
runs ``sae_kit.eval.in_model.evaluate_in_model`` (CE-loss recovered, KL, Δ LM loss) on held-out text.
``kl_weight=0`` drops the KL term and keeps the evaluation (the ablation's baseline).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_kit.config import ConfigError
from sae_kit.plugins._text_model import TextModelPlugin
from sae_kit.plugins.api import Ablation, StepContext, option


class DownstreamKL(TextModelPlugin):
    name = "downstream_kl"
    paper = "VA-π (variational policy alignment)"
    summary = "final phase: KL of the model's next-token distribution with the SAE spliced in, plus the MSE anchor"
    ablation = Ablation(metric="downstream_kl/ce_recovered_vs_zero", higher_is_better=True,
                        baseline_options={"kl_weight": 0.0})

    @dataclass
    class Options:
        model: str = option("", "language model (default: the run's --model or the store's model_name)", path="model")
        hook: str = option("", "hook the SAE reads (default: the run's --hook or the store's hook_name)")
        dataset: str = option("default", "text for the KL phase (train split) and the evaluation (held-out split)", path="dataset")
        context: int = option(64, "tokens per window")
        windows: int = option(4, "text windows per step in the phase")
        kl_weight: float = option(1.0, "weight of the KL term (0: evaluation only)")
        phase: float = option(0.05, "final fraction of the run with the KL term")
        phase_lr: float = option(0.3, "learning rate in the phase, as a fraction of the run's base rate")
        eval_tokens: int = option(8192, "held-out text tokens for CE-loss recovered")

    def validate(self) -> None:
        if not 0 < self.opts.phase <= 1:
            raise ConfigError(f"downstream_kl: phase must be in (0, 1], got {self.opts.phase}")
        if self.opts.context < 2 or self.opts.windows < 1 or self.opts.kl_weight < 0:
            raise ConfigError("downstream_kl: need context >= 2, windows >= 1 and kl_weight >= 0")
        self.window = (1.0 - self.opts.phase, 1.0)

    def hyperparameters(self, hp: dict[str, Any], trainer) -> None:
        hp["lr"] = self.opts.phase_lr * trainer.base_lr

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.opts.kl_weight == 0:
            return {}
        kl = self.text.spliced_kl(ctx.sae)
        ctx.logs["downstream_kl/kl"] = kl.item()
        return {"kl": self.opts.kl_weight * kl}

    def evaluate(self, sae, trainer) -> dict[str, Any]:
        return self.text.evaluate(sae, self.opts.eval_tokens)

"""A learned noise-mask policy trained by policy gradient, in an early "heating" phase (after "Policy
Gradient-Driven Noise Mask").

The paper: a light policy network outputs Beta(α, β) parameters, samples an input-specific noise mask,
and is trained by REINFORCE with a reward from the classifier; the noisy phase only pre-trains an
intermediate ("heated") model, which is then fine-tuned clean. For an SAE [our adaptation, plugins.md
B12]:

- policy π_φ(x): a linear map d_in → 2·d_in on the normalised input, softplus + 1 → Beta(a, b) per
  dimension (a, b > 1: unimodal);
- the SAE's input is x̃ = x + σ · m ⊙ ε · std(x), m ~ π_φ(·|x), ε ~ N(0, I), std(x) the per-dimension
  standard deviation of the data (measured once at set-up); the target stays the clean x (denoising);
- the policy loss is REINFORCE, −(R − b̄) · log π_φ(m|x) averaged over the batch, with R the SAE's
  detached per-token loss and b̄ an EMA baseline (decay 0.9). The paper's reward sign (whether the
  policy seeks harder or easier noise) is unverified here [plugins.md B12]; ``reward=harder`` (default:
  a bounded adversary, the mask can at most reach σ) maximises the SAE's loss, ``easier`` minimises it;
- the plugin is active for the first ``heat`` fraction of the run (default 0.3), then training is clean.

``evaluate`` reports ``perturbed_fvu`` (held-out tokens + 0.5·rms‖x‖ along a random decoder direction,
as a steering server perturbs them) and ``clean_fvu``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Beta

from sae_kit.config import ConfigError
from sae_kit.plugins._heldout import fvu, heldout_tokens, perturbed_fvu, training_sample
from sae_kit.plugins.api import Ablation, Batch, Plugin, StepContext, option

STEERING_STRENGTH = 0.5
BASELINE_DECAY = 0.9


class MaskPolicy(nn.Module):
    """π_φ(m | x): independent Beta(a, b) per input dimension, a, b = 1 + softplus(linear(x))."""

    def __init__(self, d_in: int):
        super().__init__()
        self.linear = nn.Linear(d_in, 2 * d_in)
        nn.init.zeros_(self.linear.weight)  # starts input-independent: Beta(1 + ln 2, 1 + ln 2)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x_n: torch.Tensor) -> Beta:
        a, b = (1 + F.softplus(self.linear(x_n))).chunk(2, dim=1)
        return Beta(a, b)


def reinforce_loss(policy: MaskPolicy, x_n: torch.Tensor, mask: torch.Tensor, reward: torch.Tensor,
                   baseline: float) -> torch.Tensor:
    """−mean_b (R_b − b̄) · log π(m_b | x_b): its gradient is the REINFORCE estimate of −∇E[R]."""
    log_prob = policy(x_n.detach()).log_prob(mask.clamp(1e-6, 1 - 1e-6)).sum(1)
    return -((reward.detach() - baseline) * log_prob).mean()


class PolicyGradientNoise(Plugin):
    name = "pg_noise"
    paper = "Policy Gradient-Driven Noise Mask"
    summary = "early phase: a Beta policy (REINFORCE) picks per-dimension input-noise masks; denoising target"
    lr_scale = 10.0
    ablation = Ablation(metric="pg_noise/perturbed_fvu", baseline_options={"sigma": 0.0})

    @dataclass
    class Options:
        sigma: float = option(0.1, "noise scale σ, in units of each dimension's data std")
        heat: float = option(0.3, "fraction of the run with noise (the heating phase); clean afterwards")
        reward: Literal["harder", "easier"] = option("harder", "the policy maximises (harder) or minimises the SAE's loss")

    def validate(self) -> None:
        if self.opts.sigma < 0:
            raise ConfigError(f"pg_noise: sigma must be >= 0, got {self.opts.sigma}")
        if not 0 < self.opts.heat <= 1:
            raise ConfigError(f"pg_noise: heat must be in (0, 1], got {self.opts.heat}")
        self.window = (0.0, self.opts.heat)

    def setup(self, trainer) -> None:
        with torch.random.fork_rng():  # nn.Linear's init draws from the (checkpointed) global RNG: keep it apart
            self.modules["policy"] = MaskPolicy(trainer.sae.cfg.d_in)
        if not trainer.resumed:
            sample = training_sample(trainer, min(trainer.cfg.init_tokens, 4096), trainer.cfg.seed)
            self.modules.register_buffer("data_std", sample.std(0))
        else:
            self.modules.register_buffer("data_std", torch.zeros(trainer.sae.cfg.d_in))  # loaded next
        self.baseline = 0.0
        self.has_baseline = False

    def transform_batch(self, batch: Batch, trainer) -> Batch:
        if self.opts.sigma == 0:
            return batch
        x_n, _ = trainer.sae.normalize(batch.x)
        with torch.no_grad():
            mask = self.modules["policy"](x_n).sample()
        noise = self.opts.sigma * mask * torch.randn_like(batch.x) * self.modules.data_std
        batch.target = batch.x if batch.target is None else batch.target
        batch.extras["pg_noise"] = (x_n.detach(), mask)
        batch.x = batch.x + noise
        return batch

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if "pg_noise" not in ctx.batch.extras:
            return {}
        x_n, mask = ctx.batch.extras["pg_noise"]
        out, sae = ctx.out, ctx.sae
        _, norm = sae.normalize(ctx.batch.x)
        target_n = (ctx.batch.target - norm.shift) / norm.scale
        per_token = ((out.x_hat_n - target_n).pow(2).sum(1) / ctx.trainer.input_variance).detach()
        reward = per_token if self.opts.reward == "harder" else -per_token
        loss = reinforce_loss(self.modules["policy"], x_n, mask, reward, self.baseline if self.has_baseline else float(reward.mean()))
        mean_reward = float(reward.mean())
        self.baseline = mean_reward if not self.has_baseline else BASELINE_DECAY * self.baseline + (1 - BASELINE_DECAY) * mean_reward
        self.has_baseline = True
        ctx.logs["pg_noise/mask_mean"] = float(mask.mean())
        return {"policy": loss}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "baseline": self.baseline, "has_baseline": self.has_baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.baseline, self.has_baseline = float(state["baseline"]), bool(state["has_baseline"])

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        x = heldout_tokens(trainer)
        return {"perturbed_fvu": perturbed_fvu(sae, x, STEERING_STRENGTH, trainer.cfg.seed), "clean_fvu": fvu(sae, x)}

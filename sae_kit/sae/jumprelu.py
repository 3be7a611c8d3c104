"""JumpReLU SAE (Rajamanoharan et al. 2024), trained with straight-through estimators.

    f_i = h_i · H(h_i − θ_i)        one threshold θ_i > 0 per latent, kept in fp32, stored as ``threshold``

Loss: the normalised MSE (as every sae-kit SAE) plus λ·mean_b Σ_i H(h_i − θ_i) (``sparsity_loss=step``,
the paper's L0) or λ·mean_b Σ_i tanh(c·f_i/s) (``tanh``, Anthropic's Jan-2025 variant; our decoder rows
are unit-norm so ‖W_dec,i‖ = 1, and s is the data scale below, so c = 4 means what it means at unit scale).
The Heaviside step has no gradient; with the rectangle kernel K(u) = 1[|u| < ½] of bandwidth ε the
pseudo-derivatives are

    ∂f/∂θ = −(θ/ε)·K((h−θ)/ε)      ∂H/∂θ = −(1/ε)·K((h−θ)/ε)      ∂f/∂h = H(h−θ)

(``ste_to_input`` also routes the kernel terms into h, with the opposite sign, as SAELens'
``jumprelu_ste_to_input``). So θ learns only from the entries within ε/2 of it.

Sparse path: the selection is a mask, h > θ. While training, the entries inside the band
|h − θ| < ε/2 below the threshold are gathered too (with value 0), because the STE sends them θ's
gradient; nothing else of the [B, d_sae] matrix enters autograd.

Scale. The paper's θ₀ = ε = 0.001 assume unit-scale inputs, and Adam moves a parameter by about lr per
step whatever its scale (SAELens #494/#718: a log-θ or a badly scaled θ freezes). So ``init_from_data``
measures s, the median positive pre-activation of the initial sample, and by default sets
ε = 0.1·s (``bandwidth``), θ₀ at the quantile giving L0 = ``target_l0`` (else s) and θ's learning
rate to ``threshold_lr_scale``·s times the weights' (a parameter group of its own).

Target L0, the default: ``target_l0`` unset steers to the run's k (the budget every architecture of a
run shares), ``target_l0 = N`` (CLI ``--target-l0 N``) to N, and ``target_l0 = 0`` is the paper's fixed
λ·L0 penalty (``sparsity_coefficient``). Why the default: with the fixed λ = 1e-3 the L0 is whatever the
data make of λ (78 on the Sharkey planted set whose k is 5; 64 against k = 32 on SmolLM2 blocks.6), as
ReLU's fixed λ was (docs/method-fixes.md). With a target the λ·L0 term becomes λ_t·L0_batch, with
L0_batch = mean_b Σ_i H(h_i − θ_i) through the step STE and λ_t set every step by a PI controller on the
batch's L0 (dual ascent on the constraint L0 = N, with a proportional term for damping):

    e_t = log(L0_t / N)                                   (clipped to ±1; L0_t the batch's L0, no gradient)
    I_t = clip(I_{t−1} + ``target_integral_gain``·e_t, ±``target_integral_limit``)
    λ_t = ``target_coefficient``·(2·(L0_t/N − 1) + I_t)

The proportional part alone is dictionary_learning's quadratic penalty c·(L0 − N)²/N (its gradient in L0
is 2c·(L0/N − 1)); by itself it settles where the reconstruction's pull on θ balances it, which on
SmolLM2 layer 15 was 34 % below the target (L0 21 for N = 32, 13.5 for 16). The integral term removes that
offset: it keeps moving λ until the batch L0 is N on average. λ_t may go negative (θ is then pushed
down), because the reconstruction gradient can hold L0 below N on its own. The log error makes the
integral symmetric in ratio (2× too many and 2× too few weigh the same). Under Adam λ sets mostly the
direction of θ's step (SAELens #719): the controller changes that direction when the error changes sign,
so it neither winds up nor needs λ's absolute scale. An integral controller that multiplies a positive λ
(noanabeshima's SparsityLossController) overshot to L0 ≈ 1 and back to 5× N on planted data, because a
positive λ cannot push θ down. Inference uses the same θ, so the held-out L0 is the training L0.

Dead latents. θ learns only from the entries within ε/2 of it, so a latent whose pre-activations all
sit below its threshold gets no gradient on θ and stays dead: on the planted sets, steered to k, 0.11–0.79
of the latents died (TopK with AuxK: 0–0.51). ``threshold_pull`` = c (default 1e-4) adds
c·Σ_i θ_i·idle_i/s, idle_i the share of the batch latent i is silent on (no gradient through it). Under
Adam a parameter whose only gradient is this one moves by about its lr each step, so a dead latent's θ
falls steadily until the latent fires again; on a live latent the reconstruction's and the L0 term's
STE gradients outweigh it, and the controller holds the mean L0 at its target. Measured (docs/method-
fixes.md, "JumpReLU (session 9)"): dead 0–0.04 on every planted set and variant, FVU lower on two sets
and up to 8 % higher on GBA's, real data unchanged. This is ours, not the paper's; ``threshold_pull = 0`` is the paper's losses exactly.
``pre_act_coefficient`` > 0 adds λ_p·mean_b Σ_{i dead} ReLU(θ_i − h_i)/s, which pulls the
pre-activations of dead latents up to their threshold instead (Anthropic's pre-activation loss); it
revives fewer (gba 0.26 at 0.01) and costs reconstruction, because it moves the encoder, not θ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError, SAEConfig, parse_options
from sae_kit.sae.base import SAE, TrainingOutput, register, steered_l0_target


@dataclass
class JumpReLUOptions:
    sparsity_loss: Literal["step", "tanh"] = "step"
    sparsity_coefficient: float = 1e-3  # λ (without a target)
    # None: steered to the run's k; 0: the λ·L0 (or tanh) penalty; N > 0: λ set by the PI controller on L0 (module doc)
    target_l0: int | None = None
    target_coefficient: float = 1.0
    target_integral_gain: float = 0.02  # the controller's integral gain per step (see the module doc)
    target_integral_limit: float = 4.0  # |I| at most this (anti-windup)
    sparsity_warmup_steps: int = 0  # λ ramps linearly from 0 (not with a target: the controller owns λ)
    bandwidth: float = 0.0  # ε; 0: 0.1 × the data scale s
    init_threshold: float = 0.0  # θ₀; 0: the L0 = target_l0 quantile, else s
    threshold_lr_scale: float = 100.0  # θ's lr = this × s × the weights' lr (10 was too slow to follow the encoder)
    tanh_scale: float = 4.0
    pre_act_coefficient: float = 0.0
    # c: a loss c·Σ_i θ_i·idle_i/s pulls down the threshold of every latent in proportion to the share
    # of the batch it is silent on (module doc, "Dead latents"); 0 = the paper's losses only.
    threshold_pull: float = 1e-4
    ste_to_input: bool = False


class RectangleSTE(torch.autograd.Function):
    """What both straight-through functions keep for backward: h, θ, the bandwidth ε, to_input."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, theta, bandwidth, to_input = inputs
        ctx.save_for_backward(h, theta)
        ctx.bandwidth, ctx.to_input = bandwidth, to_input



class JumpReLUFunction(RectangleSTE):
    """f = h·H(h−θ) with the rectangle-kernel pseudo-derivative for θ (and optionally for h)."""

    @staticmethod
    def forward(h, theta, bandwidth, to_input):
        return torch.where(h > theta, h, torch.zeros((), dtype=h.dtype, device=h.device))

    @staticmethod
    def backward(ctx, grad):
        h, theta = ctx.saved_tensors
        kernel = ((h - theta).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_theta = -(theta / ctx.bandwidth) * kernel * grad
        grad_h = (h > theta).to(grad.dtype) * grad
        if ctx.to_input:
            grad_h = grad_h - grad_theta
        return grad_h, grad_theta, None, None


class StepFunction(RectangleSTE):
    """H(h−θ) with the rectangle-kernel pseudo-derivative −K/ε for θ (h gets it only with to_input)."""

    @staticmethod
    def forward(h, theta, bandwidth, to_input):
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        h, theta = ctx.saved_tensors
        grad_theta = -((h - theta).abs() < ctx.bandwidth / 2).to(grad.dtype) * grad / ctx.bandwidth
        return (-grad_theta if ctx.to_input else None), grad_theta, None, None


@register
class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    Options = JumpReLUOptions
    uses_k = False

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        # Here rather than in __init__: the server checks a run form's config with this before queueing it.
        super().check_config(cfg)
        o = parse_options(cls.Options, cfg.options, f"architecture {cls.architecture!r}")
        for name in ("sparsity_coefficient", "target_coefficient", "target_integral_gain", "target_integral_limit",
                     "bandwidth", "init_threshold", "threshold_lr_scale",
                     "tanh_scale", "pre_act_coefficient", "threshold_pull", "sparsity_warmup_steps", "target_l0"):
            if getattr(o, name) is not None and getattr(o, name) < 0:
                raise ConfigError(f"jumprelu option {name} must be >= 0, got {getattr(o, name)!r}")
        target = cfg.k if o.target_l0 is None else o.target_l0
        if target > cfg.d_sae:
            source = "target_l0" if o.target_l0 is not None else "k"  # unset target_l0 steers to the run's k
            raise ConfigError(f"jumprelu target L0 {source}={target} exceeds d_sae={cfg.d_sae}; choose 1..{cfg.d_sae}, "
                              "or target_l0=0 for the fixed λ penalty")

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        o = self.opts
        # fp32 whatever the weights' dtype: bf16 rounds lr-sized updates of θ away (SAELens #728).
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), max(o.init_threshold, 1e-3), dtype=torch.float32))
        scalar = lambda v: torch.tensor(float(v), dtype=torch.float32)  # noqa: E731
        self.register_buffer("bandwidth", scalar(o.bandwidth or 1e-3))
        self.register_buffer("data_scale", scalar(1.0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        # The target-L0 controller's integral state (saved and resumed with the SAE).
        self.register_buffer("l0_integral", scalar(0.0))
        self._real_slots: torch.Tensor | None = None

    @classmethod
    def sparsity_settings(cls, target_l0: int) -> dict[str, Any]:
        return {"options": {"target_l0": int(target_l0)}}

    @property
    def l0_target(self) -> int:
        """The mean L0 the controller steers to (0: the fixed λ penalty instead)."""
        return int(steered_l0_target(self.opts.target_l0, self.cfg))

    def saelens_export(self, tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
        """SAELens' jumprelu is the same rule, relu(u)·1[u > θ] with θ ≥ 0; θ (fp32 here) in the SAE's dtype."""
        tensors["threshold"] = self.threshold.detach().to(self.dtype_).clone()
        return "jumprelu", {}

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor) -> None:
        super().init_from_data(sample)
        x_n, _ = self.normalize(self.split_pair(sample)[0])
        pre = self.pre_activations(x_n).float()
        positive = pre[pre > 0]
        scale = positive.median() if positive.numel() else pre.abs().median().clamp_min(1e-6)
        self.data_scale.fill_(float(scale))
        o = self.opts
        self.bandwidth.fill_(o.bandwidth or 0.1 * float(scale))
        if o.init_threshold:
            theta = o.init_threshold
        elif self.l0_target:
            # The global cut-off that leaves l0_target entries per row on the sample.
            flat = pre.flatten()
            keep = min(self.l0_target * pre.shape[0], flat.numel())
            theta = float(flat.kthvalue(flat.numel() - keep + 1).values) if keep else float(flat.max())
            theta = max(theta, 1e-3 * float(scale))
        else:
            theta = float(scale)
        self.threshold.fill_(theta)

    def parameter_groups(self) -> list[dict[str, Any]]:
        others = [p for p in self.trainable_parameters() if p is not self.threshold]
        scale = self.opts.threshold_lr_scale * float(self.data_scale)
        return [{"params": others}, {"params": [self.threshold], "lr_scale": scale}]

    # ----------------------------------------------------------------- forward
    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        theta = self.threshold.detach().to(pre.dtype)
        if not self.training:
            return SparseCodes.from_mask(pre, pre > theta)
        # Above θ or within ε/2 below it (the STE's band): one comparison pass over u.
        with torch.no_grad():
            rows, cols = (pre > theta - float(self.bandwidth) / 2).nonzero(as_tuple=True)
        codes = SparseCodes.from_coordinates(pre, rows, cols)
        counts = torch.bincount(rows, minlength=pre.shape[0])
        self._real_slots = torch.arange(codes.indices.shape[1], device=pre.device)[None, :] < counts[:, None]
        values = self._jump(codes.values, codes.indices)
        return SparseCodes(codes.indices, values, codes.d_sae)

    def _jump(self, gathered: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        theta = self.threshold[indices].to(gathered.dtype)
        values = JumpReLUFunction.apply(gathered, theta, float(self.bandwidth), self.opts.ste_to_input)
        return torch.where(self._real_slots, values, torch.zeros((), dtype=values.dtype, device=values.device))

    def code_values(self, gathered: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
        return self._jump(gathered, codes.indices)

    # ------------------------------------------------------------------ losses
    def current_coefficient(self) -> float:
        o = self.opts
        warm = min(1.0, (int(self.steps) + 1) / o.sparsity_warmup_steps) if o.sparsity_warmup_steps else 1.0
        return o.sparsity_coefficient * warm

    @torch.no_grad()
    def target_coefficient_now(self, l0: torch.Tensor) -> torch.Tensor:
        """λ_t of the target-L0 PI controller for a batch of mean L0 ``l0``; advances its integral."""
        o = self.opts
        error = torch.log(l0.float().clamp_min(0.5) / self.l0_target).clamp(-1.0, 1.0)
        self.l0_integral.add_(o.target_integral_gain * error).clamp_(-o.target_integral_limit, o.target_integral_limit)
        return o.target_coefficient * (2 * (l0.float() / self.l0_target - 1) + self.l0_integral)

    def auxiliary_losses(self, out: TrainingOutput, input_variance) -> dict[str, torch.Tensor]:
        if not self.training:
            return {}
        o, codes = self.opts, out.codes
        if self.l0_target or o.sparsity_loss == "step":
            h = out.gather_pre(codes.indices) if o.ste_to_input else out.pre_activations.gather(1, codes.indices)
            theta = self.threshold[codes.indices].to(h.dtype)
            steps = StepFunction.apply(h, theta, float(self.bandwidth), o.ste_to_input)
            l0 = torch.where(self._real_slots, steps, 0).sum(1).mean()
        if self.l0_target:
            losses = {"sparsity": self.target_coefficient_now(l0.detach()) * l0}
        elif o.sparsity_loss == "step":
            losses = {"sparsity": self.current_coefficient() * l0}
        else:
            tanh = torch.tanh(o.tanh_scale * codes.values / self.data_scale).sum(1).mean()
            losses = {"sparsity": self.current_coefficient() * tanh}
        if o.pre_act_coefficient:
            dead = self.dead_mask().nonzero().squeeze(1)
            if dead.numel():
                h = out.gather_pre(dead.expand(codes.batch_size, -1).contiguous())
                gap = (self.threshold[dead].to(h.dtype) - h).relu().sum(1).mean() / self.data_scale
                losses["pre_act"] = o.pre_act_coefficient * gap
        if o.threshold_pull:
            with torch.no_grad():
                idle = 1 - codes.fire_counts().to(self.threshold.dtype) / codes.batch_size
            losses["threshold_pull"] = o.threshold_pull * (self.threshold * idle).sum() / self.data_scale
        with torch.no_grad():
            self.steps += 1
        return losses

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=0)  # θ ≥ 0, projected outside the graph (SAELens #718)

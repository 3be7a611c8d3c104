"""Group Bias Adaptation (Chen, Sheen, Xiong, Wang, Yang; ICLR 2026 "Taming Polysemanticity").

Neuron m outputs a_m·y0_m·1[y0_m + b_m > 0] with y0_m = w_m·(x − b_pre): JumpReLU gating, where the
bias only sets the gate and does not shrink the output. The loss is reconstruction alone; sparsity
comes from the biases, which get no gradient and are adapted by a rule (Algorithm 1):
neurons are split into K contiguous groups with geometric target frequencies p_1 = high … p_K = low;
every ``adapt_every`` steps, with p_m the neuron's firing frequency and r_m = max(0, max u_m) since
the last adaptation,
- over-active (p_m > p_k): b_m ← max(b_m − γ₋·r_m, −1);
- dead (p_m < ``dead_frequency``): b_m ← min(b_m + γ₊·r̄_k, 0), r̄_k = mean r over the group's
  neurons with r > 0;
so b stays in [−1, 0] (the paper's range for unit-scale inputs).

The paper's schedule (γ = 0.01 every T = 50 steps of 512 tokens, ~10^5 steps) cannot reach the
targets in the runs people make (a few hundred to a few thousand steps): on SmolLM2 with 380k tokens
it made 7 adaptations of 0.01·r and ended at L0 387 of 4608 against the targets' ~114. Our
defaults therefore change three things, each of which can be switched back to the paper's rule:
- cadence in tokens, not steps, per neuron: a neuron adapts once it has been observed over
  10 / p_m tokens since its last adaptation (~10 expected firings at its target), or as soon as it
  has fired 10 times (an over-active neuron need not wait for the rare groups' window; ``adapt_tokens``
  sets one window for all, 25,600 = the paper's T·L). ``adapt_every`` (steps) restores the
  paper's all-at-once schedule;
- multiplicative steps (Rprop-style, ``step_growth`` = 2): a neuron's step γ·s_m doubles each time
  it moves the same way as at its previous move and halves (down to γ) when it reverses, up to
  γ·s_m ≤ ``max_step`` (s_m itself stops there, so a reversal shrinks the step at once);
  ``step_growth=1`` is the paper's constant γ;
- two-sided band: neurons firing below ``raise_below``·p_k (not only dead ones) are raised, so a
  group ends near its target instead of anywhere below it; ``raise_below=0`` is the paper's rule
  (only p_m < ``dead_frequency`` is raised);
- the bias range is [−R, R] with R the largest ||x_n − b_pre|| of the initial data sample, where the
  paper has [−1, 0]. Since |y0_m| ≤ R, the floor can silence any neuron and the ceiling can make any
  neuron fire on every input, whatever the activations' scale and wherever w_m points; with
  unit-normed inputs R ≤ 2, close to the paper's 1. The paper's ceiling 0 cannot raise a neuron
  whose y0_m stays below 0 on nearly every input, and in wide SAEs tied neurons get there and stay,
  since a neuron that does not fire gets no gradient (measured on the planted imbalanced set at
  width 1024 = 4× d_in with groups 0.5..0.001: groups 3–9 ended with mean y0 ≈ −0.08, 99th
  percentile < 0, biases pinned at 0 and firing at 0.08–0.4× their targets; and at 16× d_in on a
  32-d set; docs/method-fixes.md). A positive bias
  opens the gate for y0 in (−b, 0], where the output a·y0 is negative (the JumpReLU form is kept);
  SAELens' JumpReLU keeps only positive outputs, so such an SAE is refused by the SAELens export.
  ``bias_ceiling="zero"`` is the paper's ceiling.
Other choices where the paper is unverified (documented in methods.md §6):
- frequencies and peaks are accumulated over every token since the last adaptation, instead of a
  fixed buffer of pre-activations (same statistics, no [buffer, d_sae] tensor);
- K = 10, p from 0.1 to 0.001 (arXiv v1), γ₊ = γ₋ = 0.01, dead_frequency = 1e-6, b₀ = 0;
  ``target_l0`` rescales both ends so the targets' mean times d_sae is that L0 (the knob of
  ``sparsity_settings``);
- inputs are unit-normed by default;
- ``tied=True`` (the paper's form): the encoder is the decoder's unit rows, the per-neuron scale a_m
  multiplies the code, and W_enc is written to the checkpoint for other tools; ``tied=False`` has a
  separate encoder and no scale.
b_enc holds the biases b_m (a buffer, outside the optimizer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from sae_kit import data_parallel
from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError, SAEConfig, parse_options
from sae_kit.sae.base import SAE, NotExportable, register


@dataclass
class GBAOptions:
    groups: int = 10
    high_frequency: float = 0.1
    low_frequency: float = 0.001
    adapt_tokens: int | None = None  # None: per neuron, 10 / its target frequency
    adapt_every: int | None = None  # steps; overrides adapt_tokens
    gamma_up: float = 0.01
    gamma_down: float = 0.01
    step_growth: float = 2.0  # 1.0: the paper's constant step
    max_step: float = 0.5
    raise_below: float = 0.5  # 0.0: the paper's rule (raise dead neurons only)
    dead_frequency: float = 1e-6
    bias_ceiling: Literal["data_scale", "zero"] = "data_scale"  # "zero": the paper's min(b + γ₊·r̄, 0)
    target_l0: float | None = None
    tied: bool = True


@register
class GBASAE(SAE):
    architecture = "gba"
    uses_k = False
    Options = GBAOptions
    default_normalization = "unit_norm"
    trains_encoder_bias = False

    @classmethod
    def short_run_options(cls):
        # None: the token cadence and multiplicative steps (module doc) reach the group targets in
        # runs of ~10^3 steps without a compressed schedule.
        return {}

    def saelens_export(self, tensors):
        """JumpReLU with b_enc = 0, θ = −b·a and W_enc scaled by the latent scale a (the gate y0 > −b is
        y0·a > −b·a when a > 0; refused otherwise)."""
        scale = self.decoder_scale.detach() if self.opts.tied else torch.ones_like(self.b_enc)
        if not bool((scale > 0).all()):
            raise NotExportable("SAELens' JumpReLU cannot express a GBA SAE with a non-positive latent scale "
                                f"({int((scale <= 0).sum())} latents)")
        positive = int((self.b_enc > 0).sum())
        if positive:
            # SAELens computes relu(u)·1[u > θ]; a positive bias gives θ < 0 and outputs a·y0 < 0 for
            # y0 in (−b, 0], which the relu would drop.
            raise NotExportable(f"SAELens' JumpReLU cannot express a GBA SAE with positive biases ({positive} latents "
                                "fire below y0 = 0 with negative outputs); train with options "
                                "{\"bias_ceiling\": \"zero\"} (the paper's range) to export it")
        tensors["W_enc"] = tensors["W_enc"] * scale
        tensors["threshold"] = -self.b_enc.detach() * scale
        tensors["b_enc"] = torch.zeros_like(self.b_enc)
        return "jumprelu", {}

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        # Here rather than in __init__: the server checks a run form's config with this before queueing it.
        super().check_config(cfg)
        opts = parse_options(cls.Options, cfg.options, f"architecture {cls.architecture!r}")
        if not 1 <= opts.groups <= cfg.d_sae:
            raise ConfigError(f"gba groups must be between 1 and d_sae={cfg.d_sae}, got {opts.groups}")
        if not 0 < opts.low_frequency <= opts.high_frequency <= 1:
            raise ConfigError("gba needs 0 < low_frequency <= high_frequency <= 1")
        if opts.adapt_every is not None and opts.adapt_every < 1:
            raise ConfigError(f"gba adapt_every must be >= 1, got {opts.adapt_every}")
        if opts.adapt_tokens is not None and opts.adapt_tokens < 1:
            raise ConfigError(f"gba adapt_tokens must be >= 1, got {opts.adapt_tokens}")
        for name in ("gamma_up", "gamma_down", "max_step"):
            if getattr(opts, name) < 0:
                raise ConfigError(f"gba {name} must be >= 0, got {getattr(opts, name)}")
        if opts.step_growth < 1:
            raise ConfigError(f"gba step_growth must be >= 1 (1 = the paper's constant step), got {opts.step_growth}")
        if not 0 <= opts.raise_below <= 1:
            raise ConfigError(f"gba raise_below must be in [0, 1], got {opts.raise_below}")
        if opts.target_l0 is not None and not 0 < opts.target_l0 <= cfg.d_sae:
            raise ConfigError(f"gba target_l0 must be in (0, d_sae={cfg.d_sae}], got {opts.target_l0}")

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        opts = self.opts
        if opts.tied:
            self.decoder_scale = nn.Parameter(torch.ones(cfg.d_sae, dtype=self.dtype_))
            self.derived_tensors = ("W_enc",)
        self.register_buffer("group_index", torch.arange(cfg.d_sae) * opts.groups // cfg.d_sae)
        self.register_buffer("active_count", torch.zeros(cfg.d_sae, dtype=torch.float64))
        self.register_buffer("peak_pre_activation", torch.zeros(cfg.d_sae, dtype=self.dtype_))
        self.register_buffer("tokens_observed", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps_since_adaptation", torch.zeros((), dtype=torch.int64))
        # Rprop-style per-neuron step multiplier and the sign of its last move (-1, 0, +1).
        self.register_buffer("step_scale", torch.ones(cfg.d_sae, dtype=torch.float64))
        self.register_buffer("last_move", torch.zeros(cfg.d_sae, dtype=torch.int8))
        self.register_buffer("bias_floor", torch.full((), -1.0, dtype=torch.float64))
        # Tokens each neuron has been observed over since its own last adaptation (token cadence).
        self.register_buffer("neuron_tokens", torch.zeros(cfg.d_sae, dtype=torch.float64))

    @classmethod
    def sparsity_settings(cls, target_l0: int) -> dict:
        return {"options": {"target_l0": float(target_l0)}}

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor) -> None:
        super().init_from_data(sample)
        x_n, _ = self.normalize(sample)
        self.bias_floor.fill_(-float((x_n.float() - self.b_dec.float()).norm(dim=1).max()))

    def init_encoder(self) -> None:
        if not self.opts.tied:
            super().init_encoder()

    def encoder_weight(self) -> torch.Tensor:
        return self.W_dec.T if self.opts.tied else self.W_enc

    def tensors_to_save(self) -> dict[str, torch.Tensor]:
        tensors = super().tensors_to_save()
        if self.opts.tied:
            tensors["W_enc"] = self.W_dec.detach().T.contiguous()
        return tensors

    def highest_bias(self) -> torch.Tensor:
        """The highest bias the rule may set: R (= −floor, see the module doc) or the paper's 0."""
        return -self.bias_floor if self.opts.bias_ceiling == "data_scale" else torch.zeros_like(self.bias_floor)

    def group_targets(self) -> torch.Tensor:
        """Target firing frequency of each neuron's group, geometric from high to low."""
        opts = self.opts
        steps = max(opts.groups - 1, 1)
        ratio = opts.low_frequency / opts.high_frequency
        per_group = opts.high_frequency * ratio ** (torch.arange(opts.groups, dtype=torch.float64) / steps)
        per_neuron = per_group.to(self.group_index.device)[self.group_index]
        if opts.target_l0 is not None:
            per_neuron = (per_neuron * opts.target_l0 / per_neuron.sum()).clamp_max(1.0)
        return per_neuron

    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        gate = pre > 0
        output = pre - self.b_enc
        if self.opts.tied:
            output = output * self.decoder_scale
        if self.training:
            with torch.no_grad():
                self.active_count += data_parallel.all_sum(gate.sum(0))
                peak = data_parallel.all_max(pre.max(0).values.clamp_min(0))
                self.peak_pre_activation.copy_(torch.maximum(self.peak_pre_activation, peak))
                rows = data_parallel.global_rows(pre.shape[0])
                self.tokens_observed += rows
                self.neuron_tokens += rows
        return SparseCodes.from_mask(output, gate)

    def code_values(self, gathered: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
        output = gathered - self.b_enc[codes.indices]
        if self.opts.tied:
            output = output * self.decoder_scale[codes.indices]
        return torch.where(codes.active, output, 0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.steps_since_adaptation += 1
        opts = self.opts
        if opts.adapt_every is not None:
            if int(self.steps_since_adaptation) >= opts.adapt_every:
                self.adapt_biases()
            return
        # Each neuron adapts once it has seen enough tokens to measure its own target (10 / p_m
        # tokens, ~10 expected firings) or, sooner, once it has fired 10 times (then it is over its
        # target with some confidence): frequent groups and over-active neurons adapt every step or
        # two, rare quiet ones less often.
        window = torch.full_like(self.neuron_tokens, float(opts.adapt_tokens)) if opts.adapt_tokens else 10 / self.group_targets()
        due = (self.neuron_tokens >= window) | (self.active_count >= 10)
        if bool(due.any()):
            self.adapt_biases(due)

    @torch.no_grad()
    def adapt_biases(self, due: torch.Tensor | None = None) -> None:
        """One adaptation of the neurons in ``due`` (all when None, over ``tokens_observed``)."""
        opts = self.opts
        if due is None:
            due = torch.ones_like(self.neuron_tokens, dtype=torch.bool)
            observed = self.tokens_observed.clamp_min(1)
        else:
            observed = self.neuron_tokens.clamp_min(1)
        frequency = self.active_count / observed
        peak = self.peak_pre_activation.double()
        targets = self.group_targets()
        over = (frequency > targets) & due
        dead = ((frequency < opts.dead_frequency) | (frequency < opts.raise_below * targets)) & ~over & due
        firing = (peak > 0).double()
        peak_sum = torch.zeros(opts.groups, dtype=torch.float64, device=peak.device).index_add_(0, self.group_index, peak * firing)
        peak_count = torch.zeros_like(peak_sum).index_add_(0, self.group_index, firing)
        group_mean_peak = (peak_sum / peak_count.clamp_min(1))[self.group_index]
        move = over.to(torch.int8) * -1 + dead.to(torch.int8)
        moving = move != 0
        same = moving & (move == self.last_move)
        reversed_ = moving & (move == -self.last_move)
        scale = self.step_scale
        scale = torch.where(same, scale * opts.step_growth, scale)
        scale = torch.where(reversed_, (scale / opts.step_growth).clamp_min(1.0), scale)
        # Past max_step / γ the step is capped anyway; growing further would only make the halvings on
        # reversals ineffective (seen at 10^170 on neurons that kept moving down).
        smallest_gamma = min((g for g in (opts.gamma_up, opts.gamma_down) if g > 0), default=opts.max_step)
        scale = scale.clamp_max(opts.max_step / smallest_gamma)
        self.step_scale.copy_(scale)
        self.last_move.copy_(torch.where(moving, move, self.last_move))
        bias = self.b_enc.double()
        down = (opts.gamma_down * scale).clamp_max(opts.max_step) * peak
        up = (opts.gamma_up * scale).clamp_max(opts.max_step) * group_mean_peak
        bias = torch.where(over, torch.maximum(bias - down, self.bias_floor), bias)
        bias = torch.where(dead, torch.minimum(bias + up, self.highest_bias()), bias)
        self.b_enc.copy_(bias.to(self.dtype_))
        self.active_count.masked_fill_(due, 0)
        self.peak_pre_activation.masked_fill_(due, 0)
        self.neuron_tokens.masked_fill_(due, 0)
        if bool(due.all()):
            self.tokens_observed.zero_()
        self.steps_since_adaptation.zero_()

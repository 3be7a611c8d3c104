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
so b stays in [−1, 0]. Choices where the paper is unverified (documented in methods.md §6):
- frequencies and peaks are accumulated over every token since the last adaptation, instead of a
  fixed buffer of pre-activations (same statistics, no [buffer, d_sae] tensor);
- defaults K = 10, p from 0.1 to 0.001 (arXiv v1), γ₊ = γ₋ = 0.01, dead_frequency = 1e-6, b₀ = 0;
- inputs are unit-normed by default, so the [−1, 0] bias range matches the pre-activations' scale;
- ``tied=True`` (the paper's form): the encoder is the decoder's unit rows, the per-neuron scale a_m
  multiplies the code, and W_enc is written to the checkpoint for other tools; ``tied=False`` has a
  separate encoder and no scale.
b_enc holds the biases b_m (a buffer, outside the optimizer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from sae_kit import data_parallel
from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError, SAEConfig
from sae_kit.sae.base import SAE, NotExportable, register


@dataclass
class GBAOptions:
    groups: int = 10
    high_frequency: float = 0.1
    low_frequency: float = 0.001
    adapt_every: int = 50
    gamma_up: float = 0.01
    gamma_down: float = 0.01
    dead_frequency: float = 1e-6
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
        # The paper adapts biases by 0.01·r every 50 steps over ~10^5 steps; a run of ~10^3 steps
        # adapts every 5 steps by 0.05·r (same rule, a compressed schedule).
        return {"adapt_every": 5, "gamma_up": 0.05, "gamma_down": 0.05}

    def saelens_export(self, tensors):
        """JumpReLU with b_enc = 0, θ = −b·a and W_enc scaled by the latent scale a (the gate y0 > −b is
        y0·a > −b·a when a > 0; refused otherwise)."""
        scale = self.decoder_scale.detach() if self.opts.tied else torch.ones_like(self.b_enc)
        if not bool((scale > 0).all()):
            raise NotExportable("SAELens' JumpReLU cannot express a GBA SAE with a non-positive latent scale "
                                f"({int((scale <= 0).sum())} latents)")
        tensors["W_enc"] = tensors["W_enc"] * scale
        tensors["threshold"] = -self.b_enc.detach() * scale
        tensors["b_enc"] = torch.zeros_like(self.b_enc)
        return "jumprelu", {}

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        opts = self.opts
        if not 1 <= opts.groups <= cfg.d_sae:
            raise ConfigError(f"gba groups must be between 1 and d_sae={cfg.d_sae}, got {opts.groups}")
        if not 0 < opts.low_frequency <= opts.high_frequency <= 1:
            raise ConfigError("gba needs 0 < low_frequency <= high_frequency <= 1")
        if opts.adapt_every < 1:
            raise ConfigError(f"gba adapt_every must be >= 1, got {opts.adapt_every}")
        if opts.tied:
            self.decoder_scale = nn.Parameter(torch.ones(cfg.d_sae, dtype=self.dtype_))
            self.derived_tensors = ("W_enc",)
        self.register_buffer("group_index", torch.arange(cfg.d_sae) * opts.groups // cfg.d_sae)
        self.register_buffer("active_count", torch.zeros(cfg.d_sae, dtype=torch.float64))
        self.register_buffer("peak_pre_activation", torch.zeros(cfg.d_sae, dtype=self.dtype_))
        self.register_buffer("tokens_observed", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps_since_adaptation", torch.zeros((), dtype=torch.int64))

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

    def group_targets(self) -> torch.Tensor:
        """Target firing frequency of each neuron's group, geometric from high to low."""
        opts = self.opts
        steps = max(opts.groups - 1, 1)
        ratio = opts.low_frequency / opts.high_frequency
        per_group = opts.high_frequency * ratio ** (torch.arange(opts.groups, dtype=torch.float64) / steps)
        return per_group.to(self.group_index.device)[self.group_index]

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
                self.tokens_observed += data_parallel.global_rows(pre.shape[0])
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
        if int(self.steps_since_adaptation) >= self.opts.adapt_every:
            self.adapt_biases()

    @torch.no_grad()
    def adapt_biases(self) -> None:
        opts = self.opts
        frequency = self.active_count / self.tokens_observed.clamp_min(1)
        peak = self.peak_pre_activation.double()
        over = frequency > self.group_targets()
        dead = (frequency < opts.dead_frequency) & ~over
        firing = (peak > 0).double()
        peak_sum = torch.zeros(opts.groups, dtype=torch.float64, device=peak.device).index_add_(0, self.group_index, peak * firing)
        peak_count = torch.zeros_like(peak_sum).index_add_(0, self.group_index, firing)
        group_mean_peak = (peak_sum / peak_count.clamp_min(1))[self.group_index]
        bias = self.b_enc.double()
        bias = torch.where(over, (bias - opts.gamma_down * peak).clamp_min(-1.0), bias)
        bias = torch.where(dead, (bias + opts.gamma_up * group_mean_peak).clamp_max(0.0), bias)
        self.b_enc.copy_(bias.to(self.dtype_))
        self.active_count.zero_()
        self.peak_pre_activation.zero_()
        self.tokens_observed.zero_()
        self.steps_since_adaptation.zero_()

"""ReLU + L1 baseline ("standard" SAE, Bricken et al. 2023 / SAELens).

z = ReLU(u); the sparsity penalty is λ·mean_b Σ_j z_j·||W_dec,j||, divided by sqrt(input variance)
so λ is independent of the activations' scale (the reconstruction term is already normalised).

Why the defaults are what they are (docs/method-fixes.md, "## ReLU", has the measurements):

* Inputs are divided by one constant, their mean norm on the initial sample (the base's
  ``mean_norm`` normalisation; SAELens' standard recipe scales to mean norm sqrt(d) the same way),
  not each token by its own norm. Per-token unit norm weighs every token's error alike, but FVU, CE loss and the TopK family
  weigh a token by its norm²: on SmolLM2's residual stream a unit-normed ReLU at L0 32 had 3.3× TopK's
  FVU at 300k tokens, the constant scale 1.05×. A constant keeps the ×100 invariance: b_enc and b_dec
  live in the scaled space, so Adam's ~lr steps mean the same at any scale.
* λ is steered to a mean L0 by default: ``target_l0`` None means the run's k (the budget every
  architecture of a run shares), so a default ReLU is comparable with a default TopK. After every
  training batch λ is multiplied by (L0_batch / target)^``l1_control_rate``, clipped to ×[0.9, 1.1];
  ``l1_coefficient`` is its starting value. ``target_l0 = 0`` is the classic fixed λ = ``l1_coefficient``.
* With a target, b_enc starts at each latent's cut-off for firing on target/d_sae of the initial
  sample (``init_at_target``), so training starts at the target L0. From b_enc = 0 half the latents
  fire; the controller then has to raise λ by ×1.1 a step for tens of steps, overshoots, and the
  L1 spike leaves a run of a few hundred steps at FVU 0.3–0.98 (session 7). Per latent, not one global
  cut-off: with one cut-off the latents whose init direction sits low never fire (dead 12 % on zipf).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError, SAEConfig, parse_options
from sae_kit.sae.base import SAE, TrainingOutput, register, steered_l0_target


@dataclass
class ReluOptions:
    l1_coefficient: float = 0.1  # λ with target_l0 = 0; the controller's starting λ otherwise
    target_l0: float | None = None  # None: the run's k; 0: fixed λ; N > 0: λ steered to mean L0 = N
    l1_control_rate: float = 0.05
    init_at_target: bool = True  # with a target: b_enc starts at the per-latent cut-off for it


@register
class ReluSAE(SAE):
    architecture = "relu"
    # Every positive pre-activation is a code: nothing to gain from the sparse kernels.
    sparse_training = False
    uses_k = False
    Options = ReluOptions
    # One constant input scale makes the SAE scale-free without per-token normalisation (module doc).
    default_normalization = "mean_norm"

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        o = parse_options(cls.Options, cfg.options, f"architecture {cls.architecture!r}")
        for name in ("l1_coefficient", "l1_control_rate"):
            if not getattr(o, name) >= 0:
                raise ConfigError(f"relu option {name} must be >= 0, got {getattr(o, name)!r}")
        if o.target_l0 is not None and not 0 <= o.target_l0 <= cfg.d_sae:
            raise ConfigError(f"relu option target_l0={o.target_l0!r} must be in [0, d_sae={cfg.d_sae}]; "
                              "0 trains with the fixed l1_coefficient, unset steers to k")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("l1_scale", torch.ones((), dtype=torch.float64))

    @property
    def l0_target(self) -> float:
        """The mean L0 λ is steered to (0: fixed λ)."""
        return steered_l0_target(self.opts.target_l0, self.cfg)

    @classmethod
    def sparsity_settings(cls, target_l0: int) -> dict:
        return {"options": {"target_l0": float(target_l0)}}

    def saelens_export(self, tensors):
        return "standard", {}

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor) -> None:
        super().init_from_data(sample)
        target = self.l0_target
        if self.opts.init_at_target and target:
            x_n, _ = self.normalize(self.split_pair(sample)[0])
            pre = self.pre_activations(x_n).float()
            # Each latent fires on a fraction target/d_sae of the sample: mean L0 = target.
            n = pre.shape[0]
            keep = min(max(int(round(n * target / pre.shape[1])), 1), n)
            cutoff = pre.kthvalue(n - keep + 1, dim=0).values.clamp_min(0)
            self.b_enc.sub_(cutoff.to(self.b_enc.dtype))

    # ------------------------------------------------------------------ rule and loss
    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        acts = pre.relu()
        return SparseCodes.from_mask(acts, acts > 0)

    def auxiliary_losses(self, out: TrainingOutput, input_variance) -> dict[str, torch.Tensor]:
        norms = self.W_dec.norm(dim=1)
        l1 = (out.codes.values.abs() * norms[out.codes.indices]).sum(dim=1).mean()
        if not torch.is_tensor(input_variance):
            input_variance = torch.tensor(float(input_variance))
        target = self.l0_target
        if self.training and target:
            with torch.no_grad():
                ratio = out.codes.l0().double().mean().clamp_min(1e-3) / target
                self.l1_scale *= ratio.pow(self.opts.l1_control_rate).clamp(0.9, 1.1)
        coefficient = self.opts.l1_coefficient * float(self.l1_scale)
        return {"l1": coefficient * l1 / input_variance.sqrt()}

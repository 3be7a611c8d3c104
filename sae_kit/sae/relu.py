"""ReLU + L1 baseline ("standard" SAE, Bricken et al. 2023 / SAELens).

z = ReLU(u); the sparsity penalty is λ·mean_b Σ_j z_j·||W_dec,j||, divided by sqrt(input variance)
so λ is independent of the activations' scale (the reconstruction term is already normalised).

λ is a controlled variable by default (dual ascent on the constraint mean L0 = target): after every
training batch λ is multiplied by (L0_batch / target)^rate, clipped to a factor in [0.9, 1.1];
``l1_coefficient`` is its starting value. The target is ``target_l0``, else the run's k (the
sparsity setting every architecture shares, 32 by default), so ``--arch relu`` on defaults lands
at the same mean L0 as ``--arch topk`` instead of wherever a fixed λ happens to put it on these
activations (λ = 0.1 fixed gave 3-12x the true L0 on planted sets and ~150 against TopK's 32 on
SmolLM2, docs/no_collapse.md). ``target_l0=0`` keeps λ fixed: the classic L1 SAE of Bricken et
al. / SAELens, which needs a sweep over λ to reach a given L0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError, parse_options
from sae_kit.sae.base import SAE, TrainingOutput, register


@dataclass
class ReluOptions:
    l1_coefficient: float = 0.1
    target_l0: float | None = None  # None: the run's k; 0: λ fixed at l1_coefficient
    l1_control_rate: float = 0.05


@register
class ReluSAE(SAE):
    architecture = "relu"
    # Every positive pre-activation is a code: nothing to gain from the sparse kernels.
    sparse_training = False
    uses_k = False
    Options = ReluOptions
    # Unit-normed inputs: b_enc is a threshold on the inputs' scale and Adam moves it by ~lr per step,
    # so without normalisation activations ×100 train a different SAE (measured: L0 0.7 vs 58).
    default_normalization = "unit_norm"

    def saelens_export(self, tensors):
        return "standard", {}

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        target = parse_options(cls.Options, cfg.options, f"architecture {cls.architecture!r}").target_l0
        if target is not None and not 0 <= target <= cfg.d_sae:
            raise ConfigError(f"relu option target_l0={target} must be in [0, d_sae={cfg.d_sae}] (0: fixed l1_coefficient)")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("l1_scale", torch.ones((), dtype=torch.float64))
        target = self.opts.target_l0
        self.l0_target = float(min(cfg.k, cfg.d_sae) if target is None else target)  # 0.0: λ fixed

    @classmethod
    def sparsity_settings(cls, target_l0: int) -> dict:
        return {"options": {"target_l0": float(target_l0)}}

    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        acts = pre.relu()
        return SparseCodes.from_mask(acts, acts > 0)

    def auxiliary_losses(self, out: TrainingOutput, input_variance) -> dict[str, torch.Tensor]:
        norms = self.W_dec.norm(dim=1)
        l1 = (out.codes.values.abs() * norms[out.codes.indices]).sum(dim=1).mean()
        if not torch.is_tensor(input_variance):
            input_variance = torch.tensor(float(input_variance))
        if self.training and self.l0_target:
            with torch.no_grad():
                ratio = out.codes.l0().double().mean().clamp_min(1e-3) / self.l0_target
                self.l1_scale *= ratio.pow(self.opts.l1_control_rate).clamp(0.9, 1.1)
        coefficient = self.opts.l1_coefficient * float(self.l1_scale)
        return {"l1": coefficient * l1 / input_variance.sqrt()}

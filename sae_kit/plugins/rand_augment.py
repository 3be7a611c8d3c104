"""RandAugment in activation space (after "RandAugment: Practical automated data augmentation with a
reduced search space").

RandAugment drops the policy search: each example gets ``N`` operations drawn uniformly from a fixed
list, all at one shared magnitude ``M`` (0–30). For activations [our adaptation, plugins.md B14], with
m = M / 30, each token draws ``ops`` distinct operations from:

- ``noise``: + Gaussian noise of std 0.1·m·rms(x) per dimension; the target stays the clean token
  (denoising);
- ``scale``: × a factor uniform in [1 − 0.2m, 1 + 0.2m];
- ``dropout``: zero each dimension with probability 0.1m, rescale the rest by 1/(1 − p);
- ``mix``: (1 − 0.2m)·x + 0.2m·x', x' another token of the batch;
- ``shift``: ± m · median code value along a random live (not dead) decoder direction: what steering does.

Except for the noise, the target is the augmented token (the SAE must reconstruct what it is given).
Operations apply in list order (noise last, so its target is the otherwise-augmented token). The draw
is a pure function of (seed, step). Defaults N=1, M=3 [chosen]. The honest expectation: clean FVU does
not improve (an SAE should model on-distribution activations); the point is robustness to steered and
perturbed inputs, which ``evaluate`` measures as ``perturbed_fvu`` (held-out tokens + 0.5·rms‖x‖ along
a random decoder direction) beside ``clean_fvu``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_kit.config import ConfigError
from sae_kit.plugins._heldout import fvu, heldout_tokens, perturbed_fvu
from sae_kit.plugins.api import Ablation, Batch, Plugin, StepContext, option
from sae_kit.seeding import derived_generator

OPERATIONS = ("scale", "dropout", "mix", "shift", "noise")
STEERING_STRENGTH = 0.5


def draw_operations(batch: int, ops: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean [B, len(OPERATIONS)]: ``ops`` distinct operations per token, uniformly drawn."""
    order = torch.rand(batch, len(OPERATIONS), generator=generator).argsort(1)
    chosen = torch.zeros(batch, len(OPERATIONS), dtype=torch.bool)
    return chosen.scatter(1, order[:, :ops], True)


@torch.no_grad()
def augment(x: torch.Tensor, chosen: torch.Tensor, m: float, generator: torch.Generator,
            directions: torch.Tensor, code_scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(augmented input, reconstruction target) for raw activations ``x`` [B, d]; ``code_scale`` is the
    shift's length in raw units (a scalar or [B, 1])."""
    batch, d = x.shape
    out = x.clone()
    rows = chosen[:, OPERATIONS.index("scale")]
    factor = 1 + 0.2 * m * (2 * torch.rand(batch, 1, generator=generator) - 1)
    out = torch.where(rows[:, None], out * factor, out)
    rows = chosen[:, OPERATIONS.index("dropout")]
    p = 0.1 * m
    keep = (torch.rand(batch, d, generator=generator) >= p).to(x.dtype) / (1 - p)
    out = torch.where(rows[:, None], out * keep, out)
    rows = chosen[:, OPERATIONS.index("mix")]
    partner = out[torch.randperm(batch, generator=generator)]
    out = torch.where(rows[:, None], (1 - 0.2 * m) * out + 0.2 * m * partner, out)
    rows = chosen[:, OPERATIONS.index("shift")]
    picked = directions[torch.randint(0, directions.shape[0], (batch,), generator=generator)]
    sign = torch.randint(0, 2, (batch, 1), generator=generator).to(x.dtype) * 2 - 1
    out = torch.where(rows[:, None], out + sign * m * code_scale * picked, out)
    target = out.clone()
    rows = chosen[:, OPERATIONS.index("noise")]
    rms = x.pow(2).mean().sqrt()
    out = torch.where(rows[:, None], out + 0.1 * m * rms * torch.randn(batch, d, generator=generator), out)
    return out, target


class RandAugment(Plugin):
    name = "rand_augment"
    paper = "RandAugment: Practical automated data augmentation with a reduced search space"
    summary = "N activation-space augmentations per token at one shared magnitude M (noise, scale, dropout, mix, steer)"
    ablation = Ablation(metric="rand_augment/perturbed_fvu", baseline_options={"magnitude": 0})

    @dataclass
    class Options:
        ops: int = option(1, "N: operations per token")
        magnitude: int = option(3, "M: shared magnitude, 0 (identity) to 30")

    def validate(self) -> None:
        if not 1 <= self.opts.ops <= len(OPERATIONS):
            raise ConfigError(f"rand_augment: ops must be in [1, {len(OPERATIONS)}], got {self.opts.ops}")
        if not 0 <= self.opts.magnitude <= 30:
            raise ConfigError(f"rand_augment: magnitude must be in [0, 30], got {self.opts.magnitude}")

    def setup(self, trainer) -> None:
        self.code_scale = 1.0  # median active code value, tracked per step

    def transform_batch(self, batch: Batch, trainer) -> Batch:
        if self.opts.magnitude == 0:
            return batch
        sae = trainer.sae
        generator = derived_generator("rand_augment", trainer.cfg.seed, trainer.step)
        live = (~sae.dead_mask()).nonzero().squeeze(1)
        directions = sae.decoder_directions()[live if live.numel() else slice(None)].to(batch.x.dtype)
        chosen = draw_operations(batch.x.shape[0], self.opts.ops, generator)
        if batch.target is not None and not torch.equal(batch.target, batch.x):
            raise ConfigError("rand_augment needs target = input; list it before plugins that set their own target")
        # Codes and decoder directions live in the SAE's normalised space: undo its per-token scale.
        _, norm = sae.normalize(batch.x)
        batch.x, batch.target = augment(batch.x, chosen, self.opts.magnitude / 30, generator, directions,
                                        self.code_scale * norm.scale)
        return batch

    def after_step(self, ctx: StepContext) -> None:
        values = ctx.out.codes.values.detach()
        active = values[values != 0]
        if active.numel():
            self.code_scale = float(active.abs().median())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "code_scale": self.code_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.code_scale = float(state["code_scale"])

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        x = heldout_tokens(trainer)
        return {"perturbed_fvu": perturbed_fvu(sae, x, STEERING_STRENGTH, trainer.cfg.seed), "clean_fvu": fvu(sae, x)}

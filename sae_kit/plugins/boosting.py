"""Sequential gradient-boosting training of latent blocks (after "Sequential training of neural networks
with gradient boosting", GBNN).

GBNN fits one small network after another to the residual of those before and concatenates them. An
SAE's decoder already is an additive expansion ``x̂ = b_dec + Σ_j z_j d_j``, so training the latents in
``stages`` blocks of ``d_sae / stages``, each new block with the earlier blocks frozen, makes every
block fit the residual the earlier ones leave, as a boosting stage does [our adaptation, plugins.md A5].

Mechanism:
- availability: a ``torch.nn.utils.parametrize`` mask zeroes the encoder columns (and biases) of the
  blocks not yet opened, so their pre-activation is 0 and TopK never selects them;
- freezing: after backward the gradients of the blocks of earlier stages are zeroed, and their Adam
  first moments once at the stage change, so Adam's step for them is exactly 0;
- budget: stage t (0-based) runs with k_t = ceil((t + 1)·k / stages), written through the
  ``hyperparameters`` hook; the last stage uses the full k;
- schedule: equal numbers of steps per stage, a pure function of the step (resumes exactly).
b_dec starts at the data's geometric median, the engine's default: GBNN's constant first model.

``evaluate`` reports the nestedness curve: held-out FVU using only the first j blocks' latents,
j = 1..stages (``fvu_prefix_<j>``), and ``fvu_half`` (the first half of the latents). With
``stages=1`` (the ablation's baseline) the prefixes are taken by firing frequency instead, the usual
way to truncate an ordinary SAE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError
from sae_kit.eval.metrics import ReconstructionMetrics
from sae_kit.plugins._heldout import heldout_batches
from sae_kit.plugins.api import Ablation, Plugin, StepContext, option


class LatentMask(nn.Module):
    """Multiplies the latent axis (the last one) by an availability mask."""

    def __init__(self, available: torch.Tensor):
        super().__init__()
        self.available = available  # shared with the plugin, not a buffer: the step decides it

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.available.to(weight.dtype)


class Boosting(Plugin):
    name = "boosting"
    paper = "Sequential training of neural networks with gradient boosting (GBNN)"
    summary = "train the latents in blocks, each fitting the residual of the earlier frozen blocks; k grows per stage"
    ablation = Ablation(metric="boosting/fvu_half", baseline_options={"stages": 1})

    @dataclass
    class Options:
        stages: int = option(4, "number of latent blocks trained one after another")

    def validate(self) -> None:
        if self.opts.stages < 1:
            raise ConfigError(f"boosting: stages must be >= 1, got {self.opts.stages}")

    def setup(self, trainer) -> None:
        sae = trainer.sae
        if sae.cfg.d_sae % self.opts.stages:
            raise ConfigError(f"boosting: d_sae={sae.cfg.d_sae} is not divisible by stages={self.opts.stages}")
        self.block = sae.cfg.d_sae // self.opts.stages
        self.available = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
        self.frozen_upto = 0  # latents [0, frozen_upto) are frozen
        self.trainer = trainer
        self._set_stage(self.stage_at(trainer.step))
        parametrize.register_parametrization(sae, "W_enc", LatentMask(self.available))
        if isinstance(sae.b_enc, nn.Parameter):
            parametrize.register_parametrization(sae, "b_enc", LatentMask(self.available))

    def stage_at(self, step: int) -> int:
        return min(self.opts.stages - 1, step * self.opts.stages // max(self.trainer.cfg.total_steps, 1))

    def _set_stage(self, stage: int) -> None:
        self.stage = stage
        self.available[: (stage + 1) * self.block] = True
        self.frozen_upto = stage * self.block

    def hyperparameters(self, hp: dict[str, Any], trainer) -> None:
        stage = self.stage_at(trainer.step)
        if stage != self.stage:
            self._set_stage(stage)
            self._zero_momentum(trainer)
        hp["k"] = max(1, math.ceil((self.stage + 1) * hp["k"] / self.opts.stages))

    def _frozen_tensors(self, sae) -> list[tuple[torch.Tensor, int]]:
        """(parameter, latent axis) of every trainable tensor with a latent axis."""
        tensors = [(sae.W_dec, 0)]
        encoder = sae.parametrizations.W_enc.original if parametrize.is_parametrized(sae, "W_enc") else sae.W_enc
        tensors.append((encoder, 1))
        if isinstance(getattr(sae, "b_enc", None), nn.Parameter) or parametrize.is_parametrized(sae, "b_enc"):
            bias = sae.parametrizations.b_enc.original if parametrize.is_parametrized(sae, "b_enc") else sae.b_enc
            tensors.append((bias, 0))
        return tensors

    @torch.no_grad()
    def _zero_momentum(self, trainer) -> None:
        for tensor, axis in self._frozen_tensors(trainer.sae):
            state = trainer.optimizer.state.get(tensor, {})
            if "exp_avg" in state:
                state["exp_avg"].narrow(axis, 0, self.frozen_upto).zero_()

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        if self.frozen_upto == 0:
            return
        for tensor, axis in self._frozen_tensors(ctx.sae):
            if tensor.grad is not None:
                tensor.grad.narrow(axis, 0, self.frozen_upto).zero_()

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        was_training = sae.training
        sae.eval()
        xs = list(heldout_batches(trainer))
        codes_list = [sae.encode(x) for x in xs]
        sae.train(was_training)
        counts = sum(c.fire_counts() for c in codes_list)
        # Latent order: block order when boosted; most frequent first for an ordinary SAE.
        order = torch.arange(sae.cfg.d_sae) if self.opts.stages > 1 else counts.argsort(descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(sae.cfg.d_sae)
        block = sae.cfg.d_sae // max(self.opts.stages, 2) if self.opts.stages == 1 else self.block
        n_prefixes = sae.cfg.d_sae // block
        result = {}
        for j in range(1, n_prefixes + 1):
            result[f"fvu_prefix_{j}"] = self._prefix_fvu(sae, xs, codes_list, rank, j * block)
        result["fvu_half"] = self._prefix_fvu(sae, xs, codes_list, rank, sae.cfg.d_sae // 2)
        return result

    @staticmethod
    def _prefix_fvu(sae, xs, codes_list, rank, size: int) -> float:
        metrics = ReconstructionMetrics(sae.cfg.d_sae)
        for x, codes in zip(xs, codes_list):
            keep = rank[codes.indices] < size
            kept = SparseCodes(codes.indices, torch.where(keep, codes.values, torch.zeros_like(codes.values)), codes.d_sae)
            x_n, norm = sae.normalize(x)
            metrics.update(x, norm.undo(sae.decode_normalized(kept)), kept)
        return float(metrics.compute()["fvu"])

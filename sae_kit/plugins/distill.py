"""Ensembling and distillation ("Pre-training under infinite compute").

The paper: K models trained independently on the same data and averaged reach a lower loss asymptote,
and distilling the ensemble into one model keeps most of the gain. For SAEs [our adaptation,
plugins.md A8]: ``teachers`` SAEs of the run's own configuration are trained with seeds
``seed + 1 .. seed + teachers`` (a fresh run trains them in ``setup``; they are plugin modules, so a
resumed run reloads them). Their mean reconstruction ``x̂_ens = mean_k x̂_k`` (one SAE with the
concatenated dictionary and codes scaled by 1/K, L0 = K·k) is the student's target, with an anchor
``anchor · ‖x̂ − x‖²`` to the data (α = 0.25 [chosen]). The student keeps the run's width and k.

``evaluate`` reports the ensemble's held-out FVU (``ensemble_fvu``, at K times the student's L0) and
``student_fvu`` (the student's, against the data).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sae_kit.config import ConfigError
from sae_kit.plugins._heldout import heldout_batches
from sae_kit.plugins.api import Ablation, Batch, Plugin, StepContext, option
from sae_kit.sae import create_sae


class Distill(Plugin):
    name = "distill"
    paper = "Pre-training under infinite compute (ensembling, distillation)"
    summary = "train K teacher SAEs, then train the SAE on the ensemble's reconstruction plus an anchor to the data"
    ablation = Ablation(metric="fvu")

    @dataclass
    class Options:
        teachers: int = option(2, "number of teacher SAEs (each costs one training run)")
        anchor: float = option(0.25, "weight α of the student's reconstruction loss against the data")

    def validate(self) -> None:
        if self.opts.teachers < 1 or self.opts.anchor < 0:
            raise ConfigError("distill: teachers must be >= 1 and anchor >= 0")

    def setup(self, trainer) -> None:
        for k in range(self.opts.teachers):
            teacher = create_sae(copy.deepcopy(trainer.sae.cfg)).requires_grad_(False)
            self.modules[f"teacher{k}"] = teacher
        if trainer.resumed:
            return  # the teachers' weights come from the checkpoint
        for k in range(self.opts.teachers):
            cfg = replace(trainer.cfg, out=str(Path(trainer.cfg.out) / "distill" / f"teacher{k}"),
                          seed=trainer.cfg.seed + 1 + k, plugins=[])
            trained = trainer.train_helper(cfg, trainer.source)
            self.modules[f"teacher{k}"].load_state_dict(trained.state_dict())

    def teachers(self) -> list:
        return [self.modules[f"teacher{k}"].eval() for k in range(self.opts.teachers)]

    @torch.no_grad()
    def ensemble(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([teacher(x) for teacher in self.teachers()]).mean(0)

    def transform_batch(self, batch: Batch, trainer) -> Batch:
        batch.target = self.ensemble(batch.x)
        return batch

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.out
        return {"anchor": self.opts.anchor * (out.x_hat_n - out.x_n).pow(2).sum(1).mean() / ctx.trainer.input_variance}

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        was_training = sae.training
        sae.eval()
        ens_err = stu_err = total = 0.0
        xs = list(heldout_batches(trainer))
        data = torch.cat(xs)
        mean = data.mean(0)
        for x in xs:
            ens_err += (self.ensemble(x) - x).pow(2).sum().item()
            stu_err += (sae(x) - x).pow(2).sum().item()
            total += (x - mean).pow(2).sum().item()
        sae.train(was_training)
        return {"ensemble_fvu": ens_err / total, "student_fvu": stu_err / total}

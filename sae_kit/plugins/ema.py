"""A moving-average shadow SAE (after "Momentum Auxiliary Network for Supervised Local Learning", MAN).

MAN couples gradient-isolated blocks through an EMA copy (momentum 0.999) of the next block. One SAE
is one layer, so the block coupling has no analogue; what transfers is the EMA ingredient [plugins.md
B13]: a shadow SAE whose parameters are ``torch.optim.swa_utils.AveragedModel`` with
``get_ema_multi_avg_fn(decay)``, updated after every optimizer step of the window. The shadow's first
update copies the weights (AveragedModel's rule); buffers (dead-latent counters, inference thresholds)
follow the live SAE.

With ``export=true`` (default) the final SAE is the shadow: its parameters are copied in after the last
step and the decoder rows renormalised to unit norm (an average of unit vectors is shorter than one;
only the export renormalises, so the running average stays exactly AveragedModel's).

Defaults [chosen]: ``decay=0.995`` (a horizon of ~200 steps, not MAN's 0.999, because SAE runs are
short: 2,441 steps for 10M tokens at batch 4096), ``start=0.5`` (average over the second half; an EMA
over the whole run would be dominated by the early, poor weights). ``evaluate`` reports ``fvu_raw``
(the last live weights) and ``fvu_ema`` on the same held-out tokens.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sae_kit.config import ConfigError
from sae_kit.plugins._heldout import fvu, heldout_tokens
from sae_kit.plugins.api import Ablation, Plugin, StepContext, option


class MovingAverage(Plugin):
    name = "ema"
    paper = "Momentum Auxiliary Network for Supervised Local Learning (MAN)"
    summary = "an EMA shadow SAE (torch AveragedModel) over the late run, exported as the final SAE"
    ablation = Ablation(metric="fvu", options={"decay": 0.98})

    @dataclass
    class Options:
        decay: float = option(0.995, "EMA decay per step")
        start: float = option(0.5, "fraction of the run after which the average starts (its first update copies)")
        export: bool = option(True, "save the shadow as the final SAE (false: keep the live weights)")

    def validate(self) -> None:
        if not 0.0 <= self.opts.decay < 1.0:
            raise ConfigError(f"ema: decay must be in [0, 1), got {self.opts.decay}")
        if not 0.0 <= self.opts.start < 1.0:
            raise ConfigError(f"ema: start must be in [0, 1), got {self.opts.start}")
        self.window = (self.opts.start, 1.0)

    def setup(self, trainer) -> None:
        shadow = AveragedModel(trainer.sae, multi_avg_fn=get_ema_multi_avg_fn(self.opts.decay))
        self.modules["shadow"] = shadow.requires_grad_(False)  # a plugin module: checkpointed, never optimised
        self.raw: dict[str, torch.Tensor] | None = None

    @property
    def shadow(self) -> AveragedModel:
        return self.modules["shadow"]

    def after_step(self, ctx: StepContext) -> None:
        self.shadow.update_parameters(ctx.sae)
        ctx.logs["ema/n_averaged"] = float(self.shadow.n_averaged)

    def averaged_sae(self):
        """A copy of the shadow SAE with unit-norm decoder rows (the exported weights)."""
        sae = copy.deepcopy(self.shadow.module)
        with torch.no_grad():
            sae.after_optimizer_step()
        return sae

    @torch.no_grad()
    def posthoc(self, sae, trainer):
        self.raw = {name: p.detach().clone() for name, p in sae.named_parameters()}
        if not self.opts.export or int(self.shadow.n_averaged) == 0:
            return sae
        averaged = dict(self.averaged_sae().named_parameters())
        for name, parameter in sae.named_parameters():
            parameter.copy_(averaged[name])
        return sae

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        x = heldout_tokens(trainer)
        raw = copy.deepcopy(sae)
        if self.raw is not None:
            for name, parameter in raw.named_parameters():
                if name in self.raw:  # (a parametrised tensor's free name differs once baked)
                    parameter.copy_(self.raw[name])
        return {"fvu_raw": fvu(raw, x), "fvu_ema": fvu(self.averaged_sae(), x),
                "n_averaged": int(self.shadow.n_averaged)}

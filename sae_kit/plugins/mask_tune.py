"""R-AMT-style regularised mask tuning: transfer a pretrained SAE to new activations by learning a
binary mask over its encoder weights, the weights themselves frozen ("Regularized mask tuning:
uncovering hidden knowledge in pre-trained vision-language models", R-AMT).

R-AMT attaches real-valued mask weights to the task-relevant pretrained weights, binarises them by a
threshold in the forward pass (straight-through in the backward) and trains only the masks; a
*gradient dropout* keeps the mask updates from forgetting the zero-shot knowledge: the task-loss
gradient and the gradient of a KL to the zero-shot model are combined per coordinate.

SAE adaptation [plugins.md B21; our choices marked]:
- use case: an SAE trained on model A's activations (``pretrained``: an SAE folder, or ``auto``: one
  trained in ``setup`` on ``pretrain_data``) reused on model A′'s (the run's data);
- the mask covers W_enc's entries (a ``torch.nn.utils.parametrize`` parametrisation; mask weights
  start at 1, binarised at ``threshold`` 0.5, straight-through gradient); W_dec, b_enc and b_dec stay
  frozen, so every feature's decoder direction is exactly the pretrained one (feature identity);
- the regulariser is the pretrained SAE's reconstruction: ``consistency · ‖x̂ − x̂_pretrained‖² / Var``
  on the same batch [ours: a reconstruction-space stand-in for the KL to the zero-shot model];
- gradient dropout [the reference marks R-AMT's exact combination unverified; we use GradDrop's
  sign-purity rule, Chen et al. 2020, on the two gradients]: per mask entry
  P = ½(1 + Σ_i g_i / Σ_i |g_i|), U ~ Uniform(0, 1) (seeded per step), keep the positive parts of
  the g_i where P > U and the negative parts otherwise; the mask's gradient is the sum of what is kept.

``tune=none`` evaluates the pretrained SAE unchanged (the ablation's baseline: no adaptation) and
``tune=full`` fine-tunes all its weights without a mask (the other reference point). ``evaluate``
reports ``fvu_pretrained`` (the unadapted SAE on the run's held-out data), ``mask_kept`` (fraction of
encoder entries kept) and ``decoder_drift`` (max |ΔW_dec|, 0 with the mask).

Measured [ablations/mask_tune-topk.json; `sae-kit ablate --plugin mask_tune --data synthetic --seeds 3`:
topk, planted sharkey d=64, d_sae 512, k 5; an SAE pretrained 500 steps on the reversed firing
profile, then 500 steps on the run's data]: FVU 0.5591 unadapted → 0.5470 with the mask (paired
difference −0.0121 ± 0.0012, "helps"), decoder unchanged, MMCS unchanged (0.663). Full fine-tuning
(``tune=full``, same command with ``--plugin mask_tune:tune=full``) reaches FVU 0.194 (MMCS 0.934):
the mask keeps feature identity at the price of most of the adaptation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from sae_kit.config import ConfigError
from sae_kit.plugins.api import Ablation, Plugin, StepContext, option
from sae_kit.sae import create_sae, load_sae
from sae_kit.seeding import derived_generator


def graddrop(gradients: list[torch.Tensor], uniform: torch.Tensor) -> torch.Tensor:
    """GradDrop's sign-purity combination of per-loss gradients (same shape) with U ~ Uniform(0, 1)."""
    stacked = torch.stack(gradients)
    purity = 0.5 * (1 + stacked.sum(0) / stacked.abs().sum(0).clamp_min(1e-30))
    positive_side = purity > uniform
    keep = torch.where(positive_side, stacked > 0, stacked < 0)
    return (stacked * keep).sum(0)


class BinaryMask(nn.Module):
    """W ↦ W ⊙ 1[m > threshold], with the straight-through gradient to the mask weights m."""

    def __init__(self, weights: nn.Parameter, threshold: float):
        super().__init__()
        self._weights = [weights]  # owned by the plugin's modules, not by the SAE
        self.threshold = threshold

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        m = self._weights[0]
        binary = (m > self.threshold).to(W.dtype)
        return W * (binary + m - m.detach())


class MaskTune(Plugin):
    name = "mask_tune"
    paper = "Regularized mask tuning (R-AMT)"
    summary = "transfer a pretrained SAE: learn a binary mask over its encoder weights (decoder frozen), GradDrop vs its reconstructions"
    ablation = Ablation(metric="fvu", baseline_options={"tune": "none"})
    lr_scale = 10.0  # mask weights must travel ~0.5 to flip an entry

    @dataclass
    class Options:
        pretrained: str = option("auto", "SAE folder to transfer, or auto: train one in setup on pretrain_data", path="sae")
        pretrain_data: str = option("auto", "with pretrained=auto: an activation store, or auto (synthetic: the "
                                            "run's dictionary with the firing profile reversed)", path="store")
        pretrain_steps: int = option(0, "with pretrained=auto: training steps (0: as many as the run)")
        consistency: float = option(0.1, "weight of ‖x̂ − x̂_pretrained‖² / Var (the forgetting regulariser)")
        threshold: float = option(0.5, "mask weights above it keep their encoder entry (they start at 1)")
        graddrop: bool = option(True, "combine the task and consistency gradients of the mask by GradDrop")
        tune: Literal["mask", "full", "none"] = option("mask", "mask, full fine-tuning, or none (the pretrained SAE as is)")

    def validate(self) -> None:
        if self.opts.consistency < 0 or not 0 < self.opts.threshold < 1 or self.opts.pretrain_steps < 0:
            raise ConfigError("mask_tune: need consistency >= 0, 0 < threshold < 1 and pretrain_steps >= 0")

    def setup(self, trainer) -> None:
        sae = trainer.sae
        original = create_sae(copy.deepcopy(sae.cfg)).requires_grad_(False)
        self.modules["pretrained"] = original
        if not trainer.resumed:
            source = self.pretrained_sae(trainer)
            for what in ("d_in", "d_sae", "architecture"):
                if getattr(source.cfg, what) != getattr(sae.cfg, what):
                    raise ConfigError(f"mask_tune: the pretrained SAE has {what}={getattr(source.cfg, what)}, the run "
                                      f"{getattr(sae.cfg, what)}; train with the pretrained SAE's settings")
            original.load_state_dict(source.state_dict())
            sae.load_state_dict(source.state_dict())
        original.eval()
        if self.opts.tune == "mask":
            if not isinstance(sae.W_enc, nn.Parameter):
                raise ConfigError(f"mask_tune: the {sae.architecture} SAE has no free encoder matrix to mask "
                                  "(tied or already parametrised); use tune=full or another architecture")
            sae.requires_grad_(False)
            self.modules["mask"] = nn.ParameterDict({"W_enc": nn.Parameter(torch.ones_like(sae.W_enc, dtype=torch.float32))})
            parametrize.register_parametrization(sae, "W_enc", BinaryMask(self.modules["mask"]["W_enc"], self.opts.threshold))
            sae.parametrizations.W_enc.original.requires_grad_(False)

    def pretrained_sae(self, trainer):
        if self.opts.pretrained != "auto":
            return load_sae(self.opts.pretrained)

        if self.opts.pretrain_data == "auto":
            from sae_kit.eval.synthetic import SyntheticSource
            from sae_kit.plugins._sources import reversed_profile

            if not isinstance(trainer.source, SyntheticSource):
                raise ConfigError("mask_tune: pretrain_data=auto works on synthetic data only; give pretrained=SAE_FOLDER "
                                  "or pretrain_data=STORE (the activations the SAE is transferred from)")
            source = reversed_profile(trainer.source.dataset)
        else:
            from sae_kit.store import ActivationStore

            source = ActivationStore(self.opts.pretrain_data)
        cfg = trainer.cfg
        steps = self.opts.pretrain_steps or cfg.total_steps
        pre_cfg = replace(cfg, out=str(Path(cfg.out) / "mask_tune" / "pretrained"), plugins=[],
                          tokens=steps * cfg.batch_size, eval_every=steps, checkpoint_every=steps, progress=False)
        return trainer.train_helper(pre_cfg, source)

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.opts.tune == "none" or self.opts.consistency == 0:
            return {}
        out, original = ctx.out, self.modules["pretrained"]
        with torch.no_grad():
            reference = original.decode_normalized(original.select(original.pre_activations(out.x_n), out.x_n))
        consistency = self.opts.consistency * (out.x_hat_n - reference).pow(2).sum(1).mean() / ctx.trainer.input_variance
        if self.opts.tune == "mask" and self.opts.graddrop:
            mask = self.modules["mask"]["W_enc"]
            self._gradients = [torch.autograd.grad(term, mask, retain_graph=True, allow_unused=True)[0]
                               for term in (out.parts["reconstruction"], consistency)]
            self._gradients = [torch.zeros_like(mask) if g is None else g for g in self._gradients]
        return {"consistency": consistency}

    def after_backward(self, ctx: StepContext) -> None:
        if self.opts.tune != "mask" or not self.opts.graddrop or self.opts.consistency == 0:
            return
        mask = self.modules["mask"]["W_enc"]
        generator = derived_generator(self.name, ctx.trainer.cfg.seed, ctx.step)
        uniform = torch.rand(mask.shape, generator=generator).to(mask.device)
        mask.grad = graddrop(self._gradients, uniform)

    def hyperparameters(self, hp: dict[str, Any], trainer) -> None:
        if self.opts.tune == "none":
            hp["lr"] = 0.0  # nothing trains; the steps still run so the run's bookkeeping is unchanged

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        from sae_kit.eval.evaluate import evaluate_sae

        cfg = trainer.cfg
        original = self.modules["pretrained"]
        before = evaluate_sae(original, trainer.source, max_tokens=cfg.eval_tokens, summary=True,
                              batch_size=min(cfg.batch_size, cfg.eval_tokens), heldout_fraction=cfg.heldout_fraction)
        kept = float((self.modules["mask"]["W_enc"] > self.opts.threshold).float().mean()) if "mask" in self.modules else 1.0
        return {"fvu_pretrained": before["fvu"], "mask_kept": kept,
                "decoder_drift": float((sae.W_dec - original.W_dec).abs().max())}

"""AbsTopK SAE (Zhu, Khalili & Zhu, ICLR 2026): hard thresholding by magnitude, signs kept.

The prox of R = 1{||z||_0 <= k} without a non-negativity constraint: keep the k entries of largest
|u| with their sign, no ReLU, so one latent can encode a feature and its opposite.
- ``selection="token"`` (the paper's math): k per token.
- ``selection="batch"`` (the official code's ``batchabsolutek``): the top k·B of |u| over the batch;
  inference uses a global threshold on |u| (an EMA of the smallest selected |u|, as BatchTopK) —
  our choice, since the official implementation could not be read.
AuxK is signed: dead latents are ranked by |u| and keep their signs. Like the TopK family we
pre-subtract b_dec (unverified for the official code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sae_kit.codes import SparseCodes
from sae_kit.config import SAEConfig
from sae_kit.sae.base import SAE, NotExportable, TrainingOutput, register


@dataclass
class AbsTopKOptions:
    selection: Literal["token", "batch"] = "token"
    threshold_beta: float = 0.999


@register
class AbsTopKSAE(SAE):
    architecture = "abstopk"
    Options = AbsTopKOptions
    signed_codes = True

    def saelens_export(self, tensors):
        if self.opts.selection != "token":
            raise NotExportable("SAELens cannot express batch-level AbsTopK (a global threshold on |u| keeping signs); "
                                "only --opt selection=token exports")
        return "abstopk", {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_threshold()

    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        magnitude = pre.abs()
        if self.opts.selection == "token":
            indices = magnitude.topk(self.k, dim=1).indices
            return SparseCodes(indices, pre.gather(1, indices), self.cfg.d_sae)
        return self.batch_level_select(magnitude, pre)

    def auxiliary_losses(self, out: TrainingOutput, input_variance) -> dict[str, torch.Tensor]:
        return self.dead_latent_loss(out, signed=True)

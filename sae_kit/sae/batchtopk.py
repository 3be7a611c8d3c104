"""BatchTopK SAE (Bussmann, Leask & Nanda 2024): the top k·B activations of the whole batch.

Training keeps the k·B largest ReLU'd pre-activations of the [B, d_sae] matrix, so the mean L0 is
k while each token's L0 varies. Inference uses one global threshold θ instead of the batch:
z = a·1[a > θ]. θ is a bias-corrected EMA (``threshold_beta``) of the smallest selected activation
per batch; the paper averages that minimum over batches and dictionary_learning uses a plain EMA
started at step 1000, and the bias correction lets ours start at step 0 with the same long-run value.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_kit.codes import SparseCodes
from sae_kit.config import SAEConfig
from sae_kit.sae.base import SAE, TrainingOutput, register


@dataclass
class BatchTopKOptions:
    threshold_beta: float = 0.999


@register
class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    saelens_export = SAE.saelens_threshold_export
    Options = BatchTopKOptions

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_threshold()

    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        # The selected entries are > 0, so selecting on u itself equals selecting on ReLU(u).
        return self.batch_level_select(pre, pre)

    def auxiliary_losses(self, out: TrainingOutput, input_variance) -> dict[str, torch.Tensor]:
        return self.dead_latent_loss(out)

"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Selection: the k largest pre-activations of each token, ReLU'd after selection (OpenAI's order:
a token with fewer than k positive pre-activations keeps fewer than k active latents).
"""
from __future__ import annotations

import torch

from sae_kit.codes import SparseCodes
from sae_kit.kernels import row_top_k
from sae_kit.sae.base import SAE, TrainingOutput, register


@register
class TopKSAE(SAE):
    architecture = "topk"
    sparsify_exportable = True

    def saelens_export(self, tensors):
        return "topk", {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}

    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        values, indices = row_top_k(pre, self.k)
        return SparseCodes(indices, values.relu(), self.cfg.d_sae)

    def auxiliary_losses(self, out: TrainingOutput, input_variance) -> dict[str, torch.Tensor]:
        return self.dead_latent_loss(out)

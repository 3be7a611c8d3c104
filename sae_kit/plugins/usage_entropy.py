"""GigaTok's entropy loss as a latent-usage regulariser (GigaTok, "Scaling visual tokenizers to 3 billion
parameters"; the LlamaGen-lineage ``compute_entropy_loss``).

The tokenizer loss is ``H_sample - H_batch``: each token's soft assignment ``p_b = softmax(affinity/τ)``
should be confident (low per-token entropy) while the batch's mean assignment ``p̄ = mean_b p_b`` should
spread over the codebook (high entropy). For an SAE the affinity is the pre-activation ``u`` (``|u|``
for AbsTopK, whose codes are signed), and the temperature is taken relative to ``std(u)`` so one
setting fits any activation scale [our choice; plugins.md A3].

Defaults (chosen, not from the paper): the per-token term is off (``sample_weight=0``) because it pushes
each token toward a single latent, against k > 1; ``coefficient=1e-3`` of the normalised MSE.
Caveat: natural feature frequencies are Zipfian and a uniform-usage target fights them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Categorical

from sae_kit.config import ConfigError
from sae_kit.plugins.api import Ablation, Plugin, StepContext, option


def usage_entropies(pre: torch.Tensor, temperature: float, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-token entropy, entropy of the batch-mean assignment) of ``softmax(u / (τ·std u))``."""
    affinity = pre.abs() if signed else pre
    logits = affinity / (temperature * affinity.std().detach() + 1e-8)
    per_token = Categorical(logits=logits)
    batch_usage = Categorical(probs=per_token.probs.mean(0))
    return per_token.entropy().mean(), batch_usage.entropy()


class UsageEntropy(Plugin):
    name = "usage_entropy"
    paper = "GigaTok (entropy loss)"
    summary = "loss: spread soft latent usage over the batch (maximise H(mean softmax(u/τ)))"
    ablation = Ablation(metric="dead_fraction", higher_is_better=False, options={"coefficient": 0.01})
    # The softmax spans every latent, so its gradient needs the dense pre-activations: the sparse
    # kernels would hand this plugin a u without gradient.
    needs_dense_pre_activations = True

    @dataclass
    class Options:
        coefficient: float = option(1e-3, "weight of the entropy term, relative to the normalised MSE")
        temperature: float = option(0.01, "softmax temperature, as a fraction of std(u)")
        sample_weight: float = option(0.0, "weight of the per-token entropy (minimised: confident assignments)")
        batch_weight: float = option(1.0, "weight of the batch-usage entropy (maximised: spread usage)")

    def validate(self) -> None:
        if not self.opts.temperature > 0:
            raise ConfigError(f"usage_entropy: temperature must be > 0, got {self.opts.temperature}")

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        h_sample, h_batch = usage_entropies(ctx.out.pre_activations, self.opts.temperature,
                                            signed=ctx.sae.signed_codes)
        ctx.logs["usage_entropy/h_batch"] = h_batch.item()
        return {"entropy": self.opts.coefficient * (self.opts.sample_weight * h_sample - self.opts.batch_weight * h_batch)}

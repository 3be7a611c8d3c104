"""ConR, the contrastive regulariser for imbalanced regression ("ConR: contrastive regularizer for deep
imbalanced regression"; after the official ``agedb-dir/loss.py``).

ConR pulls together the features of samples whose labels are close (positives) and pushes apart the
samples whose labels are far but whose *predictions* are close (the wrongly collapsed pairs), each
negative weighted by ``exp(e · label distance)``:

    ℓ_i = −mean_{p ∈ P_i} log( exp(s_ip/t) / (Σ_{p' ∈ P_i} exp(s_ip'/t) + Σ_{n ∈ N_i} w_in exp(s_in/t)) )

with s the cosine similarity of normalised features. Minority samples stop collapsing onto their
majority neighbours.

SAE adaptation [plugins.md B19; our choices]: the "label" is the input x, the "prediction" x̂, the
feature the code z. Distances are cosine distances of the centred vectors,
d_x(i, j) = 1 − cos(x_i − b_dec, x_j − b_dec) and d_x̂ likewise; positives: d_x ≤ ω; negatives:
d_x > ω and d_x̂ ≤ ω (different inputs reconstructed alike: a rare token absorbed into a frequent
neighbour). Similarities are taken between ``anchors`` anchor tokens and the whole batch, on the
codes made dense ([B, d_sae] memory: fine for CPU-sized runs, a cost to watch at d_sae = 64k). Anchors without a positive or without a negative add nothing (the official
code keeps only anchors with both).

Defaults [chosen]: ``omega=0.2``, ``temperature=0.07``, ``e=1`` (the official e=0.01 is for age
distances in years; cosine distances are ≤ 2), ``coefficient=0.05``, ``anchors=512``.

Measured [ablations/conr-topk.json; `sae-kit ablate --plugin conr --data synthetic --seeds 3`: topk,
planted sharkey d=64, d_sae 512, k 5, 500 steps]: a negative result. FRR@0.9 0.160 → 0.049 (paired
difference −0.111 ± 0.010, "hurts"), FVU 0.361 → 0.441; with coefficient=0.005 still FRR@0.9
0.160 → 0.137 (−0.023 ± 0.010), FVU 0.377. Our reading: pulling codes of input-similar tokens together competes
with the sparse code's job of telling them apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae_kit.config import ConfigError
from sae_kit.plugins.api import Ablation, Plugin, StepContext, option
from sae_kit.seeding import derived_generator


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def conr_loss(features: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, anchors: torch.Tensor,
              omega: float, temperature: float, e: float) -> torch.Tensor:
    """ConR over the [B, *] batch with anchors ``anchors`` (row indices); features carry the gradient."""
    label_distance = cosine_distance(labels[anchors], labels).detach()  # [A, B]
    prediction_distance = cosine_distance(predictions[anchors], predictions).detach()
    itself = anchors.unsqueeze(1) == torch.arange(labels.shape[0], device=labels.device).unsqueeze(0)
    positive = (label_distance <= omega) & ~itself
    negative = (label_distance > omega) & (prediction_distance <= omega)
    keep = positive.any(1) & negative.any(1)
    if not keep.any():
        return features.new_zeros(())
    normalized = F.normalize(features, dim=1)
    similarity = normalized[anchors[keep]] @ normalized.T / temperature  # [A', B]
    positive, negative, label_distance = positive[keep], negative[keep], label_distance[keep]
    push = torch.exp(e * label_distance)
    # Denominator in log space: positives with weight 1, negatives with weight push, others excluded.
    log_weight = torch.where(positive, 0.0, torch.where(negative, push.log(), float("-inf")))
    log_denominator = torch.logsumexp(similarity + log_weight, dim=1, keepdim=True)
    log_probability = similarity - log_denominator
    per_anchor = -(log_probability * positive).sum(1) / positive.sum(1)
    return per_anchor.mean()


class ConR(Plugin):
    name = "conr"
    paper = "ConR: contrastive regularizer for deep imbalanced regression"
    summary = "loss: contrast codes of input-similar tokens, push apart dissimilar tokens whose reconstructions collapsed"
    ablation = Ablation(metric="frr@0.9", higher_is_better=True)

    @dataclass
    class Options:
        coefficient: float = option(0.05, "weight of the contrastive term")
        omega: float = option(0.2, "cosine-distance threshold ω for 'close' inputs / reconstructions")
        temperature: float = option(0.07, "softmax temperature t")
        e: float = option(1.0, "pushing weight exp(e · d_x) of a negative")
        anchors: int = option(512, "anchor tokens per step")

    def validate(self) -> None:
        o = self.opts
        if o.coefficient < 0 or not 0 < o.omega < 2 or o.temperature <= 0 or o.anchors < 1:
            raise ConfigError("conr: need coefficient >= 0, 0 < omega < 2, temperature > 0 and anchors >= 1")

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        out, sae = ctx.out, ctx.sae
        batch = out.x_n.shape[0]
        generator = derived_generator(self.name, ctx.trainer.cfg.seed, ctx.step)
        anchors = torch.randperm(batch, generator=generator)[: self.opts.anchors].to(out.x_n.device)
        centre = sae.b_dec.detach()
        loss = conr_loss(out.codes.to_dense(), out.x_n - centre, out.x_hat_n.detach() - centre, anchors,
                         self.opts.omega, self.opts.temperature, self.opts.e)
        ctx.logs["conr/loss"] = loss.item()
        return {"contrastive": self.opts.coefficient * loss}

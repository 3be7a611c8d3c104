"""AugLocal's auxiliary network as a downstream loss through a uniformly sampled subset of the later
blocks ("Scaling supervised local learning with augmented auxiliary networks", AugLocal; after the
official ``unifSamp`` in ``networks/auxiliary_nets.py``).

AugLocal trains each layer l with a local auxiliary network built from d of its subsequent layers,
sampled uniformly: indices ``round(l + (L − l − 1) · i / d)``, i = 1..d, with d shrinking linearly
with depth. The SAE at layer l is the local layer; its auxiliary network is the *frozen* language
model with only those later blocks kept (the others are skipped: their output is replaced by their
input, through hooks at ``hook_resid_pre`` / ``hook_resid_post``), plus the final norm and unembedding.
Through the whole run each step adds

    kl_weight · KL(aux(x) ‖ aux(x̂ spliced at the hook))

on ``windows`` fresh text windows, with ``d = max(1, round(depth · (1 − l / L)))`` capped at the
number of later blocks [plugins.md B18; the weight 0.1 and depth 4 are the reference's proposal].
Caveat, stated by the reference: skipping blocks of a frozen model feeds the kept blocks inputs off
their training distribution (AugLocal's auxiliary networks are trained; ours are not). The exact
variant (every later block) is ``downstream_kl`` with ``phase=1``.

Model, hook and text as in ``downstream_kl``; ``evaluate`` reports CE-loss recovered, KL and Δ LM
loss with the full model on held-out text; ``kl_weight=0`` only evaluates (the ablation's baseline).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from sae_kit.config import ConfigError
from sae_kit.plugins._text_model import TextModelPlugin
from sae_kit.plugins.api import Ablation, StepContext, option


def uniform_subset(layer: int, n_layers: int, depth: int) -> list[int]:
    """AugLocal's unifSamp: ``round(l + (L − l − 1) · i / d)`` for i = 1..d (distinct, increasing)."""
    later = n_layers - layer - 1
    depth = min(depth, later)
    if depth <= 0:
        return []
    return sorted({int(round(layer + later * i / depth)) for i in range(1, depth + 1)})


def auxiliary_depth(layer: int, n_layers: int, depth_max: int) -> int:
    """d(l) = max(1, round(d_max · (1 − l / L))): shallower auxiliary networks for deeper layers."""
    return max(1, int(round(depth_max * (1 - layer / n_layers))))


def skip_blocks(blocks: list[int]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Replacement hooks that turn each block in ``blocks`` into the identity (its output = its input)."""
    hooks: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for block in blocks:
        saved: dict[str, torch.Tensor] = {}

        def keep_input(acts: torch.Tensor, saved=saved) -> torch.Tensor:
            saved["input"] = acts
            return acts

        def return_input(acts: torch.Tensor, saved=saved) -> torch.Tensor:
            return saved.pop("input")

        hooks[f"blocks.{block}.hook_resid_pre"] = keep_input
        hooks[f"blocks.{block}.hook_resid_post"] = return_input
    return hooks


class AugLocal(TextModelPlugin):
    name = "auglocal"
    paper = "AugLocal (augmented local learning)"
    summary = "loss: KL through a uniformly sampled subset of the later frozen blocks, with the SAE spliced in"
    ablation = Ablation(metric="auglocal/ce_recovered_vs_zero", higher_is_better=True,
                        baseline_options={"kl_weight": 0.0})

    @dataclass
    class Options:
        model: str = option("", "language model (default: the run's --model or the store's model_name)", path="model")
        hook: str = option("", "hook the SAE reads (default: the run's --hook or the store's hook_name)")
        dataset: str = option("default", "text for the loss (train split) and the evaluation (held-out split)", path="dataset")
        context: int = option(64, "tokens per window")
        windows: int = option(4, "text windows per step")
        kl_weight: float = option(0.1, "weight of the auxiliary KL term (0: evaluation only)")
        depth: int = option(4, "d_max: auxiliary blocks for the first layer, fewer for deeper ones")
        phase: float = option(1.0, "final fraction of the run with the term (AugLocal: all of it)")
        eval_tokens: int = option(8192, "held-out text tokens for CE-loss recovered")

    def validate(self) -> None:
        o = self.opts
        if o.depth < 1 or o.context < 2 or o.windows < 1 or o.kl_weight < 0 or not 0 < o.phase <= 1:
            raise ConfigError("auglocal: need depth >= 1, context >= 2, windows >= 1, kl_weight >= 0, 0 < phase <= 1")
        self.window = (1.0 - o.phase, 1.0)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        layer, n_layers = self.model.layer_of(self.hook), self.model.n_layers
        self.kept = uniform_subset(layer, n_layers, auxiliary_depth(layer, n_layers, self.opts.depth))
        self.skipped = [block for block in range(layer + 1, n_layers) if block not in self.kept]

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.opts.kl_weight == 0:
            return {}
        kl = self.text.spliced_kl(ctx.sae, replace=skip_blocks(self.skipped))
        ctx.logs["auglocal/kl"] = kl.item()
        return {"kl": self.opts.kl_weight * kl}

    def evaluate(self, sae, trainer) -> dict[str, Any]:
        return self.text.evaluate(sae, self.opts.eval_tokens)

"""Split agreement: do two SAEs trained on disjoint data learn the same features? (after "Generalization in
diffusion models arises from geometry-adaptive harmonic representations").

The paper trains two denoisers on non-overlapping subsets and finds they converge to nearly the same
function once the data is large enough: the passage from memorisation to generalisation. An SAE's
encoder is also a shrinkage in a learned basis, so the experiment transfers [plugins.md A6]: the run
trains on half A of its data (even batches) and, at the end, a second SAE of the same configuration
(seed + 1) trains on half B (odd batches) for the same number of steps. ``evaluate`` reports
- ``matched_cosine``: mean |cos| of the Hungarian matching of the two decoders
  (``scipy.optimize.linear_sum_assignment``), and ``matched_above_0.9``, the fraction above 0.9;
- ``functional_fvu``: Σ‖x̂_A − x̂_B‖² / Σ‖x̂_A − mean x̂_A‖² on held-out tokens (0: same function).

``mode=same_data`` trains the second SAE on half A too, with a different seed only: the cross-seed
agreement the disjoint one is compared with (the ablation's baseline). One run measures one token
budget; repeat with other ``--tokens`` for the agreement-versus-data curve. On an activation store
the halves are disjoint within an epoch (batches are reshuffled between epochs); on synthetic
streams every batch is a fresh draw. This plugin measures; it does not change how the run trains
beyond halving its data.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from sae_kit.eval.metrics import matched_cosines
from sae_kit.plugins.api import Ablation, Plugin, option


class HalfSource:
    """Every other batch of a source (``parity`` 0: even batches, 1: odd ones); data seed fixable."""

    def __init__(self, source: Any, parity: int, data_seed: int | None = None):
        self.source, self.parity, self.data_seed = source, parity, data_seed
        self.d_in = source.d_in

    def __getattr__(self, name: str) -> Any:  # provenance, split(): whatever the wrapped source has
        return getattr(self.source, name)

    def iter_batches(self, batch_size: int, *, split: str = "train", seed: int = 0, start_batch: int = 0, **kwargs):
        seed = seed if self.data_seed is None else self.data_seed
        if split != "train":  # evaluation reads the whole held-out split
            yield from self.source.iter_batches(batch_size, split=split, seed=seed, start_batch=start_batch, **kwargs)
            return
        inner = self.source.iter_batches(batch_size, split=split, seed=seed, start_batch=2 * start_batch, **kwargs)
        for index, batch in enumerate(inner):
            if index % 2 == self.parity:
                yield batch

    def sample(self, n: int, seed: int = 0, **kwargs) -> torch.Tensor:
        return self.source.sample(n, seed=seed, **kwargs)


@torch.no_grad()
def agreement(sae_a, sae_b, xs: list[torch.Tensor]) -> dict[str, float]:
    cosines = matched_cosines(sae_a.decoder_directions(), sae_b.decoder_directions())
    error = spread = 0.0
    outputs = [(sae_a(x), sae_b(x)) for x in xs]
    mean = torch.cat([a for a, _ in outputs]).mean(0)
    for a, b in outputs:
        error += (a - b).pow(2).sum().item()
        spread += (a - mean).pow(2).sum().item()
    return {"matched_cosine": float(cosines.mean()), "matched_above_0.9": float((cosines > 0.9).double().mean()),
            "functional_fvu": error / max(spread, 1e-12)}


class SplitAgreement(Plugin):
    name = "split_agreement"
    paper = "Generalization in diffusion models (geometry-adaptive harmonic representations)"
    summary = "measure: train a second SAE on the other half of the data; Hungarian-matched decoder agreement"
    ablation = Ablation(metric="split_agreement/matched_cosine", higher_is_better=True,
                        baseline_options={"mode": "same_data"}, kind="measurement")

    @dataclass
    class Options:
        mode: Literal["disjoint", "same_data"] = option(
            "disjoint", "second SAE on the other half (disjoint) or on the same half with another seed (same_data)")

    def setup(self, trainer) -> None:
        self.original_source = trainer.source
        trainer.replace_source(HalfSource(trainer.source, parity=0))

    def evaluate(self, sae, trainer) -> dict[str, Any]:
        cfg = trainer.cfg
        if self.opts.mode == "disjoint":
            other = HalfSource(self.original_source, parity=1)
        else:  # same batches as the run (its data seed), another initialisation
            other = HalfSource(self.original_source, parity=0, data_seed=cfg.seed)
        second_cfg = replace(cfg, out=str(Path(cfg.out) / "split_agreement" / "second"), seed=cfg.seed + 1, plugins=[],
                             eval_every=10**9, checkpoint_every=10**9)
        second = trainer.train_helper(second_cfg, other).eval()
        batches = self.original_source.iter_batches(min(cfg.batch_size, cfg.eval_tokens), split="heldout",
                                                    seed=cfg.seed, epochs=1, drop_last=False,
                                                    heldout_fraction=cfg.heldout_fraction)
        xs, seen = [], 0
        for x in batches:
            xs.append(x[: cfg.eval_tokens - seen].float())
            seen += xs[-1].shape[0]
            if seen >= cfg.eval_tokens:
                break
        was_training = sae.training
        sae.eval()
        try:
            return agreement(sae, second, xs)
        finally:
            sae.train(was_training)

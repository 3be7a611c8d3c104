"""Extra activation sources for the plugins that mix or select between domains (FLAD, CoLoR-Filter).

``sources="auto"`` on synthetic data builds related planted datasets: variant 0 is the run's own
distribution, the others plant fresh random dictionaries with the same firing profile (other
"domains"), or, with ``profile="reversed"``, the same dictionary with the firing profile reversed
(rare features become common: a target domain). Otherwise ``sources`` lists activation-store folders
joined by ``+`` (the comma separates plugin options).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from sae_kit.config import ConfigError
from sae_kit.eval.synthetic import (BernoulliSparsity, PlantedDataset, SyntheticSource, decaying_probabilities,
                                    random_unit_features)
from sae_kit.seeding import derive_seed, derived_generator


def synthetic_variants(dataset: PlantedDataset, count: int, seed: int = 0) -> list[SyntheticSource]:
    """Source 0: ``dataset`` itself; sources 1..count-1: fresh dictionaries, same firing profile."""
    sources = [SyntheticSource(dataset)]
    for index in range(1, count):
        features = random_unit_features(dataset.n_features, dataset.d, derived_generator("aux-source", seed, index))
        sources.append(SyntheticSource(replace(dataset, name=f"{dataset.name}-aux{index}", features=features)))
    return sources


def reversed_profile(dataset: PlantedDataset) -> SyntheticSource:
    """Same dictionary, firing probabilities reversed: the rare features of ``dataset`` become common."""
    sparsity = dataset.sparsity
    if not isinstance(sparsity, BernoulliSparsity):
        raise ConfigError("a reversed-profile target needs a planted set with per-feature firing probabilities "
                          "(sharkey or signed)")
    flipped = BernoulliSparsity(sparsity.probabilities.flip(0))
    return SyntheticSource(replace(dataset, name=f"{dataset.name}-reversed", sparsity=flipped))


def open_sources(spec: str, trainer: Any, count: int) -> list[Any]:
    if spec == "auto":
        if not isinstance(trainer.source, SyntheticSource):
            raise ConfigError("sources=auto works on synthetic data only; give sources=STORE1+STORE2+... "
                              "(activation-store folders joined by '+')")
        return synthetic_variants(trainer.source.dataset, count, trainer.cfg.seed)
    from sae_kit.store import ActivationStore

    sources = [ActivationStore(path) for path in spec.split("+") if path]
    for source in sources:
        if source.d_in != trainer.source.d_in:
            raise ConfigError(f"source {source.directory} has d_in={source.d_in}, the run's data {trainer.source.d_in}")
    if len(sources) < 2:
        raise ConfigError("give at least two sources (activation-store folders joined by '+')")
    return sources


class SourceCursor:
    """Batches from several sources, each with its own resumable position."""

    def __init__(self, sources: list[Any], batch_size: int, seed: int, heldout_fraction: float, name: str):
        self.sources = sources
        self.batch_size = batch_size
        self.seeds = [derive_seed(name, seed, index) % 2**31 for index in range(len(sources))]
        self.heldout_fraction = heldout_fraction
        self.position = [0] * len(sources)
        self._iterators: dict[int, Any] = {}

    def next(self, index: int) -> torch.Tensor:
        if index not in self._iterators:
            self._iterators[index] = self.sources[index].iter_batches(
                self.batch_size, split="train", seed=self.seeds[index], start_batch=self.position[index],
                heldout_fraction=self.heldout_fraction)
        self.position[index] += 1
        return next(self._iterators[index]).to(torch.float32)

    def state(self) -> list[int]:
        return list(self.position)

    def restore(self, position: list[int]) -> None:
        self.position = list(position)
        self._iterators.clear()

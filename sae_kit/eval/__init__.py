"""Evaluation: planted-feature datasets (``synthetic``) and metrics on tensors (``metrics``)."""
from __future__ import annotations

from sae_kit.eval.metrics import (
    ReconstructionMetrics,
    dictionary_coherence,
    feature_recovery_rate,
    latents_per_feature,
    max_cosine_per_feature,
    mmcs,
)
from sae_kit.eval.synthetic import DATASET_NAMES, PlantedDataset, make_dataset

__all__ = [
    "DATASET_NAMES",
    "PlantedDataset",
    "ReconstructionMetrics",
    "dictionary_coherence",
    "feature_recovery_rate",
    "latents_per_feature",
    "make_dataset",
    "max_cosine_per_feature",
    "mmcs",
]

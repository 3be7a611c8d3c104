"""Mutual Choice SAE (Ayonrinde 2024): one budget of k·B token-feature matches for the whole batch.

The global top k·B of the [B, d_sae] matrix is BatchTopK's rule (concurrent work), so this class
reuses it, with the same EMA inference threshold, and trains with aux_zipf_loss (see zipf.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from sae_kit.sae.base import register
from sae_kit.sae.batchtopk import BatchTopKSAE
from sae_kit.sae.zipf import ZipfAuxMixin, ZipfOptions


@dataclass
class MutualChoiceOptions(ZipfOptions):
    pass


@register
class MutualChoiceSAE(ZipfAuxMixin, BatchTopKSAE):
    architecture = "mutual_choice"
    Options = MutualChoiceOptions

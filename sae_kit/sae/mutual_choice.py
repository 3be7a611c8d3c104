"""Mutual Choice SAE (Ayonrinde 2024): one budget of k·B token-feature matches for the whole batch.

The global top k·B of the [B, d_sae] matrix is BatchTopK's rule (concurrent work), so this class
reuses it, with the same EMA inference threshold, and trains with aux_zipf_loss (see zipf.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sae_kit.sae.base import register
from sae_kit.sae.batchtopk import BatchTopKSAE
from sae_kit.sae.zipf import ZipfAuxMixin, ZipfOptions


@dataclass
class MutualChoiceOptions(ZipfOptions):
    # Auxiliary slots for dead latents and for alive ones below the Zipf tail density only, whose
    # gradient may raise their pre-activations but never lower them (zipf.py, 7.): the per-row
    # slots left 0.225 of latents unfired on GBA's imbalanced set, these 0.012-0.047 (seeds 0-2).
    aux_slots: Literal["deficit", "per_row"] = "deficit"


@register
class MutualChoiceSAE(ZipfAuxMixin, BatchTopKSAE):
    architecture = "mutual_choice"
    Options = MutualChoiceOptions

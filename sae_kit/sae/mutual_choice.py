"""Mutual Choice SAE (Ayonrinde 2024): one budget of k·B token-feature matches for the whole batch.

The global top k·B of the [B, d_sae] matrix is BatchTopK's rule (concurrent work), so this class
reuses it, with the same EMA inference threshold, and trains with aux_zipf_loss (see zipf.py).
Its default lifts dying latents to the inference threshold on the tokens they fall short on, where a
fire there would lower the reconstruction error (``lift_dying="helps"``, zipf.py 8.): one global
budget lets a few latents take every match, so without it most latents fire about once per 10k
tokens and miss held-out rows (docs/no_collapse.md, sessions 5 and 7).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sae_kit.sae.base import register
from sae_kit.sae.batchtopk import BatchTopKSAE
from sae_kit.sae.zipf import ZipfAuxMixin, ZipfOptions


@dataclass
class MutualChoiceOptions(ZipfOptions):
    lift_dying: Literal["off", "all", "helps"] = "helps"


@register
class MutualChoiceSAE(ZipfAuxMixin, BatchTopKSAE):
    architecture = "mutual_choice"
    Options = MutualChoiceOptions

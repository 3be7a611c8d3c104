"""Derived random seeds: one generator per (purpose, seed, ...) so any batch can be redrawn alone."""
from __future__ import annotations

import hashlib

import torch


def derive_seed(purpose: str, *parts: int | str) -> int:
    """A 63-bit seed hashed from a purpose and integer parts.

    Hashed rather than packed (``seed << 32 | index``): torch's CPU generator keeps only the low 32
    bits of a seed, so packed fields would collide, and hashing keeps distinct tuples apart.
    """
    text = "/".join([f"sae-kit-{purpose}", *(str(part) for part in parts)])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def derived_generator(purpose: str, *parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(purpose, *parts))

"""Sparse kernels, installed as ``sae_kit.kernels``.

``sparse_decode`` is the single entry point the SAEs use to turn padded sparse codes into dense
reconstructions. This module holds the plain-torch path (``F.embedding_bag``: it never builds a
dense [B, d_sae] matrix); GPU kernels plug in behind the same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Above K >= d_sae / DENSE_FRACTION active slots per row, decoding goes through a dense product.
DENSE_FRACTION = 8


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Return ``sum_j values[b, j] * weight[indices[b, j]]`` for each row b: [B, K] x [F, d] -> [B, d].

    Differentiable in ``values`` and ``weight``; padding slots (value 0) contribute nothing.
    """
    if indices.shape != values.shape or indices.dim() != 2:
        raise ValueError(f"sparse_decode needs [B, K] indices and values, got {tuple(indices.shape)}, {tuple(values.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"sparse_decode needs a [F, d] weight, got {tuple(weight.shape)}")
    if indices.shape[1] == 0:
        return weight.new_zeros(indices.shape[0], weight.shape[1])
    if indices.shape[1] * DENSE_FRACTION >= weight.shape[0]:
        # Codes this dense (GBA and ReLU early in training) decode faster as one matrix product,
        # and embedding_bag's weight gradient is slow for wide bags on CPU.
        dense = values.new_zeros(indices.shape[0], weight.shape[0]).scatter_add(1, indices, values)
        return dense.to(weight.dtype) @ weight
    return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")

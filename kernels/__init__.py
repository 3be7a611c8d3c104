"""Sparse kernels, installed as ``sae_kit.kernels``.

``sparse_decode`` is the single entry point the SAEs use to turn padded sparse codes into dense
reconstructions. Backends (all differentiable in ``values`` and ``weight``, none builds a dense
[B, d_sae] matrix except ``reference``):

* ``"torch"`` (``kernels/torch_path.py``): ``F.embedding_bag`` forward, gather / sparse-CSR
  backward. (The CPU default is still plain ``F.embedding_bag`` autograd.)
* ``"triton"`` (``kernels/triton_decode.py``): Triton forward and backward. The default on CUDA
  when Triton imports; on CPU only under ``TRITON_INTERPRET=1`` (tests).
* ``"reference"`` (``kernels/reference.py``): dense scatter then matmul, for tests.

With the default ``backend=None``, codes with ``K >= d_sae / DENSE_FRACTION`` slots per row decode
through one dense product instead. ``topk_encode`` (torch path) is the TopK encoder whose backward
touches only the selected latents.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import sparse_decode_reference
from .torch_path import sparse_decode_torch, topk_encode

__all__ = ["sparse_decode", "topk_encode", "DENSE_FRACTION", "BACKENDS"]

# Above K >= d_sae / DENSE_FRACTION active slots per row, decoding goes through a dense product.
DENSE_FRACTION = 8
BACKENDS = ("reference", "torch", "triton")


def _triton_decode():
    from .triton_decode import sparse_decode_triton

    return sparse_decode_triton


def _triton_usable() -> bool:
    try:
        _triton_decode()
    except Exception:  # Triton missing or broken: fall back to the torch path
        return False
    return True


def sparse_decode(
    indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """Return ``sum_j values[b, j] * weight[indices[b, j]]`` for each row b: [B, K] x [F, d] -> [B, d].

    Differentiable in ``values`` and ``weight``; padding slots (value 0) contribute nothing. The
    result has ``weight``'s dtype. ``backend`` forces one implementation (see the module doc).
    """
    if indices.shape != values.shape or indices.dim() != 2:
        raise ValueError(f"sparse_decode needs [B, K] indices and values, got {tuple(indices.shape)}, {tuple(values.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"sparse_decode needs a [F, d] weight, got {tuple(weight.shape)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"sparse_decode backend must be one of {BACKENDS}, got {backend!r}")
    if indices.shape[1] == 0:
        return weight.new_zeros(indices.shape[0], weight.shape[1])
    if backend == "reference":
        return sparse_decode_reference(indices, values, weight)
    if backend == "torch":
        return sparse_decode_torch(indices, values, weight)
    if backend == "triton":
        return _triton_decode()(indices, values, weight)
    if indices.shape[1] * DENSE_FRACTION >= weight.shape[0]:
        # Codes this dense (GBA and ReLU early in training) decode faster as one matrix product.
        dense = values.new_zeros(indices.shape[0], weight.shape[0]).scatter_add(1, indices, values)
        return dense.to(weight.dtype) @ weight
    if weight.is_cuda and _triton_usable():
        return _triton_decode()(indices, values, weight)
    # Plain embedding_bag autograd stays the CPU default until the whole training step moves to the
    # torch path and benchmarks/train_step.py shows the switch pays off end to end.
    return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")

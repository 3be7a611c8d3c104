"""Sparse kernels, installed as ``sae_kit.kernels``: the sparse parts of an SAE training step.

A TopK-style step needs one dense product, the pre-activations; after the selection everything is
sparse. The entry points (one dispatch for all of them):

* ``dense_pre_activations(x_c, W_enc, b_enc, out=None)``: the one dense product, no autograd.
* ``gather_pre_activations(x_c, W_enc, b_enc, pre, indices)``: the selected pre-activations with
  gradients to the encoder that touch only the selected latents.
* ``sparse_decode(indices, values, weight)``: x̂ = Σ_j v_j W[i_j], sparse backward.
* ``topk_encode(x, W_enc, b_enc, b_dec, k)``: the three above for a plain TopK.
* ``row_top_k(score, k)``: ``score.topk(k, dim=1)`` through group maxima (TopK's selection, CPU).
* ``batch_top_entries(score, total)``: BatchTopK's / Mutual Choice's batch-level selection
  without sorting the [B, F] matrix (torch ops, on any device).
* ``matrix_entries(matrix, rows, cols)``: ``matrix[rows, cols]``, faster on CPU.

Backends (``backend=``):
* ``"torch"`` (``kernels/torch_path.py``): embedding_bag, CSR products, index_add; the CPU default.
* ``"triton"`` (``kernels/triton_decode.py``): Triton forward and backward; the default on CUDA
  when Triton imports; on CPU only under ``TRITON_INTERPRET=1`` (tests).
* ``"reference"`` (``kernels/reference.py``): dense autograd, for tests.
With the default ``backend=None``, codes with ``K >= d_sae / DENSE_FRACTION`` slots per row go
through dense products instead.
"""
from __future__ import annotations

import torch

from .reference import gather_pre_activations_reference, sparse_decode_reference
from .torch_path import (
    DENSE_FRACTION,
    batch_top_entries,
    dense_pre_activations,
    densify,
    gather_pre_activations_torch,
    is_dense,
    matrix_entries,
    row_top_k,
    sparse_decode_torch,
)

__all__ = [
    "BACKENDS",
    "DENSE_FRACTION",
    "batch_top_entries",
    "dense_pre_activations",
    "gather_pre_activations",
    "matrix_entries",
    "row_top_k",
    "sparse_decode",
    "topk_encode",
]

BACKENDS = ("reference", "torch", "triton")


def _triton():
    from . import triton_decode

    return triton_decode


def _triton_usable() -> bool:
    try:
        _triton()
    except Exception:  # Triton missing or broken: fall back to the torch path
        return False
    return True


def _inside_torch_func() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def _backend(backend: str | None, tensor: torch.Tensor) -> str:
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
        return backend
    if _inside_torch_func():
        # torch.func transforms (plugins' per-source gradients) cannot wrap the sparse-layout
        # tensors of the sparse backwards; the dense reference gives the same values and gradients.
        return "reference"
    return "triton" if tensor.is_cuda and _triton_usable() else "torch"


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
    chosen = _backend(backend, weight)
    if indices.shape[1] == 0:
        return weight.new_zeros(indices.shape[0], weight.shape[1])
    if chosen == "reference":
        return sparse_decode_reference(indices, values, weight)
    if backend is None and is_dense(indices.shape[1], weight.shape[0]):
        # Codes this dense (GBA and ReLU early in training) decode faster as one matrix product.
        return densify(indices, values, weight.shape[0]).to(weight.dtype) @ weight
    if chosen == "triton":
        return _triton().sparse_decode_triton(indices, values, weight)
    return sparse_decode_torch(indices, values, weight)


def gather_pre_activations(
    x_c: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    pre: torch.Tensor,
    indices: torch.Tensor,
    backend: str | None = None,
    known: torch.Tensor | None = None,
) -> torch.Tensor:
    """``pre.gather(1, indices)`` [B, K], differentiable in ``x_c`` [B, d], ``W_enc`` [d, F], ``b_enc`` [F].

    ``pre`` must be ``dense_pre_activations(x_c, W_enc, b_enc)`` (computed without autograd); the
    backward never builds a dense [B, F] gradient unless the codes are dense. ``known``: those
    values already gathered (no gradient); the torch path returns them instead of gathering again.
    """
    if indices.dim() != 2 or pre.dim() != 2 or indices.shape[0] != pre.shape[0]:
        raise ValueError(f"gather_pre_activations needs [B, K] indices for [B, F] pre-activations, got "
                         f"{tuple(indices.shape)} and {tuple(pre.shape)}")
    if x_c.shape[0] != pre.shape[0] or W_enc.shape != (x_c.shape[1], pre.shape[1]):
        raise ValueError(f"gather_pre_activations: x_c {tuple(x_c.shape)}, W_enc {tuple(W_enc.shape)} and "
                         f"pre {tuple(pre.shape)} do not fit [B, d], [d, F], [B, F]")
    chosen = _backend(backend, W_enc)
    if chosen == "reference":
        return gather_pre_activations_reference(x_c, W_enc, b_enc, indices)
    if chosen == "triton" and not is_dense(indices.shape[1], pre.shape[1]):
        return _triton().gather_pre_activations_triton(x_c, W_enc, b_enc, pre, indices)
    return gather_pre_activations_torch(x_c, W_enc, b_enc, pre, indices, known)


def topk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK pre-activations of ``(x - b_dec) @ W_enc + b_enc`` -> (values [B, k], indices [B, k]).

    ``W_enc`` is [d_in, d_sae]. Values are the raw pre-activations (apply ReLU after, as TopK does);
    the backward touches only the k selected latents per token.
    """
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(f"topk_encode needs x [B, d_in] and W_enc [d_in, d_sae], got {tuple(x.shape)}, {tuple(W_enc.shape)}")
    k = min(int(k), W_enc.shape[1])
    if k < 1:
        raise ValueError(f"topk_encode needs k >= 1, got {k}")
    x_c = x - b_dec
    pre = dense_pre_activations(x_c, W_enc, b_enc)
    indices = pre.topk(k, dim=1).indices
    return gather_pre_activations(x_c, W_enc, b_enc, pre, indices, backend), indices

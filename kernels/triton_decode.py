"""Triton sparse decode: x̂[b] = Σ_j v[b,j] W[i[b,j]] with a Triton forward and backward.

Kernels (all accumulate in fp32, every load and store is masked):

* ``_decode_fwd``: grid (B, cdiv(d, BLOCK_D)). Program (b, t) walks row b's K slots in tiles of
  BLOCK_K: loads the indices and values, the [BLOCK_K, BLOCK_D] tile of W rows, and adds
  Σ_j v_j W[i_j, cols] to an fp32 accumulator; stores it in W's dtype. No atomics, no sorting
  (sparsify's / OpenAI's forward, tiled over K).
* ``_decode_grad_values``: grid (B,). ``dv[b, j] = g[b] · W[i[b, j]]``: per K tile, loops over
  column tiles of d and reduces ``W_tile * g_tile`` over the columns.
* ``_decode_grad_weight``: deterministic, atomic-free, by sorting. The wrapper flattens the B·K
  slots, gives zero-valued (padding) slots the key F (a bucket nobody reads), sorts the keys
  (stable), and builds CSR offsets per latent (bincount + cumsum). Grid (F, cdiv(d, BLOCK_D)):
  program (e, t) sums ``v[r] * g[row(r), cols]`` over latent e's bucket in tiles of BLOCK_E and
  stores the row, so every row of dW is written (zeros for untouched latents) and the result is
  bit-reproducible. Trade-off: a latent that fires on most tokens is summed by one program per
  column tile (load imbalance) — OpenAI's blocked + atomic_add variant would spread it.

``sparse_decode_triton`` is the autograd wrapper. The encoder's sparse backward is the same two
operations on other tensors (``gather_pre_activations_triton``): the input gradient is a decode of
the value gradients through W_encᵀ, and the encoder weight gradient is the sorted per-latent sum
with x_c in place of the output gradient. Under ``TRITON_INTERPRET=1`` (set before this
module is imported) it runs on CPU tensors, slowly (~4 ms per program): tests only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .torch_path import GatherPreActivations


@triton.jit
def _decode_fwd(idx_ptr, val_ptr, w_ptr, out_ptr, K, D, stride_w, stride_out,
                BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    offs_d = t * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        idx = tl.load(idx_ptr + b * K + offs_k, mask=mask_k, other=0)
        val = tl.load(val_ptr + b * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        rows = tl.load(w_ptr + idx[:, None] * stride_w + offs_d[None, :],
                       mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(rows * val[:, None], axis=0)
    tl.store(out_ptr + b * stride_out + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _decode_grad_values(idx_ptr, g_ptr, w_ptr, dv_ptr, K, D, stride_w, stride_g,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        idx = tl.load(idx_ptr + b * K + offs_k, mask=mask_k, other=0)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            g = tl.load(g_ptr + b * stride_g + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            rows = tl.load(w_ptr + idx[:, None] * stride_w + offs_d[None, :],
                           mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(rows * g[None, :], axis=1)
        tl.store(dv_ptr + b * K + offs_k, acc.to(dv_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _decode_grad_weight(offsets_ptr, rows_ptr, vals_ptr, g_ptr, dw_ptr, D, stride_g, stride_dw,
                        BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    e = tl.program_id(0)
    t = tl.program_id(1)
    offs_d = t * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(start, end, BLOCK_E):
        offs_e = s + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        rows = tl.load(rows_ptr + offs_e, mask=mask_e, other=0)
        vals = tl.load(vals_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * stride_g + offs_d[None, :],
                    mask=mask_e[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(g * vals[:, None], axis=0)
    tl.store(dw_ptr + e * stride_dw + offs_d, acc.to(dw_ptr.dtype.element_ty), mask=mask_d)


def _blocks(k: int, d: int) -> tuple[int, int]:
    block_k = min(triton.next_power_of_2(max(k, 1)), 16)
    block_d = min(triton.next_power_of_2(max(d, 1)), 256)
    return block_k, block_d


def _check_indices(indices: torch.Tensor, n: int) -> None:
    # The interpreter does not bounds-check loads: a bad index would corrupt the heap. On a GPU
    # the check would cost a sync, so it is done only for CPU (interpreted) tensors.
    if not indices.is_cuda and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise IndexError(f"sparse_decode: indices must lie in [0, {n}), got [{int(indices.min())}, {int(indices.max())}]")


def decode_forward(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, d] in weight's dtype; ``out`` (contiguous, optional) is fully overwritten."""
    batch, k = indices.shape
    d = weight.shape[1]
    if out is None:
        out = torch.empty(batch, d, dtype=weight.dtype, device=weight.device)
    if batch == 0 or d == 0:
        return out
    block_k, block_d = _blocks(k, d)
    grid = (batch, triton.cdiv(d, block_d))
    _decode_fwd[grid](indices, values, weight, out, k, d, weight.stride(0), out.stride(0),
                      BLOCK_K=block_k, BLOCK_D=block_d)
    return out


def decode_grad_values(
    indices: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``dv[b, j] = grad_out[b] · weight[indices[b, j]]`` -> [B, K]; ``out`` is fully overwritten."""
    batch, k = indices.shape
    d = weight.shape[1]
    dv = torch.empty(batch, k, dtype=dtype, device=weight.device) if out is None else out
    if batch == 0:
        return dv
    block_k, block_d = _blocks(k, d)
    _decode_grad_values[(batch,)](indices, grad_out, weight, dv, k, d, weight.stride(0), grad_out.stride(0),
                                   BLOCK_K=block_k, BLOCK_D=block_d)
    return dv


def decode_grad_weight(
    indices: torch.Tensor, values: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``dW[e] = Σ_{(b,j): indices[b,j] = e} values[b,j] grad_out[b]`` -> [F, d]; every row of ``out`` is written."""
    n, d = weight.shape
    k = indices.shape[1]
    dw = torch.empty(n, d, dtype=weight.dtype, device=weight.device) if out is None else out
    if n == 0 or d == 0:
        return dw
    flat_v = values.reshape(-1)
    # Padding slots (value 0) go to bucket n, which no program reads.
    keys = torch.where(flat_v != 0, indices.reshape(-1), torch.full_like(indices.reshape(-1), n))
    keys, order = torch.sort(keys, stable=True)
    rows = torch.div(order, max(k, 1), rounding_mode="floor").contiguous()
    vals = flat_v[order].contiguous()
    offsets = torch.zeros(n + 2, dtype=torch.int64, device=weight.device)
    offsets[1:] = torch.bincount(keys, minlength=n + 1).cumsum(0)
    _, block_d = _blocks(k, d)
    grid = (n, triton.cdiv(d, block_d))
    _decode_grad_weight[grid](offsets, rows, vals, grad_out, dw, d, grad_out.stride(0), dw.stride(0),
                              BLOCK_E=16, BLOCK_D=block_d)
    return dw


class TritonSparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(indices, values, weight):
        return decode_forward(indices, values, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        indices, values, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_values = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_values = decode_grad_values(indices, weight, grad_out, values.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = decode_grad_weight(indices, values, grad_out, weight)
        return None, grad_values, grad_weight


def sparse_decode_triton(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    _check_indices(indices, weight.shape[0])
    return TritonSparseDecode.apply(indices.contiguous(), values.contiguous(), weight.contiguous())


class TritonGatherPreActivations(GatherPreActivations):
    """The torch path's gather, with the backward done by the decode kernels above."""

    @staticmethod
    def backward(ctx, grad_values):
        x_c, W_enc, indices = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        g = grad_values.contiguous()
        table = W_enc.T.contiguous()  # [F, d]: the selected latents' encoder columns as rows
        grad_x = grad_W = grad_b = None
        if need_x:
            grad_x = decode_forward(indices, g, table).to(x_c.dtype)
        if need_W:
            grad_W = decode_grad_weight(indices, g, x_c.contiguous(), table).T
        if need_b:
            grad_b = torch.zeros(W_enc.shape[1], dtype=torch.float32, device=g.device)
            grad_b = grad_b.index_add_(0, indices.reshape(-1), g.reshape(-1).float()).to(ctx.b_enc_dtype)
        return grad_x, grad_W, grad_b, *([None] * (len(ctx.needs_input_grad) - 3))  # pre, indices, known


def gather_pre_activations_triton(x_c, W_enc, b_enc, pre, indices) -> torch.Tensor:
    _check_indices(indices, W_enc.shape[1])
    return TritonGatherPreActivations.apply(x_c, W_enc, b_enc, pre, indices.contiguous())

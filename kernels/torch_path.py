"""The CPU path: sparse decode and TopK encode as torch autograd Functions that never build a
dense [B, F] tensor, forward or backward.

Design
------
* ``SparseDecode`` (x̂[b] = Σ_j v[b,j] W[i[b,j]]):
  forward = ``F.embedding_bag(mode="sum", per_sample_weights=v)``;
  backward: ``grad_values[b,j] = g[b] · W[i[b,j]]`` by gathering the K rows of W per token
  (``F.embedding``) and a batched mat-vec (``bmm``), in cache-sized blocks of tokens;
  ``grad_W[e] = Σ_{(b,j): i[b,j]=e} v[b,j] g[b]`` per latent by ``scatter_rows``.
* ``TopKEncode`` (values, indices = topk((x - b_dec) @ W_enc + b_enc, k)):
  forward = one dense product (``addmm``) for the pre-activations plus ``topk``; backward uses only
  the [B, k] value gradient g: ``grad_W_enc^T = scatter_rows(i, g, x - b_dec)`` (only the k selected
  columns per token get anything); ``grad_b_enc = index_add(g)``; ``grad_x`` = embedding_bag over
  W_enc's selected columns; ``grad_b_dec = -W_enc @ grad_b_enc`` (batch reduced before the mat-vec).

``scatter_rows`` (out[e] = Σ_{(b,j): i[b,j]=e} w[b,j] rows[b]) sorts the B·K slots by latent into
a CSR matrix [F, B] and multiplies it with the dense rows (``torch.sparse`` CSR @ dense: 3-4x faster
than ``index_add_`` on CPU at d=768, F=16384, k=32, and no [B·K, d] intermediate);
``scatter_rows_index_add`` is the ``index_add_`` variant (chunked sources), kept as a fallback.
Repeated indices add up; padding slots (value 0) add nothing. Half-precision inputs are accumulated
in fp32 and cast back.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 21  # elements of one gathered [rows, K, d] block (8 MB in fp32: cache-sized)
INDEX_ADD_CHUNK_ELEMENTS = 1 << 26  # index_add_ is slow on small sources: one [rows, K, d] source <= 256 MB


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunk_rows(batch: int, k: int, d: int, limit: int | None = None) -> int:
    return max(1, min(batch, (CHUNK_ELEMENTS if limit is None else limit) // max(k * d, 1)))


def gather_dot(indices: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = rows[b] · table[indices[b, j]]`` -> [B, K] (accumulation dtype), without a [B, F] product."""
    batch, k = indices.shape
    acc = _accum_dtype(table.dtype)
    out = torch.empty(batch, k, dtype=acc, device=table.device)
    step = _chunk_rows(batch, k, table.shape[1])
    rows = rows.to(acc)
    for s in range(0, batch, step):
        picked = F.embedding(indices[s : s + step], table).to(acc)  # [c, K, d]
        torch.bmm(picked, rows[s : s + step].unsqueeze(-1), out=out[s : s + step].unsqueeze(-1))
    return out


def scatter_rows(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """``out[i] = Σ_{(b,j): indices[b,j] = i} weights[b, j] * rows[b]`` -> [n, d] (accumulation dtype).

    The (b, j) slots are sorted by latent (stable, so each latent's rows stay in order) into a CSR
    matrix S [n, B] and ``out = S @ rows``: per-latent accumulation with no [B*K, d] intermediate.
    Repeated indices simply give repeated entries, which the product sums.
    """
    batch, k = indices.shape
    acc = _accum_dtype(rows.dtype)
    flat = indices.reshape(-1)
    keys, order = torch.sort(flat, stable=True)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(keys, minlength=n).cumsum(0)
    cols = torch.div(order, k, rounding_mode="floor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        S = torch.sparse_csr_tensor(crow, cols, weights.reshape(-1)[order].to(acc), (n, batch))
        return S @ rows.to(acc)


def scatter_rows_index_add(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """``scatter_rows`` by ``index_add_`` of ``weights[b, j] * rows[b]`` in chunks of tokens."""
    batch, k = indices.shape
    d = rows.shape[1]
    acc = _accum_dtype(rows.dtype)
    out = torch.zeros(n, d, dtype=acc, device=rows.device)
    step = _chunk_rows(batch, k, d, INDEX_ADD_CHUNK_ELEMENTS)
    for s in range(0, batch, step):
        src = weights[s : s + step].to(acc).unsqueeze(-1) * rows[s : s + step].to(acc).unsqueeze(1)  # [c, K, d]
        out.index_add_(0, indices[s : s + step].reshape(-1), src.reshape(-1, d))
    return out


class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices, values, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        indices, values, weight = ctx.saved_tensors
        grad_values = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_values = gather_dot(indices, weight, grad_out).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = scatter_rows(indices, values, grad_out, weight.shape[0]).to(weight.dtype)
        return None, grad_values, grad_weight


def sparse_decode_torch(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_j values[b, j] * weight[indices[b, j]] -> [B, d], with the sparse backward above."""
    return SparseDecode.apply(indices, values, weight)


class TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int):
        x_c = x - b_dec
        pre = torch.addmm(b_enc, x_c, W_enc)
        values, indices = pre.topk(k, dim=1)
        ctx.save_for_backward(x_c, W_enc, indices)
        ctx.dtypes = (x.dtype, b_enc.dtype, b_dec.dtype)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        x_c, W_enc, indices = ctx.saved_tensors
        x_dtype, b_enc_dtype, b_dec_dtype = ctx.dtypes
        need_x, need_W, need_b_enc, need_b_dec, _ = ctx.needs_input_grad
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        if grad_values is None:
            return None, None, None, None, None
        acc = _accum_dtype(W_enc.dtype)
        g = grad_values.to(acc)
        n_latents = W_enc.shape[1]
        if need_b_enc or need_b_dec:
            grad_sum = torch.zeros(n_latents, dtype=acc, device=g.device).index_add_(0, indices.reshape(-1), g.reshape(-1))
            if need_b_enc:
                grad_b_enc = grad_sum.to(b_enc_dtype)
            if need_b_dec:
                grad_b_dec = -(W_enc.to(acc) @ grad_sum).to(b_dec_dtype)
        if need_W:
            grad_W = scatter_rows(indices, g, x_c, n_latents).T.contiguous().to(W_enc.dtype)
        if need_x:
            W_t = W_enc.T.to(acc).contiguous()  # [F, d]: selected columns as rows
            grad_x = F.embedding_bag(indices, W_t, per_sample_weights=g, mode="sum").to(x_dtype)
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None


def topk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int
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
    return TopKEncode.apply(x, W_enc, b_enc, b_dec, k)

"""The CPU path: the sparse parts of an SAE training step as torch autograd Functions that never
build a dense [B, F] tensor after the pre-activations, forward or backward.

A step has one dense product, the pre-activations ``u = x_c @ W_enc + b_enc`` (``x_c = x - b_dec``),
computed without autograd. Everything after the selection is sparse:

* ``GatherPreActivations`` (``u[b, i[b, j]]`` with gradients): forward = ``u.gather``; backward from
  the [B, K] gradient g only: ``grad_W_enc^T = scatter_rows(i, g, x_c)`` (the k selected columns
  per token), ``grad_b_enc = index_add(g)``, ``grad_x_c = embedding_bag(i, W_enc^T, g)`` (skipped
  when x_c needs no gradient: the SAE routes b_dec's through the bias). Several gathers from the
  same ``u`` (the code and AuxK's dead latents) each backpropagate their own slots.
* ``SparseDecode`` (x̂[b] = Σ_j v[b,j] W[i[b,j]]): forward = ``F.embedding_bag(mode="sum")``;
  backward: ``grad_values`` by a sampled dense product on the codes' pattern (``gather_dot``), ``grad_W[e] = Σ_{(b,j): i[b,j]=e} v[b,j] g[b]`` by ``scatter_rows``.
* ``batch_top_entries``: the ``total`` largest entries of a [B, F] score without sorting it: a
  threshold from a sample of rows, one pass of group maxima, compaction, an exact top-k among the
  few candidates.

``scatter_rows`` sorts the B·K slots by latent into a CSR matrix [F, B] (once per index matrix and
backward pass: a decode and its gather share the sort) and multiplies it with the dense rows
(``torch.sparse`` CSR @ dense: 3-4x faster than ``index_add_`` on CPU at d=768, F=16384, k=32, and
no [B·K, d] intermediate). Repeated indices add up; padding slots (value 0) are left out. The
products run over blocks of d's columns on CPU (``SCATTER_COLUMN_BLOCK``, ``GATHER_COLUMN_BLOCK``).
Half-precision inputs are accumulated in fp32 and cast back. When codes are dense (K ≥ F / 8 slots
per row: GBA and ReLU early in training) the backward goes through dense products instead.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# With K >= F / DENSE_FRACTION slots per row, one dense product beats the sparse kernels.
DENSE_FRACTION = 8
# Rows of the [B, F] score sampled to place batch_top_entries' threshold.
SAMPLE_ROWS = 256
# The sampled threshold aims at this many times the wanted entries, so it rarely falls short.
SAMPLE_MARGIN = 1.25


# Columns of d per pass of the sparse products on CPU. Every slot reads (or adds into) one d-long
# row of a dense operand larger than a core's L2 (4096 x 768 fp32 is 12 MiB), so a pass over all of
# d streams each row from L3 once per slot; a block of columns (4096 x 32 fp32: 512 KiB) stays in
# L2 while the slots revisit it. Measured at B 4096, d 768, 1 thread, AuxK's 384 slots per token
# (CPU ms, a loaded machine): scatter_rows 191 -> 141 at 32 columns, gather_dot 275 -> 172 and
# embedding_sum 118 -> 79 at 64. Each output element sums the same terms in the same order, so
# scatter_rows and embedding_sum give the same bits; gather_dot adds its dots block by block.
SCATTER_COLUMN_BLOCK = 32
GATHER_COLUMN_BLOCK = 64


def column_blocks(d: int, width: int, device: torch.device) -> list[slice]:
    """Slices of ``width`` columns covering d on CPU; one slice of all d elsewhere (a GPU's caches
    and launch costs call for no blocking)."""
    if device.type != "cpu":
        width = max(d, 1)
    return [slice(start, start + width) for start in range(0, d, width)]


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def is_dense(k: int, n_latents: int) -> bool:
    return k * DENSE_FRACTION >= n_latents


def densify(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    return values.new_zeros(indices.shape[0], n).scatter_add(1, indices, values)


def csr_index_dtype(*sizes: int) -> torch.dtype:
    """int32 where every index fits: MKL's CSR kernels (LP64) take int32 and convert int64 indices
    on every product, and int32 keys also sort faster."""
    return torch.int32 if max(sizes) < 2**31 else torch.int64


@dataclass
class LatentMajorSlots:
    """A [B, K] index matrix's slots sorted by latent (stable, so each latent's tokens stay in order):
    the CSR structure of ``scatter_rows``' [n, B] matrix, without its values."""

    crow: torch.Tensor  # [n + 1] each latent's first sorted slot
    tokens: torch.Tensor  # [B·K] each sorted slot's token (the CSR column)
    order: torch.Tensor  # [B·K] each sorted slot's position in the flattened [B, K]


def latent_major_slots(indices: torch.Tensor, n: int) -> LatentMajorSlots:
    batch, k = indices.shape
    index_dtype = csr_index_dtype(n + 1, batch * k + 1)
    keys, order = torch.sort(indices.reshape(-1).to(index_dtype), stable=True)
    crow = torch.zeros(n + 1, dtype=index_dtype, device=indices.device)
    crow[1:] = torch.bincount(keys, minlength=n).cumsum(0)
    tokens = torch.div(order, k, rounding_mode="floor").to(index_dtype)
    return LatentMajorSlots(crow, tokens, order)


# This thread's (indices, its version when sorted, n, slots), each kept until the end of the
# backward pass that sorted it; an entry holds its indices, so no other tensor takes their memory.
_sorted_in_backward = threading.local()
# At most this many entries: a backward that raises never runs its end-of-pass callbacks.
SORTED_IN_BACKWARD_MAX = 8


def shared_latent_major_slots(indices: torch.Tensor, n: int) -> LatentMajorSlots:
    """``latent_major_slots``, sorted once per index matrix within one backward pass: a decode and
    the gather of its values backpropagate through the same indices (the codes', AuxK's), and each
    needs the sort of its B·K slots. Call only from a backward."""
    memo = _sorted_in_backward.__dict__.setdefault("entries", [])
    for known, version, known_n, slots in memo:
        if known_n == n and version == indices._version and _same_tensor(known, indices):
            return slots
    entry = (indices, indices._version, n, latent_major_slots(indices, n))

    def forget() -> None:
        memo[:] = [e for e in memo if e is not entry]

    torch.autograd.Variable._execution_engine.queue_callback(forget)
    del memo[:-(SORTED_IN_BACKWARD_MAX - 1)]
    memo.append(entry)
    return entry[3]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a is b or a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def scatter_rows(
    indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n: int,
    slots: LatentMajorSlots | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[i] = Σ_{(b,j): indices[b,j] = i} weights[b, j] * rows[b]`` -> [n, d] (accumulation dtype).

    The (b, j) slots are sorted by latent (``slots``, when the caller already has them) into a CSR
    matrix S [n, B] and ``out = S @ rows``: per-latent accumulation with no [B*K, d] intermediate.
    Repeated indices simply give repeated entries, which the product sums; slots of weight 0 are
    left out. ``out``: an [n, d] tensor of the accumulation dtype to write into (any strides).
    """
    batch, k = indices.shape
    acc = _accum_dtype(rows.dtype)
    if slots is None:
        slots = latent_major_slots(indices, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        # index_select, not ``[slots.order]``: advanced indexing is ~4x slower on CPU.
        sorted_weights = weights.reshape(-1).index_select(0, slots.order).to(acc)
        crow, tokens = slots.crow, slots.tokens
        nonzero = sorted_weights != 0
        if not bool(nonzero.all()):
            # Zero weights add nothing: the padding of variable-k codes (Mutual Choice's rows are
            # padded to the longest, and every padding slot lands on latent 0), ReLU'd-off slots,
            # zero gradients. Leaving them out of S is the same sum for finite rows.
            kept_before = torch.zeros(nonzero.numel() + 1, dtype=crow.dtype, device=crow.device)
            kept_before[1:] = nonzero.cumsum(0)
            crow, tokens, sorted_weights = kept_before.index_select(0, crow), tokens[nonzero], sorted_weights[nonzero]
        S = torch.sparse_csr_tensor(crow, tokens, sorted_weights, (n, batch), check_invariants=False)
        # addmm into an uninitialised output with beta=0: ``S @ rows`` zero-fills its output and
        # copies MKL's result into it, two extra passes over [n, d] (~2.5x the product on CPU).
        if out is None:
            out = torch.empty(n, rows.shape[1], dtype=acc, device=rows.device)
        rows = rows.to(acc)
        for block in column_blocks(rows.shape[1], SCATTER_COLUMN_BLOCK, rows.device):
            torch.addmm(out[:, block], S, rows[:, block].contiguous(), beta=0.0, out=out[:, block])
        return out


def gather_dot(indices: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = rows[b] · table[indices[b, j]]`` -> [B, K] in the accumulation dtype.

    A sampled dense-dense product: ``rows @ table^T`` evaluated only on the codes' pattern (a CSR
    [B, F] matrix with one entry per slot; ``sampled_addmm`` computes one dot per stored entry, so
    unsorted and repeated indices are fine). ~25% faster than embedding_bag's fused
    per-sample-weights gradient on CPU, and no [B, K, d] gather.
    """
    batch, k = indices.shape
    acc = _accum_dtype(table.dtype)
    if batch == 0 or k == 0:
        return torch.zeros(batch, k, dtype=acc, device=table.device)
    index_dtype = csr_index_dtype(batch * k + 1, table.shape[0])
    crow = torch.arange(0, batch * k + 1, k, dtype=index_dtype, device=indices.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(crow, indices.reshape(-1).to(index_dtype), torch.zeros(batch * k, dtype=acc, device=table.device),
                                          (batch, table.shape[0]), check_invariants=False)
        rows, table = rows.to(acc), table.to(acc)
        # Each block's dots added into the pattern's own (zero) values in place: a separate output
        # would copy the pattern's B·K column indices per call.
        for block in column_blocks(rows.shape[1], GATHER_COLUMN_BLOCK, rows.device):
            torch.sparse.sampled_addmm(pattern, rows[:, block], table[:, block].T, beta=1.0, out=pattern)
    return pattern.values().view(batch, k)


def embedding_sum(indices: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_j weights[b, j] * table[indices[b, j]]`` -> [B, d] in ``table``'s dtype."""
    weights = weights.to(table.dtype)
    blocks = column_blocks(table.shape[1], GATHER_COLUMN_BLOCK, table.device)
    if len(blocks) <= 1:
        return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")
    out = torch.empty(indices.shape[0], table.shape[1], dtype=table.dtype, device=table.device)
    for block in blocks:
        out[:, block] = F.embedding_bag(indices, table[:, block], per_sample_weights=weights, mode="sum")
    return out


# The Functions separate forward from setup_context so torch.func transforms (grad, vmap'd
# sketches in plugins) can run through a training step.
class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return embedding_sum(indices, weight, values)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        indices, values, weight = ctx.saved_tensors
        grad_values = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_values = gather_dot(indices, weight, grad_out).to(values.dtype)
        if ctx.needs_input_grad[2]:
            slots = shared_latent_major_slots(indices, weight.shape[0])
            grad_weight = scatter_rows(indices, values, grad_out, weight.shape[0], slots).to(weight.dtype)
        return None, grad_values, grad_weight


def sparse_decode_torch(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_j values[b, j] * weight[indices[b, j]] -> [B, d], with the sparse backward above."""
    return SparseDecode.apply(indices.contiguous(), values, weight)


def dense_pre_activations(
    x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x_c @ W_enc + b_enc`` [B, F] without autograd, written into ``out`` when given.

    ``out`` may be the transpose of a contiguous [F, B] buffer: the product is then computed in
    feature-major order, so per-latent selections (Feature Choice) read contiguous rows. Reusing one
    ``out`` across steps also saves the page faults of a fresh B×F allocation (~10% of a CPU step).
    """
    with torch.no_grad():
        if out is None:
            return torch.addmm(b_enc, x_c, W_enc)
        if out.stride(0) == 1 and out.dim() == 2 and out.shape[0] > 1:
            torch.addmm(b_enc[:, None], W_enc.T, x_c.T, out=out.T)
        else:
            torch.addmm(b_enc, x_c, W_enc, out=out)
        return out


class GatherPreActivations(torch.autograd.Function):
    @staticmethod
    def forward(x_c, W_enc, b_enc, pre, indices, known=None):
        # ``known``: the caller's copy of pre.gather(1, indices) (AuxK's selection has the values it
        # chose from a cached block of u; gathering them again reads 1.6 M scattered entries of u).
        return pre.gather(1, indices) if known is None else known

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x_c, W_enc, b_enc, _pre, indices, _known = inputs
        ctx.save_for_backward(x_c, W_enc, indices)
        ctx.b_enc_dtype = b_enc.dtype

    @staticmethod
    def backward(ctx, grad_values):
        x_c, W_enc, indices = ctx.saved_tensors
        need_x, need_W, need_b, _, _, _ = ctx.needs_input_grad
        acc = _accum_dtype(W_enc.dtype)
        g = grad_values.to(acc)
        n_latents = W_enc.shape[1]
        grad_x = grad_W = grad_b = None
        if is_dense(indices.shape[1], n_latents):
            G = densify(indices, g, n_latents)
            if need_x:
                grad_x = (G @ W_enc.T.to(acc)).to(x_c.dtype)
            if need_W:
                grad_W = (x_c.T.to(acc) @ G).to(W_enc.dtype)
            if need_b:
                grad_b = G.sum(0).to(ctx.b_enc_dtype)
            return grad_x, grad_W, grad_b, None, None, None
        if need_b:
            grad_b = torch.zeros(n_latents, dtype=acc, device=g.device).index_add_(0, indices.reshape(-1), g.reshape(-1))
            grad_b = grad_b.to(ctx.b_enc_dtype)
        if need_W:
            # [d, F] stored column-major, the memory order of an encoder stored decoder-major (tied
            # init), and not a view, so autograd adds a second gather's gradient into it in place.
            grad_W = torch.empty_strided((x_c.shape[1], n_latents), (1, x_c.shape[1]), dtype=acc, device=g.device)
            slots = shared_latent_major_slots(indices, n_latents)
            scatter_rows(indices, g, x_c, n_latents, slots, out=grad_W.T)
            grad_W = grad_W.to(W_enc.dtype)
        if need_x:
            grad_x = embedding_sum(indices, W_enc.T.to(acc), g).to(x_c.dtype)
        return grad_x, grad_W, grad_b, None, None, None


def gather_pre_activations_torch(x_c, W_enc, b_enc, pre, indices, known=None) -> torch.Tensor:
    """``pre.gather(1, indices)`` whose gradient reaches ``x_c``, ``W_enc`` and ``b_enc`` sparsely.

    ``pre`` must equal ``x_c @ W_enc + b_enc`` (see ``dense_pre_activations``); it is not saved.
    ``known``: ``pre.gather(1, indices)`` already in hand (no autograd), returned instead of gathered.
    """
    if known is not None and (known.shape != indices.shape or known.dtype != pre.dtype or known.requires_grad):
        raise ValueError(f"known values must be [B, K] {pre.dtype} without gradient, got {tuple(known.shape)} {known.dtype}")
    return GatherPreActivations.apply(x_c, W_enc, b_enc, pre, indices.contiguous(), known)


# Groups of ROW_TOP_K_GROUP strided columns: row_top_k's first pass keeps each group's maximum.
ROW_TOP_K_GROUP = 16
# Groups of the group maxima, one level down (row_top_k of the maxima).
ROW_TOP_K_INNER_GROUP = 8


def row_top_k(
    score: torch.Tensor, k: int, group: int = ROW_TOP_K_GROUP, min_width: int = 4, sort: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``score.topk(k, dim=1)`` (values, indices; sorted descending) of a [B, F] matrix, faster on CPU.

    torch's CPU topk copies every row into a (value, index) queue and partially sorts it: ~8 % of a
    TopK training step at 16384 latents on one core. Here the columns fall into F/G strided groups
    of G = ROW_TOP_K_GROUP ({g, g + F/G, ...}); one vectorised pass takes each group's maximum,
    and a row's k largest entries lie in its k groups with the largest maxima (an entry outside
    them is below k group maxima, each a different entry), so the exact top-k is taken among those
    k·G entries only. The same values as ``topk``; among equal values another index may be chosen.
    Falls back to ``topk`` where the groups do not pay or do not fit (F not a multiple of G, F <
    ``min_width``·k·G, a non-contiguous score, CUDA, whose topk is fast). A large k (AuxK's k_aux,
    hundreds) pays with fewer groups: ``group=8, min_width=2``. ``sort=False``: each row's k in any
    order (a sum over them needs no order), which saves topk's final sort (~25 % of it on CPU).
    """
    batch, n = score.shape
    if score.is_cuda or not score.is_contiguous() or n % group or n < min_width * k * group or k < 1:
        return score.topk(k, dim=1, sorted=sort)
    width = n // group
    groups = score.view(batch, group, width)  # groups[b, m, g] = score[b, m·width + g]
    # The k best groups, by the same rule one level down where there are many maxima (TopK at 16384
    # latents: 1024 per row, whose topk was ~40 % of the selection; 94 -> 77 ms at [4096, 16384],
    # k 32, one core). Exact at every level, so still the row's top-k values.
    best = row_top_k(groups.amax(1), k, group=ROW_TOP_K_INNER_GROUP, min_width=2, sort=False)[1]  # [B, k] group ids
    candidates = groups.gather(2, best[:, None, :].expand(batch, group, k)).view(batch, group * k)
    values, position = candidates.topk(k, dim=1, sorted=sort)
    indices = best.gather(1, position % k) + (position // k) * width
    return values, indices


def batch_top_entries(score: torch.Tensor, total: int, positive: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the ``total`` largest entries of a [B, F] score, row-major order.

    With ``positive`` only entries > 0 qualify (so fewer may come back). Exact, like a top-k of the
    flattened matrix, but without sorting B·F values: a threshold placed from a sample of rows
    (tokens are shuffled, so rows are exchangeable), one comparison pass, compaction of the
    ~1.25·total candidates, an exact top-k among them. A threshold that falls short of ``total``
    entries (an unlucky sample) falls back to every positive entry as a candidate.
    """
    batch, n = score.shape
    total = min(total, batch * n)
    if total <= 0:
        empty = torch.zeros(0, dtype=torch.int64, device=score.device)
        return empty, empty
    sample = score[:: max(1, batch // SAMPLE_ROWS)]
    rank = min(sample.numel(), int(SAMPLE_MARGIN * total * sample.numel() / score.numel()) + 16)
    threshold = sample.reshape(-1).topk(rank).values[-1]

    def every_qualifying_entry() -> tuple[torch.Tensor, torch.Tensor]:
        return (score > 0 if positive else torch.ones_like(score, dtype=torch.bool)).nonzero(as_tuple=True)

    if positive and threshold <= 0:
        rows, cols = every_qualifying_entry()
    else:
        # Counted from the compaction itself: a count_nonzero first would be one more [B, F] pass.
        rows, cols = entries_at_least(score, threshold)
        if rows.numel() < total:
            rows, cols = every_qualifying_entry()
    if rows.numel() > total:
        keep = matrix_entries(score, rows, cols).topk(total).indices.sort().values
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def entries_at_least(score: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of ``score >= threshold``, row-major, as ``nonzero`` gives them, without a [B, F]
    mask on CPU: row_top_k's groups of ROW_TOP_K_GROUP strided columns, whose maxima (one
    vectorised pass) mark the few groups holding an entry at or above the threshold; only their
    members are compared. (A NaN entry hides its group's other entries, as in row_top_k.)"""
    batch, n = score.shape
    group = ROW_TOP_K_GROUP
    if score.is_cuda or not score.is_contiguous() or n % group:
        return (score >= threshold).nonzero(as_tuple=True)
    width = n // group
    group_rows, group_cols = (score.view(batch, group, width).amax(1) >= threshold).nonzero(as_tuple=True)
    if group_rows.numel() * group * 4 > batch * n:  # most groups marked: their members cost more than the mask
        return (score >= threshold).nonzero(as_tuple=True)
    # Flat positions of each marked group's members: score[b, m·width + g] for m < group.
    members = (group_rows * n + group_cols)[:, None] + torch.arange(0, n, width, device=score.device)
    values = score.reshape(-1).index_select(0, members.reshape(-1)).view_as(members)
    flat = members[values >= threshold].sort().values  # row-major, as nonzero's
    return torch.div(flat, n, rounding_mode="floor"), flat % n


def matrix_entries(matrix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``matrix[rows, cols]`` (with autograd), through one flat index_select where ``matrix`` is
    contiguous: advanced indexing computes two index streams and is ~2x slower on CPU."""
    if not matrix.is_contiguous():
        return matrix[rows, cols]
    return matrix.reshape(-1).index_select(0, rows * matrix.shape[1] + cols)

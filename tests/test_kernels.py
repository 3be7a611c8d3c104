"""Sparse kernels against their dense references: values and gradients of every backend.

References are computed in fp64 from the same (rounded) inputs. Triton runs under the CPU
interpreter (conftest sets TRITON_INTERPRET=1 before anything imports the kernels); its cases are
kept tiny because every program costs milliseconds there.
"""
from __future__ import annotations

import os
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sae_kit import kernels
from sae_kit.kernels import sparse_decode, topk_encode
from sae_kit.kernels import torch_path
from sae_kit.kernels.reference import (
    densify,
    sparse_decode_reference,
    topk_encode_grads_reference,
    topk_encode_reference,
)

try:
    import triton  # noqa: F401

    HAVE_TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton needs a GPU or TRITON_INTERPRET=1")
# Triton cases run on CUDA tensors natively when a GPU is present, else on CPU in the interpreter.
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def on_device(backend, tensors):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    return [t.to(device) for t in tensors]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make_codes(B, K, F, d, *, seed=0, repeat=False, padding=False):
    """Random [B, K] codes with optional repeated indices and zero-padded rows, plus W and g (fp64)."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, F, (B, K), generator=gen)
    values = torch.randn(B, K, generator=gen, dtype=torch.float64)
    if repeat and K > 1:
        indices[0, :] = indices[0, 0]  # one row repeats a single latent in every slot
        indices[1:, 1] = indices[1:, 0]  # every other row repeats its first latent once
        indices[B // 2 :, -1] = F - 1  # many rows share the last latent
    if padding:
        cut = torch.randint(0, K + 1, (B,), generator=gen)
        pad = torch.arange(K)[None, :] >= cut[:, None]
        pad[-1] = True  # a row with no active latent at all
        values[pad] = 0
        indices[pad] = 0
    weight = torch.randn(F, d, generator=gen, dtype=torch.float64)
    grad = torch.randn(B, d, generator=gen, dtype=torch.float64)
    return indices, values, weight, grad


def decode_with_grads(backend, indices, values, weight, grad):
    indices, values, weight, grad = on_device(backend, (indices, values, weight, grad))
    values = values.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    out = sparse_decode(indices, values, weight, backend=backend)
    out.backward(grad)
    return out.detach().cpu(), values.grad.cpu(), weight.grad.cpu()


def assert_close(actual, expected, tol):
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= tol * scale, f"max error {err:.3g} > {tol * scale:.3g}"


def check_decode(backend, dtype, indices, values, weight, grad):
    v, w, g = values.to(dtype), weight.to(dtype), grad.to(dtype)
    expected = decode_with_grads("reference", indices, v.double(), w.double(), g.double())
    actual = decode_with_grads(backend, indices, v, w, g)
    assert actual[0].dtype == dtype and actual[1].dtype == dtype and actual[2].dtype == dtype
    for a, e in zip(actual, expected):
        assert_close(a, e, TOL[dtype])


# (B, K, F, d, repeat, padding): k=1, non-powers of two, repeated indices, zero-padded rows.
CASES = [
    (1, 1, 1, 1, False, False),
    (5, 1, 7, 3, False, False),
    (13, 6, 37, 19, True, False),
    (11, 5, 29, 33, False, True),
    (17, 7, 23, 5, True, True),
]
BIG = (64, 12, 300, 96, True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES + [BIG], ids=lambda c: "x".join(map(str, c[:4])) + ("-rep" if c[4] else "") + ("-pad" if c[5] else ""))
def test_torch_decode_matches_reference(case, dtype):
    B, K, F, d, repeat, padding = case
    check_decode("torch", dtype, *make_codes(B, K, F, d, repeat=repeat, padding=padding))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + ("-rep" if c[4] else "") + ("-pad" if c[5] else ""))
def test_triton_decode_matches_reference(case, dtype):
    B, K, F, d, repeat, padding = case
    check_decode("triton", dtype, *make_codes(B, K, F, d, repeat=repeat, padding=padding))


@needs_triton
def test_triton_decode_larger_tiles():
    # K > BLOCK_K (16) and d > BLOCK_D (256) exercise the tile loops; F > B*K leaves untouched rows.
    check_decode("triton", torch.float32, *make_codes(6, 21, 45, 300, repeat=True, padding=True))


@needs_triton
def test_triton_writes_every_output_element():
    from sae_kit.kernels import triton_decode as td

    indices, values, weight, grad = make_codes(9, 5, 41, 19, repeat=True, padding=True)
    indices, values, weight, grad = on_device("triton", (indices, values.float(), weight.float(), grad.float()))
    nan = float("nan")
    out = td.decode_forward(indices, values, weight, out=torch.full((9, 19), nan, device=TRITON_DEVICE)).cpu()
    dv = td.decode_grad_values(indices, weight, grad, torch.float32, out=torch.full((9, 5), nan, device=TRITON_DEVICE)).cpu()
    dw = td.decode_grad_weight(indices, values, grad, weight, out=torch.full((41, 19), nan, device=TRITON_DEVICE)).cpu()
    indices, values, weight, grad = (t.cpu() for t in (indices, values, weight, grad))
    dense = densify(indices, values.double(), 41)
    assert_close(out, dense @ weight.double(), 1e-5)
    assert_close(dv, (grad.double() @ weight.double().T).gather(1, indices), 1e-5)
    assert_close(dw, dense.T @ grad.double(), 1e-5)


@pytest.mark.skipif(TRITON_DEVICE != "cpu" or not HAVE_TRITON, reason="the bounds check guards the CPU interpreter only")
def test_triton_rejects_out_of_range_indices():
    indices = torch.tensor([[0, 7]])
    with pytest.raises(IndexError):
        sparse_decode(indices, torch.ones(1, 2), torch.randn(7, 3), backend="triton")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_scatter_rows_matches_dense(dtype):
    indices, values, _, rows = make_codes(23, 5, 31, 6, repeat=True, padding=True)
    v, r = values.to(dtype), rows.to(dtype)
    out = torch_path.scatter_rows(indices, v, r, 31)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, densify(indices, v.double(), 31).T @ r.double(), 1e-5 if dtype != torch.float64 else 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_gather_dot_matches_dense(dtype):
    indices, _, weight, rows = make_codes(17, 6, 29, 9, repeat=True)
    out = torch_path.gather_dot(indices, weight.to(dtype), rows.to(dtype))
    expected = (rows.to(dtype).double() @ weight.to(dtype).double().T).gather(1, indices)
    assert_close(out, expected, 1e-5 if dtype != torch.float64 else 1e-12)


def test_column_blocks_give_the_whole_products(monkeypatch):
    """d = 100 in blocks of 32 and 64 (the last one partial) against one pass over all columns:
    embedding_sum bit for bit; scatter_rows to float rounding (MKL picks its kernel by the column
    count, and on AVX-512 Xeons a 32-column block sums in another order: 1 ulp); gather_dot up to the
    order of its sums."""
    indices, values, weight, rows = make_codes(37, 7, 53, 100, repeat=True, padding=True)
    values, weight, rows = values.float(), weight.float(), rows.float()

    def products():
        return (torch_path.scatter_rows(indices, values, rows, 53), torch_path.embedding_sum(indices, weight, values),
                torch_path.gather_dot(indices, weight, rows))

    blocked = products()
    monkeypatch.setattr(torch_path, "SCATTER_COLUMN_BLOCK", 1000)
    monkeypatch.setattr(torch_path, "GATHER_COLUMN_BLOCK", 1000)
    whole = products()
    assert torch.equal(blocked[1], whole[1])
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-6, atol=1e-6)
    assert_close(blocked[2], (rows.double() @ weight.double().T).gather(1, indices), 1e-5)
    assert_close(blocked[0], densify(indices, values.double(), 53).T @ rows.double(), 1e-5)


def test_default_dispatch_on_cpu():
    indices, values, weight, grad = make_codes(8, 3, 50, 6)
    values, weight = values.float(), weight.float()
    out = sparse_decode(indices, values.requires_grad_(), weight)
    assert out.grad_fn is not None and "SparseDecode" in type(out.grad_fn).__name__  # CPU default: torch path
    assert_close(out.detach(), sparse_decode_reference(indices, values.detach().double(), weight.double()), 1e-5)
    # dense codes go through one matrix product
    dense_idx = torch.randint(0, 10, (4, 2))
    assert_close(sparse_decode(dense_idx, torch.ones(4, 2), weight[:10]), densify(dense_idx, torch.ones(4, 2, dtype=torch.float64), 10) @ weight[:10].double(), 1e-5)
    assert sparse_decode(indices[:, :0], values[:, :0], weight).shape == (8, 6)
    with pytest.raises(ValueError):
        sparse_decode(indices, values, weight, backend="cuda")
    with pytest.raises(ValueError):
        sparse_decode(indices[0], values[0], weight)
    assert kernels.DENSE_FRACTION == 8


class MaxNumel(TorchDispatchMode):
    """Records the largest dense (strided) tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:  # sparse [F, B] is fine
                self.largest = max(self.largest, t.numel())
        return out


def test_backwards_never_build_dense_codes():
    B, K, F, d = 32, 4, 300, 8  # B*F = 9600 is larger than F*d, B*K*d and anything else needed
    indices, values, weight, grad = make_codes(B, K, F, d, repeat=True)
    values, weight = values.float().requires_grad_(), weight.float().requires_grad_()
    out = sparse_decode(indices, values, weight, backend="torch")
    with MaxNumel() as mode:
        out.backward(grad.float())
    assert mode.largest < B * F

    x = torch.randn(B, d, requires_grad=True)
    W_enc = torch.randn(d, F, requires_grad=True)
    b_enc = torch.randn(F, requires_grad=True)
    b_dec = torch.randn(d, requires_grad=True)
    vals, _ = topk_encode(x, W_enc, b_enc, b_dec, K)
    with MaxNumel() as mode:
        vals.relu().sum().backward()
    assert mode.largest < B * F


def check_topk(dtype_name, B, d, F, k, seed=0, requires=(True, True, True, True)):
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in ((B, d), (d, F), (F,), (d,))]
    # Row 0 gets x = b_dec, so its pre-activations are b_enc, which has one positive entry:
    # that row has fewer than k positives and its other selected slots are inactive after ReLU.
    tensors[0][0] = tensors[3]
    tensors[2] = -tensors[2].abs()
    tensors[2][0] = tensors[2][0].abs()
    grad = torch.randn(B, k, generator=gen, dtype=torch.float64).to(dtype)
    params = [t.clone().requires_grad_(r) for t, r in zip(tensors, requires)]
    values, indices = topk_encode(*params, k)
    # fp64 reference on the same indices (bf16 rounding could change the order of near-ties)
    ref64 = [t.double() for t in tensors]
    pre = (ref64[0] - ref64[3]) @ ref64[1] + ref64[2]
    assert_close(values.detach(), pre.gather(1, indices), TOL[dtype])
    if dtype == torch.float64 or dtype == torch.float32:
        ref_values, ref_indices = topk_encode_reference(*ref64, k)
        assert torch.equal(indices, ref_indices)
    relu_mask = (values.detach() > 0).double()
    assert relu_mask[0].sum() == 1 and relu_mask[0, 0] == 1
    values.relu().backward(grad)
    expected = topk_encode_grads_reference(ref64[0], ref64[1], ref64[3], indices, grad.double() * relu_mask)
    for name, p, r in zip(("x", "W_enc", "b_enc", "b_dec"), params, requires):
        if not r:
            assert p.grad is None
            continue
        assert p.grad.dtype == dtype
        assert_close(p.grad, expected[name], TOL[dtype])


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,d,F,k", [(1, 1, 1, 1), (7, 5, 13, 1), (13, 19, 37, 6), (64, 96, 300, 32)])
def test_topk_encode_matches_reference(dtype_name, B, d, F, k):
    check_topk(dtype_name, B, d, F, k)


def test_topk_encode_partial_grads_and_clamped_k():
    check_topk("float32", 9, 6, 20, 3, requires=(False, True, False, True))  # x data, b_enc a buffer
    values, indices = topk_encode(torch.randn(3, 4), torch.randn(4, 5), torch.zeros(5), torch.zeros(4), 99)
    assert values.shape == indices.shape == (3, 5)
    with pytest.raises(ValueError):
        topk_encode(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(4), torch.zeros(4), 2)


def test_topk_encode_gradcheck():
    gen = torch.Generator().manual_seed(1)
    args = [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in ((4, 3), (3, 11), (11,), (3,))]
    assert torch.autograd.gradcheck(lambda *a: topk_encode(*a, 3)[0], args)


def test_torch_decode_gradcheck():
    indices, values, weight, _ = make_codes(5, 3, 9, 4, repeat=True, padding=True)
    assert torch.autograd.gradcheck(
        lambda v, w: sparse_decode(indices, v, w, backend="torch"), [values.requires_grad_(), weight.requires_grad_()]
    )


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton), None])
def test_empty_batch(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    values = torch.zeros(0, 3, requires_grad=True, device=device)
    weight = torch.randn(50, 4, requires_grad=True, device=device)
    out = sparse_decode(torch.zeros(0, 3, dtype=torch.int64, device=device), values, weight, backend=backend)
    out.sum().backward()
    assert out.shape == (0, 4) and weight.grad.abs().sum() == 0
    W_enc = torch.randn(4, 9, requires_grad=True, device=device)
    zeros = partial(torch.zeros, device=device)
    vals, _ = topk_encode(zeros(0, 4), W_enc, zeros(9), zeros(4), 3, backend=backend)
    vals.sum().backward()
    assert W_enc.grad.abs().sum() == 0


# ------------------------------------------------------------ encoder: gather of pre-activations
def gather_case(B, d, F, K, seed=0, dtype=torch.float32, repeat=False):
    gen = torch.Generator().manual_seed(seed)
    x_c, W_enc, b_enc = (torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in ((B, d), (d, F), (F,)))
    indices = torch.randint(0, F, (B, K), generator=gen)
    if repeat:
        indices[:, -1] = indices[:, 0]
        indices[0] = 0
    grad = torch.randn(B, K, generator=gen, dtype=torch.float64).to(dtype)
    return x_c, W_enc, b_enc, indices, grad


def gather_with_grads(backend, x_c, W_enc, b_enc, indices, grad):
    x_c, W_enc, b_enc, indices, grad = on_device(backend, (x_c, W_enc, b_enc, indices, grad))
    params = [t.detach().clone().requires_grad_() for t in (x_c, W_enc, b_enc)]
    pre = kernels.dense_pre_activations(*params)
    out = kernels.gather_pre_activations(*params, pre, indices, backend=backend)
    out.backward(grad)
    return [out.detach().cpu()] + [p.grad.cpu() for p in params]


@pytest.mark.parametrize("backend", ["torch", None, pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,d,F,K,repeat", [(1, 1, 1, 1, False), (7, 5, 13, 1, False), (13, 19, 37, 3, True),
                                            (9, 6, 20, 5, False), (64, 33, 300, 12, True)])
def test_gather_pre_activations_matches_reference(backend, dtype, B, d, F, K, repeat):
    # K * 8 >= F (the 1x1, 13x1 and 20x5 cases) takes the dense backward; the others the sparse one.
    case = gather_case(B, d, F, K, dtype=dtype, repeat=repeat)
    expected = gather_with_grads("reference", *(t.double() if t.is_floating_point() else t for t in case))
    actual = gather_with_grads(backend, *case)
    for name, a, e in zip(("values", "x_c", "W_enc", "b_enc"), actual, expected):
        assert a.dtype == dtype, name
        assert_close(a, e, TOL[dtype])


def test_gather_pre_activations_backward_is_sparse_and_layout_preserving():
    B, d, F, K = 32, 8, 300, 4
    x_c, _, b_enc, indices, grad = gather_case(B, d, F, K, repeat=True)
    W_enc = torch.randn(F, d).T.requires_grad_()  # stored decoder-major, like the tied init
    x_c.requires_grad_()
    b_enc.requires_grad_()
    pre = kernels.dense_pre_activations(x_c, W_enc, b_enc)
    out = kernels.gather_pre_activations(x_c, W_enc, b_enc, pre, indices)
    with MaxNumel() as mode:
        out.backward(grad)
    assert mode.largest < B * F
    assert W_enc.grad.stride() == W_enc.stride()  # no transposing copy for the optimizer


def test_decode_and_gather_share_one_sort_per_backward(monkeypatch):
    """AuxK's pattern: one index matrix gathered from u and decoded, and another beside it; the
    backward sorts each distinct index matrix once, forgets the sorts when it ends, accumulates the
    encoder gradients in place, and gives the reference's gradients."""
    B, d, F, K = 40, 6, 300, 5
    x_c, W_enc, b_enc, indices, _ = gather_case(B, d, F, K, repeat=True)
    W_dec = torch.randn(F, d)
    other = torch.randint(0, F, (B, K), generator=torch.Generator().manual_seed(5))
    sorts = []
    monkeypatch.setattr(torch_path, "latent_major_slots",
                        lambda idx, n, sort=torch_path.latent_major_slots: sorts.append(idx) or sort(idx, n))

    def grads_and_encoder_adds(backend):
        params = [t.detach().clone().requires_grad_() for t in (x_c, W_enc.T.contiguous().T, b_enc, W_dec)]
        pre = kernels.dense_pre_activations(*params[:3])
        loss = 0
        for idx in (indices, other, indices):
            values = kernels.gather_pre_activations(*params[:3], pre, idx, backend=backend).relu()
            loss = loss + kernels.sparse_decode(idx, values, params[3], backend=backend).pow(2).sum()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            loss.backward()
        adds = [e.key for e in prof.events() if e.key in ("aten::add", "aten::add_") and e.input_shapes[0] == [d, F]]
        return [p.grad for p in params], adds

    expected, _ = grads_and_encoder_adds("reference")
    sorts.clear()
    actual, adds = grads_and_encoder_adds("torch")
    assert len(sorts) == 2 and not torch_path._sorted_in_backward.entries
    assert adds == ["aten::add_"] * 2  # the three encoder gradients add up in place
    for a, e in zip(actual, expected):
        assert_close(a, e.double(), 1e-5)


def test_sorts_kept_in_backward_stay_bounded_when_backward_raises():
    class SortsThenFails(torch.autograd.Function):
        @staticmethod
        def forward(x, indices):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.indices = inputs[1]

        @staticmethod
        def backward(ctx, grad):
            torch_path.shared_latent_major_slots(ctx.indices, 50)
            raise RuntimeError("a failing backward")

    for seed in range(2 * torch_path.SORTED_IN_BACKWARD_MAX):
        indices = torch.randint(0, 50, (4, 3), generator=torch.Generator().manual_seed(seed))
        with pytest.raises(RuntimeError, match="a failing backward"):
            SortsThenFails.apply(torch.ones(2, requires_grad=True), indices).sum().backward()
    assert len(torch_path._sorted_in_backward.entries) <= torch_path.SORTED_IN_BACKWARD_MAX
    torch_path._sorted_in_backward.entries.clear()


def test_dense_pre_activations_into_feature_major_buffer():
    x_c, W_enc, b_enc, _, _ = gather_case(6, 4, 9, 1)
    buffer = torch.empty(9, 6).T  # [B, F] view of a contiguous [F, B] buffer
    out = kernels.dense_pre_activations(x_c, W_enc, b_enc, out=buffer)
    assert out.data_ptr() == buffer.data_ptr() and out.stride() == (1, 6)
    assert_close(out, x_c.double() @ W_enc.double() + b_enc.double(), 1e-5)
    with pytest.raises(ValueError):
        kernels.gather_pre_activations(x_c, W_enc, b_enc, out, torch.zeros(5, 1, dtype=torch.int64))


# ------------------------------------------------------------- batch-level selection
def flat_top(score, total, positive=True):
    flat = score.flatten()
    chosen = flat.topk(min(total, flat.numel())).indices
    if positive:
        chosen = chosen[flat[chosen] > 0]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[chosen] = True
    return mask.view_as(score).nonzero(as_tuple=True)


@pytest.mark.parametrize("B,F,total", [(1, 1, 1), (7, 13, 5), (300, 97, 900), (1024, 64, 4096), (50, 40, 2000),
                                     (512, 1024, 500)])
def test_batch_top_entries_equals_flat_topk(B, F, total):
    score = torch.randn(B, F, generator=torch.Generator().manual_seed(B))
    for positive in (True, False):
        rows, cols = kernels.batch_top_entries(score, total, positive=positive)
        exp_rows, exp_cols = flat_top(score, total, positive)
        assert torch.equal(rows, exp_rows) and torch.equal(cols, exp_cols)


def test_batch_top_entries_fallbacks(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    score = torch.randn(512, 50, generator=gen)
    # a sample that overshoots: the threshold keeps too few entries, so every positive is a candidate
    monkeypatch.setattr(torch_path, "SAMPLE_MARGIN", 0.1)
    for positive in (True, False):
        rows, cols = kernels.batch_top_entries(score, 3000, positive=positive)
        exp = flat_top(score, 3000, positive)
        assert torch.equal(rows, exp[0]) and torch.equal(cols, exp[1])
    # fewer positives than the budget: all of them, nothing else
    sparse_score = torch.where(torch.rand(512, 50, generator=gen) < 0.01, score.abs() + 0.1, -score.abs())
    rows, _ = kernels.batch_top_entries(sparse_score, 5000)
    assert rows.numel() == int((sparse_score > 0).sum())
    # a feature-major (transposed) score gives the same entries
    rows_t, cols_t = kernels.batch_top_entries(score.T.contiguous().T, 700)
    exp = flat_top(score, 700)
    assert torch.equal(rows_t, exp[0]) and torch.equal(cols_t, exp[1])
    empty = kernels.batch_top_entries(score, 0)
    assert empty[0].numel() == 0


def test_entries_at_least_equals_nonzero():
    """The grouped candidate pass gives nonzero's coordinates, in its order, ties at the threshold included."""
    gen = torch.Generator().manual_seed(2)
    score = torch.randn(300, 512, generator=gen).round(decimals=1)  # many ties
    for threshold in (2.5, 3.0, 10.0):
        got = torch_path.entries_at_least(score, torch.tensor(threshold))
        expected = (score >= threshold).nonzero(as_tuple=True)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_matrix_entries_equals_advanced_indexing():
    gen = torch.Generator().manual_seed(1)
    rows, cols = torch.randint(0, 9, (40,), generator=gen), torch.randint(0, 13, (40,), generator=gen)
    for matrix in (torch.randn(9, 13, generator=gen), torch.randn(13, 9, generator=gen).T):  # row- and feature-major
        matrix.requires_grad_()
        got = kernels.matrix_entries(matrix, rows, cols)
        assert torch.equal(got, matrix[rows, cols])
        weights = torch.randn(40, generator=gen)
        (grad,) = torch.autograd.grad((got * weights).sum(), matrix)
        (expected,) = torch.autograd.grad((matrix[rows, cols] * weights).sum(), matrix)
        assert torch.equal(grad, expected)


# (16, 4096, 8) and (6, 16384, 32): the group maxima are themselves selected by group maxima.
@pytest.mark.parametrize("B,F,k", [(64, 2048, 32), (33, 1024, 4), (8, 4096, 1), (5, 640, 8), (16, 4096, 8),
                                   (6, 16384, 32)])
def test_row_top_k_equals_topk(B, F, k):
    gen = torch.Generator().manual_seed(F + k)
    # Planted structure: a few rows whose top entries all sit in one strided group, and large k's
    # worth of entries in the same group, so a wrong group choice would show.
    score = torch.randn(B, F, generator=gen)
    width = F // torch_path.ROW_TOP_K_GROUP
    score[0, 7::width] += 10.0  # every entry of group 7 is among row 0's largest
    score[1, :k] += 20.0
    values, indices = kernels.row_top_k(score, k)
    expected_values, expected_indices = score.topk(k, dim=1)
    assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)
    assert torch.equal(score.gather(1, indices), values)


def test_row_top_k_selects_many_group_maxima_by_their_own_groups(monkeypatch):
    # TopK's shape (16384 latents, k 32): the 1024 group maxima per row go through row_top_k again.
    calls = []
    inner = torch_path.row_top_k

    def counting(score, k, *args, **kwargs):
        calls.append(score.shape[1])
        return inner(score, k, *args, **kwargs)

    monkeypatch.setattr(torch_path, "row_top_k", counting)
    score = torch.randn(6, 16384, generator=torch.Generator().manual_seed(3))
    values, indices = torch_path.row_top_k(score, 32)
    assert calls[:2] == [16384, 1024]
    assert torch.equal(values, score.topk(32, dim=1).values) and torch.equal(score.gather(1, indices), values)


def test_gather_pre_activations_known_values_give_the_same_values_and_gradients():
    """AuxK hands the gather the values its selection already read from u: the same output and
    gradients as gathering them, and wrong ones are refused."""
    B, d, F, K = 24, 6, 200, 5
    x_c, W_enc, b_enc, indices, grad = gather_case(B, d, F, K, repeat=False)
    results = []
    for known in (False, True):
        params = [t.detach().clone().requires_grad_() for t in (x_c, W_enc, b_enc)]
        pre = kernels.dense_pre_activations(*params)
        values = pre.gather(1, indices) if known else None
        out = kernels.gather_pre_activations(*params, pre, indices, known=values)
        out.backward(grad)
        results.append([out.detach()] + [p.grad for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    pre = kernels.dense_pre_activations(x_c, W_enc, b_enc)
    with pytest.raises(ValueError, match="known values"):
        kernels.gather_pre_activations(x_c, W_enc, b_enc, pre, indices, known=pre[:, :K + 1].clone())


def test_row_top_k_ties_and_fallbacks():
    gen = torch.Generator().manual_seed(0)
    # Ties: values quantised to a few levels. The values must equal topk's; the indices must be
    # distinct and point at those values (which of equal entries is taken may differ).
    score = torch.randint(0, 5, (16, 2048), generator=gen).float()
    values, indices = kernels.row_top_k(score, 32)
    assert torch.equal(values, score.topk(32, dim=1).values)
    assert torch.equal(score.gather(1, indices), values)
    assert all(row.unique().numel() == 32 for row in indices)
    # Shapes where groups do not pay or fit: plain topk (F not a multiple of the group, small F,
    # a feature-major view).
    for odd in (torch.randn(4, 2047, generator=gen), torch.randn(4, 64, generator=gen),
                torch.randn(2048, 4, generator=gen).T):
        assert all(torch.equal(a, b) for a, b in zip(kernels.row_top_k(odd, 3), odd.topk(3, dim=1)))


def test_kernels_run_under_torch_func_grad():
    # Plugins take per-source gradients with torch.func.grad (FLAD); inside it the kernels fall back
    # to the dense reference, so gradients must equal plain autograd through the sparse path.
    from torch.func import functional_call, grad

    from sae_kit.sae import SAEConfig, create_sae

    sae = create_sae(SAEConfig(d_in=8, d_sae=96, architecture="topk", k=3)).eval()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    params = {n: p.detach() for n, p in sae.named_parameters()}
    grads = grad(lambda p: (functional_call(sae, p, (x,)) - x).pow(2).sum())(params)
    sae.zero_grad()
    (sae(x) - x).pow(2).sum().backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)
    # the encoder's gather, directly
    x_c, W_enc, b_enc, indices, upstream = gather_case(9, 6, 40, 3, repeat=True)
    pre = kernels.dense_pre_activations(x_c, W_enc, b_enc)
    g_func = grad(lambda w: (kernels.gather_pre_activations(x_c, w, b_enc, pre, indices) * upstream).sum())(W_enc)
    expected = gather_with_grads("reference", x_c, W_enc, b_enc, indices, upstream)[2]
    assert_close(g_func, expected.double(), 1e-5)

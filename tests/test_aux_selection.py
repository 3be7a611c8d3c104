"""The blocked, grouped candidate selection of auxiliary_reconstruction_loss (AuxK, aux_zipf) gives
the same loss and gradients as the dense gather + topk it replaced (kept here as the reference)."""
import pytest
import torch

from sae_kit import data_parallel
from sae_kit.kernels import sparse_decode
from sae_kit.sae import base
from sae_kit.sae.base import auxiliary_reconstruction_loss, mean_squared_error


def reference_loss(pre, gather_pre, residual, W_dec, weights, k_aux, signed=False, priority=None):
    """auxiliary_reconstruction_loss as of 35b4661: every candidate's column gathered densely."""
    candidates = (weights > 0).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return residual.new_zeros(())
    if candidates.numel() <= k_aux:
        indices = candidates.expand(pre.shape[0], -1)
    else:
        column_pre = pre.detach()[:, candidates]
        magnitude = column_pre.abs() if signed else column_pre
        score = magnitude * weights[candidates]
        if priority is not None and bool(priority[candidates].any()):
            shift = (score.max() - magnitude.min()).clamp_min(0) + 1
            score = torch.where(priority[candidates], magnitude + shift, score)
        indices = candidates[score.topk(k_aux, dim=1).indices]
    values = gather_pre(indices.contiguous())
    if not signed:
        values = values.relu()
    target = residual.detach()
    estimate = sparse_decode(indices, values, W_dec)
    loss = mean_squared_error(estimate, target) / data_parallel.batch_variance(target)
    return torch.nan_to_num(loss, nan=0.0, posinf=0.0)


def loss_and_grads(fn, seed, d_sae, k_aux, weights, priority, signed):
    gen = torch.Generator().manual_seed(seed)
    B, d = 300, 24  # 300 rows: more than one block of TOP_COLUMNS_ROWS, the last one partial
    x = torch.randn(B, d, generator=gen, dtype=torch.float32)
    W_enc = torch.randn(d, d_sae, generator=gen).requires_grad_()
    b_enc = (0.1 * torch.randn(d_sae, generator=gen)).requires_grad_()
    W_dec = (torch.randn(d_sae, d, generator=gen) / d**0.5).requires_grad_()
    residual = torch.randn(B, d, generator=gen)
    pre = x @ W_enc + b_enc
    loss = fn(pre, lambda idx, known=None: pre.gather(1, idx), residual, W_dec, weights, k_aux, signed, priority)
    loss.backward()
    return loss.detach(), W_enc.grad, b_enc.grad, W_dec.grad


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("case", ["zipf", "zipf_few_dead", "zipf_many_dead", "auxk", "few_candidates"])
def test_selection_matches_dense_reference(monkeypatch, case, signed):
    monkeypatch.setattr(base, "TOP_COLUMNS_ROWS", 128)
    d_sae, k_aux = 700, 12
    gen = torch.Generator().manual_seed(7)
    # aux_zipf-like weights: most latents under-used (weight in (0, 0.1]), some not candidates.
    weights = 0.1 * torch.rand(d_sae, generator=gen)
    weights[torch.rand(d_sae, generator=gen) < 0.3] = 0
    dead = torch.zeros(d_sae, dtype=torch.bool)
    priority = None
    if case == "zipf_few_dead":  # fewer dead than k_aux: all take slots, the rest by weight·u
        dead[torch.randperm(d_sae, generator=gen)[:5]] = True
    elif case == "zipf_many_dead":  # more dead than k_aux: only dead latents take slots
        dead[torch.randperm(d_sae, generator=gen)[:90]] = True
    elif case == "auxk":
        dead[torch.randperm(d_sae, generator=gen)[:150]] = True
        weights = dead.float()
    elif case == "few_candidates":
        weights = torch.zeros(d_sae)
        weights[:9] = 0.5
    if case.startswith("zipf_"):
        weights[dead] = 1.0
        priority = dead
    got = loss_and_grads(auxiliary_reconstruction_loss, 3, d_sae, k_aux, weights, priority, signed)
    expected = loss_and_grads(reference_loss, 3, d_sae, k_aux, weights, priority, signed)
    assert got[0] > 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_top_weighted_columns_equals_topk():
    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(50, 3000, generator=gen)
    columns = torch.randperm(3000, generator=gen)[:2001].sort().values  # not a multiple of the group
    w = torch.rand(2001, generator=gen)
    got = base.top_weighted_columns(pre, columns, w, 40)
    expected = columns[(pre[:, columns] * w).topk(40, dim=1).indices]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("n_columns", [300, 2001])  # unsorted topk (< 2·k·8 columns) and row_top_k
def test_top_weighted_columns_unsorted_takes_the_same_set(n_columns):
    gen = torch.Generator().manual_seed(2)
    pre = torch.randn(50, 3000, generator=gen)
    columns = torch.randperm(3000, generator=gen)[:n_columns].sort().values
    w = torch.rand(n_columns, generator=gen)
    got = base.top_weighted_columns(pre, columns, w, 40, sort=False)
    expected = base.top_weighted_columns(pre, columns, w, 40)
    assert torch.equal(got.sort(1).values, expected.sort(1).values)


@pytest.mark.parametrize("target_grad", [False, True])
def test_mean_squared_error_equals_mse_loss(target_grad):
    """The squared error kept as one difference and a dot: mse_loss's value and gradients, also
    through a retained graph taken twice (plugins take extra gradients with retain_graph)."""
    gen = torch.Generator().manual_seed(5)
    estimate = torch.randn(37, 11, generator=gen).requires_grad_()
    target = torch.randn(37, 11, generator=gen).requires_grad_(target_grad)
    inputs = [estimate, target] if target_grad else [estimate]
    expected = torch.nn.functional.mse_loss(estimate, target, reduction="sum") / 37
    expected_grads = torch.autograd.grad(expected, inputs)
    got = mean_squared_error(estimate, target)
    torch.testing.assert_close(got, expected)
    for _ in range(2):
        for a, b in zip(torch.autograd.grad(got, inputs, retain_graph=True), expected_grads):
            torch.testing.assert_close(a, b)
    half = mean_squared_error(estimate.bfloat16(), target.bfloat16())  # mse_loss's path
    assert half.dtype == torch.bfloat16


def test_batch_variance_equals_the_two_pass_spread():
    t = torch.randn(300, 24, generator=torch.Generator().manual_seed(6)) * 3 + 5
    torch.testing.assert_close(data_parallel.batch_variance(t), (t - t.mean(0)).pow(2).sum(1).mean())

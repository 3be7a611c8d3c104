"""Mechanism tests of the Tier A plugins: each asserts the behaviour the plugin's paper adaptation claims."""
from __future__ import annotations

import math

import pytest
import torch

from sae_kit.codes import SparseCodes
from sae_kit.config import SAEConfig
from sae_kit.eval.synthetic import make_dataset
from sae_kit.plugins.ols_refit import refit_codes, residual_span
from sae_kit.plugins.usage_entropy import usage_entropies
from sae_kit.sae import create_sae


# ------------------------------------------------------------------------------ usage_entropy
def test_usage_entropy_values_and_bounds():
    uniform = torch.zeros(16, 10)
    h_sample, h_batch = usage_entropies(uniform + torch.randn(16, 10) * 1e-9, temperature=1e6)
    assert math.isclose(h_batch.item(), math.log(10), rel_tol=1e-4)
    assert math.isclose(h_sample.item(), math.log(10), rel_tol=1e-4)
    # One latent wins every token: usage collapses (batch entropy ~ 0).
    collapsed = torch.randn(16, 10) * 0.01
    collapsed[:, 3] += 5
    _, h_collapsed = usage_entropies(collapsed, temperature=0.01)
    assert h_collapsed.item() < 0.05


def test_usage_entropy_gradient_spreads_usage():
    torch.manual_seed(0)
    pre = torch.randn(64, 20)
    pre[:, :2] += 2.0  # two latents dominate
    pre.requires_grad_(True)
    before = usage_entropies(pre, 0.5)[1].item()
    optimizer = torch.optim.SGD([pre], lr=5.0)
    for _ in range(20):
        optimizer.zero_grad()
        (-usage_entropies(pre, 0.5)[1]).backward()  # the plugin's default loss: - H(mean p)
        optimizer.step()
    after = usage_entropies(pre, 0.5)[1].item()
    assert after > before + 0.3
    assert after <= math.log(20) + 1e-5


# -------------------------------------------------------------------------------------- ols_refit
def trained_like_sae(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(d_in=32, d_sae=96, architecture=arch, k=6))
    with torch.no_grad():  # a realistic, imperfect encoder: encoder = noisy decoder
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_dec.normal_(0, 0.1)
    return sae.eval()


@pytest.mark.parametrize("arch", ["topk", "abstopk", "batchtopk"])
def test_refit_never_raises_the_per_token_error_on_the_same_support(arch):
    sae = trained_like_sae(arch)
    signed = arch == "abstopk"
    x = make_dataset("signed" if signed else "sharkey", seed=1, d=32, n_features=64).sample(
        512, torch.Generator().manual_seed(2))[0]
    x_n, _ = sae.normalize(x)
    codes = sae.encode(x)
    refit = refit_codes(sae, x_n, codes, steps=200)
    error_enc = (x_n - sae.decode_normalized(codes)).pow(2).sum(1)
    error_refit = (x_n - sae.decode_normalized(refit)).pow(2).sum(1)
    assert torch.all(error_refit <= error_enc * (1 + 1e-5) + 1e-7)
    assert error_refit.sum() < 0.9 * error_enc.sum()  # it really improves an imperfect encoder
    assert torch.equal(refit.indices, codes.indices)
    assert torch.all(refit.active <= codes.active)  # support kept (a slot may only drop out)
    if signed:
        # Unconstrained least squares: the residual is orthogonal to the support's span.
        assert residual_span(sae, x_n, refit).max() < 1e-3
        assert residual_span(sae, x_n, codes).mean() > 0.1
    else:
        assert torch.all(refit.values >= 0)


def test_refit_recovers_exact_coefficients_on_the_true_support():
    sae = trained_like_sae("abstopk")
    generator = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(96, generator=generator)[:6] for _ in range(32)])
    values = torch.randn(32, 6, generator=generator)
    codes = SparseCodes(indices, values, 96)
    x_n = sae.decode_normalized(codes).detach()
    noisy = SparseCodes(indices, values + 0.3 * torch.randn(32, 6, generator=generator), 96)
    refit = refit_codes(sae, x_n, noisy)
    assert torch.allclose(refit.values, values, atol=1e-3)

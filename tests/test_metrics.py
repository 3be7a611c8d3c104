from __future__ import annotations

import math

import pytest
import torch

from sae_kit.codes import SparseCodes
from sae_kit.eval.metrics import (
    ReconstructionMetrics,
    dictionary_coherence,
    feature_recovery_rate,
    latents_per_feature,
    mmcs,
)


def _random_unit(n: int, d: int, seed: int) -> torch.Tensor:
    rows = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return rows / rows.norm(dim=1, keepdim=True)


def _codes(indices: list[list[int]], values: list[list[float]], d_sae: int) -> SparseCodes:
    return SparseCodes(torch.tensor(indices, dtype=torch.int64), torch.tensor(values, dtype=torch.float32), d_sae)


# ---------------------------------------------------------------- recovery metrics


def test_mmcs_is_one_for_permuted_rescaled_copy_and_lower_for_random() -> None:
    truth = _random_unit(20, 16, seed=0)
    permutation = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    scales = torch.linspace(0.1, 7.0, 20)[:, None]
    learned = torch.cat([truth[permutation] * scales, _random_unit(5, 16, seed=2)])  # extra latents are harmless
    assert mmcs(truth, learned) == pytest.approx(1.0, abs=1e-5)

    random_dictionary = _random_unit(20, 16, seed=3)
    assert mmcs(truth, random_dictionary) < 0.9


def test_feature_recovery_rate_thresholds() -> None:
    # Learned directions at known angles to e_0, e_1, e_2, e_3 in R^4: cos 1.0, 0.95, 0.85, 0.5.
    truth = torch.eye(4)
    cosines = torch.tensor([1.0, 0.95, 0.85, 0.5])
    learned = torch.zeros(4, 4)
    for i, c in enumerate(cosines.tolist()):
        learned[i, i] = c
        learned[i, (i + 1) % 4] = math.sqrt(1 - c * c)
    # Row i also leans on e_{i+1}; those cross-cosines (0.87 to e_0, 0.53 to e_3, 0.31 to e_2) do not move any
    # feature across the thresholds below: best cosines are 1.0, 0.95, 0.85, 0.53.
    assert feature_recovery_rate(truth, learned, tau=0.9) == pytest.approx(2 / 4)
    assert feature_recovery_rate(truth, learned, tau=0.8) == pytest.approx(3 / 4)
    assert feature_recovery_rate(truth, learned, tau=0.99) == pytest.approx(1 / 4)
    assert feature_recovery_rate(truth, truth, tau=1.0) == 0.0  # strict inequality


def test_absolute_flag_with_negated_dictionary() -> None:
    truth = torch.eye(6)
    negated = -truth
    # Without |cos| each feature's best match is an orthogonal direction (cos 0), never -v (cos -1).
    assert mmcs(truth, negated) == 0.0
    assert mmcs(truth, negated, absolute=True) == pytest.approx(1.0, abs=1e-5)
    assert feature_recovery_rate(truth, negated, tau=0.9) == 0.0
    assert feature_recovery_rate(truth, negated, tau=0.9, absolute=True) == 1.0


def test_latents_per_feature_counts_signed_pairs() -> None:
    truth = torch.eye(3, 5)
    # Feature 0 covered by +v and -v (TopK-style), feature 1 by +v only, feature 2 by nothing close.
    learned = torch.stack([truth[0], -truth[0], 2.0 * truth[1], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0])])
    assert latents_per_feature(truth, learned, tau=0.9).tolist() == [1, 1, 0]
    assert latents_per_feature(truth, learned, tau=0.9, absolute=True).tolist() == [2, 1, 0]
    assert latents_per_feature(truth, learned, tau=0.9).dtype == torch.int64


def test_recovery_metrics_reject_mismatched_dimensions() -> None:
    with pytest.raises(ValueError, match="share d"):
        mmcs(torch.eye(3, 4), torch.eye(3, 5))
    with pytest.raises(ValueError, match="count, d"):
        mmcs(torch.ones(4), torch.eye(4))


def test_dictionary_coherence_hand_example() -> None:
    # Pairwise |cos|: (0,1)=0, (0,2)=0.6, (1,2)=0.8.
    dictionary = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.6, -0.8]])
    result = dictionary_coherence(dictionary)
    assert result["eps_max"] == pytest.approx(0.8, abs=1e-6)
    assert result["eps_mean"] == pytest.approx((0.0 + 0.6 + 0.8) * 2 / 6, abs=1e-6)
    orthonormal = dictionary_coherence(torch.eye(6))
    assert orthonormal == {"eps_max": 0.0, "eps_mean": 0.0}


def test_blockwise_computation_matches_single_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import sae_kit.eval.metrics as metrics_module

    truth, learned = _random_unit(30, 12, seed=5), _random_unit(40, 12, seed=6)
    learned[7] = -truth[3]
    single = (mmcs(truth, learned, absolute=True), latents_per_feature(truth, learned, 0.3), dictionary_coherence(learned))
    monkeypatch.setattr(metrics_module, "_BLOCK_ELEMENTS", 100)  # forces blocks of 2 rows
    blocked = (mmcs(truth, learned, absolute=True), latents_per_feature(truth, learned, 0.3), dictionary_coherence(learned))
    assert blocked[0] == pytest.approx(single[0], abs=1e-6)
    assert torch.equal(blocked[1], single[1])
    assert blocked[2]["eps_max"] == pytest.approx(single[2]["eps_max"], abs=1e-6)
    assert blocked[2]["eps_mean"] == pytest.approx(single[2]["eps_mean"], abs=1e-6)
    assert single[2]["eps_max"] == pytest.approx(float((learned @ learned.T).fill_diagonal_(0).abs().max()), abs=1e-6)


# ---------------------------------------------------------------- reconstruction metrics


def _one_hot_codes(batch: int, d_sae: int) -> SparseCodes:
    return SparseCodes(torch.zeros(batch, 1, dtype=torch.int64), torch.ones(batch, 1), d_sae)


def test_fvu_zero_for_perfect_and_one_for_mean_reconstruction() -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) + 3.0
    codes = _one_hot_codes(64, 4)

    perfect = ReconstructionMetrics(d_sae=4)
    perfect.update(x, x.clone(), codes)
    result = perfect.compute()
    assert result["fvu"] == 0.0 and result["mse"] == 0.0 and result["nmse_mean_token"] == 0.0

    mean_only = ReconstructionMetrics(d_sae=4)
    mean_only.update(x, x.mean(dim=0, keepdim=True).expand_as(x), codes)
    result = mean_only.compute()
    assert result["fvu"] == pytest.approx(1.0, abs=1e-6)
    expected_nmse = ((x - x.mean(0)).square().sum(1) / x.square().sum(1)).mean()
    assert result["nmse_mean_token"] == pytest.approx(float(expected_nmse), rel=1e-5)
    assert result["mse"] == pytest.approx(float((x - x.mean(0)).square().mean()), rel=1e-5)
    assert result["n_tokens"] == 64


def test_streaming_two_batches_equals_one_big_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=generator) * 2 + 5
    x_hat = x + 0.3 * torch.randn(50, 6, generator=generator)
    indices = torch.randint(0, 10, (50, 3), generator=generator)
    values = torch.rand(50, 3, generator=generator) * (torch.rand(50, 3, generator=generator) > 0.3)
    norms, bias = torch.rand(10, generator=generator) + 0.5, torch.randn(6, generator=generator)

    whole = ReconstructionMetrics(d_sae=10)
    whole.update(x, x_hat, SparseCodes(indices, values, 10), norms, bias)
    split = ReconstructionMetrics(d_sae=10)
    split.update(x[:20], x_hat[:20], SparseCodes(indices[:20], values[:20], 10), norms, bias)
    split.update(x[20:], x_hat[20:], SparseCodes(indices[20:], values[20:], 10), norms, bias)

    a, b = whole.compute(), split.compute()
    for key in ("fvu", "nmse_mean_token", "mse", "l0_mean", "dead_fraction", "dense_fraction", "eps_lbo_mean", "eps_lbo_median"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key
    assert a["l0_histogram"] == b["l0_histogram"]
    assert torch.equal(a["feature_density"], b["feature_density"])
    # Streaming FVU uses the mean of all 50 tokens, not per-batch means.
    expected_fvu = (x - x_hat).double().square().sum() / (x.double() - x.double().mean(0)).square().sum()
    assert b["fvu"] == pytest.approx(float(expected_fvu), rel=1e-9)


def test_l0_dead_dense_and_density_on_hand_codes() -> None:
    # 4 tokens over 5 latents; padding slots hold value 0.
    codes = _codes(
        indices=[[0, 1, 0], [0, 2, 0], [0, 0, 0], [0, 1, 2]],
        values=[[1.0, 2.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0], [3.0, 1.0, 1.0]],
        d_sae=5,
    )
    x = torch.ones(4, 2)
    metrics = ReconstructionMetrics(d_sae=5, dense_threshold=0.5)
    metrics.update(x, x, codes)
    result = metrics.compute()

    assert result["l0_mean"] == pytest.approx((2 + 2 + 0 + 3) / 4)
    assert result["l0_histogram"] == [1, 0, 2, 1]
    assert result["l0_bin_edges"] == [0, 1, 2, 3, 4]
    # Firing: latent 0 on 3 tokens, 1 on 2, 2 on 2, latents 3 and 4 never.
    torch.testing.assert_close(result["feature_density"], torch.tensor([0.75, 0.5, 0.5, 0.0, 0.0], dtype=torch.float64))
    assert result["dead_fraction"] == pytest.approx(2 / 5)
    assert result["dense_fraction"] == pytest.approx(1 / 5)  # only latent 0 is above 0.5 (strictly)
    histogram = result["density_histogram"]
    assert sum(histogram["counts"]) == 3 and histogram["n_dead_excluded"] == 2
    assert len(histogram["bin_edges"]) == len(histogram["counts"]) + 1
    assert "eps_lbo_mean" not in result


def test_l0_histogram_rebins_when_l0_exceeds_max_bins() -> None:
    d_sae = 12
    indices = torch.arange(d_sae).repeat(3, 1)
    values = torch.zeros(3, d_sae)
    values[0, :1] = 1.0  # L0 1
    values[1, :5] = 1.0  # L0 5
    values[2, :] = 1.0  # L0 12
    metrics = ReconstructionMetrics(d_sae=d_sae, l0_max_bins=4)
    metrics.update(torch.ones(3, 2), torch.ones(3, 2), SparseCodes(indices, values, d_sae))
    result = metrics.compute()
    # Values 0..12 (13 of them) in at most 4 bins: width 4, edges 0,4,8,12,16.
    assert result["l0_bin_edges"] == [0, 4, 8, 12, 16]
    assert result["l0_histogram"] == [1, 1, 0, 1]


def test_eps_lbo_hand_example() -> None:
    d_sae = 5  # h - 1 = 4
    norms = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0])
    bias = torch.tensor([0.0, 1.0])  # ||b_dec||^2 = 1
    # Token 0: f = 1 on latent 0 -> ||f_tilde||^2 = (1*2)^2 + 1 = 5; ||x||^2 = 9 -> |9-5| / (4*5) = 0.2
    # Token 1: f = 3 on latent 1 -> ||f_tilde||^2 = 9 + 1 = 10; ||x||^2 = 16 -> 6 / 40 = 0.15
    # Token 2: nothing active -> ||f_tilde||^2 = 1; ||x||^2 = 1 -> 0
    codes = _codes(indices=[[0], [1], [0]], values=[[1.0], [3.0], [0.0]], d_sae=d_sae)
    x = torch.tensor([[3.0, 0.0], [0.0, 4.0], [1.0, 0.0]])
    metrics = ReconstructionMetrics(d_sae=d_sae)
    metrics.update(x, x, codes, decoder_norms=norms, b_dec=bias)
    result = metrics.compute()
    assert result["eps_lbo_mean"] == pytest.approx((0.2 + 0.15 + 0.0) / 3)
    assert result["eps_lbo_median"] == pytest.approx(0.15)
    assert result["eps_lbo_n_tokens"] == 3
    assert sorted(result["eps_lbo_sample"].tolist()) == pytest.approx([0.0, 0.15, 0.2])
    assert result["afa_norms_sample"].shape == (3, 2)


def test_eps_lbo_sample_stays_bounded() -> None:
    metrics = ReconstructionMetrics(d_sae=8, eps_lbo_sample_size=16)
    generator = torch.Generator().manual_seed(5)
    total = 0.0
    for _ in range(5):
        x = torch.randn(40, 3, generator=generator)
        codes = SparseCodes(torch.randint(0, 8, (40, 2), generator=generator), torch.rand(40, 2, generator=generator) + 0.1, 8)
        metrics.update(x, x, codes, decoder_norms=torch.ones(8), b_dec=torch.zeros(3))
        f_sq = codes.values.double().square().sum(1)
        total += float(((x.double().square().sum(1) - f_sq).abs() / (7 * f_sq)).sum())
    result = metrics.compute()
    assert result["eps_lbo_sample"].shape == (16,)
    assert result["eps_lbo_n_tokens"] == 200
    assert result["eps_lbo_mean"] == pytest.approx(total / 200, rel=1e-9)


def test_update_rejects_bad_shapes_and_inconsistent_afa_inputs() -> None:
    metrics = ReconstructionMetrics(d_sae=4)
    with pytest.raises(ValueError, match="x and x_hat"):
        metrics.update(torch.ones(2, 3), torch.ones(2, 4), _one_hot_codes(2, 4))
    with pytest.raises(ValueError, match="codes cover"):
        metrics.update(torch.ones(2, 3), torch.ones(2, 3), _one_hot_codes(3, 4))
    with pytest.raises(ValueError, match="d_sae"):
        metrics.update(torch.ones(2, 3), torch.ones(2, 3), _one_hot_codes(2, 5))
    with pytest.raises(ValueError, match="both"):
        metrics.update(torch.ones(2, 3), torch.ones(2, 3), _one_hot_codes(2, 4), decoder_norms=torch.ones(4))
    metrics.update(torch.ones(2, 3), torch.ones(2, 3), _one_hot_codes(2, 4))
    with pytest.raises(ValueError, match="every update"):
        metrics.update(torch.ones(2, 3), torch.ones(2, 3), _one_hot_codes(2, 4), torch.ones(4), torch.zeros(3))
    with pytest.raises(ValueError, match="before any tokens"):
        ReconstructionMetrics(d_sae=4).compute()

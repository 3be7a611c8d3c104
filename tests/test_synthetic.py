from __future__ import annotations

import pytest
import torch

from sae_kit.eval.synthetic import DATASET_NAMES, decaying_probabilities, make_dataset


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "name, d, n_features", [("sharkey", 256, 512), ("gba_imbalanced", 42, 128), ("signed", 64, 128)]
)
def test_default_shapes_unit_norm_and_x_is_codes_times_features(name: str, d: int, n_features: int) -> None:
    dataset = make_dataset(name)
    assert dataset.name == name
    assert dataset.features.shape == (n_features, d)
    assert dataset.features.dtype == torch.float32
    torch.testing.assert_close(dataset.features.norm(dim=1), torch.ones(n_features), atol=1e-5, rtol=0)

    x, codes = dataset.sample(300, _generator(0))
    assert x.shape == (300, d) and x.dtype == torch.float32
    assert codes.shape == (300, n_features) and codes.dtype == torch.float32
    torch.testing.assert_close(x, codes @ dataset.features)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_deterministic_per_seed(name: str) -> None:
    first, again, other = make_dataset(name, seed=3), make_dataset(name, seed=3), make_dataset(name, seed=4)
    assert torch.equal(first.features, again.features)
    assert not torch.equal(first.features, other.features)

    x1, c1 = first.sample(64, _generator(7))
    x2, c2 = again.sample(64, _generator(7))
    assert torch.equal(x1, x2) and torch.equal(c1, c2)
    x3, _ = first.sample(64, _generator(8))
    assert not torch.equal(x1, x3)


def test_sizes_are_overridable() -> None:
    dataset = make_dataset("sharkey", d=32, n_features=48, mean_active=3.0)
    assert dataset.features.shape == (48, 32)
    assert dataset.expected_active() == pytest.approx(3.0)
    x, codes = dataset.sample(10, _generator(0))
    assert x.shape == (10, 32) and codes.shape == (10, 48)


def test_sharkey_probabilities_decay_and_average_five_active() -> None:
    dataset = make_dataset("sharkey")
    probabilities = dataset.sparsity.probabilities
    assert float(probabilities.sum()) == pytest.approx(5.0, abs=1e-9)
    torch.testing.assert_close(probabilities[1:] / probabilities[:-1], torch.full((511,), 0.99, dtype=torch.float64))

    _, codes = dataset.sample(20_000, _generator(1))
    active_per_sample = (codes != 0).sum(dim=1).to(torch.float64)
    # Per-sample count has std ~2.2, so the mean over 20k samples has std ~0.016.
    assert float(active_per_sample.mean()) == pytest.approx(5.0, abs=0.1)
    assert float(codes.min()) >= 0.0 and float(codes.max()) <= 1.0
    # Early features fire more often than late ones (p_0 / p_511 ~= 170).
    assert int((codes[:, :50] != 0).sum()) > 3 * int((codes[:, -50:] != 0).sum())


def test_gba_imbalanced_is_exactly_half_three_half_twenty() -> None:
    dataset = make_dataset("gba_imbalanced")
    _, codes = dataset.sample(1000, _generator(2))
    active_per_sample = (codes != 0).sum(dim=1)
    assert int((active_per_sample == 3).sum()) == 500
    assert int((active_per_sample == 20).sum()) == 500
    assert dataset.expected_active() == pytest.approx(11.5)
    active_values = codes[codes != 0]
    assert float(active_values.min()) >= 0.5 and float(active_values.max()) <= 1.5
    # The two sparsity levels are interleaved, not in blocks.
    assert set((active_per_sample[:100]).tolist()) == {3, 20}
    # Uniform subsets: every feature fires at ~11.5/128 ~= 0.09 (binomial std ~0.009 over 1000 samples).
    frequency = (codes != 0).to(torch.float64).mean(dim=0)
    assert float(frequency.min()) > 0.04 and float(frequency.max()) < 0.15


def test_signed_has_both_signs_and_bounded_magnitudes() -> None:
    dataset = make_dataset("signed")
    assert dataset.signed
    _, codes = dataset.sample(2000, _generator(3))
    active_values = codes[codes != 0]
    negative_share = float((active_values < 0).to(torch.float64).mean())
    assert 0.45 < negative_share < 0.55
    assert float(active_values.abs().min()) >= 0.5 and float(active_values.abs().max()) <= 1.5
    assert float((codes != 0).sum(dim=1).to(torch.float64).mean()) == pytest.approx(4.0, abs=0.15)


def test_unsigned_datasets_have_no_negative_codes() -> None:
    for name in ("sharkey", "gba_imbalanced"):
        _, codes = make_dataset(name).sample(500, _generator(4))
        assert float(codes.min()) >= 0.0


def test_bad_requests_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown planted dataset"):
        make_dataset("nope")
    with pytest.raises(TypeError):
        make_dataset("sharkey", width=3)
    with pytest.raises(ValueError, match="probability"):
        decaying_probabilities(n_features=4, decay=0.99, mean_active=5.0)
    with pytest.raises(ValueError, match="outside"):
        make_dataset("gba_imbalanced", n_features=10, active_counts=(3, 20))


def test_synthetic_source_streams_differ_by_split_and_seed() -> None:
    from sae_kit.eval.synthetic import SyntheticSource

    source = SyntheticSource(make_dataset("signed", seed=0))
    first = lambda **kw: next(source.iter_batches(64, **kw))  # noqa: E731
    assert torch.equal(first(seed=0), first(seed=0))
    assert not torch.equal(first(seed=0), first(seed=1))
    assert not torch.equal(first(split="train"), first(split="heldout"))
    assert torch.equal(next(source.iter_batches(64, start_batch=3)), list(zip(range(4), source.iter_batches(64)))[3][1])


def test_zipf_dataset_fires_by_a_power_law_with_the_requested_mean() -> None:
    dataset = make_dataset("zipf", seed=0, d=32, n_features=200, mean_active=1.5, exponent=1.0)
    probabilities = dataset.sparsity.probabilities
    assert float(probabilities.sum()) == pytest.approx(1.5)
    assert float(probabilities[0] / probabilities[9]) == pytest.approx(10.0)  # p_i ∝ 1/(i+1)
    _, codes = dataset.sample(20_000, torch.Generator().manual_seed(1))
    assert float((codes != 0).sum(1).double().mean()) == pytest.approx(1.5, rel=0.05)
    with pytest.raises(ValueError, match="exponent"):
        make_dataset("zipf", exponent=0.0)

"""Planted-feature datasets: data built from a known dictionary, so an SAE's recovery can be scored.

Every dataset is ``x = codes @ features`` with ``features`` ``[n_features, d]`` unit-norm ground-truth
directions and ``codes`` ``[n, n_features]`` sparse coefficients (methods.md sections 6.1 and 7). The
ground-truth dictionary is fixed by ``make_dataset(..., seed)``; each ``sample`` call draws fresh codes
from the ``torch.Generator`` it is given, so both the dictionary and the samples are reproducible.

Datasets (``make_dataset(name)``):

- ``"sharkey"``: the Sharkey/Braun/Millidge toy (d=256, 512 features, decaying firing probability).
- ``"gba_imbalanced"``: GBA's frequency-awareness set (d=42, 128 features, half the samples with 3
  active features and half with 20).
- ``"signed"``: a Sharkey-like set with random-sign coefficients, to show what AbsTopK adds.

Choices not fixed by a source are documented on each builder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from sae_kit.sae_folders import SYNTHETIC_KEY
from sae_kit.seeding import derived_generator

__all__ = [
    "BernoulliSparsity",
    "DATASET_NAMES",
    "FixedCountSparsity",
    "PlantedDataset",
    "decaying_probabilities",
    "gba_imbalanced_dataset",
    "make_dataset",
    "random_unit_features",
    "sharkey_dataset",
    "signed_dataset",
    "zipf_dataset",
]


class Sparsity(Protocol):
    """Decides which features are active on each sample."""

    n_features: int

    def sample_active(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Boolean ``[n, n_features]`` mask of active features."""
        ...

    def expected_active(self) -> float:
        """Expected number of active features per sample."""
        ...


@dataclass(frozen=True, eq=False)
class BernoulliSparsity:
    """Feature ``i`` is active independently with probability ``probabilities[i]``."""

    probabilities: torch.Tensor  # [n_features] float64

    def __post_init__(self) -> None:
        p = self.probabilities
        if p.dim() != 1:
            raise ValueError(f"probabilities must be 1-D [n_features], got shape {tuple(p.shape)}")
        if bool((p < 0).any()) or bool((p > 1).any()):
            raise ValueError("firing probabilities must lie in [0, 1]")

    @property
    def n_features(self) -> int:
        return self.probabilities.shape[0]

    def sample_active(self, n: int, generator: torch.Generator) -> torch.Tensor:
        uniform = torch.rand(n, self.n_features, generator=generator, device=generator.device, dtype=torch.float64)
        return uniform < self.probabilities.to(generator.device)

    def expected_active(self) -> float:
        return float(self.probabilities.sum())


@dataclass(frozen=True, eq=False)
class FixedCountSparsity:
    """Each sample has exactly ``s`` active features, chosen uniformly without replacement.

    With several counts (e.g. ``(3, 20)``), a batch of ``n`` samples is split as evenly as possible
    between them (the first ``n % len(counts)`` counts get one extra sample) and the rows are then
    shuffled. Exact shares, rather than drawing ``s`` per sample, keep every batch balanced, which is
    what the imbalanced-sparsity experiment is about. Every feature has the same firing frequency
    ``mean(counts) / n_features``.
    """

    n_features: int
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.counts:
            raise ValueError("counts must name at least one number of active features")
        for s in self.counts:
            if not 0 <= s <= self.n_features:
                raise ValueError(f"active count {s} is outside [0, n_features={self.n_features}]")

    def sample_active(self, n: int, generator: torch.Generator) -> torch.Tensor:
        device = generator.device
        n_groups = len(self.counts)
        per_group = [n // n_groups + (1 if g < n % n_groups else 0) for g in range(n_groups)]
        row_counts = torch.repeat_interleave(
            torch.tensor(self.counts, dtype=torch.int64, device=device),
            torch.tensor(per_group, dtype=torch.int64, device=device),
        )
        row_counts = row_counts[torch.randperm(n, generator=generator, device=device)]
        # Ranking i.i.d. uniform keys gives a uniformly random order of the features in each row;
        # keeping the first s ranks is a uniform s-subset without replacement.
        keys = torch.rand(n, self.n_features, generator=generator, device=device)
        sorted_keys = keys.sort(dim=1).values
        kth_key = sorted_keys.gather(1, (row_counts - 1).clamp_min(0)[:, None])
        return (keys <= kth_key) & (row_counts[:, None] > 0)

    def expected_active(self) -> float:
        return sum(self.counts) / len(self.counts)


@dataclass(frozen=True, eq=False)
class PlantedDataset:
    """A known dictionary plus a rule for sparse codes on it.

    ``sample`` returns ``x = codes @ features``: active coefficients have magnitude
    ``U(lo, hi]`` (half-open at the bottom so an active feature never has a zero coefficient, which
    keeps "active" and "nonzero" the same thing) and, when ``signed``, a random sign with
    probability 1/2 each.
    """

    name: str
    features: torch.Tensor  # [n_features, d] float32, unit-norm rows
    sparsity: Sparsity
    magnitude_range: tuple[float, float]
    signed: bool

    def __post_init__(self) -> None:
        if self.features.dim() != 2:
            raise ValueError(f"features must be [n_features, d], got shape {tuple(self.features.shape)}")
        if self.sparsity.n_features != self.features.shape[0]:
            raise ValueError(
                f"sparsity rule covers {self.sparsity.n_features} features but the dictionary has "
                f"{self.features.shape[0]}"
            )
        lo, hi = self.magnitude_range
        if not 0 <= lo <= hi:
            raise ValueError(f"magnitude_range must satisfy 0 <= lo <= hi, got {self.magnitude_range}")

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def d(self) -> int:
        return self.features.shape[1]

    def expected_active(self) -> float:
        """Expected number of active features per sample (the true mean L0)."""
        return self.sparsity.expected_active()

    def sample_codes(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Coefficients ``[n, n_features]`` float32; zero where a feature is inactive."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        device = generator.device
        active = self.sparsity.sample_active(n, generator)
        lo, hi = self.magnitude_range
        unit = 1.0 - torch.rand(n, self.n_features, generator=generator, device=device)  # U(0, 1]
        magnitude = lo + (hi - lo) * unit
        if self.signed:
            sign = torch.where(
                torch.rand(n, self.n_features, generator=generator, device=device) < 0.5, -1.0, 1.0
            )
            magnitude = magnitude * sign
        return torch.where(active, magnitude, torch.zeros((), device=device)).to(torch.float32)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` samples: ``(x [n, d] float32, codes [n, n_features] float32)``, on the generator's device."""
        codes = self.sample_codes(n, generator)
        x = codes @ self.features.to(device=codes.device, dtype=torch.float32)
        return x, codes


def random_unit_features(n_features: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """``[n_features, d]`` float32 rows drawn from N(0, I_d) and normalised to unit norm."""
    if n_features < 1 or d < 1:
        raise ValueError(f"need n_features >= 1 and d >= 1, got n_features={n_features}, d={d}")
    gaussian = torch.randn(n_features, d, generator=generator, dtype=torch.float64)
    return (gaussian / gaussian.norm(dim=1, keepdim=True)).to(torch.float32)


def decaying_probabilities(n_features: int, decay: float, mean_active: float) -> torch.Tensor:
    """Firing probabilities ``p_i = c * decay**i`` with ``c`` set so that ``sum(p) == mean_active``.

    float64 ``[n_features]``. Raises if reaching ``mean_active`` would need a probability above 1.
    """
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    return rescaled_probabilities(decay ** torch.arange(n_features, dtype=torch.float64), mean_active,
                                  f"with decay {decay}", "raise the decay")


def rescaled_probabilities(weights: torch.Tensor, mean_active: float, profile: str, remedy: str) -> torch.Tensor:
    """``weights`` (float64) scaled so that they sum to ``mean_active``; raises if one exceeds 1."""
    if mean_active < 0:
        raise ValueError(f"mean_active must be non-negative, got {mean_active}")
    probabilities = weights * (mean_active / weights.sum())
    if float(probabilities.max()) > 1.0:
        raise ValueError(
            f"mean_active={mean_active} over {weights.numel()} features {profile} needs a firing "
            f"probability of {float(probabilities.max()):.3f} > 1; lower mean_active or {remedy}"
        )
    return probabilities


def sharkey_dataset(
    *,
    seed: int = 0,
    d: int = 256,
    n_features: int = 512,
    mean_active: float = 5.0,
    decay: float = 0.99,
    magnitude_range: tuple[float, float] = (0.0, 1.0),
) -> PlantedDataset:
    """Sharkey, Braun & Millidge (2022) toy, uncorrelated variant (methods.md 7.1).

    Feature ``i`` fires with probability ``p_i proportional to decay**i``, coefficients ``U(0, 1]``.

    Choice: the probabilities are rescaled so that ``sum(p) == mean_active`` (5 by default). The frozen
    reference code (HoagyC/sparse_coding ``replicate_toy_models.py``) uses ``p_i = decay**i * 5/G``
    unrescaled in the uncorrelated variant, which gives only ~0.97 active features per sample with
    G=512, lambda=0.99; its correlated variant does rescale to a mean of 5, and 5 is the stated
    ``feature_num_nonzero``, so we rescale. With the defaults ``p_0 ~= 0.050`` and ``p_511 ~= 0.0003``.
    """
    generator = torch.Generator().manual_seed(seed)
    features = random_unit_features(n_features, d, generator)
    sparsity = BernoulliSparsity(decaying_probabilities(n_features, decay, mean_active))
    return PlantedDataset("sharkey", features, sparsity, magnitude_range, signed=False)


def gba_imbalanced_dataset(
    *,
    seed: int = 0,
    d: int = 42,
    n_features: int = 128,
    active_counts: tuple[int, ...] = (3, 20),
    magnitude_range: tuple[float, float] = (0.5, 1.5),
) -> PlantedDataset:
    """GBA's imbalanced-sparsity set (methods.md 6.1, 6.7): half the samples with 3 active, half with 20.

    Features are i.i.d. Gaussian, normalised to unit norm; the active ones are chosen uniformly
    without replacement, so every feature fires with frequency ``mean(active_counts) / n_features``
    (11.5/128 ~= 0.09).

    Choice: the paper's coefficient distribution was not verified. We use ``U(0.5, 1.5]`` (methods.md
    6.1 [INF]): bounded away from 0, so no active feature is hidden below noise and differences in
    recovery come from the sparsity imbalance alone. ``active_counts=(s,)`` gives GBA's uniform
    s-sparse set (methods.md 7.2).
    """
    generator = torch.Generator().manual_seed(seed)
    features = random_unit_features(n_features, d, generator)
    sparsity = FixedCountSparsity(n_features, tuple(int(s) for s in active_counts))
    return PlantedDataset("gba_imbalanced", features, sparsity, magnitude_range, signed=False)


def signed_dataset(
    *,
    seed: int = 0,
    d: int = 64,
    n_features: int = 128,
    mean_active: float = 4.0,
    decay: float = 0.99,
    magnitude_range: tuple[float, float] = (0.5, 1.5),
) -> PlantedDataset:
    """Sharkey-like set whose active coefficients carry a random sign (methods.md 7.3, AbsTopK probe).

    Every feature is bidirectional: ``+v`` and ``-v`` both occur, so an AbsTopK SAE can cover it with one
    latent while a TopK (non-negative) SAE needs two. Score recovery with ``absolute=True``.

    Choices [INF]: d=64, 128 features (2x superposition, small enough for a quick CPU test), about 4
    active per sample with Sharkey's ``decay**i`` firing profile, magnitudes ``U(0.5, 1.5]`` so that a
    coefficient's sign is never ambiguous (no near-zero values), sign +/- with probability 1/2 each.
    """
    generator = torch.Generator().manual_seed(seed)
    features = random_unit_features(n_features, d, generator)
    sparsity = BernoulliSparsity(decaying_probabilities(n_features, decay, mean_active))
    return PlantedDataset("signed", features, sparsity, magnitude_range, signed=True)


def zipf_dataset(
    *,
    seed: int = 0,
    d: int = 64,
    n_features: int = 400,
    mean_active: float = 1.5,
    exponent: float = 1.0,
    magnitude_range: tuple[float, float] = (0.0, 1.0),
) -> PlantedDataset:
    """Zipf-distributed firing, several hundred features in superposition, mean L0 below 2.

    Feature ``i`` fires independently with probability proportional to ``(i + 1) ** -exponent``,
    rescaled so that the mean number of active features is ``mean_active``; coefficients ``U(0, 1]``.
    This is the regime where top-AFA used to run away (dense codes) and GBA to leave latents dead:
    most features are rare, a few are common, and samples carry one or two features.
    """
    if exponent <= 0:
        raise ValueError(f"zipf exponent must be > 0, got {exponent}")
    generator = torch.Generator().manual_seed(seed)
    features = random_unit_features(n_features, d, generator)
    weights = (torch.arange(n_features, dtype=torch.float64) + 1).pow(-exponent)
    probabilities = rescaled_probabilities(weights, mean_active, f"with Zipf exponent {exponent}", "lower the exponent")
    return PlantedDataset("zipf", features, BernoulliSparsity(probabilities), magnitude_range, signed=False)


_BUILDERS: dict[str, Callable[..., PlantedDataset]] = {
    "sharkey": sharkey_dataset,
    "gba_imbalanced": gba_imbalanced_dataset,
    "signed": signed_dataset,
    "zipf": zipf_dataset,
}
DATASET_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def make_dataset(name: str, seed: int = 0, **overrides: object) -> PlantedDataset:
    """Build a planted dataset by name; ``seed`` fixes the dictionary, ``overrides`` change sizes.

    Overrides are the keyword arguments of the matching builder (``sharkey_dataset``,
    ``gba_imbalanced_dataset``, ``signed_dataset``), e.g. ``make_dataset("sharkey", d=64, n_features=256)``.
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown planted dataset {name!r}; choose one of {list(DATASET_NAMES)}") from None
    return builder(seed=seed, **overrides)


class SyntheticSource:
    """An endless batch source over a planted dataset, for the trainer and the benchmark.

    Batch n of a split is drawn from a generator seeded by (seed, split, n), so any batch can be
    reproduced without drawing the ones before it (exact resume). The held-out split is a separate
    stream of the same distribution.
    """

    SPLIT_OFFSETS = {"train": 0, "heldout": 1, "all": 0}

    def __init__(self, dataset: PlantedDataset):
        self.dataset = dataset
        self.d_in = dataset.d
        self.model_name = None  # planted features, no language model: see synthetic_dataset
        self.synthetic_dataset = dataset.name
        self.hook_name = "planted"

    def _generator(self, seed: int, split: str, index: int) -> torch.Generator:
        if split not in self.SPLIT_OFFSETS:
            raise ValueError(f"split must be one of {sorted(self.SPLIT_OFFSETS)}, got {split!r}")
        return derived_generator("synthetic", self.dataset.name, seed, self.SPLIT_OFFSETS[split], index)

    def iter_batches(self, batch_size: int, *, split: str = "train", seed: int = 0, start_batch: int = 0, **_: object):
        index = start_batch
        while True:
            yield self.dataset.sample(batch_size, self._generator(seed, split, index))[0]
            index += 1

    def sample(self, n: int, seed: int = 0, **_: object) -> torch.Tensor:
        return self.dataset.sample(n, self._generator(seed, "train", "init-sample"))[0]


def write_synthetic_store(directory, dataset: PlantedDataset, *, tokens: int, seed: int = 0,
                          dtype: str = "float32", chunk: int = 65536):
    """Write ``tokens`` planted-feature activations to an activation store (with a progress bar)."""
    from tqdm.auto import tqdm

    from sae_kit.store import ActivationStore, ActivationStoreWriter

    source = SyntheticSource(dataset)
    batches = source.iter_batches(chunk, seed=seed)
    with ActivationStoreWriter(directory, d_in=dataset.d, dtype=dtype, model_name=None,
                               hook_name=source.hook_name, metadata={"seed": seed, SYNTHETIC_KEY: dataset.name}) as writer:
        if writer.tokens_written:
            raise FileExistsError(f"{directory} already holds a store; choose a new --out")
        with tqdm(total=tokens, unit="tok", desc="synthetic store") as bar:
            while writer.tokens_written + writer.tokens_pending < tokens:
                x = next(batches)[: tokens - writer.tokens_written - writer.tokens_pending]
                writer.append(x)
                bar.update(x.shape[0])
    return ActivationStore(directory)

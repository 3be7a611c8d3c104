"""Evaluation metrics: dictionary recovery on planted data, streaming reconstruction/sparsity stats, AFA.

Conventions: a dictionary is a ``[m, d]`` tensor with one direction per row (pass ``W_dec`` as
``[d_sae, d]``; transpose a ``[d, d_sae]`` decoder first). Directions are compared by cosine, so their
norms do not matter; an all-zero row has cosine 0 with everything.

Recovery metrics (methods.md 6.2, 7.1):

- ``mmcs``: mean over true features of the best cosine with any learned direction.
- ``feature_recovery_rate``: fraction of true features whose best cosine exceeds ``tau`` (FRR@tau).
- ``latents_per_feature``: how many learned directions match each true feature.

``ReconstructionMetrics`` accumulates FVU/NMSE, L0, dead/dense latents, firing densities and the AFA
epsilon-LBO (methods.md 5.1, 8) over any number of batches in bounded memory.
``dictionary_coherence`` gives the dictionary's eps_max / eps_mean (quasi-orthogonality).
"""
from __future__ import annotations

import math

import torch

from sae_kit.codes import SparseCodes

__all__ = [
    "ReconstructionMetrics",
    "dictionary_coherence",
    "feature_recovery_rate",
    "latents_per_feature",
    "max_cosine_per_feature",
    "mmcs",
]

# Bound on the elements of one cosine block, so that comparing against a 16k+ latent dictionary
# never materialises the whole [n, m] matrix: 2**24 float32 = 64 MiB.
_BLOCK_ELEMENTS = 2**24


def _unit_rows(directions: torch.Tensor) -> torch.Tensor:
    directions = directions.detach().to(torch.float32)
    # Clamping the norm maps a zero row to a zero vector (cosine 0), not NaN.
    return directions / directions.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def _check_dictionary(name: str, directions: torch.Tensor) -> None:
    if directions.dim() != 2 or directions.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [count, d] tensor, got shape {tuple(directions.shape)}")


def _cosine_blocks(true_features: torch.Tensor, learned: torch.Tensor, absolute: bool):
    """Yield cosine blocks ``[rows, m]`` for consecutive chunks of the true features."""
    _check_dictionary("true_features", true_features)
    _check_dictionary("learned", learned)
    if true_features.shape[1] != learned.shape[1]:
        raise ValueError(
            f"true_features and learned must share d; got {tuple(true_features.shape)} and {tuple(learned.shape)} "
            "(pass the decoder as [d_sae, d])"
        )
    true_unit = _unit_rows(true_features)
    learned_unit = _unit_rows(learned).to(true_unit.device)
    rows = max(1, _BLOCK_ELEMENTS // learned_unit.shape[0])
    for start in range(0, true_unit.shape[0], rows):
        cosine = true_unit[start : start + rows] @ learned_unit.T
        yield cosine.abs() if absolute else cosine


def max_cosine_per_feature(true_features: torch.Tensor, learned: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """For each true feature ``[n, d]``, the max cosine to any learned direction ``[m, d]``: ``[n]`` float32.

    ``absolute=True`` uses ``|cos|``, so a learned ``-v`` recovers ``v`` (for signed features / AbsTopK).
    """
    return torch.cat([block.max(dim=1).values for block in _cosine_blocks(true_features, learned, absolute)])


def mmcs(true_features: torch.Tensor, learned: torch.Tensor, absolute: bool = False) -> float:
    """Mean max cosine similarity: mean over true features of their best cosine with a learned direction.

    Ground truth is on the averaging side, as in HoagyC/sparse_coding ``mean_max_cosine_similarity``.
    """
    return float(max_cosine_per_feature(true_features, learned, absolute).mean())


def feature_recovery_rate(
    true_features: torch.Tensor, learned: torch.Tensor, tau: float, absolute: bool = False
) -> float:
    """FRR@tau: fraction of true features whose max cosine to a learned direction is strictly above ``tau``."""
    return float((max_cosine_per_feature(true_features, learned, absolute) > tau).to(torch.float64).mean())


def latents_per_feature(
    true_features: torch.Tensor, learned: torch.Tensor, tau: float, absolute: bool = False
) -> torch.Tensor:
    """For each true feature, the number of learned directions with cosine strictly above ``tau``: ``[n]`` int64.

    A non-negative (TopK) SAE needs two latents, ``+v`` and ``-v``, for a signed feature; with
    ``absolute=False`` only the ``+v`` one counts, with ``absolute=True`` both do. An AbsTopK SAE covers
    the feature with a single latent.
    """
    return torch.cat([(block > tau).sum(dim=1) for block in _cosine_blocks(true_features, learned, absolute)])


def dictionary_coherence(W_dec: torch.Tensor) -> dict[str, float]:
    """Quasi-orthogonality of a dictionary ``[m, d]`` (rows = latents): max and mean off-diagonal ``|cos|``.

    Returns ``{"eps_max", "eps_mean"}`` over the ``m * (m - 1)`` ordered pairs ``i != j``. Rows are
    normalised first, so this matches the AFA paper's off-diagonal of ``W_dec W_dec^T`` for its unit-norm
    decoders, in absolute value. Computed in row blocks of at most 2**24 cosines (64 MiB), so a 16k
    dictionary needs 16 blocks, never the full 16k x 16k matrix.
    """
    _check_dictionary("W_dec", W_dec)
    m = W_dec.shape[0]
    if m < 2:
        raise ValueError("dictionary_coherence needs at least two directions")
    unit = _unit_rows(W_dec)
    rows = max(1, _BLOCK_ELEMENTS // m)
    eps_max = 0.0
    abs_sum = torch.zeros((), dtype=torch.float64, device=unit.device)
    for start in range(0, m, rows):
        block = (unit[start : start + rows] @ unit.T).abs()
        local = torch.arange(block.shape[0], device=unit.device)
        block[local, start + local] = 0.0  # drop the diagonal (self-similarity)
        eps_max = max(eps_max, float(block.max()))
        abs_sum += block.sum(dtype=torch.float64)
    return {"eps_max": eps_max, "eps_mean": float(abs_sum) / (m * (m - 1))}


class ReconstructionMetrics:
    """Streaming reconstruction, sparsity and AFA statistics over many batches, in bounded memory.

    Call ``update`` per batch, then ``compute``. Sums are kept in float64 on the device of the first
    batch (no host sync per batch); nothing per-token is kept except a bounded uniform sample for the
    epsilon-LBO median.

    ``x`` must be in the space the SAE reconstructs (after any input normalisation the SAE applies),
    so that ``x_hat`` is comparable; for the AFA metrics ``x`` plays the role of ``z`` in methods.md 5.1.

    Parameters:
        d_sae: number of latents.
        l0_max_bins: most bins in ``l0_histogram``; bins are single L0 values until the largest L0
            seen needs more, then equal integer-width bins (see ``l0_bin_edges``).
        dense_threshold: a latent is *dense* if it fires on more than this fraction of tokens.
        density_bins: bins of the log10 firing-density histogram.
        eps_lbo_sample_size: tokens kept (uniformly at random) for the epsilon-LBO median/ZF sample.
        seed: seed of that sampling, so results are reproducible.
    """

    def __init__(
        self,
        d_sae: int,
        l0_max_bins: int = 4096,
        dense_threshold: float = 0.1,
        density_bins: int = 50,
        eps_lbo_sample_size: int = 16384,
        seed: int = 0,
    ) -> None:
        if d_sae < 1:
            raise ValueError(f"d_sae must be positive, got {d_sae}")
        if l0_max_bins < 1 or density_bins < 1 or eps_lbo_sample_size < 1:
            raise ValueError("l0_max_bins, density_bins and eps_lbo_sample_size must be positive")
        self.d_sae = d_sae
        self.l0_max_bins = l0_max_bins
        self.dense_threshold = dense_threshold
        self.density_bins = density_bins
        self.eps_lbo_sample_size = eps_lbo_sample_size
        self.seed = seed

        self.n_tokens = 0
        self._d: int | None = None
        self._device: torch.device | None = None
        self._with_afa: bool | None = None  # fixed by the first update: AFA inputs given or not

    def _init_state(self, d: int, device: torch.device, with_afa: bool) -> None:
        self._d, self._device, self._with_afa = d, device, with_afa
        f64 = dict(dtype=torch.float64, device=device)
        # FVU's denominator is computed from sums of x - shift, with the shift = first batch's mean:
        # Sum||x - mu||^2 = Sum||x - c||^2 - N||mu - c||^2 holds for any c, and a c near mu avoids the
        # cancellation that Sum||x||^2 - N||mu||^2 suffers when activations have a large mean.
        self._shift: torch.Tensor | None = None
        self._sum_shifted_x = torch.zeros(d, **f64)
        self._sum_sq_shifted_x = torch.zeros((), **f64)
        self._sum_sq_error = torch.zeros((), **f64)
        self._sum_token_nmse = torch.zeros((), **f64)
        self._n_nonzero_tokens = torch.zeros((), dtype=torch.int64, device=device)
        self._l0_counts = torch.zeros(self.d_sae + 1, dtype=torch.int64, device=device)
        self._fire_counts = torch.zeros(self.d_sae, dtype=torch.int64, device=device)
        if with_afa:
            self._eps_sum = torch.zeros((), **f64)
            self._eps_count = torch.zeros((), dtype=torch.int64, device=device)
            self._sample_generator = torch.Generator(device=device).manual_seed(self.seed)
            self._sample_keys = torch.empty(0, dtype=torch.float32, device=device)
            self._sample_rows = torch.empty(0, 3, **f64)  # (eps_lbo, ||x||, ||f_tilde||)

    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        codes: SparseCodes,
        decoder_norms: torch.Tensor | None = None,
        b_dec: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: inputs ``x [B, d]``, reconstructions ``x_hat [B, d]`` and their codes.

        ``decoder_norms [d_sae]`` (``||W_dec,i||``) and ``b_dec [d]`` enable the AFA epsilon-LBO; give
        both or neither, and the same choice on every update.
        """
        if x.dim() != 2 or x.shape != x_hat.shape:
            raise ValueError(f"x and x_hat must both be [B, d], got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        batch, d = x.shape
        if codes.batch_size != batch:
            raise ValueError(f"codes cover {codes.batch_size} tokens but x has {batch}")
        if codes.d_sae != self.d_sae:
            raise ValueError(f"codes have d_sae={codes.d_sae}, metrics were built for {self.d_sae}")
        if (decoder_norms is None) != (b_dec is None):
            raise ValueError("the epsilon-LBO needs both decoder_norms and b_dec (or neither)")
        with_afa = decoder_norms is not None
        if self._d is None:
            self._init_state(d, x.device, with_afa)
        if d != self._d:
            raise ValueError(f"x has d={d}, earlier batches had d={self._d}")
        if with_afa != self._with_afa:
            raise ValueError("decoder_norms/b_dec must be given on every update or on none")
        if batch == 0:
            return

        x64 = x.detach().to(device=self._device, dtype=torch.float64)
        error_sq = (x64 - x_hat.detach().to(device=self._device, dtype=torch.float64)).square().sum(dim=1)  # [B]
        x_sq = x64.square().sum(dim=1)  # [B]

        if self._shift is None:
            self._shift = x64.mean(dim=0)
        shifted = x64 - self._shift
        self._sum_shifted_x += shifted.sum(dim=0)
        self._sum_sq_shifted_x += shifted.square().sum()
        self._sum_sq_error += error_sq.sum()
        # torch.where rather than boolean indexing: no host sync on GPU.
        nonzero = x_sq > 0
        self._sum_token_nmse += torch.where(nonzero, error_sq / x_sq.clamp_min(torch.finfo(torch.float64).tiny), 0.0).sum()
        self._n_nonzero_tokens += nonzero.sum()

        l0 = codes.l0().to(self._device).clamp(max=self.d_sae)
        self._l0_counts += torch.bincount(l0, minlength=self.d_sae + 1)
        self._fire_counts += codes.fire_counts().to(self._device)
        self.n_tokens += batch

        if with_afa:
            self._update_eps_lbo(x_sq, codes, decoder_norms, b_dec)

    def _update_eps_lbo(
        self, x_sq: torch.Tensor, codes: SparseCodes, decoder_norms: torch.Tensor, b_dec: torch.Tensor
    ) -> None:
        if decoder_norms.shape != (self.d_sae,):
            raise ValueError(f"decoder_norms must be [d_sae={self.d_sae}], got {tuple(decoder_norms.shape)}")
        if b_dec.shape != (self._d,):
            raise ValueError(f"b_dec must be [d={self._d}], got {tuple(b_dec.shape)}")
        if self.d_sae < 2:
            raise ValueError("the epsilon-LBO divides by d_sae - 1 and needs d_sae >= 2")
        norms = decoder_norms.detach().to(device=self._device, dtype=torch.float64)
        values = codes.values.detach().to(device=self._device, dtype=torch.float64)
        indices = codes.indices.to(self._device)
        # f_tilde = [f_i * ||W_dec,i|| for active i ; ||b_dec||]; padding slots have f_i = 0 and add nothing.
        f_tilde_sq = (values * norms[indices]).square().sum(dim=1)
        f_tilde_sq = f_tilde_sq + b_dec.detach().to(device=self._device, dtype=torch.float64).square().sum()
        # A token with f_tilde = 0 (nothing active, no bias) has no defined bound: it is left out.
        valid = f_tilde_sq > 0
        eps = (x_sq[valid] - f_tilde_sq[valid]).abs() / ((self.d_sae - 1) * f_tilde_sq[valid])
        self._eps_sum += eps.sum()
        self._eps_count += valid.sum()

        # Bottom-k sketch: give each token a uniform random key and keep the smallest keys seen. The
        # kept tokens are a uniform sample without replacement of every token so far, in fixed memory.
        rows = torch.stack([eps, x_sq[valid].sqrt(), f_tilde_sq[valid].sqrt()], dim=1)
        keys = torch.rand(rows.shape[0], generator=self._sample_generator, device=self._device)
        all_keys = torch.cat([self._sample_keys, keys])
        all_rows = torch.cat([self._sample_rows, rows])
        if all_keys.shape[0] > self.eps_lbo_sample_size:
            kept = all_keys.topk(self.eps_lbo_sample_size, largest=False).indices
            all_keys, all_rows = all_keys[kept], all_rows[kept]
        self._sample_keys, self._sample_rows = all_keys, all_rows

    def compute(self) -> dict[str, object]:
        """Summarise everything seen so far.

        Keys:
            n_tokens: tokens evaluated.
            fvu: Sum||x - x_hat||^2 / Sum||x - mu||^2, mu = mean of x over ALL tokens seen (dataset-mean
                baseline, Gao et al.). 0 is perfect, 1 is no better than predicting mu. NaN if x is constant.
            nmse_mean_token: mean over tokens of ||x - x_hat||^2 / ||x||^2 (zero baseline, per token; the AFA
                paper / Bussmann convention). Tokens with x = 0 are left out. Differs from fvu.
            mse: mean over all elements of (x - x_hat)^2 (no baseline).
            l0_mean: mean number of active latents per token.
            l0_histogram / l0_bin_edges: token counts per L0 bin; bin i covers L0 in
                [l0_bin_edges[i], l0_bin_edges[i+1]) (single values unless L0 exceeds l0_max_bins).
            feature_density: [d_sae] float64 CPU tensor, fraction of tokens each latent fired on.
            dead_fraction: fraction of latents that never fired on the evaluated tokens.
            dense_fraction: fraction of latents firing on more than ``dense_threshold`` of tokens.
            density_histogram: {"bin_edges", "counts", "n_dead_excluded"} of log10(feature_density) over
                the latents that fired (log10 of 0 is -inf, so dead latents are only counted).
            With decoder_norms/b_dec: eps_lbo_mean (exact), eps_lbo_median (exact up to
                eps_lbo_sample_size tokens, else from a uniform sample of that size), eps_lbo_n_tokens,
                eps_lbo_sample ([S] tensor) and afa_norms_sample ([S, 2] tensor of (||x||, ||f_tilde||),
                the ZF-plot axes).
        """
        if self.n_tokens == 0:
            raise ValueError("ReconstructionMetrics.compute() called before any tokens were added")
        n = self.n_tokens
        sum_sq_error = float(self._sum_sq_error)
        mean_shifted = self._sum_shifted_x / n
        centered_sq = float(self._sum_sq_shifted_x) - n * float(mean_shifted.square().sum())
        n_nonzero = int(self._n_nonzero_tokens)

        l0_counts = self._l0_counts.cpu()
        l0_values = torch.arange(self.d_sae + 1, dtype=torch.float64)
        fire_counts = self._fire_counts.cpu()
        density = fire_counts.to(torch.float64) / n
        l0_histogram, l0_edges = self._l0_histogram(l0_counts)

        result: dict[str, object] = {
            "n_tokens": n,
            "fvu": sum_sq_error / centered_sq if centered_sq > 0 else math.nan,
            "nmse_mean_token": float(self._sum_token_nmse) / n_nonzero if n_nonzero else math.nan,
            "mse": sum_sq_error / (n * self._d),
            "l0_mean": float((l0_counts.to(torch.float64) * l0_values).sum()) / n,
            "l0_histogram": l0_histogram,
            "l0_bin_edges": l0_edges,
            "feature_density": density,
            "dead_fraction": float((fire_counts == 0).to(torch.float64).mean()),
            "dense_fraction": float((density > self.dense_threshold).to(torch.float64).mean()),
            "density_histogram": self._density_histogram(density),
        }
        if self._with_afa:
            eps_count = int(self._eps_count)
            sample = self._sample_rows.cpu()
            result.update(
                eps_lbo_mean=float(self._eps_sum) / eps_count if eps_count else math.nan,
                eps_lbo_median=float(sample[:, 0].median()) if eps_count else math.nan,
                eps_lbo_n_tokens=eps_count,
                eps_lbo_sample=sample[:, 0].clone(),
                afa_norms_sample=sample[:, 1:].clone(),
            )
        return result

    def _l0_histogram(self, l0_counts: torch.Tensor) -> tuple[list[int], list[int]]:
        seen = torch.nonzero(l0_counts).flatten()
        length = int(seen.max()) + 1 if seen.numel() else 1
        width = math.ceil(length / self.l0_max_bins)
        n_bins = math.ceil(length / width)
        padded = torch.zeros(n_bins * width, dtype=torch.int64)
        padded[:length] = l0_counts[:length]
        counts = padded.view(n_bins, width).sum(dim=1)
        return counts.tolist(), [i * width for i in range(n_bins + 1)]

    def _density_histogram(self, density: torch.Tensor) -> dict[str, object]:
        alive = density[density > 0]
        # The rarest possible firing is 1/n_tokens, so the bins span [floor(log10(1/n)), 0].
        low = min(math.floor(math.log10(1.0 / self.n_tokens)), -1)
        edges = torch.linspace(low, 0.0, self.density_bins + 1, dtype=torch.float64)
        counts = torch.histogram(alive.log10(), bins=edges).hist if alive.numel() else torch.zeros(self.density_bins)
        return {
            "bin_edges": edges.tolist(),
            "counts": [int(c) for c in counts.tolist()],
            "n_dead_excluded": int(density.numel() - alive.numel()),
        }


def matched_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|cos| of each pair of the Hungarian matching between two dictionaries [n, d]."""
    from scipy.optimize import linear_sum_assignment

    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = (a @ b.T).abs().double()
    rows, cols = linear_sum_assignment(-cosine.numpy())
    return cosine[torch.as_tensor(rows), torch.as_tensor(cols)]

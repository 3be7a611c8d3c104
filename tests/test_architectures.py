"""Unit tests for the SAE architectures (sae_kit/sae/*) and the shared SparseCodes currency.

Each test checks a property from the methods spec (methods.md sections 1.6, 2, 3.4, 4.2-4.5,
5.2-5.7, 6.3-6.8) on small hand-made or seeded random inputs, so a wrong selection rule, loss,
constraint or file format makes it fail.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from sae_kit.codes import SparseCodes
from sae_kit.config import NORMALIZATIONS, ConfigError
from sae_kit.sae import ARCHITECTURES, SAEConfig, create_sae, load_sae
from sae_kit.sae.base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Normalization,
    auxiliary_reconstruction_loss,
    geometric_median,
)
from sae_kit.sae.topafa import LAST_PREFIX_NORM, afa_select
from sae_kit.sae.zipf import fitted_zipf

ALL_ARCHITECTURES = ["topk", "batchtopk", "abstopk", "feature_choice", "mutual_choice", "topafa", "gba", "relu"]
# Architectures whose inference rule is a learned threshold (SAELens' JumpReLU "threshold" key).
THRESHOLD_ARCHITECTURES = {"batchtopk", "abstopk", "feature_choice", "mutual_choice"}


# ---------------------------------------------------------------------------------- helpers
def make_sae(architecture: str, d_in: int = 16, d_sae: int = 64, k: int = 4, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return create_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, **kwargs))


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def train_steps(sae, x: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    """A few real optimisation steps (the trainer's order: backward, project, step, renormalise)."""
    sae.train()
    optimizer = torch.optim.Adam(sae.trainable_parameters(), lr=lr)
    for step in range(steps):
        batch = x.roll(step * 7, dims=0)
        out = sae.training_forward(batch)
        optimizer.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()


def mark_dead(sae, dead: torch.Tensor) -> None:
    """Make exactly the latents in ``dead`` (bool [d_sae]) count as dead."""
    sae.cfg.dead_tokens_threshold = 1000
    sae.tokens_since_fired.zero_()
    sae.tokens_since_fired[dead] = 10_000


def unfired(sae, x: torch.Tensor) -> torch.Tensor:
    """Latents the training rule does not select on ``x`` (state restored afterwards)."""
    state = {name: t.clone() for name, t in sae.state_dict().items()}
    was_training = sae.training
    sae.train()
    with torch.no_grad():
        fired = sae.encode(x).fired()
    sae.load_state_dict(state)
    sae.train(was_training)
    return ~fired


def reference_auxk(pre, residual, W_dec, weights, k_aux, signed=False) -> torch.Tensor:
    """Independent dense AuxK (Gao et al. App. A.2): top-k_aux candidates by weight*u (|u| if signed),
    ReLU'd unless signed, decoded WITHOUT b_dec, MSE normalised by the residual's batch variance."""
    pre, residual, W_dec = pre.detach().double(), residual.detach().double(), W_dec.detach().double()
    candidates = weights > 0
    if not candidates.any():
        return torch.zeros((), dtype=torch.float64)
    score = (pre.abs() if signed else pre) * weights.double()
    score = score.masked_fill(~candidates, float("-inf"))
    idx = score.topk(min(k_aux, int(candidates.sum())), dim=1).indices
    vals = pre.gather(1, idx)
    if not signed:
        vals = vals.relu()
    z = torch.zeros_like(pre).scatter(1, idx, vals)
    estimate = z @ W_dec
    variance = (residual - residual.mean(0)).pow(2).sum(1).mean()
    return (estimate - residual).pow(2).sum(1).mean() / variance


def column_counts(codes: SparseCodes) -> torch.Tensor:
    return (codes.to_dense() != 0).sum(0)


def assert_same_row(sae, x: torch.Tensor, dense: torch.Tensor, row: int) -> None:
    """Encoding token ``row`` alone gives the same code as inside the batch (eval mode).

    Same support exactly; values up to float rounding (a [1, d] matmul may round differently)."""
    alone = sae.encode(x[row : row + 1]).to_dense()[0]
    assert torch.equal(alone != 0, dense[row] != 0)
    torch.testing.assert_close(alone, dense[row], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- SparseCodes
def test_sparse_codes_from_mask_round_trips_and_counts() -> None:
    dense = torch.tensor([[0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 4.0, 5.0]])
    codes = SparseCodes.from_dense(dense)
    assert codes.indices.shape == (3, 3)  # padded to the longest row
    assert torch.equal(codes.to_dense(), dense)
    assert codes.l0().tolist() == [2, 0, 3]
    assert codes.fire_counts().tolist() == [1, 1, 1, 2]
    assert codes.fired().tolist() == [True, True, True, True]
    with pytest.raises(ValueError):
        SparseCodes(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), 8)


# ---------------------------------------------------------------------------- shared forward path
def test_pre_activations_subtract_b_dec_and_add_b_enc() -> None:
    sae = make_sae("topk", k=4)
    shift = randn(16, seed=4)
    with torch.no_grad():
        sae.b_dec.copy_(shift)
        sae.b_enc.copy_(0.1 * randn(64, seed=5))
    x = randn(12, 16)
    expected = (x - shift) @ sae.W_enc.detach() + sae.b_enc.detach()
    torch.testing.assert_close(sae.pre_activations(x).detach(), expected)
    # b_dec is a translation: moving the data and b_dec together leaves the codes unchanged
    # and moves the reconstruction with them
    sae.eval()
    moved = make_sae("topk", k=4)
    moved.load_state_dict(sae.state_dict())
    with torch.no_grad():
        moved.b_dec.add_(3.0)
    torch.testing.assert_close(moved.encode(x + 3.0).to_dense(), sae.encode(x).to_dense(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moved(x + 3.0), sae(x) + 3.0, rtol=1e-5, atol=1e-5)


def test_mean_norm_divides_by_the_samples_mean_norm_and_makes_codes_scale_free(tmp_path) -> None:
    """``mean_norm``: one constant (the init sample's mean norm) for every token, so a token keeps its
    relative norm, ×100 inputs give the same codes, and the constant is saved with the weights."""
    x = randn(256, 16) * torch.linspace(0.2, 3.0, 256)[:, None]
    sae = make_sae("topk", normalize_activations="mean_norm")
    sae.init_from_data(x)
    torch.testing.assert_close(sae.input_scale, x.norm(dim=1).mean())
    x_n, norm = sae.normalize(x)
    torch.testing.assert_close(x_n.norm(dim=1), x.norm(dim=1) / x.norm(dim=1).mean())  # not per-token unit norm
    torch.testing.assert_close(norm.undo(x_n), x)
    scaled = make_sae("topk", normalize_activations="mean_norm")
    scaled.init_from_data(x * 100)
    a, b = sae.encode(x), scaled.encode(x * 100)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scaled(x * 100) / 100, sae(x), rtol=1e-4, atol=1e-5)
    back = load_sae(sae.save(tmp_path / "sae"))
    assert float(back.input_scale) == float(sae.input_scale)
    assert "input_scale" not in make_sae("topk").state_dict()  # only this mode carries the constant


def test_dead_latent_bookkeeping_counts_tokens_and_resets_on_fire() -> None:
    sae = make_sae("topk", d_sae=128, k=4, dead_tokens_threshold=40)
    x1, x2 = randn(16, 16, seed=1), randn(24, 16, seed=2)
    fired1 = sae.training_forward(x1).codes.fired()
    assert torch.equal(sae.tokens_since_fired, torch.where(fired1, 0, 16))
    fired2 = sae.training_forward(x2).codes.fired()
    expected = torch.where(fired2, 0, torch.where(fired1, 24, 40))
    assert torch.equal(sae.tokens_since_fired, expected)
    assert torch.equal(sae.dead_mask(), expected >= 40)
    assert sae.dead_mask().any() and not sae.dead_mask().all()
    # eval passes do not count
    sae.eval().training_forward(x1)
    assert torch.equal(sae.tokens_since_fired, expected)


# ---------------------------------------------------------------------------------------- TopK
def test_topk_exactly_k_nonnegative_and_equal_to_torch_topk() -> None:
    sae = make_sae("topk", k=5).eval()
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive
    x = randn(32, 16)
    x_n, _ = sae.normalize(x)
    pre = sae.pre_activations(x_n).detach()
    assert (pre > 0).all()
    codes = sae.encode(x)
    assert codes.l0().tolist() == [5] * 32
    assert (codes.values >= 0).all()
    expected = pre.topk(5, dim=1)
    assert torch.equal(codes.indices.sort(1).values, expected.indices.sort(1).values)
    dense_expected = torch.zeros_like(pre).scatter(1, expected.indices, expected.values)
    torch.testing.assert_close(codes.to_dense(), dense_expected)


def test_topk_fewer_than_k_when_few_positive_preactivations() -> None:
    sae = make_sae("topk", d_sae=8, k=3)
    pre = torch.tensor(
        [
            [-1.0, 2.0, -3.0, -0.5, 1.0, -2.0, -4.0, -0.1],  # 2 positives
            [-1.0, -2.0, -3.0, -0.5, -1.0, -2.0, -4.0, -0.1],  # none
            [5.0, 2.0, 3.0, 0.5, 1.0, 2.5, 4.0, 0.1],  # all positive
        ]
    )
    codes = sae.select(pre, torch.zeros(3, 16))
    assert codes.l0().tolist() == [2, 0, 3]
    assert (codes.values >= 0).all()
    assert torch.equal(codes.to_dense()[0], torch.tensor([0.0, 2.0, 0, 0, 1.0, 0, 0, 0]))
    assert torch.equal(codes.to_dense()[2], torch.tensor([5.0, 0, 3.0, 0, 0, 0, 4.0, 0]))


# ---------------------------------------------------------------------------------------- AuxK
def test_auxk_is_zero_without_dead_latents_and_positive_with_them() -> None:
    sae = make_sae("topk", d_sae=128, k=4)
    x = randn(16, 16)
    out = sae.training_forward(x)  # default threshold: 10M tokens, nothing is dead
    assert "auxk" in out.parts
    assert out.parts["auxk"].item() == 0.0
    assert torch.equal(out.loss, out.parts["reconstruction"])

    dead = unfired(sae, x)
    assert dead.sum() >= 32
    mark_dead(sae, dead)
    out = sae.training_forward(x)
    assert out.parts["auxk"].item() > 0
    torch.testing.assert_close(out.loss, out.parts["reconstruction"] + out.parts["auxk"])
    # in eval mode no aux term is computed at all
    assert "auxk" not in sae.eval().training_forward(x).parts


def test_auxk_gradient_reaches_only_dead_latents_and_not_through_reconstruction() -> None:
    sae = make_sae("topk", k=4)
    with torch.no_grad():
        sae.b_dec.copy_(0.3 * randn(16, seed=5))
    x = randn(8, 16)
    fired = ~unfired(sae, x)
    assert (~fired).sum() >= 12
    dead = torch.zeros(64, dtype=torch.bool)
    dead[(~fired).nonzero().flatten()[:12]] = True
    mark_dead(sae, dead)
    out = sae.training_forward(x)
    out.parts["auxk"].backward()
    # dead latents' encoder columns get a gradient: AuxK trains the encoder (unlike sparsify's variant)
    assert sae.W_enc.grad[:, dead].abs().sum() > 0
    assert sae.W_dec.grad[dead].abs().sum() > 0
    # alive latents get none, in particular the ones that built x_hat: the residual target is detached
    assert fired.any()
    assert torch.count_nonzero(sae.W_enc.grad[:, ~dead]) == 0
    assert torch.count_nonzero(sae.W_dec.grad[~dead]) == 0
    assert torch.count_nonzero(sae.b_enc.grad[~dead]) == 0


def test_auxiliary_reconstruction_loss_detaches_its_target() -> None:
    pre = randn(8, 10, seed=2).requires_grad_()
    residual = randn(8, 4, seed=3).requires_grad_()
    W_dec = randn(10, 4, seed=4).requires_grad_()
    weights = torch.tensor([1.0, 0, 1, 0, 1, 1, 0, 0, 1, 1])
    loss = auxiliary_reconstruction_loss(pre, lambda i, known=None: pre.gather(1, i), residual, W_dec, weights, k_aux=3)
    loss.backward()
    assert residual.grad is None
    assert pre.grad[:, weights == 0].abs().sum() == 0
    assert pre.grad[:, weights > 0].abs().sum() > 0
    assert W_dec.grad is not None and W_dec.grad[weights > 0].abs().sum() > 0


def test_auxk_value_matches_reference_without_b_dec_and_respects_k_aux() -> None:
    sae = make_sae("topk", d_sae=128, k=4, k_aux=3)
    with torch.no_grad():
        sae.b_dec.copy_(randn(16, seed=6))  # large b_dec: decoding it would change the loss a lot
    x = randn(16, 16) + sae.b_dec.detach()
    dead = unfired(sae, x)
    assert dead.sum() >= 32
    mark_dead(sae, dead)
    out = sae.training_forward(x)
    residual = out.x_n - out.x_hat_n
    expected = sae.cfg.aux_coefficient * reference_auxk(out.pre_activations, residual, sae.W_dec, dead.float(), 3)
    torch.testing.assert_close(out.parts["auxk"].double(), expected, rtol=1e-4, atol=1e-7)
    # a version that adds b_dec to the aux reconstruction gives a clearly different value
    with torch.no_grad():
        shifted = reference_auxk(out.pre_activations, residual - sae.b_dec, sae.W_dec, dead.float(), 3)
    assert not torch.isclose(sae.cfg.aux_coefficient * shifted, expected, rtol=1e-2)
    # k_aux = 3 differs from using every dead latent
    every = sae.cfg.aux_coefficient * reference_auxk(out.pre_activations, residual, sae.W_dec, dead.float(), 128)
    assert not torch.isclose(every, expected, rtol=1e-3)


# --------------------------------------------------------------------------- decoder constraint
def test_decoder_gradient_projection_and_renormalisation() -> None:
    sae = make_sae("topk", k=4)
    out = sae.training_forward(randn(64, 16))
    out.loss.backward()
    W = sae.W_dec.detach()
    parallel_before = (sae.W_dec.grad * W).sum(1)
    assert parallel_before.abs().max() > 1e-4  # the raw gradient has a radial part
    sae.before_optimizer_step()
    directions = W / W.norm(dim=1, keepdim=True)
    parallel_after = (sae.W_dec.grad * directions).sum(1)
    assert parallel_after.abs().max() < 1e-6 * max(sae.W_dec.grad.abs().max().item(), 1.0)

    with torch.no_grad():  # drift off the sphere, as an optimizer step does
        scales = torch.linspace(0.5, 3.0, 64)[:, None]
        sae.W_dec.mul_(scales)
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_dec.detach(), directions)  # directions kept


def test_row_dots_in_blocks_equal_the_row_sums() -> None:
    from sae_kit.sae.base import ROW_DOTS_ROWS, row_dots

    a, b = randn(2 * ROW_DOTS_ROWS + 37, 24, seed=1), randn(2 * ROW_DOTS_ROWS + 37, 24, seed=2)
    torch.testing.assert_close(row_dots(a, b), (a.double() * b.double()).sum(1).float(), rtol=1e-6, atol=1e-6)


def test_projection_also_applies_to_non_unit_rows() -> None:
    sae = make_sae("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.2, 5.0, 64)[:, None])
    sae.training_forward(randn(32, 16)).loss.backward()
    sae.before_optimizer_step()
    cos = (sae.W_dec.grad * sae.W_dec).sum(1) / (sae.W_dec.grad.norm(dim=1) * sae.W_dec.norm(dim=1) + 1e-12)
    assert cos.abs().max() < 1e-5


# ----------------------------------------------------------------------------------- BatchTopK
def test_batchtopk_training_keeps_global_top_k_times_b_with_varying_row_l0() -> None:
    sae = make_sae("batchtopk", k=4)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # plenty of positive pre-activations
    x = randn(32, 16) * torch.linspace(0.1, 4.0, 32)[:, None]
    sae.train()
    codes = sae.encode(x)
    dense = codes.to_dense()
    assert int((dense != 0).sum()) == 4 * 32
    assert codes.l0().unique().numel() > 1  # per-token L0 varies
    assert codes.l0()[-1] > codes.l0()[0]  # the large-norm tokens take more latents
    acts = sae.pre_activations(sae.normalize(x)[0]).detach().relu()
    selected = dense != 0
    assert acts[selected].min() >= acts[~selected].max()
    torch.testing.assert_close(dense[selected], acts[selected])


def test_batchtopk_training_drops_nonpositive_entries() -> None:
    sae = make_sae("batchtopk", d_sae=8, k=4)
    pre = -torch.ones(4, 8)
    pre[0, :3] = torch.tensor([1.0, 2.0, 3.0])
    sae.train()
    codes = sae.select(pre, torch.zeros(4, 16))
    assert int(codes.active.sum()) == 3  # only 3 positives available for a budget of 16


def test_batchtopk_inference_uses_threshold_and_is_batch_independent() -> None:
    sae = make_sae("batchtopk", k=4)
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
        sae.threshold.fill_(0.3)
    sae.eval()
    x = randn(20, 16)
    acts = sae.pre_activations(sae.normalize(x)[0]).detach().relu()
    assert ((acts > 0) & (acts <= 0.3)).any() and (acts > 0.3).any()
    dense = sae.encode(x).to_dense()
    assert torch.equal(dense, acts * (acts > 0.3))
    for row in (0, 7, 19):
        assert_same_row(sae, x, dense, row)
    # the training rule is batch dependent, which is why inference must not use it
    sae.train()
    with torch.no_grad():
        full = sae.encode(x).to_dense()
        one = sae.encode(x[:1]).to_dense()
    assert not torch.equal(one[0], full[0])


def test_batchtopk_threshold_ema_moves_toward_min_selected_activation() -> None:
    sae = make_sae("batchtopk", k=4, options={"threshold_beta": 0.9})
    sae.train()
    x1, x2 = randn(32, 16, seed=1), 3.0 * randn(32, 16, seed=2)
    codes = sae.encode(x1)
    m1 = codes.values[codes.active].min()
    # bias correction: the first observation is taken as is
    torch.testing.assert_close(sae.threshold, torch.full((64,), m1.item()))
    codes = sae.encode(x2)
    m2 = codes.values[codes.active].min()
    w1 = 0.1
    expected = (0.9 * w1 * m1 + 0.1 * m2) / (0.9 * w1 + 0.1)
    torch.testing.assert_close(sae.threshold, torch.full((64,), expected.item()))
    assert abs(sae.threshold[0] - m2) < abs(m1 - m2)
    # eval mode leaves it alone
    before = sae.threshold.clone()
    sae.eval().encode(randn(32, 16, seed=9))
    assert torch.equal(sae.threshold, before)


# -------------------------------------------------------------------------------- Mutual Choice
def test_mutual_choice_keeps_exactly_k_times_b() -> None:
    sae = make_sae("mutual_choice", k=3)
    sae.train()
    x = randn(40, 16)
    dense = sae.encode(x).to_dense()
    assert int((dense != 0).sum()) == 3 * 40
    acts = sae.pre_activations(sae.normalize(x)[0]).detach().relu()
    assert acts[dense != 0].min() >= acts[dense == 0].max()


def test_aux_zipf_weights_dead_one_overused_zero_underused_fractional() -> None:
    sae = make_sae("mutual_choice", d_sae=8, options={"zipf_alpha": 1.0, "zipf_beta": 0.0, "alive_priority": 1.0,
                                                      "target": "normalised"})
    density = torch.tensor([0.5, 0.3, 0.0, 0.05, 0.2, 0.0, 0.01, 0.1])
    sae.feature_density.copy_(density)
    dead = torch.zeros(8, dtype=torch.bool)
    dead[1] = True  # dense enough to be above its target, but flagged dead: weight 1 anyway
    mark_dead(sae, dead)
    weights = sae.underutilisation_weights().double()

    order = [0, 1, 4, 7, 3, 6, 2, 5]  # density ranks, ties by index
    harmonic = sum(1.0 / (r + 1) for r in range(8))
    target = torch.zeros(8, dtype=torch.float64)
    for rank, latent in enumerate(order):
        target[latent] = (1.0 / (rank + 1)) / harmonic * float(density.double().sum())
    expected = (1 - density.double() / target).clamp(0, 1)
    expected[1] = 1.0
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert weights[0] == 0.0  # above its Zipf target
    assert weights[1] == 1.0  # dead
    assert weights[2] == 1.0 and weights[5] == 1.0  # never fired
    assert 0 < weights[7] < 1 or 0 < weights[6] < 1  # a partly under-used latent
    # By default (alive_priority 0.1) dead latents outrank alive ones: only alive weights shrink.
    prioritised = make_sae("mutual_choice", d_sae=8, options={"zipf_alpha": 1.0, "zipf_beta": 0.0,
                                                              "target": "normalised"})
    prioritised.feature_density.copy_(density)
    mark_dead(prioritised, dead)
    scaled = expected * 0.1
    scaled[1] = 1.0
    torch.testing.assert_close(prioritised.underutilisation_weights().double(), scaled, rtol=1e-5, atol=1e-6)


def test_fitted_zipf_target_follows_the_head_and_flags_the_tail() -> None:
    ranks = torch.arange(64, dtype=torch.float64)
    zipf = 0.3 / (ranks + 1)
    torch.testing.assert_close(fitted_zipf(zipf), zipf)  # an exact Zipf law is its own fit
    uniform = torch.full((64,), 0.09, dtype=torch.float64)
    uniform[-8:] = 0.001  # a dying tail
    sae = make_sae("mutual_choice", d_sae=64)
    sae.feature_density.copy_(uniform)
    weights = sae.underutilisation_weights().double()
    # Flat densities fit a flat law: the head is at its target, only the tail is under-used
    # (the normalised 1/r profile would instead call the densest latents under-used).
    assert (weights[:56] == 0).all() and (weights[56:] > 0).all()
    normalised = make_sae("mutual_choice", d_sae=64, options={"target": "normalised"})
    normalised.feature_density.copy_(uniform)
    assert (normalised.underutilisation_weights()[:4] > 0).all()
    # A misspelt target used to train silently with the fitted law; the declaration refuses it now.
    for architecture in ("mutual_choice", "feature_choice"):
        with pytest.raises(ConfigError, match="target must be one of"):
            make_sae(architecture, d_sae=64, options={"target": "normalized"})


def test_aux_zipf_gives_dead_latents_the_first_slots() -> None:
    pre = torch.tensor([[5.0, 4.0, 0.2, 0.1, 3.0]])
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    priority = torch.tensor([False, False, True, True, False])
    chosen = []
    auxiliary_reconstruction_loss(pre, lambda i, known=None: chosen.append(i) or pre.gather(1, i), torch.ones(1, 3),
                                  torch.eye(5, 3), weights, k_aux=2, priority=priority)
    assert sorted(chosen[0][0].tolist()) == [2, 3]  # the dead pair, though alive ones have larger u
    auxiliary_reconstruction_loss(pre, lambda i, known=None: chosen.append(i) or pre.gather(1, i), torch.ones(1, 3),
                                  torch.eye(5, 3), weights, k_aux=3, priority=priority)
    assert sorted(chosen[1][0].tolist()) == [0, 2, 3]  # then the best alive candidate


def test_aux_zipf_equals_auxk_when_weights_are_the_dead_mask(monkeypatch) -> None:
    sae = make_sae("mutual_choice", d_sae=128, k=4, k_aux=5)
    with torch.no_grad():
        sae.b_dec.copy_(0.5 * randn(16, seed=8))
    x = randn(16, 16)
    dead = unfired(sae, x)
    assert dead.sum() >= 32
    sae.train()
    mark_dead(sae, dead)
    monkeypatch.setattr(type(sae), "underutilisation_weights", lambda self: self.dead_mask().float())
    out = sae.training_forward(x)
    assert "aux_zipf" in out.parts and "auxk" not in out.parts
    residual = out.x_n - out.x_hat_n
    auxk = sae.cfg.aux_coefficient * auxiliary_reconstruction_loss(
        out.pre_activations, out.gather_pre, residual, sae.W_dec, dead.float(), 5
    )
    torch.testing.assert_close(out.parts["aux_zipf"], auxk)
    expected = sae.cfg.aux_coefficient * reference_auxk(out.pre_activations, residual, sae.W_dec, dead.float(), 5)
    torch.testing.assert_close(out.parts["aux_zipf"].double(), expected, rtol=1e-4, atol=1e-7)
    assert out.parts["aux_zipf"] > 0


def test_aux_zipf_per_row_slots_rank_candidates_by_weight_times_u() -> None:
    sae = make_sae("mutual_choice", k=4, k_aux=6, options={"aux_slots": "per_row"})
    x = randn(48, 16)
    train_steps(sae, x, steps=2)
    sae.train()
    out = sae.training_forward(x)
    weights = sae.underutilisation_weights()
    expected = sae.cfg.aux_coefficient * reference_auxk(
        out.pre_activations, out.x_n - out.x_hat_n, sae.W_dec, weights, 6
    )
    torch.testing.assert_close(out.parts["aux_zipf"].double(), expected, rtol=1e-4, atol=1e-7)
    assert out.parts["aux_zipf"] > 0


def test_feature_density_is_bias_corrected_ema_of_fire_rates() -> None:
    sae = make_sae("mutual_choice", k=4, options={"density_beta": 0.5})
    x1, x2 = randn(32, 16, seed=1), randn(32, 16, seed=2)
    out1 = sae.training_forward(x1)
    rate1 = out1.codes.fire_counts().float() / 32
    torch.testing.assert_close(sae.feature_density, rate1)
    out2 = sae.training_forward(x2)
    rate2 = out2.codes.fire_counts().float() / 32
    # weights: 0.5 then 0.75; corrected mean = (0.5*0.5*r1 + 0.5*r2) / 0.75
    torch.testing.assert_close(sae.feature_density, (0.25 * rate1 + 0.5 * rate2) / 0.75)


# ------------------------------------------------------------------------------- Feature Choice
def test_feature_choice_uniform_capacity_per_column() -> None:
    sae = make_sae("feature_choice", d_sae=64, k=4)  # m = 4*32/64 = 2
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-1.5, 0.5, 64))  # some columns with fewer than m positives
    sae.train()
    x = randn(32, 16)
    assert int(sae.capacities(32)[0]) == 2
    acts = sae.pre_activations(sae.normalize(x)[0]).detach().relu()
    dense = sae.encode(x).to_dense()
    counts = (dense != 0).sum(0)
    positives = (acts > 0).sum(0)
    assert (counts <= 2).all()
    assert torch.equal(counts, positives.clamp(max=2))
    assert (positives < 2).any() and (positives >= 2).any()
    for j in range(64):  # the kept tokens are each column's largest
        kept, dropped = acts[dense[:, j] != 0, j], acts[dense[:, j] == 0, j]
        if kept.numel() and dropped.numel():
            assert kept.min() >= dropped.max()
    assert int((dense != 0).sum()) <= 4 * 32
    # a token may take any number of latents
    assert (dense != 0).sum(1).unique().numel() > 1


def test_feature_choice_zipf_capacities_sum_to_budget_and_follow_density_ranks() -> None:
    sae = make_sae("feature_choice", d_sae=64, k=4, options={"capacity": "zipf"})
    batch = 64
    caps = sae.capacities(batch)
    assert abs(int(caps.sum()) - 4 * batch) <= 0.1 * 4 * batch
    assert (caps >= 1).all() and (caps <= batch).all()
    assert (caps[:-1] >= caps[1:]).all() and caps[0] > caps[-1]  # no densities yet: latent order
    density = torch.rand(64, generator=torch.Generator().manual_seed(3))
    sae.feature_density.copy_(density)
    caps = sae.capacities(batch)
    by_density = caps[density.argsort(descending=True)]
    assert (by_density[:-1] >= by_density[1:]).all()
    assert caps[density.argmax()] == caps.max() and caps[density.argmin()] == caps.min()
    assert abs(int(caps.sum()) - 4 * batch) <= 0.1 * 4 * batch
    # the training rule honours the per-column capacities
    sae.train()
    with torch.no_grad():
        sae.b_enc.fill_(1.0)
    x = randn(batch, 16)
    positives = (sae.pre_activations(sae.normalize(x)[0]) > 0).sum(0)
    counts = column_counts(sae.encode(x))
    assert torch.equal(counts, torch.minimum(caps, positives))
    assert (counts == caps).float().mean() > 0.9  # nearly every column fills its capacity


def test_feature_choice_per_feature_thresholds() -> None:
    sae = make_sae("feature_choice", d_sae=64, k=4, options={"threshold_beta": 0.9})
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.5, 0.5, 64))
    sae.train()
    x = randn(32, 16)
    acts = sae.pre_activations(sae.normalize(x)[0]).detach().relu()
    sae.encode(x)
    m = int(sae.capacities(32)[0])
    expected = acts.topk(m, dim=0).values[m - 1].clamp_min(0)
    torch.testing.assert_close(sae.threshold, expected)  # first batch: taken as is
    assert sae.threshold.unique().numel() > 10  # one threshold per feature
    sae.eval()
    x_new = randn(16, 16, seed=5)
    acts_new = sae.pre_activations(sae.normalize(x_new)[0]).detach().relu()
    dense = sae.encode(x_new).to_dense()
    assert torch.equal(dense, acts_new * (acts_new > sae.threshold[None, :]))
    assert_same_row(sae, x_new, dense, 3)


# ------------------------------------------------------------------------------------- AbsTopK
def test_abstopk_token_selection_signed_and_magnitude_ranked() -> None:
    sae = make_sae("abstopk", k=5)
    pre = randn(24, 64, seed=11)
    codes = sae.select(pre, torch.zeros(24, 16))
    dense = codes.to_dense()
    assert codes.l0().tolist() == [5] * 24
    selected = dense != 0
    for b in range(24):
        assert pre[b][selected[b]].abs().min() >= pre[b][~selected[b]].abs().max()
    assert torch.equal(dense[selected], pre[selected])  # z = u on the support, no ReLU
    assert (codes.values < 0).any() and (codes.values > 0).any()
    # odd symmetry: u -> -u keeps the support and flips the values
    flipped = sae.select(-pre, torch.zeros(24, 16))
    assert torch.equal(flipped.indices.sort(1).values, codes.indices.sort(1).values)
    assert torch.equal(flipped.to_dense(), -dense)


def test_abstopk_odd_symmetry_through_encode() -> None:
    sae = make_sae("abstopk", k=4).eval()  # b_dec = b_enc = 0, no normalisation: u is linear in x
    x = randn(16, 16)
    assert torch.equal(sae.encode(-x).to_dense(), -sae.encode(x).to_dense())


def test_abstopk_batch_selection_and_threshold() -> None:
    sae = make_sae("abstopk", k=4, options={"selection": "batch"})
    x = randn(32, 16) * torch.linspace(0.2, 3.0, 32)[:, None]
    sae.train()
    codes = sae.encode(x)
    dense = codes.to_dense()
    pre = sae.pre_activations(sae.normalize(x)[0]).detach()
    selected = dense != 0
    assert int(selected.sum()) == 4 * 32
    assert codes.l0().unique().numel() > 1
    assert pre[selected].abs().min() >= pre[~selected].abs().max()
    assert torch.equal(dense[selected], pre[selected])
    assert (dense < 0).any()
    torch.testing.assert_close(sae.threshold, torch.full((64,), pre[selected].abs().min().item()))
    sae.eval()
    with torch.no_grad():
        sae.threshold.fill_(0.4)
    dense = sae.encode(x).to_dense()
    assert torch.equal(dense, pre * (pre.abs() > 0.4))
    assert_same_row(sae, x, dense, 5)


def test_abstopk_signed_auxk_uses_negative_values() -> None:
    sae = make_sae("abstopk", d_sae=128, k=4, k_aux=4)
    x = randn(16, 16)
    dead = unfired(sae, x)
    assert dead.sum() >= 32
    mark_dead(sae, dead)
    out = sae.training_forward(x)
    pre = out.pre_activations.detach()
    score = pre.abs().masked_fill(~dead, -1.0)
    chosen = pre.gather(1, score.topk(4, dim=1).indices)
    assert (chosen < 0).any()  # the aux code contains negative values
    residual = out.x_n - out.x_hat_n
    signed = sae.cfg.aux_coefficient * reference_auxk(pre, residual, sae.W_dec, dead.float(), 4, signed=True)
    unsigned = sae.cfg.aux_coefficient * reference_auxk(pre, residual, sae.W_dec, dead.float(), 4, signed=False)
    torch.testing.assert_close(out.parts["auxk"].double(), signed, rtol=1e-4, atol=1e-7)
    assert not torch.isclose(signed, unsigned, rtol=1e-3)
    # directly: only negative candidates, a signed aux estimate is not zero
    pre_neg = -torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) - 0.5
    W = torch.eye(6)
    target = pre_neg.clone()
    loss_signed = auxiliary_reconstruction_loss(pre_neg, lambda i, known=None: pre_neg.gather(1, i), target, W, torch.ones(6), 6, signed=True)
    loss_relu = auxiliary_reconstruction_loss(pre_neg, lambda i, known=None: pre_neg.gather(1, i), target, W, torch.ones(6), 6, signed=False)
    assert loss_signed.item() < 1e-10  # negative values reproduce a negative target exactly
    assert loss_relu.item() > 0.5  # ReLU'd aux values are all zero


# --------------------------------------------------------------------------------------- top-AFA
def test_afa_select_worked_example_from_methods_5_7() -> None:
    acts = torch.tensor([[5.0, 4.0, 3.0], [1.0, 1.0, 1.0], [1.0, 10.0, 2.0]])
    W_dec = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    target = (acts @ W_dec).norm(dim=1)
    torch.testing.assert_close(target, torch.tensor([54.41, 15.0, 67.80]), atol=0.01, rtol=0)
    indices, values, k = afa_select(acts, W_dec.norm(dim=1), target)
    assert k.tolist() == [2, 2, 2]
    kept = torch.zeros_like(acts).scatter_add(1, indices, values)
    assert torch.equal(kept, torch.tensor([[0.0, 4.0, 3.0], [0.0, 1.0, 1.0], [0.0, 10.0, 2.0]]))


def brute_force_afa(acts, norms, target):
    """Per row: try every prefix length j of the activations ranked by a_i*||W_dec,i||."""
    B, F = acts.shape
    kept = torch.zeros_like(acts)
    ks = []
    for b in range(B):
        contrib = (acts[b] * norms) ** 2
        order = sorted(range(F), key=lambda i: -float(contrib[i]))
        best_j, best_gap = None, None
        for j in range(1, F + 1):
            c = LAST_PREFIX_NORM if j == F else math.sqrt(sum(float(contrib[i]) for i in order[:j]))
            gap = abs(c - float(target[b]))
            if best_gap is None or gap < best_gap - 1e-9:
                best_j, best_gap = j, gap
        ks.append(best_j)
        for i in order[:best_j]:
            kept[b, i] = acts[b, i]
    return kept, ks


def test_afa_select_matches_brute_force_nearest_prefix() -> None:
    g = torch.Generator().manual_seed(4)
    acts = torch.randn(40, 12, generator=g).relu() * torch.rand(40, 12, generator=g) * 3
    norms = 0.5 + 1.5 * torch.rand(12, generator=g)
    full = ((acts * norms) ** 2).sum(1).sqrt()
    target = full * torch.rand(40, generator=g) * 1.2
    indices, values, k = afa_select(acts, norms, target)
    kept = torch.zeros_like(acts).scatter_add(1, indices, values)
    expected, ks = brute_force_afa(acts, norms, target)
    assert k.tolist() == ks
    torch.testing.assert_close(kept, expected)
    assert len(set(ks)) > 2  # k varies per token
    # the kept weighted norm is the prefix norm nearest the target
    kept_norm = ((kept * norms) ** 2).sum(1).sqrt()
    for b in range(40):
        contrib = ((acts[b] * norms) ** 2).sort(descending=True).values
        prefixes = contrib.cumsum(0).sqrt()[:-1]
        assert abs(kept_norm[b] - target[b]) <= (prefixes - target[b]).abs().min() + 1e-4


def test_afa_select_bounded_keeps_the_shortest_prefix_the_bound_allows() -> None:
    g = torch.Generator().manual_seed(5)
    acts = torch.randn(40, 12, generator=g).relu() * torch.rand(40, 12, generator=g) * 3
    norms = torch.ones(12)
    target = (acts**2).sum(1).sqrt() * (0.3 + torch.rand(40, generator=g))
    epsilon = 0.2
    _, _, k = afa_select(acts, norms, target, epsilon=epsilon)
    _, _, nearest = afa_select(acts, norms, target)
    for b in range(40):
        prefixes = (acts[b] ** 2).sort(descending=True).values.cumsum(0).sqrt().tolist()
        prefixes[-1] = LAST_PREFIX_NORM
        bound = [float(target[b]) / math.sqrt(1 + epsilon * j) for j in range(12)]
        expected = next(j + 1 for j in range(12) if prefixes[j] >= bound[j])
        assert int(k[b]) == expected
    # at most one latent past the paper's rule (which may stop just short of the target), often fewer
    assert (k <= nearest + 1).all() and (k < nearest).any()
    _, _, exact = afa_select(acts, norms, target, epsilon=0.0)
    first_crossing = [next(j + 1 for j in range(12) if ((acts[b] ** 2).sort(descending=True).values.cumsum(0).sqrt()
                                                         .tolist()[:11] + [LAST_PREFIX_NORM])[j] >= float(target[b]))
                      for b in range(40)]
    assert exact.tolist() == first_crossing  # ε = 0: the notebook's "first crossing" rule


def test_topafa_bounded_afa_loss_is_zero_inside_the_band() -> None:
    sae = make_sae("topafa", d_in=16, d_sae=64, options={"rule": "bounded"})
    assert sae.epsilon == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="rule"):
        make_sae("topafa", d_in=16, d_sae=64, options={"rule": "closest"})
    sae.train()
    out = sae.training_forward(randn(32, 16))
    norm, target = out.codes.values.norm(dim=1), sae.selection_target(out.x_n)
    spread = sae.epsilon * (out.codes.active.sum(1) - 1).double()
    inside = (norm.double() >= target.double() / (1 + spread).sqrt() - 1e-6)
    assert inside.all()  # the bounded rule's own selection lies at or above the band's floor
    losses = sae.auxiliary_losses(out, torch.tensor(16.0))
    high = target.double() / (1 - spread).clamp_min(1e-6).sqrt()
    outside = ((norm.double() - high).relu()).pow(2).mean() * sae.opts.afa_coefficient / (16.0 / 16)
    torch.testing.assert_close(losses["afa"].double(), outside, rtol=1e-4, atol=1e-8)


def test_topafa_select_targets_centred_input_norm_and_is_batch_independent() -> None:
    sae = make_sae("topafa", d_in=16, d_sae=64, options={"rule": "nearest"})  # the paper's rule, brute-forced below
    assert sae.cfg.normalize_activations == "layer_norm"
    with torch.no_grad():
        sae.b_dec.copy_(0.2 * randn(16, seed=3))
    x = randn(24, 16)
    x_n, _ = sae.normalize(x)
    pre = sae.pre_activations(x_n).detach()
    target = (x_n - sae.b_dec).norm(dim=1).detach()
    codes = sae.eval().encode(x)
    expected, _ = brute_force_afa(pre.relu(), sae.W_dec.detach().norm(dim=1), target)
    torch.testing.assert_close(codes.to_dense(), expected)
    assert_same_row(sae, x, codes.to_dense(), 4)
    sae.train()
    assert torch.equal(sae.encode(x).to_dense(), codes.to_dense())  # inference equals training


def test_topafa_encoder_bias_is_not_trained_and_afa_loss_present() -> None:
    sae = make_sae("topafa", d_in=16, d_sae=64, dead_tokens_threshold=32, options={"rule": "nearest"})
    assert "b_enc" not in dict(sae.named_parameters())
    assert all(p is not sae.b_enc for p in sae.trainable_parameters())
    x = randn(64, 16)
    out = sae.training_forward(x)
    assert out.parts["afa"] > 0
    gap = out.codes.values.norm(dim=1) - out.x_n.norm(dim=1)
    variance = (out.x_n - out.x_n.mean(0)).pow(2).sum(1).mean()
    torch.testing.assert_close(out.parts["afa"], (1 / 32) * gap.pow(2).mean() / (variance / 16))
    train_steps(sae, x, steps=4)
    assert sae.b_enc.grad is None
    assert torch.equal(sae.b_enc, torch.zeros(64))


# ------------------------------------------------------------------------------------------- GBA
def test_gba_bias_is_not_trained_and_output_is_jumprelu() -> None:
    sae = make_sae("gba", d_in=16, d_sae=32, options={"groups": 4})
    assert sae.cfg.normalize_activations == "unit_norm"
    assert "b_enc" not in dict(sae.named_parameters())
    assert all(p is not sae.b_enc for p in sae.trainable_parameters())
    with torch.no_grad():
        sae.b_enc.copy_(-0.3 * torch.rand(32, generator=torch.Generator().manual_seed(0)))
        sae.decoder_scale.copy_(torch.linspace(0.5, 2.0, 32))
    x = randn(40, 16)
    out = sae.training_forward(x)
    out.loss.backward()
    assert sae.b_enc.grad is None
    assert sae.decoder_scale.grad is not None and sae.W_dec.grad is not None
    # the bias only gates: active where y0 + b > 0, value a_m * y0 (not y0 + b)
    x_n, _ = sae.normalize(x)
    y0 = ((x_n - sae.b_dec) @ sae.W_dec.T).detach()
    gate = (y0 + sae.b_enc) > 0
    expected = y0 * gate * sae.decoder_scale.detach()
    sae.eval()
    torch.testing.assert_close(sae.encode(x).to_dense(), expected)
    assert ((y0 > 0) & ~gate).any()  # some positive y0 gated off by the bias


def test_gba_group_targets_are_geometric_from_high_to_low() -> None:
    sae = make_sae("gba", d_in=8, d_sae=16, options={"groups": 4, "high_frequency": 0.1, "low_frequency": 0.0001})
    targets = sae.group_targets()
    assert targets.shape == (16,)
    per_group = targets.view(4, 4)  # contiguous groups of 4 neurons
    assert (per_group == per_group[:, :1]).all()
    values = per_group[:, 0]
    torch.testing.assert_close(values, torch.tensor([0.1, 0.01, 0.001, 0.0001], dtype=torch.float64))
    single = make_sae("gba", d_in=8, d_sae=16, options={"groups": 1}).group_targets()
    assert torch.all(single == 0.1)


@pytest.mark.parametrize("bias_ceiling,raised_past_zero", [("zero", 0.0), ("data_scale", -0.05 + 0.1 * 2.25)])
def test_gba_adaptation_hand_made_buffer(bias_ceiling: str, raised_past_zero: float) -> None:
    opts = {"groups": 2, "high_frequency": 0.1, "low_frequency": 0.001, "gamma_up": 0.1, "gamma_down": 0.05,
            "bias_ceiling": bias_ceiling}
    sae = make_sae("gba", d_in=4, d_sae=8, options=opts)
    # group 0 = neurons 0-3 (target 0.1), group 1 = neurons 4-7 (target 0.001); 1000 tokens seen
    sae.b_enc.copy_(torch.tensor([-0.3, -0.95, -0.5, -0.2, -0.05, -0.4, 0.0, -0.9]))
    sae.active_count.copy_(torch.tensor([500.0, 300.0, 0.0, 50.0, 0.0, 0.5, 2.0, 0.0], dtype=torch.float64))
    sae.peak_pre_activation.copy_(torch.tensor([2.0, 3.0, 0.0, 1.0, 0.0, 4.0, 0.5, 0.0]))
    sae.tokens_observed.fill_(1000)
    sae.adapt_biases()
    expected = torch.tensor(
        [
            -0.3 - 0.05 * 2.0,  # over-active: down by gamma_down * r_m
            -1.0,  # over-active, clamped at -1 (-0.95 - 0.15)
            -0.5 + 0.1 * 2.0,  # dead: up by gamma_up * mean r of group 0's firing neurons (2, 3, 1)
            -0.2,  # in range: unchanged
            raised_past_zero,  # dead, -0.05 + 0.1 * 2.25: the paper clamps it at 0, the ceiling R = 1 does not
            -0.4,  # frequency 5e-4: below target, above dead_frequency: unchanged
            0.0 - 0.05 * 0.5,  # over-active (2e-3 > 1e-3)
            -0.9 + 0.1 * 2.25,  # dead: group 1's firing neurons have r = 4, 0.5
        ]
    )
    torch.testing.assert_close(sae.b_enc, expected)
    assert sae.active_count.sum() == 0 and sae.peak_pre_activation.sum() == 0 and sae.tokens_observed == 0


def test_gba_step_multiplier_stops_where_the_step_is_capped() -> None:
    """A neuron that keeps moving down must not grow its multiplier past max_step / γ (it reached
    10^170 in a 3000-step run): the first reversal then halves its step."""
    opts = {"groups": 1, "adapt_every": 1, "gamma_up": 0.01, "gamma_down": 0.01, "max_step": 0.5}
    sae = make_sae("gba", d_in=4, d_sae=2, options=opts)
    for _ in range(30):  # over-active every time: 50 firings in 100 tokens against a target of 0.1
        sae.active_count.fill_(50.0)
        sae.peak_pre_activation.fill_(1.0)
        sae.tokens_observed.fill_(100)
        sae.adapt_biases()
    assert torch.equal(sae.step_scale, torch.full_like(sae.step_scale, 50.0))
    sae.tokens_observed.fill_(100)  # silent over the next window: raised, a reversal
    sae.adapt_biases()
    assert torch.equal(sae.step_scale, torch.full_like(sae.step_scale, 25.0))


def test_gba_statistics_and_adaptation_schedule() -> None:
    sae = make_sae("gba", d_in=16, d_sae=32, options={"groups": 4, "adapt_every": 3})
    x = randn(50, 16)
    sae.train()
    codes = sae.encode(x)
    pre = sae.pre_activations(sae.normalize(x)[0]).detach()
    assert torch.equal(sae.active_count, (pre > 0).sum(0).double())
    torch.testing.assert_close(sae.peak_pre_activation, pre.max(0).values.clamp_min(0))
    assert sae.tokens_observed == 50
    assert torch.equal(column_counts(codes).double(), sae.active_count)
    before = sae.b_enc.clone()
    sae.after_optimizer_step()
    sae.after_optimizer_step()
    assert torch.equal(sae.b_enc, before) and sae.tokens_observed == 50
    sae.after_optimizer_step()  # third step: adaptation (every neuron fires far above its target)
    assert sae.tokens_observed == 0
    assert (sae.b_enc < before).all()


@pytest.mark.parametrize("bias_ceiling,ceiling", [("zero", 0.0), ("data_scale", 1.0)])
def test_gba_biases_stay_in_range_over_many_adaptations(bias_ceiling: str, ceiling: float) -> None:
    # The paper's rule (constant steps, raise dead neurons only); large steps reach both clamps. Without
    # init_from_data the floor is −1, so the data-scale ceiling is +1 and "zero" is the paper's [−1, 0].
    opts = {"groups": 4, "adapt_every": 1, "gamma_up": 5.0, "gamma_down": 1.5, "step_growth": 1.0, "raise_below": 0.0,
            "max_step": 10.0, "bias_ceiling": bias_ceiling}
    sae = make_sae("gba", d_in=16, d_sae=32, options=opts)
    g = torch.Generator().manual_seed(123)
    optimizer = torch.optim.Adam(sae.trainable_parameters(), lr=1e-2)
    hit_floor, hit_ceiling, rose = False, False, False
    for _ in range(40):
        x = torch.randn(64, 16, generator=g)
        out = sae.training_forward(x)
        optimizer.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        previous = sae.b_enc.clone()
        sae.after_optimizer_step()
        assert sae.b_enc.min() >= -1.0 and sae.b_enc.max() <= ceiling
        hit_floor |= bool((sae.b_enc == -1.0).any())
        rose |= bool((sae.b_enc > previous).any())
        hit_ceiling |= bool(((previous < ceiling) & (sae.b_enc == ceiling)).any())
    assert hit_floor and hit_ceiling and rose  # both clamps were exercised


def test_gba_tied_has_no_encoder_parameter_but_saves_w_enc(tmp_path) -> None:
    from safetensors.torch import load_file

    tied = make_sae("gba", d_in=16, d_sae=32, options={"groups": 4, "adapt_every": 1})
    assert "W_enc" not in dict(tied.named_parameters())
    assert "W_enc" not in tied.state_dict()
    x = randn(40, 16)
    train_steps(tied, x, steps=3)
    tied.eval()
    tied.save(tmp_path / "tied")
    tensors = load_file(str(tmp_path / "tied" / WEIGHTS_FILE))
    assert torch.equal(tensors["W_enc"], tied.W_dec.detach().T)
    loaded = load_sae(tmp_path / "tied")
    assert loaded.opts.tied
    assert torch.equal(loaded(x), tied(x))
    untied = make_sae("gba", d_in=16, d_sae=32, options={"groups": 4, "tied": False})
    assert "W_enc" in dict(untied.named_parameters())
    assert not hasattr(untied, "decoder_scale")


# ------------------------------------------------------------------------------------------ ReLU
def test_relu_codes_and_l1_scaling() -> None:
    sae = make_sae("relu", options={"target_l0": 0})  # fixed λ: the controller would move it
    with torch.no_grad():  # non-unit decoder rows: the penalty weighs each code by its row norm
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 64)[:, None])
    x = randn(32, 16)
    pre = sae.pre_activations(sae.normalize(x)[0]).detach()
    assert torch.equal(sae.encode(x).to_dense(), pre.relu())
    out1 = sae.training_forward(x, input_variance=4.0)
    expected = 0.1 * (pre.relu() * sae.W_dec.detach().norm(dim=1)).sum(1).mean() / 2.0
    torch.testing.assert_close(out1.parts["l1"], expected)
    assert out1.parts["l1"] > 0
    sae3 = make_sae("relu", options={"l1_coefficient": 0.3, "target_l0": 0})
    sae3.load_state_dict(sae.state_dict())
    out3 = sae3.training_forward(x, input_variance=4.0)
    torch.testing.assert_close(out3.parts["l1"], 3 * out1.parts["l1"])
    torch.testing.assert_close(out3.parts["reconstruction"], out1.parts["reconstruction"])


# -------------------------------------------------------------------------------- save / load
ROUND_TRIP_CASES = [
    ("topk", {}),
    ("batchtopk", {}),
    ("abstopk", {}),
    ("abstopk", {"selection": "batch"}),
    ("feature_choice", {}),
    ("feature_choice", {"capacity": "zipf"}),
    ("mutual_choice", {}),
    ("topafa", {}),
    ("gba", {"groups": 4, "adapt_every": 1}),
    ("gba", {"groups": 4, "adapt_every": 1, "tied": False}),
    ("relu", {}),
]


@pytest.mark.parametrize("normalization", ["none", "unit_norm", "layer_norm"])
@pytest.mark.parametrize("architecture, options", ROUND_TRIP_CASES, ids=lambda v: str(v))
def test_save_load_round_trip_is_exact(tmp_path, architecture, options, normalization) -> None:
    sae = make_sae(
        architecture, d_in=16, d_sae=48, k=4, options=dict(options), normalize_activations=normalization,
        dead_tokens_threshold=64, metadata={"model_name": "toy", "hook_name": "blocks.0.hook_resid_post"},
    )
    x = randn(64, 16) * 2 + 1
    train_steps(sae, x, steps=3)
    sae.eval()
    sae.save(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae)
    assert not loaded.training
    assert loaded.config_dict() == sae.config_dict()
    assert loaded.cfg.normalize_activations == normalization
    original, again = sae.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys()
    for name in original:
        assert torch.equal(original[name], again[name]), name
    x_new = randn(20, 16, seed=7) * 2 + 1
    assert torch.equal(loaded(x_new), sae(x_new))
    assert torch.equal(loaded.encode(x_new).to_dense(), sae.encode(x_new).to_dense())
    if architecture in THRESHOLD_ARCHITECTURES and not (architecture == "abstopk" and not options):
        assert sae.threshold.abs().sum() > 0  # training moved the state that is being round-tripped
    if architecture == "gba":
        assert sae.b_enc.abs().sum() > 0


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
def test_saved_files_follow_saelens_layout(tmp_path, architecture) -> None:
    from safetensors.torch import load_file

    sae = make_sae(architecture, d_in=16, d_sae=48, k=4, metadata={"model_name": "toy"})
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    for key in ("d_in", "d_sae", "architecture", "k", "normalize_activations", "metadata"):
        assert key in cfg, key
    assert (cfg["d_in"], cfg["d_sae"], cfg["architecture"], cfg["k"]) == (16, 48, architecture, 4)
    assert cfg["metadata"] == {"model_name": "toy"}
    assert cfg["normalize_activations"] in NORMALIZATIONS
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    assert tensors["W_enc"].shape == (16, 48)
    assert tensors["W_dec"].shape == (48, 16)
    assert tensors["b_enc"].shape == (48,)
    assert tensors["b_dec"].shape == (16,)
    if architecture in THRESHOLD_ARCHITECTURES:
        assert tensors["threshold"].shape == (48,)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def _saved(tmp_path, name="sae"):
    sae = make_sae("batchtopk", d_in=16, d_sae=48)
    return sae.save(tmp_path / name)


def test_load_missing_files_name_the_file(tmp_path) -> None:
    folder = _saved(tmp_path)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_sae(folder)
    folder = _saved(tmp_path, "other")
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_sae(folder)
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "text",
    [
        '{"d_in": 16,',  # truncated
        "not json",
        "[1, 2, 3]",  # valid JSON, not an object
        '"a string"',
        '{"d_sae": 48}',  # missing keys
        '{"d_in": 16, "d_sae": 48, "architecture": "nope"}',
        '{"d_in": "16", "d_sae": 48, "architecture": "topk"}',
    ],
)
def test_load_bad_config_names_the_file(tmp_path, text) -> None:
    folder = _saved(tmp_path)
    (folder / CONFIG_FILE).write_text(text)
    with pytest.raises(ConfigError, match=CONFIG_FILE):
        load_sae(folder)


def test_load_truncated_weights_names_the_file(tmp_path) -> None:
    folder = _saved(tmp_path)
    data = (folder / WEIGHTS_FILE).read_bytes()
    for size in (len(data) // 2, 6):
        (folder / WEIGHTS_FILE).write_bytes(data[:size])
        with pytest.raises(ValueError, match=WEIGHTS_FILE):
            load_sae(folder)


def test_load_wrong_shapes_or_missing_tensor_names_the_file(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path)
    small = make_sae("batchtopk", d_in=16, d_sae=32).save(tmp_path / "small")
    (folder / WEIGHTS_FILE).write_bytes((small / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match=WEIGHTS_FILE) as info:
        load_sae(folder)
    assert "shape" in str(info.value)
    tensors = load_file(str(small / WEIGHTS_FILE))
    del tensors["threshold"]
    save_file(tensors, str(small / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="threshold"):
        load_sae(small)


# ----------------------------------------------------------------------------- normalisation
def perfect_topk(d_in: int, normalization: str):
    """TopK SAE with W_dec = [I; -I] and k = d_in: reconstructs any normalised input exactly."""
    sae = make_sae("topk", d_in=d_in, d_sae=2 * d_in, k=d_in, normalize_activations=normalization)
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae.eval()


@pytest.mark.parametrize("normalization", ["none", "unit_norm", "layer_norm"])
def test_forward_undoes_normalisation(normalization) -> None:
    sae = perfect_topk(12, normalization)
    x = randn(10, 12) * 5 + 3
    x_n, norm = sae.normalize(x)
    if normalization == "unit_norm":
        torch.testing.assert_close(x_n.norm(dim=1), torch.ones(10))
    if normalization == "layer_norm":
        torch.testing.assert_close(x_n.mean(1), torch.zeros(10), atol=1e-5, rtol=0)
        torch.testing.assert_close(x_n.std(1, unbiased=False), torch.ones(10), atol=1e-4, rtol=0)
    if normalization != "none":
        assert not torch.allclose(x_n, x, atol=1e-2)
    torch.testing.assert_close(sae(x), x, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x), norm), x, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sae.decode_normalized(sae.encode(x)), x_n, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalization", ["unit_norm", "layer_norm"])
def test_decode_equals_undo_of_normalised_reconstruction(normalization) -> None:
    sae = make_sae("topk", k=4, normalize_activations=normalization).eval()
    with torch.no_grad():
        sae.b_dec.copy_(randn(16, seed=2))
    x = randn(20, 16) * 4 + 2
    x_n, norm = sae.normalize(x)
    codes = sae.encode(x)
    x_hat_n = sae.decode_normalized(codes)
    assert isinstance(norm, Normalization)
    expected = x_hat_n * norm.scale + norm.shift
    torch.testing.assert_close(sae.decode(codes, norm), expected)
    torch.testing.assert_close(sae(x), expected)
    assert not torch.allclose(expected, x_hat_n, atol=1e-2)
    with pytest.raises(ValueError, match="Normalization"):
        sae.decode(codes)


def test_decode_without_normalisation_allowed_when_none() -> None:
    sae = make_sae("topk", k=4, normalize_activations="none").eval()
    x = randn(8, 16)
    torch.testing.assert_close(sae.decode(sae.encode(x)), sae(x))


def test_wrong_input_shape_is_rejected() -> None:
    sae = make_sae("topk")
    with pytest.raises(ValueError, match="16"):
        sae.encode(torch.zeros(4, 15))
    with pytest.raises(ValueError):
        sae.encode(torch.zeros(16))


# ------------------------------------------------------------------------- geometric median
def _sum_of_distances(points: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return torch.cdist(candidates.double(), points.double()).sum(1)


def test_geometric_median_matches_brute_force_minimiser() -> None:
    points = torch.tensor([[0.0, 0.0], [4.0, 0.0], [1.0, 3.0], [5.0, 5.0], [-2.0, 1.0], [0.5, -1.5], [3.0, 2.0]])
    median = geometric_median(points)
    # coarse grid, then a fine grid around its best point
    best = None
    for span, lo, hi in ((0.02, -3.0, 6.0), (0.0005, None, None)):
        if best is None:
            axis_x = axis_y = torch.arange(lo, hi, span, dtype=torch.float64)
        else:
            axis_x = torch.arange(best[0] - 0.05, best[0] + 0.05, span, dtype=torch.float64)
            axis_y = torch.arange(best[1] - 0.05, best[1] + 0.05, span, dtype=torch.float64)
        grid = torch.cartesian_prod(axis_x, axis_y)
        best = grid[_sum_of_distances(points, grid).argmin()]
    assert (median.double() - best).norm() < 5e-3
    assert _sum_of_distances(points, median[None])[0] <= _sum_of_distances(points, best[None])[0] + 1e-5
    mean = points.mean(0)
    assert _sum_of_distances(points, mean[None])[0] > _sum_of_distances(points, median[None])[0] + 1e-3


def test_geometric_median_is_robust_to_an_outlier() -> None:
    cluster = 0.1 * randn(30, 8, seed=3)
    points = torch.cat([cluster, torch.full((1, 8), 1000.0)])
    median = geometric_median(points)
    assert median.norm() < 0.5
    assert points.mean(0).norm() > 50  # the mean is dragged away


def test_init_from_data_sets_b_dec_to_median_in_normalised_space() -> None:
    sae = make_sae("topk", normalize_activations="unit_norm")
    sample = randn(200, 16) * 3 + 1
    sae.init_from_data(sample)
    x_n, _ = sae.normalize(sample)
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(x_n))
    assert not torch.allclose(sae.b_dec.detach(), x_n.mean(0), atol=1e-4)


# ----------------------------------------------------------------------------- config errors
def test_unknown_architecture_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        create_sae(SAEConfig(d_in=8, d_sae=16, architecture="no_such_architecture"))
    for name in ALL_ARCHITECTURES:
        assert name in str(info.value)
    assert set(ALL_ARCHITECTURES) <= set(ARCHITECTURES)


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
def test_unknown_option_lists_the_valid_ones(architecture) -> None:
    with pytest.raises(ConfigError) as info:
        make_sae(architecture, options={"no_such_option": 1})
    message = str(info.value)
    assert "no_such_option" in message
    for field in dataclasses.fields(ARCHITECTURES[architecture].Options):
        assert field.name in message


@pytest.mark.parametrize(
    "architecture, options, choices",
    [
        ("abstopk", {"selection": "rows"}, ["token", "batch"]),
        ("feature_choice", {"capacity": "pareto"}, ["uniform", "zipf"]),
        ("gba", {"tied": "maybe"}, ["bool"]),
        ("batchtopk", {"threshold_beta": "high"}, ["float"]),
        ("gba", {"groups": 0}, ["groups"]),
        ("gba", {"groups": 65}, ["groups"]),
        ("gba", {"low_frequency": 0.5, "high_frequency": 0.1}, ["low_frequency"]),
    ],
)
def test_bad_option_value_raises_config_error(architecture, options, choices) -> None:
    with pytest.raises(ConfigError) as info:
        make_sae(architecture, options=options)
    for choice in choices:
        assert choice in str(info.value)


def test_bad_normalisation_and_string_options_are_coerced() -> None:
    with pytest.raises(ConfigError) as info:
        SAEConfig(d_in=8, d_sae=16, normalize_activations="batch_norm")
    for choice in ("none", "unit_norm", "layer_norm"):
        assert choice in str(info.value)
    # CLI-style strings are converted to the option's type
    sae = make_sae("gba", d_in=8, d_sae=16, options={"tied": "false", "groups": "4", "gamma_up": "0.5"})
    assert sae.opts.tied is False and sae.opts.groups == 4 and sae.opts.gamma_up == 0.5


def test_architecture_class_rejects_other_configs() -> None:
    with pytest.raises(ConfigError):
        ARCHITECTURES["topk"](SAEConfig(d_in=8, d_sae=16, architecture="relu"))


# ------------------------------------------------------------------ sparse kernels vs dense autograd
SPARSE_PATH_CASES = [(a, {}) for a in ALL_ARCHITECTURES if a != "relu"] + [
    ("abstopk", {"selection": "batch"}),
    ("feature_choice", {"capacity": "zipf"}),
    ("gba", {"tied": False, "high_frequency": 0.5}),
]


@pytest.mark.parametrize("architecture, options", SPARSE_PATH_CASES, ids=lambda v: str(v))
def test_sparse_training_path_equals_dense_autograd(architecture, options):
    """Three optimisation steps through the sparse kernels and through dense autograd give the same
    losses (AuxK included: a third of the latents are marked dead), gradients, codes and state."""
    x = randn(48, 16, seed=4) * 2
    runs = []
    for sparse in (True, False):
        sae = make_sae(architecture, d_sae=256, k=4, k_aux=8, options=dict(options), normalize_activations="layer_norm")
        sae.sparse_training = sparse
        mark_dead(sae, torch.arange(256) % 3 == 0)
        record = []
        optimizer = torch.optim.Adam(sae.trainable_parameters(), lr=1e-2)
        for step in range(3):
            out = sae.training_forward(x.roll(step * 5, dims=0))
            optimizer.zero_grad()
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
            record.append((dict(out.parts), out.codes.to_dense().detach(), grads))
            sae.before_optimizer_step()
            optimizer.step()
            sae.after_optimizer_step()
        runs.append((record, sae.state_dict()))
    (sparse_record, sparse_state), (dense_record, dense_state) = runs
    assert any("aux" in name for name in sparse_record[0][0]) or architecture == "gba"
    for (s_parts, s_codes, s_grads), (d_parts, d_codes, d_grads) in zip(sparse_record, dense_record):
        assert s_parts.keys() == d_parts.keys()
        for name in s_parts:
            torch.testing.assert_close(s_parts[name], d_parts[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s_codes, d_codes, rtol=1e-4, atol=1e-5)
        assert s_grads.keys() == d_grads.keys() and s_grads
        for name in s_grads:
            torch.testing.assert_close(s_grads[name], d_grads[name], rtol=1e-3, atol=1e-5)
    for name in dense_state:
        torch.testing.assert_close(sparse_state[name], dense_state[name], rtol=1e-3, atol=1e-5)


def test_aux_zipf_deficit_slots_give_dying_latents_their_shortfall_of_tokens() -> None:
    sae = make_sae("mutual_choice", d_sae=8, k=2, options={"aux_slots": "deficit"})
    density = torch.tensor([0.5, 0.3, 0.2, 0.1, 0.05, 0.04, 0.0, 0.0])
    sae.feature_density.copy_(density)
    floor = float(sae.tail_density(density.double()))  # Σρ · p(7) for the 1/r law
    pre = torch.arange(32 * 8, dtype=torch.float32).reshape(32, 8)
    indices, mask = sae.deficit_slots(pre)
    per_latent = torch.zeros(8, dtype=torch.int64).index_add_(0, indices[mask], torch.ones(int(mask.sum()), dtype=torch.int64))
    dying = density.double() < floor
    expected = torch.where(dying, ((floor - density.double()) * 32).ceil().clamp(1, 32), 0).to(torch.int64)
    assert dying.sum() >= 2 and torch.equal(per_latent, expected)
    # each dying latent takes its largest-u tokens (here the last rows)
    rows = mask.nonzero(as_tuple=True)[0]
    assert int(rows.min()) >= 32 - int(expected.max())


@pytest.mark.parametrize("lift, sign, expected", [("all", 1.0, 0.25 / 2), ("helps", 1.0, 0.25), ("helps", -1.0, 0.0)])
def test_lift_dying_pulls_u_up_to_the_threshold_where_a_fire_would_lower_the_residual(lift, sign, expected) -> None:
    """Slot 0 (u = 0.5) sits below θ = 1, slot 1 (u = 2) above it; the residual lies along latent 0's
    decoder row (sign 1: a fire at θ lowers the error, -1: it raises it)."""
    sae = make_sae("mutual_choice", d_in=4, d_sae=4, k=1, options={"lift_dying": lift})
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(4))
        sae.threshold.fill_(1.0)
    pre = torch.tensor([[0.5, 2.0]], requires_grad=True)
    indices = torch.tensor([[0, 1]])
    residual = sign * sae.W_dec[0:1].detach()
    loss = sae.lift_loss(pre, indices, torch.ones_like(indices, dtype=torch.bool), residual)
    assert loss.item() == pytest.approx(expected)
    if expected:
        loss.backward()
        assert float(pre.grad[0, 0]) < 0 and float(pre.grad[0, 1]) == 0  # descent raises the low u only

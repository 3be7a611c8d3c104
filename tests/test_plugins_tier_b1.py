"""Mechanism tests of the Tier B plugins (first half): each asserts the property the plugin's paper
adaptation claims, on a constructed case."""
from __future__ import annotations

import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sae_kit.plugins.api import Batch, StepContext
from test_plugins_tier_a import BATCH, D_IN, D_SAE, drive, resume_matches_an_uninterrupted_run, tiny_trainer


# -------------------------------------------------------------------------------------------- ema
def test_ema_shadow_equals_averaged_model_and_the_hand_computed_ema(tmp_path):
    steps, decay = 12, 0.8
    trainer, source = tiny_trainer(tmp_path, steps, [f"ema:decay={decay},start=0.25"])
    plugin = trainer.plugins.plugins[0]
    reference = AveragedModel(trainer.sae, multi_avg_fn=get_ema_multi_avg_fn(decay))
    expected = None

    def record(trainer, _):
        nonlocal expected
        if trainer.step - 1 < steps // 4:  # outside the window: no update
            assert int(plugin.shadow.n_averaged) == 0
            return
        reference.update_parameters(trainer.sae)
        current = trainer.sae.W_dec.detach().clone()
        expected = current if expected is None else decay * expected + (1 - decay) * current

    drive(trainer, source, steps, record)
    assert int(plugin.shadow.n_averaged) == steps - steps // 4
    for (name, mine), (_, theirs) in zip(plugin.shadow.module.named_parameters(), reference.module.named_parameters()):
        assert torch.equal(mine, theirs), name
    assert torch.allclose(plugin.shadow.module.W_dec, expected, atol=1e-6)
    assert not torch.allclose(plugin.shadow.module.W_dec, trainer.sae.W_dec, atol=1e-4)  # it lags the live SAE
    # Export: the shadow's parameters with unit-norm decoder rows.
    final = plugin.posthoc(trainer.sae, trainer)
    assert torch.allclose(final.W_enc, reference.module.W_enc)
    assert torch.allclose(final.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6)
    assert torch.allclose(final.W_dec, reference.module.W_dec / reference.module.W_dec.norm(dim=1, keepdim=True))


# ------------------------------------------------------------------------------------- compander
def test_compander_function_is_odd_bounded_and_expands_small_weights():
    from sae_kit.plugins.compander import CompanderShape

    shape = CompanderShape(alpha=3.0, beta=0.5, learnable=True)
    w = torch.linspace(-10, 10, 2001)
    f = shape(w)
    assert torch.allclose(shape(-w), -f) and f.abs().max() <= 0.5 + 1e-6  # odd, bounded by β (saturates in float32)
    small = torch.tensor([1e-4])
    assert torch.allclose(shape(small) / small, torch.tensor(3.0), rtol=1e-4)  # slope α at 0
    assert torch.allclose(shape(shape.inverse(f[900:1100])), f[900:1100], atol=1e-5)
    # Gradient through the compander: amplified near 0, suppressed in saturation.
    w = torch.tensor([1e-3, 5.0], requires_grad=True)
    shape(w).sum().backward()
    assert w.grad[0] > 2.9 and w.grad[1] < 1e-3


def test_compander_parametrises_the_encoder_trains_its_shape_and_bakes(tmp_path):
    steps = 20
    trainer, source = tiny_trainer(tmp_path, steps, ["compander:alpha=2,bound=1.5"])
    plugin = trainer.plugins.plugins[0]
    shape = plugin.modules["shape"]
    beta0 = shape.log_beta.exp().item()
    initial = trainer.sae.W_enc.detach().clone()
    assert torch.allclose(initial, trainer.sae.W_dec.T, atol=1e-5)  # the companded init is the tied init
    groups = {g.get("plugin"): g for g in trainer.optimizer.param_groups}
    assert shape.log_alpha in groups["compander"]["params"]

    def check(trainer, _):
        beta = shape.log_beta.exp().item()
        assert trainer.sae.W_enc.abs().max() <= beta * (1 + 1e-6)  # magnitude restricted by the current β
        free = trainer.sae.parametrizations.W_enc.original
        assert torch.allclose(trainer.sae.W_enc, beta * torch.tanh(shape.log_alpha.exp() * free / beta), atol=1e-6)

    drive(trainer, source, steps, check)
    assert shape.log_beta.exp().item() != beta0  # the shape is learned
    final = trainer.finish()
    from torch.nn.utils import parametrize

    assert not parametrize.is_parametrized(final)
    assert final.W_enc.abs().max() <= shape.log_beta.exp().item() * (1 + 1e-6)


# ------------------------------------------------------------------------------------ hard_tokens
def test_hard_tokens_ranking_loss_teaches_the_predictor_the_loss_order():
    from scipy.stats import spearmanr

    from sae_kit.plugins.hard_tokens import pairwise_ranking_loss

    torch.manual_seed(0)
    direction = torch.randn(D_IN)
    predictor = torch.nn.Sequential(torch.nn.Linear(D_IN, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.Adam(predictor.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(150):  # "loss" = squared projection on a hidden direction: only its order is taught
        x = torch.randn(256, D_IN)
        loss = pairwise_ranking_loss(predictor(x).squeeze(1), (x @ direction).pow(2), 256, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = torch.randn(1024, D_IN)
    rho = spearmanr(predictor(x).squeeze(1).detach().numpy(), (x @ direction).pow(2).numpy()).statistic
    assert rho > 0.8


def test_hard_tokens_selects_the_predicted_hardest_share_and_never_outliers(tmp_path):
    from sae_kit.plugins.hard_tokens import select_hard

    predicted = torch.arange(20, dtype=torch.float32)
    eligible = torch.ones(20, dtype=torch.bool)
    eligible[19] = False  # the top-scored token is an outlier
    rows = select_hard(predicted, keep=8, hard=3, generator=torch.Generator().manual_seed(0), eligible=eligible)
    assert rows.numel() == 8 and rows.unique().numel() == 8
    assert rows[:3].tolist() == [18, 17, 16]

    steps = 10
    trainer, source = tiny_trainer(tmp_path, steps, ["hard_tokens:hardness=0.5"])
    plugin = trainer.plugins.plugins[0]
    candidates = next(source.iter_batches(2 * BATCH, seed=3))
    trainer.step = steps  # the end of the ramp: half of the batch is the predicted-hardest
    kept = plugin.transform_batch(Batch(candidates.clone()), trainer).x
    assert kept.shape == (BATCH, D_IN)
    with torch.no_grad():
        scores = plugin.predict(candidates)
    hardest = candidates[scores.topk(BATCH // 2).indices]
    assert all(bool((row == kept).all(1).any()) for row in hardest)
    trainer.step = 0
    assert plugin.share(0) == 0.0


def test_hard_tokens_weight_mode_up_weights_predicted_hard_tokens(tmp_path):
    trainer, source = tiny_trainer(tmp_path, 10, ["hard_tokens:mode=weight,hardness=1.0"])
    plugin = trainer.plugins.plugins[0]
    assert trainer.plugins.oversample == 1
    trainer.step = 10
    x = next(source.iter_batches(BATCH, seed=3))
    weight = plugin.transform_batch(Batch(x), trainer).weight
    with torch.no_grad():
        order = plugin.predict(x).argsort()
    assert weight.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(weight[order].diff() >= -1e-6) and weight.max() / weight.min() == pytest.approx(2.0, rel=1e-3)


# ----------------------------------------------------------------------------------- rand_augment
def test_rand_augment_draws_n_distinct_operations_per_token():
    from sae_kit.plugins.rand_augment import OPERATIONS, draw_operations

    chosen = draw_operations(4000, 2, torch.Generator().manual_seed(0))
    assert torch.all(chosen.sum(1) == 2)
    frequency = chosen.float().mean(0)  # uniform: each operation on 2/5 of the tokens
    assert torch.allclose(frequency, torch.full((len(OPERATIONS),), 0.4), atol=0.03)


def test_rand_augment_operations_at_their_stated_magnitude():
    from sae_kit.plugins.rand_augment import OPERATIONS, augment

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, D_IN, generator=generator) + 1.0
    directions = torch.nn.functional.normalize(torch.randn(3, D_IN, generator=generator), dim=1)

    def only(op):
        chosen = torch.zeros(x.shape[0], len(OPERATIONS), dtype=torch.bool)
        chosen[:, OPERATIONS.index(op)] = True
        return augment(x, chosen, 1.0, torch.Generator().manual_seed(1), directions, 2.0)

    out, target = only("scale")
    ratio = out.norm(dim=1) / x.norm(dim=1)
    assert torch.equal(out, target) and ratio.min() >= 0.8 - 1e-5 and ratio.max() <= 1.2 + 1e-5 and ratio.std() > 0.05
    out, _ = only("dropout")
    assert (out == 0).float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert torch.allclose(out[out != 0], (x / 0.9)[out != 0])
    out, _ = only("mix")
    partner = (out - 0.8 * x) / 0.2  # every mixed token is 0.8·itself + 0.2·another token
    assert all(bool(((row - x).abs().max(1).values < 1e-4).any()) for row in partner[:50])
    out, _ = only("shift")
    step = out - x  # ± 2.0 along one of the directions
    assert torch.allclose(step.norm(dim=1), torch.full((x.shape[0],), 2.0), atol=1e-4)
    assert torch.allclose((step @ directions.T).abs().max(1).values, torch.full((x.shape[0],), 2.0), atol=1e-4)
    out, target = only("noise")
    assert torch.equal(target, x)  # denoising: the clean token is the target
    assert (out - x).pow(2).mean().sqrt().item() == pytest.approx(0.1 * x.pow(2).mean().sqrt().item(), rel=0.05)


def test_rand_augment_is_identity_at_magnitude_zero_and_reproducible(tmp_path):
    trainer, source = tiny_trainer(tmp_path, 4, ["rand_augment:magnitude=0"])
    x = next(source.iter_batches(BATCH, seed=0))
    batch = trainer.plugins.plugins[0].transform_batch(Batch(x.clone()), trainer)
    assert torch.equal(batch.x, x) and batch.target is None
    trainer, _ = tiny_trainer(tmp_path / "on", 4, ["rand_augment:ops=2,magnitude=9"])
    plugin = trainer.plugins.plugins[0]
    first = plugin.transform_batch(Batch(x.clone()), trainer)
    again = plugin.transform_batch(Batch(x.clone()), trainer)
    assert torch.equal(first.x, again.x) and not torch.equal(first.x, x)  # a pure function of (seed, step)


# --------------------------------------------------------------------------------------- pg_noise
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pg_noise_reinforce_moves_the_mask_toward_the_reward(sign):
    from sae_kit.plugins.pg_noise import MaskPolicy, reinforce_loss

    torch.manual_seed(0)
    policy = MaskPolicy(D_IN)
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.05)
    x = torch.randn(256, D_IN)
    start = policy(x).mean.mean().item()
    baseline = None
    for _ in range(60):
        with torch.no_grad():
            mask = policy(x).sample()
        reward = sign * mask.mean(1)  # constructed: more (or less) noise is rewarded
        baseline = reward.mean().item() if baseline is None else 0.9 * baseline + 0.1 * reward.mean().item()
        optimizer.zero_grad()
        reinforce_loss(policy, x, mask, reward, baseline).backward()
        optimizer.step()
    end = policy(x).mean.mean().item()
    assert (end - start) * sign > 0.15


def test_pg_noise_denoises_in_the_heating_phase_only(tmp_path):
    steps = 10
    trainer, source = tiny_trainer(tmp_path, steps, ["pg_noise:sigma=0.5,heat=0.3"])
    plugin = trainer.plugins.plugins[0]
    x = next(source.iter_batches(BATCH, seed=0))
    batch = plugin.transform_batch(Batch(x.clone()), trainer)
    assert torch.equal(batch.target, x) and not torch.equal(batch.x, x)
    bound = 0.5 * plugin.modules.data_std * 6  # mask <= 1, |ε| < 6
    assert torch.all((batch.x - x).abs() <= bound)
    logged = []
    drive(trainer, source, steps, lambda t, record: logged.append("pg_noise/policy" in record))
    assert logged == [True] * 3 + [False] * 7  # REINFORCE term only while heating (first 30 %)


# ------------------------------------------------------------------------------------------ mixup
def test_mixup_target_is_the_top_k_of_the_mixed_codes():
    from sae_kit.codes import SparseCodes
    from sae_kit.plugins.mixup import mixed_target

    first = SparseCodes(torch.tensor([[0, 1, 2]]), torch.tensor([[3.0, 2.0, 1.0]]), 8)
    second = SparseCodes(torch.tensor([[5, 6, 2]]), torch.tensor([[4.0, 0.5, 3.0]]), 8)
    assert torch.equal(mixed_target(first, second, torch.tensor([1.0]), 3), first.to_dense())
    half = mixed_target(first, second, torch.tensor([0.5]), 3)  # union {0,1,2,5,6}: keep the 3 largest
    assert torch.allclose(half, torch.tensor([[1.5, 0, 2.0, 0, 0, 2.0, 0, 0]]))
    assert torch.allclose(mixed_target(first, second, torch.tensor([0.5]), None)[0, 6], torch.tensor(0.25))


def test_mixup_consistency_is_zero_at_the_ends_and_its_gradient_makes_codes_linear(tmp_path):
    from sae_kit.plugins.mixup import codes_with_gradient, consistency, mixed_target

    trainer, source = tiny_trainer(tmp_path, 4, ["mixup"])
    sae = trainer.sae
    x = next(source.iter_batches(BATCH, seed=0))
    i, j = torch.arange(64), torch.arange(64, 128)
    ends = torch.tensor([0.0, 1.0]).repeat(32)
    with torch.no_grad():
        target = mixed_target(sae.encode(x[i]), sae.encode(x[j]), ends, sae.cfg.k)
    mixed = codes_with_gradient(sae, ends[:, None] * x[i] + (1 - ends[:, None]) * x[j])
    assert consistency(mixed, target).item() < 1e-10

    lam = torch.rand(64, generator=torch.Generator().manual_seed(0))
    x_mix = lam[:, None] * x[i] + (1 - lam[:, None]) * x[j]
    optimizer = torch.optim.Adam([sae.W_enc, sae.b_enc], lr=3e-3)
    errors = []
    for _ in range(40):
        with torch.no_grad():
            target = mixed_target(sae.encode(x[i]), sae.encode(x[j]), lam, sae.cfg.k)
        loss = consistency(codes_with_gradient(sae, x_mix), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        errors.append(loss.item())
    assert errors[-1] < 0.7 * errors[0]


def test_mixup_intrusion_guard_drops_mixes_that_look_real(tmp_path):
    trainer, source = tiny_trainer(tmp_path, 4, ["mixup:discriminator=true"])
    plugin = trainer.plugins.plugins[0]
    x = next(source.iter_batches(BATCH, seed=0))
    out = trainer.sae.training_forward(x, trainer.input_variance)
    terms = plugin.loss_terms(StepContext(trainer, Batch(x), out, 0))
    assert set(terms) >= {"discriminator"} and terms["discriminator"].item() > 0
    with torch.no_grad():
        plugin.modules["discriminator"][-1].bias.fill_(100.0)  # every input looks real: all mixes intrude
    ctx = StepContext(trainer, Batch(x), out, 0)
    assert "consistency" not in plugin.loss_terms(ctx) and ctx.logs["mixup/intrusions"] == 1.0


# -------------------------------------------------------------------------------------------- elr
def test_elr_token_keys_identify_rows_by_content():
    from sae_kit.plugins.elr import token_keys

    x = torch.randn(10_000, D_IN, generator=torch.Generator().manual_seed(0))
    keys = token_keys(x)
    assert keys.unique().numel() == x.shape[0]
    order = torch.randperm(x.shape[0])
    assert torch.equal(token_keys(x[order]), keys[order])
    nudged = x.clone()
    nudged[:, 5] = torch.nextafter(nudged[:, 5], torch.tensor(float("inf")))  # one ulp in one dimension
    assert not torch.any(token_keys(nudged) == keys)


def test_elr_targets_are_the_per_token_ema_of_code_distributions():
    from sae_kit.codes import SparseCodes
    from sae_kit.plugins.elr import TargetTable, inner_product, token_keys

    beta = 0.7
    table = TargetTable(width=4, capacity=5)
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(1))
    p1 = SparseCodes(torch.tensor([[1, 2]] * 4), torch.tensor([[0.75, 0.25]] * 4), 16)
    found, target = table.update(token_keys(x[:4]), p1, beta)
    assert found.all() and torch.allclose(target.to_dense(), (1 - beta) * p1.to_dense())  # ELR's t starts at 0
    # The same tokens later, in another order and another batch, with another prediction.
    order = torch.tensor([5, 2, 0, 4])  # tokens 4 and 5 are new; only one fits (capacity 5)
    p2 = SparseCodes(torch.tensor([[2, 3]] * 4), torch.tensor([[0.5, 0.5]] * 4), 16)
    found, target = table.update(token_keys(x[order]), p2, beta)
    assert len(table) == 5 and int(found.sum()) == 3
    expected = beta * (1 - beta) * p1.to_dense()[0] + (1 - beta) * p2.to_dense()[0]
    for row in (1, 2):  # tokens 2 and 0: seen twice
        assert torch.allclose(target.to_dense()[row], expected, atol=1e-3)  # (float16 storage)
    assert torch.allclose(inner_product(p2, target)[1], (expected * p2.to_dense()[0]).sum(), atol=1e-3)


def test_elr_gradient_pulls_codes_toward_their_targets(tmp_path):
    from sae_kit.codes import SparseCodes
    from sae_kit.plugins.elr import code_distribution, elr_term, inner_product

    trainer, source = tiny_trainer(tmp_path, 4, ["elr"])
    sae = trainer.sae
    x = next(source.iter_batches(BATCH, seed=0))
    with torch.no_grad():  # constructed targets: all mass on each token's currently weakest latent
        codes = sae.training_forward(x, trainer.input_variance).codes
        weakest = codes.values.argmin(1, keepdim=True)
        target = SparseCodes(codes.indices.gather(1, weakest), torch.ones(BATCH, 1), D_SAE)
    optimizer = torch.optim.Adam([sae.W_enc, sae.b_enc], lr=5e-3)
    agreements = []
    for _ in range(10):
        codes = sae.training_forward(x, trainer.input_variance).codes
        agreement = inner_product(SparseCodes(codes.indices, code_distribution(codes), D_SAE), target)
        agreements.append(agreement.mean().item())
        optimizer.zero_grad()
        elr_term(agreement).backward()
        optimizer.step()
    assert agreements[-1] > agreements[0] + 0.05  # the weakest latents' share of each code grows


def test_elr_regularises_tokens_seen_before_in_training(tmp_path):
    trainer, source = tiny_trainer(tmp_path, 4, ["elr"])
    plugin = trainer.plugins.plugins[0]
    x = next(source.iter_batches(BATCH, seed=0))
    first = trainer.train_step(x.clone())
    second = trainer.train_step(x[torch.randperm(BATCH)])  # the same tokens, reshuffled: the next epoch
    assert first["elr/tokens"] == BATCH == second["elr/tokens"]
    assert 0 < first["elr/agreement"] < second["elr/agreement"] < 1


# ------------------------------------------------------------------------------------- preference
def test_preference_anchors_each_concept_on_its_reserved_latent(tmp_path):
    from sae_kit.plugins.preference import synthetic_pairs, write_pairs

    steps = 40
    # Constructed pairs written to a file: concept c (0..2) = planted feature 10 + c, preferred adds it.
    _, source = tiny_trainer(tmp_path / "probe", 1, [])
    features = source.dataset.features[10:13]
    base = source.dataset.sample(600, torch.Generator().manual_seed(9))[0]
    pairs = synthetic_pairs(features, base, 3, 1.0, torch.Generator().manual_seed(3))
    path = write_pairs(tmp_path / "pairs.safetensors", pairs["preferred"], pairs["rejected"], pairs["concept"])
    results = {}
    for coefficient in (0.0, 1.0):
        trainer, _ = tiny_trainer(tmp_path / str(coefficient), steps,
                                  [f"preference:pairs={path},coefficient={coefficient},first_latent=5"])
        drive(trainer, source, steps)
        plugin = trainer.plugins.plugins[0]
        results[coefficient] = plugin.evaluate(trainer.sae, trainer)
        columns = torch.nn.functional.normalize(trainer.sae.W_enc[:, 5:8].T.detach(), dim=1)
        results[coefficient]["alignment"] = float((columns * features).sum(1).mean())
    assert results[1.0]["pair_accuracy"] > 0.95 and results[0.0]["pair_accuracy"] < 0.8
    assert results[1.0]["heldout_pairs"] == 120
    # The reserved latents turn toward their concepts (the baseline's are random directions).
    assert results[1.0]["alignment"] > 0.25 and results[1.0]["alignment"] > results[0.0]["alignment"] + 0.3


def test_preference_reports_bad_pair_files(tmp_path):
    from sae_kit.config import ConfigError
    from sae_kit.plugins.preference import write_pairs

    with pytest.raises(ConfigError, match="cannot read the pairs file"):
        tiny_trainer(tmp_path / "a", 2, [f"preference:pairs={tmp_path / 'missing.safetensors'}"])
    wrong = write_pairs(tmp_path / "wrong.safetensors", torch.zeros(4, D_IN + 1), torch.zeros(4, D_IN + 1))
    with pytest.raises(ConfigError, match=r"must both be \[P, 32\]"):
        tiny_trainer(tmp_path / "b", 2, [f"preference:pairs={wrong}"])
    too_many = write_pairs(tmp_path / "ids.safetensors", torch.zeros(4, D_IN), torch.zeros(4, D_IN),
                           torch.tensor([0, 1, 2, D_SAE]))
    with pytest.raises(ConfigError, match="concept ids"):
        tiny_trainer(tmp_path / "c", 2, [f"preference:pairs={too_many}"])


# ------------------------------------------------------------------------------------------- maid
def small_bilevel_problem(seed: int = 0, tokens: int = 24):
    from sae_kit.plugins.maid import Problem

    generator = torch.Generator().manual_seed(seed)
    d, n, m = 10, 16, 4
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1)
    support = torch.stack([torch.randperm(n, generator=generator)[:m] for _ in range(tokens)])
    truth = torch.rand(tokens, m, generator=generator, dtype=torch.float64) * 2
    r = torch.einsum("nmd,nm->nd", W[support], truth) + 0.05 * torch.randn(tokens, d, generator=generator, dtype=torch.float64)
    return Problem(D=W[support], support=support, r=r, gamma=0.05, ridge=1e-3, variance=1.0), n


def test_maid_hypergradient_matches_finite_differences():
    from sae_kit.plugins.maid import hypergradient, penalties, solve_lower, upper_objective

    problem, n = small_bilevel_problem(tokens=8)
    omega = 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scale = 0.5

    def f(theta):
        z, _ = solve_lower(problem, penalties(theta, scale)[problem.support], torch.zeros(problem.support.shape, dtype=torch.float64), 1e-11)
        return upper_objective(problem, z), z

    value, z = f(omega)
    analytic = hypergradient(problem, omega, scale, z, 1e-12)
    for latent in range(0, n, 3):
        shift = torch.zeros(n, dtype=torch.float64)
        shift[latent] = 1e-5
        numeric = (f(omega + shift)[0] - f(omega - shift)[0]) / 2e-5
        assert float(numeric) == pytest.approx(float(analytic[latent]), rel=1e-3, abs=1e-7), latent
    assert analytic.abs().max() > 1e-4  # a nontrivial gradient


def test_maid_outer_loop_descends_and_tightens_accuracy_when_needed():
    from sae_kit.plugins.maid import BilevelPenalties

    problem, n = small_bilevel_problem(tokens=48)
    learner = BilevelPenalties(problem, n, scale=0.5, tolerance=1e-7, cg_tolerance=1e-8, step_size=10.0, backtracks=6)
    learner.run(6)
    assert learner.history[-1] < 0.7 * learner.history[0]  # learned penalties fit better than uniform
    assert learner.accepted >= 4
    # Very loose accuracies: the line search cannot certify descent at first and tightens them.
    loose = BilevelPenalties(problem, n, scale=0.5, tolerance=10.0, cg_tolerance=10.0, step_size=10.0, backtracks=2,
                             max_tightenings=8)
    loose.run(10)
    assert loose.tightenings >= 1 and loose.tolerance < 10.0
    assert loose.history[-1] < loose.history[0]


def test_maid_learned_penalties_refit_at_the_encoders_l0(tmp_path):
    trainer, source = tiny_trainer(tmp_path, 30, ["maid:tokens=512,steps=8,penalty=0.5"])
    drive(trainer, source, 30)
    plugin = trainer.plugins.plugins[0]
    plugin.posthoc(trainer.sae, trainer)
    metrics = plugin.evaluate(trainer.sae, trainer)
    assert metrics["objective_end"] < metrics["objective_start"]
    assert metrics["fvu"] < metrics["fvu_uniform"] - 1e-3  # learned penalties beat uniform ones at the same L0
    assert (tmp_path / "sae" / "maid_penalties.safetensors").is_file()


# --------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("spec", ["ema:start=0.25", "compander", "hard_tokens", "pg_noise:heat=1.0", "elr",
                                  "rand_augment:magnitude=9", "mixup:discriminator=true"])
def test_tier_b1_plugin_state_survives_an_exact_resume(spec, tmp_path):
    reference, resumed = resume_matches_an_uninterrupted_run(tmp_path, spec, steps=8, checkpoint_every=4, stop_at=6)
    for name, value in reference.plugins.plugins[0].state_dict().items():
        other = resumed.plugins.plugins[0].state_dict()[name]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, name

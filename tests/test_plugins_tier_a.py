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


# ------------------------------------------------------------------------------- shared helpers
D_IN, D_SAE, BATCH = 32, 64, 128


def tiny_trainer(tmp_path, steps: int, plugins: list, **overrides):
    from sae_kit.eval.synthetic import SyntheticSource
    from sae_kit.train.trainer import TrainConfig, Trainer

    settings = dict(out=str(tmp_path), architecture="topk", k=4, d_sae=D_SAE, batch_size=BATCH, tokens=BATCH * steps,
                    warmup_steps=2, eval_every=steps, eval_tokens=512, log_every=steps, checkpoint_every=steps,
                    init_tokens=1024, dead_tokens_threshold=2000, threads=1, progress=False, lr=3e-3, plugins=plugins)
    settings.update(overrides)
    source = SyntheticSource(make_dataset("sharkey", seed=0, d=D_IN, n_features=64))
    return Trainer(TrainConfig(**settings), source), source


def drive(trainer, source, steps: int, on_step=None):
    """Run the trainer's steps by hand so a test can look at the weights between steps."""
    batches = source.iter_batches(BATCH * trainer.plugins.oversample, seed=trainer.cfg.seed)
    for _ in range(steps):
        record = trainer.train_step(next(batches))
        trainer.step += 1
        if on_step:
            on_step(trainer, record)


# -------------------------------------------------------------------------------------- boosting
def test_boosting_stages_open_blocks_grow_k_and_freeze_earlier_blocks(tmp_path):
    steps, stages = 40, 4
    trainer, source = tiny_trainer(tmp_path, steps, [f"boosting:stages={stages}"])
    block = D_SAE // stages
    snapshots = {}

    def check(trainer, record):
        stage = (trainer.step - 1) * stages // steps
        sae = trainer.sae
        opened = (stage + 1) * block
        assert torch.all(sae.W_enc[:, opened:] == 0) and torch.all(sae.b_enc[opened:] == 0)
        assert record["l0"] <= math.ceil((stage + 1) * 4 / stages)
        snapshots[trainer.step] = (sae.W_dec.detach().clone(), sae.parametrizations.W_enc.original.detach().clone())

    drive(trainer, source, steps, check)
    # Block 0 is frozen from stage 1 on (step 10): unchanged at every later step (the decoder's
    # renormalisation may move the last bit: a training step moves weights by ~lr = 3e-3).
    def same(a, b):
        return torch.allclose(a, b, rtol=0, atol=1e-6)

    first_frozen = snapshots[steps // stages + 1]
    for step in range(steps // stages + 1, steps + 1):
        assert same(snapshots[step][0][:block], first_frozen[0][:block]), step
        assert torch.equal(snapshots[step][1][:, :block], first_frozen[1][:, :block]), step
    # Blocks 0-2 frozen in the last stage while block 3 still trains.
    late = snapshots[3 * steps // 4 + 1]
    assert same(snapshots[steps][0][: 3 * block], late[0][: 3 * block])
    assert not same(snapshots[steps][0][-block:], late[0][-block:])
    assert not same(snapshots[steps // stages][0][:block], snapshots[1][0][:block])  # block 0 did train


# ---------------------------------------------------------------------------------- weight_decay
def test_weight_decay_shrinks_the_encoder_by_lr_times_lambda_and_leaves_the_decoder(tmp_path):
    trainer, source = tiny_trainer(tmp_path, 5, ["weight_decay:coefficient=10"], grad_clip=None)
    plain, _ = tiny_trainer(tmp_path / "plain", 5, [], grad_clip=None)
    x = next(source.iter_batches(BATCH, seed=0))
    plain.train_step(x)
    trainer.train_step(x)
    lr = trainer.optimizer.param_groups[0]["lr"]
    # Same Adam step in both; the plugin then multiplies the encoder by (1 - lr * 10).
    assert torch.allclose(trainer.sae.W_enc, plain.sae.W_enc * (1 - lr * 10), atol=1e-7)
    assert torch.equal(trainer.sae.W_dec, plain.sae.W_dec)
    assert torch.equal(trainer.sae.b_enc, plain.sae.b_enc)


# --------------------------------------------------------------------------------------- distill
def test_distill_student_targets_the_teacher_ensemble(tmp_path):
    trainer, source = tiny_trainer(tmp_path, 30, ["distill:teachers=2,anchor=0.25"])
    plugin = trainer.plugins.plugins[0]
    teachers = plugin.teachers()
    # Teachers are trained (seeds 1 and 2), differ from each other, and are not in the optimizer.
    assert not torch.equal(teachers[0].W_dec, teachers[1].W_dec)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for t in teachers for p in t.parameters())
    x = next(source.iter_batches(BATCH, seed=7))
    expected = (teachers[0](x) + teachers[1](x)) / 2
    assert torch.allclose(plugin.ensemble(x), expected)
    # The step's reconstruction term is against the ensemble, plus the anchor against the data.
    from sae_kit.plugins.api import Batch, StepContext

    batch = plugin.transform_batch(Batch(x), trainer)
    out = trainer.sae.training_forward(batch.x, trainer.input_variance)
    ctx = StepContext(trainer, batch, out, 0)
    trainer.plugins.loss_terms(ctx)
    assert torch.allclose(out.parts["reconstruction"],
                          (out.x_hat_n - expected).pow(2).sum(1).mean() / trainer.input_variance, rtol=1e-5)
    assert torch.allclose(out.parts["distill/anchor"],
                          0.25 * (out.x_hat_n - x).pow(2).sum(1).mean() / trainer.input_variance, rtol=1e-5)
    metrics = plugin.evaluate(trainer.sae, trainer)
    assert 0 < metrics["ensemble_fvu"] < 1


# ------------------------------------------------------------------------------------------ FLAD
def test_exp3_probabilities_sum_to_one_and_move_to_the_agreeing_source(tmp_path):
    trainer, _ = tiny_trainer(tmp_path, 10, ["exp3_flad:count=3,beta=0.5"])
    plugin = trainer.plugins.plugins[0]
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(plugin.sketches.shape[1], generator=generator)
    # Constructed case: source 0's gradient agrees with the target's, sources 1 and 2 do not.
    plugin.sketches[0] = target + 0.3 * torch.randn(target.shape, generator=generator)
    plugin.sketches[1] = torch.randn(target.shape, generator=generator)
    plugin.sketches[2] = -target + torch.randn(target.shape, generator=generator)
    plugin.has_sketch[:] = True
    history = []
    for _ in range(30):
        plugin.update(target)
        history.append(plugin.pi.clone())
        assert math.isclose(float(plugin.pi.sum()), 1.0, rel_tol=1e-9) and bool((plugin.pi > 0).all())
    assert history[-1][0] > history[5][0] > 1 / 3 + 1e-6  # (update 1 is uniform: ε_1 = 1/K)
    assert int(history[-1].argmax()) == 0 and history[-1][2] < history[-1][1]


def test_flad_end_to_end_prefers_the_target_matching_source(tmp_path):
    for name in ("exp3_flad", "ucb1_flad"):
        trainer, _ = tiny_trainer(tmp_path / name, 60, [f"{name}:every=5,count=3"])
        trainer.run()
        plugin = trainer.plugins.plugins[0]
        assert math.isclose(float(plugin.pi.sum()), 1.0, rel_tol=1e-9)
        assert int(plugin.plays.argmax()) == 0, plugin.plays  # source 0 shares the run's dictionary
        assert int(plugin.plays.sum()) == 60


# ------------------------------------------------------------------------------------ CoLoR-Filter
def test_color_filter_scores_target_like_tokens_higher_and_selects_them(tmp_path):
    from sae_kit.plugins._sources import reversed_profile
    from sae_kit.plugins.api import Batch

    trainer, source = tiny_trainer(tmp_path, 4, ["color_filter:helper_steps=60,target_steps=60,keep_one_in=2"])
    plugin = trainer.plugins.plugins[0]
    target = reversed_profile(source.dataset)
    pool_x = next(source.iter_batches(512, seed=11))
    target_x = next(target.iter_batches(512, seed=11))
    mixed = torch.cat([pool_x[:128], target_x[:128]])
    scores = plugin.scores(mixed)
    assert scores[128:].mean() > scores[:128].mean()
    kept = plugin.transform_batch(Batch(mixed), trainer).x
    assert kept.shape == (BATCH, D_IN)
    from_target = sum(bool((row == target_x[:128]).all(1).any()) for row in kept)
    assert from_target > BATCH // 2  # more than half the kept tokens come from the target domain


# ------------------------------------------------------------------------------- split_agreement
def test_split_agreement_halves_are_disjoint_and_agreement_is_permutation_invariant(tmp_path):
    from sae_kit.eval.synthetic import SyntheticSource
    from sae_kit.plugins.split_agreement import HalfSource, agreement

    source = SyntheticSource(make_dataset("sharkey", seed=0, d=D_IN, n_features=64))
    stream = source.iter_batches(16, seed=3)
    whole = [next(stream) for _ in range(6)]
    even = HalfSource(source, 0).iter_batches(16, seed=3)
    odd = HalfSource(source, 1).iter_batches(16, seed=3, start_batch=1)
    assert torch.equal(next(even), whole[0]) and torch.equal(next(even), whole[2])
    assert torch.equal(next(odd), whole[3])  # odd half, its batch 1 = batch 3 of the stream

    sae = trained_like_sae("topk")
    permuted = trained_like_sae("topk")
    order = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        permuted.W_dec.copy_(sae.W_dec[order])
        permuted.W_enc.copy_(sae.W_enc[:, order])
        permuted.b_enc.copy_(sae.b_enc[order])
        permuted.b_dec.copy_(sae.b_dec)
    xs = [next(source.iter_batches(64, seed=4))]
    same = agreement(sae, permuted, xs)
    assert same["matched_cosine"] == pytest.approx(1.0, abs=1e-5) and same["functional_fvu"] < 1e-10
    other = agreement(sae, trained_like_sae("topk", seed=5), xs)
    assert other["matched_cosine"] < 0.5 and other["functional_fvu"] > 0.1


# ---------------------------------------------------------------------------------- downstream_kl
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_lm import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


def test_downstream_kl_trains_the_sae_through_the_frozen_model(tmp_path, tiny_llama):
    from sae_kit.plugins.api import Batch, StepContext

    spec = f"downstream_kl:model={tiny_llama},hook=blocks.0.hook_resid_post,context=16,windows=2,phase=1.0"
    trainer, source = tiny_trainer(tmp_path, 4, [spec])
    plugin = trainer.plugins.plugins[0]
    tokens = plugin.text.next_tokens()
    assert plugin.text.windows_used == 2
    plugin.text.next_tokens = lambda: tokens  # the same windows every time, to watch the KL fall
    x = next(source.iter_batches(BATCH, seed=0))
    optimizer = torch.optim.Adam(trainer.sae.trainable_parameters(), lr=1e-2)
    kls = []
    for _ in range(15):
        out = trainer.sae.training_forward(x, trainer.input_variance)
        kl = plugin.loss_terms(StepContext(trainer, Batch(x), out, 0))["kl"]
        optimizer.zero_grad()
        kl.backward()
        assert trainer.sae.W_enc.grad.abs().sum() > 0  # the gradient reaches the SAE...
        assert all(p.grad is None for p in plugin.model.model.parameters())  # ...and not the model
        optimizer.step()
        kls.append(kl.item())
    assert kls[-1] < 0.7 * kls[0]
    hp = {"lr": 1.0, "k": 4}
    plugin.hyperparameters(hp, trainer)  # the phase runs at a constant 0.3 x the base rate
    assert hp["lr"] == pytest.approx(0.3 * trainer.base_lr)


# ------------------------------------------------------------------------- exact resume per plugin
def resume_matches_an_uninterrupted_run(tmp_path, spec: str, steps: int, checkpoint_every: int, stop_at: int):
    """Train ``spec`` straight through, and again stopped before step ``stop_at`` and resumed from its
    last checkpoint; assert both end with the same SAE, bit for bit. Returns (reference, resumed) trainers."""
    from sae_kit.train.trainer import Trainer

    reference, _ = tiny_trainer(tmp_path / "reference", steps, [spec], checkpoint_every=checkpoint_every)
    expected = reference.run().state_dict()

    class Stop(Exception):
        pass

    interrupted, source = tiny_trainer(tmp_path / "resumed", steps, [spec], checkpoint_every=checkpoint_every)
    original = interrupted.train_step

    def stop_before(x):
        if interrupted.step == stop_at:
            raise Stop
        return original(x)

    interrupted.train_step = stop_before
    with pytest.raises(Stop):
        interrupted.run()
    resumed = Trainer(interrupted.cfg, source, resume=True)
    assert resumed.step == stop_at // checkpoint_every * checkpoint_every
    got = resumed.run().state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected), spec
    return reference, resumed


@pytest.mark.parametrize("spec", ["boosting", "exp3_flad:every=3,count=3", "ucb1_flad:every=3,count=3",
                                  "color_filter:helper_steps=5,target_steps=5", "weight_decay", "usage_entropy",
                                  "distill:teachers=1"])
def test_plugin_runs_resume_bit_exact(spec, tmp_path):
    resume_matches_an_uninterrupted_run(tmp_path, spec, steps=24, checkpoint_every=8, stop_at=19)

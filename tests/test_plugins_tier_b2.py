"""Mechanism tests of the Tier B plugins auglocal, conr, mfm, mask_tune, stn, lfu, text_aug,
decorrelate and arl: each asserts the property the plugin's adaptation claims, on a constructed case."""
from __future__ import annotations

import math
import random

import pytest
import torch

from sae_kit.codes import SparseCodes
from sae_kit.config import SAEConfig
from sae_kit.eval.synthetic import make_dataset
from sae_kit.sae import create_sae
from test_plugins_tier_a import BATCH, D_IN, D_SAE, resume_matches_an_uninterrupted_run, tiny_trainer


def random_sae(seed: int = 0, arch: str = "topk", k: int = 6):
    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=96, architecture=arch, k=k))
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    return sae


def planted_batch(n: int = 256, seed: int = 1) -> torch.Tensor:
    return make_dataset("sharkey", seed=0, d=D_IN, n_features=64).sample(n, torch.Generator().manual_seed(seed))[0]


# ------------------------------------------------------------------------------------ decorrelate
def test_decorrelate_penalises_co_firing_latents_and_its_gradient_decorrelates_them():
    from sae_kit.plugins.decorrelate import dense_columns, offdiagonal_covariance_penalty

    generator = torch.Generator().manual_seed(0)
    independent = torch.rand(512, 8, generator=generator) * (torch.rand(512, 8, generator=generator) < 0.3)
    duplicated = independent.clone()
    duplicated[:, 1] = 0.9 * duplicated[:, 0]  # latent 1 fires with latent 0, proportionally
    low, high = offdiagonal_covariance_penalty(independent), offdiagonal_covariance_penalty(duplicated)
    assert low < 0.05 and high > 0.2 and high > 10 * low
    # The sparse → dense gather keeps gradients and matches the dense codes.
    codes = SparseCodes.from_dense(duplicated.clone().requires_grad_(True))
    columns = torch.tensor([0, 1, 5])
    assert torch.allclose(dense_columns(codes, columns), duplicated[:, columns])
    values = duplicated.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([values], lr=2.0)
    for _ in range(200):
        optimizer.zero_grad()
        offdiagonal_covariance_penalty(values).backward()
        optimizer.step()
    correlation = torch.corrcoef(values.detach()[:, :2].T)[0, 1]
    assert correlation < 0.5  # from 1.0


# -------------------------------------------------------------------------------------------- lfu
def test_lfu_shift_is_the_exact_ascent_direction_and_consistency_is_the_code_distance():
    from sae_kit.plugins.lfu import LfU, ascent_direction, shifted_codes, sparse_squared_distance

    sae = random_sae()
    x = planted_batch()
    out = sae.training_forward(x)
    g = ascent_direction(out.parts["reconstruction"], out.codes)
    # Reference: the dense path's gradient with respect to b_enc is Σ_b ∂L/∂u_b, the same quantity.
    dense = random_sae()
    dense.sparse_training = False
    dense.training_forward(x).parts["reconstruction"].backward()
    assert torch.allclose(g, dense.b_enc.grad, atol=1e-6)
    plugin = LfU({"alpha": 0.05})
    shift = plugin.undesirable_shift(out)
    rms = out.pre_activations.pow(2).mean().sqrt()
    assert torch.isclose(shift.pow(2).mean().sqrt(), 0.05 * rms, rtol=1e-4)

    def loss_with(delta):
        with torch.no_grad():
            return sae.decode_normalized(shifted_codes(sae, out, delta)).sub(out.x_n).pow(2).sum(1).mean().item()

    random_shift = torch.randn(shift.shape, generator=torch.Generator().manual_seed(3))
    random_shift *= shift.norm() / random_shift.norm()
    base = loss_with(torch.zeros_like(shift))
    assert loss_with(shift) > base and loss_with(shift) - base > 3 * abs(loss_with(random_shift) - base)
    # The consistency distance is the dense squared distance, with gradients to the encoder.
    perturbed = shifted_codes(sae, out, shift)
    distance = sparse_squared_distance(out.codes, perturbed)
    assert torch.allclose(distance, (out.codes.to_dense() - perturbed.to_dense()).pow(2).sum(1), atol=1e-5)
    assert distance.sum() > 0
    distance.sum().backward()
    assert sae.W_enc.grad.abs().sum() > 0


def test_lfu_in_training_reduces_sensitivity_to_the_ascent_shift(tmp_path):
    from sae_kit.plugins.lfu import LfU, shifted_codes, sparse_squared_distance

    def sensitivity(trainer):
        x = planted_batch(512, seed=9)
        out = trainer.sae.training_forward(x, trainer.input_variance)
        shift = LfU({"alpha": 0.05}).undesirable_shift(out)
        with torch.no_grad():
            return (sparse_squared_distance(out.codes, shifted_codes(trainer.sae, out, shift)).sum()
                    / out.codes.values.pow(2).sum()).item()

    with_lfu, _ = tiny_trainer(tmp_path / "lfu", 60, ["lfu:coefficient=1.0"])
    plain, _ = tiny_trainer(tmp_path / "plain", 60, [])
    with_lfu.run()
    plain.run()
    assert sensitivity(with_lfu) < 0.8 * sensitivity(plain)


# ------------------------------------------------------------------------------------------- conr
def test_conr_pushes_apart_dissimilar_inputs_whose_reconstructions_collapsed():
    from sae_kit.plugins.conr import conr_loss

    e1, e2, e3 = torch.eye(3)
    # Tokens 0, 1: the same input; tokens 2, 3: another input. Reconstructions: 0, 1, 2 collapsed onto one
    # point (token 2 absorbed into the frequent neighbour), token 3 reconstructed correctly.
    labels = torch.stack([e1, e1 + 0.01 * e3, e2, e2 + 0.01 * e3])
    collapsed = torch.stack([e1, e1, e1, e2])
    separate = labels.clone()
    anchors = torch.arange(4)
    features = torch.stack([e1, e1, e1 + 0.1 * e2, e2]).requires_grad_(True)
    with_negatives = conr_loss(features, labels, collapsed, anchors, omega=0.2, temperature=0.5, e=1.0)
    assert conr_loss(features, labels, separate, anchors, 0.2, 0.5, 1.0) == 0  # no wrongly close pair: nothing to do
    assert with_negatives > 0
    optimizer = torch.optim.SGD([features], lr=0.5)
    before = torch.cosine_similarity(features[0], features[2], dim=0).item()
    for _ in range(50):
        optimizer.zero_grad()
        conr_loss(features, labels, collapsed, anchors, 0.2, 0.5, 1.0).backward()
        optimizer.step()
    after_negative = torch.cosine_similarity(features[0], features[2], dim=0).item()
    after_positive = torch.cosine_similarity(features[0], features[1], dim=0).item()
    assert after_negative < before - 0.3 and after_positive > 0.9


def test_conr_term_reaches_the_encoder_in_training(tmp_path):
    trainer, source = tiny_trainer(tmp_path, 4, ["conr:coefficient=1.0,omega=0.5"])
    record = trainer.train_step(next(source.iter_batches(BATCH, seed=0)))
    assert record["conr/contrastive"] > 0 and math.isfinite(record["loss"])


# -------------------------------------------------------------------------------------------- mfm
def test_mfm_rebuilder_learns_to_refill_dropped_latents_from_their_partners(tmp_path):
    from sae_kit.plugins.mfm import drop_mask

    trainer, _ = tiny_trainer(tmp_path, 4, ["mfm:rank=16,mask_ratio=0.3"])
    plugin, sae = trainer.plugins.plugins[0], trainer.sae
    # Constructed codes: latents 2i and 2i+1 always fire together with the same value (redundant pairs).
    generator = torch.Generator().manual_seed(0)
    pair = torch.stack([torch.randperm(D_SAE // 2, generator=generator)[:2] for _ in range(512)])
    indices = torch.stack([2 * pair[:, 0], 2 * pair[:, 0] + 1, 2 * pair[:, 1], 2 * pair[:, 1] + 1], 1)
    strength = torch.rand(512, 2, generator=generator) + 0.5
    codes = SparseCodes(indices, strength.repeat_interleave(2, 1), D_SAE)
    with torch.no_grad():
        x_n = sae.decode_normalized(codes)
    keep = drop_mask(codes, 0.3, torch.Generator().manual_seed(1))
    keep[:, 1::2] = True  # drop only even latents, so each dropped one keeps its partner
    rebuilt = plugin.modules["rebuilder"](codes, keep)
    assert torch.equal(rebuilt[keep], codes.values[keep])  # kept slots untouched
    zeroed = SparseCodes(indices, torch.where(keep, codes.values, 0), D_SAE)
    dropped_loss = (sae.decode_normalized(zeroed) - x_n).pow(2).sum(1).mean().item()
    optimizer = torch.optim.Adam(plugin.modules.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        loss = plugin.masked_loss(sae, codes, x_n, keep, 1.0)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * dropped_loss


# -------------------------------------------------------------------------------------- mask_tune
def test_graddrop_keeps_agreeing_gradients_and_one_sign_of_conflicting_ones():
    from sae_kit.plugins.mask_tune import graddrop

    g1 = torch.tensor([1.0, 2.0, -1.0, 3.0])
    g2 = torch.tensor([0.5, -2.0, -1.0, -1.0])
    n = 4000
    draws = torch.stack([graddrop([g1, g2], u) for u in torch.rand(n, 4, generator=torch.Generator().manual_seed(0))])
    assert torch.all(draws[:, 0] == 1.5) and torch.all(draws[:, 2] == -2.0)  # same sign: the sum
    assert set(draws[:, 1].tolist()) <= {2.0, -2.0} and set(draws[:, 3].tolist()) <= {3.0, -1.0}
    # P(keep the positive side) = ½(1 + Σg / Σ|g|): 0.5 for (2, -2), 0.75 for (3, -1).
    assert abs((draws[:, 1] > 0).float().mean() - 0.5) < 0.04  # 5 standard errors
    assert abs((draws[:, 3] > 0).float().mean() - 0.75) < 0.04


def test_mask_tune_prunes_corrupted_encoder_entries_and_keeps_the_decoder(tmp_path):
    dataset = make_dataset("sharkey", seed=0, d=D_IN, n_features=D_SAE)
    pretrained = create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=4))
    generator = torch.Generator().manual_seed(0)
    corrupted = torch.rand(D_IN, D_SAE, generator=generator) < 0.05
    with torch.no_grad():  # an oracle SAE (the planted dictionary) whose encoder has large spurious entries
        pretrained.W_dec.copy_(dataset.features)
        pretrained.W_enc.copy_(dataset.features.T)
        pretrained.W_enc[corrupted] = torch.randn(int(corrupted.sum()), generator=generator).sign() * 1.5
    pretrained.save(tmp_path / "pretrained")
    trainer, _ = tiny_trainer(tmp_path / "run", 80, [f"mask_tune:pretrained={tmp_path / 'pretrained'},consistency=0"])
    sae = trainer.run()
    plugin = trainer.plugins.plugins[0]
    kept = plugin.modules["mask"]["W_enc"] > 0.5
    assert kept[corrupted].float().mean() < 0.5 < kept[~corrupted].float().mean()
    # Feature identity: decoder directions unchanged (up to the engine's renormalisation's rounding).
    assert torch.allclose(sae.W_dec, pretrained.W_dec, rtol=0, atol=1e-6)
    metrics = plugin.evaluate(sae, trainer)
    fvu = trainer.evaluate()["fvu"]
    assert fvu < 0.7 * metrics["fvu_pretrained"] and metrics["decoder_drift"] < 1e-6


# -------------------------------------------------------------------------------------------- stn
def test_stn_bias_responds_to_the_hyperparameters_and_the_hyper_step_lowers_validation_loss(tmp_path):
    trainer, source = tiny_trainer(tmp_path, 10, ["stn:hyper_lr=0.05"])
    plugin, sae = trainer.plugins.plugins[0], trainer.sae
    with torch.no_grad():
        plugin.modules["response"].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    hp = {"lr": 1e-3, "k": 4}
    plugin.hyperparameters(hp, trainer)
    perturbation = plugin.current - plugin.hyper.detach()
    assert perturbation.abs().sum() > 0
    assert math.isclose(sae.cfg.aux_coefficient, float(plugin.current[0].exp()), rel_tol=1e-6)
    expected = sae.parametrizations.b_enc.original + plugin.modules["response"].weight @ (plugin.current - plugin.reference)
    assert torch.allclose(sae.b_enc, expected)
    x = next(source.iter_batches(512, split="heldout", seed=3))
    losses = [plugin.hyper_step(sae, x, trainer.input_variance) for _ in range(10)]
    assert losses[-1] < losses[0]  # descending the validation loss through the best response
    assert sae.W_enc.grad is None or torch.all(sae.W_enc.grad == 0)  # hyper-steps leave the SAE's .grad alone
    # Noise augmentation: the input is perturbed, the target is the clean batch.
    from sae_kit.plugins.api import Batch

    clean = next(source.iter_batches(BATCH, seed=0))
    batch = plugin.transform_batch(Batch(clean), trainer)
    assert torch.equal(batch.target, clean) and not torch.equal(batch.x, clean)


# ---------------------------------------------------------------------------------------- auglocal
def test_auglocal_uniform_subset_follows_unifsamp():
    from sae_kit.plugins.auglocal import auxiliary_depth, uniform_subset

    assert uniform_subset(2, 12, 4) == [4, 6, 9, 11]  # round(2 + 9 i / 4), i = 1..4
    assert uniform_subset(0, 4, 1) == [3] and uniform_subset(0, 4, 3) == [1, 2, 3]
    assert uniform_subset(3, 4, 2) == []  # the last layer: only the final norm and unembedding
    assert auxiliary_depth(0, 12, 4) == 4 and auxiliary_depth(9, 12, 4) == 1


def test_auglocal_skipped_blocks_do_not_affect_the_auxiliary_network(tmp_path):
    from tiny_lm import write_tiny_llama

    from sae_kit.models import load_model
    from sae_kit.plugins.auglocal import skip_blocks

    lm = load_model(str(write_tiny_llama(tmp_path / "llama4", layers=4)))
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with_skip = lm.logits(tokens, replace=skip_blocks([2]))
    full = lm.logits(tokens)
    assert not torch.allclose(with_skip, full)
    parameters = dict(lm.model.named_parameters())
    with torch.no_grad():
        for name, p in parameters.items():
            if ".layers.2." in name and "mlp" in name:
                p.add_(0.5)
    assert torch.allclose(lm.logits(tokens, replace=skip_blocks([2])), with_skip, atol=1e-6)  # block 2 is skipped
    assert not torch.allclose(lm.logits(tokens), full, atol=1e-4)  # ...but it matters in the full model
    with torch.no_grad():
        for name, p in parameters.items():
            if ".layers.3." in name and "mlp" in name:
                p.add_(0.5)
    assert not torch.allclose(lm.logits(tokens, replace=skip_blocks([2])), with_skip, atol=1e-4)  # block 3 is kept


# ---------------------------------------------------------------------------------------- text_aug
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_lm import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-b2") / "model")


def test_eda_edits_only_the_prefix_and_keeps_the_rest_aligned(tiny_llama):
    from transformers import AutoTokenizer

    from sae_kit.plugins.text_aug import OPERATIONS, augment_window

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama, local_files_only=True)
    text = "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat by the door today"
    ids = torch.tensor([tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"])
    edit = 10
    for operation in OPERATIONS:
        out = augment_window(ids, tokenizer, edit, 0.1, random.Random(0), operation)
        assert out.shape == ids.shape and out[0] == ids[0]
        assert torch.equal(out[1 + edit:], ids[1 + edit:])  # unchanged tokens at unchanged positions
        assert not torch.equal(out[1: 1 + edit], ids[1: 1 + edit]), operation


def test_text_aug_batch_holds_augmented_contexts_and_consistency_prefers_matched_codes(tmp_path, tiny_llama):
    from sae_kit.plugins.api import Batch
    from sae_kit.plugins.text_aug import info_nce

    spec = f"text_aug:model={tiny_llama},hook=blocks.0.hook_resid_post,context=16,windows=2,fraction=0.25"
    trainer, source = tiny_trainer(tmp_path, 4, [spec])
    plugin = trainer.plugins.plugins[0]
    x = next(source.iter_batches(BATCH, seed=0))
    batch = plugin.transform_batch(Batch(x), trainer)
    original, changed = plugin._pairs
    assert original.shape == changed.shape and original.shape[0] == 2 * (15 - 7)  # 2 windows × unchanged tail
    assert not torch.allclose(original, changed)  # same tokens, different left context
    n = min(BATCH // 4, 2 * 15)
    assert not torch.equal(batch.x[:n], x[:n]) and torch.equal(batch.x[n:], x[n:])
    record = trainer.train_step(x)
    assert record["text_aug/consistency"] > 0
    codes = torch.rand(16, 40, generator=torch.Generator().manual_seed(0))
    assert info_nce(codes, codes, 0.1) < info_nce(codes, codes.roll(1, 0), 0.1)


# --------------------------------------------------------------------------------------------- arl
def test_arl_weights_favour_the_low_variance_source_and_bias_term_sees_offsets():
    from sae_kit.plugins.arl import ARL, arl_weights, per_source_bias

    weights = arl_weights(torch.tensor([1.0, 2.0], dtype=torch.float64), 8.0)
    assert math.isclose(float(weights.mean()), 1.0) and weights[0] > 1.5 > 0.5 > weights[1]
    assert torch.allclose(arl_weights(torch.tensor([3.0, 3.0, 3.0]), 8.0), torch.ones(3))
    plugin = ARL({"warmup": 0.5, "beta": 0.0})
    plugin.S, plugin.variances = 2, torch.ones(2, dtype=torch.float64)
    plugin.seen, plugin.weights = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.float64)
    plugin.update(torch.tensor([0.1, 0.4], dtype=torch.float64), fraction=0.2)
    assert torch.equal(plugin.weights, torch.ones(2, dtype=torch.float64))  # uniform during warm-up
    plugin.update(torch.tensor([0.1, 0.4], dtype=torch.float64), fraction=0.6)
    assert plugin.weights[0] > plugin.weights[1]
    source = torch.tensor([0, 0, 1, 1])
    centred = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    assert per_source_bias(centred, source, 2) == 0
    offset = centred + torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [3.0, 0.0]])
    assert math.isclose(float(per_source_bias(offset, source, 2)), 9.0)


def test_arl_batches_mix_sources_evenly_and_downweight_the_harder_one(tmp_path):
    trainer, _ = tiny_trainer(tmp_path, 30, ["arl:count=2,warmup=0.1"])
    trainer.run()
    plugin = trainer.plugins.plugins[0]
    assert plugin.cursor.state() == [30, 30]
    metrics = plugin.evaluate(trainer.sae, trainer)
    harder = int(torch.tensor([metrics["fvu_source_0"], metrics["fvu_source_1"]]).argmax())
    assert plugin.weights[harder] < 1 < plugin.weights[1 - harder]
    assert metrics["worst_fvu"] == max(metrics["fvu_source_0"], metrics["fvu_source_1"])


# ------------------------------------------------------------------------- exact resume per plugin
@pytest.mark.parametrize("spec", ["conr:omega=0.5", "mfm:rank=8", "lfu", "decorrelate:coefficient=0.01",
                                  "arl:count=2,warmup=0.1", "stn:every=3", "mask_tune:pretrain_steps=6"])
def test_plugin_runs_resume_bit_exact(spec, tmp_path):
    resume_matches_an_uninterrupted_run(tmp_path, spec, steps=24, checkpoint_every=8, stop_at=19)

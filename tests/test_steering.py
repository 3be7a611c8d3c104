"""Steering (sae_kit.steering), KV-cached generation with position-wise replacements, and text encoding
(sae_kit.text_features), on the tiny bridged LLaMA of tests/tiny_served.py and a tiny HookedTransformer."""
from __future__ import annotations

import pytest
import torch

from sae_kit.config import SAEConfig
from sae_kit.models import LanguageModel, load_model
from sae_kit.sae import create_sae, load_sae
from sae_kit.steering import SteeringFeature, steer, steered_activations, steering_replacements
from sae_kit.text_features import encode_text, feature_values, per_token_top, top_over_text
from tiny_served import D_MODEL, HOOK, write_tiny_model, write_tiny_sae

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer:DeprecationWarning")
PROMPT = "To be, or not to be, that is the question"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    write_tiny_model(root / "model")
    write_tiny_sae(root / "sae", str(root / "model"))
    return load_model(str(root / "model")), load_sae(root / "sae")


@pytest.fixture(scope="module")
def hooked():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_ctx=64, d_head=8, n_heads=4, d_vocab=101,
                                  act_fn="gelu", normalization_type="LN", seed=0, device="cpu")
    return LanguageModel.from_hooked_transformer(HookedTransformer(cfg), tokenizer=None, name="tiny-gpt2")


def test_clamping_a_feature_to_its_own_value_changes_nothing_and_additive_adds_its_row(served):
    _, sae = served
    x = torch.randn(16, D_MODEL, generator=torch.Generator().manual_seed(0))
    codes = sae.encode(x).detach()
    index = int(codes.indices[0, 0])
    own = float(codes.values[0, 0])
    assert torch.allclose(steered_activations(sae, x[:1], [(index, own)], "clamp"), x[:1], atol=1e-6)
    clamped = steered_activations(sae, x, [(index, 5.0)], "clamp")
    # The clamped activation differs from x by (5 - a) times the decoder row, a being the feature's activation.
    a = codes.to_dense()[:, index]
    assert torch.allclose(clamped - x, (5.0 - a)[:, None] * sae.W_dec[index].detach(), atol=1e-5)
    added = steered_activations(sae, x, [(index, 3.0), (index + 1, -1.0)], "additive")
    expected = x + 3.0 * sae.W_dec[index].detach() - sae.W_dec[index + 1].detach()
    assert torch.allclose(added, expected, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        steered_activations(sae, x, [(sae.cfg.d_sae, 1.0)], "additive")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("hook", [HOOK, "blocks.0.hook_resid_pre"])
def test_kv_cached_steered_generation_equals_recomputing_the_sequence(served, temperature, hook):
    model, sae = served
    feature = SteeringFeature(sae, hook, 3, 40.0)
    replace = steering_replacements([feature], "additive", rows=1)
    prompt = model.to_tokens(PROMPT)[0].expand(2, -1)
    cached = model.generate(prompt, 12, temperature=temperature, seed=5, replace=replace, positionwise=True)
    recomputed = model.generate(prompt, 12, temperature=temperature, seed=5, replace=replace)
    assert torch.equal(cached, recomputed)
    assert not torch.equal(cached[0], cached[1])  # strength 40 on a tiny model changes the text
    clean = model.generate(prompt[:1], 12, temperature=temperature, seed=5)
    assert torch.equal(cached[0, :prompt.shape[1] + 1], clean[0, :prompt.shape[1] + 1])


def test_positionwise_generation_never_recomputes_the_sequence(served, monkeypatch):
    model, sae = served
    replace = steering_replacements([SteeringFeature(sae, HOOK, 3, 40.0)], "additive", rows=1)

    def recompute(*args, **kwargs):
        raise AssertionError("generation fell back to full recomputation")

    monkeypatch.setattr(model, "logits", recompute)
    model.generate(model.to_tokens(PROMPT)[0].expand(2, -1), 4, replace=replace, positionwise=True)
    with pytest.raises(AssertionError, match="fell back"):  # a non-residual hook does recompute
        other = steering_replacements([SteeringFeature(sae, "blocks.1.hook_mlp_out", 3, 1.0)], "additive", rows=1)
        model.generate(model.to_tokens(PROMPT)[0].expand(2, -1), 4, replace=other, positionwise=True)


def test_kv_cached_steering_on_a_hooked_transformer(hooked):
    sae = create_sae(SAEConfig(d_in=D_MODEL, d_sae=64, architecture="topk", k=4))
    replace = steering_replacements([SteeringFeature(sae, "blocks.0.hook_resid_post", 1, 30.0)], "clamp", rows=1)
    prompt = torch.arange(5, 15).expand(2, -1)
    cached = hooked.generate(prompt, 8, replace=replace, positionwise=True)
    recomputed = hooked.generate(prompt, 8, replace=replace)
    assert torch.equal(cached, recomputed)


def test_steer_is_reproducible_and_steering_changes_the_text(served):
    model, sae = served
    features = [SteeringFeature(sae, HOOK, 7, 60.0)]
    first = steer(model, PROMPT, features, max_new_tokens=10, temperature=0.8, seed=3)
    again = steer(model, PROMPT, features, max_new_tokens=10, temperature=0.8, seed=3)
    other_seed = steer(model, PROMPT, features, max_new_tokens=10, temperature=0.8, seed=4)
    assert first == again
    assert first["default"] != first["steered"]
    assert other_seed["default"] != first["default"]
    clamped = steer(model, PROMPT, features, max_new_tokens=10, temperature=0.0, method="clamp")
    assert clamped["default"] != clamped["steered"]
    with pytest.raises(ValueError, match="at least one feature"):
        steer(model, PROMPT, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="method"):
        steer(model, PROMPT, features, max_new_tokens=4, method="orthogonal")


def test_encode_text_matches_the_sae_on_captured_activations(served):
    model, sae = served
    result = encode_text(model, sae, HOOK, PROMPT)
    ids = model.to_tokens(PROMPT, prepend_bos=True)
    acts = model.capture(ids, HOOK)[HOOK][0, 1:]
    assert result.token_ids == ids[0, 1:].tolist()
    assert "".join(result.tokens) == PROMPT
    assert torch.allclose(result.codes.to_dense(), sae.encode(acts).to_dense(), atol=1e-6)
    dense = result.codes.to_dense()
    assert torch.allclose(feature_values(result.codes, [3, 9]), dense[:, [3, 9]])
    per_token = per_token_top(result.codes, 2)
    assert [entry["index"] for entry in per_token[0]] == dense[0].topk(2).indices.tolist()
    overall = top_over_text(result.codes, 5)
    best = dense.max(0).values.topk(5)
    assert [entry["index"] for entry in overall] == best.indices.tolist()
    assert overall[0]["count"] == int((dense[:, overall[0]["index"]] != 0).sum())

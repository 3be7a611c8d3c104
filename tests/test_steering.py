"""Steering (sae_kit.steering), KV-cached generation with position-wise replacements, and text encoding
(sae_kit.text_features), on the tiny bridged LLaMA of tests/tiny_served.py and a tiny HookedTransformer."""
from __future__ import annotations

import pytest
import torch

from sae_kit.config import SAEConfig
from sae_kit.models import LanguageModel, load_model
from sae_kit.sae import create_sae, load_sae
from sae_kit.batched_generation import GenerationGroup, generate_groups
from sae_kit.steering import (SteeringFeature, SteeringRequest, batch_replacements, steer, steer_many,
                              steered_activations, steering_replacements)
from sae_kit.text_features import EncodeRequest, encode_many, encode_text, feature_values, per_token_top, top_over_text
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


def _mixed_requests(sae, n: int = 10):
    prompts = [PROMPT, "Once upon a time, in a kingdom by the sea,", "My favourite food is", "Hi"]
    # Every fourth request also steers a second feature at another hook.
    extra = lambda i: (SteeringFeature(sae, "blocks.0.hook_resid_post", i + 1, -15.0),) if i % 4 == 0 else ()  # noqa: E731
    return [SteeringRequest(prompts[i % len(prompts)],
                            (SteeringFeature(sae, HOOK if i % 3 else "blocks.0.hook_resid_pre", (7 * i) % 90, 20.0 + 5 * i),
                             *extra(i)),
                            max_new_tokens=3 + i % 6, temperature=(0.0, 0.8, 1.4)[i % 3], seed=100 + i,
                            method=("additive", "clamp")[i % 2]) for i in range(n)]


def test_steering_requests_batched_together_get_what_each_gets_alone(served):
    model, sae = served
    requests = _mixed_requests(sae)
    alone = [steer(model, r.prompt, r.features, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                   seed=r.seed, method=r.method) for r in requests]
    bad = SteeringRequest(PROMPT, (SteeringFeature(sae, HOOK, sae.cfg.d_sae, 1.0),))
    together = steer_many(model, [*requests[:4], bad, *requests[4:]])
    assert isinstance(together[4], ValueError) and "out of range" in str(together[4])
    assert together[:4] + together[5:] == alone
    assert len({a["steered"] for a in alone}) == len(alone)  # the rows really differ from one another
    # Another order, another batch composition: still the same texts.
    assert steer_many(model, requests[::-1]) == alone[::-1]


def test_batched_generation_drops_finished_groups_and_stops_rows_at_eos(served, monkeypatch):
    model, _ = served
    short, long = model.to_tokens("Hi there")[0], model.to_tokens(PROMPT)[0]
    groups = [GenerationGroup(short.expand(2, -1), 2), GenerationGroup(long[None], 7, temperature=1.0, seed=4)]
    seen = []

    def spy(acts, rows):
        seen.append(rows.tolist())
        return acts

    out = generate_groups(model, groups, {HOOK: spy})
    assert [len(t) for t in out[0]] == [2, 2] and [len(t) for t in out[1]] == [7]
    assert seen[0] == [0, 1, 2] and seen[-1] == [2]  # the short group left the batch after its 2 tokens
    alone = model.generate(long, 7, temperature=1.0, seed=4)[long.numel():]
    assert torch.equal(out[1][0], alone)
    # A row that samples EOS stops there; the group ends once all its rows have.
    greedy = generate_groups(model, [GenerationGroup(long[None], 6)])[0][0]
    eos = int(greedy[2])
    monkeypatch.setattr(model, "eos_token_id", eos)
    stopped = generate_groups(model, [GenerationGroup(long[None], 6, stop_at_eos=True)])[0][0]
    first = int((greedy == eos).nonzero()[0])
    assert torch.equal(stopped, greedy[:first + 1]) and first < 5


def test_batched_generation_on_a_hooked_transformer_serves_groups_one_by_one(hooked):
    sae = create_sae(SAEConfig(d_in=D_MODEL, d_sae=64, architecture="topk", k=4))
    requests = [SteeringRequest("", (SteeringFeature(sae, "blocks.0.hook_resid_post", i, 30.0),), method=m)
                for i, m in ((1, "clamp"), (2, "additive"))]
    prompts = [torch.arange(5, 15), torch.arange(20, 26)]
    groups = [GenerationGroup(p.expand(2, -1), 5, temperature=0.9, seed=i) for i, p in enumerate(prompts)]
    out = generate_groups(hooked, groups, batch_replacements(requests))
    for i, (prompt, request) in enumerate(zip(prompts, requests)):
        one = batch_replacements([request])
        alone = generate_groups(hooked, [groups[i]], one)
        assert all(torch.equal(a, b) for a, b in zip(out[i], alone[0]))
        replace = steering_replacements(request.features, request.method, rows=1)
        plain = hooked.generate(prompt.expand(2, -1), 5, temperature=0.9, seed=i, replace=replace, positionwise=True)
        assert torch.equal(torch.stack(out[i]), plain[:, prompt.numel():])


def test_texts_encoded_together_get_what_each_gets_alone(served):
    model, sae = served
    texts = [PROMPT, "Hi", "Once upon a time, in a kingdom by the sea, there lived", ""]
    together = encode_many(model, [EncodeRequest(sae, HOOK, t) for t in texts], max_text_tokens=12)
    assert isinstance(together[3], ValueError) and "no tokens" in str(together[3])
    assert isinstance(together[2], ValueError) and "at most 12" in str(together[2])
    for text, result in zip(texts[:2], together[:2]):
        alone = encode_text(model, sae, HOOK, text)
        assert result.token_ids == alone.token_ids and result.tokens == alone.tokens
        assert torch.equal(result.codes.indices, alone.codes.indices)
        assert torch.allclose(result.codes.values, alone.codes.values, atol=1e-5)


def test_micro_batcher_gathers_concurrent_requests_and_keeps_errors_to_their_caller():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from sae_kit.batching import MicroBatcher

    lock = threading.Lock()

    def run(items):
        assert lock.locked()  # batches run under the given lock
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    batcher = MicroBatcher(run, window_s=0.2, lock=lock)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(batcher, i) for i in (1, 2, -3, 4, 5, 6)]
    results = []
    for future in futures:
        try:
            results.append(future.result())
        except ValueError as error:
            results.append(str(error))
    assert results == [10, 20, "bad -3", 40, 50, 60]
    assert sum(batcher.batch_sizes) == 6 and max(batcher.batch_sizes) > 1

    def broken(items):
        raise RuntimeError("the model fell over")

    with pytest.raises(RuntimeError, match="fell over"):
        MicroBatcher(broken)(1)

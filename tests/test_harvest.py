"""Harvesting activations into stores (sae_kit.harvest): rows, resume after a kill, ModelSource.

Most tests use a tiny random HookedTransformer (GPT-2 layout, 2 layers, d_model 32) with SmolLM2's
tokenizer, so a whole harvest takes a fraction of a second; the LLaMA path is checked once on the
real SmolLM2 (a module-scoped fixture, ~2000 rows at context 64). Text is a few KB of the bundled
corpus written to a local .txt file (one document per paragraph).

Kill-and-resume is tested three ways against one uninterrupted reference store, comparing the
manifests (per-shard row counts and sha256) and every shard tensor:
* a real SIGKILL of `sae-kit harvest` (``cli.main`` in a forked child, so no 5 s re-import), at a
  moment chosen by the parent, then the same command again;
* SIGKILLs at exact points in a forked child: between the two hooks' shard writes (one store a
  shard ahead of the other) and between a shard's rename and its manifest update (orphan shard);
* an exception from ``model.capture`` (Ctrl-C / a crash in-process), then ``harvest`` again.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_kit import cli
from sae_kit.harvest import HarvestConfig, ModelSource, WindowStream, harvest, rows_of_batch, store_path
from sae_kit.models import LanguageModel, ensure_smollm2_cache, load_model
from sae_kit.store import MANIFEST_NAME, ActivationStore, ActivationStoreWriter, StoreError
from sae_kit.text import iter_texts

pytestmark = [
    pytest.mark.filterwarnings("ignore:HookedTransformer:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
]

HOOK_A = "blocks.0.mlp.hook_post"  # d_mlp = 128
HOOK_B = "blocks.1.hook_resid_post"  # d_model = 32
HOOKS = [HOOK_A, HOOK_B]
WIDTH = {HOOK_A: 128, HOOK_B: 32}
CONTEXT = 16  # 15 rows per window once BOS is skipped
BATCH = 4  # windows per forward: 60 rows
TOKENS = 600
SHARD = 50  # not a multiple of the 15 rows per window, so shards end mid-window


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------
def _paragraphs(count: int) -> list[str]:
    text = next(iter_texts("default"))  # the first work of the bundled corpus
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40]
    assert len(paragraphs) >= count
    return paragraphs[:count]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(_paragraphs(160)) + "\n")
    return path


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text("\n\n".join(_paragraphs(40)) + "\n")  # documents 19 and 39 are held out
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_smollm2_cache(), local_files_only=True)


def _tiny_model(tokenizer, name: str = "tiny-gpt2", seed: int = 0) -> LanguageModel:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=128,
                                  d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN", seed=seed,
                                  device="cpu")
    return LanguageModel.from_hooked_transformer(HookedTransformer(cfg), tokenizer, name=name)


@pytest.fixture(scope="module")
def tiny(tokenizer) -> LanguageModel:
    return _tiny_model(tokenizer)


def _cfg(out, corpus, **overrides) -> HarvestConfig:
    settings = dict(out=str(out), hooks=list(HOOKS), model="tiny-gpt2", dataset=str(corpus), context=CONTEXT,
                    batch_size=BATCH, tokens=TOKENS, shard_tokens=SHARD, progress=False)
    settings.update(overrides)
    return HarvestConfig(**settings)


@pytest.fixture(scope="module")
def reference(tiny, corpus, tmp_path_factory) -> Path:
    """An uninterrupted harvest of both hooks, the store every resumed harvest must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    harvest(_cfg(out, corpus), tiny)
    return out


def _expected_rows(model, cfg: HarvestConfig, n_rows: int, hooks=None) -> dict[str, tuple[torch.Tensor, ...]]:
    """(activations, token ids, positions) of the first ``n_rows`` kept rows, recomputed batch by batch."""
    hooks = hooks or cfg.hooks
    stream = WindowStream(cfg, model.tokenizer)
    parts: dict[str, list[tuple[torch.Tensor, ...]]] = {hook: [] for hook in hooks}
    total = 0
    for tokens in stream.batches():
        captured = model.capture(tokens, hooks)
        keep = stream.keep_mask(tokens)
        for hook in hooks:
            parts[hook].append(rows_of_batch(tokens, keep, captured[hook]))
        total += int(keep.sum())
        if total >= n_rows:
            break
    return {hook: tuple(torch.cat(column)[:n_rows] for column in zip(*chunks)) for hook, chunks in parts.items()}


def _manifest(directory: Path) -> dict:
    return json.loads((Path(directory) / MANIFEST_NAME).read_text())


def assert_same_store(got: Path, want: Path) -> None:
    """Same manifest (row counts, shard layout, sha256) and bit-identical shard tensors; no stray files."""
    got_manifest, want_manifest = _manifest(got), _manifest(want)
    assert got_manifest["total_tokens"] == want_manifest["total_tokens"]
    assert [s["n_tokens"] for s in got_manifest["shards"]] == [s["n_tokens"] for s in want_manifest["shards"]]
    assert got_manifest == want_manifest
    for shard in want_manifest["shards"]:
        got_tensors, want_tensors = load_file(str(got / shard["file"])), load_file(str(want / shard["file"]))
        assert got_tensors.keys() == want_tensors.keys() == {"activations", "token_ids", "positions"}
        for name in want_tensors:
            assert torch.equal(got_tensors[name], want_tensors[name]), (shard["file"], name)
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())


def assert_same_harvest(got_out: Path, want_out: Path) -> None:
    for hook in HOOKS:
        assert_same_store(store_path(got_out, hook), store_path(want_out, hook))


def _run_in_child(target, *, kill_when=None, timeout: float = 60.0) -> int:
    """Run ``target()`` in a forked child; SIGKILL it once ``kill_when()`` is true. Returns the wait status."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 0
        try:
            target()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if kill_when is not None and kill_when():
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child harvest did not finish within {timeout} s")
        time.sleep(0.002)


def _killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# --------------------------------------------------------------------------------------------------
# 1. What a harvest writes (GPT-2 layout, HookedTransformer)
# --------------------------------------------------------------------------------------------------
def test_harvest_writes_one_store_per_hook_with_the_models_rows(tiny, corpus, reference):
    cfg = _cfg(reference, corpus)
    stores = {hook: ActivationStore(store_path(reference, hook)) for hook in HOOKS}
    expected = _expected_rows(tiny, cfg, TOKENS)
    windows = list(itertools.islice(WindowStream(cfg, tiny.tokenizer).windows(), TOKENS // (CONTEXT - 1)))
    for hook, store in stores.items():
        assert store.directory == store_path(reference, hook) == reference / hook
        assert store.n_tokens == TOKENS and store.d_in == WIDTH[hook] and store.dtype == torch.float32
        manifest = _manifest(store.directory)
        assert [s["n_tokens"] for s in manifest["shards"]] == [SHARD] * (TOKENS // SHARD)
        assert (manifest["model_name"], manifest["hook_name"], manifest["context_size"]) == ("tiny-gpt2", hook, CONTEXT)
        assert manifest["metadata"]["dataset"] == str(corpus)
        assert manifest["metadata"]["model_class_name"] == "HookedTransformer"
        acts, ids, positions = expected[hook]
        # Every row is the model's activation at that position (the first batch alone: 60 rows).
        assert torch.equal(store.read(0, BATCH * (CONTEXT - 1)), acts[: BATCH * (CONTEXT - 1)])
        assert torch.equal(store.read(0, TOKENS), acts)
        assert torch.equal(store.tokens(0, TOKENS), ids)
        assert torch.equal(store.positions(0, TOKENS), positions)
        # BOS (position 0) is skipped: each window gives positions 1..15 with its own token ids.
        assert store.positions(0, TOKENS).min() == 1
        assert torch.equal(store.positions(0, TOKENS), torch.arange(1, CONTEXT).repeat(TOKENS // (CONTEXT - 1)))
        assert torch.equal(store.tokens(0, TOKENS), torch.stack(windows)[:, 1:].flatten())
    assert (tiny.tokenizer.bos_token_id == torch.stack(windows)[:, 0]).all()


def test_first_batch_rows_equal_capture_on_the_same_windows(tiny, corpus, reference):
    cfg = _cfg(reference, corpus)
    first = torch.stack(list(itertools.islice(WindowStream(cfg, tiny.tokenizer).windows(), BATCH)))
    captured = tiny.capture(first, HOOKS)
    for hook in HOOKS:
        rows = captured[hook][:, 1:].reshape(-1, WIDTH[hook])  # drop position 0 of each window
        assert torch.equal(ActivationStore(store_path(reference, hook)).read(0, rows.shape[0]), rows)


def test_keep_bos_stores_position_zero_and_dtype_is_respected(tiny, corpus, tmp_path):
    cfg = _cfg(tmp_path, corpus, hooks=[HOOK_B], skip_bos=False, tokens=2 * CONTEXT + 5, dtype="bfloat16")
    store = harvest(cfg, tiny)[HOOK_B]
    assert store.n_tokens == 2 * CONTEXT + 5 and store.dtype == torch.bfloat16
    assert torch.equal(store.positions(0, store.n_tokens)[: 2 * CONTEXT], torch.arange(CONTEXT).repeat(2))
    acts = _expected_rows(tiny, cfg, store.n_tokens)[HOOK_B][0]
    assert torch.equal(store.read(0, store.n_tokens), acts.to(torch.bfloat16))


def test_unknown_hook_fails_before_anything_is_written(tiny, corpus, tmp_path):
    with pytest.raises(ValueError, match="Unknown hook"):
        harvest(_cfg(tmp_path / "out", corpus, hooks=[HOOK_B, "blocks.0.hook_resid_psot"]), tiny)
    assert not (tmp_path / "out").exists()


def test_too_few_tokens_in_the_dataset_is_a_clear_error(tiny, small_corpus, tmp_path):
    with pytest.raises(ValueError, match="ran out after"):
        harvest(_cfg(tmp_path, small_corpus, hooks=[HOOK_B], tokens=10**6), tiny)


# --------------------------------------------------------------------------------------------------
# 2. The LLaMA path: real SmolLM2 through the transformer-lens bridge
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> LanguageModel:
    return load_model("smollm2")


class _Stop(Exception):
    pass


def test_smollm2_harvest_equals_a_plain_forward_hook_on_the_hf_model(smollm2, corpus, tmp_path):
    hook = "blocks.6.hook_resid_post"
    cfg = HarvestConfig(out=str(tmp_path), hooks=[hook], model="smollm2", dataset=str(corpus), context=64,
                        batch_size=8, tokens=2000, shard_tokens=1024, progress=False)
    store = harvest(cfg, smollm2)[hook]
    assert (store.n_tokens, store.d_in) == (2000, 576)
    assert [s["n_tokens"] for s in _manifest(store.directory)["shards"]] == [1024, 976]

    # The reference: the unwrapped HF LlamaForCausalLM that shares the bridge's weights, with the
    # eager attention the bridge uses, and a plain torch forward hook on model.layers[6].
    hf = smollm2._generation_model
    assert type(hf).__name__ == "LlamaForCausalLM"
    previous = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    seen: list[torch.Tensor] = []

    def grab(module, inputs, output):
        seen.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop  # nothing after layer 6 is needed

    handle = hf.model.layers[6].register_forward_hook(grab)
    stream = WindowStream(cfg, smollm2.tokenizer)
    rows, ids = [], []
    try:
        for tokens in stream.batches():
            with torch.no_grad(), pytest.raises(_Stop):
                hf(tokens)
            keep = stream.keep_mask(tokens)
            rows.append(seen.pop()[keep])
            ids.append(tokens[keep])
            if sum(r.shape[0] for r in rows) >= 2000:
                break
    finally:
        handle.remove()
        hf.set_attn_implementation(previous)
    reference = torch.cat(rows)[:2000]
    torch.testing.assert_close(store.read(0, 2000), reference, rtol=0, atol=1e-5)
    assert torch.equal(store.tokens(0, 2000), torch.cat(ids)[:2000])
    assert store.positions(0, 2000).min() == 1  # BOS skipped on the real model too
    assert store.read(0, 2000).norm(dim=1).max() < 1e3  # no attention-sink outlier rows slipped in


# --------------------------------------------------------------------------------------------------
# 3. Kill and resume
# --------------------------------------------------------------------------------------------------
def _cli_args(out, corpus) -> list[str]:
    return ["harvest", "--model", "tiny-gpt2", "--hook", HOOK_A, "--hook", HOOK_B, "--dataset", str(corpus),
            "--tokens", str(TOKENS), "--context", str(CONTEXT), "--batch-size", str(BATCH),
            "--shard-tokens", str(SHARD), "--no-progress", "--out", str(out)]


@pytest.fixture
def cli_loads_tiny(tiny, monkeypatch):
    import sae_kit.models

    def fake_load_model(name, **kwargs):
        assert name == "tiny-gpt2"
        return tiny

    monkeypatch.setattr(sae_kit.models, "load_model", fake_load_model)


def test_sigkilled_cli_harvest_rerun_gives_the_uninterrupted_store(tiny, corpus, reference, tmp_path,
                                                                    cli_loads_tiny, capsys):
    out = tmp_path / "acts"

    def slow_cli_harvest():
        real_capture = tiny.capture

        def slow_capture(tokens, hooks):
            time.sleep(0.1)  # ~1 s in all: the parent kills it long before the end
            return real_capture(tokens, hooks)

        tiny.capture = slow_capture  # only in the child
        cli.main(_cli_args(out, corpus))

    def some_shards_exist():
        return all((store_path(out, hook) / "shard_00002.safetensors").exists() for hook in HOOKS)

    status = _run_in_child(slow_cli_harvest, kill_when=some_shards_exist)
    assert _killed(status), "the harvest finished before it could be killed"
    killed_totals = [_manifest(store_path(out, hook))["total_tokens"] for hook in HOOKS]
    assert all(0 < total < TOKENS for total in killed_totals)

    assert cli.main(_cli_args(out, corpus)) == 0  # the same command again
    printed = capsys.readouterr().out
    assert f"{HOOK_A}: {TOKENS} rows of d_in=128" in printed and f"{HOOK_B}: {TOKENS} rows of d_in=32" in printed
    assert_same_harvest(out, reference)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("moment", ["between_hooks", "before_manifest"])
def test_sigkill_at_exact_moments_then_resume(tiny, corpus, reference, tmp_path, monkeypatch, moment):
    """Killed when hook A's store is one shard ahead of B's, or with A's shard renamed but unlisted."""
    out = tmp_path / "acts"
    cfg = _cfg(out, corpus)
    fatal_shard = 5  # A's 6th shard (0-based 5)

    def child():
        import sae_kit.store as store_module

        if moment == "between_hooks":
            write_shard = ActivationStoreWriter._write_shard

            def write_then_die(self, *args):
                write_shard(self, *args)
                if self.directory.name == HOOK_A and len(self._manifest["shards"]) == fatal_shard + 1:
                    _kill_self()

            ActivationStoreWriter._write_shard = write_then_die
        else:
            write_manifest = store_module._write_manifest

            def die_before_manifest(directory, manifest):
                if directory.name == HOOK_A and len(manifest["shards"]) == fatal_shard + 1:
                    _kill_self()
                write_manifest(directory, manifest)

            store_module._write_manifest = die_before_manifest
        harvest(cfg, tiny)

    assert _killed(_run_in_child(child))
    a, b = _manifest(store_path(out, HOOK_A)), _manifest(store_path(out, HOOK_B))
    orphan = store_path(out, HOOK_A) / f"shard_{fatal_shard:05d}.safetensors"
    if moment == "between_hooks":
        # Batch 5 (rows 240..299) completes A's shards 4 and 5; B has not appended it yet.
        assert (len(a["shards"]), len(b["shards"])) == (fatal_shard + 1, fatal_shard - 1)  # A ahead
    else:
        assert (len(a["shards"]), len(b["shards"])) == (fatal_shard, fatal_shard - 1)
        assert orphan.exists()  # on disk, not in the manifest: adopted on resume

    stores = harvest(cfg, tiny)
    assert {hook: store.n_tokens for hook, store in stores.items()} == {HOOK_A: TOKENS, HOOK_B: TOKENS}
    assert_same_harvest(out, reference)


def test_exception_mid_harvest_then_rerun_gives_the_uninterrupted_store(tiny, corpus, reference, tmp_path,
                                                                        monkeypatch):
    """An in-process interruption (Ctrl-C, a crash in the model) must not leave a short shard behind."""
    out = tmp_path / "acts"
    cfg = _cfg(out, corpus)
    real_capture = tiny.capture
    calls: list[torch.Tensor] = []

    def failing_capture(tokens, hooks):
        if len(calls) == 4:  # after 4 batches = 240 rows: 4 shards of 50 written, 40 rows buffered
            raise KeyboardInterrupt
        calls.append(tokens)
        return real_capture(tokens, hooks)

    monkeypatch.setattr(tiny, "capture", failing_capture)
    with pytest.raises(KeyboardInterrupt):
        harvest(cfg, tiny)
    for hook in HOOKS:
        # Only whole shards reach disk, as after a SIGKILL; a flushed partial shard would shift
        # every later shard boundary (and the store's shuffling units with them).
        assert [s["n_tokens"] for s in _manifest(store_path(out, hook))["shards"]] == [SHARD] * 4

    resumed: list[torch.Tensor] = []

    def recording_capture(tokens, hooks):
        resumed.append(tokens)
        return real_capture(tokens, hooks)

    monkeypatch.setattr(tiny, "capture", recording_capture)
    harvest(cfg, tiny)
    assert_same_harvest(out, reference)

    # The re-run recomputes whole batches of the uninterrupted run (same windows batched together,
    # so activations cannot depend on a different batch composition) and skips the stored ones.
    all_batches = list(itertools.islice(WindowStream(cfg, tiny.tokenizer).batches(), TOKENS // (BATCH * (CONTEXT - 1))))
    first = next(i for i, batch in enumerate(all_batches) if torch.equal(batch, resumed[0]))
    assert first == 3  # row 200 lies in batch 3 (rows 180..239)
    assert all(torch.equal(a, b) for a, b in zip(resumed, all_batches[first:]))
    assert len(resumed) == len(all_batches) - first


def test_one_hook_harvested_first_then_both(tiny, corpus, reference, tmp_path):
    """Stores that start a re-run at different row counts (A 4 shards ahead, B empty)."""
    out = tmp_path / "acts"
    harvest(_cfg(out, corpus, hooks=[HOOK_A], tokens=4 * SHARD), tiny)
    assert _manifest(store_path(out, HOOK_A))["total_tokens"] == 4 * SHARD
    harvest(_cfg(out, corpus), tiny)
    assert_same_harvest(out, reference)
    # A complete harvest re-run is a no-op.
    before = {hook: _manifest(store_path(out, hook)) for hook in HOOKS}
    harvest(_cfg(out, corpus), tiny)
    assert {hook: _manifest(store_path(out, hook)) for hook in HOOKS} == before


# --------------------------------------------------------------------------------------------------
# 4. Resuming a different harvest
# --------------------------------------------------------------------------------------------------
def test_resuming_with_different_data_context_or_model_is_refused(tiny, tokenizer, corpus, small_corpus,
                                                                 tmp_path, cli_loads_tiny, capsys):
    out = tmp_path / "acts"
    harvest(_cfg(out, corpus, tokens=2 * SHARD), tiny)
    before = {hook: _manifest(store_path(out, hook)) for hook in HOOKS}
    other_model = _tiny_model(tokenizer, name="another-model", seed=1)
    attempts = [
        (_cfg(out, small_corpus), tiny, "metadata"),
        (_cfg(out, corpus, split="all"), tiny, "metadata"),
        (_cfg(out, corpus, skip_bos=False), tiny, "metadata"),
        (_cfg(out, corpus, context=CONTEXT + 8), tiny, "context_size"),
        (_cfg(out, corpus, dtype="float16"), tiny, "dtype"),
        (_cfg(out, corpus), other_model, "model_name"),
    ]
    for cfg, model, field in attempts:
        with pytest.raises(StoreError, match=f"Cannot resume.*its {field} is"):
            harvest(cfg, model)
        assert {hook: _manifest(store_path(out, hook)) for hook in HOOKS} == before  # untouched
    # Through the CLI: exit status 2 and the reason.
    args = _cli_args(out, small_corpus)
    assert cli.main(args) == 2
    assert "Cannot resume" in capsys.readouterr().err
    # The original harvest still continues.
    harvest(_cfg(out, corpus), tiny)
    assert ActivationStore(store_path(out, HOOK_B)).n_tokens == TOKENS


# --------------------------------------------------------------------------------------------------
# 5. ModelSource: activations straight from the model, for the trainer
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tiny, small_corpus) -> ModelSource:
    return ModelSource(tiny, HOOK_B, dataset=str(small_corpus), context=CONTEXT, batch_size=BATCH, block_windows=8)


def _train_windows(tiny, small_corpus, split="train") -> torch.Tensor:
    cfg = HarvestConfig(out="", hooks=[HOOK_B], dataset=str(small_corpus), context=CONTEXT)
    return torch.stack(list(WindowStream(cfg, tiny.tokenizer, split=split).windows()))


def test_model_source_batches_shapes_and_provenance(source, tiny):
    batches = list(itertools.islice(source.iter_batches(32), 5))
    assert all(b.shape == (32, 32) and b.dtype == torch.float32 for b in batches)
    assert source.d_in == 32 and source.hook_name == HOOK_B and source.context_size == CONTEXT
    meta = source.metadata_for_sae()
    assert (meta["model_name"], meta["hook_name"], meta["context_size"]) == ("tiny-gpt2", HOOK_B, CONTEXT)
    with pytest.raises(ValueError, match="Unknown hook"):
        ModelSource(tiny, "blocks.9.hook_resid_post")


def test_model_source_rows_are_shuffled_within_blocks_of_the_models_rows(source, tiny, small_corpus):
    windows = _train_windows(tiny, small_corpus)
    block = windows[:8]
    exact = torch.cat([tiny.capture(chunk, [HOOK_B])[HOOK_B][:, 1:] for chunk in block.split(BATCH)]).flatten(0, 1)
    first_block = next(source.iter_batches(exact.shape[0]))  # 8 windows x 15 rows
    assert not torch.equal(first_block, exact)  # shuffled ...
    assert torch.equal(first_block[first_block[:, 0].argsort()], exact[exact[:, 0].argsort()])  # ... same rows
    assert not torch.equal(first_block, next(source.iter_batches(exact.shape[0], seed=1)))


def test_model_source_start_batch_equals_the_nth_batch(source):
    rows_per_epoch = sum(b.shape[0] for b in source.iter_batches(32, epochs=1, drop_last=False))
    per_epoch = rows_per_epoch // 32
    n_batches = per_epoch + 3  # crosses into the second epoch
    fresh = list(itertools.islice(source.iter_batches(32, seed=3), n_batches))
    assert not torch.equal(fresh[0], fresh[per_epoch + 1])
    for n in (1, 4, 5, per_epoch - 1, per_epoch, per_epoch + 2):
        resumed = next(source.iter_batches(32, seed=3, start_batch=n))
        assert torch.equal(resumed, fresh[n]), n
    # Epochs are reshuffled: epoch 1 holds the same rows as epoch 0 in another order.
    epoch0 = torch.cat(list(source.iter_batches(32, seed=3, epochs=1, drop_last=False)))
    epoch1 = torch.cat(list(source.iter_batches(32, seed=3, epochs=2, drop_last=False)))[rows_per_epoch:]
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch0[epoch0[:, 0].argsort()], epoch1[epoch1[:, 0].argsort()])


def test_model_source_heldout_split_is_other_text_in_order(source, tiny, small_corpus):
    heldout = torch.cat(list(source.iter_batches(16, split="heldout", epochs=1, drop_last=False)))
    windows = _train_windows(tiny, small_corpus, split="heldout")
    expected = torch.cat([tiny.capture(chunk, [HOOK_B])[HOOK_B][:, 1:] for chunk in windows.split(BATCH)])
    assert torch.equal(heldout, expected.flatten(0, 1))  # not shuffled, exactly the held-out windows
    train = torch.cat(list(source.iter_batches(64, epochs=1)))
    assert heldout.shape[0] > 0 and train.shape[0] > 5 * heldout.shape[0]
    shared = (torch.cdist(heldout, train).min(dim=1).values == 0).float().mean()
    assert shared < 0.1  # other text (only a row like BOS + a common first token can coincide)
    assert torch.equal(heldout, torch.cat(list(source.iter_batches(16, split="heldout", epochs=1, drop_last=False))))


def _train_cfg(out, **overrides):
    from sae_kit.train.trainer import TrainConfig

    settings = dict(out=str(out), architecture="topk", k=4, expansion=2, batch_size=64, tokens=64 * 6,
                    warmup_steps=1, eval_every=3, eval_tokens=64, log_every=1, checkpoint_every=3, init_tokens=128,
                    progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_training_through_a_model_source_runs_and_resumes_exactly(source, tmp_path):
    from sae_kit.sae import load_sae
    from sae_kit.train.trainer import Trainer

    sae = Trainer(_train_cfg(tmp_path / "run"), source=source).run()
    saved = load_sae(tmp_path / "run" / "sae")
    assert saved.cfg.metadata["hook_name"] == HOOK_B and saved.cfg.metadata["model_name"] == "tiny-gpt2"
    assert saved.cfg.metadata["context_size"] == CONTEXT
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3, 4, 5, 6]
    evaluation = json.loads((tmp_path / "run" / "sae" / "eval.json").read_text())
    assert 0 < evaluation["fvu"] < 10 and evaluation["n_tokens"] == 64

    class FlakySource:
        """The same source, but the iteration dies at the 5th training batch (after the step-3 checkpoint)."""

        def __init__(self, inner):
            self.inner, self.d_in = inner, inner.d_in

        def metadata_for_sae(self):
            return self.inner.metadata_for_sae()

        def sample(self, *args, **kwargs):
            return self.inner.sample(*args, **kwargs)

        def iter_batches(self, batch_size, *, split="train", **kwargs):
            batches = self.inner.iter_batches(batch_size, split=split, **kwargs)
            if split != "train":
                return batches
            return (batch if i < 4 else _raise() for i, batch in enumerate(batches))

    def _raise():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(_train_cfg(tmp_path / "resumed"), source=FlakySource(source)).run()
    resumed = Trainer(_train_cfg(tmp_path / "resumed"), source=source, resume=True).run()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name

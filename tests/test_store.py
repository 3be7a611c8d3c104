from __future__ import annotations

import hashlib
import itertools
import json

import pytest
import torch

from sae_kit import store as store_module
from sae_kit.store import (
    MANIFEST_NAME,
    ActivationStore,
    ActivationStoreWriter,
    StoreError,
    write_store,
)

D_IN = 6


def make_data(n_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_rows, D_IN, generator=torch.Generator().manual_seed(seed))


def numbered_store(tmp_path, n_rows=103, shard_tokens=16, **kw):
    """A store whose token id of each row is its global row index, to track rows through batches."""
    data = make_data(n_rows)
    store = write_store(tmp_path / "store", data, token_ids=torch.arange(n_rows),
                        shard_tokens=shard_tokens, **kw)
    return store, data


def temp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


# -- writing and reading back -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_values(tmp_path, dtype):
    data = make_data(37) * 3
    token_ids = torch.randint(0, 50000, (37,))
    positions = torch.arange(37) % 9
    store = write_store(tmp_path, data, token_ids=token_ids, positions=positions,
                        dtype=dtype, shard_tokens=10)
    assert store.dtype == dtype and store.manifest["dtype"] == str(dtype).removeprefix("torch.")
    assert store.n_tokens == 37 and store.d_in == D_IN
    stored = store.read(0, 37)
    assert stored.dtype == dtype
    assert torch.equal(stored, data.to(dtype))
    # A range that crosses two shard boundaries.
    assert torch.equal(store.read(5, 23), data[5:23].to(dtype))
    assert torch.equal(store.read(12, 12), torch.empty(0, D_IN, dtype=dtype))
    assert torch.equal(store.tokens(3, 31), token_ids[3:31])
    assert torch.equal(store.positions(0, 37), positions)
    with pytest.raises(IndexError):
        store.read(30, 38)


def test_default_token_ids_and_positions(tmp_path):
    with ActivationStoreWriter(tmp_path, d_in=D_IN, context_size=4, shard_tokens=100) as writer:
        writer.append(make_data(6))
        writer.append(make_data(3))
    store = ActivationStore(tmp_path)
    assert store.tokens(0, 9).tolist() == [-1] * 9
    assert store.positions(0, 9).tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]


def test_shards_split_at_shard_tokens(tmp_path):
    data = make_data(25)
    with ActivationStoreWriter(tmp_path, d_in=D_IN, shard_tokens=10) as writer:
        writer.append(data[:9])
        assert writer.tokens_written == 0 and writer.tokens_pending == 9
        writer.append(data[9:12])
        assert writer.tokens_written == 10 and writer.tokens_pending == 2
        writer.append(data[12:25])  # fills the second shard, leaves 5 buffered
        assert writer.tokens_written == 20
    store = ActivationStore(tmp_path)
    assert [s["n_tokens"] for s in store.shards] == [10, 10, 5]
    assert [s["file"] for s in store.shards] == [
        "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    assert torch.equal(store.read(0, 25), data)


def test_one_append_larger_than_several_shards(tmp_path):
    data = make_data(47)
    store = write_store(tmp_path, data, shard_tokens=10)
    assert [s["n_tokens"] for s in store.shards] == [10, 10, 10, 10, 7]
    assert torch.equal(store.read(0, 47), data)


def test_manifest_contents_and_checksums(tmp_path):
    data = make_data(23)
    store = write_store(tmp_path, data, dtype="float16", shard_tokens=10, model_name="gpt2",
                        hook_name="blocks.3.hook_resid_post", context_size=8,
                        metadata={"dataset": "tiny", "layers": [3]})
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1
    assert manifest["model_name"] == "gpt2" and store.model_name == "gpt2"
    assert manifest["hook_name"] == "blocks.3.hook_resid_post" == store.hook_name
    assert manifest["d_in"] == D_IN and manifest["dtype"] == "float16"
    assert manifest["context_size"] == 8
    assert manifest["metadata"] == {"dataset": "tiny", "layers": [3]}
    assert manifest["total_tokens"] == 23
    for entry in manifest["shards"]:
        path = tmp_path / entry["file"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["size_bytes"] == path.stat().st_size
    assert temp_files(tmp_path) == []
    store.verify()  # intact store passes


def test_write_store_refuses_existing_store(tmp_path):
    write_store(tmp_path, make_data(5))
    with pytest.raises(FileExistsError):
        write_store(tmp_path, make_data(5))


# -- resume -------------------------------------------------------------------------------------


def test_resume_after_kill_between_shard_rename_and_manifest(tmp_path, monkeypatch):
    data = make_data(53)
    tokens = torch.arange(53)
    writer = ActivationStoreWriter(tmp_path, d_in=D_IN, shard_tokens=8, model_name="m")
    writer.append(data[:30], tokens[:30])  # shards 0-2 on disk, 6 rows buffered
    assert writer.tokens_written == 24

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(store_module, "_write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.append(data[30:35], tokens[30:35])  # shard 3 renamed in, manifest not updated
    monkeypatch.undo()
    del writer  # the process is gone; its 3 buffered rows are lost
    assert (tmp_path / "shard_00003.safetensors").exists()
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["total_tokens"] == 24
    # A shard write that was cut short leaves a hidden temp file.
    (tmp_path / ".shard_00004.safetensors.x1y2.tmp").write_bytes(b"partial")

    resumed = ActivationStoreWriter(tmp_path, d_in=D_IN, shard_tokens=8, model_name="m")
    assert resumed.tokens_written == 32  # orphan shard 3 adopted
    assert temp_files(tmp_path) == []
    done = resumed.tokens_written
    for start in range(done, 53, 7):  # the harvester skips what is already on disk
        resumed.append(data[start:start + 7], tokens[start:start + 7])
    resumed.close()

    store = ActivationStore(tmp_path)
    assert store.n_tokens == 53
    assert torch.equal(store.read(0, 53), data)
    assert torch.equal(store.tokens(0, 53), tokens)
    store.verify()


def finish_and_check(writer, directory, data, start):
    """Append data[start:], close, and check the store holds exactly ``data`` with valid checksums."""
    writer.append(data[start:])
    writer.close()
    store = ActivationStore(directory)
    assert torch.equal(store.read(0, len(data)), data)
    store.verify()


def test_failed_shard_write_can_be_retried_in_process(tmp_path, monkeypatch):
    data = make_data(40)
    writer = ActivationStoreWriter(tmp_path, d_in=D_IN, shard_tokens=8)
    writer.append(data[:10])
    real_write_manifest = store_module._write_manifest

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(store_module, "_write_manifest", disk_full)
    with pytest.raises(OSError):
        writer.append(data[10:30])  # shard 1 renamed in, its manifest write fails
    assert writer.tokens_written == 8 and writer.tokens_pending == 22
    monkeypatch.setattr(store_module, "_write_manifest", real_write_manifest)
    finish_and_check(writer, tmp_path, data, start=30)


def test_resume_deletes_unreadable_orphan_shard(tmp_path):
    data = make_data(30)
    with ActivationStoreWriter(tmp_path, d_in=D_IN, shard_tokens=10) as writer:
        writer.append(data[:20])
    (tmp_path / "shard_00002.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "shard_00007.safetensors").write_bytes(b"out of sequence")
    with pytest.warns(UserWarning, match="shard_0000"):
        writer = ActivationStoreWriter(tmp_path, d_in=D_IN, shard_tokens=10)
    assert writer.tokens_written == 20
    assert not (tmp_path / "shard_00007.safetensors").exists()
    finish_and_check(writer, tmp_path, data, start=20)


def test_resume_after_clean_close_continues_appending(tmp_path):
    data = make_data(17)
    write_store(tmp_path, data[:7], shard_tokens=5)
    with ActivationStoreWriter(tmp_path, d_in=D_IN, shard_tokens=5) as writer:
        assert writer.tokens_written == 7
        writer.append(data[7:])
    store = ActivationStore(tmp_path)
    assert [s["n_tokens"] for s in store.shards] == [5, 2, 5, 5]
    assert torch.equal(store.read(0, 17), data)


@pytest.mark.parametrize("field, value", [
    ("model_name", "other-model"), ("hook_name", "blocks.9.hook_mlp_out"),
    ("d_in", D_IN + 1), ("dtype", "bfloat16"),
])
def test_resume_with_mismatched_parameters_fails(tmp_path, field, value):
    params = dict(d_in=D_IN, dtype="float32", model_name="gpt2",
                  hook_name="blocks.3.hook_resid_post")
    with ActivationStoreWriter(tmp_path, **params) as writer:
        writer.append(make_data(4))
    with pytest.raises(StoreError, match=rf"{field}.*new directory"):
        ActivationStoreWriter(tmp_path, **{**params, field: value})


# -- damage detection ---------------------------------------------------------------------------


def test_truncated_shard_is_named_on_open(tmp_path):
    write_store(tmp_path, make_data(30), shard_tokens=10)
    shard = tmp_path / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(StoreError, match="shard_00001.safetensors"):
        ActivationStore(tmp_path)


def test_corrupted_bytes_are_found_by_verify(tmp_path):
    store = write_store(tmp_path, make_data(30), shard_tokens=10)
    shard = tmp_path / "shard_00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF  # inside the data region: same size, still parses
    shard.write_bytes(bytes(raw))
    store = ActivationStore(tmp_path)
    with pytest.raises(StoreError, match="shard_00002.safetensors") as excinfo:
        store.verify()
    assert "shard_00000" not in str(excinfo.value)


def test_unparseable_shard_is_named_at_open(tmp_path):
    write_store(tmp_path, make_data(20), shard_tokens=10)
    shard = tmp_path / "shard_00001.safetensors"
    shard.write_bytes(b"\xff" * shard.stat().st_size)  # same size: the header check at open finds it
    with pytest.raises(StoreError, match="shard_00001.safetensors"):
        ActivationStore(tmp_path)


def test_shard_with_wrong_shape_is_named_on_read(tmp_path):
    write_store(tmp_path, make_data(20), shard_tokens=10)
    other = write_store(tmp_path / "other", torch.randn(10, D_IN + 2), shard_tokens=10)
    wrong = tmp_path / "shard_00001.safetensors"
    wrong.write_bytes((other.directory / "shard_00000.safetensors").read_bytes())
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["shards"][1]["size_bytes"] = wrong.stat().st_size
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"shard_00001.safetensors.*\[n, 6\]"):
        ActivationStore(tmp_path).read(0, 20)


def test_missing_or_invalid_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json.*ActivationStoreWriter"):
        ActivationStore(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{ not json")
    with pytest.raises(StoreError, match=r"manifest\.json is not valid JSON"):
        ActivationStore(tmp_path)


# -- split and batches --------------------------------------------------------------------------


def test_split_is_tail_aligned_to_context_windows(tmp_path):
    store, _ = numbered_store(tmp_path, n_rows=100, context_size=8)
    split = store.split(0.1)  # boundary 100 - 10 = 90 moves down to the window start 88
    assert split.train == range(0, 88) and split.heldout == range(88, 100)
    assert set(split.train).isdisjoint(split.heldout)
    assert len(split.train) + len(split.heldout) == 100
    assert store.split(0.0).heldout == range(100, 100)
    train_rows = torch.cat([t for _, t in store.iter_batches(
        7, epochs=1, drop_last=False, heldout_fraction=0.1, with_tokens=True)])
    heldout_rows = torch.cat([t for _, t in store.iter_batches(
        7, split="heldout", epochs=1, drop_last=False, heldout_fraction=0.1, with_tokens=True)])
    assert heldout_rows.tolist() == list(range(88, 100))  # held out: in order, unshuffled
    assert sorted(train_rows.tolist() + heldout_rows.tolist()) == list(range(100))


def test_iter_batches_covers_train_rows_once_per_epoch(tmp_path):
    store, data = numbered_store(tmp_path)
    train = store.split(0.1).train
    assert train == range(0, 92)
    assert store.num_batches_per_epoch(10, heldout_fraction=0.1, drop_last=False) == 10
    batches = list(store.iter_batches(10, heldout_fraction=0.1, buffer_tokens=40, epochs=2,
                                      drop_last=False, with_tokens=True))
    assert len(batches) == 20
    assert [len(t) for _, t in batches[:10]] == [10] * 9 + [2]
    for epoch in range(2):
        rows = torch.cat([t for _, t in batches[epoch * 10:(epoch + 1) * 10]])
        assert sorted(rows.tolist()) == list(train)
        assert rows.tolist() != list(train)  # actually shuffled
    acts, rows = batches[3]
    assert acts.dtype == torch.float32 and acts.shape == (10, D_IN)
    assert torch.equal(acts, data[rows])  # activations stay paired with their token ids
    first_epoch = torch.cat([t for _, t in batches[:10]])
    second_epoch = torch.cat([t for _, t in batches[10:]])
    assert not torch.equal(first_epoch, second_epoch)  # each epoch reshuffles


def test_drop_last_drops_only_the_short_batch(tmp_path):
    store, _ = numbered_store(tmp_path)
    batches = list(store.iter_batches(10, heldout_fraction=0.1, epochs=1, with_tokens=True))
    assert len(batches) == store.num_batches_per_epoch(10, heldout_fraction=0.1) == 9
    rows = torch.cat([t for _, t in batches])
    assert len(set(rows.tolist())) == 90 and max(rows.tolist()) < 92


def test_iter_batches_is_deterministic_per_seed(tmp_path):
    store, _ = numbered_store(tmp_path)

    def run(seed):
        return list(store.iter_batches(8, seed=seed, buffer_tokens=32, epochs=1))

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.cat(first), torch.cat(other))


def test_in_buffer_shuffle_depends_on_seed_and_epoch(tmp_path):
    # One shard in one buffer: shard order cannot vary, so only the in-buffer permutation can.
    store, _ = numbered_store(tmp_path, n_rows=64, shard_tokens=64)

    def epoch_rows(seed, epoch):
        batches = store.iter_batches(8, split="all", seed=seed, start_batch=8 * epoch,
                                     epochs=epoch + 1, with_tokens=True)
        return torch.cat([t for _, t in batches])

    assert not torch.equal(epoch_rows(0, 0), epoch_rows(1, 0))
    assert not torch.equal(epoch_rows(0, 0), epoch_rows(0, 1))
    assert sorted(epoch_rows(0, 1).tolist()) == list(range(64))


@pytest.mark.parametrize("buffer_tokens", [16, 24, 1000])
def test_start_batch_equals_skipping(tmp_path, buffer_tokens):
    store, _ = numbered_store(tmp_path)
    per_epoch = store.num_batches_per_epoch(7)
    reference = list(store.iter_batches(7, buffer_tokens=buffer_tokens, seed=3, epochs=3))
    assert len(reference) == 3 * per_epoch
    for start in (1, 5, per_epoch - 1, per_epoch, per_epoch + 2, 3 * per_epoch - 1):
        resumed = list(store.iter_batches(7, buffer_tokens=buffer_tokens, seed=3, epochs=3,
                                          start_batch=start))
        assert len(resumed) == len(reference) - start
        assert all(torch.equal(a, b) for a, b in zip(resumed, reference[start:], strict=True))
    # Endless iteration crosses epochs exactly like the bounded one.
    endless = store.iter_batches(7, buffer_tokens=buffer_tokens, seed=3, start_batch=per_epoch - 1)
    for got, want in zip(itertools.islice(endless, 3), reference[per_epoch - 1:per_epoch + 2]):
        assert torch.equal(got, want)


def test_start_batch_does_not_read_skipped_buffers(tmp_path, monkeypatch):
    store, _ = numbered_store(tmp_path, n_rows=160, shard_tokens=16)
    per_epoch = store.num_batches_per_epoch(8, split="all")
    reads = []
    original = ActivationStore._read_shard_rows

    def counting(self, shard, start, stop, names):
        reads.append(shard)
        return original(self, shard, start, stop, names)

    monkeypatch.setattr(ActivationStore, "_read_shard_rows", counting)
    batches = store.iter_batches(8, split="all", buffer_tokens=16, start_batch=per_epoch - 1)
    next(batches)
    assert len(reads) == 1  # one 16-row shard per buffer: only the last buffer is read


def test_sample_returns_distinct_train_rows(tmp_path):
    store, data = numbered_store(tmp_path)
    sampled = store.sample(30, seed=5, heldout_fraction=0.1)
    assert sampled.shape == (30, D_IN)
    matches = (sampled[:, None, :] == data[None, :, :]).all(-1)  # [30, 103]
    row_of_sample = matches.float().argmax(1)
    assert matches.any(1).all()
    assert len(set(row_of_sample.tolist())) == 30 and row_of_sample.max() < 92
    assert torch.equal(sampled, store.sample(30, seed=5, heldout_fraction=0.1))
    assert not torch.equal(sampled, store.sample(30, seed=6, heldout_fraction=0.1))
    with pytest.raises(ValueError):
        store.sample(93, heldout_fraction=0.1)


def test_iter_batches_rejects_too_small_split(tmp_path):
    store, _ = numbered_store(tmp_path, n_rows=20)
    with pytest.raises(ValueError, match="not enough for one batch"):
        store.iter_batches(64)
    with pytest.raises(ValueError, match="split must be one of"):
        store.iter_batches(4, split="test")


# -- append boundary checks ---------------------------------------------------------------------


@pytest.mark.parametrize("activations, token_ids, positions, message", [
    (torch.randn(4, D_IN + 1), None, None, r"shape \[N, 6\]"),
    (torch.randn(D_IN), None, None, r"shape \[N, 6\]"),
    (torch.ones(4, D_IN, dtype=torch.int64), None, None, "floating-point"),
    (torch.randn(4, D_IN), torch.arange(3), None, r"token_ids must have shape \[4\]"),
    (torch.randn(4, D_IN), torch.zeros(4), None, "token_ids must be an integer"),
    (torch.randn(4, D_IN), None, torch.zeros(4, 1, dtype=torch.int64), "positions must have"),
    (torch.randn(4, D_IN), torch.full((4,), 2**40), None, "int32"),
    (torch.full((4, D_IN), 1e6), None, None, "float16"),
])
def test_append_rejects_bad_inputs(tmp_path, activations, token_ids, positions, message):
    writer = ActivationStoreWriter(tmp_path, d_in=D_IN, dtype="float16")
    with pytest.raises(ValueError, match=message):
        writer.append(activations, token_ids, positions)
    writer.close()
    assert writer.tokens_written == 0  # nothing half-appended


def test_append_after_close_fails_and_buffer_is_a_copy(tmp_path):
    rows = make_data(4)
    original = rows.clone()
    writer = ActivationStoreWriter(tmp_path, d_in=D_IN)
    writer.append(rows)
    rows.zero_()  # callers may reuse their tensor right after append
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.append(rows)
    assert torch.equal(ActivationStore(tmp_path).read(0, 4), original)

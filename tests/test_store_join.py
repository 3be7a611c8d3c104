"""Parallel harvest: parts harvested separately and joined give the single harvest's rows exactly."""
from __future__ import annotations

import json

import pytest
import torch

from sae_kit import cli
from sae_kit.harvest import HarvestConfig, harvest
from sae_kit.models import ensure_smollm2_cache
from sae_kit.store import ActivationStore, StoreError
from sae_kit.store_join import join_stores
from test_harvest import _paragraphs, _tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer:DeprecationWarning")

HOOK = "blocks.1.hook_resid_post"
SETTINGS = dict(hooks=[HOOK], model="tiny-gpt2", context=16, batch_size=4, tokens=700, shard_tokens=50, progress=False)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoTokenizer

    return _tiny_model(AutoTokenizer.from_pretrained(ensure_smollm2_cache(), local_files_only=True))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(_paragraphs(160)) + "\n")
    return path


def rows(store: ActivationStore) -> tuple[torch.Tensor, ...]:
    n = store.n_tokens
    return store.read(0, n), store.tokens(0, n), store.positions(0, n)


def test_three_parts_joined_equal_one_harvest(model, corpus, tmp_path):
    single = harvest(HarvestConfig(out=str(tmp_path / "single"), dataset=str(corpus), **SETTINGS), model)[HOOK]
    parts = []
    for part in (2, 0, 1):  # any order, as separate jobs would finish
        out = tmp_path / f"part{part}"
        harvest(HarvestConfig(out=str(out), dataset=str(corpus), part=part, parts=3, **SETTINGS), model)
        parts.append(out / HOOK)
    assert ActivationStore(parts[1]).n_tokens == 700 // 3  # part 0: rows [0, 233)
    joined = join_stores(parts, tmp_path / "joined")
    joined.verify()
    assert joined.n_tokens == single.n_tokens == 700
    for ours, theirs in zip(rows(joined), rows(single)):
        assert torch.equal(ours, theirs)
    assert "harvest_part" not in joined.metadata and joined.metadata == single.metadata
    assert joined.split(0.05).heldout == single.split(0.05).heldout
    with pytest.raises(FileExistsError):
        join_stores(parts, tmp_path / "joined")


def test_a_missing_or_unfinished_part_is_refused(model, corpus, tmp_path):
    cfgs = [HarvestConfig(out=str(tmp_path / f"p{i}"), dataset=str(corpus), part=i, parts=2, **SETTINGS) for i in (0, 1)]
    harvest(cfgs[0], model)
    with pytest.raises(StoreError, match=r"missing \[1\]"):
        join_stores([tmp_path / "p0" / HOOK], tmp_path / "joined")
    harvest(cfgs[1], model)
    manifest_path = tmp_path / "p1" / HOOK / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"], manifest["total_tokens"] = manifest["shards"][:-1], sum(s["n_tokens"] for s in manifest["shards"][:-1])
    manifest_path.write_text(json.dumps(manifest))  # as if the part's job had been killed
    with pytest.raises(StoreError, match="finish that part"):
        join_stores([tmp_path / "p0" / HOOK, tmp_path / "p1" / HOOK], tmp_path / "joined")
    assert not (tmp_path / "joined" / "manifest.json").exists()
    assert cli.main(["store", "join", str(tmp_path / "p0" / HOOK), "--out", str(tmp_path / "j2")]) == 2

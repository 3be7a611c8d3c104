"""Feature analysis (sae_kit.analysis) and the SQLite feature store (sae_kit.feature_store).

A random 2-layer LLaMA with SmolLM2's tokenizer and a small TopK SAE (tests/tiny_served.py): every
stored figure is recomputed here the direct way (dense encodings of the same windows, the model's
unembedding, brute-force cosines) and compared.
"""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch

from sae_kit import analysis as analysis_module
from sae_kit import cli
from sae_kit.analysis import AnalyzeConfig, analyze
from sae_kit.feature_store import STORE_FILE, FeatureStore, FeatureStoreError
from sae_kit.models import load_model
from sae_kit.sae import load_sae
from tiny_served import D_SAE, HOOK, write_tiny_model, write_tiny_sae

CFG = dict(tokens=1024, context=32, batch_size=8, top_examples=5, quantiles=3, quantile_examples=2,
           example_radius=4, histogram_bins=8, feature_chunk=40, progress=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    write_tiny_model(root / "model")
    write_tiny_sae(root / "sae", str(root / "model"))
    model = load_model(str(root / "model"))
    sae = load_sae(root / "sae")
    path = analyze(sae, model, AnalyzeConfig(**CFG), sae_path=root / "sae")
    return root, model, sae, FeatureStore(path)


@pytest.fixture(scope="module")
def dense(served):
    """The same windows encoded densely: [windows, context, d_sae], BOS positions zeroed."""
    _, model, sae, store = served
    cfg = AnalyzeConfig(**CFG)
    stream = analysis_module._stream(model, HOOK, cfg)
    windows = torch.cat(list(stream.batches()))[: store.meta["n_windows"]]
    acts = model.capture(windows, HOOK)[HOOK]
    codes = sae.encode(acts.flatten(0, 1)).to_dense().reshape(*windows.shape, D_SAE)
    codes[:, 0] = 0
    return windows, codes.detach()


def test_store_describes_the_run(served):
    root, model, sae, store = served
    assert store.path == root / "sae" / STORE_FILE
    assert store.meta["d_sae"] == D_SAE and store.meta["hook"] == HOOK
    assert store.meta["n_windows"] == 1024 // 32 and store.meta["n_tokens"] == 32 * 31  # BOS skipped


def test_density_max_mean_and_histogram_match_dense_encoding(served, dense):
    _, _, _, store = served
    _, codes = dense
    flat = codes.flatten(0, 1)
    fired = flat != 0
    for index in (0, 5, 17, D_SAE - 1):
        feature = store.feature(index)
        acts = flat[:, index][fired[:, index]]
        assert feature["fire_count"] == int(fired[:, index].sum())
        assert feature["density"] == pytest.approx(feature["fire_count"] / store.meta["n_tokens"])
        if acts.numel():
            assert feature["max_act"] == pytest.approx(float(acts.max()), rel=1e-5)
            assert feature["mean_act"] == pytest.approx(float(acts.mean()), rel=1e-4)
            assert sum(feature["histogram"]["counts"]) == acts.numel()
            assert feature["histogram"]["edges"][-1] == pytest.approx(float(acts.max()), rel=1e-5)


def test_examples_carry_the_features_per_token_activations(served, dense):
    _, model, _, store = served
    windows, codes = dense
    busiest = max(range(D_SAE), key=lambda i: store.feature(i)["fire_count"])
    feature = store.feature(busiest)
    column = codes[..., busiest]
    top = feature["top_examples"]
    assert len(top) == 5
    maxima = [example["max_value"] for example in top]
    assert maxima == sorted(maxima, reverse=True)
    assert maxima[0] == pytest.approx(float(column.max()), rel=1e-5)
    # One example per window, so the top five are the five best windows' maxima.
    assert maxima == pytest.approx(sorted(column.max(dim=1).values.tolist(), reverse=True)[:5], rel=1e-5)
    for example in top + [e for q in feature["quantile_examples"] for e in q["examples"]]:
        assert example["acts"][example["max_index"]] == pytest.approx(example["max_value"], rel=1e-4)
        assert len(example["tokens"]) == len(example["acts"]) <= 2 * 4 + 1
    # The text shown is the window's own tokens, decoded one by one.
    example = top[0]
    window = int(column.max(dim=1).values.argmax())
    position = int(column[window].argmax())
    start = position - example["max_index"]
    expected = [model.tokenizer.decode([int(t)]) for t in windows[window, start:start + len(example["tokens"])]]
    assert example["tokens"] == expected
    assert example["acts"] == pytest.approx(column[window, start:start + len(expected)].tolist(), abs=1e-4)


def test_quantile_samples_come_from_their_bins(served, dense):
    _, _, _, store = served
    _, codes = dense
    busiest = max(range(D_SAE), key=lambda i: store.feature(i)["fire_count"])
    feature = store.feature(busiest)
    acts = np.sort(codes[..., busiest][codes[..., busiest] != 0].numpy())
    bins = np.array_split(acts, 3)
    assert [q["quantile"] for q in feature["quantile_examples"]] == [0, 1, 2]
    for q in feature["quantile_examples"]:
        low, high = bins[q["quantile"]][0], bins[q["quantile"]][-1]
        assert len(q["examples"]) == 2
        for example in q["examples"]:
            assert low - 1e-5 <= example["max_value"] <= high + 1e-5


def test_logit_effects_and_neighbours_match_direct_computation(served):
    _, model, sae, store = served
    directions = sae.decoder_directions()
    gain = model.model.ln_final._original_component.weight.detach()
    effects = (directions * gain) @ model.model.W_U.detach()
    cosine = directions @ directions.T
    for index in (3, 50):
        feature = store.feature(index)
        best = effects[index].topk(10)
        assert [e["value"] for e in feature["pos_logits"]] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [e["token"] for e in feature["pos_logits"]] == [model.tokenizer.decode([int(i)]) for i in best.indices]
        worst = effects[index].topk(10, largest=False)
        assert [e["value"] for e in feature["neg_logits"]] == pytest.approx(worst.values.tolist(), abs=1e-4)
        cosine[index, index] = -2
        nearest = cosine[index].topk(10)
        assert [n["index"] for n in feature["neighbours"]] == nearest.indices.tolist()
        assert [n["cosine"] for n in feature["neighbours"]] == pytest.approx(nearest.values.tolist(), abs=1e-4)


def test_listing_sorts_filters_and_pages(served):
    _, _, _, store = served
    total, page = store.list_features(limit=10, sort="density", descending=True)
    assert total == D_SAE and len(page) == 10
    densities = [row["density"] for row in page]
    assert densities == sorted(densities, reverse=True)
    total_all, everything = store.list_features(limit=1000)
    assert [row["index"] for row in everything] == list(range(D_SAE))
    cut = sorted(row["density"] for row in everything)[D_SAE // 2]
    total, rows = store.list_features(min_density=cut, limit=1000)
    assert total == sum(row["density"] >= cut for row in everything) == len(rows)
    _, second = store.list_features(offset=10, limit=10, sort="density", descending=True)
    assert second[0]["density"] <= page[-1]["density"] and second[0]["index"] not in {r["index"] for r in page}
    word = next(row["top_tokens"][0] for row in everything if row["top_tokens"])
    total, rows = store.list_features(text=word, limit=1000)
    assert total >= 1
    for row in rows:  # matched in its top tokens or its promoted tokens
        feature = store.feature(row["index"])
        shown = row["top_tokens"] + [entry["token"] for entry in feature["pos_logits"]]
        assert any(word.lower() in token.lower() for token in shown)
    assert store.list_features(text="%_no such token_%")[0] == 0  # LIKE wildcards are taken literally
    with pytest.raises(ValueError, match="sort must be one of"):
        store.list_features(sort="density; DROP TABLE features")
    with pytest.raises(IndexError, match="out of range"):
        store.feature(D_SAE)


def test_rerun_replaces_the_store_whole_or_not_at_all(served, monkeypatch):
    root, model, sae, store = served
    before = store.path.read_bytes()

    def fail_midway(writer_self, rows):
        raise KeyboardInterrupt  # as if interrupted while writing the features

    monkeypatch.setattr(analysis_module.FeatureStoreWriter, "add_examples", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        analyze(sae, model, AnalyzeConfig(**{**CFG, "tokens": 512}), sae_path=root / "sae")
    assert store.path.read_bytes() == before
    assert sorted(p.name for p in (root / "sae").iterdir()) == ["cfg.json", STORE_FILE, "sae_weights.safetensors"]


def test_bad_stores_are_refused_with_a_hint(tmp_path):
    with pytest.raises(FeatureStoreError, match="sae-kit analyze"):
        FeatureStore(tmp_path / "missing.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(FeatureStoreError, match="not a feature store"):
        FeatureStore(tmp_path / "junk.sqlite")
    connection = sqlite3.connect(tmp_path / "old.sqlite")
    connection.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);"
                             "INSERT INTO meta VALUES ('format_version', '0');")
    connection.commit()
    connection.close()
    with pytest.raises(FeatureStoreError, match="format 0"):
        FeatureStore(tmp_path / "old.sqlite")


def test_cli_analyze_writes_the_store_and_reports_bad_input(served, tmp_path, capsys):
    root, _, _, _ = served
    out = tmp_path / "features.sqlite"
    assert cli.main(["analyze", str(root / "sae"), "--tokens", "256", "--context", "32", "--out", str(out),
                     "--no-progress"]) == 0
    assert FeatureStore(out).meta["n_windows"] == 256 // 32
    assert cli.main(["analyze", str(tmp_path / "nowhere")]) == 2
    assert "cfg.json" in capsys.readouterr().err
    assert cli.main(["analyze", str(root / "sae"), "--tokens", "0"]) == 2
    assert "tokens must be >= 1" in capsys.readouterr().err

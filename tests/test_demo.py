"""`sae-kit demo` end to end on the tiny model of tests/tiny_served.py: harvest → train → evaluate →
analyse, then serving (replaced here by a recorder; the browser test covers the real server)."""
from __future__ import annotations

import json

import pytest

from sae_kit import cli
from sae_kit.feature_store import FeatureStore
from tiny_served import write_tiny_model

SMALL = ["--layer", "1", "--tokens", "2048", "--context", "32", "--expansion", "2", "--k", "4", "--batch-size", "256",
         "--epochs", "1", "--eval-tokens", "256", "--analyze-tokens", "512", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("demo_model") / "model")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_run") / "demo"


def test_demo_ends_by_analysing_and_serving(model_dir, out, monkeypatch, capsys):
    import sae_kit.server.app as app_module

    served = {}
    monkeypatch.setattr(app_module, "run", lambda root, **kwargs: served.update(root=root, **kwargs))
    assert cli.main(["demo", "--out", str(out), "--model", str(model_dir), *SMALL, "--port", "8123",
                     "--explain-sample", "3", "--explain-model", str(model_dir)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    store = FeatureStore(summary["features"])
    assert store.meta["d_sae"] == summary["d_sae"] == 64 and store.meta["n_windows"] == 512 // 32
    assert summary["timings"]["analyze_s"] > 0
    # Explain stage: the token rule for every scorable feature, the language model for the sample.
    explained = summary["explanations"]
    assert explained["lm_features"] >= 1 and explained["token_rule_features"] > 3
    rows = _explanations(store)
    assert sum(e == "lm" for e in rows.values()) == explained["lm_features"]
    assert sum(e == "token-rule" for e in rows.values()) == explained["token_rule_features"] - explained["lm_features"]
    assert store.feature(next(iter(rows)))["explanation"]
    assert served == {"root": str(out), "host": "127.0.0.1", "port": 8123, "threads": None}
    assert "feature store" in capsys.readouterr().out


def test_demo_rerun_without_serving_says_how_to_serve(model_dir, out, monkeypatch, capsys):
    import sae_kit.server.app as app_module

    monkeypatch.setattr(app_module, "run", lambda *args, **kwargs: pytest.fail("--no-serve must not serve"))
    # Re-running resumes: harvest, training, analysis and explanations are done (evaluation runs again).
    before = _explanations(FeatureStore(out / "train" / "sae" / "features.sqlite"))
    assert cli.main(["demo", "--out", str(out), "--model", str(model_dir), *SMALL, "--no-serve",
                     "--explain-sample", "3", "--explain-model", str(model_dir)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["explanations"]["token_rule_features"] == 0 and summary["explanations"]["lm_features"] == 0
    assert _explanations(FeatureStore(out / "train" / "sae" / "features.sqlite")) == before
    assert f"sae-kit serve {out}" in capsys.readouterr().out


def _explanations(store: FeatureStore) -> dict[int, str]:
    with store._connect() as connection:
        return dict(connection.execute("SELECT feature, explainer FROM explanations WHERE role = 'explanation'"))

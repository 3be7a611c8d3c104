"""`sae-kit ablate` and `sae-kit ablate-table`: paired statistics, stability matching, the JSON result
and the rendered table."""
from __future__ import annotations

import json

import pytest
import torch

from sae_kit.cli import main
from sae_kit.experiments.ablate import matched_cosine, summarise

TINY = ["--seeds", "2", "--steps", "20", "--d-in", "16", "--features", "32", "--d-sae", "32", "--k", "3",
        "--batch-size", "64", "--eval-tokens", "512", "--threads", "1", "--no-progress"]


def test_summarise_verdicts():
    assert summarise([0.5, 0.6, 0.7], [0.4, 0.5, 0.6], higher_is_better=False)["verdict"] == "helps"
    assert summarise([0.5, 0.6, 0.7], [0.4, 0.5, 0.6], higher_is_better=True)["verdict"] == "hurts"
    noisy = summarise([0.5, 0.5, 0.5], [0.4, 0.7, 0.45], higher_is_better=False)
    assert noisy["verdict"] == "neutral"
    assert noisy["difference_mean"] == pytest.approx(0.05 / 3)
    assert summarise([1.0, 1.0], [1.0, 1.0], higher_is_better=False)["verdict"] == "neutral"


def test_matched_cosine_finds_a_permutation_up_to_sign():
    torch.manual_seed(0)
    a = torch.randn(20, 8)
    b = -a[torch.randperm(20)]
    assert matched_cosine(a, b) == pytest.approx(1.0, abs=1e-6)
    assert matched_cosine(a, torch.randn(20, 8)) < 0.9


def test_ablate_writes_a_result_and_the_table_lists_its_command(tmp_path, capsys):
    result_file = tmp_path / "results" / "ols.json"
    assert main(["ablate", "--plugin", "ols_refit:steps=10", *TINY, "--json", str(result_file)]) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "difference" in printed
    result = json.loads(result_file.read_text())
    assert result["plugin"] == "ols_refit" and len(result["baseline"]) == 2 == len(result["with_plugin"])
    # The refit never raises the FVU on the same support, seed by seed.
    assert all(d <= 1e-9 for d in result["differences"])
    assert result["command"].startswith("sae-kit ablate --plugin ols_refit:steps=10 --seeds 2")
    assert len(result["side_metrics"]["stability"]) == 2

    doc = tmp_path / "plugins.md"
    assert main(["ablate-table", "--results", str(result_file.parent), "--out", str(doc)]) == 0
    text = doc.read_text()
    assert "| `ols_refit` |" in text and result["command"] in text
    assert "Tier C" in text and "ADC-GAN" in text

    (result_file.parent / "broken.json").write_text("{not json")
    capsys.readouterr()
    assert main(["ablate-table", "--results", str(result_file.parent), "--out", str(doc)]) == 2
    assert "broken.json is not valid JSON" in capsys.readouterr().err
    assert "| `ols_refit` |" in doc.read_text()  # the previous table is intact


def test_ablate_unknown_plugin_is_a_clear_error(capsys):
    assert main(["ablate", "--plugin", "nope", *TINY]) == 2
    assert "unknown plugin 'nope'" in capsys.readouterr().err

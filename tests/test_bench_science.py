"""`sae-kit bench reproduce` and `sae-kit bench pareto` at --quick size (seconds).

The reproduce test checks the table's structure and that the rows' numbers are the run's own (they
change with the seed and appear verbatim in the row's text); the pareto test runs every registered
architecture on a tiny harvested store and a tiny random model, CE/KL included.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

from sae_kit import cli
from sae_kit.experiments import reproduce

sys.path.insert(0, str(Path(__file__).parent))

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer:DeprecationWarning")


def test_bench_reproduce_quick_writes_a_row_per_claim_with_the_runs_numbers(tmp_path: Path) -> None:
    markdown, rows_file = tmp_path / "reproduction.md", tmp_path / "rows.json"
    assert cli.main(["bench", "reproduce", "--quick", "--out", str(markdown), "--json", str(rows_file)]) == 0
    rows = json.loads(rows_file.read_text())
    assert [row["name"] for row in rows] == list(reproduce.CLAIMS)
    assert len(rows) >= 5
    text = markdown.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    assert len(table) == len(rows)
    for row, line in zip(rows, table):
        assert set(reproduce.CLAIM_KEYS) - {"figure"} <= set(row)
        assert row["verdict"] in reproduce.VERDICTS and row["unknowns"] and row["paper_value"]
        assert line.startswith(f"| {row['name']} |") and row["ours"] in line and f"**{row['verdict']}**" in line
        assert f"`{row['command']}`" in text and "--quick" in row["command"]
        assert row["measured"] and all(math.isfinite(v) for v in row["measured"].values())
        assert (markdown.parent / "reproduction" / f"{row['name']}.html").is_file()


def test_reproduce_numbers_come_from_the_run() -> None:
    name = "batchtopk_lower_nmse_at_equal_l0"
    a, b = (reproduce.CLAIMS[name](True, seed) for seed in (0, 1))
    assert a["measured"] != b["measured"]
    for row in (a, b):
        for arch in ("topk", "batchtopk"):
            assert f"{row['measured'][f'{arch} nmse']:.4f}" in row["ours"]
        verdict = "reproduced" if row["measured"]["batchtopk nmse"] < row["measured"]["topk nmse"] else "not reproduced"
        assert row["verdict"] == verdict


def test_claim_registry_checks_the_interface() -> None:
    @reproduce.claim("test_only_incomplete_claim")
    def incomplete(quick: bool, seed: int) -> dict:
        return {"verdict": "reproduced"}

    try:
        with pytest.raises(ValueError, match="returned no"):
            reproduce.CLAIMS["test_only_incomplete_claim"](True, 0)
        with pytest.raises(ValueError, match="registered twice"):
            reproduce.claim("test_only_incomplete_claim")(incomplete)
    finally:
        reproduce.CLAIMS.pop("test_only_incomplete_claim")


def test_bench_pareto_quick_runs_every_architecture_with_in_model_metrics(tmp_path: Path) -> None:
    from sae_kit.harvest import HarvestConfig, harvest
    from sae_kit.models import load_model
    from sae_kit.sae import ARCHITECTURES
    from sae_kit.text import iter_texts
    from tiny_lm import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "lm")
    model = load_model(str(folder))
    text = next(iter_texts("default"))
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40][:200]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n")
    hook = "blocks.1.hook_resid_post"
    store = harvest(HarvestConfig(out=str(tmp_path / "acts"), hooks=[hook], model=str(folder), dataset=str(corpus),
                                  context=32, batch_size=8, tokens=9000, progress=False), model)[hook]
    out = tmp_path / "pareto"
    argv = ["bench", "pareto", "--activations", str(store.directory), "--model", str(folder), "--l0", "2", "--l0", "4",
            "--quick", "--context", "32", "--dataset", str(corpus), "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (out / "pareto.jsonl").read_text().splitlines()]
    expected = sum(1 if cls.sparsity_settings(2) == cls.sparsity_settings(4) else 2 for cls in ARCHITECTURES.values())
    assert len(rows) == expected and {row["arch"] for row in rows} == set(ARCHITECTURES)
    for row in rows:
        for key in ("l0", "fvu", "dead", "ce_recovered", "kl", "train_s"):
            assert row[key] is not None and math.isfinite(row[key]), (row["arch"], key, row[key])
    topk = {row["target_l0"]: row for row in rows if row["arch"] == "topk"}
    assert topk[2]["l0"] == pytest.approx(2) and topk[4]["l0"] == pytest.approx(4)
    assert topk[4]["fvu"] < topk[2]["fvu"]  # more latents per token reconstruct better
    table = (out / "pareto.md").read_text()
    assert table.count("\n") == len(rows) + 2
    for row in rows:
        assert f"| {row['arch']} | {row['target_l0'] if row['target_l0'] is not None else '-'} | {row['l0']:.3f} | {row['fvu']:.3f} |" in table
    assert "plotly" in (out / "pareto.html").read_text()
    # Resume: a second call trains nothing and returns the same rows.
    assert cli.main(argv) == 0
    again = [json.loads(line) for line in (out / "pareto.jsonl").read_text().splitlines()]
    assert again == rows


def test_bench_reproduce_refuses_a_folder_as_its_output_before_running(tmp_path: Path, capsys) -> None:
    assert cli.main(["bench", "reproduce", "--quick", "--claim", "abstopk_one_latent_per_signed_feature",
                     "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err

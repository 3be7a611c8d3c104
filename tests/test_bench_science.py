"""`sae-kit bench reproduce` and `sae-kit bench pareto` at --quick size (seconds).

The reproduce test checks the table's structure and that the rows' numbers are the run's own (they
change with the seed and appear verbatim in the row's text); the pareto test runs every registered
architecture on a tiny harvested store and a tiny random model, CE/KL included.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from sae_kit import cli
from sae_kit.experiments import reproduce

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
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    from sae_kit.experiments.pareto import ParetoSettings, figure, format_markdown, run_pareto
    from sae_kit.harvest import HarvestConfig, harvest
    from sae_kit.models import LanguageModel, ensure_smollm2_cache
    from sae_kit.sae import ARCHITECTURES
    from sae_kit.text import iter_texts

    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2_cache(), local_files_only=True)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=128,
                                  d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN", seed=0, device="cpu")
    model = LanguageModel.from_hooked_transformer(HookedTransformer(cfg), tokenizer, name="tiny-gpt2")
    text = next(iter_texts("default"))
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40][:120]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n")
    hook = "blocks.1.hook_resid_post"
    store = harvest(HarvestConfig(out=str(tmp_path / "acts"), hooks=[hook], model="tiny-gpt2", dataset=str(corpus),
                                  context=32, batch_size=8, tokens=6000, progress=False), model)[hook]
    settings = ParetoSettings(activations=str(store.directory), model=model, target_l0s=(2, 4), tokens=2048, expansion=2,
                              batch_size=256, heldout_tokens=256, in_model_tokens=62, context=32, dataset=str(corpus),
                              out=str(tmp_path / "pareto"), dead_tokens_threshold=4096)
    rows = run_pareto(settings, progress=False)
    expected = sum(1 if cls.sparsity_settings(2) == cls.sparsity_settings(4) else 2 for cls in ARCHITECTURES.values())
    assert len(rows) == expected and {row["arch"] for row in rows} == set(ARCHITECTURES)
    for row in rows:
        for key in ("l0", "fvu", "dead", "ce_recovered", "kl", "train_s"):
            assert row[key] is not None and math.isfinite(row[key]), (row["arch"], key, row[key])
    topk = {row["target_l0"]: row for row in rows if row["arch"] == "topk"}
    assert topk[2]["l0"] == pytest.approx(2) and topk[4]["l0"] == pytest.approx(4)
    assert topk[4]["fvu"] < topk[2]["fvu"]  # more latents per token reconstruct better
    table = format_markdown(rows)
    assert table.count("\n") == len(rows) + 1
    assert len(figure(rows).data) >= len(ARCHITECTURES)
    # Resume: a second call trains nothing and returns the same rows.
    again = run_pareto(settings, progress=False)
    assert [(r["arch"], r["target_l0"], r["fvu"]) for r in again] == [(r["arch"], r["target_l0"], r["fvu"]) for r in rows]
    assert torch.get_num_threads() >= 1

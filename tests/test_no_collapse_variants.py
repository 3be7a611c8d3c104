"""`python -m sae_kit.experiments.no_collapse --variants` at toy size (seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sae_kit.experiments import no_collapse
from sae_kit.experiments.no_collapse import Variant, variant_source


def test_variants_option_runs_topk_first_and_writes_the_table(tmp_path: Path, monkeypatch) -> None:
    toy = Variant("sharkey", dict(d=16, n_features=32, mean_active=2.0), d_sae=64, k=2, steps=20, offset=5.0)
    monkeypatch.setattr(no_collapse, "VARIANTS", {"toy": toy})
    out = tmp_path / "variants.md"
    assert no_collapse.main(["--variants", "all", "--arch", "relu", "--steps-scale", "1.0", "--seed", "5",
                             "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [row["arch"] for row in rows] == ["topk", "relu"]
    assert all(row["data"] == "variant:toy s5" for row in rows)
    assert rows[0]["l0"] == 2.0 and isinstance(rows[1]["pass"], bool)
    assert "| variant:toy s5 | relu |" in out.read_text()


def test_variant_transforms_scale_and_offset_every_sample() -> None:
    base = Variant("signed", dict(d=8, n_features=16, mean_active=2.0), d_sae=32, k=2, steps=1)
    _, plain = variant_source(base, 7)
    _, scaled = variant_source(Variant(**{**base.__dict__, "scale": 100.0}), 7)
    _, shifted = variant_source(Variant(**{**base.__dict__, "offset": 10.0}), 7)
    x = next(plain.iter_batches(256, seed=7))
    torch.testing.assert_close(next(scaled.iter_batches(256, seed=7)), 100 * x)
    shift = next(shifted.iter_batches(256, seed=7)) - x
    assert torch.allclose(shift, shift[:1].expand_as(shift), atol=1e-5)  # one common vector
    assert float(shift[0].norm()) > 5 * float(x.norm(dim=1).mean())
    torch.testing.assert_close(shifted.sample(64, seed=7) - plain.sample(64, seed=7), shift[:1].expand(64, -1))

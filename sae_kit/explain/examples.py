"""The examples one feature is explained and scored with, read from its feature store.

* explanation set: the examples the browser shows (``top`` and ``quantile`` kinds: the strongest
  firings and samples from every activation quantile);
* scoring set: ``heldout`` positives (across the quantiles, in windows none of the explanation
  examples use, so the scorer never sees a window the explainer saw) and silent windows: ``random``
  ones and ``contrast`` ones where a neighbouring feature fires and this one does not.

``sae-kit analyze`` writes all of them (AnalyzeConfig.heldout_examples and friends).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sae_kit.feature_store import FeatureStoreError

EXPLAIN_KINDS = ("top", "quantile")
SCORING_KINDS = ("heldout", "random", "contrast")
HIGHLIGHT_FRACTION = 0.3  # a token is marked when its activation is over this share of its excerpt's maximum


@dataclass
class Example:
    tokens: list[str]
    acts: np.ndarray  # float32, one per token
    kind: str
    bin: int
    rank: int
    window: int

    @property
    def active(self) -> bool:
        return bool((self.acts > 0).any())

    def marks(self) -> np.ndarray:
        """Bool per token: the tokens a reader is shown as where the feature fires."""
        peak = float(self.acts.max()) if self.acts.size else 0.0
        return self.acts > HIGHLIGHT_FRACTION * peak if peak > 0 else np.zeros(len(self.tokens), bool)

    def ref(self) -> dict:
        return {"kind": self.kind, "bin": self.bin, "rank": self.rank, "window": self.window}


@dataclass
class FeatureExamples:
    feature: int
    explain: list[Example] = field(default_factory=list)
    heldout: list[Example] = field(default_factory=list)
    negatives: list[Example] = field(default_factory=list)  # random then contrast


def render(tokens: list[str], marks: np.ndarray | None = None) -> str:
    """The excerpt as text, runs of marked tokens wrapped in ``<<...>>``; newlines shown as ``↵``."""
    out, inside = [], False
    for i, token in enumerate(tokens):
        marked = bool(marks[i]) if marks is not None else False
        if marked and not inside:
            # Keep a leading space outside the marker, so "<<dog>>" reads as a word.
            stripped = token.lstrip(" ")
            out.append(token[: len(token) - len(stripped)] + "<<")
            token = stripped
            inside = True
        elif not marked and inside:
            out.append(">>")
            inside = False
        out.append(token)
    if inside:
        out.append(">>")
    return "".join(out).replace("\n", "↵").strip()


def load_examples(path: str | Path, features: list[int]) -> dict[int, FeatureExamples]:
    """Every stored example of ``features`` (explanation and scoring sets), decoded to token texts."""
    connection = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        kinds = {kind for (kind,) in connection.execute("SELECT DISTINCT kind FROM examples WHERE kind IN "
                                                         "('heldout', 'random', 'contrast') LIMIT 3")}
        if "heldout" not in kinds:
            raise FeatureStoreError(
                f"{path} has no held-out scoring examples (it was analysed by an older sae-kit or with "
                "heldout_examples=0); re-create it with `sae-kit analyze SAE_DIR`")
        out = {f: FeatureExamples(f) for f in features}
        window_ids: set[int] = set()
        rows = []
        for first in range(0, len(features), 500):
            chunk = features[first:first + 500]
            rows += connection.execute(
                f"SELECT feature, kind, bin, rank, window, start, acts FROM examples WHERE feature IN "
                f"({','.join('?' * len(chunk))}) ORDER BY feature, kind, bin, rank", chunk).fetchall()
        window_ids = sorted({row[4] for row in rows})
        windows = {}
        for first in range(0, len(window_ids), 500):
            chunk = window_ids[first:first + 500]
            windows.update({w: np.frombuffer(blob, dtype="<i4") for w, blob in connection.execute(
                f"SELECT id, tokens FROM windows WHERE id IN ({','.join('?' * len(chunk))})", chunk)})
        ids = sorted({int(t) for tokens in windows.values() for t in tokens})
        vocab = {}
        for first in range(0, len(ids), 500):
            chunk = ids[first:first + 500]
            vocab.update(connection.execute(f"SELECT id, text FROM vocab WHERE id IN ({','.join('?' * len(chunk))})",
                                            chunk).fetchall())
    finally:
        connection.close()
    for feature, kind, bin_, rank, window, start, blob in rows:
        acts = np.frombuffer(blob, dtype="<f4").copy()
        tokens = [vocab.get(int(t), "") for t in windows[window][start:start + len(acts)]]
        example = Example(tokens, acts, kind, int(bin_), int(rank), int(window))
        entry = out[feature]
        if kind in EXPLAIN_KINDS:
            entry.explain.append(example)
        elif kind == "heldout":
            entry.heldout.append(example)
        else:
            entry.negatives.append(example)
    for entry in out.values():
        entry.explain.sort(key=lambda e: (e.kind != "top", -e.bin if e.kind == "quantile" else 0, e.rank))
        entry.negatives.sort(key=lambda e: (e.kind != "random", e.rank))
    return out


def explanation_subset(examples: list[Example], n: int) -> list[Example]:
    """``n`` examples for the explainer: half the strongest, half spread over the quantiles (strongest first)."""
    top = [e for e in examples if e.kind == "top"]
    quantile = [e for e in examples if e.kind == "quantile"]
    n_top = min(len(top), max(n - len(quantile), (n + 1) // 2))
    chosen = top[:n_top]
    # Round-robin over the quantile bins, highest first, so every part of the distribution is shown.
    by_bin: dict[int, list[Example]] = {}
    for e in quantile:
        by_bin.setdefault(e.bin, []).append(e)
    queues = [by_bin[b] for b in sorted(by_bin, reverse=True)]
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    seen, unique = set(), []
    for e in chosen:  # a window can be both a top and a quantile example
        key = (e.window, tuple(e.acts.round(4)))
        if key not in seen:
            seen.add(key)
            unique.append(e)
    return unique

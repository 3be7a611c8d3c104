"""Scorers: how well an explanation predicts held-out behaviour of its feature.

* detection: shown an unmarked excerpt, does the feature fire anywhere in it? Positives are the
  feature's held-out examples, negatives its silent windows (random and contrast ones).
* fuzzing: shown an excerpt with tokens marked, are the marked tokens the ones the explanation
  describes? Positives mark the tokens where the feature fires; negatives mark as many tokens where
  it does not, half in held-out activating excerpts, half in silent ones.

A judge answers each sample with P(yes): :class:`LMJudge` asks a language model one sample per prompt
(one example per prompt: batching several "can leak information" and confuses small judges);
:class:`RuleJudge` applies a token rule directly (no model). Per feature and scorer: balanced
accuracy (chance 0.5 whatever the class balance), precision, recall, F1, ROC-AUC of P(yes), and the
number of answers that could not be parsed (left out of the other figures). For a judge with real
probabilities (the local backend) the decision is also calibrated per feature: P(yes) thresholded
where as many samples are yeses as the scoring set has positives, the median for balanced sets
(``balanced_accuracy_calibrated``), see :func:`classification_metrics`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sae_kit.explain.backends import Backend
from sae_kit.explain.examples import FeatureExamples, render
from sae_kit.explain.explainers import Explanation, normalise
from sae_kit.seeding import derive_seed

SCORERS = ("detection", "fuzzing")
JUDGE_PROMPT_VERSION = "sae-kit-judge-2"


@dataclass
class Sample:
    scorer: str
    tokens: list[str]
    marks: np.ndarray | None  # fuzzing only
    label: bool
    source: dict  # where the excerpt came from (kind, bin, rank, window)

    def text(self) -> str:
        return render(self.tokens, self.marks)

    def as_json(self) -> dict:
        return {"scorer": self.scorer, "tokens": self.tokens,
                "marks": None if self.marks is None else [bool(m) for m in self.marks],
                "label": self.label, **self.source}


def _spread(examples: list, n: int) -> list:
    """``n`` examples taking turns across their bins (so every activation quantile is represented)."""
    by_bin: dict[int, list] = {}
    for e in examples:
        by_bin.setdefault(e.bin, []).append(e)
    queues = [by_bin[b] for b in sorted(by_bin, reverse=True)]
    chosen = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


def _negatives(fx: FeatureExamples, n: int) -> list:
    random = [e for e in fx.negatives if e.kind == "random"]
    contrast = [e for e in fx.negatives if e.kind == "contrast"]
    n_contrast = min(len(contrast), n // 2)
    return random[: n - n_contrast] + contrast[:n_contrast] if len(random) >= n - n_contrast else \
        random + contrast[: n - len(random)]


def build_samples(fx: FeatureExamples, *, positives: int = 8, negatives: int = 8, seed: int = 0) -> list[Sample]:
    """The detection and fuzzing samples of one feature (deterministic given the seed)."""
    rng = np.random.default_rng(derive_seed("explain-samples", seed, fx.feature))
    pos = _spread(fx.heldout, positives)
    neg = _negatives(fx, negatives)
    samples = [Sample("detection", e.tokens, None, True, e.ref()) for e in pos]
    samples += [Sample("detection", e.tokens, None, False, e.ref()) for e in neg]
    samples += [Sample("fuzzing", e.tokens, e.marks(), True, e.ref()) for e in pos]
    # Wrong marks: as many tokens as the correct marks would have, where the feature is silent.
    half = len(pos) // 2
    wrong_sources = pos[: len(pos) - half] + neg[:half]
    for e in wrong_sources:
        n_marked = max(1, int(e.marks().sum())) if e.active else max(1, int(round(
            np.mean([p.marks().sum() for p in pos]) if pos else 1)))
        silent = np.nonzero(e.acts <= 0)[0]
        if silent.size == 0:
            continue
        marks = np.zeros(len(e.tokens), bool)
        marks[rng.choice(silent, size=min(n_marked, silent.size), replace=False)] = True
        samples.append(Sample("fuzzing", e.tokens, marks, False, {**e.ref(), "wrong_marks": True}))
    return samples


# Short on purpose: a small local judge reads hundreds of these per feature. The question comes
# before the excerpt, so everything but the excerpt is shared by one explanation's prompts (the
# local backend runs that shared prefix once; judge-1 asked the same question after the excerpt).
JUDGE_SYSTEM = "You judge whether a description of a language-model feature fits a text. Answer Yes or No."
DETECTION_PROMPT = ("Description: {explanation}\nQuestion: is the described feature present in the text below?\n"
                    "Text: {text}")
FUZZING_PROMPT = ("Description: {explanation}\nQuestion: are the tokens marked with << >> in the text below the "
                  "ones the description is about?\nText: {text}")


def judge_prompt(explanation: str, sample: Sample) -> list[dict[str, str]]:
    template = DETECTION_PROMPT if sample.scorer == "detection" else FUZZING_PROMPT
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": template.format(explanation=explanation, text=sample.text())}]


class LMJudge:
    def __init__(self, backend: Backend):
        self.backend = backend
        self.name = backend.model_name
        # Next-token probabilities (local backend) can be thresholded per feature; parsed text answers
        # (an endpoint) are 0 or 1 and keep the judge's own decision.
        self.calibrated = bool(getattr(backend, "gives_probabilities", False))

    def judge(self, requests: list[tuple[Explanation, list[Sample]]]) -> list[list[float | None]]:
        """P(yes) for every sample of every (explanation, samples) pair, in one batched call."""
        prompts = [judge_prompt(explanation.text, sample) for explanation, samples in requests for sample in samples]
        answers = self.backend.yes_probability(prompts)
        out, at = [], 0
        for _, samples in requests:
            out.append(answers[at:at + len(samples)])
            at += len(samples)
        return out


class RuleJudge:
    """Applies a token rule: detection says yes when the excerpt holds a rule token, fuzzing when every
    marked token is one."""

    name = "token-rule"
    calibrated = False  # its answers are 0 or 1

    def judge(self, requests: list[tuple[Explanation, list[Sample]]]) -> list[list[float | None]]:
        out = []
        for explanation, samples in requests:
            rule = set(explanation.rule)
            answers = []
            for sample in samples:
                if sample.marks is None:
                    hit = any(normalise(t) in rule for t in sample.tokens)
                else:
                    marked = [normalise(t) for t, m in zip(sample.tokens, sample.marks) if m]
                    hit = bool(marked) and all(t in rule for t in marked)
                answers.append(float(hit))
            out.append(answers)
        return out


def _confusion(y: np.ndarray, predicted: np.ndarray) -> dict:
    tp = int((predicted & y).sum())
    fp = int((predicted & ~y).sum())
    tn = int((~predicted & ~y).sum())
    fn = int((~predicted & y).sum())
    tpr = tp / (tp + fn) if tp + fn else float("nan")
    tnr = tn / (tn + fp) if tn + fp else float("nan")
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * tpr / (precision + tpr) if tp and precision + tpr else 0.0
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "balanced_accuracy": _nan_none((tpr + tnr) / 2),
            "precision": precision, "recall": _nan_none(tpr), "f1": f1}


def classification_metrics(labels: list[bool], probabilities: list[float | None], *, calibrated: bool = False) -> dict:
    """Balanced accuracy, precision, recall, F1 of the judge's own decision (P(yes) >= 0.5 is a yes),
    ROC-AUC of P(yes), and parse failures.

    With ``calibrated`` (a judge that gives real probabilities, the local backend), also the same
    figures for a per-feature threshold (``calibrated``, ``balanced_accuracy_calibrated``): the yeses
    are the samples with the highest P(yes), as many as the scoring set has positives (a number
    fixed by how the set was built, so for the balanced sets the threshold is the median of P(yes)
    over the feature's scoring set). It never looks at which samples are positive, so a judge whose
    P(yes) does not depend on the label still scores 0.5 on average, while a judge that is right up
    to a constant offset (every answer "yes", but surer for the activating excerpts) is no longer
    stuck at 0.5 as it is at the fixed threshold. Ties at the threshold are broken at random, in
    expectation (a constant judge scores exactly 0.5)."""
    pairs = [(bool(l), float(p)) for l, p in zip(labels, probabilities) if p is not None]
    y = np.array([l for l, _ in pairs], bool)
    p = np.array([q for _, q in pairs], float)
    out = {"n": len(labels), "positives": int(y.sum()), "negatives": int((~y).sum()), **_confusion(y, p >= 0.5),
           "auc": _auc(y, p), "parse_failures": len(labels) - len(pairs)}
    if calibrated:
        out["calibrated"] = _at_prior_quantile(y, p)
        out["balanced_accuracy_calibrated"] = out["calibrated"]["balanced_accuracy"]
    return out


def _at_prior_quantile(y: np.ndarray, p: np.ndarray) -> dict:
    """Expected confusion figures when the ``y.sum()`` highest P(yes) are the yeses (ties at the
    threshold share the remaining yes slots evenly: the expectation over random tie-breaking)."""
    k, n_neg = int(y.sum()), int((~y).sum())
    if k == 0 or n_neg == 0:
        return {"threshold": None, "tp": 0.0, "fp": 0.0, "tn": 0.0, "fn": 0.0, "balanced_accuracy": None,
                "precision": 0.0, "recall": None, "f1": 0.0}
    threshold = float(np.sort(p)[::-1][k - 1])
    above, tied = p > threshold, p == threshold
    share = (k - int(above.sum())) / int(tied.sum())  # chance that a tied sample is a yes
    tp = float((above & y).sum() + share * (tied & y).sum())
    fp = float(k - tp)
    tpr, tnr = tp / k, (n_neg - fp) / n_neg
    precision = tp / k  # k yeses
    f1 = 2 * precision * tpr / (precision + tpr) if tp else 0.0
    return {"threshold": threshold, "tp": tp, "fp": fp, "tn": n_neg - fp, "fn": k - tp,
            "balanced_accuracy": (tpr + tnr) / 2, "precision": precision, "recall": tpr, "f1": f1}


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """ROC-AUC (Mann-Whitney, ties count half); None without both classes."""
    if y.all() or not y.any():
        return None
    pos, neg = p[y], p[~y]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def _nan_none(value: float) -> float | None:
    return None if value != value else float(value)


def score(samples: list[Sample], probabilities: list[float | None], *, calibrated: bool = False) -> dict:
    """Per-scorer metrics of one explanation, and ``score``: the mean over the two scorers of the
    balanced accuracy named in ``score_metric`` (the per-feature threshold for a calibrated judge,
    whose fixed-threshold decision is kept beside it; the judge's own decision otherwise)."""
    out = {}
    for scorer in SCORERS:
        chosen = [(s, p) for s, p in zip(samples, probabilities) if s.scorer == scorer]
        out[scorer] = classification_metrics([s.label for s, _ in chosen], [p for _, p in chosen],
                                             calibrated=calibrated)
    metric = "balanced_accuracy_calibrated" if calibrated else "balanced_accuracy"
    accuracies = [out[s][metric] for s in SCORERS if out[s][metric] is not None]
    out["score"] = float(np.mean(accuracies)) if accuracies else None
    out["score_metric"] = metric
    return out

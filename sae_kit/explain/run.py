"""``sae-kit explain SAE_DIR``: explain and score features, writing into the SAE's feature store.

Features go in chunks: the chunk is explained (one batched call), then each feature's explanation
and its two controls — the token-rule baseline and a shuffled explanation (another feature's, from
this run) — are scored on the same held-out samples by the same judge, and the feature is committed.
A re-run skips features already done with the same explainer, model and prompt (``redo`` re-does
them), so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sae_kit.config import ConfigError
from sae_kit.explain.backends import Backend, make_backend
from sae_kit.explain.examples import FeatureExamples, load_examples
from sae_kit.explain.explainers import Explanation, LMExplainer, TokenRuleExplainer
from sae_kit.explain.scorers import JUDGE_PROMPT_VERSION, LMJudge, RuleJudge, build_samples, score
from sae_kit.feature_store import STORE_FILE, FeatureStore, open_for_explanations, write_explanation
from sae_kit.seeding import derive_seed

MIN_HELDOUT = 2  # a feature with fewer held-out positives is not scored (nothing to measure)


@dataclass
class ExplainConfig:
    backend: str = "local"  # local (transformers), openai (any compatible endpoint) or none (token rule only)
    explainer: str = "lm"  # lm or token-rule (with backend none: token-rule, judged by the rule itself)
    model: str | None = None  # local: a Hugging Face folder (default the embedded SmolLM2); openai: model name
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    retries: int = 3
    concurrency: int = 4
    batch_size: int = 16  # prompts per forward pass (local backend)
    threads: int | None = None
    features: list[int] | None = None
    sample: int | None = None  # this many features evenly spread over the density ranks (alive ones)
    limit: int | None = None
    redo: bool = False
    explain_examples: int = 12
    positives: int = 8  # held-out positives per scorer
    negatives: int = 8  # silent windows per scorer (half random, half contrast)
    max_tokens: int = 40
    chunk: int = 8  # features explained per batched call
    budget_s: float | None = None  # start no new chunk after this many seconds (a re-run continues)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.backend not in ("local", "openai", "none"):
            raise ConfigError(f"backend must be local, openai or none, got {self.backend!r}")
        if self.explainer not in ("lm", "token-rule"):
            raise ConfigError(f"explainer must be lm or token-rule, got {self.explainer!r}")
        if self.backend == "none" and self.explainer == "lm":
            self.explainer = "token-rule"
        for name in ("explain_examples", "positives", "negatives", "max_tokens", "chunk", "batch_size", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sample", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ConfigError(f"budget_s must be > 0 seconds, got {self.budget_s}")


@dataclass
class ExplainResult:
    store: Path
    done: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    wall_s: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)
    explain_parse_failures: int = 0
    left_for_later: int = 0  # features not started because the time budget was spent
    summary: dict[str, Any] = field(default_factory=dict)

    def throughput_line(self) -> str:
        per_minute = len(self.done) / self.wall_s * 60 if self.wall_s else 0.0
        line = f"explained {len(self.done)} features in {self.wall_s:.1f}s ({per_minute:.1f} features/min)"
        if self.usage.get("requests"):
            line += (f"; {self.usage['requests']} LM requests, {self.usage['prompt_tokens']} prompt tokens sent, "
                     f"{self.usage['completion_tokens']} generated, {self.usage['failures']} failed requests")
        if self.explain_parse_failures:
            line += f"; {self.explain_parse_failures} explanations unparseable (token rule used)"
        if self.skipped:
            line += f"; {len(self.skipped)} skipped"
        if self.left_for_later:
            line += f"; time budget spent, {self.left_for_later} features left for a re-run"
        return line


def select_features(store: FeatureStore, cfg: ExplainConfig) -> list[int]:
    with store._connect() as connection:
        rows = connection.execute("SELECT id, fire_count, density FROM features ORDER BY id").fetchall()
    if cfg.features is not None:
        bad = [f for f in cfg.features if not 0 <= f < store.d_sae]
        if bad:
            raise ConfigError(f"--features {bad[0]} is out of range: this SAE has features 0..{store.d_sae - 1}")
        chosen = list(dict.fromkeys(cfg.features))
    elif cfg.sample is not None:
        alive = sorted((r["density"], r["id"]) for r in rows if r["fire_count"] > 0)
        n = min(cfg.sample, len(alive))
        picks = np.unique(np.linspace(0, len(alive) - 1, n).round().astype(int)) if n else []
        chosen = [alive[i][1] for i in picks]
        # A seeded order, so a run cut short still covers the densities evenly.
        chosen = [chosen[i] for i in np.random.default_rng(derive_seed("explain-sample", cfg.seed)).permutation(n)]
    else:
        chosen = [r["id"] for r in rows]
    return chosen[: cfg.limit] if cfg.limit is not None else chosen


def run_explain(sae_dir: str | Path, cfg: ExplainConfig, *, store_path: str | Path | None = None,
                backend: Backend | None = None) -> ExplainResult:
    """Explain and score the chosen features of the SAE in ``sae_dir`` (its ``features.sqlite``)."""
    started = time.perf_counter()
    path = Path(store_path) if store_path is not None else Path(sae_dir) / STORE_FILE
    store = FeatureStore(path)
    features = select_features(store, cfg)
    if backend is None and cfg.backend != "none":
        backend = make_backend(cfg.backend, model=cfg.model, base_url=cfg.base_url, api_key_env=cfg.api_key_env,
                               timeout=cfg.timeout, retries=cfg.retries, concurrency=cfg.concurrency,
                               batch_size=cfg.batch_size, threads=cfg.threads)
    rule_explainer = TokenRuleExplainer(cfg.explain_examples)
    explainer = LMExplainer(backend, n_examples=cfg.explain_examples, max_tokens=cfg.max_tokens) \
        if cfg.explainer == "lm" and backend is not None else rule_explainer
    judge = LMJudge(backend) if backend is not None else RuleJudge()
    connection = open_for_explanations(path)
    result = ExplainResult(path)
    try:
        done = _finished(connection, explainer, judge.name) if not cfg.redo else set()
        todo = [f for f in features if f not in done]
        examples = load_examples(path, todo)
        pool: dict[int, Explanation] = _stored_explanations(connection, explainer, features)
        bar = tqdm(total=len(features), initial=len(features) - len(todo), unit="feat", desc="explain",
                   disable=not cfg.progress)
        for first in range(0, len(todo), cfg.chunk):
            if cfg.budget_s is not None and time.perf_counter() - started >= cfg.budget_s:
                result.left_for_later = len(todo) - first
                break
            chunk = [examples[f] for f in todo[first:first + cfg.chunk]]
            ready = [fx for fx in chunk if len(fx.heldout) >= MIN_HELDOUT]
            for fx in chunk:
                if len(fx.heldout) < MIN_HELDOUT:
                    result.skipped[fx.feature] = (f"{len(fx.heldout)} held-out examples (it fires too rarely "
                                                  "to be scored)")
            if not ready:
                bar.update(len(chunk))
                continue
            explanations = explainer.explain(ready)
            for fx, explanation in zip(ready, explanations):
                pool[fx.feature] = explanation
            _score_and_write(connection, ready, explanations, explainer, rule_explainer, judge, pool, cfg)
            result.done += [fx.feature for fx in ready]
            bar.update(len(chunk))
        bar.close()
    finally:
        connection.close()
    result.wall_s = time.perf_counter() - started
    if backend is not None:
        u = backend.usage
        result.usage = {"requests": u.requests, "prompt_tokens": u.prompt_tokens,
                        "completion_tokens": u.completion_tokens, "failures": u.failures}
    result.explain_parse_failures = getattr(explainer, "parse_failures", 0)
    result.summary = summarize(path, features)
    return result


def explained_features(path: str | Path) -> set[int]:
    """Features of the store at ``path`` that have an explanation (by any explainer)."""
    store = FeatureStore(path)
    if not store.has_explanations:
        return set()
    with store._connect() as connection:
        return {f for (f,) in connection.execute("SELECT DISTINCT feature FROM explanations WHERE role = 'explanation'")}


def _finished(connection, explainer, judge_name: str) -> set[int]:
    rows = connection.execute("SELECT feature, scores FROM explanations WHERE role = 'explanation' AND explainer = ? "
                              "AND prompt_version = ? AND COALESCE(model, '') = ? AND scores IS NOT NULL",
                              (explainer.name, explainer.prompt_version, explainer.model_name or "")).fetchall()
    import json

    return {f for f, scores in rows if json.loads(scores).get("judge") == judge_name}


def _stored_explanations(connection, explainer, features: list[int]) -> dict[int, Explanation]:
    """This run's features already explained the same way (the shuffled control draws from them)."""
    wanted = set(features)
    out = {}
    for feature, text in connection.execute(
            "SELECT feature, text FROM explanations WHERE role = 'explanation' AND explainer = ? AND prompt_version = ? "
            "AND COALESCE(model, '') = ?", (explainer.name, explainer.prompt_version, explainer.model_name or "")):
        if feature in wanted:
            out[feature] = Explanation(text, explainer.name, explainer.model_name, explainer.prompt_version)
    return out


def _shuffled(feature: int, pool: dict[int, Explanation], seed: int) -> tuple[int, Explanation] | None:
    others = sorted(f for f in pool if f != feature)
    if not others:
        return None
    source = others[np.random.default_rng(derive_seed("explain-shuffle", seed, feature)).integers(len(others))]
    return source, pool[source]


def _score_and_write(connection, batch: list[FeatureExamples], explanations: list[Explanation], explainer,
                     rule_explainer: TokenRuleExplainer, judge, pool: dict[int, Explanation], cfg: ExplainConfig) -> None:
    requests, plan = [], []
    rule_pool = {}
    for fx, explanation in zip(batch, explanations):
        samples = build_samples(fx, positives=cfg.positives, negatives=cfg.negatives, seed=cfg.seed)
        roles = [("explanation", explanation, None)]
        if explanation.explainer != "token-rule":
            roles.append(("token_rule", rule_explainer.explain_one(fx), None))
        shuffled = _shuffled(fx.feature, pool, cfg.seed)
        if shuffled is not None:
            source, text = shuffled
            if isinstance(judge, RuleJudge) and not text.rule:
                text = rule_pool.setdefault(source, text)
            roles.append(("shuffled", text, source))
        for role, text, source in roles:
            requests.append((text, samples))
            plan.append((fx.feature, role, text, source, samples))
    answers = judge.judge(requests)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    by_feature: dict[int, list] = {}
    for (feature, role, text, source, samples), probabilities in zip(plan, answers):
        by_feature.setdefault(feature, []).append((role, text, source, samples, probabilities))
    for feature, entries in by_feature.items():
        with connection:  # one transaction per feature; controls of an older explanation go with it
            connection.execute("DELETE FROM explanations WHERE feature = ?", (feature,))
            for role, text, source, samples, probabilities in entries:
                scores = {**score(samples, probabilities, calibrated=judge.calibrated), "judge": judge.name,
                          "judge_prompt_version": JUDGE_PROMPT_VERSION}
                if role == "explanation" and not text.parsed:
                    scores["explainer_fallback"] = "token-rule"
                if source is not None:
                    scores["shuffled_from"] = source
                verdicts = [{**s.as_json(), "p_yes": p} for s, p in zip(samples, probabilities)] \
                    if role == "explanation" else None
                write_explanation(connection, feature, role, {
                    "explainer": text.explainer if role != "shuffled" else explainer.name,
                    "model": text.model if role != "shuffled" else explainer.model_name,
                    "prompt_version": text.prompt_version, "text": text.text, "scores": scores,
                    "verdicts": verdicts, "created": created})


def summarize(path: str | Path, features: list[int] | None = None) -> dict[str, Any]:
    """Mean, standard deviation and count of each role's detection and fuzzing figures."""
    import json

    store = FeatureStore(path)
    if not store.has_explanations:
        return {}
    with store._connect() as connection:
        rows = connection.execute("SELECT feature, role, scores FROM explanations WHERE scores IS NOT NULL").fetchall()
    wanted = set(features) if features is not None else None
    values: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if wanted is not None and row["feature"] not in wanted:
            continue
        scores = json.loads(row["scores"])
        for scorer in ("detection", "fuzzing"):
            for metric in ("balanced_accuracy", "balanced_accuracy_calibrated", "f1", "auc", "parse_failures"):
                value = scores.get(scorer, {}).get(metric)
                if value is not None:
                    values.setdefault(row["role"], {}).setdefault(f"{scorer}.{metric}", []).append(float(value))
    return {role: {key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for key, v in metrics.items()}
            for role, metrics in values.items()}


def format_summary(summary: dict[str, Any]) -> str:
    """One row per role: the judge's own balanced accuracy, and where the judge gives probabilities the
    calibrated (per-feature threshold) balanced accuracy and the AUC of P(yes), for detection and fuzzing."""
    calibrated = any("detection.balanced_accuracy_calibrated" in m for m in summary.values())
    columns = [("bal.acc", "balanced_accuracy")]
    if calibrated:
        columns += [("bal.acc@calib", "balanced_accuracy_calibrated"), ("AUC", "auc")]
    header = "role         " + "".join(f" {scorer[:3] + ' ' + name:<19}" for scorer in ("detection", "fuzzing")
                                         for name, _ in columns) + "  n"
    lines = [header]
    for role in ("explanation", "token_rule", "shuffled"):
        if role not in summary:
            continue
        cells = []
        for scorer in ("detection", "fuzzing"):
            for _, metric in columns:
                m = summary[role].get(f"{scorer}.{metric}")
                cells.append(f" {m['mean']:.3f} ± {m['std']:.3f}" + " " * 6 if m else " -" + " " * 18)
        d = summary[role].get("detection.balanced_accuracy")
        lines.append(f"{role:<13}" + "".join(cells) + f"  {d['n'] if d else 0}")
    return "\n".join(lines)

"""sae-kit explain on the tiny served folder: disjoint sets, the rule judge and its controls, the
local backend on a tiny random HF model, and an OpenAI-compatible fake on loopback (real HTTP)."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sae_kit.explain import ExplainConfig, run_explain
from sae_kit.explain.backends import BackendError, OpenAIBackend
from sae_kit.explain.examples import load_examples
from sae_kit.feature_store import FeatureStore, export_explanations, import_explanations
from tiny_served import build_served_root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_served_root(tmp_path_factory.mktemp("explain"), analysis_tokens=1024)


def test_scoring_set_is_disjoint_from_the_explanation_set(root):
    store = root / "saes" / "main" / "features.sqlite"
    for fx in load_examples(store, list(range(96))).values():
        shown = {e.window for e in fx.explain}
        assert not shown & {e.window for e in fx.heldout + fx.negatives}
        assert all(e.active for e in fx.heldout) and not any(e.active for e in fx.negatives)


def test_rule_run_scores_controls_resumes_and_exports(root, tmp_path):
    sae = root / "saes" / "main"
    result = run_explain(sae, ExplainConfig(backend="none", progress=False))
    assert result.done and result.summary["shuffled"]["detection.balanced_accuracy"]["n"] == len(result.done)
    real = result.summary["explanation"]["detection.balanced_accuracy"]["mean"]
    shuffled = result.summary["shuffled"]["detection.balanced_accuracy"]["mean"]
    assert real > shuffled and abs(shuffled - 0.5) < 0.15
    again = run_explain(sae, ExplainConfig(backend="none", progress=False))
    assert again.done == []  # everything was committed: nothing to redo
    store = FeatureStore(sae / "features.sqlite")
    f = store.feature(result.done[0])
    assert f["explanation"] == f["explanations"]["explanation"]["text"] and f["explanations"]["explanation"]["verdicts"]
    word = f["explanation"].split('"')[1]
    if word.strip().isalnum():
        assert result.done[0] in [h["index"] for h in store.search_explanations(word, limit=200)[1]]
    data = export_explanations(sae / "features.sqlite")
    with pytest.raises(ValueError, match="format"):
        import_explanations(sae / "features.sqlite", {"records": []})
    assert import_explanations(sae / "features.sqlite", json.loads(json.dumps(data))) == len(data["records"])


def test_local_backend_on_a_tiny_model(root):
    result = run_explain(root / "saes" / "main", ExplainConfig(backend="local", model=str(root / "model"), limit=3,
                                                               max_tokens=4, redo=True, progress=False))
    assert result.usage["requests"] > 0 and result.usage["prompt_tokens"] > 0
    for role in ("explanation", "token_rule", "shuffled"):
        assert role in result.summary


def test_prefix_cached_judge_matches_one_prompt_at_a_time(root):
    """The batched, prefix-cached P(yes) equals a plain forward pass of each whole prompt alone."""
    import numpy as np
    import torch

    from sae_kit.explain.backends import LocalBackend, prefix_groups
    from sae_kit.explain.explainers import TokenRuleExplainer
    from sae_kit.explain.scorers import build_samples, judge_prompt

    backend = LocalBackend(str(root / "model"), batch_size=5)
    with torch.no_grad():  # a sharper random model, so P(yes) varies between prompts
        backend.model.base_model.norm.weight.mul_(40)
    examples = load_examples(root / "saes" / "main" / "features.sqlite", [0, 1, 2])
    prompts = []
    for fx in examples.values():
        explanation = TokenRuleExplainer().explain_one(fx)
        prompts += [judge_prompt(explanation.text, s) for s in build_samples(fx, positives=4, negatives=4)]
    got = backend.yes_probability(prompts)
    reference = []
    with torch.inference_mode():
        for ids in backend._encode(prompts):
            probs = backend.model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)
            yes, no = probs[backend._yes_ids].sum(), probs[backend._no_ids].sum()
            reference.append(float(yes / (yes + no)))
    assert np.std(reference) > 1e-3  # the comparison can tell prompts apart
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
    groups = prefix_groups(backend._encode(prompts))
    assert len(groups) <= 2 * len(examples)  # prompts of one explanation share one cached prefix
    assert sorted(i for _, members in groups for i in members) == list(range(len(prompts)))


class _Fake(BaseHTTPRequestHandler):
    mode = "ok"
    calls = 0

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        assert body.get("stream") in (False, None)
        if self.mode == "error":
            return self._send(500, {"error": {"message": "boom"}})
        if self.mode == "auth":
            return self._send(401, {"error": {"message": "bad key"}})
        if self.mode == "slow":
            time.sleep(2)
        text = "maybe?" if self.mode == "malformed" else ("Yes" if "<<" in body["messages"][-1]["content"] else "No")
        if body["max_tokens"] > 3:
            text = "The feature fires on tokens of names."
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_backend_against_a_loopback_fake(root, fake):
    _Fake.mode = "ok"
    backend = OpenAIBackend(fake, "fake-model", timeout=5, retries=0, concurrency=4)
    result = run_explain(root / "saes" / "main", ExplainConfig(backend="openai", limit=2, redo=True, progress=False),
                         backend=backend)
    assert result.usage["prompt_tokens"] == 10 * result.usage["requests"]
    store = FeatureStore(root / "saes" / "main" / "features.sqlite")
    assert store.feature(result.done[0])["explanation"] == "The feature fires on tokens of names."
    _Fake.mode = "malformed"
    assert backend.yes_probability([[{"role": "user", "content": "x"}]] * 3) == [None, None, None]
    _Fake.mode = "slow"
    slow = OpenAIBackend(fake, "fake-model", timeout=0.5, retries=1)
    with pytest.raises(BackendError, match="every request"):
        slow.yes_probability([[{"role": "user", "content": "x"}]])
    _Fake.mode, _Fake.calls = "error", 0
    with pytest.raises(BackendError, match="every request"):
        OpenAIBackend(fake, "fake-model", timeout=5, retries=2).yes_probability([[{"role": "user", "content": "x"}]])
    assert _Fake.calls == 3  # the client's retries with backoff
    _Fake.mode = "auth"
    with pytest.raises(BackendError, match="refused"):
        OpenAIBackend(fake, "fake-model", retries=0).yes_probability([[{"role": "user", "content": "x"}]])


class _BlindProbabilityBackend:
    """A judge with real probabilities that ignores the label: P(yes) is a hash of the excerpt."""

    gives_probabilities = True

    def __init__(self):
        from sae_kit.explain.backends import Usage

        self.model_name, self.usage = "fake-blind", Usage()

    def complete(self, prompts, *, max_tokens, answer_prefix=""):
        return ["[EXPLANATION]: tokens of names."] * len(prompts)

    def yes_probability(self, prompts):
        import zlib

        return [zlib.crc32(m[-1]["content"].split("\nText: ", 1)[1].encode()) / 2**32 for m in prompts]


def test_calibrated_local_decision_is_not_stuck_at_chance(root, tmp_path):
    """On the real scoring sets of every feature: the fixed 0.5 threshold scores a judge that says
    "yes" to everything (more surely when it is right) at exactly 0.5; the per-feature threshold (as
    many yeses as positives) and the AUC see its ranking. A judge blind to the label stays near 0.5
    on both, so the calibration adds no signal of its own; run_explain stores it as the score."""
    import shutil
    import zlib

    import numpy as np

    from sae_kit.explain.scorers import SCORERS, build_samples, score

    store = tmp_path / "features.sqlite"
    shutil.copy(root / "saes" / "main" / "features.sqlite", store)
    judges = {"offset": lambda s: 0.8 + 0.1 * s.label,
              "blind": lambda s: zlib.crc32(s.text().encode()) / 2**32}
    figures = {name: {} for name in judges}
    for fx in load_examples(store, list(range(FeatureStore(store).d_sae))).values():
        if len(fx.heldout) < 2:
            continue
        samples = build_samples(fx)
        for name, judge in judges.items():
            scores = score(samples, [judge(s) for s in samples], calibrated=True)
            for scorer in SCORERS:
                for metric in ("balanced_accuracy", "balanced_accuracy_calibrated", "auc"):
                    figures[name].setdefault((scorer, metric), []).append(scores[scorer][metric])
    offset, blind = figures["offset"], figures["blind"]
    assert len(offset["detection", "auc"]) >= 20
    for scorer in SCORERS:
        assert set(offset[scorer, "balanced_accuracy"]) == {0.5}
        assert min(offset[scorer, "balanced_accuracy_calibrated"]) == 1.0 and min(offset[scorer, "auc"]) == 1.0
        assert abs(np.mean(blind[scorer, "balanced_accuracy_calibrated"]) - 0.5) < 0.06
        assert abs(np.mean(blind[scorer, "auc"]) - 0.5) < 0.06

    result = run_explain(root / "saes" / "main", ExplainConfig(backend="local", limit=4, redo=True, progress=False),
                         store_path=store, backend=_BlindProbabilityBackend())
    stored = FeatureStore(store).feature(result.done[0])["explanations"]["explanation"]["scores"]
    assert stored["score_metric"] == "balanced_accuracy_calibrated"
    assert stored["score"] == np.mean([stored[s]["balanced_accuracy_calibrated"] for s in SCORERS])
    assert "detection.balanced_accuracy_calibrated" in result.summary["shuffled"]


def test_text_judge_keeps_its_own_decision():
    from sae_kit.explain.scorers import classification_metrics

    labels = [True] * 4 + [False] * 4
    parsed = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, None]
    m = classification_metrics(labels, parsed)
    assert "balanced_accuracy_calibrated" not in m and m["parse_failures"] == 1
    assert m["balanced_accuracy"] == (3 / 4 + 2 / 3) / 2
    constant = classification_metrics(labels, [0.7] * 8, calibrated=True)
    assert constant["balanced_accuracy"] == 0.5 and constant["balanced_accuracy_calibrated"] == 0.5
    few_negatives = classification_metrics([True] * 6 + [False] * 2, [0.9] * 6 + [0.8] * 2, calibrated=True)
    assert few_negatives["balanced_accuracy_calibrated"] == 1.0 and few_negatives["calibrated"]["threshold"] == 0.9


def test_explanations_travel_with_an_exported_sae(root, tmp_path):
    """`sae-kit export` writes explanations.json (one record per feature: explanation, scores,
    explainer model, prompt version, date, controls); `sae-kit import` keeps it and the analysis of
    the imported SAE loads it into the new feature store, record for record."""
    import shutil

    from sae_kit.analysis import AnalyzeConfig, analyze_sae_folder
    from sae_kit.interop import FormatError, export_sae, import_sae

    sae = tmp_path / "sae"
    shutil.copytree(root / "saes" / "main", sae)
    from sae_kit.explain.run import explained_features

    done = run_explain(sae, ExplainConfig(backend="none", limit=6, redo=True, progress=False)).done
    exported = export_sae(sae, tmp_path / "exported", "saelens")
    data = json.loads((exported / "explanations.json").read_text())
    assert data["format"] == "sae-kit-explanations-2" and done
    assert [r["feature"] for r in data["records"]] == sorted(explained_features(sae / "features.sqlite"))
    record = data["records"][0]
    assert {"explanation", "scores", "explainer", "explainer_model", "prompt_version", "date"} <= set(record)
    assert record["scores"]["detection"]["balanced_accuracy"] is not None and "shuffled" in record["controls"]

    imported = tmp_path / "imported"
    _, notes = import_sae(exported, imported, "saelens")
    assert any("explanations" in note for note in notes)
    analyze_sae_folder(imported, AnalyzeConfig(tokens=256, context=32, progress=False), model_name=str(root / "model"))
    again = export_explanations(imported / "features.sqlite")
    assert again["records"] == data["records"]
    assert FeatureStore(imported / "features.sqlite").feature(done[0])["explanation"] == \
        FeatureStore(sae / "features.sqlite").feature(done[0])["explanation"]

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    (bad / "explanations.json").write_text(json.dumps({**data, "d_sae": data["d_sae"] + 1}))
    with pytest.raises(FormatError, match="features"):
        import_sae(bad, tmp_path / "never", "saelens")
    assert not (tmp_path / "never").exists()


class _ParrotBackend(_BlindProbabilityBackend):
    """An explainer that answers with the prompt's few-shot example, as SmolLM2-135M mostly did."""

    def complete(self, prompts, *, max_tokens, answer_prefix=""):
        return [" nouns for containers, such as cups, boxes, bottles, and bags."] * len(prompts)


def test_a_copied_few_shot_answer_is_not_stored_as_an_explanation(root):
    from sae_kit.explain.examples import load_examples
    from sae_kit.explain.explainers import LMExplainer, parse_explanation

    fx = list(load_examples(root / "saes" / "main" / "features.sqlite", list(range(8))).values())
    explainer = LMExplainer(_ParrotBackend())
    explanations = explainer.explain(fx)
    assert explainer.parse_failures == len(fx)
    assert all(not e.parsed and "containers" not in e.text and e.rule for e in explanations)
    # a real explanation that shares a few words with the example is kept
    assert parse_explanation(" nouns for containers such as jars.") == "The feature fires on nouns for containers such as jars."

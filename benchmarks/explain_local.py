"""Per-feature cost of the local explainer and judge (`sae-kit explain --backend local`).

Times, for the same features and prompts, interleaved feature by feature:
  * judge, reference: every judge prompt as a whole, left-padded batches of similar length, full
    logits (the implementation before prefix caching);
  * judge, ours: LocalBackend.yes_probability (prompts grouped by shared prefix, prefix once into a
    KV cache, suffixes batched on top, output layer at the last token only);
  * explanation: LMExplainer (greedy generation with KV cache, capped tokens).
and prints the ratio reference / ours and the largest |P(yes)| difference between the two judges.

    nice -n 10 .venv/bin/python benchmarks/explain_local.py /work/scratch/s3-16/sae/features.sqlite --features 8
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

# The shared bench_env.py beside this script (PYTHONSAFEPATH=1 drops the script folder from sys.path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_env import load_average, machine  # noqa: E402


def reference_yes_probability(backend, prompts) -> list[float]:
    encoded = backend._encode(prompts)
    out = [0.0] * len(prompts)
    with torch.inference_mode():
        for chosen, ids, mask in backend._batches(encoded):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            probs = backend.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float().softmax(-1)
            yes, no = probs[:, backend._yes_ids].sum(-1), probs[:, backend._no_ids].sum(-1)
            for row, i in enumerate(chosen):
                out[i] = float(yes[row] / (yes[row] + no[row]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--features", type=int, default=8, help="features (spread over density ranks)")
    parser.add_argument("--positives", type=int, default=8)
    parser.add_argument("--negatives", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sae_kit.explain.backends import LocalBackend
    from sae_kit.explain.examples import load_examples
    from sae_kit.explain.explainers import LMExplainer, TokenRuleExplainer
    from sae_kit.explain.run import ExplainConfig, select_features
    from sae_kit.explain.scorers import build_samples, judge_prompt
    from sae_kit.feature_store import FeatureStore

    backend = LocalBackend(None, batch_size=args.batch_size, threads=args.threads)
    features = select_features(FeatureStore(args.store), ExplainConfig(sample=args.features))
    examples = load_examples(args.store, features)
    explainer = LMExplainer(backend, max_tokens=args.max_tokens)
    rule = TokenRuleExplainer()
    times = {"judge_reference": [], "judge_ours": [], "explain": []}
    diffs, n_prompts, n_tokens = [], 0, 0
    print(f"machine: {machine()}; threads {args.threads}; load average {load_average()}")
    for feature in features:
        fx = examples[feature]
        if len(fx.heldout) < 2:
            continue
        started = time.perf_counter()
        explanation = explainer.explain([fx])[0]
        times["explain"].append(time.perf_counter() - started)
        samples = build_samples(fx, positives=args.positives, negatives=args.negatives)
        # The three explanations a run scores: the explainer's, the token rule, another feature's.
        texts = [explanation.text, rule.explain_one(fx).text, rule.explain_one(examples[features[0]]).text]
        prompts = [judge_prompt(t, s) for t in texts for s in samples]
        n_prompts += len(prompts)
        n_tokens += sum(len(e) for e in backend._encode(prompts))
        started = time.perf_counter()
        reference = reference_yes_probability(backend, prompts)
        times["judge_reference"].append(time.perf_counter() - started)
        started = time.perf_counter()
        ours = backend.yes_probability(prompts)
        times["judge_ours"].append(time.perf_counter() - started)
        diffs.append(float(np.max(np.abs(np.array(ours) - np.array(reference)))))
        print(f"feature {feature}: explain {times['explain'][-1]:.2f}s, judge reference "
              f"{times['judge_reference'][-1]:.2f}s, ours {times['judge_ours'][-1]:.2f}s ({len(prompts)} prompts)",
              flush=True)
    n = len(times["explain"])
    mean = {k: float(np.mean(v)) for k, v in times.items()}
    print(f"\n{n} features, {n_prompts / n:.0f} judge prompts and {n_tokens / n:.0f} prompt tokens per feature")
    print(f"per feature: explanation {mean['explain']:.2f}s; judge reference {mean['judge_reference']:.2f}s, "
          f"ours {mean['judge_ours']:.2f}s; ratio reference/ours {mean['judge_reference'] / mean['judge_ours']:.2f}x")
    print(f"max |P(yes) ours - reference| = {max(diffs):.2e}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()

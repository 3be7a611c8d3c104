"""Steered generation with the KV cache against recomputing the whole sequence at every step.

Both generate the same default + steered batch (same model, SAE, feature, seed); the reference is the
uncached path that ``LanguageModel.generate(replace=...)`` takes for replacements that are not
position-wise. Prints both medians, their ratio, and whether the tokens agree.

    python benchmarks/steer_generation.py --sae runs/demo/train/sae --new-tokens 32 --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae_kit.models import load_model  # noqa: E402
from sae_kit.sae import load_sae  # noqa: E402
from sae_kit.steering import SteeringFeature, steering_replacements  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", required=True, help="SAE folder (its cfg.json names the model and hook)")
    parser.add_argument("--model", help="model (default: the SAE's model_name)")
    parser.add_argument("--prompt", default="The meaning of life is")
    parser.add_argument("--feature", type=int, default=0)
    parser.add_argument("--strength", type=float, default=40.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    sae = load_sae(args.sae)
    model = load_model(args.model or sae.cfg.metadata["model_name"])
    hook = sae.cfg.metadata["hook_name"]
    replace = steering_replacements([SteeringFeature(sae, hook, args.feature, args.strength)], "additive", rows=1)
    prompt = model.to_tokens(args.prompt)[0].expand(2, -1)

    def run(positionwise: bool) -> tuple[float, torch.Tensor]:
        started = time.perf_counter()
        out = model.generate(prompt, args.new_tokens, temperature=0.0, replace=replace, positionwise=positionwise)
        return time.perf_counter() - started, out

    times: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    for _ in range(args.repeats):  # alternated, so load changes hit both alike
        for positionwise in (True, False):
            seconds, outputs[positionwise] = run(positionwise)
            times[positionwise].append(seconds)
    cached, recomputed = statistics.median(times[True]), statistics.median(times[False])
    print(f"{model.name} {hook}, prompt {prompt.shape[1]} tokens, {args.new_tokens} new tokens, batch 2 "
          f"(default + steered), {args.threads} thread(s), median of {args.repeats}")
    print(f"  KV-cached steering     {cached:.2f} s  ({args.new_tokens / cached:.1f} steps/s)")
    print(f"  recompute every step   {recomputed:.2f} s  (reference)")
    print(f"  ratio cached / reference {cached / recomputed:.2f}; same tokens: {torch.equal(outputs[True], outputs[False])}")
    print(f"  default: {model.to_string(outputs[True][0, prompt.shape[1]:])!r}")
    print(f"  steered: {model.to_string(outputs[True][1, prompt.shape[1]:])!r}")


if __name__ == "__main__":
    main()

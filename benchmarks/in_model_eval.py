"""Tokens/s of in-model evaluation (`sae-kit eval --model`): four full forward passes per batch
(the straightforward computation) against the shared prefix with a suffix per variant, cold (first
SAE on a dataset slice) and warm (another SAE on the same slice: cached residuals and ablation
baselines), interleaved over repeats in one run, with the metrics of each path side by side.

    python benchmarks/in_model_eval.py [--model smollm2 --hook blocks.15.hook_resid_post --tokens 2048]

The SAE is a random TopK SAE (expansion 8, k 32) unless ``--sae FOLDER`` names a trained one: the
model's work is the same whatever the SAE's weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

# The shared bench_env.py beside this script (PYTHONSAFEPATH=1 drops the script folder from sys.path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_env import load_average  # benchmarks/ is the script's folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--hook", default="blocks.15.hook_resid_post")
    parser.add_argument("--sae", help="a trained SAE folder (default: a random TopK SAE)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens evaluated per path and repeat")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sae_kit.eval import in_model
    from sae_kit.models import load_model
    from sae_kit.sae import SAEConfig, create_sae, load_sae

    model = load_model(args.model)
    if args.sae:
        sae = load_sae(args.sae)
    else:
        torch.manual_seed(0)
        d = model.hook_dim(args.hook)
        sae = create_sae(SAEConfig(d_in=d, d_sae=8 * d, architecture="topk", k=32, metadata={"hook_name": args.hook}))
    settings = dict(hook=args.hook, context=args.context, batch_size=args.batch_size, max_tokens=args.tokens,
                    progress=False)

    def full():
        return in_model.evaluate_in_model(sae, model, shared_prefix=False, **settings)

    def cold():
        in_model.BASELINES.clear()
        return in_model.evaluate_in_model(sae, model, **settings)

    def warm():  # the cache cold() filled: what a second SAE (or a plugin's next evaluation) pays
        if not in_model.BASELINES.get(model):
            cold()
        return in_model.evaluate_in_model(sae, model, **settings)

    paths = {"full passes": full, "shared prefix (cold)": cold, "shared prefix (warm)": warm}
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"model {args.model} hook {args.hook} tokens {args.tokens} context {args.context} batch {args.batch_size} "
          f"repeats {args.repeats} (median, interleaved)")
    print(f"load average before: {load_average()}")
    times: dict[str, list[float]] = {name: [] for name in paths}
    metrics: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, run in paths.items():
            if name == "shared prefix (warm)":
                warm()  # make sure the cache is filled outside the timed call
            start = time.perf_counter()
            metrics[name] = run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n{'path':<24}{'s':>9}{'tokens/s':>10}{'vs full':>9}{'ce_rec_zero':>13}{'kl':>12}{'loss_sae':>10}")
    for name, t in median.items():
        m = metrics[name]
        print(f"{name:<24}{t:>9.2f}{m['n_tokens'] / t:>10.1f}{median['full passes'] / t:>8.2f}x"
              f"{m['ce_recovered_vs_zero']:>13.6f}{m['kl_div']:>12.7f}{m['loss_sae']:>10.5f}")
    worst = max(abs(metrics[n][k] - metrics["full passes"][k]) for n in metrics
                for k in metrics[n] if k not in ("hook", "n_tokens"))
    print(f"largest metric difference from the full passes: {worst:.2e} (target: >= 3x the full passes' tokens/s)")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()

"""Overhead of harvesting through transformer-lens against a bare Hugging Face forward.

Compares, on the same tokens and thread count:
  (a) ``LanguageModel.capture(tokens, [hook])`` (TransformerBridge, forward stopped after the block);
  (b) the plain HF model (loaded separately from the same directory, not wrapped), stopped after the
      same decoder layer by a forward hook that raises.
The two are timed alternately over several repeats and compared on their medians. Target: (a) costs
at most 10% more than (b).

    python benchmarks/harvest_overhead.py --batch 8 --seq 128 --threads 1 --repeats 9
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

import torch  # noqa: E402  (after the environment is set)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae_kit.models import SMOLLM2_NAMES, ensure_smollm2_cache, load_model  # noqa: E402


class _StopForward(Exception):
    """Raised by the baseline's forward hook once the wanted layer has run."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 or a local HF model directory")
    parser.add_argument("--cache-dir", default=None, help="sae-kit model cache (default: ~/.cache/sae-kit/models)")
    parser.add_argument("--hook", default="blocks.6.hook_resid_post",
                        help="a blocks.{i}.hook_resid_post hook (the baseline hooks decoder layer i's output)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--baseline-attn", default="sdpa", choices=["sdpa", "eager"],
                        help="attention kernel of the bare HF model (the bridge always runs eager)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not args.hook.endswith(".hook_resid_post"):
        sys.exit("--hook must be a blocks.{i}.hook_resid_post hook: the baseline hooks a decoder layer's output")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    directory = (ensure_smollm2_cache(args.cache_dir) if args.model.lower() in SMOLLM2_NAMES
                 else Path(args.model))
    model = load_model(args.model, cache_dir=args.cache_dir)
    layer = model.layer_of(args.hook)
    bare = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                attn_implementation=args.baseline_attn).eval()

    captured: list[torch.Tensor] = []

    def stop_after_layer(module, inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    bare.model.layers[layer].register_forward_hook(stop_after_layer)

    generator = torch.Generator().manual_seed(args.seed)
    # Ordinary vocabulary ids; the first few hundred ids of most tokenizers are special or bytes.
    tokens = torch.randint(1000, model.d_vocab, (args.batch, args.seq), generator=generator)

    def run_capture() -> torch.Tensor:
        return model.capture(tokens, [args.hook])[args.hook]

    def run_bare() -> torch.Tensor:
        captured.clear()
        with torch.inference_mode():
            try:
                bare.model(input_ids=tokens)
            except _StopForward:
                pass
        return captured[0]

    # Warm-up (allocator, lazy initialisation) and a correctness check on the same tokens.
    difference = (run_capture() - run_bare()).abs().max().item()

    # Wall time is what the spec asks for; CPU time of this process is also kept because, with one
    # thread on a shared machine, it leaves out the time other processes hold the core.
    wall = {"capture": [], "bare": []}
    cpu = {"capture": [], "bare": []}
    runners = {"capture": run_capture, "bare": run_bare}
    for repeat in range(args.repeats):
        # Alternate which runs first so drift on a shared machine hits both equally.
        order = ("capture", "bare") if repeat % 2 == 0 else ("bare", "capture")
        for label in order:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            runners[label]()
            wall[label].append(time.perf_counter() - wall_start)
            cpu[label].append(time.process_time() - cpu_start)

    n_tokens = args.batch * args.seq
    print(f"model {model.name} ({model.n_layers} layers, d_model {model.d_model}), hook {args.hook}, "
          f"batch {args.batch}x{args.seq} = {n_tokens} tokens, {args.threads} thread(s), "
          f"{args.repeats} interleaved repeats, baseline attention {args.baseline_attn}")
    print(f"max |capture - bare| = {difference:.3g}")
    for clock, times in (("wall", wall), ("cpu", cpu)):
        median = {label: statistics.median(values) for label, values in times.items()}
        for label, title in (("capture", "(a) LanguageModel.capture (transformer-lens bridge)"),
                             ("bare", "(b) bare HF forward, stopped by a raising hook")):
            print(f"[{clock:4s}] {title:53s} median {median[label]:.3f} s  "
                  f"{n_tokens / median[label]:6.0f} tok/s  (runs: {', '.join(f'{t:.3f}' for t in times[label])})")
        overhead = median["capture"] / median["bare"] - 1.0
        verdict = "within" if overhead <= 0.10 else "ABOVE"
        print(f"[{clock:4s}] overhead of capture over bare HF: {overhead * 100:+.1f}% ({verdict} the 10% target)")


if __name__ == "__main__":
    main()

"""Training throughput of N data-parallel ranks against one process, same global batch, same run.

Writes a planted-feature store, then trains the same SAE (same global batch, same steps) under
``torchrun --nproc_per_node 1`` (the reference: one plain process) and ``--nproc_per_node N``,
interleaved over repeats. Each run times ``Trainer.run()`` on rank 0 after every rank has built
its SAE, so interpreter start-up and the rendezvous are excluded; the median per setting is kept.
Prints tokens/s of both and their ratio (ideal: N on N free cores or GPUs; on CPU every rank also
reads the whole global batch, see README). CUDA machines use NCCL, one GPU per rank.

    python benchmarks/data_parallel.py [--ranks 2 --arch batchtopk --d-in 256 --expansion 16 --batch 4096 --steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    from sae_kit.store import ActivationStore
    from sae_kit.train import distributed
    from sae_kit.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(out=args.out, architecture=args.arch, k=args.k, expansion=args.expansion,
                      batch_size=args.batch, tokens=args.batch * args.steps, eval_every=10**9, eval_tokens=args.batch,
                      checkpoint_every=10**9, log_every=10**9, threads=args.threads, progress=False)
    trainer = Trainer(cfg, ActivationStore(args.store))
    distributed.barrier(trainer.dist)
    started = time.perf_counter()
    trainer.run()
    if trainer.dist.is_main:
        seconds = time.perf_counter() - started
        print(json.dumps({"seconds": seconds, "tokens_per_s": cfg.tokens / seconds}))


def launch(ranks: int, args: argparse.Namespace, store: Path, out: Path) -> float:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               __file__, "--worker", "--store", str(store), "--out", str(out), "--arch", args.arch, "--k", str(args.k),
               "--expansion", str(args.expansion), "--batch", str(args.batch), "--steps", str(args.steps),
               "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if result.returncode:
        sys.exit(result.stderr[-4000:])
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--arch", default="batchtopk")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4096, help="global batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from sae_kit.eval.synthetic import make_dataset
    from sae_kit.store import write_store

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tokens = args.batch * (args.steps + 2)
        data = make_dataset("sharkey", seed=0, d=args.d_in, n_features=4 * args.d_in).sample(
            tokens, torch.Generator().manual_seed(0))[0]
        store = write_store(Path(tmp) / "store", data).directory
        speeds: dict[int, list[float]] = {1: [], args.ranks: []}
        for repeat in range(args.repeats):
            for ranks in speeds:
                speeds[ranks].append(launch(ranks, args, store, Path(tmp) / f"run{ranks}-{repeat}"))
    one, many = statistics.median(speeds[1]), statistics.median(speeds[args.ranks])
    print(f"{args.arch} d_in={args.d_in} d_sae={args.d_in * args.expansion} global batch {args.batch}, {args.steps} steps, "
          f"{args.threads} thread(s) per rank")
    print(f"  1 process    {one:12.0f} tokens/s (reference)")
    print(f"  {args.ranks} ranks      {many:12.0f} tokens/s   ratio {many / one:.2f}x")


if __name__ == "__main__":
    main()

"""GBA's bias rule against its targets: per-group firing frequency over the last 10 % of a run.

docs/method-fixes.md's GBA table (worst group ratio, L0, held-out dead fraction, FVU) comes from
this command; before it lived in a scratch script. One JSON line, preceded by a per-group table.

    python -m sae_kit.experiments.gba_groups --activations STORE --tokens 60000 [--options JSON] [--scale 100]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from sae_kit.eval.evaluate import evaluate_sae
from sae_kit.experiments.no_collapse import ScaledSource
from sae_kit.store import ActivationStore
from sae_kit.train.trainer import TrainConfig, Trainer


def group_frequencies(trainer: Trainer, last_fraction: float = 0.1) -> tuple[torch.Tensor, list[int]]:
    """Wrap the trainer's SAE so that it counts firings per latent over the run's last steps."""
    sae, total = trainer.sae, trainer.cfg.tokens // trainer.cfg.batch_size
    counts, seen = torch.zeros(sae.cfg.d_sae, dtype=torch.float64), [0]
    original = sae.update_fire_stats

    def record(codes):
        original(codes)
        if trainer.step >= int((1 - last_fraction) * total):
            counts.index_add_(0, codes.indices[codes.active], torch.ones(int(codes.active.sum()), dtype=torch.float64))
            seen[0] += codes.batch_size

    sae.update_fire_stats = record
    return counts, seen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", required=True, help="an activation store")
    parser.add_argument("--tokens", type=int, default=60_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--options", type=json.loads, default={}, help="GBA options as JSON")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every activation by this")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = ActivationStore(args.activations)
    if args.scale != 1.0:
        source = ScaledSource(source, args.scale)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sae-kit-gba-groups-") as out:
        cfg = TrainConfig(out=out, architecture="gba", batch_size=args.batch_size, tokens=args.tokens,
                          expansion=args.expansion, options=args.options, eval_every=10**9,
                          checkpoint_every=10**9, progress=False, threads=args.threads, seed=args.seed)
        trainer = Trainer(cfg, source)
        counts, seen = group_frequencies(trainer)
        sae = trainer.run()
    wall = time.perf_counter() - started
    if not seen[0]:
        raise SystemExit("the run was too short to observe its last 10 % of steps: raise --tokens")
    frequency, targets = counts / seen[0], sae.group_targets().double()
    worst = 1.0
    print("group  target  measured  ratio  never-fired")
    for g in range(sae.opts.groups):
        members = sae.group_index == g
        target, measured = float(targets[members].mean()), float(frequency[members].mean())
        worst = max(worst, measured / target, target / max(measured, 1e-12))
        print(g, f"{target:.4g} {measured:.4g} {measured / target:.2f} {float((frequency[members] == 0).double().mean()):.3f}")
    held = evaluate_sae(sae, source, max_tokens=16_384, heldout_fraction=cfg.heldout_fraction)
    print(json.dumps({"wall_s": round(wall), "worst_group_ratio": round(worst, 2),
                      "target_l0": round(float(targets.sum()), 1), "fvu": round(held["fvu"], 3),
                      "l0": round(held["l0_mean"], 1), "dead": round(held["dead_fraction"], 3)}))


if __name__ == "__main__":
    main()

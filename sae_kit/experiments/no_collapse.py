"""Every architecture on its defaults: no collapse anywhere (issue 12's sweep).

For each registered architecture, one short run on each planted set (``bench synthetic``'s sizes,
``--steps-scale`` of its step counts) and on real activation stores (several depths, plus one store
with its activations multiplied by 100), all with the architecture's defaults (only k is shared:
the planted set's k, or 32 on real data). A run passes when fewer than 10 % of latents are dead on
held-out rows and its mean L0 is within 2x of its target: k for the TopK family, the group targets'
sum for GBA, and for top-AFA and ReLU (which have no default target) the true mean L0 on planted
sets and the TopK k on real data.

    python -m sae_kit.experiments.no_collapse --stores STORE... --scaled-store STORE --out docs/no_collapse.md

``--variants`` runs planted sets at sizes, seeds and input transforms the defaults were not tuned on
(``VARIANTS``: other widths, feature counts, sparsities, a x100 scale and a large common offset), with
TopK as the reference in every table. Where the dictionary is wider than the planted feature count,
a run also passes on dead latents when it leaves no more dead than TopK on the same variant.

    python -m sae_kit.experiments.no_collapse --variants all --steps-scale 1.0 --seed 5 --out /tmp/variants.md
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_kit.eval.evaluate import evaluate_sae
from sae_kit.eval.synthetic import DATASET_NAMES, SyntheticSource, make_dataset
from sae_kit.experiments.bench import DATASETS, DEAD_TOKENS, LEARNING_RATE
from sae_kit.sae import ARCHITECTURES
from sae_kit.train.trainer import TrainConfig, Trainer

REAL_K = 32
# Every variant's table starts with this architecture on its defaults: the dead fraction to compare with.
REFERENCE = "topk"


@dataclass(frozen=True)
class Variant:
    """A planted set at sizes it was not tuned on: ``make_dataset(dataset, seed, **overrides)``."""

    dataset: str
    overrides: dict[str, Any]
    d_sae: int
    k: int
    steps: int
    scale: float = 1.0  # every activation multiplied by this
    offset: float = 0.0  # a fixed random direction of this norm (x the mean sample norm) added to every sample


VARIANTS: dict[str, Variant] = {
    "zipf_d128": Variant("zipf", dict(d=128, n_features=800, mean_active=1.8, exponent=1.2), d_sae=1600, k=2, steps=800),
    "sharkey_d128": Variant("sharkey", dict(d=128, n_features=256, mean_active=8.0), d_sae=512, k=8, steps=700),
    "gba_2_12": Variant("gba_imbalanced", dict(d=64, n_features=256, active_counts=(2, 12)), d_sae=512, k=7, steps=1200),
    "signed_d32": Variant("signed", dict(d=32, n_features=64, mean_active=3.0), d_sae=128, k=3, steps=800),
    "sharkey_d64": Variant("sharkey", dict(d=64, n_features=256, mean_active=5.0), d_sae=512, k=5, steps=700),
    "sharkey_x100": Variant("sharkey", dict(d=64, n_features=256, mean_active=5.0), d_sae=512, k=5, steps=700, scale=100.0),
    "sharkey_offset": Variant("sharkey", dict(d=64, n_features=256, mean_active=5.0), d_sae=512, k=5, steps=700, offset=10.0),
}


class OffsetSource:
    """A batch source with one fixed vector added to every activation (a residual stream's large mean)."""

    def __init__(self, source: Any, offset: torch.Tensor):
        self.source, self.offset, self.d_in = source, offset, source.d_in

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def iter_batches(self, *args, **kwargs):
        for batch in self.source.iter_batches(*args, **kwargs):
            yield batch + self.offset.to(batch)

    def sample(self, *args, **kwargs) -> torch.Tensor:
        batch = self.source.sample(*args, **kwargs)
        return batch + self.offset.to(batch)


def variant_source(variant: Variant, seed: int) -> tuple[Any, Any]:
    """``(dataset, source)`` for a variant: the planted set, then its scale and offset applied."""
    dataset = make_dataset(variant.dataset, seed=seed, **variant.overrides)
    source: Any = SyntheticSource(dataset)
    if variant.offset:
        x, _ = dataset.sample(4096, torch.Generator().manual_seed(seed))
        direction = torch.randn(dataset.d, generator=torch.Generator().manual_seed(10_000 + seed))
        source = OffsetSource(source, direction / direction.norm() * variant.offset * float(x.norm(dim=1).mean()))
    if variant.scale != 1.0:
        source = ScaledSource(source, variant.scale)
    return dataset, source


def run_variants(names: list[str], archs: list[str], *, seed: int, steps_scale: float = 1.0,
                 options: dict[str, Any] | None = None, label: str = "") -> list[dict[str, Any]]:
    """Every arch (TopK first, as the reference) on each variant; ``pass`` judged against TopK's dead."""
    rows = []
    archs = [REFERENCE] + [a for a in archs if a != REFERENCE]
    for name in names:
        variant = VARIANTS[name]
        dataset, source = variant_source(variant, seed)
        true_l0 = float(dataset.expected_active())
        steps = max(1, int(variant.steps * steps_scale))
        reference = None
        for arch in archs:
            row = run_one(arch, source, label=f"variant:{name} s{seed}", k=variant.k, true_l0=true_l0,
                          tokens=steps * 512, batch=512, d_sae=variant.d_sae, expansion=1, lr=LEARNING_RATE,
                          dead_tokens=DEAD_TOKENS, seed=seed, options=options if arch != REFERENCE else None,
                          variant=label if arch != REFERENCE else "")
            if reference is None:
                reference = row["dead"]
            l0_ok = 0.5 <= row["l0"] / row["target_l0"] <= 2.0
            wide = variant.d_sae > dataset.n_features
            row["pass"] = l0_ok and (row["dead"] < 0.1 or (wide and row["dead"] <= reference + 0.01))
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    return rows


class ScaledSource:
    """A batch source whose activations are multiplied by ``factor`` (scale must not matter)."""

    def __init__(self, source: Any, factor: float):
        self.source, self.factor, self.d_in = source, factor, source.d_in

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def iter_batches(self, *args, **kwargs):
        for batch in self.source.iter_batches(*args, **kwargs):
            yield batch * self.factor

    def sample(self, *args, **kwargs) -> torch.Tensor:
        return self.source.sample(*args, **kwargs) * self.factor


def target_l0(sae, k: int, true_l0: float | None) -> float:
    if hasattr(sae, "group_targets"):  # frequency-target rules (GBA): the targets' sum
        return float(sae.group_targets().sum())
    if type(sae).uses_k:
        return float(k)
    return float(true_l0) if true_l0 is not None else float(k)


def run_one(arch: str, source: Any, *, label: str, k: int, true_l0: float | None, tokens: int, batch: int,
            d_sae: int | None, expansion: int, lr: float | None, dead_tokens: int, seed: int,
            options: dict[str, Any] | None = None, variant: str = "") -> dict[str, Any]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sae-kit-nocollapse-") as out:
        cfg = TrainConfig(out=out, architecture=arch, k=k, d_sae=d_sae, options=dict(options or {}),
                          expansion=expansion, lr=lr, batch_size=batch,
                          tokens=tokens, warmup_steps=min(100, tokens // batch // 10), dead_tokens_threshold=dead_tokens,
                          eval_every=10**9, checkpoint_every=10**9, log_every=50, seed=seed, progress=False)
        sae = Trainer(cfg, source).run()
    held = evaluate_sae(sae, source, max_tokens=16_384, batch_size=4096)
    target = target_l0(sae, k, true_l0)
    ratio = held["l0_mean"] / target
    ok = held["dead_fraction"] < 0.1 and 0.5 <= ratio <= 2.0
    return {"data": label, "arch": arch + (f" ({variant})" if variant else ""), "target_l0": round(target, 2),
            "l0": round(held["l0_mean"], 2),
            "dead": round(held["dead_fraction"], 3), "fvu": round(held["fvu"], 3), "pass": ok,
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=sorted(ARCHITECTURES))
    parser.add_argument("--datasets", nargs="*", default=list(DATASET_NAMES))
    parser.add_argument("--steps-scale", type=float, default=0.5)
    parser.add_argument("--stores", nargs="*", default=[], help="real activation stores (e.g. blocks.6 and blocks.20)")
    parser.add_argument("--scaled-store", help="a store also run with its activations multiplied by 100")
    parser.add_argument("--tokens", type=int, default=100_000, help="training tokens per real-data run")
    parser.add_argument("--expansion", type=int, default=4, help="real-data dictionary width / d_in")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", type=json.loads, default={},
                        help='architecture options as JSON, e.g. \'{"rule": "bounded"}\' (every --arch gets them)')
    parser.add_argument("--label", default="", help="appended to each row's arch (which variant was run)")
    parser.add_argument("--out", help="markdown table (and .jsonl rows beside it)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help=f"planted variants not tuned on ('all' or some of {sorted(VARIANTS)}); "
                             "runs only these (TopK added as the reference)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sae_kit.store import ActivationStore

    rows = []
    if args.variants is not None:
        names = list(VARIANTS) if not args.variants or "all" in args.variants else args.variants
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
        rows = run_variants(names, args.arch, seed=args.seed, steps_scale=args.steps_scale,
                            options=args.options, label=args.label)
        args.datasets, args.stores, args.scaled_store = [], [], None
    for name in args.datasets:
        settings, dataset = DATASETS[name], make_dataset(name, seed=args.seed)
        source = SyntheticSource(dataset)
        true_l0 = float(dataset.sparsity.expected_active())
        steps = max(1, int(settings.steps * args.steps_scale))
        for arch in args.arch:
            rows.append(run_one(arch, source, label=f"planted:{name}", k=settings.k, true_l0=true_l0,
                                tokens=steps * settings.batch_size, batch=settings.batch_size, d_sae=settings.d_sae,
                                expansion=1, lr=LEARNING_RATE, dead_tokens=DEAD_TOKENS, seed=args.seed,
                                options=args.options, variant=args.label))
            print(json.dumps(rows[-1]), flush=True)
    real = [(Path(s).name, ActivationStore(s)) for s in args.stores]
    if args.scaled_store:
        real.append((f"{Path(args.scaled_store).name} x100", ScaledSource(ActivationStore(args.scaled_store), 100.0)))
    for label, source in real:
        for arch in args.arch:
            rows.append(run_one(arch, source, label=label, k=REAL_K, true_l0=None, tokens=args.tokens, batch=1024,
                                d_sae=None, expansion=args.expansion, lr=None, dead_tokens=args.tokens // 2,
                                seed=args.seed, options=args.options, variant=args.label))
            print(json.dumps(rows[-1]), flush=True)
    columns = ["data", "arch", "target_l0", "l0", "dead", "fvu", "pass", "seconds"]
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    print("\n".join(table))
    if args.out:
        out = Path(args.out)
        out.with_suffix(".jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        out.write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

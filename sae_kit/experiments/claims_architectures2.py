"""Planted-data claims for JumpReLU, Matryoshka BatchTopK and (skip) transcoders.

Each is ``fn(quick: bool, seed: int) -> dict`` with the keys of a reproduction row (COORD.md
interface 2: name, paper, claim, setting, unknowns, paper_value, ours, difference, verdict, command,
figure, wall_s). They register with ``@claim`` from ``sae_kit.experiments.reproduce`` (``sae-kit bench
reproduce``) when that registry is installed; without it they are plain functions (call them, or run
``python -m sae_kit.experiments.claims_architectures2 [--quick]``). Verdicts compare our number with
the claim as stated in the row; nothing is tuned to pass.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

try:  # the registry of `sae-kit bench reproduce` (issue 12), when present
    from sae_kit.experiments.reproduce import claim
except ModuleNotFoundError:
    def claim(name: str) -> Callable:  # noqa: D401 (same signature as the registry's decorator)
        def keep(fn: Callable) -> Callable:
            fn.claim_name = name
            return fn
        return keep

TOLERANCE = 0.10  # the issue's ±10 % on the held-out mean L0


def _command(name: str, quick: bool) -> str:
    return f"sae-kit bench reproduce --claim {name}{' --quick' if quick else ''}"


def _train(source, out: Path, **settings):
    from sae_kit.train.trainer import TrainConfig, train

    cfg = TrainConfig(out=str(out), progress=False, eval_every=10**9, checkpoint_every=10**9, log_every=10**6,
                      **settings)
    sae = train(cfg, source=source)
    return sae, json.loads((out / "sae" / "eval.json").read_text())


def _row(name: str, quick: bool, started: float, **fields: Any) -> dict[str, Any]:
    return {"name": name, "command": _command(name, quick), "wall_s": round(time.perf_counter() - started, 1),
            **fields}


# ------------------------------------------------------------------------------------------ JumpReLU
@claim("jumprelu_target_l0")
def jumprelu_target_l0(quick: bool, seed: int) -> dict[str, Any]:
    """A JumpReLU SAE trained with --target-l0 N has a held-out mean L0 within ±10 % of N."""
    import plotly.graph_objects as go

    from sae_kit.eval.synthetic import SyntheticSource, make_dataset

    started = time.perf_counter()
    targets = (8, 16)
    steps = 150 if quick else 600
    dataset = make_dataset("sharkey", d=64, n_features=256, mean_active=5.0, seed=seed)
    reached = {}
    with tempfile.TemporaryDirectory() as tmp:
        for target in targets:
            _, metrics = _train(SyntheticSource(dataset), Path(tmp) / f"l0_{target}", architecture="jumprelu",
                                target_l0=target, d_sae=512, batch_size=1024, tokens=1024 * steps, seed=seed,
                                eval_tokens=16_384)
            reached[target] = metrics["l0_mean"]
    errors = {t: reached[t] / t - 1 for t in targets}
    ok = [abs(e) <= TOLERANCE for e in errors.values()]
    figure = go.Figure([go.Bar(x=[str(t) for t in targets], y=[reached[t] for t in targets], name="held-out L0"),
                        go.Scatter(x=[str(t) for t in targets], y=list(targets), mode="markers", name="target")])
    figure.update_layout(title="JumpReLU: held-out mean L0 against --target-l0", xaxis_title="target L0",
                         yaxis_title="mean L0")
    return _row(
        "jumprelu_target_l0", quick, started,
        paper="Rajamanoharan et al. 2024 (JumpReLU); Gemma Scope 2 / SAELens quadratic target-L0 mode",
        claim="Stating a target L0 gives a JumpReLU SAE that runs at that L0 (held-out mean within ±10 %).",
        setting={"data": "sharkey planted, d=64, 256 features, mean 5 active", "d_sae": 512, "batch": 1024,
                 "steps": steps, "targets": list(targets), "controller": "PI on log L0 (sae/jumprelu.py)"},
        unknowns=["Gemma Scope 2's exact quadratic normalisation -> PI controller on λ around the quadratic's slope",
                  "how close the paper's SAEs land -> the issue's ±10 %"],
        paper_value="L0 = target (stated as the mode's purpose; no accuracy given)",
        ours=", ".join(f"target {t}: {reached[t]:.2f}" for t in targets),
        difference=", ".join(f"{errors[t]:+.1%}" for t in targets),
        verdict="reproduced" if all(ok) else "partly" if any(ok) else "not reproduced",
        measured={f"l0 at target {t}": float(reached[t]) for t in targets},
        figure=figure)


# ----------------------------------------------------------------------------------------- Matryoshka
@claim("matryoshka_absorption")
def matryoshka_absorption(quick: bool, seed: int) -> dict[str, Any]:
    """On planted parent/child features a Matryoshka BatchTopK SAE absorbs parents less than BatchTopK."""
    import plotly.graph_objects as go

    from sae_kit.eval.absorption import absorption, hierarchical_dataset
    from sae_kit.eval.synthetic import SyntheticSource

    started = time.perf_counter()
    steps = 150 if quick else 500
    dataset = hierarchical_dataset(seed=seed)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("batchtopk", "matryoshka"):  # the flat baseline, then the nested dictionary
            sae, metrics = _train(SyntheticSource(dataset), Path(tmp) / name, architecture=name, k=6, d_sae=128,
                                  batch_size=1024, tokens=1024 * steps, seed=seed, dead_tokens_threshold=100_000,
                                  eval_tokens=16_384)
            result[name] = {**absorption(sae, dataset), "fvu": metrics["fvu"], "l0": metrics["l0_mean"]}
    flat, nested = result.values()
    ours, base = nested["absorption"], flat["absorption"]
    figure = go.Figure([go.Bar(x=list(result), y=[r["absorption"] for r in result.values()], name="absorption")])
    figure.update_layout(title="Parent absorption on planted hierarchical features (lower is better)",
                         yaxis_title="fraction of child-active tokens where the parent latent is silent")
    return _row(
        "matryoshka_absorption", quick, started,
        paper="Bussmann et al. 2025 (Matryoshka SAEs); Nabeshima 2024",
        claim="Matryoshka SAEs absorb parent features into child latents much less than a flat BatchTopK SAE.",
        setting={"data": "16 parents x 4 children (child implies parent), d=64", "d_sae": 128, "k": 6,
                 "steps": steps, "prefixes": "default fractions 1/64, 1/16, 1/4, 1"},
        unknowns=["the paper's absorption numbers on toy data -> direction only (lower than BatchTopK)",
                  "prefix widths -> our default fractions"],
        paper_value="much lower absorption than BatchTopK (qualitative)",
        ours=(f"absorption {ours:.3f} vs BatchTopK {base:.3f} (parent recall {nested['parent_recall']:.2f}"
              f" vs {flat['parent_recall']:.2f}; FVU {nested['fvu']:.3f} vs {flat['fvu']:.3f})"),
        difference=f"{ours - base:+.3f} absorption ({ours / max(base, 1e-9):.2f}x)",
        verdict="reproduced" if ours < 0.75 * base else "partly" if ours < base else "not reproduced",
        measured={f"{name} {key}": float(value) for name, r in result.items() for key, value in r.items()
                  if key in ("absorption", "parent_recall", "fvu", "l0")},
        figure=figure)


# ---------------------------------------------------------------------------------------- transcoders
def planted_pairs(seed: int, d_in: int = 32, d_out: int = 32, n_features: int = 128, active: float = 0.05,
                  skip_scale: float = 0.5):
    """x Gaussian; y = a sparse ReLU code of x (about ``active`` of the features) decoded, plus A·x."""
    from sae_kit.store_pair import PairedSource

    g = torch.Generator().manual_seed(seed)
    E = torch.randn(n_features, d_in, generator=g) / d_in ** 0.5
    D = torch.randn(n_features, d_out, generator=g) / d_out ** 0.5
    A = torch.randn(d_out, d_in, generator=g) * skip_scale / d_in ** 0.5

    def draw(n: int, generator: torch.Generator):
        x = torch.randn(n, d_in, generator=generator)
        pre = x @ E.T
        codes = torch.where(pre > pre.quantile(1 - active, dim=1, keepdim=True), pre, 0.0)
        return x, codes @ D + x @ A.T

    return PairedSource(draw, d_in, d_out)


@claim("skip_transcoder")
def skip_transcoder(quick: bool, seed: int) -> dict[str, Any]:
    """A skip transcoder predicts a target with an affine part better than a transcoder at the same L0."""
    import plotly.graph_objects as go

    started = time.perf_counter()
    steps = 150 if quick else 600
    source = planted_pairs(seed)
    fvu = {}
    with tempfile.TemporaryDirectory() as tmp:
        for skip in (False, True):
            _, metrics = _train(source, Path(tmp) / f"skip_{skip}", architecture="topk", k=6, d_sae=256,
                                batch_size=1024, tokens=1024 * steps, seed=seed,
                                skip_connection=skip, eval_tokens=16_384)
            fvu["skip transcoder" if skip else "transcoder"] = metrics["fvu"]
    plain, skipped = fvu["transcoder"], fvu["skip transcoder"]
    figure = go.Figure([go.Bar(x=list(fvu), y=list(fvu.values()))])
    figure.update_layout(title="Output FVU at k = 6 on planted sparse + affine pairs (lower is better)",
                         yaxis_title="held-out FVU of the output")
    return _row(
        "skip_transcoder", quick, started,
        paper="Paulo, Shabalin & Belrose 2025 (Transcoders beat sparse autoencoders for interpretability)",
        claim="Adding an affine skip connection lowers a transcoder's reconstruction error at the same sparsity.",
        setting={"data": "y = sparse ReLU code of x decoded + A·x, d_in=d_out=32, 128 features", "d_sae": 256,
                 "k": 6, "steps": steps},
        unknowns=["the size of the affine part in real MLPs -> ||A·x|| about half the sparse part",
                  "the paper's numbers are on LMs -> direction only"],
        paper_value="skip transcoders Pareto-dominate transcoders (lower loss, same interpretability)",
        ours=f"output FVU {skipped:.3f} with W_skip vs {plain:.3f} without",
        difference=f"{skipped - plain:+.3f} FVU ({skipped / max(plain, 1e-9):.2f}x)",
        verdict="reproduced" if skipped < plain else "not reproduced",
        measured={f"{name} fvu": float(value) for name, value in fvu.items()},
        figure=figure)


CLAIMS = (jumprelu_target_l0, matryoshka_absorption, skip_transcoder)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for fn in CLAIMS:
        row = getattr(fn, "__wrapped__", fn)(args.quick, args.seed)
        print(json.dumps({k: v for k, v in row.items() if k != "figure"}, default=str))


if __name__ == "__main__":
    main()

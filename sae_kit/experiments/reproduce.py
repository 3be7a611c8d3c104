"""``sae-kit bench reproduce``: one small named experiment per published claim.

A claim is a function ``fn(quick: bool, seed: int) -> dict`` registered with ``@claim("name")``; it
returns the keys of ``CLAIM_KEYS`` (the paper's number, ours, the difference, a verdict, the command,
a plotly figure or None, the wall time). ``--quick`` sizes finish in seconds (CI); full sizes take
minutes. ``render_markdown`` writes the table of docs/reproduction.md; ``write_outputs`` also saves
one HTML figure per claim beside it. The verdict compares our number with the paper's claim as
stated in the row: nothing is tuned to pass, and a claim that does not hold says so with numbers.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from sae_kit.eval.metrics import feature_recovery_rate, latents_per_feature
from sae_kit.eval.synthetic import (
    FixedCountSparsity,
    PlantedDataset,
    SyntheticSource,
    make_dataset,
    random_unit_features,
)
from sae_kit.fileio import atomic_write

CLAIM_KEYS = ("name", "paper", "claim", "setting", "unknowns", "paper_value", "ours", "difference",
              "verdict", "command", "figure", "wall_s")
VERDICTS = ("reproduced", "not reproduced", "partly")
CLAIMS: dict[str, Callable[[bool, int], dict[str, Any]]] = {}


def claim(name: str):
    """Register a reproduction claim under ``name`` (COORD.md interface 2)."""

    def register(fn: Callable[[bool, int], dict[str, Any]]):
        if name in CLAIMS:
            raise ValueError(f"claim {name!r} is registered twice")

        def run(quick: bool, seed: int) -> dict[str, Any]:
            started = time.perf_counter()
            row = fn(quick, seed)
            row.setdefault("name", name)
            row.setdefault("wall_s", round(time.perf_counter() - started, 1))
            missing = [key for key in CLAIM_KEYS if key not in row]
            if missing:
                raise ValueError(f"claim {name!r} returned no {missing}")
            if row["verdict"] not in VERDICTS:
                raise ValueError(f"claim {name!r}: verdict must be one of {VERDICTS}, got {row['verdict']!r}")
            return row

        run.__wrapped__ = fn
        CLAIMS[name] = run
        return run

    return register


def load_claim_modules() -> None:
    """Import modules that register further claims (other architectures' files), when present."""
    import importlib

    for module in ("sae_kit.experiments.claims_architectures2",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def run_claims(names: list[str] | None = None, quick: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    load_claim_modules()
    names = list(CLAIMS) if not names or "all" in names else names
    unknown = sorted(set(names) - set(CLAIMS))
    if unknown:
        raise ValueError(f"unknown claim(s) {unknown}; choose from {sorted(CLAIMS)}")
    return [CLAIMS[name](quick, seed) for name in names]


# ------------------------------------------------------------------ training
# --quick: smaller held-out evaluation and init sample (the run's own numbers, just noisier).
QUICK_TRAIN = {"eval_tokens": 2048, "init_tokens": 4096}


def train_planted(dataset: PlantedDataset, arch: str, *, d_sae: int, steps: int, k: int = 32,
                  batch_size: int = 512, lr: float = 1e-3, seed: int = 0, options: dict | None = None,
                  eval_tokens: int = 16_384, dead_tokens: int = 100_000, init_tokens: int = 32_768,
                  on_trainer: Callable[[Any], None] | None = None):
    """Train one SAE on a planted dataset with the project's Trainer; returns (sae, eval dict).

    ``on_trainer`` is called with the Trainer before it runs (to attach probes, e.g. per-latent firing
    counts over the run's end: ``gba_groups.group_frequencies``)."""
    from sae_kit.train.trainer import TrainConfig, Trainer

    with tempfile.TemporaryDirectory(prefix="sae-kit-reproduce-") as out:
        cfg = TrainConfig(
            out=out, architecture=arch, k=k, d_sae=d_sae, options=dict(options or {}), lr=lr,
            batch_size=batch_size, tokens=steps * batch_size, warmup_steps=min(50, steps // 10),
            dead_tokens_threshold=dead_tokens, eval_every=steps, eval_tokens=eval_tokens,
            checkpoint_every=steps, log_every=max(1, steps // 20), seed=seed, progress=False, init_tokens=init_tokens,
        )
        trainer = Trainer(cfg, SyntheticSource(dataset))
        if on_trainer is not None:
            on_trainer(trainer)
        sae = trainer.run()
        evaluation = json.loads((trainer.run_dir / "sae" / "eval.json").read_text())
    return sae, evaluation


@torch.no_grad()
def heldout_codes(sae, dataset: PlantedDataset, n: int, seed: int):
    """Inference codes [n, d_sae] (dense) and true codes [n, n_features] on fresh samples."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    x, truth = dataset.sample(n, generator)
    sae.eval()
    codes = sae.encode(x).to_dense()
    x_hat = sae(x)
    return x, x_hat, codes, truth


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Σ||x − x̂||² / Σ||x − mean||² (FVU)."""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def fmt(value: float, digits: int = 3) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def command_for(name: str, quick: bool) -> str:
    return f"sae-kit bench reproduce --claim {name}" + (" --quick" if quick else "")


# -------------------------------------------------------------------- claims
GBA_CALIBRATED_D = 256


@claim("gba_imbalanced_frr")
def gba_imbalanced_frr(quick: bool, seed: int) -> dict[str, Any]:
    """GBA paper's frequency-awareness table: FRR@0.9 on n=128, d=42, s ∈ {3, 20}."""
    import plotly.graph_objects as go

    # d = 256, not the note's 42: at d = 42 our TopK recovers nothing (FRR@0.9 0 at widths 128-1024,
    # 1500-6000 steps, U(0.5,1.5] or constant coefficients), while at d = 256, width n = 128 it gives the
    # paper's TopK K=20 numbers (98.4 % / 99.2 %); the baseline fixes the unknown, GBA is then the test.
    dataset = make_dataset("gba_imbalanced", seed=seed, d=GBA_CALIBRATED_D)
    d_sae, steps = (128, 60) if quick else (128, 3000)
    # GBA as the paper's Algorithm 1 (methods.md 6.4-6.5): all biases adapted every T = 50 steps by a
    # constant γ = 0.01, only dead neurons raised, biases at most 0, K = 10 groups at 0.1 … 0.001 (arXiv
    # v1, the only set with both ends stated). Our default rule (faster, two-sided, ceiling R) gives
    # 93.8 % here (docs/reproduction.md).
    paper_algorithm_1 = {"adapt_every": 50, "step_growth": 1.0, "raise_below": 0.0, "bias_ceiling": "zero"}
    runs = [("topk k=20", "topk", 20, {}), ("topk k=30", "topk", 30, {}), ("gba", "gba", 32, paper_algorithm_1)]
    paper = {"topk k=20": 0.984, "topk k=30": 0.242, "gba": 1.0}
    results = {}
    for label, arch, k, options in runs:
        sae, evaluation = train_planted(dataset, arch, d_sae=d_sae, steps=steps, k=k, seed=seed, options=options, **(QUICK_TRAIN if quick else {}))
        learned = sae.decoder_directions()
        results[label] = {
            "frr@0.8": feature_recovery_rate(dataset.features, learned, 0.8),
            "frr@0.9": feature_recovery_rate(dataset.features, learned, 0.9),
            "l0": evaluation["l0_mean"], "dead": evaluation["dead_fraction"],
        }
    ours = {label: r["frr@0.9"] for label, r in results.items()}
    topk_ok = ours["topk k=20"] >= 0.9 and ours["topk k=30"] <= 0.5
    gba_ok = ours[runs[-1][0]] >= 0.95  # the last run is GBA's
    verdict = "reproduced" if topk_ok and gba_ok else ("partly" if topk_ok or gba_ok else "not reproduced")
    figure = go.Figure([
        go.Bar(name="paper", x=list(paper), y=list(paper.values())),
        go.Bar(name="ours", x=list(ours), y=list(ours.values())),
    ]).update_layout(title="GBA imbalanced set: FRR@0.9", barmode="group", yaxis_title="FRR@0.9")
    return {
        "paper": "Chen et al., Taming Polysemanticity (GBA), ICLR 2026",
        "claim": "On the imbalanced set TopK recovers features at K=20 but collapses at K=30 (FRR@0.9), "
                 "while GBA recovers all of them without a K.",
        "setting": {"n": 128, "d": GBA_CALIBRATED_D, "s": [3, 20], "d_sae": d_sae, "steps": steps, "batch": 512, "lr": 1e-3},
        "unknowns": [
            "input dimension d -> 256, not the note's 42: the d at which our TopK gives the paper's TopK K=20 "
            "FRR (at d=42 it gives 0 %; python -m sae_kit.experiments.gba_topk_width --d D --widths 128)",
            "dictionary width M -> the number of features (128)",
            "coefficient distribution -> U(0.5, 1.5]",
            "samples/steps/lr -> fresh samples every step, 3000 steps of 512, Adam 1e-3",
            "GBA rule -> the paper's Algorithm 1 (adapt_every=50 steps, constant γ=0.01, raise dead only); "
            "groups -> K=10 geometric 0.1..0.001 (arXiv v1; the ICLR note's 0.5..1e-3 gives 93.0 % at seed 0); "
            "GBA width -> 128 like TopK (at 512 Algorithm 1 collapses: FRR 7.8 %, 33 % dead)",
            "steps -> 3000: Algorithm 1 then leaves groups 5-9 firing at ~0.015, above their 0.008-0.001 targets "
            "(biases at -0.33 after 60 adaptations); 6000 steps gets closer and FRR rises to 99.2 %",
        ],
        "paper_value": "FRR@0.9: TopK K=20 98.4 %, K=30 24.2 %, GBA 100 %",
        "ours": "FRR@0.9: " + ", ".join(f"{label} {100 * v:.1f} %" for label, v in ours.items())
                + "; L0 " + ", ".join(f"{label} {r['l0']:.1f}" for label, r in results.items()),
        "difference": ", ".join(f"{label} {100 * (ours[label] - paper[label]):+.1f} pp" for label in paper),
        "verdict": verdict,
        "command": command_for("gba_imbalanced_frr", quick),
        "figure": figure,
        "measured": {f"{label} frr@0.9": v for label, v in ours.items()},
        "details": results,
    }


@claim("abstopk_one_latent_per_signed_feature")
def abstopk_signed(quick: bool, seed: int) -> dict[str, Any]:
    import plotly.graph_objects as go

    dataset = make_dataset("signed", seed=seed)
    steps = 60 if quick else 800
    counts, frr = {}, {}
    compared = ("abstopk", "topk")  # the paper's comparison (data, not a branch on the architecture)
    for arch in compared:
        sae, _ = train_planted(dataset, arch, d_sae=256, steps=steps, k=4, seed=seed, **(QUICK_TRAIN if quick else {}))
        learned = sae.decoder_directions()
        per_feature = latents_per_feature(dataset.features, learned, 0.9, absolute=True)
        recovered = per_feature > 0
        counts[arch] = float(per_feature[recovered].float().mean()) if recovered.any() else 0.0
        frr[arch] = feature_recovery_rate(dataset.features, learned, 0.9, absolute=True)
    (abs_count, topk_count), (abs_frr, topk_frr) = ([values[a] for a in compared] for values in (counts, frr))
    ok = abs(abs_count - 1.0) <= 0.25 and topk_count >= 1.5
    figure = go.Figure(go.Bar(x=list(counts), y=list(counts.values()))).update_layout(
        title="Latents per recovered signed feature (|cos| > 0.9)", yaxis_title="latents / feature")
    return {
        "paper": "Zhu et al., AbsTopK, ICLR 2026",
        "claim": "AbsTopK represents a bidirectional feature with one latent; TopK needs two (+v and -v).",
        "setting": {"d": 64, "n_features": 128, "mean_active": 4, "d_sae": 256, "k": 4, "steps": steps},
        "unknowns": ["the paper shows this qualitatively on LLMs -> a signed planted set, |cos| > 0.9 counts"],
        "paper_value": "1 latent per signed feature (AbsTopK) vs 2 (TopK)",
        "ours": f"AbsTopK {abs_count:.2f}, TopK {topk_count:.2f} latents/feature "
                f"(FRR@0.9 {abs_frr:.2f} / {topk_frr:.2f})",
        "difference": f"AbsTopK {abs_count - 1:+.2f}, TopK {topk_count - 2:+.2f}",
        "verdict": "reproduced" if ok else "not reproduced",
        "command": command_for("abstopk_one_latent_per_signed_feature", quick),
        "figure": figure,
        "measured": {f"{a} latents/feature": v for a, v in counts.items()},
    }


def variable_sparsity_dataset(seed: int) -> PlantedDataset:
    """GBA's imbalanced counts (3 or 20 active) on a wider dictionary: the variable-sparsity probe."""
    generator = torch.Generator().manual_seed(seed)
    features = random_unit_features(256, 64, generator)
    return PlantedDataset("variable_sparsity", features, FixedCountSparsity(256, (3, 20)), (0.5, 1.5), signed=False)


@claim("batchtopk_lower_nmse_at_equal_l0")
def batchtopk_nmse(quick: bool, seed: int) -> dict[str, Any]:
    import plotly.graph_objects as go

    dataset = variable_sparsity_dataset(seed)
    steps = 60 if quick else 1500
    scores, l0s = {}, {}
    compared = ("topk", "batchtopk")
    for arch in compared:
        sae, _ = train_planted(dataset, arch, d_sae=512, steps=steps, k=12, seed=seed, **(QUICK_TRAIN if quick else {}))
        x, x_hat, codes, _ = heldout_codes(sae, dataset, 2048 if quick else 8192, seed)
        scores[arch], l0s[arch] = nmse(x, x_hat), float((codes != 0).sum(1).float().mean())
    (topk_nmse, batch_nmse), (topk_l0, batch_l0) = ([values[a] for a in compared] for values in (scores, l0s))
    ok = batch_nmse < topk_nmse
    figure = go.Figure(go.Bar(x=list(scores), y=list(scores.values()),
                              text=[f"L0 {l0s[a]:.1f}" for a in scores])).update_layout(
        title="Held-out NMSE on variable-sparsity data (k=12)", yaxis_title="NMSE")
    return {
        "paper": "Bussmann, Leask & Nanda, BatchTopK SAEs, 2024",
        "claim": "At equal mean L0, BatchTopK reconstructs better (lower NMSE) than TopK, most where the "
                 "number of active features varies between tokens.",
        "setting": {"d": 64, "n_features": 256, "s": [3, 20], "d_sae": 512, "k": 12, "steps": steps},
        "unknowns": ["the paper's claim is on GPT-2; we test it on planted data with s ∈ {3, 20}",
                     "inference uses BatchTopK's EMA threshold (its L0 is measured, not fixed)"],
        "paper_value": "lower NMSE than TopK (GPT-2 L8, k=32: 0.0807 vs 0.0824)",
        "ours": f"NMSE BatchTopK {batch_nmse:.4f} (L0 {batch_l0:.1f}) vs TopK {topk_nmse:.4f} (L0 {topk_l0:.1f})",
        "difference": f"{batch_nmse - topk_nmse:+.4f} NMSE",
        "verdict": "reproduced" if ok else "not reproduced",
        "command": command_for("batchtopk_lower_nmse_at_equal_l0", quick),
        "figure": figure,
        "measured": {**{f"{a} nmse": v for a, v in scores.items()}, **{f"{a} l0": v for a, v in l0s.items()}},
    }


@claim("choice_saes_fewer_dead_adaptive_l0")
def choice_saes(quick: bool, seed: int) -> dict[str, Any]:
    import plotly.graph_objects as go

    dataset = make_dataset("sharkey", seed=seed)
    d_sae, steps = (256, 60) if quick else (1024, 700)
    dead, l0_mean, l0_std = {}, {}, {}
    baseline, *choices = compared = ("topk", "mutual_choice", "feature_choice")
    for arch in compared:
        sae, evaluation = train_planted(dataset, arch, d_sae=d_sae, steps=steps, k=5, seed=seed, **(QUICK_TRAIN if quick else {}))
        _, _, codes, _ = heldout_codes(sae, dataset, 2048 if quick else 8192, seed)
        per_token = (codes != 0).sum(1).float()
        dead[arch] = evaluation["dead_fraction"]
        l0_mean[arch], l0_std[arch] = float(per_token.mean()), float(per_token.std())
    fewer = all(dead[a] <= dead[baseline] for a in choices)
    adaptive = all(l0_std[a] > 0.5 for a in choices)
    verdict = "reproduced" if fewer and adaptive else ("partly" if fewer or adaptive else "not reproduced")
    figure = go.Figure([
        go.Bar(name="dead fraction", x=list(dead), y=list(dead.values())),
        go.Bar(name="per-token L0 std / 10", x=list(l0_std), y=[v / 10 for v in l0_std.values()]),
    ]).update_layout(title="Choice SAEs vs TopK on the Sharkey set (k=5)", barmode="group")
    return {
        "paper": "Ayonrinde, Adaptive Sparse Allocation with Mutual Choice & Feature Choice SAEs, 2024",
        "claim": "At equal sparsity, Mutual and Feature Choice SAEs have fewer dead latents than TopK, "
                 "and their per-token L0 adapts to the token.",
        "setting": {"dataset": "sharkey", "d_sae": d_sae, "k": 5, "steps": steps},
        "unknowns": ["aux_zipf_loss formula -> our reconstruction (sae/zipf.py)",
                     "dead = no firing on 16k held-out tokens; adaptive = per-token L0 std > 0.5"],
        "paper_value": "zero dead features (TL;DR); adaptive allocation",
        "ours": "dead " + ", ".join(f"{a} {dead[a]:.3f}" for a in dead)
                + "; L0 mean±std " + ", ".join(f"{a} {l0_mean[a]:.1f}±{l0_std[a]:.1f}" for a in dead),
        "difference": ", ".join(f"{a} {dead[a] - dead[baseline]:+.3f} dead vs TopK" for a in choices),
        "verdict": verdict,
        "command": command_for("choice_saes_fewer_dead_adaptive_l0", quick),
        "figure": figure,
        "measured": {**{f"{a} dead": v for a, v in dead.items()}, **{f"{a} l0 std": v for a, v in l0_std.items()}},
    }


def quasi_orthogonal_dataset(seed: int, d: int, n_features: int, max_active: int) -> PlantedDataset:
    """Gaussian unit features (ε ≈ 3/√d) with 1..max_active active per sample, uniformly."""
    generator = torch.Generator().manual_seed(seed)
    features = random_unit_features(n_features, d, generator)
    sparsity = FixedCountSparsity(n_features, tuple(range(1, max_active + 1)))
    return PlantedDataset("quasi_orthogonal", features, sparsity, (0.5, 1.5), signed=False)


@claim("topafa_k_tracks_true_count")
def topafa_tracks(quick: bool, seed: int) -> dict[str, Any]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from sae_kit.eval.metrics import ReconstructionMetrics

    d, n_features, max_active = (64, 64, 6) if quick else (256, 256, 10)
    dataset = quasi_orthogonal_dataset(seed, d, n_features, max_active)
    steps = 60 if quick else 1500
    from sae_kit.codes import SparseCodes

    def measure(options: dict) -> dict[str, Any]:
        sae, _ = train_planted(dataset, "topafa", d_sae=2 * n_features, steps=steps, seed=seed, options=options,
                               **(QUICK_TRAIN if quick else {}))
        x, x_hat, codes, truth = heldout_codes(sae, dataset, 4096, seed)
        k, true_k = (codes != 0).sum(1).float(), (truth != 0).sum(1).float()
        metrics = ReconstructionMetrics(sae.cfg.d_sae)
        x_n, _ = sae.normalize(x)
        sparse = SparseCodes.from_mask(codes, codes != 0)
        metrics.update(x_n, sae.decode_normalized(sparse), sparse, decoder_norms=sae.W_dec.norm(dim=1), b_dec=sae.b_dec)
        return {"k": k, "true_k": true_k, "corr": float(torch.corrcoef(torch.stack([k, true_k]))[0, 1]),
                "metrics": metrics.compute(), "nmse": nmse(x, x_hat)}

    # The paper's rule (the verdict), and beside it the two remedies of docs/method-fixes.md:
    # noise_floor=3 and the bounded rule (our default).
    paper_rule, floored, bounded = (measure({"rule": "nearest"}), measure({"rule": "nearest", "noise_floor": 3.0}),
                                   measure({"rule": "bounded"}))
    k, true_k, corr, result = paper_rule["k"], paper_rule["true_k"], paper_rule["corr"], paper_rule["metrics"]
    eps_lbo = result["eps_lbo_median"]
    norms = result["afa_norms_sample"][:2000]
    ok_corr, ok_eps = corr >= 0.8, eps_lbo <= 0.01
    verdict = "reproduced" if ok_corr and ok_eps else ("partly" if ok_corr or ok_eps else "not reproduced")
    figure = make_subplots(rows=1, cols=2, subplot_titles=("per-token k vs true active count", "ZF plot"))
    jitter = torch.rand(true_k.shape, generator=torch.Generator().manual_seed(seed)) * 0.4 - 0.2
    figure.add_trace(go.Scatter(x=(true_k + jitter)[:2000].tolist(), y=k[:2000].tolist(), mode="markers",
                                marker={"size": 3, "opacity": 0.4}, name="tokens"), 1, 1)
    figure.add_trace(go.Scatter(x=norms[:, 0].tolist(), y=norms[:, 1].tolist(), mode="markers",
                                marker={"size": 3, "opacity": 0.4}, name="||z|| vs ||f̃||"), 1, 2)
    top = float(norms.max()) if norms.numel() else 1.0
    figure.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="diagonal"), 1, 2)
    figure.add_trace(go.Scatter(x=[1, max_active], y=[1, max_active], mode="lines", name="k = true"), 1, 1)
    figure.update_xaxes(title_text="true active features", row=1, col=1).update_yaxes(title_text="top-AFA k", row=1, col=1)
    figure.update_xaxes(title_text="||x_n − b_dec||", row=1, col=2).update_yaxes(title_text="||f̃||", row=1, col=2)
    return {
        "paper": "Lee et al., Evaluating and Designing SAEs by Approximating Quasi-Orthogonality, 2025",
        "claim": "On a quasi-orthogonal dictionary, top-AFA's per-token k follows the true number of active "
                 "features, with ZF points near the diagonal and a small ε-LBO.",
        "setting": {"d": d, "n_features": n_features, "active": [1, max_active], "d_sae": 2 * n_features, "steps": steps},
        "unknowns": ["the paper evaluates on LLMs; we plant Gaussian unit features (ε ≈ 3/√d)",
                     "the verdict is the paper's rule (rule=nearest); the noise_floor=3 and rule=bounded (our "
                     "default) remedies are reported beside it",
                     "pass marks chosen before the run: correlation ≥ 0.8, median ε-LBO ≤ 0.01"],
        "paper_value": "k tracks the true count (qualitative); ε-LBO small",
        "ours": f"corr(k, true count) {corr:.3f}; mean k {float(k.mean()):.1f} vs true {float(true_k.mean()):.1f}; "
                f"median ε-LBO {eps_lbo:.2e}; held-out NMSE {paper_rule['nmse']:.3f}. With noise_floor=3: corr "
                f"{floored['corr']:.3f}, mean k {float(floored['k'].mean()):.1f}, NMSE {floored['nmse']:.3f}. With rule=bounded: "
                f"corr {bounded['corr']:.3f}, mean k {float(bounded['k'].mean()):.1f}, NMSE {bounded['nmse']:.3f}",
        "difference": f"corr {corr - 1:+.3f} from perfect tracking; mean k {float(k.mean() - true_k.mean()):+.1f}",
        "verdict": verdict,
        "command": command_for("topafa_k_tracks_true_count", quick),
        "figure": figure,
        "measured": {"corr": corr, "mean k": float(k.mean()), "true mean k": float(true_k.mean()), "eps_lbo": eps_lbo,
                     "noise_floor=3 corr": floored["corr"], "noise_floor=3 mean k": float(floored["k"].mean()),
                     "bounded corr": bounded["corr"], "bounded mean k": float(bounded["k"].mean())},
    }


# ------------------------------------------------------------------- output
def render_markdown(rows: list[dict[str, Any]], quick: bool, seed: int, figures_dir: str | None = None) -> str:
    lines = [
        "# Reproduction of the seed methods' headline claims",
        "",
        "Made by `sae-kit bench reproduce" + (" --quick" if quick else "") + f" --seed {seed}`"
        " (sae_kit/experiments/reproduce.py). Each row is one claim: the paper's number, ours, the"
        " difference and a verdict. Unknown settings and what we chose are listed under the table.",
        "",
        "| claim | paper | paper's value | ours | difference | verdict | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['name']} | {row['paper']} | {row['paper_value']} | {row['ours']} | "
                     f"{row['difference']} | **{row['verdict']}** | {row['wall_s']} |")
    lines.append("")
    for row in rows:
        lines += [f"## {row['name']}", "", row["claim"], "", f"- command: `{row['command']}`",
                  f"- setting: `{json.dumps(row['setting'])}`"]
        lines += [f"- unknown: {u}" for u in row["unknowns"]]
        if figures_dir and row.get("figure") is not None:
            lines.append(f"- figure: [{row['name']}.html]({figures_dir}/{row['name']}.html)")
        lines.append("")
    return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], markdown: str | Path, quick: bool, seed: int) -> Path:
    markdown = Path(markdown)
    figures = markdown.parent / markdown.stem
    figures.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row.get("figure") is not None:
            row["figure"].write_html(str(figures / f"{row['name']}.html"), include_plotlyjs="cdn")
    text = render_markdown(rows, quick, seed, figures_dir=figures.name)
    atomic_write(markdown, lambda temp: temp.write_text(text))
    return markdown


def rows_as_json(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "figure"} for row in rows]

"""``sae-kit bench pareto``: every registered architecture at several sparsities on one real store.

For each architecture in the registry (``sae_kit.sae.ARCHITECTURES``, so new files appear without
edits here) and each target L0, the architecture's own ``sparsity_settings(target_l0)`` gives the
settings that make it run near that L0 (k for the TopK family, ``target_l0`` for GBA, the L1
coefficient for ReLU; top-AFA chooses its own k and has no knob, so it is trained once). Each SAE
is trained on the store's training split with the same budget, then scored on held-out rows
(FVU, L0, dead fraction) and, when a model is given, inside the model (CE-loss recovered vs zero
ablation, KL to the clean model). One row per run, with its wall time; a plotly figure plots L0
against FVU and against CE-loss recovered.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sae_kit.config import registered_architectures, setting

COLUMNS = ("arch", "target_l0", "l0", "fvu", "ce_recovered", "kl", "dead", "train_s", "eval_s")


QUICK = {"tokens": 8192, "expansion": 2, "batch_size": 512, "heldout_tokens": 2048, "in_model_tokens": 256}


@dataclass
class ParetoSettings:
    """The table's settings (also the ``sae-kit bench pareto`` flags)."""

    activations: str = setting(help="activation store folder")
    model: str | None = setting(None, "model for CE-loss recovered and KL (e.g. smollm2; the library also takes "
                                      "a loaded LanguageModel); none: store metrics only")
    architectures: list[str] | None = setting(None, "architectures, repeatable (default: every registered one)",
                                              flags=("--arch",), choices=lambda: sorted(registered_architectures()))
    target_l0s: list[int] = setting(help="target mean L0, repeatable", flags=("--l0",), factory=lambda: [16, 32, 64])
    tokens: int = setting(1_000_000, "training tokens per SAE")
    expansion: int = setting(8, "latents per input dimension")
    batch_size: int = setting(4096, "tokens per step")
    heldout_tokens: int = setting(65_536, "held-out store rows for FVU, L0 and dead fraction")
    in_model_tokens: int = setting(4096, "tokens of held-out text for CE-loss recovered and KL")
    context: int = setting(128, "tokens per window of the in-model evaluation")
    dataset: str = setting("default", "text for the in-model evaluation")
    seed: int = setting(0, "seed of every run")
    threads: int | None = setting(1, "torch CPU threads")
    out: str = setting("runs/pareto", "run folders, pareto.jsonl (resumable), pareto.md, pareto.html")
    dead_tokens_threshold: int = setting(1_000_000, "AuxK's dead-latent threshold in tokens")
    quick: bool = setting(False, "CI sizes (seconds): " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    progress: bool = setting(True, "hide the progress bar", flags=("--no-progress",))
    train_overrides: dict[str, Any] = setting(help="further TrainConfig fields for every run", cli=False, factory=dict)

    def __post_init__(self) -> None:
        self.target_l0s = [int(value) for value in self.target_l0s]  # repeated flags arrive as strings
        if self.quick:
            for name, value in QUICK.items():
                setattr(self, name, value)


def runs_for(settings: ParetoSettings) -> list[tuple[str, int | None, dict[str, Any]]]:
    """(architecture, target L0 or None, TrainConfig overrides) for every run of the table."""
    from sae_kit.sae import ARCHITECTURES

    names = settings.architectures or sorted(ARCHITECTURES)
    unknown = sorted(set(names) - set(ARCHITECTURES))
    if unknown:
        raise ValueError(f"unknown architecture(s) {unknown}; choose from {sorted(ARCHITECTURES)}")
    runs = []
    for name in names:
        cls = ARCHITECTURES[name]
        seen = []
        for target in settings.target_l0s:
            overrides = cls.sparsity_settings(target)
            if overrides in seen:  # no knob (top-AFA): one run stands for every target
                continue
            seen.append(overrides)
            runs.append((name, target if overrides else None, overrides))
    return runs


def run_pareto(settings: ParetoSettings, progress: bool = True) -> list[dict[str, Any]]:
    import torch

    from sae_kit.eval.evaluate import evaluate_sae
    from sae_kit.store import ActivationStore
    from sae_kit.train.trainer import TrainConfig, Trainer

    if settings.threads:
        torch.set_num_threads(settings.threads)
    store = ActivationStore(settings.activations)
    model = settings.model
    if isinstance(model, str):
        from sae_kit.models import load_model

        model = load_model(model)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "pareto.jsonl"
    done = {}
    if results_file.exists():  # resume: finished runs are not trained again
        for line in results_file.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[(row["arch"], row["target_l0"])] = row
    rows = []
    runs = runs_for(settings)
    for arch, target, overrides in tqdm(runs, desc="pareto", disable=not progress):
        if (arch, target) in done:
            rows.append(done[(arch, target)])
            continue
        run_dir = out / f"{arch}-l0_{target if target is not None else 'auto'}"
        options = dict(overrides.get("options", {}))
        fields = {key: value for key, value in overrides.items() if key != "options"}
        cfg = TrainConfig(
            activations=settings.activations, out=str(run_dir), architecture=arch, expansion=settings.expansion,
            batch_size=settings.batch_size, tokens=settings.tokens, options=options,
            dead_tokens_threshold=settings.dead_tokens_threshold, eval_every=10**9, checkpoint_every=10**9,
            eval_tokens=min(settings.heldout_tokens, 16_384), seed=settings.seed, threads=settings.threads,
            progress=False, **{**settings.train_overrides, **fields},
        )
        started = time.perf_counter()
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # an unfinished run from an interrupted table: start it again
        sae = Trainer(cfg, store).run()
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        held = evaluate_sae(sae, store, max_tokens=settings.heldout_tokens, summary=True,
                            batch_size=min(4096, settings.heldout_tokens), heldout_fraction=cfg.heldout_fraction)
        row = {"arch": arch, "target_l0": target, "l0": held["l0_mean"], "fvu": held["fvu"],
               "dead": held["dead_fraction"], "ce_recovered": None, "kl": None}
        if model is not None:
            from sae_kit.eval.in_model import evaluate_in_model

            in_model = evaluate_in_model(sae, model, hook=store.hook_name, dataset=settings.dataset,
                                         context=settings.context, max_tokens=settings.in_model_tokens, progress=False)
            row.update(ce_recovered=in_model["ce_recovered_vs_zero"], kl=in_model["kl_div"],
                       delta_lm_loss=in_model["delta_lm_loss"])
        row.update(train_s=round(train_s, 1), eval_s=round(time.perf_counter() - started, 1), settings=overrides)
        with open(results_file, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


def figure(rows: list[dict[str, Any]]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("L0 vs held-out FVU", "L0 vs CE-loss recovered"))
    for arch in sorted({row["arch"] for row in rows}):
        mine = sorted((row for row in rows if row["arch"] == arch), key=lambda row: row["l0"])
        l0 = [row["l0"] for row in mine]
        fig.add_trace(go.Scatter(x=l0, y=[row["fvu"] for row in mine], mode="lines+markers", name=arch,
                                 legendgroup=arch), 1, 1)
        if any(row.get("ce_recovered") is not None for row in mine):
            fig.add_trace(go.Scatter(x=l0, y=[row["ce_recovered"] for row in mine], mode="lines+markers", name=arch,
                                     legendgroup=arch, showlegend=False), 1, 2)
    fig.update_xaxes(type="log", title_text="mean L0")
    fig.update_yaxes(title_text="FVU", row=1, col=1).update_yaxes(title_text="CE recovered (vs zero)", row=1, col=2)
    return fig


def format_markdown(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in sorted(rows, key=lambda r: (r["arch"], r["target_l0"] or 0)):
        lines.append("| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)

"""``sae-kit demo``: the main job on the embedded defaults, in one command and one folder.

harvest SmolLM2's residual stream at a middle layer from the bundled corpus → train a TopK SAE
(8× expansion, k = 32) → evaluate it on held-out activations (FVU, L0, dead %) and inside the model
(CE-loss recovered, KL, Δ LM loss) → analyse its features on held-out text (``features.sqlite``)
→ explain them: the token-rule baseline for every feature (no model, seconds) and the local
language model (SmolLM2) for a sample spread over densities, within a time budget, each scored with
its controls (``sae-kit explain``) → serve the feature browser (``sae-kit demo`` prints its URL;
``--no-serve`` stops before).
Every stage resumes: re-running the command after an interruption continues the harvest, the
training and the explanations where they stopped and skips finished stages (evaluation runs again;
the analysis runs again only when the SAE was (re)trained, as it would discard the explanations).

Output folder: ``activations/<hook>/`` (the store), ``train/`` (the run: metrics, report.html,
checkpoint, ``sae/``) and ``summary.json``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sae_kit.config import ConfigError, setting
from sae_kit.feature_store import STORE_FILE


@dataclass
class DemoConfig:
    out: str = setting("runs/demo", "output folder (activations/, train/, summary.json)")
    model: str = setting("smollm2", "model to harvest")
    layer: int | None = setting(None, "block to harvest (default: the middle one)")
    hook_point: str = setting("hook_resid_post", "hook within the block")
    dataset: str = setting("default", "'default' (bundled corpus), a local file/folder, or a hub name")
    tokens: int = setting(200_000, "activation rows to harvest")
    context: int = setting(128, "tokens per context window")
    expansion: int = setting(8, "d_sae = expansion × d_in")
    k: int = setting(32, "active latents per token")
    batch_size: int = setting(1024, "tokens per training step")
    epochs: int = setting(2, "training passes over the harvested rows")
    lr: float | None = setting(None, "learning rate (default: the architecture's)")
    eval_tokens: int = setting(8192, "held-out text tokens for CE-loss recovered")
    analyze_tokens: int = setting(32_768, "held-out text tokens for feature analysis")
    explain_sample: int = setting(16, "features the language model explains (spread over densities; the token rule "
                                      "explains every feature); 0: token rule only")
    explain_budget_s: float = setting(300.0, "seconds the language-model explanations may take (a re-run continues)")
    explain_model: str = setting("smollm2", "explainer and judge: 'smollm2' or a local Hugging Face model folder")
    threads: int | None = setting(None, "torch CPU threads")
    seed: int = setting(0, "random seed")
    progress: bool = setting(True, "hide the progress bar", flags=("--no-progress",))

    def __post_init__(self) -> None:
        for name in ("tokens", "context", "expansion", "k", "batch_size", "epochs", "eval_tokens", "analyze_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.explain_sample < 0:
            raise ConfigError(f"explain_sample must be >= 0, got {self.explain_sample}")
        if self.explain_budget_s <= 0:
            raise ConfigError(f"explain_budget_s must be > 0 seconds, got {self.explain_budget_s}")


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    import torch

    from sae_kit.analysis import AnalyzeConfig, analyze
    from sae_kit.eval.in_model import evaluate_in_model, write_in_model_eval
    from sae_kit.harvest import HarvestConfig, harvest, store_path
    from sae_kit.models import load_model
    from sae_kit.sae import load_sae
    from sae_kit.train.checkpoint import find_checkpoint
    from sae_kit.train.trainer import TrainConfig, train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model = load_model(cfg.model)
    layer = model.n_layers // 2 if cfg.layer is None else cfg.layer
    model_name = model.name
    hook = f"blocks.{layer}.{cfg.hook_point}"
    timings["load_model_s"] = time.perf_counter() - started

    stage = time.perf_counter()
    harvest_cfg = HarvestConfig(out=str(out / "activations"), hooks=[hook], model=cfg.model, dataset=cfg.dataset,
                                tokens=cfg.tokens, context=cfg.context, progress=cfg.progress)
    store = harvest(harvest_cfg, model)[hook]
    timings["harvest_s"] = time.perf_counter() - stage

    stage = time.perf_counter()
    run_dir = out / "train"
    train_cfg = TrainConfig(
        activations=str(store_path(harvest_cfg.out, hook)), out=str(run_dir), architecture="topk", k=cfg.k,
        expansion=cfg.expansion, lr=cfg.lr, batch_size=cfg.batch_size, tokens=cfg.epochs * store.n_tokens,
        eval_every=max(1, cfg.epochs * store.n_tokens // cfg.batch_size // 4), eval_tokens=32_768,
        checkpoint_every=50, seed=cfg.seed, progress=cfg.progress,
    )
    trained_before = (run_dir / "sae" / "eval.json").is_file()
    if trained_before:
        sae = load_sae(run_dir / "sae")
    else:
        sae = train(train_cfg, resume=find_checkpoint(run_dir) is not None)
    timings["train_s"] = time.perf_counter() - stage

    stage = time.perf_counter()
    reconstruction = json.loads((run_dir / "sae" / "eval.json").read_text())
    in_model = evaluate_in_model(sae, model, hook=hook, dataset=cfg.dataset, context=cfg.context,
                                 max_tokens=cfg.eval_tokens, progress=cfg.progress)
    write_in_model_eval(run_dir / "sae", in_model)
    timings["eval_s"] = time.perf_counter() - stage

    stage = time.perf_counter()
    features = run_dir / "sae" / STORE_FILE
    if not (trained_before and features.is_file()):  # the store is written atomically: present = complete
        features = analyze(sae, model, AnalyzeConfig(dataset=cfg.dataset, context=min(cfg.context, 64),
                                                     tokens=cfg.analyze_tokens, seed=cfg.seed,
                                                     progress=cfg.progress), sae_path=run_dir / "sae")
    timings["analyze_s"] = time.perf_counter() - stage

    sae_cfg = sae.cfg
    del model, sae  # the explainer loads its own model
    explained = explain_demo(run_dir / "sae", cfg, timings)
    timings["total_s"] = time.perf_counter() - started

    summary = {
        "model": model_name,
        "hook": hook,
        "harvested_tokens": store.n_tokens,
        "sae": str(run_dir / "sae"),
        "features": str(features),
        "d_sae": sae_cfg.d_sae,
        "k": sae_cfg.k,
        "fvu": reconstruction["fvu"],
        "l0_mean": reconstruction["l0_mean"],
        "dead_fraction": reconstruction["dead_fraction"],
        **{key: in_model[key] for key in ("ce_recovered_vs_zero", "ce_recovered_vs_mean", "delta_lm_loss", "kl_div",
                                          "loss_clean", "loss_sae")},
        "explanations": explained,
        "timings": timings,
        "config": asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def explain_demo(sae_dir: Path, cfg: DemoConfig, timings: dict[str, float]) -> dict[str, Any]:
    """The token-rule explanation of every feature not explained yet, then the language model's for
    ``explain_sample`` features within ``explain_budget_s`` (both resume: finished features are kept)."""
    from sae_kit.explain import ExplainConfig, run_explain
    from sae_kit.explain.run import explained_features

    store = sae_dir / STORE_FILE
    stage = time.perf_counter()
    d_sae = json.loads((sae_dir / "cfg.json").read_text())["d_sae"]
    todo = sorted(set(range(d_sae)) - explained_features(store))
    rule = run_explain(sae_dir, ExplainConfig(backend="none", features=todo, seed=cfg.seed, progress=cfg.progress)) \
        if todo else None
    timings["explain_rule_s"] = time.perf_counter() - stage
    out: dict[str, Any] = {"token_rule_features": len(rule.done) if rule else 0}
    if rule:
        out["token_rule_summary"] = rule.summary
        print(rule.throughput_line())
    stage = time.perf_counter()
    if cfg.explain_sample:
        # Fewer judge samples than `sae-kit explain`'s defaults: the demo's budget buys more features.
        lm = run_explain(sae_dir, ExplainConfig(backend="local", model=cfg.explain_model, sample=cfg.explain_sample,
                                                budget_s=cfg.explain_budget_s, positives=4, negatives=4, chunk=4,
                                                threads=cfg.threads, seed=cfg.seed, progress=cfg.progress))
        print(lm.throughput_line())
        out.update(lm_features=len(lm.done), lm_left_for_later=lm.left_for_later, lm_summary=lm.summary,
                   lm_throughput=lm.throughput_line())
    timings["explain_lm_s"] = time.perf_counter() - stage
    return out


def format_summary(summary: dict[str, Any]) -> str:
    rows = [
        ("model / hook", f"{summary['model']} / {summary['hook']}"),
        ("harvested tokens", f"{summary['harvested_tokens']:,}"),
        ("SAE", f"{summary['d_sae']} latents, k={summary['k']} -> {summary['sae']}"),
        ("FVU (held-out)", f"{summary['fvu']:.4f}"),
        ("L0", f"{summary['l0_mean']:.1f}"),
        ("dead latents", f"{100 * summary['dead_fraction']:.2f}%"),
        ("CE-loss recovered (zero abl.)", f"{100 * summary['ce_recovered_vs_zero']:.2f}%"),
        ("CE-loss recovered (mean abl.)", f"{100 * summary['ce_recovered_vs_mean']:.2f}%"),
        ("delta LM loss", f"{summary['delta_lm_loss']:.4f} nats (clean {summary['loss_clean']:.4f})"),
        ("KL to clean", f"{summary['kl_div']:.4f}"),
        ("feature store", summary["features"]),
        ("explanations", f"token rule {summary['explanations'].get('token_rule_features', 0)} features this run, "
                         f"language model {summary['explanations'].get('lm_features', 0)} (sample; "
                         f"{summary['explanations'].get('lm_left_for_later', 0)} left for a re-run)"),
        ("wall time", ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in summary["timings"].items())),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)

"""``sae-kit ablate``: the baseline and the baseline with one plugin, on the same data and seeds.

For each seed s the two runs share everything (data stream, initialisation seed, k, width, steps)
except the plugin. The plugin declares the metric it is meant to move (``Plugin.ablation``); we report
it per seed, the paired difference (plugin − baseline) and its spread over seeds, beside the side
metrics (FVU, L0, dead fraction, planted-feature recovery, stability across seeds).

Verdict: ``helps`` / ``hurts`` when the mean paired difference lies in the good / bad direction by more
than two standard errors (2·std/√n over seeds; any nonzero difference when all seeds agree exactly),
``neutral`` otherwise. With 3 seeds this is a coarse test: it flags only clear effects.

``--data synthetic`` uses a planted-feature set (sae_kit.eval.synthetic) so recovery can be scored;
``--data DIR`` an activation store (no planted truth).
"""
from __future__ import annotations

import json
import math
import shlex
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_kit.eval.metrics import feature_recovery_rate, matched_cosines, mmcs
from sae_kit.config import registered_architectures, setting
from sae_kit.eval.synthetic import DATASET_NAMES, SyntheticSource, make_dataset, write_synthetic_store
from sae_kit.fileio import atomic_write
from sae_kit.plugins.api import Ablation, get_plugin
from sae_kit.train.plugin_set import parse_plugin_spec

SIDE_METRICS = ("fvu", "l0_mean", "dead_fraction", "mmcs", "frr@0.9", "stability")
LOWER_IS_BETTER = {"fvu": True, "l0_mean": True, "dead_fraction": True, "mmcs": False, "frr@0.9": False,
                   "stability": False}


@dataclass
class AblationSettings:
    """One ablation's shared settings; the defaults are small enough for a CPU in about a minute."""

    plugin: str = setting(help="the plugin and its options", metavar="NAME[:KEY=VALUE,...]")
    arch: str = setting("topk", "SAE architecture", choices=lambda: sorted(registered_architectures()))
    data: str = setting("synthetic", "'synthetic' (planted features) or an activation store folder")
    seeds: int = setting(3, "seeds (paired runs)")
    dataset: str | None = setting(None, "planted set (default: the plugin's)", choices=lambda: DATASET_NAMES)
    d_in: int = setting(64, "synthetic activation width")
    features: int = setting(256, "synthetic planted features")
    d_sae: int = setting(512, "number of latents")
    k: int = setting(5, "active latents per token")
    steps: int = setting(500, "training steps per run")
    batch_size: int = setting(256, "tokens per step")
    lr: float = setting(1e-3, "learning rate")
    dead_tokens: int = setting(25_000, "dead-latent threshold in tokens")
    eval_tokens: int = setting(16_384, "held-out tokens per evaluation")
    threads: int | None = setting(None, "torch CPU threads")

    def command(self) -> str:
        """The ``sae-kit ablate`` command line that reproduces these settings."""
        defaults = AblationSettings(plugin=self.plugin)
        parts = ["sae-kit", "ablate", "--plugin", self.plugin]
        for name, value in asdict(self).items():
            if name in ("plugin", "threads") or value == getattr(defaults, name):
                continue
            parts += [f"--{name.replace('_', '-')}", str(value)]
        return shlex.join(parts)


def _source(settings: AblationSettings, ablation: Ablation, workdir: Path):
    if settings.data != "synthetic":
        from sae_kit.store import ActivationStore

        return ActivationStore(settings.data), None, f"store {settings.data}"
    name = settings.dataset or ablation.dataset
    dataset = make_dataset(name, seed=0, d=settings.d_in, n_features=settings.features)
    label = f"synthetic {name} (d={settings.d_in}, {settings.features} features)"
    if ablation.cache_tokens:
        store = write_synthetic_store(workdir / "cache", dataset, tokens=ablation.cache_tokens, seed=0)
        return store, dataset, label + f", finite cache of {ablation.cache_tokens} tokens"
    return SyntheticSource(dataset), dataset, label


def _train_one(settings: AblationSettings, ablation: Ablation, source, out: Path, seed: int, plugins: list) -> Any:
    from sae_kit.train.trainer import TrainConfig, Trainer

    steps = settings.steps
    overrides = dict(ablation.train)
    cfg = TrainConfig(
        out=str(out), architecture=settings.arch, k=settings.k, d_sae=settings.d_sae, lr=settings.lr,
        batch_size=settings.batch_size, tokens=steps * settings.batch_size, warmup_steps=min(50, steps // 10),
        dead_tokens_threshold=settings.dead_tokens, eval_every=steps, eval_tokens=settings.eval_tokens,
        checkpoint_every=steps, log_every=max(1, steps // 20), seed=seed, threads=settings.threads,
        progress=False, plugins=plugins,
    )
    cfg = replace(cfg, **overrides)
    trainer = Trainer(cfg, source)
    sae = trainer.run()
    return sae, json.loads((out / "sae" / "eval.json").read_text())


def matched_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |cos| of the Hungarian matching between two dictionaries [n, d] (stability across seeds)."""
    return float(matched_cosines(a, b).mean())


def summarise(baseline: list[float], plugin: list[float], higher_is_better: bool) -> dict[str, Any]:
    diffs = [p - b for b, p in zip(baseline, plugin)]
    n = len(diffs)
    mean = sum(diffs) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    better = mean > 0 if higher_is_better else mean < 0
    if std == 0.0:
        clear = mean != 0.0 and n > 1
    else:
        clear = abs(mean) > 2 * std / math.sqrt(n)
    verdict = ("helps" if better else "hurts") if clear else "neutral"
    return {"difference_mean": mean, "difference_std": std, "differences": diffs, "verdict": verdict}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def run_ablation(settings: AblationSettings, progress: bool = True) -> dict[str, Any]:
    spec = parse_plugin_spec(settings.plugin)
    cls = get_plugin(spec["name"])
    ablation = cls.ablation or Ablation(metric="fvu")
    options = {**ablation.options, **{k: v for k, v in spec.items() if k != "name"}}
    plugin_entry = {"name": cls.name, **options}
    if settings.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {settings.seeds}")
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "plugin": []}
    decoders: dict[str, list[torch.Tensor]] = {"baseline": [], "plugin": []}
    with tempfile.TemporaryDirectory(prefix="sae-kit-ablate-") as tmp:
        workdir = Path(tmp)
        source, dataset, data_label = _source(settings, ablation, workdir)
        bar = tqdm(total=2 * settings.seeds, desc=f"ablate {cls.name}", unit="run", disable=not progress)
        for seed in range(settings.seeds):
            baseline_plugins = ([] if ablation.baseline_options is None
                                else [{**plugin_entry, **ablation.baseline_options}])
            for variant, plugins in (("baseline", baseline_plugins), ("plugin", [plugin_entry])):
                sae, evaluation = _train_one(settings, ablation, source, workdir / f"{variant}-{seed}", seed, plugins)
                row = {key: value for key, value in evaluation.items() if isinstance(value, (int, float))}
                learned = sae.decoder_directions()
                if dataset is not None:
                    absolute = dataset.signed
                    row["mmcs"] = mmcs(dataset.features, learned, absolute=absolute)
                    row["frr@0.9"] = feature_recovery_rate(dataset.features, learned, 0.9, absolute=absolute)
                runs[variant].append(row)
                decoders[variant].append(learned)
                bar.update(1)
        bar.close()
    pairs = [(i, j) for i in range(settings.seeds) for j in range(i + 1, settings.seeds)]
    stability = {variant: [matched_cosine(decoders[variant][i], decoders[variant][j]) for i, j in pairs]
                 for variant in decoders}

    def values(variant: str, key: str) -> list[float]:
        if key == "stability":
            return stability[variant]
        return [float(row[key]) for row in runs[variant] if key in row]

    plugin_key = ablation.plugin_metric or ablation.metric
    baseline_values, plugin_values = values("baseline", ablation.metric), values("plugin", plugin_key)
    if not baseline_values or len(baseline_values) != len(plugin_values):
        raise ValueError(
            f"the ablation metric {ablation.metric!r} / {plugin_key!r} is missing from the runs' evaluations"
            + (" (stability needs --seeds >= 2)" if ablation.metric == "stability" else "")
        )
    result = {
        "plugin": cls.name, "paper": cls.paper, "summary": cls.summary, "options": options,
        "metric": ablation.metric, "plugin_metric": plugin_key, "higher_is_better": ablation.higher_is_better,
        "arch": settings.arch, "data": data_label, "seeds": settings.seeds, "settings": asdict(settings),
        "command": settings.command(),
        "baseline": baseline_values, "with_plugin": plugin_values,
        **summarise(baseline_values, plugin_values, ablation.higher_is_better),
        "kind": ablation.kind, "baseline_options": ablation.baseline_options,
        "side_metrics": {key: {"baseline": _mean(values("baseline", key)), "with_plugin": _mean(values("plugin", key))}
                         for key in SIDE_METRICS if values("baseline", key)},
        "runs": runs, "seconds": round(time.perf_counter() - started, 1),
    }
    if ablation.kind == "measurement":
        result["verdict"] = "measurement"
    return result


def format_result(result: dict[str, Any]) -> str:
    direction = "higher" if result["higher_is_better"] else "lower"
    metric = result["metric"] + (f" (plugin run: {result['plugin_metric']})"
                                 if result["plugin_metric"] != result["metric"] else "")
    lines = [f"plugin {result['plugin']} ({result['paper']}): {metric}, {direction} is better",
             f"  {result['arch']} on {result['data']}; {result['seeds']} seed(s); {result['seconds']} s"]
    label = "pair" if result["metric"] == "stability" else "seed"
    header = "".join(f"{f'{label} {i}':>12}" for i in range(len(result["baseline"])))
    lines.append(f"  {'':12}{header}{'mean':>12}{'std':>10}")

    def row(name: str, values: list[float]) -> str:
        mean = _mean(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return f"  {name:12}" + "".join(f"{v:12.5f}" for v in values) + f"{mean:12.5f}{std:10.5f}"

    lines.append(row("baseline", result["baseline"]))
    lines.append(row("with plugin", result["with_plugin"]))
    lines.append(row("difference", result["differences"]) + f"  -> {result['verdict']}")
    side = ", ".join(f"{key} {v['baseline']:.4f} -> {v['with_plugin']:.4f}" for key, v in result["side_metrics"].items())
    lines.append(f"  side metrics (mean over seeds): {side}")
    return "\n".join(lines)


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    atomic_write(path, lambda p: Path(p).write_text(text))
    return path

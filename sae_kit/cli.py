"""The ``sae-kit`` command line: thin over the library, one sub-command per task."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sae_kit.config import ConfigError, load_config_file, parse_key_values

def add_train_parser(sub) -> None:
    from sae_kit.config import TrainConfig, add_arguments

    p = sub.add_parser("train", help="train an SAE on cached activations or straight from a model",
                       description="Train an SAE. Settings come from --config (YAML/JSON), then flags override them.")
    p.add_argument("--config", help="YAML or JSON file with TrainConfig settings")
    add_arguments(p, TrainConfig)
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="architecture option, repeatable (e.g. --opt selection=batch for abstopk)")
    p.add_argument("--plugin", action="append", metavar="NAME[:KEY=VALUE,...]",
                   help="enable a training plugin, repeatable, in hook order (list them with `sae-kit plugins`)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def train_config_from_args(args) -> "TrainConfig":
    from sae_kit.config import TrainConfig, args_to_settings

    settings = load_config_file(args.config) if args.config else {}
    settings.update(args_to_settings(TrainConfig, args))
    if isinstance(settings.get("activations"), list) and len(settings["activations"]) == 1:
        settings["activations"] = settings["activations"][0]
    if args.opt:
        settings["options"] = {**settings.get("options", {}), **parse_key_values(args.opt)}
    if getattr(args, "plugin", None):
        from sae_kit.train.plugin_set import merge_plugin_specs

        settings["plugins"] = merge_plugin_specs(settings.get("plugins"), args.plugin)
    return TrainConfig.from_dict(settings)


def cmd_train(args) -> int:
    from sae_kit.train.trainer import TrainConfig, train

    out = getattr(args, "out", TrainConfig.out)
    if args.resume and not args.config and (Path(out) / "config.json").is_file():
        # A resumed run keeps its original settings; flags given now still override them.
        args.config = str(Path(out) / "config.json")
    cfg = train_config_from_args(args)
    if isinstance(cfg.activations, list):
        from sae_kit.train.spread import train_spread

        for run in train_spread(cfg, cfg.activations, resume=args.resume):
            print(f"trained {run / 'sae'}")
        return 0
    sae = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 reports
    out = Path(cfg.out)
    metrics = json.loads((out / "sae" / "eval.json").read_text())
    print(f"trained {sae.cfg.architecture} SAE ({sae.cfg.d_in} -> {sae.cfg.d_sae}) saved to {out / 'sae'}")
    print_metrics(metrics)
    print(f"curves: {out / 'report.html'}")
    return 0


def print_metrics(metrics: dict) -> None:
    for key in ("n_tokens", "fvu", "nmse_mean_token", "l0_mean", "dead_fraction", "dense_fraction", "eps_lbo_mean"):
        if key in metrics:
            value = metrics[key]
            print(f"  {key:18s} {value:.4f}" if isinstance(value, float) else f"  {key:18s} {value}")


def cmd_eval(args) -> int:
    from sae_kit.sae import load_sae

    if not args.activations and not args.model:
        raise ConfigError("name what to evaluate on: --activations STORE and/or --model NAME")
    sae = load_sae(args.sae)
    if args.activations:
        from sae_kit.eval.evaluate import evaluate_sae
        from sae_kit.store import ActivationStore

        if sae.is_transcoder != bool(args.targets):
            raise ConfigError("a transcoder is evaluated on its input store (--activations) paired with its output "
                              "store (--targets)" if sae.is_transcoder else "--targets is for transcoders; this is an SAE")
        if args.targets:
            from sae_kit.store_pair import PairedStore

            store = PairedStore(args.activations, args.targets)
        else:
            store = ActivationStore(args.activations)
        if store.d_in != sae.cfg.d_in:
            raise ConfigError(f"the store has d_in={store.d_in} but the SAE expects {sae.cfg.d_in}")
        heldout_fraction = args.heldout_fraction or sae.cfg.metadata.get("heldout_fraction", 0.05)
        metrics = evaluate_sae(sae, store, max_tokens=args.tokens, batch_size=args.batch_size,
                               split=args.split, heldout_fraction=heldout_fraction)
        print_metrics(metrics)
        target = Path(args.json) if args.json else Path(args.sae) / "eval.json"
        from sae_kit.fileio import atomic_write

        text = json.dumps(metrics, indent=2)
        atomic_write(target, lambda path: path.write_text(text))  # a server may be reading it
        print(f"written to {target}")
    if args.model:
        from sae_kit.eval.in_model import evaluate_in_model, write_in_model_eval
        from sae_kit.models import load_model

        context = args.context or sae.cfg.metadata.get("context_size") or 128
        metrics = evaluate_in_model(sae, load_model(args.model), hook=args.hook, dataset=args.dataset,
                                    context=context, max_tokens=args.text_tokens)
        for key, value in metrics.items():
            print(f"  {key:22s} {value:.4f}" if isinstance(value, float) else f"  {key:22s} {value}")
        print(f"written to {write_in_model_eval(args.sae, metrics)}")
    return 0


def cmd_harvest(args) -> int:
    from sae_kit.config import args_to_settings
    from sae_kit.harvest import HarvestConfig, harvest

    cfg = HarvestConfig(**args_to_settings(HarvestConfig, args))
    for hook, store in harvest(cfg).items():
        print(f"{hook}: {store.n_tokens} rows of d_in={store.d_in} ({store.dtype}) in {store.directory}")
    return 0


def cmd_demo(args) -> int:
    from sae_kit.config import args_to_settings
    from sae_kit.demo import DemoConfig, format_summary, run_demo

    cfg = DemoConfig(**args_to_settings(DemoConfig, args))
    summary = run_demo(cfg)
    print(format_summary(summary))
    print(f"everything is in {cfg.out} (summary.json, train/report.html, train/sae/features.sqlite)")
    if args.no_serve:
        print(f"browse the features with: sae-kit serve {cfg.out}")
        return 0
    from sae_kit.server.app import run

    run(cfg.out, host=args.host, port=args.port, threads=cfg.threads)
    return 0


def cmd_analyze(args) -> int:
    from sae_kit.analysis import AnalyzeConfig, analyze_sae_folder
    from sae_kit.feature_store import FeatureStore

    cfg = AnalyzeConfig(dataset=args.dataset, split=args.split, context=args.context, tokens=args.tokens,
                        batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)
    import time

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    path = analyze_sae_folder(args.sae, cfg, model_name=args.model, hook=args.hook, out=args.out)
    meta = FeatureStore(path).meta
    print(f"analysed {meta['d_sae']} features on {meta['n_tokens']} tokens of {meta['dataset']} ({meta['split']}) "
          f"in {time.perf_counter() - started:.1f}s -> {path}")
    return 0


def cmd_serve(args) -> int:
    import os

    from sae_kit.server.app import run

    run(args.root, host=args.host, port=args.port, model_name=args.model, threads=args.threads, max_runs=args.max_runs,
        api_token=os.environ.get(args.token_env) if args.token_env else None)
    return 0


def cmd_store_synth(args) -> int:
    from sae_kit.eval.synthetic import make_dataset, write_synthetic_store

    overrides = {key: value for key, value in (("d", args.d_in), ("n_features", args.features)) if value is not None}
    dataset = make_dataset(args.dataset, seed=args.seed, **overrides)
    store = write_synthetic_store(args.out, dataset, tokens=args.tokens, seed=args.seed, dtype=args.dtype)
    print(f"wrote {store.n_tokens} tokens of d_in={store.d_in} ({args.dataset}) to {args.out}")
    return 0


def cmd_store_join(args) -> int:
    from sae_kit.store_join import join_stores

    store = join_stores(args.parts, args.out, verify=args.verify)
    print(f"joined {len(args.parts)} parts: {store.n_tokens} rows of {store.hook_name} in {store.directory}")
    return 0


def cmd_bench_synthetic(args) -> int:
    from sae_kit.experiments.bench import format_table, run_synthetic_benchmark

    rows = run_synthetic_benchmark(datasets=args.dataset, architectures=args.arch, seed=args.seed,
                                   steps_scale=args.steps_scale, progress=not args.no_progress)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"written to {args.json}")
    return 0


def cmd_bench_reproduce(args) -> int:
    from sae_kit.experiments.reproduce import rows_as_json, run_claims, write_outputs

    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path and Path(path).is_dir():  # checked before the runs, not after minutes of training
            raise ConfigError(f"{flag} {path} is a folder; give a file path, e.g. {Path(path) / 'reproduction.md'}")
    rows = run_claims(args.claim, quick=args.quick, seed=args.seed)
    for row in rows:
        print(f"{row['name']}: {row['verdict']} ({row['wall_s']} s)\n  paper: {row['paper_value']}\n  ours:  {row['ours']}")
    if args.out:
        print(f"written to {write_outputs(rows, args.out, quick=args.quick, seed=args.seed)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows_as_json(rows), indent=2, default=str))
    return 0


def cmd_bench_pareto(args) -> int:
    from sae_kit.config import args_to_settings
    from sae_kit.experiments.pareto import ParetoSettings, figure, format_markdown, run_pareto

    settings = ParetoSettings(**args_to_settings(ParetoSettings, args))
    rows = run_pareto(settings, progress=settings.progress)
    table = format_markdown(rows)
    print(table)
    out = Path(settings.out)
    figure(rows).write_html(str(out / "pareto.html"), include_plotlyjs="cdn")
    (out / "pareto.md").write_text(table + "\n")
    print(f"table, figure and rows in {out}/pareto.md, pareto.html, pareto.jsonl")
    return 0


def cmd_export(args) -> int:
    from sae_kit.interop.commands import cmd_export as run

    return run(args)


def cmd_import(args) -> int:
    from sae_kit.interop.commands import cmd_import as run

    return run(args)


def cmd_plugins(args) -> int:
    from sae_kit.plugins.api import available_plugins, options_schema

    for name, cls in available_plugins().items():
        print(f"{name}: {cls.summary}" + (f" [{cls.paper}]" if cls.paper else ""))
        for entry in options_schema(cls):
            choices = f" (one of {entry['choices']})" if "choices" in entry else ""
            print(f"    {entry['name']}={entry['default']}{choices}  {entry['doc']}")
    return 0


def cmd_ablate(args) -> int:
    from sae_kit.config import args_to_settings
    from sae_kit.experiments.ablate import AblationSettings, format_result, run_ablation, write_result

    settings = AblationSettings(**args_to_settings(AblationSettings, args))
    result = run_ablation(settings, progress=not args.no_progress)
    print(format_result(result))
    target = args.json or f"ablations/{result['plugin']}-{settings.arch}.json"
    print(f"written to {write_result(result, target)}")
    return 0


def cmd_ablate_table(args) -> int:
    from sae_kit.fileio import atomic_write
    from sae_kit.experiments.docs import load_results, render

    text = render(load_results(args.results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.out), lambda p: Path(p).write_text(text))
    print(f"wrote {args.out} from the results in {args.results}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sae_kit.eval.synthetic import DATASET_NAMES
    from sae_kit.sae import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="sae-kit", description="Sparse-autoencoder toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)

    p = sub.add_parser("eval", help="evaluate an SAE on held-out activations and/or inside its model")
    p.add_argument("sae", help="SAE folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--activations", help="activation store folder (reconstruction metrics on its held-out split)")
    p.add_argument("--targets", help="a transcoder's output-hook store, paired with --activations")
    p.add_argument("--tokens", type=int, default=262_144, help="tokens to evaluate")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--split", default="heldout", choices=("heldout", "train", "all"))
    p.add_argument("--heldout-fraction", type=float, default=None,
                   help="held-out share of the store (default: the one the SAE was trained with)")
    p.add_argument("--json", help="where to write the metrics (default: SAE_FOLDER/eval.json)")
    p.add_argument("--model", help="also evaluate inside this model: CE-loss recovered, KL, delta LM loss")
    p.add_argument("--hook", help="hook to splice the SAE into (default: the SAE's hook_name)")
    p.add_argument("--dataset", default="default", help="text for the in-model evaluation (its held-out split)")
    p.add_argument("--context", type=int, default=None, help="context window (default: the SAE's context_size)")
    p.add_argument("--text-tokens", type=int, default=8192, help="tokens of text for the in-model evaluation")

    from sae_kit.analysis import AnalyzeConfig

    a = AnalyzeConfig()
    p = sub.add_parser("analyze", help="per-feature statistics and examples on held-out text, into SQLite")
    p.add_argument("sae", help="SAE folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--model", help="model to run (default: the model_name in the SAE's cfg.json)")
    p.add_argument("--hook", help="hook the SAE reads (default: the SAE's hook_name)")
    p.add_argument("--dataset", default=a.dataset, help="'default' (bundled corpus), a local file/folder, or a hub name")
    p.add_argument("--split", default=a.split)
    p.add_argument("--tokens", type=int, default=a.tokens, help="token positions to analyse")
    p.add_argument("--context", type=int, default=a.context, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=a.batch_size, help="windows per forward pass")
    p.add_argument("--seed", type=int, default=a.seed, help="seed of the quantile samples")
    p.add_argument("--out", help="feature store file (default: SAE_FOLDER/features.sqlite)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("serve", help="REST API and web UI over the SAE folders under a folder")
    p.add_argument("root", help="folder holding SAE folders (e.g. runs/demo); only files under it are served")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", help="model for every SAE (default: the model_name in each SAE's cfg.json)")
    p.add_argument("--token-env", default="SAE_KIT_API_TOKEN",
                   help="environment variable holding the API token that POST /api/steer and /api/runs require (unset: open)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-runs", type=int, default=1,
                   help="training runs started from the API/UI that train at once, under ROOT/runs (0: no training)")

    from sae_kit.config import add_arguments
    from sae_kit.demo import DemoConfig
    from sae_kit.harvest import HarvestConfig

    p = sub.add_parser("harvest", help="cache a model's activations at one or more hooks")
    add_arguments(p, HarvestConfig)

    p = sub.add_parser("demo", help="harvest -> train -> evaluate on the embedded defaults (SmolLM2, bundled corpus)")
    add_arguments(p, DemoConfig)
    p.add_argument("--no-serve", action="store_true", help="stop after the analysis instead of serving the browser")
    p.add_argument("--host", default="127.0.0.1", help="where to serve the feature browser")
    p.add_argument("--port", type=int, default=8000)

    store = sub.add_parser("store", help="activation-store utilities").add_subparsers(dest="store_command", required=True)
    p = store.add_parser("synth", help="write a store of planted-feature activations")
    p.add_argument("--dataset", default="sharkey", choices=DATASET_NAMES)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--d-in", type=int, default=None, help="activation width (default: the dataset's)")
    p.add_argument("--features", type=int, default=None, help="number of planted features")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)

    p = store.add_parser("join", help="one store from the parts of a parallel harvest (`harvest --part I --parts N`)")
    p.add_argument("parts", nargs="+", help="the part stores of one hook, in any order")
    p.add_argument("--out", required=True, help="the joined store's folder (shards are hard-linked when possible)")
    p.add_argument("--verify", action="store_true", help="check every part shard's sha256 first")

    sub.add_parser("plugins", help="list the training plugins and their options")

    from sae_kit.experiments.ablate import AblationSettings

    p = sub.add_parser("ablate", help="train the baseline and the baseline with a plugin on the same data and seeds",
                       description="Compare the baseline with baseline+plugin over seeds on the metric the plugin "
                                   "is meant to move; writes a JSON result for `sae-kit ablate-table`.")
    add_arguments(p, AblationSettings)
    p.add_argument("--json", help="result file (default: ablations/<plugin>-<arch>.json)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("ablate-table", help="render docs/plugins.md from `sae-kit ablate` result files")
    p.add_argument("--results", default="ablations", help="folder of ablation JSON results")
    p.add_argument("--out", default="docs/plugins.md")

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("synthetic", help="planted-feature recovery of every architecture")
    p.add_argument("--dataset", nargs="+", default=["all"], choices=("all", *DATASET_NAMES))
    p.add_argument("--arch", nargs="+", default=["all"], choices=("all", *sorted(ARCHITECTURES)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every run's step count")
    p.add_argument("--json", help="write the table's rows as JSON")
    p.add_argument("--no-progress", action="store_true")

    p = bench.add_parser("reproduce", help="re-run each seed method's published headline claim")
    p.add_argument("--claim", nargs="+", default=["all"], help="claim names (default: all)")
    p.add_argument("--quick", action="store_true", help="CI sizes (seconds), not the documented full sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the markdown table here and one HTML figure per claim beside it")
    p.add_argument("--json", help="write the rows as JSON")

    from sae_kit.experiments.pareto import ParetoSettings

    p = bench.add_parser("pareto", help="every architecture at several sparsities on one store (FVU, CE, KL, L0, dead)")
    add_arguments(p, ParetoSettings)

    from sae_kit.explain.cli import add_parser as add_explain_parser

    add_explain_parser(sub)

    from sae_kit.interop.commands import add_parsers as add_interop_parsers

    add_interop_parsers(sub)
    return parser


COMMANDS = {
    ("train",): cmd_train,
    ("eval",): cmd_eval,
    ("harvest",): cmd_harvest,
    ("demo",): cmd_demo,
    ("analyze",): cmd_analyze,
    ("explain",): lambda args: __import__("sae_kit.explain.cli", fromlist=["command"]).command(args),
    ("serve",): cmd_serve,
    ("store", "synth"): cmd_store_synth,
    ("store", "join"): cmd_store_join,
    ("bench", "synthetic"): cmd_bench_synthetic,
    ("bench", "reproduce"): cmd_bench_reproduce,
    ("bench", "pareto"): cmd_bench_pareto,
    ("export",): cmd_export,
    ("import",): cmd_import,
    ("plugins",): cmd_plugins,
    ("ablate",): cmd_ablate,
    ("ablate-table",): cmd_ablate_table,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = tuple(v for v in (args.command, getattr(args, "store_command", None), getattr(args, "bench_command", None)) if v)
    try:
        return COMMANDS[key](args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"sae-kit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = "--resume" if args.command == "train" else "the same command again"
        print(f"interrupted; continue with {how}", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # TrainingDiverged and friends
        print(f"sae-kit {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

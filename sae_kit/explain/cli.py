"""``sae-kit explain``: the argument parser is generated from :class:`ExplainConfig`'s fields."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from sae_kit.config import ConfigError
from sae_kit.explain.run import ExplainConfig

HELP = {
    "backend": "language model for explainer and judge: local (a transformers model), openai (an OpenAI-compatible "
               "endpoint: vLLM, llama.cpp, Ollama, hosted) or none (token rule only, judged by applying the rule)",
    "explainer": "lm (the backend's model writes each explanation) or token-rule (the baseline, no model)",
    "model": "local: a Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct); openai: the model name",
    "base_url": "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1",
    "api_key_env": "environment variable holding the endpoint's API key",
    "timeout": "seconds per request before it is retried",
    "retries": "retries per request (exponential backoff)",
    "concurrency": "requests in flight at once (openai backend)",
    "batch_size": "prompts per forward pass (local backend)",
    "threads": "torch CPU threads (local backend)",
    "features": "features to explain, e.g. 3,17,40-45 (default: all)",
    "sample": "explain this many features spread evenly over the density ranks",
    "limit": "at most this many features",
    "redo": "re-do features already explained the same way (default: skip them)",
    "explain_examples": "highlighted examples shown to the explainer",
    "positives": "held-out activating examples per scorer",
    "negatives": "silent windows per scorer (half random, half where a neighbouring feature fires)",
    "max_tokens": "tokens the explainer may generate",
    "chunk": "features explained per batched call",
    "budget_s": "seconds after which no new chunk starts (a re-run continues; default: no limit)",
    "seed": "seed of the samples and the shuffled control",
}


def parse_features(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                out += range(first, last + 1)
            elif part:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--features takes ids and ranges like 3,17,40-45, got {text!r}") from None
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="explain and score features (explanations, controls) into the feature store")
    p.add_argument("sae", help="SAE folder with its features.sqlite (from `sae-kit analyze`)")
    defaults = ExplainConfig()
    for f in dataclasses.fields(ExplainConfig):
        if f.name == "progress":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=HELP[f.name])
        elif f.name == "features":
            p.add_argument(flag, type=parse_features, default=None, help=HELP[f.name])
        else:
            kind = {"timeout": float, "budget_s": float}.get(f.name, int if f.type in ("int", "int | None") else str)
            choices = {"backend": ("local", "openai", "none"), "explainer": ("lm", "token-rule")}.get(f.name)
            p.add_argument(flag, type=kind, default=default, choices=choices,
                           help=f"{HELP[f.name]} (default: {default})")
    p.add_argument("--store", help="feature store file (default: SAE_FOLDER/features.sqlite)")
    p.add_argument("--export", metavar="JSON", help="only write the stored explanations to this JSON file")
    p.add_argument("--import", dest="import_json", metavar="JSON", help="only read explanations from this JSON file")
    p.add_argument("--no-progress", action="store_true")


def command(args) -> int:
    from sae_kit.feature_store import STORE_FILE, export_explanations, import_explanations

    store = Path(args.store) if args.store else Path(args.sae) / STORE_FILE
    if args.export:
        data = export_explanations(store)
        Path(args.export).write_text(json.dumps(data, indent=1, ensure_ascii=False))
        print(f"wrote {len(data['records'])} explanation records to {args.export}")
        return 0
    if args.import_json:
        try:
            data = json.loads(Path(args.import_json).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{args.import_json} is not JSON: {exc}") from None
        print(f"imported {import_explanations(store, data)} explanation records into {store}")
        return 0
    from sae_kit.explain.backends import BackendError
    from sae_kit.explain.run import format_summary, run_explain

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExplainConfig) if f.name != "progress"}
    cfg = ExplainConfig(**values, progress=not args.no_progress)
    try:
        result = run_explain(args.sae, cfg, store_path=store)
    except BackendError as exc:
        raise ConfigError(str(exc)) from None
    print(format_summary(result.summary))
    print(result.throughput_line())
    return 0

"""``sae-kit export`` and ``sae-kit import``: argument parsing and printing over sae_kit.interop."""
from __future__ import annotations

import json
from pathlib import Path

from sae_kit.feature_store import EXPLANATIONS_FILE
from sae_kit.interop import EXPORT_FORMATS, IMPORT_FORMATS, export_sae, import_sae


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="write an SAE in SAELens or sparsify format",
                       description="Write an sae-kit SAE folder in another tool's format. Architectures the format "
                                   "cannot express are refused. A sidecar (sae_kit.json, sae_kit_state.safetensors) "
                                   "lets `sae-kit import` restore the SAE bit for bit; other tools ignore it. Explanations in "
                                   "the folder's features.sqlite go to explanations.json.")
    p.add_argument("--format", required=True, choices=sorted(EXPORT_FORMATS))
    p.add_argument("sae", help="SAE folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("out", help="folder to write")
    p.add_argument("--no-sidecar", action="store_true", help="write only the format's own files")

    p = sub.add_parser("import", help="convert an SAELens, sparsify or OpenAI checkpoint to an sae-kit SAE folder")
    p.add_argument("--format", required=True, choices=sorted(IMPORT_FORMATS))
    p.add_argument("path", help="SAELens or sparsify folder, or an OpenAI .pt state dict")
    p.add_argument("out", help="SAE folder to write")


def cmd_export(args) -> int:
    out = export_sae(Path(args.sae), Path(args.out), args.format, sidecar=not args.no_sidecar)
    extra = ""
    if (out / EXPLANATIONS_FILE).is_file():
        n = len(json.loads((out / EXPLANATIONS_FILE).read_text(encoding="utf-8"))["records"])
        extra = f" with {n} feature explanations ({EXPLANATIONS_FILE})"
    print(f"exported {args.sae} as {args.format} to {out}{extra}")
    return 0


def cmd_import(args) -> int:
    sae, notes = import_sae(Path(args.path), Path(args.out), args.format)
    cfg = sae.cfg
    print(f"imported {args.format} {args.path} as a {cfg.architecture} SAE ({cfg.d_in} -> {cfg.d_sae}) in {args.out}")
    for note in notes:
        print(f"  note: {note}")
    return 0

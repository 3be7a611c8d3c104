"""Import and export SAEs in other tools' formats: SAELens, sparsify, OpenAI (import only).

One file per format; each converts to and from our cfg.json + tensors (common.Converted).
"""
from __future__ import annotations

import json
from pathlib import Path

from sae_kit.feature_store import (EXPLANATIONS_FILE, STORE_FILE, check_explanations_export,
                                   export_explanations)
from sae_kit.fileio import atomic_write
from sae_kit.interop import openai, saelens, sparsify
from sae_kit.interop.common import FormatError
from sae_kit.sae import SAE, load_sae

EXPORT_FORMATS = {"saelens": saelens.export, "sparsify": sparsify.export}
IMPORT_FORMATS = {"saelens": saelens.load, "sparsify": sparsify.load, "openai": openai.load}

__all__ = ["EXPORT_FORMATS", "IMPORT_FORMATS", "FormatError", "export_sae", "import_sae", "load_foreign"]


def refuse_to_overwrite(out: Path) -> None:
    if (out / "cfg.json").exists():
        raise FileExistsError(f"{out} already holds an SAE (cfg.json); write to a new folder or delete it first")


def write_explanations_file(folder: Path, data: dict) -> None:
    """``folder/explanations.json``, written whole or not at all."""
    text = json.dumps(data, indent=1, ensure_ascii=False)
    atomic_write(folder / EXPLANATIONS_FILE, lambda temp: temp.write_text(text, encoding="utf-8"))


def export_sae(sae: SAE | str | Path, out: str | Path, format: str, sidecar: bool = True,
               explanations: str | Path | None = None) -> Path:
    """Write ``sae`` (or the SAE folder it names) to ``out`` in ``format``; refuses what it cannot express.

    The feature explanations travel with it: those in the ``explanations`` feature store (default:
    the SAE folder's features.sqlite, when it has any) are written to ``out/explanations.json``."""
    if format not in EXPORT_FORMATS:
        raise FormatError(f"unknown export format {format!r}; choose one of {sorted(EXPORT_FORMATS)}")
    if explanations is None and not isinstance(sae, SAE) and (Path(sae) / STORE_FILE).is_file():
        explanations = Path(sae) / STORE_FILE
    if not isinstance(sae, SAE):
        sae = load_sae(sae)
    refuse_to_overwrite(Path(out))
    written = EXPORT_FORMATS[format](sae, Path(out), sidecar=sidecar)
    if explanations is not None:
        data = export_explanations(explanations)
        if data["records"]:
            write_explanations_file(written, data)
    return written


def load_foreign(path: str | Path, format: str) -> tuple[SAE, list[str]]:
    """Our SAE (eval mode) from a checkpoint in ``format``, plus notes on what the conversion did."""
    if format not in IMPORT_FORMATS:
        raise FormatError(f"unknown import format {format!r}; choose one of {sorted(IMPORT_FORMATS)}")
    converted = IMPORT_FORMATS[format](Path(path))
    return converted.build(), converted.notes


def import_sae(path: str | Path, out: str | Path, format: str) -> tuple[SAE, list[str]]:
    """Convert a checkpoint in ``format`` to an sae-kit SAE folder at ``out`` (cfg.json + weights).

    An ``explanations.json`` beside the checkpoint (as ``export_sae`` writes) is checked against the
    SAE and copied; ``sae-kit analyze`` loads it into the feature store it builds."""
    refuse_to_overwrite(Path(out))
    sae, notes = load_foreign(path, format)
    source = Path(path) / EXPLANATIONS_FILE if Path(path).is_dir() else None
    data = None
    if source is not None and source.is_file():
        try:
            data = check_explanations_export(json.loads(source.read_text(encoding="utf-8")), sae.cfg.d_sae, str(source))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"{source} is not JSON ({exc}); fix or delete it to import the SAE") from None
        except ValueError as exc:
            raise FormatError(f"{exc}; fix or delete it to import the SAE") from None
    sae.save(out)
    if data is not None:
        write_explanations_file(Path(out), data)
        notes = [*notes, f"{len(data['records'])} feature explanations kept in {EXPLANATIONS_FILE} "
                         "(`sae-kit analyze` loads them into the feature store)"]
    return sae, notes

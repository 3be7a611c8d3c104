"""Import and export SAEs in other tools' formats: SAELens, sparsify, OpenAI (import only).

One file per format; each converts to and from our cfg.json + tensors (common.Converted).
"""
from __future__ import annotations

from pathlib import Path

from sae_kit.interop import openai, saelens, sparsify
from sae_kit.interop.common import FormatError
from sae_kit.sae import SAE, load_sae

EXPORT_FORMATS = {"saelens": saelens.export, "sparsify": sparsify.export}
IMPORT_FORMATS = {"saelens": saelens.load, "sparsify": sparsify.load, "openai": openai.load}

__all__ = ["EXPORT_FORMATS", "IMPORT_FORMATS", "FormatError", "export_sae", "import_sae", "load_foreign"]


def refuse_to_overwrite(out: Path) -> None:
    if (out / "cfg.json").exists():
        raise FileExistsError(f"{out} already holds an SAE (cfg.json); write to a new folder or delete it first")


def export_sae(sae: SAE | str | Path, out: str | Path, format: str, sidecar: bool = True) -> Path:
    """Write ``sae`` (or the SAE folder it names) to ``out`` in ``format``; refuses what it cannot express."""
    if format not in EXPORT_FORMATS:
        raise FormatError(f"unknown export format {format!r}; choose one of {sorted(EXPORT_FORMATS)}")
    if not isinstance(sae, SAE):
        sae = load_sae(sae)
    refuse_to_overwrite(Path(out))
    return EXPORT_FORMATS[format](sae, Path(out), sidecar=sidecar)


def load_foreign(path: str | Path, format: str) -> tuple[SAE, list[str]]:
    """Our SAE (eval mode) from a checkpoint in ``format``, plus notes on what the conversion did."""
    if format not in IMPORT_FORMATS:
        raise FormatError(f"unknown import format {format!r}; choose one of {sorted(IMPORT_FORMATS)}")
    converted = IMPORT_FORMATS[format](Path(path))
    return converted.build(), converted.notes


def import_sae(path: str | Path, out: str | Path, format: str) -> tuple[SAE, list[str]]:
    """Convert a checkpoint in ``format`` to an sae-kit SAE folder at ``out`` (cfg.json + weights)."""
    refuse_to_overwrite(Path(out))
    sae, notes = load_foreign(path, format)
    sae.save(out)
    return sae, notes

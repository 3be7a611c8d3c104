"""What an SAE folder is, where they are, how they are named, and what they were trained on.

Shared by the server's registry (which serves them) and the run manager (which trains them), so an SAE
has one id whichever of the two reports it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sae_kit.sae.base import CONFIG_FILE, WEIGHTS_FILE

MAX_DEPTH = 4  # folders below the served root searched for SAEs
# Metadata key of SAEs/stores trained on planted features (sae_kit.eval.synthetic): the dataset's name.
SYNTHETIC_KEY = "synthetic_dataset"
LEGACY_SYNTHETIC_PREFIX = "synthetic:"  # model_name of such SAEs before the key existed


def sae_id(root: Path, folder: Path) -> str:
    """The SAE's id under ``root``: its path with dots (``runs.<id>.sae``), the root's own name for the root."""
    root, folder = Path(root).resolve(), Path(folder).resolve()
    return folder.name if folder == root else folder.relative_to(root).as_posix().replace("/", ".")


def is_sae_folder(directory: Path) -> bool:
    """cfg.json (with d_in, d_sae, architecture) + the weights, and not a training checkpoint."""
    directory = Path(directory)
    if not ((directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()):
        return False
    # A training checkpoint (beside optimizer.safetensors) is a snapshot of a run, not an SAE to serve.
    if (directory.parent / "optimizer.safetensors").is_file():
        return False
    # A Hugging Face model folder may hold a cfg.json too.
    try:
        data = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"d_in", "d_sae", "architecture"} <= set(data)


def find_sae_folders(root: Path) -> list[Path]:
    """SAE folders under ``root`` (itself included), at most ``MAX_DEPTH`` deep, not following links out."""
    root = Path(root)
    found = []
    for directory, subdirectories, files in os.walk(root):
        here = Path(directory)
        depth = len(here.relative_to(root).parts)
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith(".") and depth < MAX_DEPTH
                                   and (here / d).resolve().is_relative_to(root))
        if CONFIG_FILE in files and WEIGHTS_FILE in files and is_sae_folder(here):
            found.append(here)
    return found


def synthetic_dataset(metadata: dict[str, Any]) -> str | None:
    """The planted dataset an SAE (or store) was trained on, from its metadata; None for a model's activations."""
    if metadata.get(SYNTHETIC_KEY):
        return str(metadata[SYNTHETIC_KEY])
    name = str(metadata.get("model_name") or "")
    return name.removeprefix(LEGACY_SYNTHETIC_PREFIX) if name.startswith(LEGACY_SYNTHETIC_PREFIX) else None


def is_model_path(name: str, root: Path) -> bool:
    """Whether a model name is a folder (relative to ``root`` or with a slash) rather than a named model (smollm2, gpt2)."""
    # "~" and "." are paths too (a home or relative folder), never model names.
    return "/" in name or "\\" in name or name.startswith(("~", ".")) or (Path(root) / name).exists()

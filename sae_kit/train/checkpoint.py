"""Training checkpoints without pickle: SAE folder + optimizer tensors (safetensors) + JSON state.

Layout of ``<run>/checkpoint/``: ``sae/`` (cfg.json, sae_weights.safetensors), ``optimizer.safetensors``
(every tensor of the optimizer state, keyed ``state.<param>.<name>``), ``optimizer.json`` (the
non-tensor state and param groups) and ``state.json`` (step, data position, RNG states, ...). A new
checkpoint is written to ``checkpoint.tmp`` and swapped in by renames, so a kill at any moment
leaves either the previous or the new checkpoint whole.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from sae_kit.sae import SAE, load_sae

CHECKPOINT_DIR = "checkpoint"


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for param_id, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain_state}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, entries in meta["plain_state"].items():
        state.setdefault(int(param_id), {}).update(entries)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(run_dir: Path, sae: SAE, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write a whole checkpoint; ``write_extra(folder)`` adds files (plugin state) inside the same swap."""
    final = run_dir / CHECKPOINT_DIR
    tmp = run_dir / f"{CHECKPOINT_DIR}.tmp"
    old = run_dir / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sae.save(tmp / "sae")
    tensors, meta = optimizer_to_files(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    rng = {"torch": torch.get_rng_state()}
    save_file(rng, str(tmp / "rng.safetensors"))
    if write_extra is not None:
        write_extra(tmp)
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole checkpoint: ``checkpoint/``, or ``checkpoint.old/`` if a swap was cut short."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        candidate = run_dir / name
        if (candidate / "state.json").is_file():
            return candidate
    return None


def load_checkpoint(path: Path) -> tuple[SAE, dict[str, Any], dict[str, Any]]:
    """Return (sae in train mode, optimizer state dict, trainer state) and restore the RNG."""
    try:
        state = json.loads((path / "state.json").read_text())
        sae = load_sae(path / "sae").train()
        optimizer_state = optimizer_from_files(
            load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text())
        )
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"checkpoint {path} is incomplete or corrupt ({exc}); start a new run or restore a copy") from None
    torch.set_rng_state(rng["torch"])
    return sae, optimizer_state, state

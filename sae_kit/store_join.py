"""Join the part stores of a parallel harvest into one store, without copying activations.

``sae-kit harvest --part I --parts N`` (one job per part, on as many machines or GPUs as there are
parts) writes rows [I·T/N, (I+1)·T/N) of what a single harvest of T rows would write, starting at the
batch that holds its first row, so its rows are the single harvest's rows. Joining checks that the
parts belong to one harvest (same model, hook, width, dtype, settings), that none is missing or
unfinished, then hard-links their shards in order into the new folder (a copy where the folder is on
another file system) and writes one manifest — last, so an interrupted join leaves no store behind
and can simply be run again.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from sae_kit.store import MANIFEST_NAME, ActivationStore, StoreError, _write_manifest, shard_file_name

PART_KEY = "harvest_part"
# Manifest keys that must agree between the parts (everything but the shards and their total).
SHARED_KEYS = ("format", "format_version", "model_name", "hook_name", "d_in", "dtype", "context_size")


def _part_info(store: ActivationStore) -> dict[str, Any]:
    info = store.metadata.get(PART_KEY)
    if not isinstance(info, dict):
        raise StoreError(f"{store.directory} is not part of a parallel harvest (no {PART_KEY!r} in its metadata); "
                         "harvest with --part I --parts N")
    return info


def join_stores(part_dirs: list[str | os.PathLike], out: str | os.PathLike, verify: bool = False) -> ActivationStore:
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        raise FileExistsError(f"{out} already holds an activation store; join into a new folder")
    stores = [ActivationStore(path) for path in part_dirs]
    stores.sort(key=lambda s: _part_info(s)["part"])
    infos = [_part_info(s) for s in stores]
    parts = infos[0]["parts"]
    numbers = [info["part"] for info in infos]
    if numbers != list(range(parts)) or any(info["parts"] != parts for info in infos):
        missing = sorted(set(range(parts)) - set(numbers))
        raise StoreError(f"the parts given are {numbers} of {parts}; missing {missing}, or parts of different harvests")
    first, reference = stores[0], stores[0].manifest
    common_meta = {k: v for k, v in first.metadata.items() if k != PART_KEY}
    for store, info in zip(stores, infos):
        manifest = store.manifest
        differing = [k for k in SHARED_KEYS if manifest.get(k) != reference.get(k)]
        if {k: v for k, v in store.metadata.items() if k != PART_KEY} != common_meta:
            differing.append("metadata")
        if info["total_rows"] != infos[0]["total_rows"] or info["batch_size"] != infos[0]["batch_size"]:
            differing.append("--tokens/--batch-size")
        if differing:
            raise StoreError(f"{store.directory} differs from {first.directory} in {differing}: not parts of one harvest")
        if store.n_tokens != info["rows"]:
            raise StoreError(f"{store.directory} holds {store.n_tokens} of its {info['rows']} rows: finish that part "
                             "(re-run its harvest command) before joining")
        if verify:
            store.verify()
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for store in stores:
        for entry in store.shards:
            name = shard_file_name(len(shards))
            _link_or_copy(Path(store.directory) / entry["file"], out / name)
            shards.append({**entry, "file": name})
    manifest = {**reference, "metadata": common_meta, "shards": shards,
                "total_tokens": sum(e["n_tokens"] for e in shards)}
    _write_manifest(out, manifest)
    return ActivationStore(out)


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)  # left by an interrupted join
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)

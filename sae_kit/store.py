"""On-disk activation store: sharded safetensors files described by a JSON manifest.

Layout of a store directory::

    manifest.json              format version, model/hook names, d_in, dtype, context_size,
                               metadata, total_tokens, and per shard: file, n_tokens, sha256,
                               size_bytes
    shard_00000.safetensors    tensors "activations" [n, d_in] (store dtype),
    shard_00001.safetensors    "token_ids" [n] int32 and "positions" [n] int32
    ...

A harvester writes it with :class:`ActivationStoreWriter`; a trainer reads it with
:class:`ActivationStore`. Rows are stored in harvest order, so consecutive rows usually belong to
the same context window.

Crash safety: every shard and every manifest version is written to a hidden temp file in the
store directory, fsynced, then moved into place with ``os.replace``, so a reader never sees a
half-written file. The manifest is rewritten after each shard, so it always describes a prefix of
what was harvested; reopening a writer on the directory resumes after that prefix.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_kit.fileio import TEMP_SUFFIX, atomic_write
from sae_kit.seeding import derive_seed

FORMAT_NAME = "sae-kit-activation-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "heldout", "all")

_TEMP_SUFFIX = TEMP_SUFFIX
_SHARD_NAME = re.compile(r"^shard_(\d+)\.safetensors$")
_TENSOR_NAMES = ("activations", "token_ids", "positions")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_INT32 = torch.iinfo(torch.int32)
_HASH_CHUNK_BYTES = 1 << 20


class StoreError(ValueError):
    """The store on disk is damaged, inconsistent, or incompatible with what was asked of it."""


# --------------------------------------------------------------------------------------------
# Small helpers shared by the writer and the reader
# --------------------------------------------------------------------------------------------


def shard_file_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, torch_dtype in _DTYPES.items():
            if torch_dtype == dtype:
                return name
    elif dtype in _DTYPES:
        return dtype
    raise ValueError(f"store dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(directory / MANIFEST_NAME, lambda path: path.write_text(text))


def _load_manifest(directory: Path) -> dict[str, Any]:
    """Read and structurally validate ``directory/manifest.json``."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {MANIFEST_NAME} in {directory}: it is not an activation store (or its harvest "
            f"never started). Point at a store directory, or create one with "
            f"ActivationStoreWriter / write_store."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(
            f"{path} is not valid JSON ({exc}); the store is damaged: re-harvest into a new "
            f"directory or restore the file from a backup."
        ) from exc

    def damaged(problem: str) -> StoreError:
        return StoreError(f"{path} is not a valid activation-store manifest: {problem}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise damaged(f"'format' is not {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise damaged(f"format_version {version!r} is not supported (this sae-kit reads "
                      f"version {FORMAT_VERSION}); upgrade sae-kit or re-harvest")
    for key in ("model_name", "hook_name", "d_in", "dtype", "context_size", "metadata",
                "total_tokens", "shards"):
        if key not in manifest:
            raise damaged(f"missing key {key!r}")
    if not isinstance(manifest["d_in"], int) or manifest["d_in"] <= 0:
        raise damaged(f"d_in must be a positive integer, got {manifest['d_in']!r}")
    if manifest["dtype"] not in _DTYPES:
        raise damaged(f"dtype {manifest['dtype']!r} is not one of {sorted(_DTYPES)}")
    if not isinstance(manifest["shards"], list):
        raise damaged("'shards' is not a list")
    for entry in manifest["shards"]:
        required = {"file", "n_tokens", "sha256", "size_bytes"}
        if not isinstance(entry, dict) or not required <= set(entry):
            raise damaged(f"shard entry {entry!r} lacks file/n_tokens/sha256/size_bytes")
        # A name with a path in it could point outside the store.
        if not isinstance(entry["file"], str) or Path(entry["file"]).name != entry["file"]:
            raise damaged(f"shard file name {entry['file']!r} is not a plain file name")
    counted = sum(entry["n_tokens"] for entry in manifest["shards"])
    if counted != manifest["total_tokens"]:
        raise damaged(f"total_tokens is {manifest['total_tokens']} but the shards hold {counted}")
    return manifest


def _check_shard_sizes(directory: Path, manifest: dict[str, Any]) -> None:
    """Cheap open-time check: every listed shard exists with the size the manifest recorded."""
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        if not path.is_file():
            raise StoreError(f"Shard {path} is listed in the manifest but missing from disk; "
                             f"restore it or re-harvest into a new directory.")
        size = path.stat().st_size
        if size != entry["size_bytes"]:
            raise StoreError(
                f"Shard {path} is {size} bytes but the manifest records {entry['size_bytes']}: "
                f"it is truncated or was overwritten; restore it or re-harvest."
            )


# Shards whose sha256 matched in this process, by (path, size, mtime, inode): each is hashed once
# per process however many readers open its store (an edit changes the stamp and re-arms the check).
_VERIFIED_SHARDS: set[tuple[str, int, int, int, str]] = set()


def _shard_stamp(path: Path, sha256: str) -> tuple[str, int, int, int, str]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, sha256)


def _verify_shard(path: Path, sha256: str) -> None:
    """Raise :class:`StoreError` unless the shard's bytes match the manifest's checksum."""
    stamp = _shard_stamp(path, sha256)
    if stamp in _VERIFIED_SHARDS:
        return
    if _sha256_of_file(path) != sha256:
        raise StoreError(f"Shard {path} does not match its sha256 checksum in {MANIFEST_NAME}: its data "
                         f"changed after it was written (disk or copy error). Restore the file from a copy, "
                         f"or re-harvest the store into a new directory.")
    _VERIFIED_SHARDS.add(stamp)


def _inspect_shard(path: Path, d_in: int, dtype: str) -> int:
    """Check a shard's tensor names, shapes and dtypes without loading data; return its rows."""
    try:
        with safe_open(str(path), framework="pt") as file:
            names = set(file.keys())
            layout = {name: (file.get_slice(name).get_shape(), file.get_slice(name).get_dtype())
                      for name in _TENSOR_NAMES if name in names}
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise StoreError(f"Shard {path} cannot be read as safetensors ({exc}); it is "
                         f"corrupt: restore it or re-harvest.") from exc
    missing = [name for name in _TENSOR_NAMES if name not in layout]
    if missing:
        raise StoreError(f"Shard {path} lacks tensors {missing}")
    shape, found_dtype = layout["activations"]
    if len(shape) != 2 or shape[1] != d_in or found_dtype != _SAFETENSORS_DTYPES[dtype]:
        raise StoreError(f"Shard {path} holds activations {shape} {found_dtype}, expected "
                         f"[n, {d_in}] {_SAFETENSORS_DTYPES[dtype]}")
    n_rows = shape[0]
    for name in ("token_ids", "positions"):
        shape, found_dtype = layout[name]
        if list(shape) != [n_rows] or found_dtype != "I32":
            raise StoreError(f"Shard {path} holds {name} {shape} {found_dtype}, expected "
                             f"[{n_rows}] I32")
    return n_rows


def _epoch_seed(seed: int, epoch: int) -> int:
    return derive_seed("store", seed, epoch)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class ActivationStoreWriter:
    """Appends activation rows to a store directory, one atomically written shard at a time.

    ``append`` buffers rows in memory and writes a shard each time ``shard_tokens`` rows are
    buffered; ``close`` (or leaving the ``with`` block) writes the last partial shard. Rows not yet
    in a written shard are lost if the process dies; ``tokens_written`` counts the rows that
    are durably on disk.

    Resuming: opening a writer on a directory that already has a manifest continues after its
    last complete shard, provided model_name, hook_name, d_in, dtype and context_size match (and
    metadata, when given). A harvester should skip the first ``tokens_written`` tokens of its
    input. Left-overs of a killed run are cleaned up on open:

    * hidden ``*.tmp`` files (a shard or manifest that was being written) are deleted;
    * a shard file on disk but not in the manifest (the run died between renaming the shard and
      rewriting the manifest) is **adopted** when it is the next shard in sequence and passes a
      check of its tensor names, shapes and dtypes: its rows were fully written and fsynced
      before the rename, so discarding them would only waste harvest time. Any other unlisted
      shard is deleted with a warning.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        d_in: int,
        dtype: str | torch.dtype = "float32",
        model_name: str | None = None,
        hook_name: str | None = None,
        context_size: int | None = None,
        shard_tokens: int = 65536,
        metadata: dict | None = None,
    ) -> None:
        if not isinstance(d_in, int) or d_in <= 0:
            raise ValueError(f"d_in must be a positive integer, got {d_in!r}")
        if not isinstance(shard_tokens, int) or shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
        if context_size is not None and (not isinstance(context_size, int) or context_size <= 0):
            raise ValueError(
                f"context_size must be a positive integer or None, got {context_size!r}")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
            try:
                # Round-trip so the comparison on resume sees what JSON will give back.
                metadata = json.loads(json.dumps(metadata))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metadata must be JSON-serialisable: {exc}") from exc

        self.directory = Path(directory)
        self.d_in = d_in
        self.dtype = _dtype_name(dtype)
        self.shard_tokens = shard_tokens
        self._torch_dtype = _DTYPES[self.dtype]
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0
        self._closed = False

        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_temp_files()
        wanted = {"model_name": model_name, "hook_name": hook_name, "d_in": d_in,
                  "dtype": self.dtype, "context_size": context_size}
        if (self.directory / MANIFEST_NAME).exists():
            self._manifest = self._resume(wanted, metadata)
        else:
            strays = [path.name for path in self.directory.iterdir()
                      if _SHARD_NAME.match(path.name)]
            if strays:
                raise StoreError(f"{self.directory} holds shard files {sorted(strays)[:3]} but no "
                                 f"{MANIFEST_NAME}; use a new directory.")
            self._manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **wanted,
                              "metadata": metadata or {}, "total_tokens": 0, "shards": []}
            # Written up front so that a resume can check parameters even before the first shard.
            _write_manifest(self.directory, self._manifest)
        self.context_size = self._manifest["context_size"]

    # -- resume ---------------------------------------------------------------------------------

    def _remove_temp_files(self) -> None:
        for path in self.directory.iterdir():
            if path.name.startswith(".") and path.name.endswith(_TEMP_SUFFIX):
                path.unlink(missing_ok=True)

    def _resume(self, wanted: dict[str, Any], metadata: dict | None) -> dict[str, Any]:
        manifest = _load_manifest(self.directory)
        checks = dict(wanted)
        if metadata is not None:
            checks["metadata"] = metadata
        for field, value in checks.items():
            if manifest[field] != value:
                raise StoreError(
                    f"Cannot resume the store in {self.directory}: its {field} is "
                    f"{manifest[field]!r} but this writer was given {value!r}. Use a new "
                    f"directory for a different harvest."
                )
        _check_shard_sizes(self.directory, manifest)
        self._adopt_or_delete_orphan_shards(manifest)
        return manifest

    def _adopt_or_delete_orphan_shards(self, manifest: dict[str, Any]) -> None:
        listed = {entry["file"] for entry in manifest["shards"]}
        orphans = sorted(
            (int(match.group(1)), path)
            for path in self.directory.iterdir()
            if (match := _SHARD_NAME.match(path.name)) and path.name not in listed
        )
        for _, path in orphans:
            reason = None
            if path.name != shard_file_name(len(manifest["shards"])):
                reason = "it is not the next shard in sequence"
            else:
                try:
                    n_rows = _inspect_shard(path, manifest["d_in"], manifest["dtype"])
                except StoreError as exc:
                    reason = str(exc)
            if reason is None and n_rows > 0:
                manifest["shards"].append({"file": path.name, "n_tokens": n_rows,
                                           "sha256": _sha256_of_file(path),
                                           "size_bytes": path.stat().st_size})
                manifest["total_tokens"] += n_rows
                _write_manifest(self.directory, manifest)
            else:
                warnings.warn(f"Deleting shard {path} that is not in the manifest: "
                              f"{reason or 'it is empty'}", stacklevel=3)
                path.unlink()

    # -- writing --------------------------------------------------------------------------------

    @property
    def tokens_written(self) -> int:
        """Rows durably on disk (in the manifest); buffered rows are not counted."""
        return self._manifest["total_tokens"]

    @property
    def tokens_pending(self) -> int:
        """Rows appended but not yet written to a shard."""
        return self._pending_rows

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    def append(
        self,
        activations: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Buffer ``activations`` [N, d_in] (with optional token ids and positions [N]).

        Missing token ids are stored as -1; missing positions as the row index within this call
        (modulo ``context_size`` when known), i.e. each call is taken to start a sequence.
        """
        if self._closed:
            raise ValueError("append() on a closed ActivationStoreWriter")
        rows = self._checked_activations(activations)
        n_rows = rows.shape[0]
        if token_ids is None:
            token_ids = torch.full((n_rows,), -1, dtype=torch.int32)
        else:
            token_ids = self._checked_ids(token_ids, n_rows, "token_ids")
        if positions is None:
            positions = torch.arange(n_rows, dtype=torch.int64)
            if self.context_size is not None:
                positions = positions % self.context_size
            positions = self._checked_ids(positions, n_rows, "positions")
        else:
            positions = self._checked_ids(positions, n_rows, "positions")
        if n_rows == 0:
            return
        self._pending.append((rows, token_ids, positions))
        self._pending_rows += n_rows
        if self._pending_rows >= self.shard_tokens:
            self._write_buffered(include_partial=False)

    def _checked_activations(self, activations: torch.Tensor) -> torch.Tensor:
        if not isinstance(activations, torch.Tensor):
            raise ValueError(
                f"activations must be a torch.Tensor, got {type(activations).__name__}")
        if activations.dim() != 2 or activations.shape[1] != self.d_in:
            raise ValueError(f"activations must have shape [N, {self.d_in}], got "
                             f"{list(activations.shape)}")
        if not activations.is_floating_point():
            raise ValueError(
                f"activations must be a floating-point tensor, got {activations.dtype}")
        # copy=True: the caller may reuse its tensor (e.g. a hook buffer) while we still buffer it.
        rows = activations.detach().to("cpu", self._torch_dtype, copy=True)
        if not torch.isfinite(rows).all():
            raise ValueError(
                f"activations contain NaN or inf after casting to {self.dtype} (float16 overflows "
                f"beyond ±65504); store them as float32/bfloat16 or fix the source."
            )
        return rows

    @staticmethod
    def _checked_ids(values: torch.Tensor, n_rows: int, name: str) -> torch.Tensor:
        if not isinstance(values, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
        if values.dim() != 1 or values.shape[0] != n_rows:
            raise ValueError(f"{name} must have shape [{n_rows}] to match activations, got "
                             f"{list(values.shape)}")
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {values.dtype}")
        if n_rows and (values.min() < _INT32.min or values.max() > _INT32.max):
            raise ValueError(f"{name} values must fit in int32")
        return values.detach().to("cpu", torch.int32, copy=True)

    def _write_buffered(self, *, include_partial: bool) -> None:
        if not self._pending:
            return
        activations, token_ids, positions = (torch.cat(parts) for parts in zip(*self._pending))
        total, start = activations.shape[0], 0
        try:
            while total - start >= self.shard_tokens or (include_partial and start < total):
                stop = min(start + self.shard_tokens, total)
                self._write_shard(activations[start:stop], token_ids[start:stop],
                                  positions[start:stop])
                start = stop
        finally:
            # Also on failure (e.g. disk full): rows already in a listed shard leave the buffer,
            # the rest stay, so retrying neither duplicates nor loses rows.
            # clone() so the remainder does not pin the whole concatenated buffer in memory.
            self._pending = ([(activations[start:].clone(), token_ids[start:].clone(),
                               positions[start:].clone())] if start < total else [])
            self._pending_rows = total - start

    def _write_shard(self, activations: torch.Tensor, token_ids: torch.Tensor,
                     positions: torch.Tensor) -> None:
        name = shard_file_name(len(self._manifest["shards"]))
        tensors = {"activations": activations.contiguous(), "token_ids": token_ids.contiguous(),
                   "positions": positions.contiguous()}
        atomic_write(self.directory / name, lambda path: save_file(tensors, str(path)))
        path = self.directory / name
        manifest = {**self._manifest, "shards": [*self._manifest["shards"], {
            "file": name, "n_tokens": activations.shape[0], "sha256": _sha256_of_file(path),
            "size_bytes": path.stat().st_size}]}
        manifest["total_tokens"] += activations.shape[0]
        _write_manifest(self.directory, manifest)
        # Only now: if the manifest write failed, the next attempt rewrites this same shard.
        self._manifest = manifest

    def close(self) -> None:
        """Write the buffered rows as a final (possibly short) shard. Safe to call twice."""
        if self._closed:
            return
        self._write_buffered(include_partial=True)
        self._closed = True

    def __enter__(self) -> ActivationStoreWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Rows appended before an exception are complete and valid, so they are kept.
        self.close()


def write_store(
    directory: str | os.PathLike,
    activations: torch.Tensor,
    *,
    token_ids: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    dtype: str | torch.dtype | None = None,
    **writer_kwargs: Any,
) -> ActivationStore:
    """Write ``activations`` [N, d_in] as a new store in one go and open it for reading.

    ``dtype`` defaults to the tensor's own dtype when the store supports it, else float32.
    Other keyword arguments go to :class:`ActivationStoreWriter`.
    """
    if (Path(directory) / MANIFEST_NAME).exists():
        raise FileExistsError(f"{directory} already holds an activation store; write_store only "
                              f"creates new ones (use ActivationStoreWriter to append).")
    if not isinstance(activations, torch.Tensor) or activations.dim() != 2:
        raise ValueError("write_store needs a 2-D activations tensor [N, d_in]")
    if dtype is None:
        dtype = activations.dtype if activations.dtype in _DTYPES.values() else "float32"
    directory = Path(directory)
    existed = set(directory.iterdir()) if directory.is_dir() else None
    try:
        with ActivationStoreWriter(directory, d_in=activations.shape[1], dtype=dtype,
                                   **writer_kwargs) as writer:
            writer.append(activations, token_ids, positions)
    except BaseException:
        # Refused (NaN, bad shapes...) or interrupted: remove what this call created, so that the
        # same call can simply be retried (a half-made store would make it a FileExistsError).
        if existed is None:
            shutil.rmtree(directory, ignore_errors=True)
        elif directory.is_dir():
            for path in set(directory.iterdir()) - existed:
                path.unlink(missing_ok=True)
        raise
    return ActivationStore(directory)


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreSplit:
    """Global row ranges of the train and held-out parts of a store."""

    train: range
    heldout: range


class ActivationStore:
    """Read-only, memory-mapped view of an activation store directory.

    Opening checks that the manifest parses and that every shard exists with its recorded size and
    holds the tensors and row count the manifest records (its header only: cheap). The first read
    of a shard recomputes its sha256 (once per shard per process: a reader sees corrupt data as an
    error naming the file, never as numbers); ``verify()`` checks every shard at once. Reads go
    through ``safetensors.safe_open`` slices. The manifest is read once at open: shards a writer
    adds later are not seen.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._manifest = _load_manifest(self.directory)
        _check_shard_sizes(self.directory, self._manifest)
        self._dtype_name: str = self._manifest["dtype"]
        starts = [0]
        for entry in self._manifest["shards"]:
            starts.append(starts[-1] + entry["n_tokens"])
        self._shard_starts = starts  # global row of each shard's first row, plus the end
        for shard, entry in enumerate(self._manifest["shards"]):
            n_rows = _inspect_shard(self._shard_path(shard), self.d_in, self._dtype_name)
            if n_rows != entry["n_tokens"]:
                raise StoreError(f"Shard {self._shard_path(shard)} holds {n_rows} rows but {MANIFEST_NAME} records "
                                 f"{entry['n_tokens']}: the manifest or the shard was altered; restore them "
                                 f"from a copy or re-harvest the store.")
        self._checked_shards: set[int] = set()  # checksum verified

    # -- metadata -------------------------------------------------------------------------------

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    @property
    def d_in(self) -> int:
        return self._manifest["d_in"]

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype as a torch dtype (the manifest holds its name)."""
        return _DTYPES[self._dtype_name]

    @property
    def n_tokens(self) -> int:
        return self._manifest["total_tokens"]

    @property
    def model_name(self) -> str | None:
        return self._manifest["model_name"]

    @property
    def hook_name(self) -> str | None:
        return self._manifest["hook_name"]

    @property
    def context_size(self) -> int | None:
        return self._manifest["context_size"]

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest["metadata"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.directory)!r}, n_tokens={self.n_tokens}, "
                f"d_in={self.d_in}, dtype={self._dtype_name}, "
                f"shards={len(self._shard_starts) - 1})")

    def verify(self) -> None:
        """Recompute every shard's sha256; raise :class:`StoreError` naming the corrupt shards."""
        corrupt = []
        for shard, entry in enumerate(self._manifest["shards"]):
            try:
                _verify_shard(self._shard_path(shard), entry["sha256"])
                self._checked_shards.add(shard)
            except StoreError:
                corrupt.append(str(self._shard_path(shard)))
        if corrupt:
            raise StoreError(f"Checksum mismatch in shard(s) {', '.join(corrupt)}: the data is "
                             f"corrupt; restore them or re-harvest.")

    # -- random access --------------------------------------------------------------------------

    def _shard_path(self, shard: int) -> Path:
        return self.directory / self._manifest["shards"][shard]["file"]

    def _read_shard_rows(self, shard: int, start: int, stop: int,
                         names: tuple[str, ...]) -> list[torch.Tensor]:
        path = self._shard_path(shard)
        if shard not in self._checked_shards:
            _verify_shard(path, self._manifest["shards"][shard]["sha256"])
            self._checked_shards.add(shard)
        try:
            with safe_open(str(path), framework="pt") as file:
                return [file.get_slice(name)[start:stop] for name in names]
        except Exception as exc:
            raise StoreError(f"Reading rows {start}:{stop} of shard {path} failed ({exc}); it "
                             f"may be corrupt: run verify().") from exc

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """Split global rows [start, stop) into (shard, local_start, local_stop) pieces."""
        shard = bisect.bisect_right(self._shard_starts, start) - 1
        while start < stop:
            shard_start, shard_stop = self._shard_starts[shard], self._shard_starts[shard + 1]
            piece_stop = min(stop, shard_stop)
            if piece_stop > start:
                yield shard, start - shard_start, piece_stop - shard_start
            start = piece_stop
            shard += 1

    def _read_range(self, start: int, stop: int, name: str) -> torch.Tensor:
        if not (0 <= start <= stop <= self.n_tokens):
            raise IndexError(f"row range [{start}, {stop}) is outside the store's "
                             f"{self.n_tokens} rows")
        parts = [self._read_shard_rows(shard, a, b, (name,))[0]
                 for shard, a, b in self._pieces(start, stop)]
        if parts:
            return torch.cat(parts)
        empty_shape = (0, self.d_in) if name == "activations" else (0,)
        return torch.empty(empty_shape, dtype=self.dtype if name == "activations" else torch.int32)

    def read(self, start: int, stop: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Activations of global rows [start, stop), in the store dtype unless ``dtype`` given."""
        rows = self._read_range(start, stop, "activations")
        return rows if dtype is None else rows.to(dtype)

    def tokens(self, start: int, stop: int) -> torch.Tensor:
        """Token ids of global rows [start, stop) as int64 (-1 where none were recorded)."""
        return self._read_range(start, stop, "token_ids").long()

    def positions(self, start: int, stop: int) -> torch.Tensor:
        """Positions within their context window of global rows [start, stop), as int64."""
        return self._read_range(start, stop, "positions").long()

    # -- train / held-out split -----------------------------------------------------------------

    def split(self, heldout_fraction: float = 0.05) -> StoreSplit:
        """Deterministic train / held-out split: the held-out rows are the *tail* of the store.

        Consecutive rows of a context window are strongly correlated, so a random row split
        would leak near-duplicates of held-out rows into training. Holding out a contiguous tail
        keeps whole windows on one side: the boundary is ``n_tokens - ceil(fraction * n_tokens)``
        moved down to a multiple of ``context_size`` when the store knows it (harvested windows
        start at row 0 and are ``context_size`` rows long). The split needs only the manifest.
        """
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        n_rows = self.n_tokens
        boundary = n_rows - math.ceil(heldout_fraction * n_rows)
        if self.context_size and boundary < n_rows:
            boundary -= boundary % self.context_size
        return StoreSplit(train=range(0, boundary), heldout=range(boundary, n_rows))

    def _split_rows(self, split: str, heldout_fraction: float) -> range:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "all":
            return range(0, self.n_tokens)
        return getattr(self.split(heldout_fraction), split)

    # -- batches --------------------------------------------------------------------------------

    def num_batches_per_epoch(self, batch_size: int, *, split: str = "train",
                              heldout_fraction: float = 0.05, drop_last: bool = True) -> int:
        n_rows = len(self._split_rows(split, heldout_fraction))
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        return n_rows // batch_size if drop_last else math.ceil(n_rows / batch_size)

    def iter_batches(
        self,
        batch_size: int,
        *,
        split: str = "train",
        heldout_fraction: float = 0.05,
        seed: int = 0,
        shuffle: bool | None = None,
        buffer_tokens: int = 262144,
        dtype: torch.dtype = torch.float32,
        start_batch: int = 0,
        epochs: int | None = None,
        drop_last: bool = True,
        with_tokens: bool = False,
    ) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches [batch_size, d_in] of ``dtype`` (with int64 token ids if ``with_tokens``).

        Each epoch is one stream of the split's rows, cut into consecutive batches. With
        ``shuffle`` (default for train/all, off for heldout) the stream is built like this: the
        split's rows are cut at shard boundaries into units of at most ``buffer_tokens`` rows;
        the unit order is permuted; consecutive units are packed into buffers of at most
        ``buffer_tokens`` rows; each buffer is permuted. All randomness comes from a
        ``torch.Generator`` seeded by (seed, epoch), so the stream is a pure function of the
        arguments and the manifest. Batches may span two buffers; with ``drop_last`` the
        epoch's last short batch is dropped. ``epochs=None`` repeats forever.

        ``start_batch=n`` yields exactly what the uninterrupted iteration yields from batch n on
        (n counts across epochs). Buffer sizes come from the manifest, so buffers before the
        resume point are never read.
        """
        rows = self._split_rows(split, heldout_fraction)
        for name, value in (("batch_size", batch_size), ("buffer_tokens", buffer_tokens)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(start_batch, int) or start_batch < 0:
            raise ValueError(f"start_batch must be a non-negative integer, got {start_batch!r}")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 0):
            raise ValueError(f"epochs must be None or a non-negative integer, got {epochs!r}")
        per_epoch = self.num_batches_per_epoch(batch_size, split=split,
                                               heldout_fraction=heldout_fraction,
                                               drop_last=drop_last)
        if per_epoch == 0:
            raise ValueError(f"the {split!r} split has {len(rows)} rows: not enough for one batch "
                             f"of {batch_size} (lower batch_size or pass drop_last=False)")
        if shuffle is None:
            shuffle = split != "heldout"
        units = [(shard, a + offset, min(a + offset + buffer_tokens, b))
                 for shard, a, b in self._pieces(rows.start, rows.stop)
                 for offset in range(0, b - a, buffer_tokens)]
        return self._generate_batches(units, batch_size, per_epoch, seed, shuffle, buffer_tokens,
                                      dtype, start_batch, epochs, drop_last, with_tokens)

    def _generate_batches(self, units, batch_size, per_epoch, seed, shuffle, buffer_tokens,
                          dtype, start_batch, epochs, drop_last, with_tokens):
        epoch, batch_in_epoch = divmod(start_batch, per_epoch)
        while epochs is None or epoch < epochs:
            plan = _plan_epoch(units, seed, epoch, shuffle, buffer_tokens)
            yield from self._epoch_batches(plan, batch_size, batch_in_epoch * batch_size, dtype,
                                           drop_last, with_tokens)
            epoch += 1
            batch_in_epoch = 0

    def _epoch_batches(self, plan, batch_size, first_row, dtype, drop_last, with_tokens):
        names = ("activations", "token_ids") if with_tokens else ("activations",)
        pending: list[list[torch.Tensor]] = []
        pending_rows = 0
        buffer_start = 0
        for buffer_units, buffer_seed in plan:
            buffer_rows = sum(stop - start for _, start, stop in buffer_units)
            buffer_stop = buffer_start + buffer_rows
            if buffer_stop <= first_row:
                buffer_start = buffer_stop
                continue  # wholly before the resume point: never read
            columns = self._load_units(buffer_units, names)
            order = None
            if buffer_seed is not None:
                order = torch.randperm(buffer_rows,
                                       generator=torch.Generator().manual_seed(buffer_seed))
            cursor = max(first_row - buffer_start, 0)
            while cursor < buffer_rows:
                take = min(batch_size - pending_rows, buffer_rows - cursor)
                # Gathering per batch avoids a permuted copy of the whole buffer.
                stop = cursor + take
                index = slice(cursor, stop) if order is None else order[cursor:stop]
                pending.append([column[index] for column in columns])
                pending_rows += take
                cursor += take
                if pending_rows == batch_size:
                    yield _assemble(pending, dtype, with_tokens)
                    pending, pending_rows = [], 0
            buffer_start = buffer_stop
        if pending_rows and not drop_last:
            yield _assemble(pending, dtype, with_tokens)

    def _load_units(self, units: list[tuple[int, int, int]],
                    names: tuple[str, ...]) -> list[torch.Tensor]:
        parts = [self._read_shard_rows(shard, start, stop, names) for shard, start, stop in units]
        return [torch.cat(column) for column in zip(*parts)]

    def sample(self, n: int, *, seed: int = 0, split: str = "train",
               heldout_fraction: float = 0.05, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n`` distinct rows drawn uniformly from ``split`` (store order), e.g. for init stats.

        Memory stays O(n + one shard): indices are drawn without a full permutation and each
        shard is read once, over the span of its sampled rows.
        """
        rows = self._split_rows(split, heldout_fraction)
        if not 0 <= n <= len(rows):
            raise ValueError(f"cannot sample {n} rows from the {split!r} split of {len(rows)} rows")
        generator = torch.Generator().manual_seed(_epoch_seed(seed, -1))
        chosen = torch.empty(0, dtype=torch.int64)
        if 2 * n > len(rows):
            # Rejection sampling slows to a crawl as n nears the split size: permute instead.
            chosen = torch.randperm(len(rows), generator=generator)[:n]
        while chosen.numel() < n:
            draws = torch.randint(len(rows), (2 * (n - chosen.numel()),), generator=generator)
            chosen = torch.unique(torch.cat([chosen, draws]))
        # unique() sorts; a random subset of the distinct draws is still uniform, a prefix is not.
        keep = torch.randperm(chosen.numel(), generator=generator)[:n]
        global_rows = (chosen[keep].sort().values + rows.start).tolist()
        parts = []
        for shard, group in _group_by_shard(global_rows, self._shard_starts):
            offset = self._shard_starts[shard]
            local = torch.tensor(group) - offset
            span = self._read_shard_rows(shard, group[0] - offset, group[-1] - offset + 1,
                                         ("activations",))[0]
            parts.append(span[local - local[0]])
        if not parts:
            return torch.empty((0, self.d_in), dtype=dtype)
        return torch.cat(parts).to(dtype)


def _plan_epoch(units: list[tuple[int, int, int]], seed: int, epoch: int, shuffle: bool,
                buffer_tokens: int) -> list[tuple[list[tuple[int, int, int]], int | None]]:
    """The epoch's buffers (lists of shard row ranges) and each buffer's permutation seed."""
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    order = (torch.randperm(len(units), generator=generator).tolist() if shuffle
             else range(len(units)))
    buffers: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    current_rows = 0
    for unit_index in order:
        unit = units[unit_index]
        unit_rows = unit[2] - unit[1]
        if current and current_rows + unit_rows > buffer_tokens:
            buffers.append(current)
            current, current_rows = [], 0
        current.append(unit)
        current_rows += unit_rows
    if current:
        buffers.append(current)
    if not shuffle:
        return [(buffer, None) for buffer in buffers]
    # One seed per buffer, drawn up front, so a resume can permute a buffer without replaying
    # the permutations of the buffers before it.
    seeds = torch.randint(0, 2**62, (len(buffers),), generator=generator).tolist()
    return list(zip(buffers, seeds))


def _assemble(pending: list[list[torch.Tensor]], dtype: torch.dtype, with_tokens: bool):
    activations = torch.cat([piece[0] for piece in pending]).to(dtype)
    if not with_tokens:
        return activations
    return activations, torch.cat([piece[1] for piece in pending]).long()


def _group_by_shard(sorted_rows: list[int],
                    shard_starts: list[int]) -> Iterator[tuple[int, list[int]]]:
    """Group ascending global rows into runs that lie in the same shard."""
    group: list[int] = []
    shard = -1
    for row in sorted_rows:
        row_shard = bisect.bisect_right(shard_starts, row) - 1
        if row_shard != shard and group:
            yield shard, group
            group = []
        shard = row_shard
        group.append(row)
    if group:
        yield shard, group

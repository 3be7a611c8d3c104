"""Crash-safe file writing: a file appears whole under its final name, or not at all."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

TEMP_SUFFIX = ".tmp"


def fsync_directory(directory: Path) -> None:
    # Makes a rename durable. Some platforms cannot open a directory; the rename is still atomic
    # there, only its durability across a power cut is weaker.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run ``write(temp_path)`` on a hidden temp file beside ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    temp_path = Path(temp_name)
    try:
        write(temp_path)
        with open(temp_path, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)

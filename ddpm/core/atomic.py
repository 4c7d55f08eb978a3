"""Atomic file writes: write to a temporary file in the same directory, flush, fsync, rename.

A crash (or an exception) during the write leaves the previous file untouched, so a checkpoint,
metrics file or image on disk is always either the old complete one or the new complete one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed over `path`, else deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # flush the data to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Like `open(path, mode)` for writing, but the file appears only once fully written."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_text(path: str | Path, text: str) -> None:
    """Atomically replace `path` with `text`."""
    with atomic_open(path, "w") as f:
        f.write(text)

"""Atomic file writes: write to a temporary file in the same directory, flush, fsync, rename.

A crash (or an exception) during the write leaves the previous file untouched, so a checkpoint,
metrics file or image on disk is always either the old complete one or the new complete one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _new_temp_file(path: Path) -> Path:
    """A new empty file next to `path`, made with mode 0o666 less the process umask (as `open` makes files).

    The kernel applies the umask, so nothing reads or changes the process-wide setting (other threads,
    MLflow's among them, may be creating files meanwhile).
    """
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:  # a name another writer holds: draw again
            continue


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed over `path`, else deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_temp_file(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # flush the data to disk before the rename makes it visible
            os.fsync(f.fileno())
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

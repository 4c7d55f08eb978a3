"""Atomic writes: the usual file mode, without touching the process umask."""

from __future__ import annotations

import os
import stat

import pytest

from ddpm.core.atomic import write_text


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_get_the_umask_mode_and_the_umask_is_never_changed(tmp_path, monkeypatch, mask):
    old = os.umask(mask)  # the test's own setting; restored below
    try:
        def forbidden(*args):
            raise AssertionError("atomic writes must not read or set the process umask (threads share it)")

        monkeypatch.setattr(os, "umask", forbidden)
        write_text(tmp_path / "a.txt", "hello")
        monkeypatch.undo()
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
        assert (tmp_path / "a.txt").read_text() == "hello"
        assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left
    finally:
        os.umask(old)

"""`ResumeStore.exclusive`: two real processes with the same training key, the second waits for the first.

The order is observed through a shared log file and the waiting message, never through timings: each process
appends "<name> in" when it holds the lock and "<name> out" just before it lets go, and holds it until the test
creates its release file.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUARD = 180.0  # a last guard against a hang: the tests wait for progress they can see, not for time

HOLDER = """
import sys, time
from pathlib import Path
from ddpm.pipeline.resume import ResumeStore
store, log, name, release = ResumeStore(Path(sys.argv[1])), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
with store.exclusive():
    with log.open("a") as f:
        f.write(name + " in\\n")
    while not release.exists():
        time.sleep(0.01)
    with log.open("a") as f:
        f.write(name + " out\\n")
"""


def _start(procs, tmp_path: Path, name: str, release: Path, store: str = "store") -> subprocess.Popen:
    """A process that takes the lock of the store tmp_path/<store>, its stderr in tmp_path/<name>.err."""
    args = [sys.executable, "-c", HOLDER, str(tmp_path / store), str(tmp_path / "log"), name, str(release)]
    with (tmp_path / f"{name}.err").open("w") as err:
        return procs.popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)  # cwd: this tree's ddpm


def _wait_for(proc: subprocess.Popen, path: Path, text: str) -> None:
    """Until `path` holds `text` (the process has got that far); fails if the process ends without writing it."""
    deadline = time.monotonic() + GUARD
    while True:
        ended = proc.poll() is not None  # read before the file: a process that wrote and then ended passes
        if path.exists() and text in path.read_text():
            return
        assert not ended, f"exited {proc.returncode} before writing {text!r} to {path}"
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.02)


def _lines(tmp_path: Path) -> list[str]:
    return (tmp_path / "log").read_text().splitlines()


def test_a_second_run_of_the_same_key_waits_until_the_first_releases(tmp_path, procs):
    first = _start(procs, tmp_path, "first", tmp_path / "release-first")
    _wait_for(first, tmp_path / "log", "first in")
    # other params are another key, another directory: that run does not wait
    (tmp_path / "release-other").touch()
    other = _start(procs, tmp_path, "other", tmp_path / "release-other", store="other-store")
    assert other.wait(timeout=GUARD) == 0 and "waiting" not in (tmp_path / "other.err").read_text()
    assert _lines(tmp_path) == ["first in", "other in", "other out"]
    (tmp_path / "release-second").touch()  # the second lets go as soon as it holds the lock
    second = _start(procs, tmp_path, "second", tmp_path / "release-second")
    _wait_for(second, tmp_path / "second.err", "waiting for another training of the same params")
    assert _lines(tmp_path)[3:] == []  # the second is blocked on the lock: it cannot have entered
    assert second.poll() is None
    (tmp_path / "release-first").touch()
    assert first.wait(timeout=GUARD) == 0 and second.wait(timeout=GUARD) == 0
    assert _lines(tmp_path)[3:] == ["first out", "second in", "second out"]
    assert "waiting" not in (tmp_path / "first.err").read_text()  # the first found the lock free


def test_the_lock_of_a_killed_holder_is_released_by_the_kernel(tmp_path, procs):
    holder = _start(procs, tmp_path, "holder", tmp_path / "never")
    _wait_for(holder, tmp_path / "log", "holder in")
    (tmp_path / "release-next").touch()
    waiter = _start(procs, tmp_path, "next", tmp_path / "release-next")
    _wait_for(waiter, tmp_path / "next.err", "waiting for another training of the same params")
    holder.send_signal(signal.SIGKILL)  # no cleanup runs: only the kernel can release the flock
    assert holder.wait(timeout=GUARD) == -signal.SIGKILL
    assert waiter.wait(timeout=GUARD) == 0
    assert _lines(tmp_path) == ["holder in", "next in", "next out"]

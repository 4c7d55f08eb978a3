"""The subprocesses a test starts: owned in their own process groups, and found again if any outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

_TOOLS = ("dvc", "mlflow")  # console scripts
_MODULES = ("ddpm", "dvc", "mlflow")  # `python -m NAME`; also `stages.*`, `ddpm.*`


class Processes:
    """Every subprocess a test starts, each leading its own process group (its `dvc`/`python -m stages.*`
    children included), so teardown can end the whole group, whether the test passed or failed."""

    def __init__(self, workdir: Path | None = None) -> None:
        self._procs: list[subprocess.Popen] = []
        self._workdir = workdir

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        """`subprocess.Popen` in a new session (process group), owned by this fixture."""
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, args: list[str], timeout: float, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
        """Like `subprocess.run(args, capture_output=True, text=True, timeout=...)`, but a time-out ends the
        whole process group (plain `subprocess.run` kills only the direct child) before raising."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = self.popen(args, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:  # the time-out, or the test run being stopped (KeyboardInterrupt)
            self.end(proc)
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    @staticmethod
    def end(proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left of it after `grace` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break  # nothing of the group is left
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(proc.pid):
                proc.poll()  # reap the leader, so it does not count as alive
                time.sleep(0.05)
            if not _group_alive(proc.pid):
                break
        proc.poll()

    def end_all(self) -> None:
        """End every owned process group, then any tool process still working under the test's directory
        (detached daemons such as `dvc queue start`'s workers leave the group and are re-parented to init)."""
        try:
            while self._procs:
                self.end(self._procs.pop())
        finally:
            if self._workdir is not None:
                end_processes(stray_processes(self._workdir, descendants=False))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def is_tool(cmdline: list[str]) -> bool:
    """Whether a command line runs this project or its tools: `python -m ddpm|dvc|mlflow|stages.*`, the
    `dvc`/`mlflow` scripts (run directly or by a Python interpreter) or DVC's own `dvc/__main__.py`."""
    for i, word in enumerate(cmdline[:3]):
        if os.path.basename(word) in _TOOLS or word.endswith(("/dvc/__main__.py", "/mlflow/__main__.py")):
            return True
        if word == "-m":
            module = cmdline[i + 1] if i + 1 < len(cmdline) else ""
            return module in _MODULES or module.startswith(("stages.", "ddpm."))
    return False


def stray_processes(under: Path | None, descendants: bool = True) -> list[psutil.Process]:
    """Live tool processes (see `is_tool`) that are descendants of this process (if `descendants`) or whose
    working directory is inside `under`."""
    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)} if descendants else {}
    if under is not None:
        root = Path(under).resolve()
        for p in psutil.process_iter(["cwd"]):
            cwd = p.info.get("cwd")
            if cwd and p.pid != me.pid and Path(cwd).is_relative_to(root):
                found[p.pid] = p
    out = []
    for p in found.values():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and is_tool(p.cmdline()):
                out.append(p)
        except psutil.Error:  # ended meanwhile, or not ours to read
            pass
    return out


def describe(processes: list[psutil.Process]) -> list[str]:
    """'pid <n>: <command line>' for each process (as far as it can still be read)."""
    lines = []
    for p in processes:
        try:
            lines.append(f"pid {p.pid}: {' '.join(p.cmdline())}")
        except psutil.Error:
            lines.append(f"pid {p.pid}: (ended)")
    return lines


def end_processes(processes: list[psutil.Process], grace: float = 10.0) -> None:
    """SIGTERM each process, then SIGKILL those still alive after `grace` seconds."""
    for p in processes:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)

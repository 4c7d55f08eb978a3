"""The test run itself, run for real in a child pytest with this conftest: it clears the user's tracking and DVC
variables, a test that leaves a tool process behind fails (so does the run, for a detached one), and stopping
the run with SIGINT or SIGTERM ends the processes its tests started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent

_ENV_AND_LEAKS = '''
import os
import subprocess
from pathlib import Path


def test_tracking_and_dvc_variables_are_cleared(tmp_path):
    from ddpm.tracking.store import store_root, tracking_uri

    assert not {"MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_ROOT", "DVC_EXP_NAME"} & set(os.environ)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert store_root(tmp_path) == tmp_path.resolve()


def _wait_exec(pid):
    """Until bash has exec'd into `dvc ...`: what the leak checks look for (a slow machine may not be there yet)."""
    import time

    import psutil

    deadline = time.monotonic() + 60  # a last guard
    while psutil.Process(pid).cmdline()[:1] != ["dvc"] and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_child_left_running(tmp_path):
    proc = subprocess.Popen(["bash", "-c", "exec -a dvc sleep 300"], start_new_session=True)
    _wait_exec(proc.pid)
    (Path(os.environ["MARKERS"]) / "child").write_text(str(proc.pid))


def test_a_detached_daemon_left_working_in_its_tmp_path(tmp_path):
    # like a `dvc queue start` worker: its parent exits, so init adopts it; only its cwd tells whose it is
    out = subprocess.run(["bash", "-c", "(exec -a dvc sleep 300 </dev/null >/dev/null 2>&1) & echo $!"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    _wait_exec(int(out.stdout))
    (Path(os.environ["MARKERS"]) / "daemon").write_text(out.stdout.strip())
'''

_LONG_CHILD = '''
import os
import time
from pathlib import Path


def test_waits_on_a_long_child(procs):
    proc = procs.popen(["sleep", "300"])
    marker = Path(os.environ["MARKERS"]) / "child"
    marker.with_suffix(".tmp").write_text(str(proc.pid))
    marker.with_suffix(".tmp").rename(marker)  # whole, once it exists
    time.sleep(300)
'''


def _child_run(tmp_path: Path, test_source: str) -> tuple[list[str], dict, Path]:
    """A directory holding this conftest and one scratch test file: the command and environment of a
    child pytest running it, and the folder where its tests leave their markers."""
    suite, markers = tmp_path / "suite", tmp_path / "markers"
    suite.mkdir()
    markers.mkdir()
    for name in ("conftest.py", "processes.py"):
        shutil.copy(HERE / name, suite / name)
    (suite / "test_scratch.py").write_text(test_source)
    outer = ("PYTEST_XDIST_", "PYTEST_CURRENT_TEST")  # this run's own (an xdist worker's), not the child's
    env = {k: v for k, v in os.environ.items() if not k.startswith(outer)}
    env |= {"MARKERS": str(markers), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
            "MLFLOW_RUN_ID": "0123", "DVC_ROOT": str(tmp_path / "users-repo"), "DVC_EXP_NAME": "users-exp"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--basetemp", str(tmp_path / "bt"),
           "--rootdir", str(suite), str(suite)]
    return cmd, env, markers


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# `make test` runs the suite under pytest-xdist (`-n auto`): a controller process and its workers
RUNNERS = pytest.mark.parametrize("runner", [[], ["-n", "2"]], ids=["serial", "xdist"])


@pytest.mark.slow
@RUNNERS
def test_cleared_variables_and_leaked_processes_fail_the_run_and_are_ended(procs, tmp_path, runner):
    cmd, env, markers = _child_run(tmp_path, _ENV_AND_LEAKS)
    out = procs.run([*cmd, *runner], timeout=300, env=env, cwd=tmp_path)
    report = out.stdout + out.stderr
    child, daemon = (int((markers / name).read_text()) for name in ("child", "daemon"))
    assert out.returncode == 1, report
    assert "3 passed, 1 error" in report, report  # the variables were cleared; the child leak is an error
    assert "ERROR at teardown of test_a_child_left_running" in report
    assert f"left processes running (now ended):\npid {child}: dvc 300" in report
    # the detached one is not a descendant: the session's check finds it by its cwd and fails the run
    assert "processes left behind" in report and f"pid {daemon}: dvc 300" in report
    deadline = time.monotonic() + 60  # a last guard: the processes are ended before the child pytest exits
    while not (_gone(child) and _gone(daemon)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child) and _gone(daemon)


@pytest.mark.slow
@RUNNERS
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_test_run_ends_the_processes_its_tests_started(procs, tmp_path, signum, runner):
    cmd, env, markers = _child_run(tmp_path, _LONG_CHILD)
    with open(tmp_path / "out.txt", "w") as log:
        # SIGINT as a terminal leaves it: this run may itself have been started with SIGINT ignored (a
        # background job of a script), which its child would inherit, and then no Ctrl-C could reach it
        run = procs.popen([*cmd, *runner], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                          preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.monotonic() + 300  # a last guard; normally the child starts within seconds
    while not (markers / "child").exists():
        assert run.poll() is None, (tmp_path / "out.txt").read_text()
        assert time.monotonic() < deadline, "the scratch test never started its child"
        time.sleep(0.1)
    child = int((markers / "child").read_text())
    assert not _gone(child)
    os.kill(run.pid, signum)  # the pytest process only, as a CI time-out or Ctrl-C in a terminal does
    assert run.wait(timeout=120) == pytest.ExitCode.INTERRUPTED, (tmp_path / "out.txt").read_text()
    assert _gone(child), f"pid {child} outlived the stopped test run"


def test_procs_ends_a_detached_tool_process_working_in_the_test_directory(tmp_path):
    """What `dvc queue start` leaves: workers in a session of their own, adopted by init, found by their cwd."""
    from processes import Processes

    owned = Processes(workdir=tmp_path)
    script = "echo $$ > daemon.tmp && mv daemon.tmp daemon.pid && exec -a dvc sleep 300 </dev/null >/dev/null 2>&1"
    assert owned.run(["setsid", "-f", "bash", "-c", script], timeout=60, cwd=tmp_path).returncode == 0
    deadline = time.monotonic() + 60  # a last guard: the pid file is written at once
    while not (tmp_path / "daemon.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon = int((tmp_path / "daemon.pid").read_text())
    assert os.getsid(daemon) == daemon and not _gone(daemon)  # its own session: no group of ours holds it
    owned.end_all()
    assert _gone(daemon)

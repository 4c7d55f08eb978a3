"""How a DVC stage script runs its workflow: params.yaml validated, the package's log records on stderr,
problems the user can fix (`UserError`) as one short line and exit 2 (a traceback only with `--debug`),
SIGINT/SIGTERM as exit 128 + signal number (training checkpoints first, a stage's MLflow run ends KILLED;
see `ddpm.tracking.signals`).

Kept apart from `ddpm.cli` (which imports every workflow for its subcommands), so that a stage imports
only its own workflow and dvc.yaml can list exactly the code each stage runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from ddpm.config import Config, load_config
from ddpm.errors import Interrupted, UserError
from ddpm.tracking.signals import StopSignals


def repo_root() -> Path:
    """Where this stage runs: the current directory, which holds params.yaml and the stage's files.

    Not `DVC_ROOT`: `dvc exp run --temp/--queue` runs each experiment in a copy under `.dvc/tmp/exps/`
    (the current directory, with the experiment's params.yaml) and points `DVC_ROOT` at the parent
    repository. Only the shared stores (MLflow, TensorBoard, `.resume/`) live there, see
    `ddpm.tracking.store.store_root`.
    """
    return Path.cwd().resolve()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (as `print(..., file=sys.stderr)` did)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Format(logging.Formatter):
    """`warning: ...` for warnings and errors, the bare message for information."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def configure_logging() -> None:
    """The package's log records (warnings, resume notices) go to stderr; set once per process."""
    logger = logging.getLogger("ddpm")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Format("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def guarded(fn: Callable[[], object], debug: bool) -> int:
    """Run `fn`, turning user errors and interruptions (SIGINT/SIGTERM from now on) into exit codes."""
    try:
        with StopSignals("run the command again"):
            fn()
        return 0
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 128 + err.signum


def run_stage(work: Callable[[Config, Path], object], argv: list[str] | None = None) -> None:
    """Entry point of a DVC stage script: validate params.yaml, run one workflow, exit with its status."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    root = repo_root()
    configure_logging()

    def go():
        cfg = load_config(root / args.params if not Path(args.params).is_absolute() else args.params)
        work(cfg, root)

    exit_process(guarded(go, args.debug))


def exit_process(code: int) -> NoReturn:
    """End the process with `code`. An interrupted command (128 + signal) skips the interpreter's teardown:
    its run is closed and its outputs written or untouched already, and garbage-collecting torch's and
    MLflow's objects at exit took 6 s on a loaded machine, most of the promised stop within seconds."""
    if code > 128:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

"""The train stage's own workers: `train.nproc_per_node` x `train.nnodes` processes through PyTorch's elastic
launcher (the machinery behind `torchrun`), so `dvc repro`, `dvc exp run` and queued experiments use every GPU.

`train_stage` decides:
- one process (`nproc_per_node` 1 and `nnodes` 1), or already a worker of a launcher (`RANK` set, e.g. a
  hand-started `torchrun`): `train()` in this process, nothing else (the quickstart is untouched);
- else this process becomes the node's elastic agent: a c10d rendezvous (single node: 127.0.0.1 on a free
  port, no setup), one spawned worker per local rank (NCCL on GPUs, gloo on the CPU) and no restarts.

What the stage reports:
- a worker that fails ends the job: elastic tears the others down, and the stage's one-line error names the
  first failing rank and its exception text (elastic's error file, written by `record`) or its signal;
- SIGINT/SIGTERM to the stage reach every worker (elastic forwards them); the workers agree on the step,
  checkpoint, and the stage exits 128 + signal like a one-process stage. Running it again resumes.

The core knows nothing of this module; training only reads the `RANK`/`WORLD_SIZE`/... the launcher sets.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ErrorHandler, record

from ddpm.config import Config
from ddpm.errors import Interrupted, UserError
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.train import train

log = logging.getLogger(__name__)
RESUME_HINT = "checkpoint saved, run again to resume"


def needs_launcher(cfg: Config) -> bool:
    """Whether the stage starts workers: more than one process asked for, and not a launcher's worker itself."""
    return "RANK" not in os.environ and cfg.train.nproc_per_node * cfg.train.nnodes > 1


def train_stage(cfg: Config, root: Path) -> dict:
    """The train stage: `train()` here, or through the elastic launcher's workers (see the module docstring)."""
    if not needs_launcher(cfg):
        return train(cfg, Layout.under(root))
    return launch(cfg, root)


def free_port() -> int:
    """A TCP port on 127.0.0.1 free now (the OS's choice): a single node's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def launch_config(cfg: Config, log_dir: str):
    """elastic's LaunchConfig for `cfg.train`: c10d rendezvous, no restarts (a failed run resumes when rerun)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    tc = cfg.train
    endpoint = tc.rdzv_endpoint or f"127.0.0.1:{free_port()}"
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    return LaunchConfig(
        min_nodes=tc.nnodes, max_nodes=tc.nnodes, nproc_per_node=tc.nproc_per_node,
        run_id=tc.rdzv_id, rdzv_backend="c10d", rdzv_endpoint=endpoint,
        # a rendezvous on this machine: every node is here, so no FQDN lookup (which may not resolve offline)
        local_addr="127.0.0.1" if _is_loopback(host) else None,
        max_restarts=0,  # elastic restarts would begin from the last checkpoint in a new rendezvous round;
        # the stage fails instead, and `dvc repro` resumes, so a failure is seen
        monitor_interval=0.1, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),  # the workers' error files, removed afterwards
        shutdown_timeout=20,  # SIGTERM, then SIGKILL for a worker that does not stop (stuck in NCCL)
    )


def _check_world(cfg: Config) -> None:
    """The global batch must split over every worker and micro-batch: said before any worker starts."""
    tc = cfg.train
    per_step = tc.grad_accum * tc.nproc_per_node * tc.nnodes
    if tc.batch_size % per_step:
        raise UserError(
            f"train.batch_size={tc.batch_size} is not divisible by train.grad_accum x nproc_per_node x nnodes = "
            f"{per_step}; choose a global batch that splits evenly (README *Multi-GPU*)"
        )


def launch(cfg: Config, root: Path) -> dict:
    """Run training on `nproc_per_node` workers of this node (joining `nnodes` nodes); rank 0's metrics or {}."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.launcher.api import elastic_launch

    _check_world(cfg)
    tc = cfg.train
    log.info("training on %d worker(s) x %d node(s) (train.nproc_per_node, train.nnodes)", tc.nproc_per_node,
             tc.nnodes)
    with tempfile.TemporaryDirectory(prefix="ddpm-launch-") as log_dir:
        try:
            results = elastic_launch(launch_config(cfg, log_dir), worker)(cfg, str(root))
        except ChildFailedError as err:
            raise _worker_error(err) from None
        except SignalException as err:  # elastic's handler: the workers got the signal and stopped
            raise Interrupted(int(err.sigval), RESUME_HINT) from None
    if 0 not in results:
        log.warning("global rank 0 ran on another node: the stage outputs (models/ema.pt, metrics, plots) are "
                    "there, not here")
    return results.get(0) or {}


def _worker_error(err: ChildFailedError) -> BaseException:
    """The stage's error for a failed worker: the first failing rank and its exception text (or signal)."""
    # the root cause first: a worker killed by a signal (its peers then fail on the broken connection), then
    # the earliest (elastic's timestamps are whole seconds)
    rank, failure = min(err.failures.items(), key=lambda item: (item[1].exitcode >= 0, item[1].timestamp, item[0]))
    message = failure.message
    if isinstance(message, dict):  # an error file written by `record`: {"message": "Type: text", ...}
        message = message.get("message", "")
    if failure.exitcode > 128 and not failure.error_file_data.get("message"):
        return Interrupted(failure.exitcode - 128, RESUME_HINT)  # a worker stopped by a signal (checkpointed)
    text = str(message).removeprefix("UserError: ").strip().splitlines()[0] if message else ""
    return UserError(f"training worker rank {rank} failed (exit code {failure.exitcode}): {text}; "
                     "fix it and run the stage again: it resumes from the last checkpoint")


def _threads_per_worker() -> None:
    """CPU workers share the cores (torchrun sets OMP_NUM_THREADS=1; this keeps a user's setting)."""
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


@record
def worker(cfg: Config, root: str) -> dict:
    """One spawned worker: `train()` under the stage's signal handling; returns its metrics (rank 0's only).

    A `UserError` is recorded for the launcher (one line, no traceback) and exits 2; SIGINT/SIGTERM exit
    128 + signal after the checkpoint; anything else propagates to `record` with its traceback.
    """
    from ddpm.pipeline.entry import configure_logging
    from ddpm.tracking.signals import StopSignals

    configure_logging()
    _threads_per_worker()
    try:
        with StopSignals(RESUME_HINT):
            return train(cfg, Layout.under(Path(root)))
    except UserError as err:
        ErrorHandler().record_exception(err)  # the launcher's ChildFailedError carries its text
        _exit(err.exit_code)
    except Interrupted as err:
        _exit(128 + err.signum)


def _exit(code: int) -> None:
    """End the worker now: its run and checkpoint are written; torch's teardown only costs seconds."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

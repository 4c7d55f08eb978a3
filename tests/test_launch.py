"""The train stage starts its own workers (`train.nproc_per_node`, `train.nnodes`: PyTorch's elastic launcher),
for real: `dvc repro` in temporary git + DVC repositories, gloo workers on the CPU, tiny model."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import tiny_params
from dvc_repos import copy_repo, tool_env
from dvc_repos import run_ok as _run

from ddpm.config import Config
from ddpm.core.checkpoint import load_checkpoint
from ddpm.data.datasets import prepare
from ddpm.errors import UserError
from ddpm.pipeline.launch import _worker_error, free_port, needs_launcher
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.train import train

DVC = [sys.executable, "-m", "dvc"]
LOSSES = ["loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm"]


def _set_train(repo: Path, **train) -> None:
    """Edit the repo's params.yaml `train` section (what a user does, or `dvc exp run -S`)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(train)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _losses(root: Path) -> list[dict[str, float]]:
    with open(root / "plots/train_loss.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [{k: float(row[k]) for k in ("step", *LOSSES) if row.get(k)} for row in rows]


def _assert_same_history(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):  # float tolerance: the all-reduce sums in another order
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7) for k in a), (a, b)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """`steps -> (loss history, EMA weights)` of one process with the same global batch (in-process, cached)."""
    cache: dict[int, tuple] = {}

    def run(steps: int) -> tuple[list[dict], dict]:
        if steps not in cache:
            root = tmp_path_factory.mktemp(f"one-process-{steps}")
            cfg = Config.from_dict(tiny_params(train={"steps": steps}, tracking={"mlflow": False,
                                                                                  "tensorboard": False}))
            prepare(cfg, root / "data/prepared")
            train(cfg, Layout.under(root))
            cache[steps] = (_losses(root), load_checkpoint(root / "models/ema.pt")["ema"]["weights"])
        return cache[steps]

    return run


def _assert_same_weights(root: Path, want: dict) -> None:
    got = load_checkpoint(root / "models/ema.pt")["ema"]["weights"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def _trained_like_one_process(repo: Path, one: tuple[list[dict], dict]) -> list:
    """The repo's loss history and EMA weights are one process's (`one`), in exactly one FINISHED MLflow run."""
    want_losses, want_weights = one
    _assert_same_history(_losses(repo), want_losses)
    _assert_same_weights(repo, want_weights)
    runs = _mlflow_runs(repo)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    return runs


def _mlflow_runs(repo: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("cmp").experiment_id])


def test_one_process_and_a_torchrun_worker_never_launch(monkeypatch):
    """nproc_per_node 1 x nnodes 1 keeps today's single process (the quickstart); a process torchrun started
    (RANK set) trains as that rank instead of starting workers of its own (no workers of workers)."""
    assert not needs_launcher(Config.from_dict(tiny_params()))
    two = Config.from_dict(tiny_params(train={"nproc_per_node": 2}))
    monkeypatch.delenv("RANK", raising=False)
    assert needs_launcher(two)
    monkeypatch.setenv("RANK", "0")
    assert not needs_launcher(two)


@pytest.mark.slow
def test_two_cpu_workers_through_dvc_repro_train_like_one_process(dvc_repo_with_data: Path, procs, one_process):
    """Catches: workers that do not split the global batch (other losses), a loss logged from rank 0's shard
    only, ranks drawing other noise/timesteps, and a second MLflow run opened by rank 1."""
    repo = dvc_repo_with_data
    _set_train(repo, nproc_per_node=2)
    out = _run(procs, [*DVC, "repro", "train"], repo)
    assert "training on 2 worker(s)" in out.stderr
    runs = _trained_like_one_process(repo, one_process(6))
    assert runs[0].data.tags["ddpm.train.world_size"] == "2" and runs[0].data.params["train.nproc_per_node"] == "2"
    assert len(list((repo / ".resume").iterdir())) == 1


def _workers(leader: psutil.Process, count: int, timeout: float = 300) -> tuple[psutil.Process, list[psutil.Process]]:
    """The stage process (the elastic agent) under `leader` and its `count` spawned workers, in start order."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in leader.children(recursive=True):
            try:
                if "stages.train" in " ".join(proc.cmdline()):
                    workers = [c for c in proc.children() if "spawn_main" in " ".join(c.cmdline())]
                    if len(workers) == count:
                        return proc, sorted(workers, key=lambda c: (c.create_time(), c.pid))
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.05)
    raise AssertionError("the train stage's workers did not start")


def _newest_checkpoint(repo: Path) -> float:
    return max((p.stat().st_mtime_ns for p in (repo / ".resume").glob("*/last.pt")), default=0)


def _wait_for_checkpoint(repo: Path, after: float, timeout: float = 300) -> None:
    """Until a checkpoint newer than `after` (this run's first) is written."""
    deadline = time.monotonic() + timeout
    while _newest_checkpoint(repo) <= after:
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)


def _stopped(procs, repo: Path, stop) -> tuple[str, float]:
    """Start `dvc repro train`, call `stop(agent, workers)` at the first checkpoint; (stderr, seconds to fail)."""
    before = _newest_checkpoint(repo)
    dvc = procs.popen([*DVC, "repro", "train"], cwd=repo, env=tool_env(), stderr=subprocess.PIPE,
                      text=True)
    agent, workers = _workers(psutil.Process(dvc.pid), 2)
    _wait_for_checkpoint(repo, before)
    t0 = time.monotonic()
    stop(agent, workers)
    _, err = dvc.communicate(timeout=120)
    took = time.monotonic() - t0
    assert dvc.returncode != 0, f"the stage finished before it was stopped:\n{err[-2000:]}"
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), "a worker outlived it"
    return err, took


@pytest.mark.slow
def test_sigterm_and_a_killed_worker_stop_the_stage_and_reruns_resume(dvc_repo_with_data: Path, procs, one_process):
    """SIGTERM to the stage: every worker checkpoints at the same step and the stage exits 143 within seconds,
    its MLflow run KILLED. A SIGKILLed worker: the stage fails within a minute (no hang on the dead peer), its
    one-line error naming that worker. Each rerun resumes, to the loss history and weights of one uninterrupted
    process. Catches ranks that stop at different steps (a hang), a launcher that waits for elastic's restarts
    or time-outs, a checkpoint that loses another rank's statistics, and a stage that does not resume."""
    repo = dvc_repo_with_data
    _set_train(repo, nproc_per_node=2, steps=16, checkpoint_every=2, sample_every=0)

    err, took = _stopped(procs, repo, lambda agent, workers: agent.send_signal(signal.SIGTERM))
    assert "stopped: interrupted by SIGTERM; checkpoint saved, run again to resume" in err, err[-2000:]
    assert took < 30, f"SIGTERM took {took:.1f} s to stop the stage"
    assert [r.info.status for r in _mlflow_runs(repo)] == ["KILLED"]

    victim: list[int] = []

    def kill_rank_1(agent, workers):
        victim.append(workers[1].pid)
        workers[1].send_signal(signal.SIGKILL)

    err, took = _stopped(procs, repo, kill_rank_1)
    assert "resuming from" in err
    assert "training worker rank 1 failed" in err and f"PID {victim[0]}" in err and "SIGKILL" in err, err[-2000:]
    assert took < 60, f"a killed worker took {took:.1f} s to fail the stage"

    out = _run(procs, [*DVC, "repro", "train"], repo)
    assert "resuming from" in out.stderr
    _trained_like_one_process(repo, one_process(16))  # in the same run, continued twice


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_like_one_process(dvc_repo_with_data: Path, tmp_path: Path, procs,
                                                         one_process):
    """Two launchers (the stage on two "nodes", one worker each) meet in a c10d rendezvous on 127.0.0.1:
    the node whose worker got rank 0 writes the outputs, the other says they are elsewhere. Catches a
    multi-node config that does not rendezvous, and ranks that are not one job (other losses)."""
    nodes = [dvc_repo_with_data, copy_repo(dvc_repo_with_data, tmp_path / "node1")]
    endpoint = f"127.0.0.1:{free_port()}"
    for node in nodes:
        _set_train(node, nnodes=2, rdzv_endpoint=endpoint)
    started = [procs.popen([sys.executable, "-m", "stages.train"], cwd=node, env=tool_env(),
                           stderr=subprocess.PIPE, text=True) for node in nodes]
    errs = [p.communicate(timeout=600)[1] for p in started]
    assert [p.returncode for p in started] == [0, 0], [e[-2000:] for e in errs]
    head = [n for n in nodes if (n / "models/ema.pt").exists()]
    assert len(head) == 1, "exactly one node (rank 0's) writes the stage outputs"
    other = nodes[1 - nodes.index(head[0])]
    assert "global rank 0 ran on another node" in errs[nodes.index(other)]
    want_losses, want_weights = one_process(6)
    _assert_same_history(_losses(head[0]), want_losses)
    _assert_same_weights(head[0], want_weights)


def test_the_stage_error_names_the_root_cause_rank_and_its_exception_text(tmp_path):
    """elastic's ChildFailedError -> the stage's one line: the rank killed by a signal before a peer that failed on
    the broken connection, else the recorded exception's text (UserError prefix dropped). Catches the generic
    'ChildFailedError' text (or a traceback) reaching the user instead of the worker's own message."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def recorded(rank: int, text: str) -> ProcessFailure:
        path = tmp_path / f"error-{rank}.json"
        path.write_text(json.dumps({"message": {"message": text, "extraInfo": {"py_callstack": "...",
                                                                               "timestamp": "1"}}}))
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=1 if rank else 2, error_file=str(path))

    only = _worker_error(ChildFailedError("worker", {0: recorded(0, "UserError: train.lr is too large; lower it")}))
    assert isinstance(only, UserError)
    assert str(only).startswith("training worker rank 0 failed (exit code 2): train.lr is too large; lower it;")
    killed = ProcessFailure(local_rank=1, pid=4242, exitcode=-9, error_file=str(tmp_path / "none.json"))
    both = _worker_error(ChildFailedError("worker", {0: recorded(0, "RuntimeError: [gloo] Connection closed"),
                                                     1: killed}))
    assert "training worker rank 1 failed" in str(both) and "SIGKILL" in str(both) and "PID 4242" in str(both)

"""How every stage ends its MLflow run: FINISHED on success, FAILED on an exception mid-stage, KILLED on
SIGTERM (tests/test_signals.py); and a training SIGKILLed before its first checkpoint leaves no orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_params
from processes import Processes

import ddpm.pipeline.evaluate as evaluate_mod
import ddpm.pipeline.sample as sample_mod
import ddpm.pipeline.train as train_mod
from ddpm.config import Config
from ddpm.pipeline.evaluate import evaluate_stage
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.sample import sample_stage
from ddpm.pipeline.train import train
from ddpm.tracking.files import read_run_id

TRACKING = {"experiment": "life", "log_every": 1, "system_metrics": False, "tensorboard": True}


def _params(**overrides) -> dict:
    return tiny_params(tracking=TRACKING, **overrides)


def _client(repo: Path):
    """The store's client as the stages open it (their lock, their retries): the test polls the store while a
    stage creates it, and a plain MlflowClient racing that creation can lose ("table ... already exists")."""
    from ddpm.tracking.store import open_store

    return open_store(f"sqlite:///{repo}/mlflow.db", None)[0]


def _runs(repo: Path) -> list:
    client = _client(repo)
    exp = client.get_experiment_by_name("life")
    return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.fixture
def pipeline(tmp_path: Path, monkeypatch, data_stages) -> tuple[Path, Config]:
    """A repo holding the outputs of prepare, classifier and fid_stats (the session's, copied); the cwd, with
    params.yaml written."""
    monkeypatch.chdir(tmp_path)
    cfg = Config.from_dict(_params())
    data_stages(tmp_path, cfg)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return tmp_path, cfg


def _boom(*args, **kwargs):
    raise RuntimeError("boom mid-stage")


def test_each_stage_finishes_its_run_and_a_crash_mid_stage_marks_it_failed(pipeline, monkeypatch):
    repo, cfg = pipeline
    paths = Layout.under(repo)
    client = _client(repo)

    # train: FAILED when a step raises, and the next start continues that same run to FINISHED
    real_step = train_mod.train_step
    calls = {"n": 0}

    def fail_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom mid-stage")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", fail_at_step_3)
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, paths)
    (failed,) = _runs(repo)
    assert failed.info.status == "FAILED"
    monkeypatch.setattr(train_mod, "train_step", real_step)
    train(cfg, paths)
    run_id = read_run_id(paths.train_run)
    assert run_id == failed.info.run_id and client.get_run(run_id).info.status == "FINISHED"

    # sample: the run is open while sampling, so a crash there marks it FAILED; a clean rerun FINISHED
    real_set = sample_mod.evaluation_set
    monkeypatch.setattr(sample_mod, "evaluation_set", _boom)
    with pytest.raises(RuntimeError, match="boom"):
        sample_stage(cfg, paths)
    assert client.get_run(run_id).info.status == "FAILED"
    monkeypatch.setattr(sample_mod, "evaluation_set", real_set)
    sample_stage(cfg, paths)
    assert read_run_id(paths.sample_run) == run_id and client.get_run(run_id).info.status == "FINISHED"

    # evaluate: likewise while scoring
    real_metrics = evaluate_mod.offline_metrics
    monkeypatch.setattr(evaluate_mod, "offline_metrics", _boom)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_stage(cfg, paths)
    assert client.get_run(run_id).info.status == "FAILED"
    monkeypatch.setattr(evaluate_mod, "offline_metrics", real_metrics)
    evaluate_stage(cfg, paths)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "eval/class_accuracy" in run.data.metrics
    assert [r.info.run_id for r in _runs(repo)] == [run_id]  # one pipeline run throughout


# --------------------------------------------------------------------------------- real subprocesses


def _env() -> dict:
    env = dict(os.environ)
    for var in ("DVC_ROOT", "MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        env.pop(var, None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(repo: Path, command: str, procs: Processes | None = None) -> subprocess.Popen:
    """`python -m ddpm COMMAND` in `repo`, owned by `procs` (whose teardown ends its process group). Without
    it, conftest's per-test check still ends a process that outlives the test, and fails that test."""
    popen = procs.popen if procs is not None else subprocess.Popen
    return popen([sys.executable, "-m", "ddpm", command], cwd=repo, env=_env(), stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE, text=True)


def _wait_running(repo: Path, proc: subprocess.Popen, metric: str | None = None, timeout: float = 180.0):
    """The RUNNING run (with at least one `metric` row, if given) once the subprocess has opened it."""
    client = _client(repo)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the process ended before it could be stopped: {proc.stderr.read()}"
        running = [r for r in _runs(repo) if r.info.status == "RUNNING"]
        if running and (metric is None or client.get_metric_history(running[0].info.run_id, metric)):
            return running[0]
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("no RUNNING MLflow run appeared")


def _write(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(Config.from_dict(params).to_dict(), sort_keys=False))


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_is_continued_in_the_same_run(pipeline, procs):
    """The issue's orphan: SIGKILL before `.resume` holds a checkpoint. The next start with the same params
    continues the same MLflow run and TensorBoard directory, and no run stays RUNNING."""
    repo, _ = pipeline
    params = _params(train={**tiny_params()["train"], "steps": 40, "checkpoint_every": 1000, "sample_every": 0})
    _write(repo, params)
    proc = _start(repo, "train", procs)
    orphan = _wait_running(repo, proc, metric="train/loss")  # training is under way
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    (key,) = list((repo / ".resume").iterdir())
    assert not (key / "last.pt").exists()  # killed before its first checkpoint
    assert _client(repo).get_run(orphan.info.run_id).info.status == "RUNNING"  # until the next start

    rerun = procs.run([sys.executable, "-m", "ddpm", "train"], timeout=600, cwd=repo, env=_env())
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    runs = _runs(repo)
    assert [r.info.run_id for r in runs] == [orphan.info.run_id]  # the same run, no new one
    assert runs[0].info.status == "FINISHED"
    assert [p.name for p in (repo / "logs/tensorboard").iterdir()] == [orphan.data.tags["ddpm.tensorboard_dir"]]
    steps = {m.step for m in _client(repo).get_metric_history(orphan.info.run_id, "train/loss")}
    assert steps == set(range(1, 41))
    assert read_run_id(Layout.under(repo).train_run) == orphan.info.run_id

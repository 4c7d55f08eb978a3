"""What dvc.lock records is what made the model, with real DVC in a temporary git repository: an edit of the
training code retrains from step 0 (after a finished run, and after one SIGKILLed mid-training), and a
tracking param that cannot change train's outputs leaves the stage up to date."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_pipeline import _env, _run, dvc_repo  # noqa: F401 - dvc_repo is a fixture

from ddpm.core.checkpoint import load_checkpoint

DVC = [sys.executable, "-m", "dvc"]
WARMUP = "min(1.0, (step + 1) / warmup)"
EDITED_WARMUP = "min(1.0, (step + 1) / (2 * warmup))"  # warm up over twice the steps


def _edit_warmup(repo: Path) -> None:
    """Change the learning-rate warm-up in the repository's copy of the training workflow (uncommitted)."""
    path = repo / "ddpm" / "pipeline" / "train.py"
    text = path.read_text()
    assert text.count(WARMUP) == 1, "the warm-up formula moved: update this test"
    path.write_text(text.replace(WARMUP, EDITED_WARMUP))


def _set_params(repo: Path, **sections) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for name, values in sections.items():
        params[name].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _ema_weights(repo: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(repo / "models" / "ema.pt")["ema"]["weights"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run_id(repo: Path) -> str:
    return json.loads((repo / "models" / "run.json").read_text())["mlflow_run_id"]


def _loss_steps(repo: Path, run_id: str) -> list[int]:
    """The steps at which the MLflow run logged train/loss: the steps this run actually trained."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def _retrained_from_zero(stderr: str) -> bool:
    return ("training code changed since the checkpoint in" in stderr and "training from step 0" in stderr
            and "resuming from" not in stderr)


@pytest.mark.slow
def test_a_training_code_edit_retrains_from_step_0_and_log_every_leaves_train_up_to_date(dvc_repo_trained: Path,
                                                                                         procs):
    import mlflow

    repo = dvc_repo_trained  # after `dvc repro` with the tiny params: 6 steps, train/loss logged every 2
    first_weights, first_run = _ema_weights(repo), _run_id(repo)
    assert _loss_steps(repo, first_run) == [2, 4, 6]

    # (d) tracking.log_every cannot change train's outputs: the stage stays up to date
    _set_params(repo, tracking={"log_every": 3})
    status = _run(procs, [*DVC, "status", "train"], repo).stdout
    assert "up to date" in status, status
    repro = _run(procs, [*DVC, "repro", "train"], repo)
    assert "Running stage 'train'" not in repro.stdout, repro.stdout

    # (a) the learning-rate warm-up edited: DVC re-runs train, which must not resume the finished checkpoint
    _edit_warmup(repo)
    repro = _run(procs, [*DVC, "repro", "train"], repo)
    assert "Running stage 'train'" in repro.stdout
    assert _retrained_from_zero(repro.stderr), repro.stderr[-2000:]
    second_run = _run_id(repo)
    assert second_run != first_run and _loss_steps(repo, second_run) == [3, 6]  # all 6 steps, logged every 3
    assert not _same(_ema_weights(repo), first_weights)  # the new code's model, not the old one
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]
    assert "tracking" not in lock["params"]["params.yaml"] and "tracking.mlflow" in lock["params"]["params.yaml"]

    # which code made it: fingerprint and git state in the metrics, run info and the MLflow run
    code = json.loads((repo / "metrics" / "train.json").read_text())["code"]
    assert code == json.loads((repo / "models" / "run.json").read_text())["code"]
    head = _run(procs, ["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert code["git_commit"] == head and code["git_dirty"] is True  # the edit is not committed
    assert load_checkpoint(repo / "models" / "ema.pt")["code"] == {"fingerprint": code["fingerprint"]}
    tags = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db").get_run(second_run).data.tags
    assert tags["ddpm.train.code_fingerprint"] == code["fingerprint"]
    assert (tags["ddpm.train.git_commit"], tags["ddpm.train.git_dirty"]) == (head, "true")


@pytest.mark.slow
def test_a_run_sigkilled_mid_training_then_a_code_edit_retrains_from_step_0(dvc_repo: Path, procs):  # noqa: F811
    repo = dvc_repo
    _set_params(repo, train={"steps": 40, "checkpoint_every": 5, "sample_every": 0})
    _run(procs, [*DVC, "repro", "prepare"], repo)
    proc = procs.popen([*DVC, "repro", "train"], cwd=repo, env=_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list((repo / ".resume").glob("*/previous.pt")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no second checkpoint within 10 minutes"
        time.sleep(0.05)  # two checkpoints exist: mid-run
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and its stage, without a chance to clean up
    proc.wait(timeout=60)
    assert not (repo / "models" / "ema.pt").exists(), "the run finished before it could be killed"
    (killed_dir,) = (repo / ".resume").iterdir()
    killed_run = json.loads((killed_dir / "run.json").read_text())["mlflow_run_id"]

    _edit_warmup(repo)
    repro = _run(procs, [*DVC, "repro", "train"], repo)
    assert _retrained_from_zero(repro.stderr), repro.stderr[-2000:]
    assert str(killed_dir) in repro.stderr  # the one line names the checkpoint it does not resume
    new_run = _run_id(repo)
    assert new_run != killed_run and _loss_steps(repo, new_run) == list(range(2, 41, 2))  # every step, in it

"""DVC experiment queues and temp runs, for real: `dvc exp run --queue` + `dvc queue start -j 2` and
`dvc exp run --temp` run each experiment in a copy under `.dvc/tmp/exps/` (the stage's cwd) while the shared
stores (mlflow.db, mlartifacts/, logs/, .resume/) live in the parent repository (`DVC_ROOT`)."""

from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import time
from pathlib import Path

import pytest
from dvc_repos import DVC
from dvc_repos import run_ok as _run
from dvc_repos import tool_env as _env
from processes import Processes

SHARED = {".git", ".dvc", "mlflow.db", "mlflow.db-init.lock", "mlartifacts", "logs", ".resume"}


def _workspace(repo: Path) -> dict[str, tuple[int, str]]:
    """Every workspace file outside git, DVC's own folder and the shared stores: mtime and content hash.

    params.yaml's mtime is left out: `dvc exp run --queue -S ...` itself writes the overrides into the
    workspace's params.yaml to queue them and then restores its content.
    """
    out = {}
    for p in repo.rglob("*"):
        rel = p.relative_to(repo)
        if p.is_file() and rel.parts[0] not in SHARED:
            mtime = 0 if str(rel) == "params.yaml" else p.stat().st_mtime_ns
            out[str(rel)] = (mtime, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _assert_unchanged(before: tuple, after: tuple) -> None:
    assert after[:2] == before[:2]  # git status, dvc status
    changed = {k for k in before[2].keys() | after[2].keys() if before[2].get(k) != after[2].get(k)}
    assert not changed, f"workspace files changed: {sorted(changed)}"


def _state(procs: Processes, repo: Path) -> tuple[str, str, dict]:
    """What must not change: `git status`, `dvc status` and the workspace files."""
    git = _run(procs, ["git", "status", "--porcelain"], repo).stdout
    dvc = _run(procs, [*DVC, "status"], repo).stdout
    return git, dvc, _workspace(repo)


def _queue_env() -> dict:
    env = _env()
    env["OMP_NUM_THREADS"] = "1"  # two workers share the cores; oversubscribed threads only slow both down
    return env


def _wait_for_queue(procs: Processes, repo: Path, timeout: float = 900.0) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return the last status table."""
    deadline = time.monotonic() + timeout
    while True:
        status = procs.run([*DVC, "queue", "status"], timeout=120, cwd=repo, env=_env()).stdout
        rows = [line for line in status.splitlines()[1:] if line.strip() and not line.startswith("Worker")]
        if rows and not any(s in line for line in rows for s in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"the queue did not finish:\n{status}"
        time.sleep(3)


def _exp_table(procs: Processes, repo: Path) -> dict[str, dict[str, str]]:
    """`dvc exp show --csv` as {experiment name: {column: value}} (named experiments only)."""
    text = _run(procs, [*DVC, "exp", "show", "--csv"], repo).stdout
    return {row["Experiment"]: row for row in csv.DictReader(io.StringIO(text)) if row["Experiment"]}


@pytest.mark.slow
def test_queued_experiments_run_concurrently_and_a_temp_run_leaves_the_workspace_alone(dvc_repo_with_data: Path,
                                                                                       procs):
    import mlflow

    repo = dvc_repo_with_data  # prepare, classifier and fid_stats ran (for real, in DVC) once per session
    before = _state(procs, repo)
    _run(procs, [*DVC, "exp", "run", "--queue", "--name", "q-cosine", "-S", "schedule=cosine"], repo)
    _run(procs, [*DVC, "exp", "run", "--queue", "--name", "q-linear", "-S", "schedule=linear",
          "-S", "sample.guidance_scale=2.0"], repo)
    try:
        # the detached workers inherit the output streams: a file, not a pipe we would wait on forever
        with open(repo.parent / "queue-start.log", "w") as log:
            started = procs.run([*DVC, "queue", "start", "-j", "2"], timeout=120, cwd=repo, env=_queue_env(),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        assert started.returncode == 0, (repo.parent / "queue-start.log").read_text()
        status = _wait_for_queue(procs, repo)
    finally:  # never leave workers behind, even when the test fails (`procs` then ends any still in repo/)
        procs.run([*DVC, "queue", "stop", "--kill"], timeout=120, cwd=repo, env=_env())
    assert status.count("Success") == 2, status + _run(procs, [*DVC, "queue", "logs", "q-cosine"], repo).stdout

    # DVC recorded each experiment with its own params and its own (different) metrics
    table = _exp_table(procs, repo)
    assert table["q-cosine"]["schedule"] == "cosine" and table["q-linear"]["schedule"] == "linear"
    assert table["q-linear"]["sample.guidance_scale"] == "2.0"
    assert table["q-cosine"]["loss"] != table["q-linear"]["loss"]
    assert table["q-cosine"]["fd_classifier_20"] != table["q-linear"]["fd_classifier_20"]

    # one MLflow run per experiment in the parent's store, with that experiment's params
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("cmp").experiment_id])}
    assert set(runs) == {"q-cosine", "q-linear"}
    assert runs["q-cosine"].data.params["schedule"] == "cosine"
    assert runs["q-linear"].data.params["sample.guidance_scale"] == "2.0"
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["dvc.exp_name"] == name
        # no lost rows under concurrent SQLite writes: steps 2, 4, 6 (train.steps 6, tracking.log_every 2)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6]
        assert float(table[name]["fd_classifier_20"]) == pytest.approx(run.data.metrics["eval/fd_classifier_20"])
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"grid.png", "progression.png"}
        assert len(client.get_run(run.info.run_id).outputs.model_outputs) == 1  # the EMA network, an MLflow model
        assert (repo / "logs/tensorboard" / name).is_dir()  # TensorBoard under the parent's logs/
    a, b = runs["q-cosine"].info, runs["q-linear"].info
    assert a.start_time < b.end_time and b.start_time < a.end_time  # the two ran at the same time
    assert len(list((repo / ".resume").iterdir())) == 2  # resume state per experiment, in the parent
    _assert_unchanged(before, _state(procs, repo))  # the user's workspace: untouched

    # --temp: a sampling-only experiment on the linear training (same training params: the finished
    # resume state is reused, no retraining), in a child run of that training run
    _run(procs, [*DVC, "exp", "run", "--temp", "--name", "t-guided", "-S", "sample.guidance_scale=3.0"], repo)
    table = _exp_table(procs, repo)
    assert table["t-guided"]["sample.guidance_scale"] == "3.0"
    assert table["t-guided"]["loss"] == table["q-linear"]["loss"]  # the same training
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("cmp").experiment_id])}
    assert set(runs) == {"q-cosine", "q-linear", "t-guided"}
    child = runs["t-guided"]
    assert child.info.status == "FINISHED" and child.data.params["sample.guidance_scale"] == "3.0"
    assert child.data.tags["mlflow.parentRunId"] == runs["q-linear"].info.run_id
    assert "eval/class_accuracy" in child.data.metrics
    assert runs["q-linear"].data.params["sample.guidance_scale"] == "2.0"  # its own results stay its own
    _assert_unchanged(before, _state(procs, repo))
    assert not list((repo / ".dvc/tmp/exps").glob("tmp*"))  # DVC removed its temporary copies


def test_a_stage_reads_and_writes_in_its_cwd_while_the_stores_follow_dvc_root(tmp_path, monkeypatch):
    """What DVC gives a temp/queued stage: cwd = the experiment's copy, DVC_ROOT = the parent repository."""
    import json

    import yaml
    from conftest import tiny_params

    from ddpm.cli import main
    from ddpm.pipeline.resume import resume_root
    from ddpm.tracking.store import store_root, tracking_uri

    parent, copy = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/tmpabc"
    copy.mkdir(parents=True)
    (parent / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    (copy / "params.yaml").write_text(yaml.safe_dump(tiny_params(data={**tiny_params()["data"],
                                                                       "shapes_per_class": 16})))
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(parent))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["prepare"]) == 0
    meta = json.loads((copy / "data/prepared/meta.json").read_text())
    assert meta["num_train"] + meta["num_eval"] == 160  # the experiment's params, not the parent's 120
    assert not (parent / "data").exists()  # nothing written into the user's workspace
    assert store_root(copy) == parent.resolve() and resume_root(copy) == parent.resolve() / ".resume"
    assert tracking_uri(copy) == f"sqlite:///{parent.resolve() / 'mlflow.db'}"

"""Tracking: MLflow runs in a temporary sqlite store, TensorBoard event files, DVC files, resources.

MLflow's import and store creation take seconds, so one module-level store (a temporary git
repository) holds most runs, and one fully logged run is shared by the read-only assertions.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ddpm.config import Config, flatten
from ddpm.errors import Interrupted, UserError
from ddpm.tracking.compare import compare_runs
from ddpm.tracking.files import write_metrics, write_tsv
from ddpm.tracking.lineage import git_tags
from ddpm.tracking.store import open_store, tracking_uri
from ddpm.tracking.tracker import Tracker

pytestmark = pytest.mark.xdist_group("tracking")  # under `-n`: one worker builds its module fixtures once

_ENV = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_ENABLE_ASYNC_LOGGING",
        "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")


def _cfg(**overrides) -> Config:
    """A config with nested overrides, e.g. _cfg(schedule="cosine", tracking={"tensorboard": False})."""
    return Config.from_dict(overrides)


def _git(repo: Path, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout.strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A committed git repository, a clean tracking environment, fast MLflow system metrics."""
    root = tmp_path_factory.mktemp("repo")
    (root / "code.py").write_text("x = 1\n")
    # the stores the runs write into the repository are ignored, as in the project: the tree stays clean,
    # so the git tags of a run do not depend on which tests ran before it
    (root / ".gitignore").write_text("/mlflow.db\n/mlflow.db-*\n/mlartifacts/\n/logs/\n/.resume/\n")
    _git(root, "init", "-q")
    _git(root, "add", "code.py", ".gitignore")
    _git(root, "commit", "-q", "-m", "init")
    with pytest.MonkeyPatch.context() as mp:
        for name in _ENV:
            mp.delenv(name, raising=False)
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # default 10 s
        yield root


@pytest.fixture(scope="module")
def client(repo):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(repo))


@pytest.fixture(scope="module")
def logged(repo, tmp_path_factory):
    """One run with everything logged once: params, metrics at 3 steps, an image, artifacts, finals."""
    cfg = _cfg(schedule="cosine", model={"channels": 64})
    artifact = tmp_path_factory.mktemp("out") / "report.txt"  # outside the repo: the tree stays clean
    artifact.write_text("hello")
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)  # (H, W, C)
    tracker = Tracker.start(cfg, repo, "main-run", tags={"dataset_hash": "abc123", "device": "cpu"})
    for step in (0, 10, 20):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": step * 1e-5}, step)
    tracker.log_image("samples/grid", image, step=20)
    tracker.log_artifact(artifact)
    tracker.log_artifact(artifact, "reports")
    deadline = time.time() + 20  # MLflow's monitor thread samples every 0.1 s here; wait for one publish
    while tracker._system_monitor._logging_step == 0 and time.time() < deadline:
        time.sleep(0.05)
    tracker.log_final({"fid": 12.5, "accuracy": 0.75})
    tracker.finish("FINISHED")
    return SimpleNamespace(cfg=cfg, run_id=tracker.run_id, tb_dir=tracker.tensorboard_dir, image=image)


# ---- store location ------------------------------------------------------------------------


def test_tracking_uri_env_dvc_root_and_default(tmp_path, monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(Path("sub")) == f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}"  # absolute, not ./mlruns
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "real"))
    assert tracking_uri(Path("tempcopy")) == f"sqlite:///{tmp_path / 'real' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(Path("tempcopy")) == "http://127.0.0.1:5000"


# ---- the logged run ------------------------------------------------------------------------


def test_params_logged_flattened(logged, client):
    params = client.get_run(logged.run_id).data.params
    assert params["schedule"] == "cosine"
    assert params["model.channels"] == "64"
    assert params["model.channel_mult"] == "[1, 2, 2, 2]"
    assert set(params) == set(flatten(logged.cfg.to_dict()))


def test_metric_histories_keep_steps(logged, client):
    history = client.get_metric_history(logged.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 1.0),
        (10, pytest.approx(1 / 11)),
        (20, pytest.approx(1 / 21)),
    ]


def test_tags_name_git_and_caller(logged, client, repo):
    run = client.get_run(logged.run_id)
    tags = run.data.tags
    assert run.info.run_name == "main-run"
    assert tags["mlflow.source.git.commit"] == _git(repo, "rev-parse", "HEAD")
    assert tags["git.dirty"] == "false"
    assert tags["dataset_hash"] == "abc123" and tags["device"] == "cpu"
    assert not any(k.startswith("dvc.") for k in tags)  # not under dvc exp run


def test_git_tags_dirty_and_no_git(tmp_path):
    assert git_tags(tmp_path) == {}  # not a repository: no tags, no error
    own = tmp_path / "own"
    own.mkdir()
    (own / "code.py").write_text("x = 1\n")
    _git(own, "init", "-q")
    _git(own, "add", "code.py")
    _git(own, "commit", "-q", "-m", "init")
    head = _git(own, "rev-parse", "HEAD")
    assert git_tags(own) == {"mlflow.source.git.commit": head, "git.dirty": "false"}  # clean
    (own / "code.py").write_text("x = 2\n")
    assert git_tags(own) == {"mlflow.source.git.commit": head, "git.dirty": "true"}  # a modified tracked file
    _git(own, "checkout", "-q", "code.py")
    assert git_tags(own)["git.dirty"] == "false"
    (own / "new.py").write_text("y = 1\n")
    assert git_tags(own)["git.dirty"] == "true"  # an untracked file: the code that ran is not the commit


def test_stepped_image_stored_under_images(logged, client, tmp_path):
    from PIL import Image

    names = [Path(a.path).name for a in client.list_artifacts(logged.run_id, "images")]
    png = [n for n in names if n.endswith(".png")]
    webp = [n for n in names if n.endswith("+compressed.webp")]
    assert len(png) == 1 and len(webp) == 1
    assert png[0].startswith("samples~grid+step+20+timestamp+")  # "/" in the key becomes "~"
    local = client.download_artifacts(logged.run_id, f"images/{png[0]}", str(tmp_path))
    np.testing.assert_array_equal(np.asarray(Image.open(local)), logged.image)
    assert client.get_run(logged.run_id).data.tags["mlflow.loggedImages"] == "True"


def test_artifacts_at_root_and_under_path(logged, client):
    root = {a.path for a in client.list_artifacts(logged.run_id)}
    assert {"report.txt", "reports", "images"} <= root
    assert [a.path for a in client.list_artifacts(logged.run_id, "reports")] == ["reports/report.txt"]


def test_final_metrics_status_and_system_metrics(logged, client, repo):
    run = client.get_run(logged.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["fid"] == 12.5 and run.data.metrics["accuracy"] == 0.75
    assert run.data.tags["ddpm.final_metrics"] == "accuracy,fid"
    assert any(k.startswith("system/cpu_utilization_percentage") for k in run.data.metrics)
    assert (repo / "mlartifacts" / "ddpm" / logged.run_id / "artifacts" / "report.txt").is_file()
    assert not (repo / "mlruns").exists()


def test_tensorboard_scalars_images_and_hparams_in_run_dir(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    assert logged.tb_dir.name == "main-run" and logged.tb_dir.parent.name == "tensorboard"
    assert [p for p in logged.tb_dir.iterdir() if p.is_dir()] == []  # no timestamped hparams sub-run
    acc = EventAccumulator(str(logged.tb_dir))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (0, 1.0),
        (10, pytest.approx(1 / 11)),
        (20, pytest.approx(1 / 21)),
    ]
    assert [e.value for e in acc.Scalars("fid")] == [12.5]
    assert [e.step for e in acc.Images("samples/grid")] == [20]
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["schedule"].string_value == "cosine"
    assert start.hparams["model.channels"].number_value == 64
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert {m.name.tag for m in experiment.metric_infos} == {"fid", "accuracy"}


# ---- re-opening, statuses, environment ------------------------------------------------------


def test_reopened_run_keeps_id_and_continues_steps(repo, client):
    cfg = _cfg(tracking={"system_metrics": False})
    first = Tracker.start(cfg, repo, "resumable")
    for step in (0, 10):
        first.log_metrics({"train/loss": float(step)}, step)
    first.finish("KILLED")
    assert client.get_run(first.run_id).info.status == "KILLED"

    changed = _cfg(tracking={"system_metrics": False}, sample={"steps": 50})
    again = Tracker.start(changed, repo, "ignored-name", run_id=first.run_id, resume_step=10)
    assert again.run_id == first.run_id and again.run_name == "resumable"
    assert again.tensorboard_dir == first.tensorboard_dir
    assert client.get_run(first.run_id).info.status == "RUNNING"
    for step in (20, 30):
        again.log_metrics({"train/loss": float(step)}, step)
    again.finish("FINISHED")

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "train/loss")) == [0, 10, 20, 30]
    assert run.data.params["sample.steps"] == "100"  # params are logged once, never rewritten
    assert run.data.tags["param_override.sample.steps"] == "50"


def test_sampling_with_other_params_gets_its_own_child_run(repo, client):
    """`dvc exp run -S sample.guidance_scale=2` on a cached training: a new run, the old results untouched."""
    no_tb = {"system_metrics": False, "tensorboard": False}
    train_cfg = _cfg(tracking=no_tb)
    with Tracker.start(train_cfg, repo, "trained") as trained:
        trained.log_metrics({"loss": 0.5}, step=10)
        trained.log_final({"train/final_loss": 0.25})
    with Tracker.start(train_cfg, repo, None, run_id=trained.run_id, new_run_if_params_differ=True) as same:
        same.log_final({"eval/class_accuracy": 0.6})
    assert same.run_id == trained.run_id  # same params: the pipeline's one run is re-opened

    guided = _cfg(tracking=no_tb, sample={"guidance_scale": 2.0})
    with Tracker.start(guided, repo, "guided", run_id=trained.run_id, new_run_if_params_differ=True) as child:
        child.log_final({"eval/class_accuracy": 0.9})
    assert child.run_id != trained.run_id
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == trained.run_id == run.data.tags["ddpm.train_run_id"]
    assert run.data.params["sample.guidance_scale"] == "2.0"
    assert run.data.metrics["train/final_loss"] == 0.25  # the training's final metrics come along
    assert run.data.metrics["eval/class_accuracy"] == 0.9
    original = client.get_run(trained.run_id)
    assert original.data.metrics["eval/class_accuracy"] == 0.6  # not overwritten
    assert original.data.params["sample.guidance_scale"] == "1.0"

    # evaluate re-opens the child when its params match, and derives from the TRAINING run when they don't
    with Tracker.start(guided, repo, None, run_id=child.run_id, new_run_if_params_differ=True) as again:
        pass
    assert again.run_id == child.run_id
    swept = _cfg(tracking=no_tb, sample={"guidance_scale": 2.0}, evaluate={"sweep_samples": 50})
    with Tracker.start(swept, repo, None, run_id=child.run_id, new_run_if_params_differ=True) as grandchild:
        pass
    tags = client.get_run(grandchild.run_id).data.tags
    assert grandchild.run_id not in (child.run_id, trained.run_id)
    assert tags["mlflow.parentRunId"] == trained.run_id
    finals = client.get_run(grandchild.run_id).data.metrics
    assert finals == {"train/final_loss": 0.25}  # the training's finals only: no stale evaluation of another setting


@pytest.mark.parametrize(("error", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_context_manager_ends_with_status(repo, client, error, status):
    cfg = _cfg(tracking={"tensorboard": False, "system_metrics": False})
    with pytest.raises(error), Tracker.start(cfg, repo, f"ctx-{status}") as tracker:
        raise error()
    assert client.get_run(tracker.run_id).info.status == status


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_between_start_and_finish_ends_the_run_killed_then_the_old_handler_is_back(repo, client, signum):
    """In-process: from `start` to `finish` the signal raises Interrupted (the run ends KILLED, not RUNNING);
    after `finish` the handler installed before `start` receives it again."""
    cfg = _cfg(tracking={"tensorboard": False, "system_metrics": False})
    received: list[int] = []
    def previous(sig: int, frame) -> None:
        received.append(sig)

    saved = {s: signal.signal(s, previous) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(Interrupted) as err, Tracker.start(cfg, repo, f"signal-{signum.name}") as tracker:
            assert client.get_run(tracker.run_id).info.status == "RUNNING"
            os.kill(os.getpid(), signum)
            for _ in range(1000):  # the handler runs as soon as the main thread is back in Python: sleep 1 at most
                time.sleep(0.01)
        assert err.value.signum == signum and received == []  # the tracker's handler took it, not the old one
        assert client.get_run(tracker.run_id).info.status == "KILLED"
        assert signal.getsignal(signal.SIGINT) is previous and signal.getsignal(signal.SIGTERM) is previous
        os.kill(os.getpid(), signum)  # after finish: the old handler again, no exception
        for _ in range(1000):
            if received:
                break
            time.sleep(0.01)
        assert received == [signum]
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_dvc_experiment_env_names_run_and_uses_dvc_root(repo, client, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(repo))  # the real repo; tmp_path plays dvc's temp copy
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-owl")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123abcd")
    cfg = _cfg(tracking={"system_metrics": False})
    tracker = Tracker.start(cfg, tmp_path, "ignored")
    tracker.finish()
    run = client.get_run(tracker.run_id)  # found in the repo's store, not the temp copy's
    assert run.info.run_name == "brisk-owl"
    assert run.data.tags["dvc.exp_name"] == "brisk-owl" and run.data.tags["dvc.exp_baseline_rev"] == "0123abcd"
    assert tracker.tensorboard_dir.parent == repo / "logs" / "tensorboard"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "logs").exists()


def test_under_mlflow_run_the_pipeline_logs_into_its_run(repo, client, monkeypatch):
    """`mlflow run` creates a run and exports MLFLOW_RUN_ID: new, derived and re-opened runs all go into it."""
    no_tb = {"system_metrics": False, "tensorboard": False}
    with Tracker.start(_cfg(tracking=no_tb), repo, "earlier-training") as trained:
        trained.log_final({"train/final_loss": 0.5})
    exp_id = client.create_experiment("chosen-by-mlflow-run")
    before = len(client.search_runs([client.get_experiment_by_name("ddpm").experiment_id]))
    for name, run_id in (("fresh", None), ("resample", trained.run_id)):
        host = client.create_run(exp_id, run_name=name, tags={"mlflow.source.type": "PROJECT"})
        monkeypatch.setenv("MLFLOW_RUN_ID", host.info.run_id)
        guided = _cfg(tracking=no_tb, sample={"guidance_scale": 3.0})
        with Tracker.start(guided, repo, None, run_id=run_id, new_run_if_params_differ=True) as tracker:
            tracker.log_metrics({"eval/x": 1.0}, step=0)
        assert tracker.run_id == host.info.run_id
        run = client.get_run(host.info.run_id)
        assert run.info.status == "FINISHED" and run.info.experiment_id == exp_id
        assert run.data.params["sample.guidance_scale"] == "3.0" and run.data.metrics["eval/x"] == 1.0
        assert run.data.tags["mlflow.source.type"] == "PROJECT"  # mlflow run's source tags are kept
    assert run.data.tags["ddpm.train_run_id"] == trained.run_id  # the cached training it sampled
    assert run.data.metrics["train/final_loss"] == 0.5
    assert len(client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])) == before  # no own run
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    with pytest.raises(UserError, match="MLFLOW_RUN_ID=0+ names no run"):
        Tracker.start(_cfg(tracking=no_tb), repo, None)


def test_disabled_tracking_touches_nothing(tmp_path, monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    cfg = _cfg(tracking={"mlflow": False, "tensorboard": False})
    with Tracker.start(cfg, tmp_path, "off") as tracker:
        tracker.log_metrics({"loss": 1.0}, 0)
        tracker.log_image("grid", np.zeros((2, 2, 3), np.uint8), 0)
        tracker.log_final({"fid": 1.0})
    assert tracker.run_id is None
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlartifacts, no logs


def test_metrics_are_in_the_store_when_logged_or_with_asynchronous_by_the_end_of_the_run(repo, client):
    """A synchronous tracker (sample, evaluate, progress) has written each batch when log_metrics returns; an
    asynchronous one (train: the loop never waits on the store) has written every batch when the run ends."""
    cfg = _cfg(tracking={"system_metrics": False, "tensorboard": False})
    tracker = Tracker.start(cfg, repo, "synchronous", asynchronous=False)
    for step in (1, 2):
        tracker.log_metrics({"eval/x": float(step)}, step)
        assert [m.step for m in client.get_metric_history(tracker.run_id, "eval/x")] == list(range(1, step + 1))
    tracker.finish()
    with Tracker.start(cfg, repo, "asynchronous") as tracker:
        for step in range(1, 41):
            tracker.log_metrics({f"train/m{i}": float(step) for i in range(15)}, step)
    for i in (0, 14):
        assert [m.step for m in client.get_metric_history(tracker.run_id, f"train/m{i}")] == list(range(1, 41))
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


# ---- comparing runs --------------------------------------------------------------------------


def test_compare_runs_shows_differing_params_and_finals(repo):
    ids = []
    for schedule, fid in (("linear", 20.0), ("cosine", 15.5)):
        cfg = _cfg(schedule=schedule, tracking={"experiment": "cmp", "tensorboard": False, "system_metrics": False})
        with Tracker.start(cfg, repo, f"run-{schedule}") as tracker:
            tracker.log_metrics({"train/loss": 0.1}, 5)
            tracker.log_final({"fid": fid})
        ids.append(tracker.run_id)
    table = compare_runs("cmp", tracking_uri(repo)).splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table if line.strip() and not line.startswith("-")}
    assert rows["run"] == ["run-linear", "run-cosine"]
    assert rows["schedule"] == ["linear", "cosine"]
    assert rows["fid"] == ["20", "15.5"]
    assert "seed" not in rows and "train/loss" not in rows  # equal params and non-final metrics hidden
    assert compare_runs("cmp", tracking_uri(repo), run_ids=ids[::-1]).splitlines()[0].split()[1:] == [
        "run-cosine",
        "run-linear",
    ]
    with pytest.raises(UserError, match="no MLflow experiment 'nope'"):
        compare_runs("nope", tracking_uri(repo))
    with pytest.raises(UserError, match="no MLflow store"):
        compare_runs("cmp", tracking_uri(repo / "elsewhere"))
    assert not (repo / "elsewhere").exists()


# ---- two processes, one fresh sqlite store ----------------------------------------------------


def _log_from_process(root: str, name: str, steps: int) -> None:
    """Worker: its own run in the shared store, `steps` metric batches."""
    cfg = _cfg(tracking={"tensorboard": False, "system_metrics": False})
    with Tracker.start(cfg, Path(root), name) as tracker:
        for step in range(steps):
            tracker.log_metrics({"a": float(step), "b": 2.0 * step, "c": -1.0}, step)


def test_two_processes_share_one_fresh_sqlite_store(tmp_path, repo):
    from mlflow import MlflowClient

    ctx = multiprocessing.get_context("spawn")  # no fork: MLflow runs background threads
    procs = [ctx.Process(target=_log_from_process, args=(str(tmp_path), f"p{i}", 200)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]  # both survived the first-use schema migration
    client = MlflowClient(tracking_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["p0", "p1"]
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("a", "b", "c"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(200)), f"{run.info.run_name}/{key} lost metrics"


def _foreign_client(uri: str, ready, go) -> None:
    """Worker: a plain MlflowClient (an `mlflow ui`, a notebook), which takes no lock of ours."""
    from mlflow import MlflowClient

    ready.release()
    go.wait()
    MlflowClient(uri).search_experiments()


def _our_client(uri: str, ready, go, results) -> None:
    import mlflow  # noqa: F401 - imported before the start, as the other worker's

    ready.release()
    go.wait()
    try:
        open_store(uri, "ddpm")
        results.put("ok")
    except Exception as err:  # noqa: BLE001 - reported to the test
        results.put(f"{err}: {err.__cause__!r}")


@pytest.mark.slow
def test_a_store_opened_while_a_foreign_client_creates_it_still_opens(tmp_path):
    """MLflow's schema creation is not safe against a second process doing the same (the store lock only
    orders ours): the loser raised "table ... already exists" or an AttributeError, in about one race of four
    here. Four real races, both processes released at once after their imports; ours must open the store
    whenever the foreign client did (when it lost the race too, it can leave a half-migrated store behind).
    A race is a race: without the retries this fails in most runs (about 2 of 3), not in every one."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    for i in range(4):
        uri, ready, go = f"sqlite:///{tmp_path / f'store{i}' / 'mlflow.db'}", ctx.Semaphore(0), ctx.Event()
        (tmp_path / f"store{i}").mkdir()
        workers = [ctx.Process(target=_foreign_client, args=(uri, ready, go)),
                   ctx.Process(target=_our_client, args=(uri, ready, go, results))]
        for w in workers:
            w.start()
        for _ in workers:
            assert ready.acquire(timeout=120), "a worker did not start"  # both have imported mlflow
        go.set()
        for w in workers:
            w.join(timeout=120)
        ours = results.get(timeout=60)
        if workers[0].exitcode == 0:  # a foreign client that itself died mid-migration can leave the store
            assert ours == "ok"  # broken for good (an `_alembic_tmp_*` table): no retry of ours can mend that


# ---- DVC files --------------------------------------------------------------------------------


def test_write_metrics_json_nested_nan_numpy(tmp_path):
    path = tmp_path / "metrics" / "eval.json"
    write_metrics(path, {"fid": np.float32(3.5), "bad": float("nan"), "sweep": {"w1": 2, "w2": np.int64(3)}})
    assert json.loads(path.read_text()) == {"bad": None, "fid": 3.5, "sweep": {"w1": 2, "w2": 3.0}}
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temp file left behind


def test_write_tsv_header_rows_and_empty_cells(tmp_path):
    path = tmp_path / "plots" / "loss.tsv"
    rows = [{"step": 10, "loss": 1.5, "lr": 0.5}, {"step": 20, "loss": float("nan")}, {"step": 30, "loss": 2.0}]
    write_tsv(path, ["step", "loss", "lr"], rows)
    assert path.read_text().splitlines() == ["step\tloss\tlr", "10\t1.5\t0.5", "20\t\t", "30\t2\t"]
    write_tsv(path, ["step", "loss"], rows[:1])  # rewritten whole, atomically
    assert path.read_text() == "step\tloss\n10\t1.5\n"
    assert [p.name for p in path.parent.iterdir()] == ["loss.tsv"]


# ---- resources --------------------------------------------------------------------------------


def test_resource_monitor_cpu(tmp_path):
    import psutil

    from ddpm.tracking.resources import ResourceMonitor

    monitor = ResourceMonitor("cpu")
    end = time.process_time() + 0.3
    while time.process_time() < end:  # burn CPU so the process percentage must be clearly positive
        pass
    sample = monitor.sample()
    assert set(sample) == {"resources/cpu_percent", "resources/rss_mb", "resources/system_memory_percent"}
    assert sample["resources/cpu_percent"] > 5.0
    assert sample["resources/rss_mb"] == pytest.approx(psutil.Process().memory_info().rss / 2**20, rel=0.1)
    assert 0.0 < sample["resources/system_memory_percent"] <= 100.0


def _fake_cuda(monkeypatch, nvml: types.ModuleType | None):
    """Pretend to be on a CUDA device with 1 GiB allocated; `nvml` replaces the pynvml module."""
    import torch

    gib = float(2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1.5 * gib)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="abcd-1234"))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # None makes `import pynvml` fail


def _fake_nvml(util: int | None) -> types.ModuleType:
    """A pynvml stand-in reporting `util` % (None: the query raises, as on a lost driver)."""
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: f"handle:{uuid}"

    def rates(handle):
        assert handle == "handle:GPU-abcd-1234"  # looked up by UUID, not index
        if util is None:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return SimpleNamespace(gpu=util)

    nvml.nvmlDeviceGetUtilizationRates = rates
    return nvml


@pytest.mark.parametrize(("nvml", "util"), [(None, None), (_fake_nvml(37), 37.0), (_fake_nvml(None), None)])
def test_resource_monitor_cuda_readings_absent_not_zero(monkeypatch, nvml, util):
    from ddpm.tracking.resources import ResourceMonitor

    _fake_cuda(monkeypatch, nvml)
    sample = ResourceMonitor("cuda:0").sample()
    assert sample["resources/cuda_allocated_mb"] == 1024.0
    assert sample["resources/cuda_reserved_mb"] == 2048.0
    assert sample["resources/cuda_peak_mb"] == 1536.0
    assert sample.get("resources/gpu_util_percent") == util  # missing, never 0, when NVML is unusable


def test_compare_markdown_is_one_row_per_run_with_chosen_metrics(repo):
    for schedule, fid in (("linear", 20.0), ("cosine", 15.5)):
        cfg = _cfg(schedule=schedule, tracking={"experiment": "md", "tensorboard": False, "system_metrics": False})
        with Tracker.start(cfg, repo, f"run|{schedule}") as tracker:
            tracker.log_final({"fid": fid, "acc": 0.5})
    lines = compare_runs("md", tracking_uri(repo), markdown=True, metrics=["fid"]).splitlines()
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    assert lines[1] == "|---|---|---|---|---|"
    assert cells[0] == ["run", "run_id", "status", "schedule", "fid"]  # acc not chosen
    assert cells[2][0] == "run\\|linear" and cells[2][3:] == ["linear", "20"]
    assert cells[3][3:] == ["cosine", "15.5"]
    with pytest.raises(UserError, match="no run logged metric"):
        compare_runs("md", tracking_uri(repo), markdown=True, metrics=["fdi"])


def test_compare_selects_runs_by_params_and_sorts_by_metric(repo):
    for schedule, steps, fid in (("linear", 10, 30.0), ("cosine", 10, 12.0), ("cosine", 25, 20.0)):
        cfg = _cfg(schedule=schedule, sample={"steps": steps},
                   tracking={"experiment": "sel", "tensorboard": False, "system_metrics": False})
        with Tracker.start(cfg, repo, f"{schedule}-{steps}") as tracker:
            tracker.log_final({"fid": fid})
    names = lambda text: [line.split(" | ")[0].strip("| ") for line in text.splitlines()[2:]]  # noqa: E731
    uri = tracking_uri(repo)
    assert names(compare_runs("sel", uri, markdown=True, where=["schedule=cosine"])) == ["cosine-10", "cosine-25"]
    assert names(compare_runs("sel", uri, markdown=True, where=["schedule=cosine", "sample.steps=25"])) == [
        "cosine-25"]
    assert names(compare_runs("sel", uri, markdown=True, sort="fid")) == ["cosine-10", "cosine-25", "linear-10"]
    assert names(compare_runs("sel", uri, markdown=True, sort="-fid")) == ["linear-10", "cosine-25", "cosine-10"]
    with pytest.raises(UserError, match="no run has this param"):
        compare_runs("sel", uri, where=["schedul=cosine"])
    with pytest.raises(UserError, match="not KEY=VALUE"):
        compare_runs("sel", uri, where=["schedule"])
    with pytest.raises(UserError, match="no run matches"):
        compare_runs("sel", uri, where=["schedule=sigmoid"])
    with pytest.raises(UserError, match="no run logged this metric"):
        compare_runs("sel", uri, sort="fdi")


def test_compare_reads_a_metric_at_a_step(repo):
    """`NAME@STEP` picks one point of a metric's history (a guidance sweep logs one step per scale)."""
    for name, accs in (("a", (0.2, 0.5, 0.9)), ("b", (0.3, 0.7, 0.8))):
        cfg = _cfg(seed=len(name + str(accs)), tracking={"experiment": "at", "tensorboard": False,
                                                          "system_metrics": False})
        with Tracker.start(cfg, repo, name) as tracker:
            for step, acc in zip((0, 100, 200), accs, strict=True):
                tracker.log_metrics({"sweep/acc": acc}, step)
            tracker.log_final({"fid": 1.0})
    text = compare_runs("at", tracking_uri(repo), markdown=True, metrics=["sweep/acc@100"], sort="-sweep/acc@100")
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines()]
    assert cells[0][-1] == "sweep/acc@100"
    assert [(row[0], row[-1]) for row in cells[2:]] == [("b", "0.7"), ("a", "0.5")]  # not the latest (0.9/0.8)
    with pytest.raises(UserError, match="no run logged metric"):
        compare_runs("at", tracking_uri(repo), metrics=["sweep/acc@50"])
    with pytest.raises(UserError, match="must be a step number"):
        compare_runs("at", tracking_uri(repo), metrics=["sweep/acc@w2"])

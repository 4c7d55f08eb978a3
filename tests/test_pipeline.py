"""The pipeline as users meet it: dvc.yaml/params.yaml, every stage's declared outputs, `dvc repro`,
`dvc exp run -S schedule=cosine`, and the MLflow comparison of two experiments."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_params
from dvc_repos import init_pipeline_repo
from dvc_repos import run_ok as _run
from dvc_repos import tool_env as _env
from processes import Processes

from ddpm.config import Config, flatten, load_config
from ddpm.data.datasets import prepare
from ddpm.pipeline.classifier import classifier_stage
from ddpm.pipeline.curve import progress_stage
from ddpm.pipeline.evaluate import evaluate_stage
from ddpm.pipeline.fid_stats import fid_stats_stage
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.sample import sample_stage
from ddpm.pipeline.train import train

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "classifier", "fid_stats", "train", "sample", "evaluate", "progress"]


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _declared(stage: dict) -> list[str]:
    out = []
    for key in ("outs", "metrics", "plots"):
        for item in stage.get(key, []):
            out.append(next(iter(item)) if isinstance(item, dict) else item)
    return out


def test_project_params_validate_and_keep_the_cifar10_default(project_params):
    cfg = load_config(project_params)
    assert cfg.data.dataset == "cifar10" and cfg.model == type(cfg.model)()  # the DDPM reference network
    assert cfg.schedule == "linear" and isinstance(cfg.seed, int)


def test_dvc_yaml_stages_are_thin_and_declare_what_they_read():
    stages = _dvc_yaml()["stages"]
    assert list(stages) == STAGES
    known = set(flatten(Config().to_dict())) | {"seed", "schedule"}
    sections = {k.split(".")[0] for k in known} | {".".join(k.split(".")[:2]) for k in known}
    for name, stage in stages.items():
        script = f"stages/{name}.py"
        assert stage["cmd"] == f"python -m stages.{name}"  # the copy's code: see the next test
        assert script in stage["deps"] and any(d.startswith("ddpm/") for d in stage["deps"]), name  # test_stage_deps
        for p in stage["params"]:
            assert p in known or p in sections, f"{name} reads unknown param {p}"
        assert "run_stage(" in (ROOT / script).read_text(), f"{script} should hand its work to run_stage"


def test_stage_commands_run_the_code_of_their_own_working_copy(tmp_path, procs):
    """`dvc exp run --queue`/`--temp` run each experiment in a copy under .dvc/tmp/exps/. Its stages must
    import that copy's `ddpm`, not the workspace's (where the editable install points): else code edited
    while the queue runs would train, recorded under the queued code's hash. `python -m stages.NAME` puts
    the stage's cwd (the copy) first on sys.path; `python stages/NAME.py` would put stages/ there."""
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    (tmp_path / "ddpm").mkdir()
    (tmp_path / "ddpm" / "__init__.py").write_text("print('ddpm from', __file__)\nraise SystemExit(3)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name, stage in _dvc_yaml()["stages"].items():
        cmd = stage["cmd"].split()
        assert cmd[0] == "python", name
        out = procs.run([sys.executable, *cmd[1:]], timeout=300, cwd=tmp_path, env=env)
        assert out.returncode == 3 and str(tmp_path / "ddpm") in out.stdout, (name, out.stdout, out.stderr[-300:])


def test_layout_is_the_file_layout_dvc_yaml_declares():
    """Every data file a stage reads or writes is a Layout path, and every Layout path is in dvc.yaml."""
    root = Path("/r")
    layout = Layout.under(root)
    ours = {str(getattr(layout, name).relative_to(layout.root)) for name, v in vars(Layout).items()
            if isinstance(v, property)}
    declared = set()
    for stage in _dvc_yaml()["stages"].values():
        declared |= set(_declared(stage))
        declared |= {d for d in stage["deps"] if not d.startswith(("ddpm/", "stages/"))}
    assert ours == declared


def test_every_stage_function_writes_its_declared_outputs(repo):
    cfg = load_config(repo / "params.yaml")
    prepare(cfg, repo / "data/prepared")
    ev = Layout.under(repo)
    classifier_stage(cfg, ev)
    fid_stats_stage(cfg, ev)
    train(cfg, Layout.under(repo))
    sample_stage(cfg, Layout.under(repo))
    metrics = evaluate_stage(cfg, ev)
    progress_stage(cfg, ev)
    for name, stage in _dvc_yaml()["stages"].items():
        for path in _declared(stage):
            assert (repo / path).exists(), f"stage {name} did not write {path}"
    # 20 samples against 30 held-out images: both sets are 20, and the names say so
    assert metrics["num_compared"] == 20
    assert metrics["sampling_nfe"] == 2 * cfg.sample.steps == 8  # DDIM, 4 time-uniform steps, guided: 2 each
    for key in ("class_accuracy", "precision_20", "recall_20"):  # fractions of the 20 compared samples
        assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0, key
        assert metrics[key] * 20 == pytest.approx(round(metrics[key] * 20), abs=1e-9), key
    for key in ("fd_classifier_20", "fd_classifier_floor_20"):  # distances: NaN or inf would pass a float check
        assert math.isfinite(metrics[key]) and metrics[key] >= 0.0, key
    clf = json.loads((repo / "metrics/classifier.json").read_text())
    assert metrics["real_class_accuracy"] == clf["accuracy"]  # the same classifier on the same real images
    assert metrics["class_accuracy_ratio"] == metrics["class_accuracy"] / clf["accuracy"]
    assert 0.0 <= metrics["fd_classifier_floor_20"] < metrics["fd_classifier_20"]  # untrained samples are worse
    sweep = (repo / "plots/guidance_sweep.tsv").read_text().splitlines()
    assert sweep[0].split("\t")[:3] == ["guidance_scale", "samples", "class_accuracy"]
    assert {r.split("\t")[1] for r in sweep[1:]} == {"20"}
    assert [float(r.split("\t")[0]) for r in sweep[1:]] == list(cfg.evaluate.guidance_sweep)
    col = sweep[0].split("\t").index("pixel_std_rel_error")  # per scale: guidance widens the colours
    assert all(0.0 <= float(r.split("\t")[col]) < 10 for r in sweep[1:])


# ----------------------------------------------------------------------------------- real DVC runs


@pytest.fixture
def dvc_repo(tmp_path: Path, procs: Processes) -> Path:
    """A fresh git + DVC repository holding this project's pipeline with the tiny params."""
    return init_pipeline_repo(procs, tmp_path)


@pytest.mark.slow
def test_dvc_repro_then_a_cosine_experiment_is_tracked_and_comparable(dvc_repo_trained: Path, procs):
    import mlflow

    dvc_repo = dvc_repo_trained  # `dvc repro` of the whole pipeline ran (for real) once per test run
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    ema_hash = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models/ema.pt")

    _run(procs, [sys.executable, "-m", "dvc", "exp", "run", "-S", "schedule=cosine"], dvc_repo)
    lock2 = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    assert lock2["stages"]["train"]["params"]["params.yaml"]["schedule"] == "cosine"
    ema_hash2 = next(o["md5"] for o in lock2["stages"]["train"]["outs"] if o["path"] == "models/ema.pt")
    assert ema_hash2 != ema_hash  # the schedule changed the trained weights
    # the classifier (and prepared data) were reused from the cache, not retrained
    assert lock2["stages"]["classifier"] == lock["stages"]["classifier"]
    shown = _run(procs, [sys.executable, "-m", "dvc", "exp", "show", "--csv"], dvc_repo).stdout
    assert "cosine" in shown and "class_accuracy" in shown
    _run(procs, [sys.executable, "-m", "dvc", "plots", "show", "-o", "rendered"], dvc_repo)
    html = (dvc_repo / "rendered/index.html").read_text()
    assert "train_loss" in html and "guidance_sweep" in html and "grid.png" in html

    # the client, not mlflow.set_tracking_uri: that would export MLFLOW_TRACKING_URI to later tests
    client = mlflow.MlflowClient(f"sqlite:///{dvc_repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cmp").experiment_id])
    assert sorted(r.data.params["schedule"] for r in runs) == ["cosine", "linear"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert len(client.get_metric_history(r.info.run_id, "train/loss")) == 3
        assert "eval/class_accuracy" in r.data.metrics and "eval/fd_classifier_20" in r.data.metrics
        assert len(r.data.tags["mlflow.source.git.commit"]) == 40
        assert r.data.tags["data_hash"]
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert "grid.png" in names  # and ema.pt lives in the logged model:
        assert len(client.get_run(r.info.run_id).outputs.model_outputs) == 1
    cosine = next(r for r in runs if r.data.params["schedule"] == "cosine")
    assert cosine.data.tags["dvc.exp_name"] == cosine.info.run_name  # named after the DVC experiment
    assert len(cosine.data.tags["dvc.exp_baseline_rev"]) == 40

    table = _run(procs, [sys.executable, "-m", "ddpm", "compare", "--experiment", "cmp"], dvc_repo).stdout
    assert "schedule" in table and "cosine" in table and "linear" in table

    # a sampling-only experiment re-samples the cached (cosine) training, into a child run of its own
    _run(procs, [sys.executable, "-m", "dvc", "exp", "run", "-S", "sample.guidance_scale=2.5"], dvc_repo)
    lock3 = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    assert lock3["stages"]["train"] == lock2["stages"]["train"]  # not retrained
    assert lock3["stages"]["sample"]["params"]["params.yaml"]["sample"]["guidance_scale"] == 2.5
    runs = client.search_runs([client.get_experiment_by_name("cmp").experiment_id])
    assert len(runs) == 3
    child = next(r for r in runs if r.data.params["sample.guidance_scale"] == "2.5")
    assert child.data.tags["mlflow.parentRunId"] == cosine.info.run_id
    assert child.data.params["schedule"] == "cosine" and child.info.status == "FINISHED"
    assert child.data.metrics["train/final_loss"] == cosine.data.metrics["train/final_loss"]
    assert "eval/class_accuracy" in child.data.metrics and "grid.png" in {
        a.path for a in client.list_artifacts(child.info.run_id)}
    assert client.get_run(cosine.info.run_id).data.metrics == cosine.data.metrics  # its results untouched


def test_mlproject_entry_points_and_conda_pins_match_pyproject():
    import tomllib

    from mlflow.projects import _project_spec

    project = _project_spec.load_project(str(ROOT))
    assert set(project._entry_points) == {"main", "train", "sample", "evaluate"}
    main_cmd = project.get_entry_point("main").compute_command({"schedule": "cosine"}, None)
    assert main_cmd == "dvc exp run -S schedule=cosine"
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    conda_pins = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert [p for p in pins if "==" in p] == [p for p in conda_pins if "==" in p]
    # no upper cap on Python (a 3.12/3.13 user can install it), and conda agrees
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"] == ">=3.11"
    assert "python>=3.11" in conda["dependencies"]


def test_dvc_yaml_declares_the_ema_model_as_an_artifact():
    artifact = _dvc_yaml()["artifacts"]["ddpm-ema"]
    assert artifact["path"] == "models/ema.pt" and artifact["type"] == "model"
    assert artifact["desc"] and "diffusion" in artifact["labels"]
    assert any(o == artifact["path"] for o in _declared(_dvc_yaml()["stages"]["train"]))  # a cached output


@pytest.mark.slow
def test_push_then_a_fresh_clone_pulls_the_model_without_running_a_stage(dvc_repo_trained: Path, procs,
                                                                         tmp_path_factory):
    """The README's *Share and reproduce elsewhere*: a directory as DVC remote, a bare repository as git remote."""
    dvc_repo = dvc_repo_trained  # `dvc repro` ran and its results are committed
    dvc = [sys.executable, "-m", "dvc"]
    shared = tmp_path_factory.mktemp("shared")
    remote, origin, clone = shared / "dvc-store", shared / "origin.git", shared / "clone"
    _run(procs, ["git", "init", "-q", "--bare", "--initial-branch=main", str(origin)], shared)
    _run(procs, [*dvc, "remote", "add", "-d", "store", str(remote)], dvc_repo)
    _run(procs, ["git", "commit", "-qam", "a remote"], dvc_repo)
    _run(procs, ["git", "tag", "-a", "ddpm-ema@v0.1.0", "-m", "the first model"], dvc_repo)  # a registry version
    _run(procs, [*dvc, "push"], dvc_repo)
    _run(procs, ["git", "push", "-q", "--follow-tags", str(origin), "HEAD:refs/heads/main"], dvc_repo)

    _run(procs, ["git", "clone", "-q", "-b", "main", str(origin), str(clone)], shared)
    assert not (clone / "models" / "ema.pt").exists()
    _run(procs, [*dvc, "pull"], clone)
    assert (clone / "models/ema.pt").read_bytes() == (dvc_repo / "models/ema.pt").read_bytes()
    assert (clone / "samples/samples.npz").read_bytes() == (dvc_repo / "samples/samples.npz").read_bytes()
    status = _run(procs, [*dvc, "status"], clone).stdout
    assert "Data and pipelines are up to date" in status, status
    dry = _run(procs, [*dvc, "repro", "--dry"], clone).stdout
    assert "didn't change, skipping" in dry and "Running stage" not in dry, dry
    # the model registry view of the same file: `dvc artifacts get` fetches a version by name from the repository
    _run(procs, [*dvc, "artifacts", "get", str(origin), "ddpm-ema", "--rev", "v0.1.0", "-o", str(shared / "got.pt")],
         shared)
    assert (shared / "got.pt").read_bytes() == (dvc_repo / "models/ema.pt").read_bytes()


@pytest.mark.slow
def test_every_mlflow_run_entry_point_logs_into_the_run_mlflow_created(dvc_repo_with_data: Path, procs):
    """`mlflow run . --env-manager local -e ENTRY`: one run per command, in the chosen experiment, none hollow."""
    import mlflow

    dvc_repo = dvc_repo_with_data

    for item in ("MLproject", "conda.yaml"):
        shutil.copy(ROOT / item, dvc_repo / item)
    _run(procs, ["git", "add", "-A"], dvc_repo)
    _run(procs, ["git", "commit", "-qm", "mlproject"], dvc_repo)
    uri = f"sqlite:///{dvc_repo}/mlflow.db"
    env = {**_env(), "MLFLOW_TRACKING_URI": uri}
    mlflow_cli = [sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "proj"]
    for entry, extra in (("main", ["-P", "schedule=cosine"]), ("sample", []), ("evaluate", []), ("train", [])):
        proc = procs.run([*mlflow_cli, "-e", entry, *extra], timeout=900, cwd=dvc_repo, env=env)
        assert proc.returncode == 0, f"mlflow run -e {entry}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    client = mlflow.MlflowClient(uri)
    proj = client.get_experiment_by_name("proj")
    assert proj.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.data.tags["mlflow.project.entryPoint"]: r for r in client.search_runs([proj.experiment_id])}
    assert sorted(runs) == ["evaluate", "main", "sample", "train"]  # one run per command, no extra ones
    others = [e for e in client.search_experiments() if e.experiment_id != proj.experiment_id]
    assert all(not client.search_runs([e.experiment_id]) for e in others)  # nothing in Default or `cmp`
    for entry, run in runs.items():
        assert run.info.status == "FINISHED", entry
        assert run.data.tags["mlflow.source.type"] == "PROJECT"  # mlflow run's own source tags, kept
        assert run.data.params["schedule"] == "cosine" and len(run.data.params) > 50, entry  # the pipeline's params
    main, sample, evaluate, train = (runs[k].data.metrics for k in ("main", "sample", "evaluate", "train"))
    assert {"train/loss", "train/final_loss", "eval/class_accuracy", "sweep/class_accuracy"} <= set(main)
    assert sample["train/final_loss"] == main["train/final_loss"]  # the training it sampled, named and copied
    assert runs["sample"].data.tags["ddpm.train_run_id"] == runs["main"].info.run_id
    assert "eval/class_accuracy" in evaluate and evaluate["train/final_loss"] == main["train/final_loss"]
    # train after main: the finished checkpoint in .resume/ makes it re-finish (no new steps), logged as such
    assert train["train/final_loss"] == main["train/final_loss"] and "train/loss" not in train
    assert runs["train"].data.tags["ddpm.train_run_id"] == runs["main"].info.run_id
    for entry in ("main", "train"):
        assert len(runs[entry].outputs.model_outputs) == 1, entry  # the EMA model, logged into this run
    assert "grid.png" in {a.path for a in client.list_artifacts(runs["sample"].info.run_id)}


def test_sample_stage_with_dpm_solver_on_logsnr_steps(repo):
    no_tracking = {"mlflow": False, "tensorboard": False, "system_metrics": False}
    cfg = Config.from_dict(tiny_params(sample={"sampler": "dpm_solver", "spacing": "logsnr", "steps": 5},
                                       train={"progress_sampler": "dpm_solver", "progress_spacing": "logsnr"},
                                       tracking=no_tracking))
    paths = Layout.under(repo)
    prepare(cfg, paths.prepared)
    train(cfg, paths)
    meta = sample_stage(cfg, paths)
    assert meta["sampler"] == "dpm_solver" and meta["spacing"] == "logsnr"
    assert paths.grid.is_file() and paths.denoise.is_file() and paths.progression.is_file()


def test_the_real_reference_set_mixes_the_classes_of_a_class_ordered_split():
    import torch

    from ddpm.pipeline.evaluate import equal_size

    labels = torch.arange(10).repeat_interleave(500)  # a folder's held-out split: class by class
    picked = labels[equal_size(1000, len(labels), 0)]
    counts = torch.bincount(picked, minlength=10)
    assert counts.min() > 60 and counts.max() < 140  # ~100 of each, where a prefix would be 500 + 500 + 0...

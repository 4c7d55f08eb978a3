"""The quality curve: EMA snapshots kept by training at the progress points, scored after it by the `progress`
stage (the same seeds and classes at every point), written as a DVC plot and a figure, logged into the
training's run; and a change of how the curve is scored re-runs that stage alone, never the training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_params
from PIL import Image

from ddpm.config import Config, TrainConfig
from ddpm.data.prepared import load_prepared
from ddpm.errors import UserError
from ddpm.evaluation.classifier import load_classifier
from ddpm.pipeline.curve import progress_stage, score_snapshots
from ddpm.pipeline.curve_figure import COLOURS, LEFT, RIGHT, TOP, H, W, curve_figure
from ddpm.pipeline.evaluate import fd_floor, real_class_accuracy
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.snapshots import snapshot_steps
from ddpm.pipeline.train import train

NO_TRACKING = {"mlflow": False, "tensorboard": False, "system_metrics": False}


@pytest.mark.parametrize(("fields", "expected"), [
    ({"steps": 6, "sample_every": 3}, [3, 6]),  # 0: at the progress points
    ({"steps": 7, "sample_every": 3}, [3, 6, 7]),  # ... and always the final model
    ({"steps": 7, "sample_every": 0}, [7]),  # no progress points: the final model alone
    ({"steps": 900, "sample_every": 500, "snapshot_every": 150}, list(range(150, 901, 150))),  # the quickstart's
    ({"steps": 1000, "sample_every": 100, "max_snapshots": 4}, [100, 400, 700, 1000]),  # 10 thinned evenly to 4
    ({"steps": 1000, "sample_every": 100, "max_snapshots": 1}, [1000]),
    ({"steps": 1000, "sample_every": 100, "max_snapshots": 0}, []),
    ({"steps": 800_000, "sample_every": 20_000, "max_snapshots": 16}, None),  # params.yaml: 40 points -> 16
])
def test_snapshot_steps_are_the_progress_points_thinned_evenly(fields, expected):
    """Catches an off-by-one at the ends (the first and last point must stay) and a bound that is exceeded."""
    steps = snapshot_steps(TrainConfig(**fields))
    if expected is None:
        assert len(steps) == 16 and steps[0] == 20_000 and steps[-1] == 800_000
        gaps = np.diff(steps)
        assert set(gaps) <= {40_000, 60_000} and len(set(steps)) == 16  # even to within one progress interval
    else:
        assert steps == expected


def test_bad_snapshot_and_curve_params_are_one_line_errors():
    with pytest.raises(UserError, match=r"train.snapshot_every=50 exceeds train.steps=6") as err:
        Config.from_dict(tiny_params(train={"snapshot_every": 50}))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"progress.steps=41 exceeds diffusion.timesteps=40; use at most 40"):
        Config.from_dict(tiny_params(progress={"steps": 41}))
    with pytest.raises(UserError, match=r"train.max_snapshots"):
        Config.from_dict(tiny_params(train={"max_snapshots": -1}))


@pytest.fixture
def trained(tmp_path: Path, data_stages) -> tuple[Config, Layout]:
    """The tiny pipeline trained in-process (6 steps, progress points 3 and 6), without MLflow."""
    cfg = Config.from_dict(tiny_params(tracking=NO_TRACKING))
    paths = Layout.under(tmp_path)
    data_stages(tmp_path, cfg)
    train(cfg, paths)
    return cfg, paths


def test_the_stage_scores_every_snapshot_with_the_same_draw(trained):
    cfg, paths = trained
    rows = progress_stage(cfg, paths)
    assert [r["step"] for r in rows] == [3, 6]
    assert [r["images_seen"] for r in rows] == [24, 48]  # step x train.batch_size
    data = load_prepared(paths.prepared)
    classifier = load_classifier(paths.classifier, "cpu")
    real_accuracy = real_class_accuracy(classifier, data)
    floor = fd_floor(classifier, data, _real_feats(classifier, data), 20, cfg.seed)
    for r in rows:
        assert r["samples"] == 20 and r["fd_classifier_floor"] == floor  # the floor at the curve's own size
        assert r["class_accuracy_ratio"] == r["class_accuracy"] / real_accuracy
        assert 0 <= r["precision"] <= 1 and r["fd_classifier"] >= 0
    # the same seeds and classes at every point: one snapshot scored twice gives the same row twice (catches a
    # generator shared across the snapshots, whose draw would differ from point to point)
    twice = score_snapshots(cfg, paths, data, classifier, None, [paths.snapshots / "step_0000006.pt"] * 2)
    assert twice[0] == twice[1] == rows[1]
    tsv = paths.progress_plot.read_text().splitlines()
    assert tsv[0].split("\t") == ["step", "images_seen", "samples", "class_accuracy", "class_accuracy_ratio",
                                  "fd_classifier", "fd_classifier_floor", "precision", "recall",
                                  "pixel_mean_rel_error", "pixel_std_rel_error"]  # no FID: evaluate.fid is off
    assert [line.split("\t")[0] for line in tsv[1:]] == ["3", "6"]
    figure = np.asarray(Image.open(paths.progress_curve))
    assert figure.shape == (2 * H, 3 * W, 3)  # four panels (accuracy, FD, P/R, pixel gaps), three to a line
    # a rerun with another sample count: another curve from the same snapshots (no training involved)
    more = Config.from_dict(tiny_params(tracking=NO_TRACKING, progress={"num_samples": 30, "batch_size": 30}))
    assert {r["samples"] for r in progress_stage(more, paths)} == {30}


def _real_feats(classifier, data):
    from ddpm.evaluation.classifier import extract_features

    return extract_features(classifier, data.eval_images, batch_size=500, device="cpu")


def test_no_snapshots_is_a_user_error_naming_the_fix(tmp_path):
    paths = Layout.under(tmp_path)
    paths.snapshots.mkdir(parents=True)
    with pytest.raises(UserError, match="holds no EMA snapshots.*set train.max_snapshots to at least 1"):
        progress_stage(Config.from_dict(tiny_params()), paths)


def test_the_figure_draws_each_metric_where_its_value_is():
    """A class accuracy rising from 0 to 1 ends in the top right corner of the first panel, in its colour."""
    rows = [{"step": 0, "class_accuracy": 0.0, "fd_classifier": 5.0}, {"step": 10, "class_accuracy": 1.0,
                                                                       "fd_classifier": 1.0}]
    figure = curve_figure(rows, batch_size=8)
    assert figure.shape == (H, 2 * W, 3)  # two panels: the metrics present
    corner = figure[TOP - 1:TOP + 2, W - RIGHT - 1:W - RIGHT + 2].reshape(-1, 3)
    assert any(tuple(px) == COLOURS["tab:blue"] for px in corner)
    start = figure[H - 34 - 1:H - 34 + 2, LEFT - 1:LEFT + 2].reshape(-1, 3)  # (step 0, accuracy 0)
    assert any(tuple(px) == COLOURS["tab:blue"] for px in start)
    with pytest.raises(ValueError, match="no metric"):
        curve_figure([{"step": 1}], batch_size=8)


# ----------------------------------------------------------------------------------- real DVC


def _dvc(procs, repo: Path, *args: str) -> str:
    from dvc_repos import run_ok

    return run_ok(procs, [sys.executable, "-m", "dvc", *args], repo).stdout


@pytest.mark.slow
def test_changing_the_curve_reruns_only_the_progress_stage(dvc_repo_trained: Path, procs):
    """`dvc status` after a change of progress.*: the progress stage alone (catches the curve's params or code
    reaching the train stage, which would retrain); and its repro logs the curve into the training's run."""
    import mlflow

    repo = dvc_repo_trained  # after a real `dvc repro` of the whole pipeline
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert "progress" in lock["stages"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["progress"]["num_samples"] = 30
    params["progress"]["batch_size"] = 30
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(_dvc(procs, repo, "status", "--json") or "{}")) == {"progress"}
    out = _dvc(procs, repo, "repro")
    assert "Running stage 'progress'" in out and "Running stage 'train'" not in out, out
    assert set(json.loads(_dvc(procs, repo, "status", "--json") or "{}")) == set()
    lock2 = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock2["stages"]["train"] == lock["stages"]["train"]
    run_id = json.loads((repo / "models/run.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    # both curves in the training's run, each series named by its sample count
    assert [m.step for m in client.get_metric_history(run_id, "progress/fd_classifier_20")] == [3, 6]
    assert [m.step for m in client.get_metric_history(run_id, "progress/fd_classifier_30")] == [3, 6]

"""What MLflow and TensorBoard users see of one real pipeline run (tiny config, sqlite store in tmp_path):
the experiment kind, the dataset input, the source, grouped metric names, viewable grids, and the EMA
network as a registered pyfunc model that a fresh process loads and samples exactly like the CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_params
from PIL import Image

from ddpm.config import Config
from ddpm.core.images import grid_hwc, viewable
from ddpm.pipeline.curve import progress_stage
from ddpm.pipeline.evaluate import evaluate_stage
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.sample import sample_stage
from ddpm.pipeline.train import train
from ddpm.tracking.files import read_run_id
from ddpm.tracking.names import GROUPS
from ddpm.tracking.store import tracking_uri

pytestmark = pytest.mark.xdist_group("mlflow_model")  # under `-n`: one worker builds its module fixtures once

ROOT = Path(__file__).resolve().parents[1]
_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "DVC_ROOT", "DVC_EXP_NAME",
        "DVC_EXP_BASELINE_REV")
REGISTERED = "ddpm-tiny"


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _ENV}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"  # this checkout's ddpm first
    return env


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, data_stages):
    """Every stage function once (the data stages: the session's, copied), in a fresh directory: the run as
    the MLflow store holds it."""
    root = tmp_path_factory.mktemp("pipe")
    params = tiny_params(tracking={"experiment": "users", "log_every": 2, "system_metrics": True,
                                   "register_model": REGISTERED})
    (root / "params.yaml").write_text(yaml.safe_dump(Config.from_dict(params).to_dict(), sort_keys=False))
    cfg = Config.from_dict(params)
    with pytest.MonkeyPatch.context() as mp:
        for name in _ENV:
            mp.delenv(name, raising=False)
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
        paths = Layout.under(root)
        data_stages(root, cfg)
        meta = json.loads((paths.prepared / "meta.json").read_text())
        train(cfg, paths)
        sample_stage(cfg, paths)
        evaluate_stage(cfg, paths)
        progress_stage(cfg, paths)  # the quality curve, logged into the training's run
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(root))
    run_id = read_run_id(paths.train_run)
    return SimpleNamespace(root=root, paths=paths, cfg=cfg, meta=meta, client=client, run=client.get_run(run_id))


def test_experiment_opens_on_the_runs_table(pipeline):
    exp = pipeline.client.get_experiment(pipeline.run.info.experiment_id)
    assert exp.name == "users"
    # MLflow 3's experiment kind: model training (the UI's kind selector shows it)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_training_run_logs_its_dataset_and_source(pipeline):
    run, meta = pipeline.run, pipeline.meta
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "shapes-16px"
    assert dataset.digest == meta["content_hash"][:36]  # MLflow's digest column holds at most 36 characters
    assert json.loads(dataset.source)["uri"] == (pipeline.paths.prepared / "dataset.npz").resolve().as_uri()
    profile = json.loads(dataset.profile)
    assert profile["num_images"] == meta["num_train"] and profile["num_classes"] == 10
    assert profile["content_hash"] == meta["content_hash"]
    assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.name"]  # the script that ran (pytest here, stages/train.py in DVC)


def test_metric_names_are_grouped_and_the_same_in_tensorboard(pipeline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client, run = pipeline.client, pipeline.run
    mlflow_keys = {k for k in run.data.metrics if not k.startswith("system/")}  # system/: MLflow's own monitor
    tb_dir = pipeline.root / "logs" / "tensorboard" / run.data.tags["ddpm.tensorboard_dir"]
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    tb_keys = set(acc.Tags()["scalars"])
    assert mlflow_keys == tb_keys
    assert {k.split("/")[0] for k in mlflow_keys} == set(GROUPS)  # every group present, nothing ungrouped
    assert {"train/loss", "train/lr", "train/bad_steps_total", "train/final_loss", "eval/class_accuracy",
            "sweep/class_accuracy", "resources/rss_mb", "progress/class_accuracy_ratio",
            "progress/fd_classifier_20", "progress/images_seen"} <= mlflow_keys
    assert [m.step for m in client.get_metric_history(run.info.run_id, "sweep/class_accuracy")] == [0, 100]
    # the curve: one point per EMA snapshot (the progress points 3 and 6), against step and images seen
    assert [m.step for m in client.get_metric_history(run.info.run_id, "progress/class_accuracy")] == [3, 6]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "progress/images_seen")] == [24, 48]
    assert [e.step for e in acc.Scalars("progress/precision_20")] == [3, 6]
    assert set(acc.Tags()["images"]) == {"train/progress", "train/progression", "samples/grid", "progress/curve"}


def test_grids_are_viewable_and_samples_stay_raw(pipeline):
    paths, cfg = pipeline.paths, pipeline.cfg
    grid = np.asarray(Image.open(paths.grid))
    # 2 samples of 16 px with 2 px padding = 38 px; enlarged by the smallest whole factor reaching 256 (7)
    assert grid.shape[1] == 38 * 7 >= 256
    assert np.asarray(Image.open(paths.denoise)).shape[1] >= 256
    assert all(np.asarray(Image.open(p)).shape[1] >= 256 for p in paths.progress.glob("*.png"))
    with np.load(paths.samples) as z:
        assert z["images"].shape == (cfg.sample.num_samples, 3, 16, 16) and z["images"].dtype == np.uint8


def test_viewable_is_a_nearest_neighbour_enlargement():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # (H, W, C)
    big = viewable(image, min_width=7)
    assert big.shape == (6, 9, 3)  # factor ceil(7 / 3) = 3
    np.testing.assert_array_equal(big[::3, ::3], image)
    np.testing.assert_array_equal(big[1, 4], image[0, 1])  # each pixel is a 3 x 3 block
    assert viewable(image, min_width=3) is image  # wide enough: untouched


_LOAD = """
import sys, json, numpy as np, pandas as pd, mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
out = model.predict(pd.DataFrame({"class": ["square", "square", "3", "3"]}),
                    params={"guidance_scale": 2.0, "steps": 3, "seed": 5, "device": "cpu"})
np.save(sys.argv[3], out)
schema = model.metadata.signature
print(json.dumps({"inputs": schema.inputs.input_names(), "params": [p.name for p in schema.params.params],
                  "python_model": sorted(model.metadata.flavors["python_function"])}))
"""


def test_registered_pyfunc_model_loads_in_a_fresh_process_and_equals_the_cli(pipeline, tmp_path, procs):
    root, client = pipeline.root, pipeline.client
    version = client.get_model_version(REGISTERED, "1")
    assert version.run_id == pipeline.run.info.run_id
    out = tmp_path / "pyfunc.npy"
    proc = procs.run([sys.executable, "-c", _LOAD, tracking_uri(root), f"models:/{REGISTERED}/1", str(out)],
                     timeout=300, cwd=tmp_path, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["inputs"] == ["class"]
    assert {"guidance_scale", "steps", "seed", "sampler", "eta", "batch_size", "precision"} <= set(info["params"])
    assert "model_code_path" in info["python_model"]  # models from code: no pickled Python object
    images = np.load(out)
    assert images.dtype == np.uint8 and images.shape == (4, 16, 16, 3)

    png = tmp_path / "cli.png"
    cli = procs.run([sys.executable, "-m", "ddpm", "sample", "--checkpoint", "models/ema.pt", "--classes",
                     "square,3", "--n", "2", "--guidance", "2", "--steps", "3", "--seed", "5", "--out", str(png)],
                    timeout=300, cwd=root, env=_clean_env())
    assert cli.returncode == 0, cli.stderr[-3000:]
    expected = viewable(grid_hwc(torch.from_numpy(images).permute(0, 3, 1, 2), nrow=2))  # the CLI's grid layout
    np.testing.assert_array_equal(np.asarray(Image.open(png)), expected)

    outputs = client.get_run(version.run_id).outputs.model_outputs  # the run's *Logged models*
    assert len(outputs) == 1
    logged = client.get_logged_model(outputs[0].model_id)
    assert logged.name == "ema" and version.source == f"models:/{logged.model_id}"
    files = {p.name for p in Path(logged.artifact_location.removeprefix("file://")).rglob("*") if p.is_file()}
    assert logged.source_run_id == pipeline.run.info.run_id
    assert "ema.pt" in files and not any(f.endswith((".pkl", ".pickle", ".cloudpickle")) for f in files)

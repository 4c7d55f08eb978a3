"""`model.num_classes: 0` through the real DVC pipeline: prepare -> train -> sample -> evaluate, with the
label metrics skipped (and saying why) and the distribution metrics still reported."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from test_pipeline import _run


@pytest.mark.slow
def test_an_unconditional_model_runs_the_whole_dvc_pipeline(dvc_repo_with_data: Path, procs):
    dvc_repo = dvc_repo_with_data  # prepare reruns (model.num_classes), the classifier is the cached one
    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    params["model"]["num_classes"] = 0
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(procs, ["git", "commit", "-qam", "unconditional"], dvc_repo)
    _run(procs, [sys.executable, "-m", "dvc", "repro"], dvc_repo)

    metrics = json.loads((dvc_repo / "metrics/eval.json").read_text())
    assert metrics["class_accuracy"].startswith("skipped: the model is unconditional")
    assert metrics["guidance_sweep"].startswith("skipped: the model is unconditional")
    for key in ("precision_20", "recall_20"):  # fractions of the 20 compared samples
        assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0, key
        assert metrics[key] * 20 == pytest.approx(round(metrics[key] * 20), abs=1e-9), key
    for key in ("fd_classifier_20", "fd_classifier_floor_20"):  # distances: NaN or inf would pass a float check
        assert math.isfinite(metrics[key]) and metrics[key] >= 0.0, key
    assert metrics["fd_classifier_floor_20"] < metrics["fd_classifier_20"]  # real vs real beats barely trained samples
    assert "class_accuracy_per_class" not in metrics
    with __import__("numpy").load(dvc_repo / "samples/samples.npz") as z:
        assert (z["labels"] == -1).all() and len(z["images"]) == 20  # no labels, by design
    shown = _run(procs, [sys.executable, "-m", "dvc", "metrics", "show"], dvc_repo).stdout
    assert "fd_classifier_20" in shown

"""Comparable evaluation numbers: equal-size real and generated sets, metric names that state the size,
evaluation sampling in `sample.precision` (not train.precision), and the FID-50k default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import recipe_params, tiny_params

import ddpm.pipeline.sample as sample_mod
from ddpm.config import Config, load_config
from ddpm.data.datasets import prepare
from ddpm.evaluation.classifier import Classifier, extract_features
from ddpm.evaluation.metrics import precision_recall
from ddpm.pipeline.evaluate import (
    classifier_stage,
    count_tag,
    equal_size,
    evaluate_stage,
    fid_stats_stage,
    offline_metrics,
    sweep_metric_names,
)
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.sample import sample_stage
from ddpm.pipeline.train import train

ROOT = Path(__file__).resolve().parents[1]
NO_TRACKING = {"mlflow": False, "tensorboard": False, "system_metrics": False}


@pytest.mark.parametrize(("n", "tag"), [(50_000, "50k"), (10_000, "10k"), (2_000, "2k"), (500, "500"),
                                        (2_500, "2500"), (20, "20")])
def test_count_tag(n: int, tag: str):
    assert count_tag(n) == tag


def test_equal_size_is_a_seeded_subsample_without_repeats():
    a, b = equal_size(30, 100, seed=3), equal_size(30, 100, seed=3)
    assert torch.equal(a, b) and len(set(a.tolist())) == 30 and 0 <= int(a.min()) and int(a.max()) < 100
    assert torch.equal(a, a.sort().values)
    assert not torch.equal(a, equal_size(30, 100, seed=4))
    assert torch.equal(equal_size(100, 40, seed=0), torch.arange(40))  # never more than there is


def test_offline_metrics_compare_equal_sizes_and_name_them():
    """30 generated images against 120 real feature vectors: FD and precision/recall see 30 and 30."""
    torch.manual_seed(0)
    clf = Classifier(num_classes=3, width=8, image_size=16).eval()
    images = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8)  # (N, C, H, W)
    labels = torch.arange(30) % 3  # (N,)
    real = extract_features(clf, torch.randint(0, 256, (120, 3, 16, 16), dtype=torch.uint8), batch_size=50,
                            device="cpu").numpy()  # (120, D)
    m = offline_metrics(clf, images, labels, real, num_classes=3, k=3, seed=0)
    assert m["num_compared"] == 30
    assert {"fd_classifier_30", "precision_30", "recall_30", "class_accuracy"} <= set(m)
    assert not any(k in m for k in ("fd_classifier", "precision", "recall"))  # no unlabelled size
    # the same comparison made by hand on the same seeded subsample of the real set
    sub = real[equal_size(30, 120, seed=1).numpy()]
    feats = extract_features(clf, images, batch_size=50, device="cpu").numpy()
    assert (m["precision_30"], m["recall_30"]) == precision_recall(sub, feats, k=3)
    # an unconditional model's samples (label -1) get no class accuracy, the rest stays
    u = offline_metrics(clf, images, torch.full((30,), -1), real, num_classes=3, k=3, seed=0)
    assert "class_accuracy" not in u and u["fd_classifier_30"] == m["fd_classifier_30"]


def test_sweep_rows_become_sized_mlflow_names():
    row = {"guidance_scale": 2.0, "samples": 2000, "class_accuracy": 0.9, "fd_classifier": 1.5,
           "precision": 0.6, "recall": 0.5, "pixel_mean_rel_error": 0.01, "pixel_std_rel_error": 0.07,
           "fid": 20.0, "fid_samples": 2000}
    assert sweep_metric_names(row) == {"class_accuracy": 0.9, "fd_classifier_2k": 1.5,
                                       "precision_2k": 0.6, "recall_2k": 0.5, "pixel_mean_rel_error": 0.01,
                                       "pixel_std_rel_error": 0.07, "fid_2k": 20.0}


def test_fid_50k_default_in_config_and_params_and_the_quickstart_overrides_it(project_params):
    assert Config().sample.num_samples == 50_000 and Config().sample.precision == "fp32"
    cfg = load_config(project_params)
    assert cfg.sample.num_samples == 50_000 and cfg.sample.precision == "fp32"
    assert recipe_params("quickstart")["sample"]["num_samples"] == 500
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in ("sample", "evaluate"):  # evaluation sampling reads sample.precision, not train.precision
        assert "sample" in dvc[stage]["params"] and "train.precision" not in dvc[stage]["params"]


def test_evaluation_sampling_uses_sample_precision_not_train_precision(tmp_path, monkeypatch):
    params = tiny_params(train={**tiny_params()["train"], "precision": "bf16", "steps": 2, "sample_every": 0},
                         tracking=NO_TRACKING)
    cfg = Config.from_dict(params)
    paths = Layout.under(tmp_path)
    prepare(cfg, paths.prepared)
    classifier_stage(cfg, paths)
    fid_stats_stage(cfg, paths)
    train(cfg, paths)  # in bf16
    seen: list[str] = []
    real_generate = sample_mod.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["precision"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sample_mod, "generate", spy)
    meta = sample_stage(cfg, paths)
    evaluate_stage(cfg, paths)  # the guidance sweep samples too
    assert meta["precision"] == "fp32" and len(seen) == 3 + 2 and set(seen) == {"fp32"}
    seen.clear()
    bf16 = Config.from_dict({**params, "sample": {**params["sample"], "precision": "bf16"}})
    assert sample_stage(bf16, paths)["precision"] == "bf16" and set(seen) == {"bf16"}

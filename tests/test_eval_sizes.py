"""Comparable evaluation numbers: equal-size real and generated sets, metric names that state the size,
evaluation sampling in `sample.precision` (not train.precision), and the FID-50k default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import recipe_params, tiny_params

import ddpm.pipeline.evaluate as evaluate_mod
import ddpm.pipeline.sample as sample_mod
import ddpm.pipeline.trained_model as trained_model_mod
from ddpm.config import Config, load_config
from ddpm.data.datasets import prepare
from ddpm.evaluation.classifier import Classifier, extract_features
from ddpm.pipeline.classifier import classifier_stage
from ddpm.pipeline.evaluate import count_tag, equal_size, evaluate_stage, offline_metrics, sweep_metric_names
from ddpm.pipeline.fid_stats import fid_stats_stage
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


def _spy_on_the_comparisons(monkeypatch) -> list[tuple[str, np.ndarray]]:
    """Record the feature sets offline_metrics hands to the FD statistics and to precision/recall."""
    seen: list[tuple[str, np.ndarray]] = []
    stats, pr = evaluate_mod.feature_statistics, evaluate_mod.precision_recall

    def feature_statistics(feats):
        seen.append(("fd", np.asarray(feats)))
        return stats(feats)

    def precision_recall(real, fake, k):
        seen.extend([("pr real", np.asarray(real)), ("pr generated", np.asarray(fake))])
        return pr(real, fake, k=k)

    monkeypatch.setattr(evaluate_mod, "feature_statistics", feature_statistics)
    monkeypatch.setattr(evaluate_mod, "precision_recall", precision_recall)
    return seen


def _rows(a: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.asarray(a, dtype=np.float64)}


def test_offline_metrics_compare_equal_sizes_and_name_them(monkeypatch):
    """30 generated images against 120 real feature vectors, then 120 against 30: FD and precision/recall
    always compare 30 with 30 (distinct members of the larger set), and the names say 30."""
    torch.manual_seed(0)
    clf = Classifier(num_classes=3, width=8, image_size=16).eval()
    images = torch.randint(0, 256, (120, 3, 16, 16), dtype=torch.uint8)  # (N, C, H, W)
    labels = torch.arange(120) % 3  # (N,)
    feats = extract_features(clf, images, batch_size=50, device="cpu").numpy().astype(np.float64)  # (120, D)
    real = feats + 0.5  # (120, D) 120 real feature vectors, none equal to a generated one
    seen = _spy_on_the_comparisons(monkeypatch)
    m = offline_metrics(clf, images[:30], labels[:30], real, num_classes=3, k=3, seed=0)
    assert m["num_compared"] == 30
    assert {"fd_classifier_30", "precision_30", "recall_30", "class_accuracy"} <= set(m)
    assert not any(k in m for k in ("fd_classifier", "precision", "recall"))  # no unlabelled size
    assert [(what, a.shape) for what, a in seen] == [("fd", (30, feats.shape[1]))] * 2 + [
        ("pr real", (30, feats.shape[1])), ("pr generated", (30, feats.shape[1]))]
    pr_real, pr_fake = seen[2][1], seen[3][1]
    assert len(_rows(pr_real)) == 30 and _rows(pr_real) <= _rows(real)  # 30 distinct real vectors
    assert np.allclose(np.sort(pr_fake, axis=0), np.sort(feats[:30], axis=0), atol=1e-5)  # all 30 generated
    fd_real = [a for _, a in seen[:2] if _rows(a) <= _rows(real)]
    assert len(fd_real) == 1 and _rows(fd_real[0]) == _rows(pr_real)  # FD compares the same real subsample
    # the other way round: 120 generated images against 30 real vectors; 30 of the images are compared
    seen.clear()
    m = offline_metrics(clf, images, labels, real[:30], num_classes=3, k=3, seed=0)
    assert m["num_compared"] == 30 and {"fd_classifier_30", "precision_30", "recall_30"} <= set(m)
    assert [a.shape[0] for _, a in seen] == [30, 30, 30, 30]
    assert _rows(seen[2][1]) == _rows(real[:30])
    picked = seen[3][1]  # features of 30 distinct generated images: each one row of `feats`
    nearest = np.abs(picked[:, None, :] - feats[None]).max(axis=2).argmin(axis=1)  # (30,)
    assert len(set(nearest.tolist())) == 30 and np.allclose(picked, feats[nearest], atol=1e-5)
    # an unconditional model's samples (label -1) get no class accuracy, the rest stays
    conditional = offline_metrics(clf, images[:30], labels[:30], real, num_classes=3, k=3, seed=0)
    u = offline_metrics(clf, images[:30], torch.full((30,), -1), real, num_classes=3, k=3, seed=0)
    assert "class_accuracy" not in u and u["fd_classifier_30"] == conditional["fd_classifier_30"]


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

    monkeypatch.setattr(sample_mod, "generate", spy)  # the grid and the denoising picture
    monkeypatch.setattr(trained_model_mod, "generate", spy)  # the evaluation set, and the sweep's sets
    meta = sample_stage(cfg, paths)
    evaluate_stage(cfg, paths)  # the guidance sweep samples too
    assert meta["precision"] == "fp32" and len(seen) == 3 + 2 and set(seen) == {"fp32"}
    seen.clear()
    bf16 = Config.from_dict({**params, "sample": {**params["sample"], "precision": "bf16"}})
    assert sample_stage(bf16, paths)["precision"] == "bf16" and set(seen) == {"bf16"}

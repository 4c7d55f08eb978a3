"""The evaluation workflows: the `classifier`, `fid_stats` and `evaluate` stages.

Offline metrics use a small classifier trained on the prepared data (cached by DVC across diffusion
experiments): class accuracy of conditional samples, the Fréchet distance in its feature space and
k-NN precision/recall. Standard FID/IS use torch-fidelity's InceptionV3 with the FID weights when
`evaluate.fid` is on. The guidance sweep repeats the offline metrics for several guidance scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpm.config import Config
from ddpm.core.generate import SamplerSettings
from ddpm.core.runtime import resolve_device
from ddpm.data.datasets import load_prepared
from ddpm.errors import UserError
from ddpm.evaluation.classifier import (
    extract_features,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)
from ddpm.evaluation.fid import (
    InceptionFeatures,
    fid_from_features,
    inception_outputs,
    inception_score,
    load_stats,
    save_stats,
)
from ddpm.evaluation.metrics import (
    class_accuracy,
    feature_statistics,
    frechet_distance,
    pixel_comparison,
    precision_recall,
)
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.sample import evaluation_set, load_model, load_samples
from ddpm.tracking.files import read_run_id, write_metrics, write_tsv
from ddpm.tracking.tracker import Tracker

SWEEP_COLUMNS = ["guidance_scale", "class_accuracy", "fd_classifier", "precision", "recall", "fid"]


def classifier_stage(cfg: Config, paths: Layout) -> dict:
    """Train the evaluation classifier on the training split; report its held-out accuracy."""
    data = load_prepared(paths.prepared)
    device = resolve_device(cfg.train.device)
    model, acc, per_class = train_classifier(
        data.train_images, data.train_labels, data.eval_images, data.eval_labels,
        cfg.evaluate.classifier, device, cfg.seed, hflip=cfg.data.hflip,
    )
    metrics = {"accuracy": acc, "per_class": dict(zip(data.class_names, per_class, strict=True)),
               "num_eval": int(len(data.eval_labels))}
    save_classifier(paths.classifier, model, {"class_names": list(data.class_names), "accuracy": acc,
                                              "data_hash": data.content_hash})
    write_metrics(paths.classifier_metrics, metrics)
    return metrics


def fid_stats_stage(cfg: Config, paths: Layout) -> dict:
    """Inception pool statistics of the whole training split (computed once; a DVC output).

    With `evaluate.fid: false` the file records that FID is disabled, so the pipeline's shape does not
    depend on the flag and no weights are needed.
    """
    if not cfg.evaluate.fid:
        save_stats(paths.fid_stats, None, None)
        return {"fid": "disabled (evaluate.fid: false)"}
    data = load_prepared(paths.prepared)
    device = resolve_device(cfg.train.device)
    extractor = InceptionFeatures(cfg.evaluate.inception_weights, device,
                                  allow_download=cfg.evaluate.download_inception)
    feats, _ = inception_outputs(extractor, data.train_images, batch_size=200)
    mu, sigma = feature_statistics(feats)
    save_stats(paths.fid_stats, mu, sigma)
    return {"fid_reference_images": int(len(feats))}


def offline_metrics(classifier, images: torch.Tensor, labels: torch.Tensor, real_feats: np.ndarray,
                    num_classes: int, k: int) -> dict:
    """Class accuracy, classifier-feature Fréchet distance and precision/recall of uint8 samples."""
    device = next(classifier.parameters()).device
    pred = predict(classifier, images, batch_size=500, device=device)  # (N,)
    acc, per_class = class_accuracy(pred, labels, num_classes)
    feats = extract_features(classifier, images, batch_size=500, device=device)  # (N, D)
    fd = frechet_distance(*feature_statistics(feats), *feature_statistics(real_feats))
    precision, recall = precision_recall(real_feats, feats, k=k)
    return {"class_accuracy": acc, "class_accuracy_per_class": per_class, "fd_classifier": fd,
            "precision": precision, "recall": recall}


class _FidScorer:
    """The Inception network and the training-set statistics, loaded once for every FID/IS computed here."""

    def __init__(self, cfg: Config, paths: Layout, device: torch.device):
        self.mu, self.sigma = load_stats(paths.fid_stats)
        if self.mu is None:
            raise UserError(
                f"{paths.fid_stats} was made with evaluate.fid: false; rerun the fid_stats stage (dvc repro fid_stats)"
            )
        self.extractor = InceptionFeatures(cfg.evaluate.inception_weights, device,
                                           allow_download=cfg.evaluate.download_inception)

    def __call__(self, images: torch.Tensor) -> dict:
        """Standard FID against the training statistics and the Inception Score of uint8 images."""
        feats, logits = inception_outputs(self.extractor, images, batch_size=200)
        is_mean, is_std = inception_score(logits)
        return {"fid": fid_from_features(feats, self.mu, self.sigma), "inception_score": is_mean,
                "inception_score_std": is_std}


def real_subset(num_real: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Indices (n,) of a seeded random subset of the held-out images, not a prefix: a folder dataset's held-out
    images are stored class by class, so its first n would be a few classes only."""
    return torch.randperm(num_real, generator=gen)[:n]


def evaluate_stage(cfg: Config, paths: Layout, sweep: list[float] | None = None) -> dict:
    """Metrics of the sample stage's images, the real-data floor, FID/IS if on, and the guidance sweep."""
    data = load_prepared(paths.prepared)
    classifier = load_classifier(paths.classifier, resolve_device(cfg.train.device))
    images, labels, meta = load_samples(paths.samples)
    device = next(classifier.parameters()).device
    n_real = min(len(images), len(data.eval_images))
    gen = torch.Generator().manual_seed(cfg.seed)
    real = data.eval_images[real_subset(len(data.eval_images), n_real, gen)]
    real_feats = extract_features(classifier, real, batch_size=500, device=device)
    k, num_classes = cfg.evaluate.pr_k, len(data.class_names)
    metrics = offline_metrics(classifier, images, labels, real_feats, num_classes, k)
    metrics["class_accuracy_per_class"] = dict(zip(data.class_names, metrics["class_accuracy_per_class"], strict=True))
    # the floor: the same distance between two sets of REAL images of the same size (held-out vs. train)
    train_idx = torch.randperm(len(data.train_images), generator=gen)[:n_real]
    train_feats = extract_features(classifier, data.train_images[train_idx], batch_size=500, device=device)
    metrics["fd_classifier_floor"] = frechet_distance(*feature_statistics(train_feats),
                                                      *feature_statistics(real_feats))
    # the classifier on ALL held-out real images: equals its own accuracy in metrics/classifier.json
    metrics["real_class_accuracy"] = class_accuracy(
        predict(classifier, data.eval_images, batch_size=500, device=device), data.eval_labels, num_classes)[0]
    # per-channel pixel mean/std of the samples against ALL held-out real images (saturated colours, leftover noise)
    metrics.update(pixel_comparison(images, data.eval_images))
    fid = _FidScorer(cfg, paths, device) if cfg.evaluate.fid else None
    if fid is not None:
        metrics.update(fid(images))
    metrics["sample_settings"] = meta
    rows = _guidance_sweep(cfg, paths, classifier, real_feats, num_classes,
                           cfg.evaluate.guidance_sweep if sweep is None else sweep, fid)
    _write_sweep(paths.sweep, rows)
    write_metrics(paths.eval_metrics, metrics)
    _log(cfg, paths, metrics, rows)
    return metrics


def _guidance_sweep(cfg: Config, paths: Layout, classifier, real_feats: np.ndarray, num_classes: int,
                    scales: list[float], fid: _FidScorer | None) -> list[dict]:
    """One row of offline metrics (and FID when on) per guidance scale, on fresh samples."""
    if not scales:
        return []
    lm = load_model(paths.ema, cfg)
    rows = []
    for w in scales:
        settings = SamplerSettings.from_config(cfg.sample, guidance_scale=w)
        images, labels = evaluation_set(lm, settings, cfg.evaluate.sweep_samples, cfg.seed + 2,
                                        cfg.sample.batch_size, cfg.train.precision)
        m = offline_metrics(classifier, images, labels, real_feats, num_classes, cfg.evaluate.pr_k)
        row = {"guidance_scale": w, **{c: m[c] for c in SWEEP_COLUMNS[1:5]}}
        if fid is not None:
            row["fid"] = fid(images)["fid"]
        rows.append(row)
    return rows


def _write_sweep(path: Path, rows: list[dict]) -> None:
    columns = [c for c in SWEEP_COLUMNS if any(c in r for r in rows)] or SWEEP_COLUMNS[:5]
    write_tsv(path, columns, rows)


def _log(cfg: Config, paths: Layout, metrics: dict, rows: list[dict]) -> None:
    """Final metrics (and the sweep, stepped by guidance scale x 100) into the pipeline's MLflow run."""
    run_id = read_run_id(paths.sample_run)
    if not run_id:
        return
    # the sample stage's run, or a new child of the training run when the evaluate params changed since
    tracker = Tracker.start(cfg, paths.root, run_name=None, run_id=run_id, tags={}, new_run_if_params_differ=True)
    try:
        scalars = {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        tracker.log_final(scalars)
        for r in rows:
            tracker.log_metrics({f"sweep_{k}": v for k, v in r.items() if k != "guidance_scale"},
                                step=int(round(r["guidance_scale"] * 100)))
        tracker.log_artifact(paths.eval_metrics)
        tracker.log_artifact(paths.sweep)
    finally:
        tracker.finish("FINISHED")

"""The `evaluate` stage: the sample stage's images scored against the held-out data.

Offline metrics use the small classifier of the `classifier` stage (cached by DVC across diffusion
experiments): class accuracy of conditional samples, the Fréchet distance in its feature space and
k-NN precision/recall. Standard FID/IS use torch-fidelity's InceptionV3 with the FID weights when
`evaluate.fid` is on. The guidance sweep repeats the offline metrics for several guidance scales.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ddpm.config import Config
from ddpm.core.generate import SamplerSettings
from ddpm.core.runtime import configure_backends, configure_cpu_allocator
from ddpm.data.prepared import load_prepared
from ddpm.errors import UserError
from ddpm.evaluation.classifier import extract_features, load_classifier, predict
from ddpm.evaluation.fid import InceptionFeatures, fid_from_features, inception_outputs, inception_score, load_stats
from ddpm.evaluation.metrics import (
    class_accuracy,
    feature_statistics,
    frechet_distance,
    pixel_comparison,
    precision_recall,
)
from ddpm.pipeline.devices import resolve_device
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.run_files import load_samples, pipeline_tracker
from ddpm.pipeline.trained_model import check_steps, evaluation_set, load_model
from ddpm.tracking.files import write_metrics, write_tsv
from ddpm.tracking.names import EVAL, SWEEP, grouped
from ddpm.tracking.tracker import Tracker

log = logging.getLogger(__name__)

SWEEP_COLUMNS = ["guidance_scale", "guidance_interval_lo", "guidance_interval_hi", "samples", "class_accuracy",
                 "fd_classifier", "precision", "recall", "pixel_mean_rel_error", "pixel_std_rel_error", "fid",
                 "fid_samples"]
EMPTY_SWEEP_COLUMNS = ["guidance_scale", "samples", "class_accuracy", "fd_classifier", "precision", "recall"]


def count_tag(n: int) -> str:
    """How a metric name states its sample count: 50000 -> '50k', 2000 -> '2k', 500 -> '500'."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def equal_size(n: int, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded subsample of `n` out of `size` items (all of them when n >= size)."""
    if n >= size:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].sort().values  # (n,)


def offline_metrics(classifier, images: torch.Tensor, labels: torch.Tensor, real_feats: np.ndarray,
                    num_classes: int, k: int, seed: int) -> dict:
    """Class accuracy (conditional samples only), classifier-feature Fréchet distance and precision/recall of
    uint8 samples against real features; FD and precision/recall compare equal-size sets (a seeded subsample
    of the larger), because both depend on set size, and their names carry that size (`fd_classifier_2k`)."""
    device = next(classifier.parameters()).device
    out: dict = {}
    if labels.min() >= 0:  # an unconditional model's samples are labelled -1: there is nothing to check
        # every sample: an accuracy's expectation does not depend on the count, only its noise does
        pred = predict(classifier, images, batch_size=500, device=device)  # (N,)
        out["class_accuracy"], out["class_accuracy_per_class"] = class_accuracy(pred, labels, num_classes)
    n = min(len(images), len(real_feats))
    images = images[equal_size(n, len(images), seed)]  # (n, C, H, W)
    real_feats = real_feats[equal_size(n, len(real_feats), seed + 1).numpy()]  # (n, D)
    feats = extract_features(classifier, images, batch_size=500, device=device)  # (n, D)
    tag = count_tag(n)
    out[f"fd_classifier_{tag}"] = frechet_distance(*feature_statistics(feats), *feature_statistics(real_feats))
    out[f"precision_{tag}"], out[f"recall_{tag}"] = precision_recall(real_feats, feats, k=k)
    out["num_compared"] = n
    return out


def fd_floor(classifier, data, real_feats: np.ndarray, n: int, seed: int) -> float:
    """The floor of `fd_classifier` at size n: the same distance between two equal-size sets of REAL images,
    `n` training images against the `n` held-out ones `offline_metrics` compares samples with (same `seed`)."""
    device = next(classifier.parameters()).device
    real_n = real_feats[equal_size(n, len(real_feats), seed + 1).numpy()]  # (n, D): the set compared above
    train_idx = equal_size(n, len(data.train_images), seed)
    train_feats = extract_features(classifier, data.train_images[train_idx], batch_size=500, device=device)  # (n, D)
    return frechet_distance(*feature_statistics(train_feats), *feature_statistics(real_n))


def real_class_accuracy(classifier, data) -> float:
    """The classifier on ALL held-out real images: its own accuracy (metrics/classifier.json), the ceiling that
    `class_accuracy_ratio` = class accuracy / this reads samples against."""
    device = next(classifier.parameters()).device
    pred = predict(classifier, data.eval_images, batch_size=500, device=device)  # (M,)
    return class_accuracy(pred, data.eval_labels, len(data.class_names))[0]


UNCONDITIONAL = "skipped: the model is unconditional (model.num_classes: 0), its samples have no class labels"


class FidScorer:
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
        """FID and Inception Score of uint8 images, named by their count (`fid_50k`).

        FID follows the published protocol: the generated set against the statistics of the whole training
        set (the fid_stats stage), so FID-50k on CIFAR-10 compares 50k with 50k.
        """
        feats, logits = inception_outputs(self.extractor, images, batch_size=200)
        is_mean, is_std = inception_score(logits)
        tag = count_tag(len(images))
        return {f"fid_{tag}": fid_from_features(feats, self.mu, self.sigma), f"inception_score_{tag}": is_mean,
                f"inception_score_std_{tag}": is_std}


def evaluate_stage(cfg: Config, paths: Layout, sweep: list[float] | None = None) -> dict:
    """Metrics of the sample stage's images, the real-data floor, FID/IS if on, and the guidance sweep.

    The MLflow run is open while scoring (FAILED on a crash, KILLED on SIGINT/SIGTERM); inputs are read first,
    so unreadable ones stop the stage before it touches any run.
    """
    data = load_prepared(paths.prepared)
    classifier = load_classifier(paths.classifier, resolve_device(cfg.train.device))
    images, labels, meta = load_samples(paths.samples)
    with pipeline_tracker(cfg, paths, paths.sample_run) as tracker:
        log.info("evaluate: scoring %d samples", len(images))
        metrics, rows = _evaluate(cfg, paths, data, classifier, images, labels, meta, sweep)
        write_metrics(paths.eval_metrics, metrics)
        _write_sweep(paths.sweep, rows)
        _log(tracker, paths, metrics, rows)
    return metrics


def _evaluate(cfg: Config, paths: Layout, data, classifier, images, labels, meta: dict,
              sweep: list[float] | None) -> tuple[dict, list[dict]]:
    """The metrics of eval.json and the rows of the guidance sweep."""
    device = next(classifier.parameters()).device
    real_feats = extract_features(classifier, data.eval_images, batch_size=500, device=device)  # (M, D)
    k, num_classes = cfg.evaluate.pr_k, len(data.class_names)
    metrics = offline_metrics(classifier, images, labels, real_feats, num_classes, k, cfg.seed)
    if "class_accuracy" in metrics:
        metrics["class_accuracy_per_class"] = dict(zip(data.class_names, metrics["class_accuracy_per_class"],
                                                       strict=True))
    else:
        metrics["class_accuracy"] = UNCONDITIONAL
    n = metrics["num_compared"]
    metrics[f"fd_classifier_floor_{count_tag(n)}"] = fd_floor(classifier, data, real_feats, n, cfg.seed)
    metrics["real_class_accuracy"] = real_class_accuracy(classifier, data)
    if isinstance(metrics["class_accuracy"], float):
        metrics["class_accuracy_ratio"] = metrics["class_accuracy"] / metrics["real_class_accuracy"]
    # per-channel pixel mean/std of the samples against ALL held-out real images (saturated colours, leftover noise)
    metrics.update(pixel_comparison(images, data.eval_images))
    fid = FidScorer(cfg, paths, device) if cfg.evaluate.fid else None
    if fid is not None:
        metrics.update(fid(images))
    metrics["sample_settings"] = meta
    if "network_evaluations" in meta:  # sample files written before it was recorded lack it
        metrics["sampling_nfe"] = meta["network_evaluations"]
    scales = cfg.evaluate.guidance_sweep if sweep is None else sweep
    if labels.min() < 0:
        metrics["guidance_sweep"] = UNCONDITIONAL
        scales = []
    rows = _guidance_sweep(cfg, paths, classifier, real_feats, data.eval_images, num_classes, scales, fid)
    return metrics, rows


def _guidance_sweep(cfg: Config, paths: Layout, classifier, real_feats: np.ndarray, real_images: torch.Tensor,
                    num_classes: int, scales: list[float], fid: FidScorer | None) -> list[dict]:
    """One row of offline metrics (and FID when on) per guidance scale, on fresh samples.

    Each row also has the samples' worst per-channel pixel mean/std gap to the real held-out images: guidance
    widens the colour distribution (saturated colours), which this shows scale by scale.

    The plot file's columns keep plain names (dvc.yaml's plot names them) and its `samples` column gives the
    size of each compared set; eval.json, MLflow and `ddpm compare` carry the size in the name instead.
    """
    if not scales:
        return []
    configure_backends(cfg.train.deterministic)
    lm = load_model(paths.ema, cfg)
    configure_cpu_allocator(lm.device)
    check_steps(lm, cfg.sample.steps, "sample.steps")
    rows = []
    # evaluate.guidance_interval_sweep: every scale on every interval, the rows naming it (None: everywhere)
    intervals = cfg.evaluate.guidance_interval_sweep or (...,)  # ...: the sample section's own interval
    points = [(w, i) for w in scales for i in intervals]
    for n, (w, interval) in enumerate(points, 1):
        settings = SamplerSettings.from_config(cfg.sample, guidance_scale=w, guidance_interval=interval)
        log.info("guidance sweep %d/%d: sampling %d images at scale %g", n, len(points), cfg.evaluate.sweep_samples, w)
        images, labels = evaluation_set(lm, settings, cfg.evaluate.sweep_samples, cfg.seed + 2,
                                        cfg.sample.batch_size, cfg.sample.precision)
        log.info("guidance sweep %d/%d: scoring them", n, len(points))
        row = {"guidance_scale": w, **score_row(classifier, images, labels, real_feats, real_images, num_classes,
                                                cfg.evaluate.pr_k, cfg.seed, fid)}
        if interval is not ...:
            lo, hi = settings.guidance_interval or (None, None)
            row |= {"guidance_interval_lo": lo, "guidance_interval_hi": hi}
        rows.append(row)
    return rows


def score_row(classifier, images: torch.Tensor, labels: torch.Tensor, real_feats: np.ndarray,
              real_images: torch.Tensor, num_classes: int, k: int, seed: int, fid: FidScorer | None) -> dict:
    """One plot row of a sample set (the guidance sweep's, the progress curve's): `offline_metrics` with plain
    names and `samples` the compared sets' size, the worst pixel mean/std gaps to the real images, and FID
    (with `fid_samples`) when `fid` is given. An unconditional set's row has no class accuracy."""
    m = offline_metrics(classifier, images, labels, real_feats, num_classes, k, seed)
    tag = count_tag(m["num_compared"])
    row = {"samples": m["num_compared"], "fd_classifier": m[f"fd_classifier_{tag}"],
           "precision": m[f"precision_{tag}"], "recall": m[f"recall_{tag}"]}
    if "class_accuracy" in m:
        row["class_accuracy"] = m["class_accuracy"]
    px = pixel_comparison(images, real_images)
    row |= {key: px[key] for key in ("pixel_mean_rel_error", "pixel_std_rel_error")}
    if fid is not None:
        row["fid"] = fid(images)[f"fid_{count_tag(len(images))}"]
        row["fid_samples"] = len(images)
    return row


def _write_sweep(path: Path, rows: list[dict]) -> None:
    columns = [c for c in SWEEP_COLUMNS if any(c in r for r in rows)] or EMPTY_SWEEP_COLUMNS
    write_tsv(path, columns, rows)


def sweep_metric_names(row: dict) -> dict[str, float]:
    """A plot row's metrics named by their sample counts: `fd_classifier_2k`, `fid_2k`, `class_accuracy`...
    (logged under `sweep/`, and `progress/` for the curve's rows); keys a row lacks are left out."""
    tag, fid_tag = count_tag(int(row["samples"])), count_tag(int(row.get("fid_samples", 0)))
    plain = ("class_accuracy", "class_accuracy_ratio", "pixel_mean_rel_error", "pixel_std_rel_error")
    out = {key: row[key] for key in plain if key in row}
    for key in ("fd_classifier", "fd_classifier_floor", "precision", "recall"):
        if key in row:
            out[f"{key}_{tag}"] = row[key]
    if "fid" in row:
        out[f"fid_{fid_tag}"] = row["fid"]
    return out


def _log(tracker: Tracker, paths: Layout, metrics: dict, rows: list[dict]) -> None:
    """Final metrics (and the sweep, stepped by guidance scale x 100) into the pipeline's MLflow run."""
    tracker.log_final(grouped(EVAL, {k: v for k, v in metrics.items() if isinstance(v, int | float)}))
    for r in rows:
        names = grouped(SWEEP, sweep_metric_names(r))
        if "guidance_interval_lo" in r:  # one series per interval (sweep/interval_0.28-5.42/...), stepped by scale
            lo, hi = r["guidance_interval_lo"], r["guidance_interval_hi"]
            where = "everywhere" if lo is None else f"{lo:g}-{hi:g}"
            names = {f"{SWEEP}/interval_{where}/{k.split('/', 1)[1]}": v for k, v in names.items()}
        tracker.log_metrics(names, step=int(round(r["guidance_scale"] * 100)))
    tracker.log_artifact(paths.eval_metrics)
    tracker.log_artifact(paths.sweep)

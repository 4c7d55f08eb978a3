"""The `progress` stage: the quality curve, each EMA snapshot of training (`models/snapshots/`) scored.

Training keeps the snapshots (`ddpm.pipeline.snapshots`); this stage, after it, samples each with the
`progress` params and the same seeds and classes at every point (so the curve measures the model, not
the draw) and scores the samples against the held-out images with the evaluate stage's own functions:
class accuracy and its ratio to the classifier's accuracy on real images, fd_classifier with its
real-data floor at the same size, precision/recall, the pixel mean/std gaps and, when
`progress.fid` and `evaluate.fid` are on, FID at the same size. Changing how the curve is scored re-runs
only this stage, never the training. Writes `plots/progress.tsv` (a DVC plot against step) and
`samples/progress_curve.png`, and logs `progress/<metric>` at each snapshot's step into the training's
MLflow run and TensorBoard directory (`models/run.json`).
"""

from __future__ import annotations

import logging

from ddpm.config import Config
from ddpm.core.generate import SamplerSettings
from ddpm.core.images import save_png
from ddpm.core.runtime import configure_backends, configure_cpu_allocator
from ddpm.data.prepared import PreparedData, load_prepared
from ddpm.errors import UserError
from ddpm.evaluation.classifier import extract_features, load_classifier
from ddpm.pipeline.curve_figure import curve_figure
from ddpm.pipeline.devices import resolve_device
from ddpm.pipeline.evaluate import FidScorer, fd_floor, real_class_accuracy, score_row, sweep_metric_names
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.snapshots import stored_snapshots
from ddpm.pipeline.trained_model import check_steps, evaluation_set, load_model
from ddpm.tracking.files import read_run_id, write_tsv
from ddpm.tracking.names import PROGRESS, grouped
from ddpm.tracking.tracker import Tracker

log = logging.getLogger(__name__)

CURVE_COLUMNS = ["step", "images_seen", "samples", "class_accuracy", "class_accuracy_ratio", "fd_classifier",
                 "fd_classifier_floor", "precision", "recall", "pixel_mean_rel_error", "pixel_std_rel_error", "fid",
                 "fid_samples"]
SEED_OFFSET = 3  # the curve's samples: seed + 3 (the sample stage draws seed + 1, the guidance sweep seed + 2)


def progress_stage(cfg: Config, paths: Layout) -> list[dict]:
    """Score every snapshot, write the curve (TSV and figure), log it into the training's run; return the rows.

    Inputs are read first, so a missing one stops the stage before it touches the training's MLflow run.
    """
    snapshots = stored_snapshots(paths.snapshots)
    if not snapshots:
        raise UserError(f"{paths.snapshots} holds no EMA snapshots (train.max_snapshots: 0); set "
                        "train.max_snapshots to at least 1 and run the train stage again")
    configure_backends(cfg.train.deterministic)
    data = load_prepared(paths.prepared)
    device = resolve_device(cfg.train.device)
    classifier = load_classifier(paths.classifier, device)
    fid = FidScorer(cfg, paths, device) if cfg.progress.fid and cfg.evaluate.fid else None
    run_id = read_run_id(paths.train_run)
    # the training's own run, re-opened (not a child): the curve is a property of the training
    with (Tracker.start(cfg, paths.root, run_id=run_id, asynchronous=False) if run_id else Tracker()) as tracker:
        rows = score_snapshots(cfg, paths, data, classifier, fid, [path for _, path in snapshots])
        write_tsv(paths.progress_plot, [c for c in CURVE_COLUMNS if any(c in r for r in rows)], rows)
        batch_size = rows[-1]["images_seen"] // max(rows[-1]["step"], 1)
        figure = curve_figure(rows, batch_size)
        save_png(paths.progress_curve, figure)
        for row in rows:
            tracker.log_metrics(grouped(PROGRESS, {**sweep_metric_names(row), "images_seen": row["images_seen"]}),
                                step=row["step"])
        tracker.log_image(f"{PROGRESS}/curve", figure, step=rows[-1]["step"])
        tracker.log_artifact(paths.progress_plot)
    return rows


def score_snapshots(cfg: Config, paths: Layout, data: PreparedData, classifier, fid: FidScorer | None,
                    checkpoints: list) -> list[dict]:
    """One curve row per checkpoint (in the given order): its step, images seen and `score_row`'s metrics,
    with the floor and the accuracy ratio, which depend on the real images and the set size alone."""
    pc = cfg.progress
    settings = SamplerSettings(sampler=pc.sampler, steps=pc.steps, eta=0.0, guidance_scale=pc.guidance_scale,
                               spacing=pc.spacing)
    device = next(classifier.parameters()).device
    real_feats = extract_features(classifier, data.eval_images, batch_size=500, device=device)  # (M, D)
    real_accuracy = real_class_accuracy(classifier, data)
    floors: dict[int, float] = {}
    rows = []
    for i, checkpoint in enumerate(checkpoints, 1):
        lm = load_model(checkpoint, cfg, pc.precision, compile=False)  # compiling each snapshot would cost more
        configure_cpu_allocator(lm.device)
        check_steps(lm, pc.steps, "progress.steps")
        log.info("progress %d/%d: step %d, %d samples", i, len(checkpoints), lm.step, pc.num_samples)
        images, labels = evaluation_set(lm, settings, pc.num_samples, cfg.seed + SEED_OFFSET, pc.batch_size,
                                        pc.precision)  # the same seeds and classes for every snapshot
        row = score_row(classifier, images, labels, real_feats, data.eval_images, len(data.class_names),
                        cfg.evaluate.pr_k, cfg.seed, fid)
        n = row["samples"]
        if n not in floors:
            floors[n] = fd_floor(classifier, data, real_feats, n, cfg.seed)
        row["fd_classifier_floor"] = floors[n]
        if "class_accuracy" in row:
            row["class_accuracy_ratio"] = row["class_accuracy"] / real_accuracy
        rows.append({"step": lm.step, "images_seen": lm.step * lm.config.train.batch_size, **row})
    return rows

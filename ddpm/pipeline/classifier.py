"""The `classifier` stage: the evaluation classifier trained on the prepared training split (cached by DVC
across diffusion experiments, since it depends on the data only)."""

from __future__ import annotations

import logging

from ddpm.config import Config
from ddpm.data.prepared import load_prepared
from ddpm.evaluation.classifier import save_classifier, train_classifier
from ddpm.pipeline.devices import resolve_device
from ddpm.pipeline.layout import Layout
from ddpm.tracking.files import write_metrics

log = logging.getLogger(__name__)


def classifier_stage(cfg: Config, paths: Layout) -> dict:
    """Train the evaluation classifier on the training split; report its held-out accuracy."""
    data = load_prepared(paths.prepared)
    device = resolve_device(cfg.train.device)
    log.info("classifier: %d epochs on %d images", cfg.evaluate.classifier.epochs, len(data.train_labels))
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

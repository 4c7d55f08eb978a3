"""What the sample stage hands to evaluate: the evaluation set (`samples.npz`) and the MLflow run that a
stage's `run.json` names, which both stages log into."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ddpm.config import Config
from ddpm.core.atomic import atomic_path
from ddpm.errors import UserError
from ddpm.pipeline.layout import Layout
from ddpm.tracking.files import read_run_id
from ddpm.tracking.tracker import Tracker


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor, meta: dict) -> None:
    """The evaluation set as one compact .npz (uint8 images, int64 labels, JSON metadata)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images.numpy(), labels=labels.numpy(), meta=json.dumps(meta))


def load_samples(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Read what `save_samples` wrote."""
    if not Path(path).exists():
        raise UserError(f"{path} not found; run the sample stage first (dvc repro sample)")
    with np.load(path, allow_pickle=False) as z:
        return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), json.loads(str(z["meta"]))


def pipeline_tracker(cfg: Config, paths: Layout, run_info: Path, tags: dict[str, str] | None = None) -> Tracker:
    """The tracker of a sample or evaluate stage, to be entered before the work starts: the MLflow run that
    `run_info` names (re-opened, or a new child of the training run when these params are not the ones it
    logged), or a tracker that logs nothing when the pipeline has no MLflow run. `tags` are set on that run."""
    run_id = read_run_id(run_info)
    if not run_id:
        return Tracker()
    return Tracker.start(cfg, paths.root, run_name=None, run_id=run_id, tags=tags or {}, asynchronous=False,
                         new_run_if_params_differ=True)

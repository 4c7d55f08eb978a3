"""Metric names in MLflow and TensorBoard: one group prefix per source, so both UIs group the cards.

TensorBoard sorts its scalar cards into sections by the text before the first `/`, and MLflow's
charts view does the same. Every metric the pipeline logs goes through `grouped`, so the prefixes
live here and nowhere else (the DVC metrics files keep their own, unprefixed structure).
"""

from __future__ import annotations

from collections.abc import Mapping

TRAIN = "train"  # the training loop: loss, loss quarters, grad norm, lr, images/s, bad-step counters
TRAIN_FINAL = "train/final_"  # the training's final numbers (metrics/train.json), copied into derived runs
EVAL = "eval"  # the evaluate stage's metrics of the sample stage's images
SWEEP = "sweep"  # the guidance sweep, stepped by guidance scale x 100
PROGRESS = "progress"  # the progress stage's quality curve: each EMA snapshot scored, stepped by training step
RESOURCES = "resources"  # process and device readings (ddpm.tracking.resources); MLflow's own are system/
SAMPLES = "samples"  # images: the class grid; training progress grids are train/progress

GROUPS = (TRAIN, EVAL, SWEEP, PROGRESS, RESOURCES)


def grouped(group: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` with every key put under `group` (`loss` -> `train/loss`); already grouped keys are kept."""
    return {key if "/" in key else f"{group}/{key}": value for key, value in metrics.items()}


def final_train(metrics: Mapping[str, float]) -> dict[str, float]:
    """The training's final numbers under `train/final_` (`loss` -> `train/final_loss`)."""
    return {f"{TRAIN_FINAL}{key}": value for key, value in metrics.items()}

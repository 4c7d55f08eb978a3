"""The split every dataset source hands to `prepare`: training and held-out arrays, seeded per class."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Split:
    """What a source hands to `prepare`: numpy arrays plus the files it could not read."""

    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    class_names: list[str]
    skipped: list[str]


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class hold-out: `(train_idx, eval_idx)`, each sorted.

    Each class with n images gives round(fraction * n) of them to eval, at least 1 and at most n - 1
    (a class with a single image stays entirely in train).
    """
    rng = np.random.default_rng(seed)
    eval_parts = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = len(members)
        k = min(n - 1, max(1, round(fraction * n)))
        eval_parts.append(members[:k])
    eval_idx = np.sort(np.concatenate(eval_parts)) if eval_parts else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), eval_idx)
    return train_idx, eval_idx


def hold_out(images: np.ndarray, labels: np.ndarray, names: list[str], fraction: float, seed: int,
             skipped: list[str]) -> Split:
    """Hold out `fraction` of each class (`stratified_split`, seeded by `seed`)."""
    train_idx, eval_idx = stratified_split(labels, fraction, seed)
    return Split(images[train_idx], labels[train_idx], images[eval_idx], labels[eval_idx], names, skipped)

"""The `prepare` workflow: turn a raw image source into one compact, hashed uint8 dataset file.

`prepare(cfg, out_dir)` reads CIFAR-10 (`cifar10`), an ImageFolder-style directory or an archive of one
(`folder`, `archives`) or the synthetic shapes (`shapes`), splits off a held-out set (`splits`), and
writes `out_dir/dataset.npz` plus `out_dir/meta.json` (`prepared`, which also reads it back). Every
check runs before anything is written, so a failed prepare leaves `out_dir` as it was.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ddpm.config import Config
from ddpm.core.atomic import write_text
from ddpm.data.cifar10 import load_cifar10
from ddpm.data.folder import load_folder
from ddpm.data.prepared import check_class_count, content_hash, write_npz
from ddpm.data.shapes import generate_shapes
from ddpm.data.splits import Split, hold_out
from ddpm.errors import UserError

log = logging.getLogger(__name__)


def _load_source(cfg: Config) -> Split:
    """The images of `cfg.data.dataset`, split into training and held-out sets."""
    data = cfg.data
    if data.dataset == "cifar10":  # CIFAR-10 has its own test set: the held-out split
        return load_cifar10(Path(data.raw_dir), data.image_size)
    if data.dataset == "folder":
        return load_folder(Path(data.folder or ""), data.image_size, data.holdout_fraction, cfg.seed)
    images, labels, names = generate_shapes(data.shapes_per_class, data.image_size, cfg.seed)
    return hold_out(images, labels, names, data.holdout_fraction, cfg.seed, skipped=[])


def _check_classes(split: Split, cfg: Config) -> None:
    """The class count fits the model and both splits hold images."""
    check_class_count(split.class_names, cfg, f"the {cfg.data.dataset} dataset")
    if len(split.train_images) == 0 or len(split.eval_images) == 0:
        raise UserError("the prepared dataset has an empty train or eval split; add images (>= 2 per class)")


def _warn_skipped(skipped: list[str], source: str) -> None:
    """One stderr line about files that were skipped."""
    if skipped:
        examples = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        log.warning("skipped %d non-image or unreadable file(s) in %s: %s", len(skipped), source, examples)


def prepare(cfg: Config, out_dir: str | Path) -> dict:
    """Prepare `cfg.data` into `out_dir/dataset.npz` and `out_dir/meta.json`; returns the meta dict.

    meta = {dataset, image_size, num_train, num_eval, num_classes, class_names, content_hash,
    skipped_files (count), skipped_examples (up to 5 paths)}. Raises `UserError` (writing nothing)
    for a missing/empty source, a class-count mismatch with `model.num_classes`, or unusable CIFAR-10.
    """
    out_dir = Path(out_dir)
    split = _load_source(cfg)
    _check_classes(split, cfg)
    arrays = {
        "train_images": split.train_images,  # (N, 3, H, W) uint8
        "train_labels": split.train_labels.astype(np.int64),  # (N,)
        "eval_images": split.eval_images,  # (M, 3, H, W) uint8
        "eval_labels": split.eval_labels.astype(np.int64),  # (M,)
        "class_names": np.array(split.class_names, dtype=str),  # (K,)
    }
    digest = content_hash(arrays)
    write_npz(out_dir / "dataset.npz", {**arrays, "content_hash": np.array(digest)})
    meta = {
        "dataset": cfg.data.dataset,
        "image_size": cfg.data.image_size,
        "num_train": len(split.train_labels),
        "num_eval": len(split.eval_labels),
        "num_classes": len(split.class_names),
        "class_names": split.class_names,
        "content_hash": digest,
        "skipped_files": len(split.skipped),
        "skipped_examples": split.skipped[:5],
    }
    write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    _warn_skipped(split.skipped, cfg.data.folder or cfg.data.dataset)
    return meta

"""The prepared-data format: `dataset.npz` (train/eval images uint8 (N, 3, H, W), labels int64, class
names, content hash), written byte-for-byte reproducibly and read back as tensors.

Fixed zip timestamps and no compression: re-running prepare on the same input gives the same DVC hash and
does not invalidate later stages.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpm.config import TrainingConfig
from ddpm.core.atomic import atomic_open
from ddpm.errors import UserError

ARRAY_KEYS = ("train_images", "train_labels", "eval_images", "eval_labels", "class_names")


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset in memory: uint8 images (N, 3, H, W) and int64 labels (N,) as CPU tensors."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    class_names: list[str]
    content_hash: str


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over each array's name, dtype, shape and bytes (class names included), in a fixed order."""
    digest = hashlib.sha256()
    for key in ARRAY_KEYS:
        arr = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update("\n".join(arr.tolist()).encode() if key == "class_names" else arr.tobytes())
    return digest.hexdigest()


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed .npz with fixed timestamps: the same arrays always give the same bytes."""
    with atomic_open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)


def check_class_count(class_names: list[str], cfg: TrainingConfig, what: str) -> None:
    """The model's class count must match the data's (0 = an unconditional model accepts any).

    Checked when preparing and again when training starts (model.num_classes may change in between).
    """
    n = len(class_names)
    if cfg.model.num_classes not in (0, n):
        raise UserError(
            f"{what} has {n} classes but model.num_classes is {cfg.model.num_classes}; "
            f"set model.num_classes: {n} in params.yaml"
        )


def load_prepared(out_dir: str | Path) -> PreparedData:
    """Read `out_dir/dataset.npz` (written by `prepare`) as CPU tensors."""
    path = Path(out_dir) / "dataset.npz"
    if not path.is_file():
        raise UserError(f"{path} not found; run the prepare stage first (dvc repro prepare)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in (*ARRAY_KEYS, "content_hash")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} is damaged or from another version ({err}); run the prepare stage again") from None
    return PreparedData(
        train_images=torch.from_numpy(arrays["train_images"]),  # (N, 3, H, W) uint8
        train_labels=torch.from_numpy(arrays["train_labels"]),  # (N,) int64
        eval_images=torch.from_numpy(arrays["eval_images"]),  # (M, 3, H, W) uint8
        eval_labels=torch.from_numpy(arrays["eval_labels"]),  # (M,) int64
        class_names=[str(n) for n in arrays["class_names"]],
        content_hash=str(arrays["content_hash"]),
    )

"""Between pixels and model space: uint8 to [-1, 1] and back, grids, PNG files (written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from ddpm.core.atomic import atomic_path


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map model space [-1, 1] to uint8 pixels, rounding to nearest."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)


def to_model_space(images_u8: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels to model space [-1, 1] as float32, bit-identically on every device.

    Integer arithmetic is exact in float32 and one multiply rounds the same on every device, so CPU and
    CUDA give bit-identical inputs (`/ 127.5` does not: CUDA divides by multiplying with the reciprocal).
    """
    return (images_u8.float() * 2.0 - 255.0) * (1.0 / 255.0)  # (B, C, H, W); 0 -> -1 and 255 -> 1 exactly


def grid_hwc(images_u8: torch.Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """Tile uint8 images (N, C, H, W) into one (H', W', C) array, `nrow` images per row."""
    grid = make_grid(images_u8.cpu(), nrow=nrow, padding=padding, pad_value=255)  # (C, H', W')
    return grid.permute(1, 2, 0).numpy()


VIEW_WIDTH = 256  # a grid narrower than this is enlarged for viewing (16x16 images make 128-px grids)


def viewable(image_hwc: np.ndarray, min_width: int = VIEW_WIDTH) -> np.ndarray:
    """`image_hwc` enlarged by the smallest whole factor that makes it at least `min_width` pixels wide.

    Nearest-neighbour (each pixel becomes a k x k block), so no pixel value is invented and the raw
    image is every k-th pixel of the result. Wide enough images are returned as they are.
    """
    k = -(-min_width // image_hwc.shape[1])  # ceil(min_width / W)
    if k <= 1:
        return image_hwc
    return image_hwc.repeat(k, axis=0).repeat(k, axis=1)  # (k*H, k*W, C)


def save_png(path: str | Path, image_hwc: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(image_hwc).save(tmp, format="PNG")

"""Image decoding: any PIL-readable file (a path or its bytes) as uint8 (3, S, S), shorter side resized
to S and centre-cropped; decoding runs in a thread pool (PIL releases the GIL while decoding and resizing)."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# torchvision's ImageFolder extensions; anything else in a class folder is skipped and counted.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def decode_workers() -> int:
    """Threads for image decoding: PIL releases the GIL while decoding and resizing."""
    return min(16, 2 * (os.cpu_count() or 1))


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """RGB-convert, resize the shorter side to `size` and centre-crop; returns uint8 (3, size, size)."""
    image = image.convert("RGB")
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()  # (3, S, S)


def read_image(path: Path | bytes, size: int) -> np.ndarray | None:
    """One image file (a path or its bytes) as uint8 (3, size, size), or None when it is not a readable image."""
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size
            return resize_center_crop(image, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # PIL reports undecodable / truncated files with these


def read_images(sources: list[Path] | list[bytes], size: int) -> list[np.ndarray | None]:
    """`read_image` of every source, decoded in a thread pool; None for each unreadable one."""
    with ThreadPoolExecutor(decode_workers()) as pool:
        return list(pool.map(lambda src: read_image(src, size), sources))


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """Resize + centre-crop a uint8 batch (N, 3, h, w) to (N, 3, size, size)."""
    if images.shape[-2:] == (size, size):
        return images

    def one(img: np.ndarray) -> np.ndarray:
        return resize_center_crop(Image.fromarray(img.transpose(1, 2, 0)), size)

    with ThreadPoolExecutor(decode_workers()) as pool:
        return np.stack(list(pool.map(one, images)))  # (N, 3, S, S)

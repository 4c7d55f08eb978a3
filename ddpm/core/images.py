"""Between pixels and model space: uint8 to [-1, 1] and back, grids, PNG files (written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
    """Tile uint8 images (N, C, H, W) into one (H', W', C) array, `nrow` images per row, `padding` white
    pixels around each: torchvision's `make_grid(..., pad_value=255)` layout (tests/test_images.py compares
    them), without importing torchvision, whose import pulls in torch._dynamo and costs every stage process
    ~1.5 s of start-up."""
    images = images_u8.cpu().numpy()  # (N, C, H, W)
    if images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)  # grey as RGB, as make_grid does
    n, c, h, w = images.shape
    if n == 1:
        return images[0].transpose(1, 2, 0).copy()  # make_grid returns a single image unpadded
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 255, np.uint8)  # (H', W', C)
    for k, image in enumerate(images):
        top, left = (i * (size + padding) + padding for i, size in zip(divmod(k, cols), (h, w), strict=True))
        grid[top:top + h, left:left + w] = image.transpose(1, 2, 0)
    return grid


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


def grid_tile(grid: np.ndarray, row: int, col: int, image_size: int, padding: int = 2) -> np.ndarray:
    """Tile (row, col) of a `grid_hwc` picture (H', W', C) as an (image_size, image_size, C) array."""
    top, left = padding + row * (image_size + padding), padding + col * (image_size + padding)
    tile = grid[top : top + image_size, left : left + image_size]
    if tile.shape[:2] != (image_size, image_size):
        raise ValueError(f"grid of shape {grid.shape} has no {image_size}px tile at row {row}, column {col}")
    return tile


def labelled_table(cells: list[list[np.ndarray]], col_labels: list[str], row_labels: list[str],
                   scale: int = 1, gap: int = 2) -> np.ndarray:
    """A white-background table of equal-size (S, S, 3) uint8 cells with column headers and row labels.

    `cells[r][c]` is drawn at row r, column c, each upscaled `scale` times (nearest neighbour, so pixels stay
    pixels); headers may hold several lines ("\\n"). Text uses PIL's default font. Returns (H, W, 3) uint8.
    """
    from PIL import ImageDraw, ImageFont

    if len(cells) != len(row_labels) or any(len(r) != len(col_labels) for r in cells):
        raise ValueError(f"cells must be {len(row_labels)} rows x {len(col_labels)} columns")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        box = probe.multiline_textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    cell = cells[0][0].shape[0] * scale
    col_w = max([cell] + [size(t)[0] + 2 * gap for t in col_labels])
    head_h = max(size(t)[1] for t in col_labels) + 3 * gap
    label_w = max(size(t)[0] for t in row_labels) + 3 * gap
    width, height = label_w + len(col_labels) * (col_w + gap), head_h + len(row_labels) * (cell + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(col_labels):
        x = label_w + c * (col_w + gap) + (col_w - size(text)[0]) // 2
        draw.multiline_text((x, gap), text, fill="black", font=font, align="center")
    for r, text in enumerate(row_labels):
        y = head_h + r * (cell + gap)
        draw.text((gap, y + (cell - size(text)[1]) // 2), text, fill="black", font=font)
        for c in range(len(col_labels)):
            tile = Image.fromarray(cells[r][c]).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + c * (col_w + gap) + (col_w - cell) // 2, y))
    return np.asarray(canvas)

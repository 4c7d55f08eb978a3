"""The sample progression figure: the progress grids of one training run side by side.

Training draws the same seeds every `train.sample_every` steps into `samples/progress/step_NNNNNNN.png`
(one row per class). `progression_figure` takes the first sample of every class row from each stored grid
and lays them out as one table: a column per checkpoint, labelled with its step and the images seen by
then, and a row per class, as the seed's table of samples by epoch. It is rebuilt from the files alone,
so a resumed run's figure includes the grids drawn before the interruption.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm.core.images import grid_tile, labelled_table

GRID_NAME = re.compile(r"step_(\d+)\.png")
MIN_CELL_PX = 48  # small images are upscaled (nearest) to at least this, so a column fits its label


def progress_grids(progress_dir: Path) -> list[tuple[int, Path]]:
    """The stored progress grids as (step, path), in step order."""
    found = [(int(m.group(1)), p) for p in Path(progress_dir).glob("step_*.png") if (m := GRID_NAME.fullmatch(p.name))]
    return sorted(found)


def column_label(step: int, batch_size: int) -> str:
    """'step 1,500' over '96k img': the step and the training images seen by then (step x global batch)."""
    return f"step {step:,}\n{step * batch_size / 1000:g}k img"


def _unenlarged(grid: np.ndarray, rows: int, image_size: int, padding: int = 2) -> np.ndarray:
    """A stored grid at its raw size: training saves grids enlarged nearest-neighbour by a whole factor
    (`core.images.viewable`), so every k-th pixel of the file is the raw grid of `rows` rows."""
    raw_height = padding + rows * (image_size + padding)
    k = grid.shape[0] // raw_height
    if k < 1 or grid.shape[0] != k * raw_height or grid.shape[1] % k:
        raise ValueError(f"grid of shape {grid.shape} is not {rows} row(s) of {image_size}px images at any scale")
    return grid[::k, ::k]  # (H'/k, W'/k, 3)


def progression_figure(progress_dir: Path, image_size: int, batch_size: int,
                       class_names: list[str]) -> np.ndarray | None:
    """The labelled (H, W, 3) uint8 table of every stored grid's first sample per class; None without grids."""
    grids = progress_grids(progress_dir)
    if not grids:
        return None
    rows = max(len(class_names), 1)
    pictures = [_unenlarged(np.asarray(Image.open(path).convert("RGB")), rows, image_size)  # each (H', W', 3)
                for _, path in grids]
    cells = [[grid_tile(pic, r, 0, image_size) for pic in pictures] for r in range(rows)]
    labels = [column_label(step, batch_size) for step, _ in grids]
    scale = max(1, math.ceil(MIN_CELL_PX / image_size))
    return labelled_table(cells, labels, list(class_names) or ["samples"], scale=scale)

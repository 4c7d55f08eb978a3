"""The sample progression figure: columns in step order with their labels, one row per class, from the files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ddpm.core.images import grid_hwc, grid_tile, save_png
from ddpm.pipeline.progression import column_label, progress_grids, progression_figure

S = 8  # image size


def _grid(step: int, classes: int, per_class: int = 3) -> np.ndarray:
    """A progress grid whose first sample of class c is filled with the colour (c * 20, step % 256, 7)."""
    import torch

    images = torch.zeros(classes * per_class, 3, S, S, dtype=torch.uint8)
    for c in range(classes):
        images[c * per_class, 0], images[c * per_class, 1], images[c * per_class, 2] = c * 20, step % 256, 7
        images[c * per_class + 1 :, :] = 255  # the other samples of the row: not part of the figure
    return grid_hwc(images, nrow=per_class)


def test_grid_tile_inverts_grid_hwc():
    grid = _grid(step=40, classes=3)
    assert grid_tile(grid, 2, 0, S)[0, 0].tolist() == [40, 40, 7]
    with pytest.raises(ValueError, match="no 8px tile"):
        grid_tile(grid, 5, 0, S)


def test_progression_columns_follow_the_steps_and_rows_the_classes(tmp_path):
    steps = [1000, 50, 200]  # written out of order; 1000 sorts before 200 as text, not as a number
    for step in steps:
        save_png(tmp_path / f"step_{step:07d}.png", _grid(step, classes=3))
    (tmp_path / "notes.png").write_bytes(b"")  # not a grid: ignored
    assert [s for s, _ in progress_grids(tmp_path)] == [50, 200, 1000]
    assert column_label(1500, 64) == "step 1,500\n96k img"
    assert column_label(100, 64) == "step 100\n6.4k img"

    fig = progression_figure(tmp_path, S, batch_size=64, class_names=["cat", "dog", "ship"])
    assert fig is not None and fig.dtype == np.uint8 and fig.shape[2] == 3
    # find each cell by its unique colour: column j is step steps_sorted[j], row r is class r, left to right
    # and top to bottom, each upscaled to 48 px (6x)
    centres = {}
    for r in range(3):
        for j, step in enumerate([50, 200, 1000]):
            ys, xs = np.nonzero(np.all(fig == [r * 20, step % 256, 7], axis=2))
            assert len(ys) == 48 * 48, (r, step)  # one whole 6x-upscaled cell
            centres[r, j] = (ys.mean(), xs.mean())
    for r in range(3):
        assert centres[r, 0][1] < centres[r, 1][1] < centres[r, 2][1]  # steps increase to the right
        assert centres[r, 0][0] == pytest.approx(centres[r, 2][0])  # a row is level
    for j in range(3):
        assert centres[0, j][0] < centres[1, j][0] < centres[2, j][0]  # classes in order downwards
    # labels: a header band above the first row and a label column left of the first column hold dark text
    top = int(min(y for y, _ in centres.values())) - 24
    left = int(min(x for _, x in centres.values())) - 24
    assert (fig[:top] < 128).any() and (fig[top:, :left] < 128).any()
    assert progression_figure(tmp_path / "empty", S, 64, ["cat"]) is None


def test_grids_stored_enlarged_give_the_same_figure(tmp_path):
    """Training stores its grids enlarged for viewing (`viewable`); the figure reads the raw tiles all the same."""
    from ddpm.core.images import viewable

    raw, big = tmp_path / "raw", tmp_path / "big"
    for step in (100, 200):
        save_png(raw / f"step_{step:07d}.png", _grid(step, classes=3))
        save_png(big / f"step_{step:07d}.png", viewable(_grid(step, classes=3)))
    assert np.asarray(Image.open(big / "step_0000100.png")).shape[1] >= 256
    names = ["cat", "dog", "ship"]
    assert np.array_equal(progression_figure(big, S, 64, names), progression_figure(raw, S, 64, names))


def test_an_unconditional_run_has_one_row(tmp_path):
    from ddpm.core.images import viewable

    save_png(tmp_path / "step_0000010.png", viewable(_grid(10, classes=1)))
    fig = progression_figure(tmp_path, S, 64, [])
    ys, _ = np.nonzero(np.all(fig == [0, 10, 7], axis=2))
    assert len(ys) == 48 * 48  # the one cell, 6x upscaled
    with pytest.raises(ValueError, match="not 3 row"):
        progression_figure(tmp_path, S, 64, ["cat", "dog", "ship"])  # a 1-row grid read as 3 classes

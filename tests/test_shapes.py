"""The synthetic shapes: determinism, layout, analytic silhouettes and that the classes are separable."""

import time

import numpy as np
import pytest

from ddpm.data.shapes import CLASS_NAMES, _render, generate_shapes


def test_layout_dtypes_and_interleaved_balanced_labels():
    images, labels, names = generate_shapes(7, 16, seed=0)
    assert images.shape == (70, 3, 16, 16) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert names == list(CLASS_NAMES) and len(set(names)) == 10
    np.testing.assert_array_equal(labels[:10], np.arange(10))  # any prefix of 10k images is balanced
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 7))


def test_same_seed_same_bytes_other_seed_other_images():
    a, la, _ = generate_shapes(5, 16, seed=3)
    b, lb, _ = generate_shapes(5, 16, seed=3)
    c, _, _ = generate_shapes(5, 16, seed=4)
    assert a.tobytes() == b.tobytes() and la.tobytes() == lb.tobytes()
    assert (a != c).mean() > 0.5  # not a tiny perturbation: colours and positions all change


def test_ten_thousand_small_images_are_fast():
    start = time.perf_counter()
    images, _, _ = generate_shapes(1000, 16, seed=0)
    assert images.shape[0] == 10_000
    assert time.perf_counter() - start < 5.0  # ~0.5 s on one idle core; generous for a shared machine


@pytest.mark.parametrize(
    ("label", "area"),  # area of the silhouette in units of radius^2
    [
        (0, np.pi),  # circle of radius 1
        (1, 1.7**2),  # square of half-side 0.85
        (2, 2.0 * 1.85 / 2.0),  # triangle: base 2, height 1.85
        (3, np.pi * (1.0**2 - 0.44**2)),  # ring between radii 0.44 and 1
        (4, 2 * (2.0 * 0.6) - 0.6**2),  # plus: two 2 x 0.6 bars, minus the shared centre square
        (5, 2.0 * 0.76),  # bar 2 x 0.76
        (6, 2.0),  # diamond with half-diagonals 1
        (8, 1.9**2 - 1.0**2),  # frame: 1.9 square minus a 1.0 square hole
        (9, np.pi / 2.0),  # half of a unit disc
    ],
)
def test_silhouette_areas_match_geometry(label, area):
    radius, size = 0.4, 256  # high resolution: anti-aliased coverage integrates to the exact area
    alpha = _render(label, np.array([[0.5, 0.5]]), np.array([radius]), size)  # (1, S, S)
    assert alpha.mean() == pytest.approx(area * radius**2, rel=0.01)


def test_shapes_are_large_and_stay_inside():
    images, _, _ = generate_shapes(50, 16, seed=1)
    masks = _foreground_masks(images)  # (N, H, W)
    assert masks.mean(axis=(1, 2)).min() > 0.12  # smallest silhouette (bar, r=0.32) covers ~16 %
    border = np.concatenate([masks[:, 0], masks[:, -1], masks[:, :, 0], masks[:, :, -1]], axis=1)  # (N, 64)
    assert border.mean() < 0.1  # jitter is moderate: shapes rarely touch the edge


def _foreground_masks(images: np.ndarray) -> np.ndarray:
    """Pixels that differ from the border's median colour: the silhouette, whatever its colours."""
    x = images.astype(np.float32)  # (N, 3, H, W)
    border = np.concatenate([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], axis=-1)
    bg = np.median(border, axis=-1)  # (N, 3)
    return np.abs(x - bg[..., None, None]).max(axis=1) > 40  # (N, H, W)


def test_classes_are_separable_by_nearest_neighbour_silhouettes():
    # If a 1-nearest-neighbour rule on raw silhouettes tells the classes apart, a U-Net learns them fast.
    train, train_y, _ = generate_shapes(100, 16, seed=0)
    test, test_y, _ = generate_shapes(30, 16, seed=1)
    masks = _foreground_masks(train).reshape(len(train), -1).astype(np.float32)  # (N, H*W)
    test_masks = _foreground_masks(test).reshape(len(test), -1).astype(np.float32)  # (M, H*W)
    dist = ((test_masks[:, None] - masks[None]) ** 2).sum(-1)  # (M, N)
    accuracy = (train_y[dist.argmin(1)] == test_y).mean()
    assert accuracy > 0.95  # chance is 0.1

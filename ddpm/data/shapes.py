"""A synthetic 10-class dataset of coloured shapes, generated offline and deterministically from a seed.

It exists so the whole pipeline can be exercised on 2 CPU cores in minutes (a small U-Net at 16x16
learns the classes in ~1,500 steps) and so tests have real, class-dependent images without a download.
The classes are chosen to be learnable FAST: every silhouette is large (its bounding box spans 64-90 %
of the image), unrotated (a rotated square would be a diamond) and only moderately jittered in position.
Colours are random, background included, but foreground and background always sit on opposite sides
of mid-grey in every channel, so the shape is never camouflaged.

Each shape is a signed distance function (SDF) in shape-local coordinates where the shape fits in
[-1, 1]^2 (negative inside); the SDF is turned into a ~1-pixel anti-aliased coverage and the whole
batch of one class is rendered at once with numpy.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = ("circle", "square", "triangle", "ring", "cross", "bar", "diamond", "x", "frame", "half-disc")


def _box(u: np.ndarray, v: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    """SDF of an axis-aligned box centred at the origin (exact inside, a tight bound outside)."""
    return np.maximum(np.abs(u) - half_w, np.abs(v) - half_h)


def _disc(u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """SDF of a disc centred at the origin."""
    return np.sqrt(u * u + v * v) - radius


def _polygon(u: np.ndarray, v: np.ndarray, vertices: tuple[tuple[float, float], ...]) -> np.ndarray:
    """SDF bound of a convex polygon: the largest signed distance to any edge's line.

    `vertices` run clockwise in image coordinates (v points down), so each edge's outward normal is
    the edge direction rotated by -90 degrees.
    """
    sdf = np.full(u.shape, -np.inf)
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
        nx, ny = y1 - y0, x0 - x1
        norm = np.hypot(nx, ny)
        sdf = np.maximum(sdf, ((u - x0) * nx + (v - y0) * ny) / norm)
    return sdf


def _shape_sdf(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The SDF of class `label` at shape-local coordinates (u right, v down; the shape fits [-1, 1]^2)."""
    if label == 0:  # circle
        return _disc(u, v, 1.0)
    if label == 1:  # square
        return _box(u, v, 0.85, 0.85)
    if label == 2:  # triangle, apex up
        return _polygon(u, v, ((0.0, -1.0), (1.0, 0.85), (-1.0, 0.85)))
    if label == 3:  # ring
        return np.abs(_disc(u, v, 0.72)) - 0.28
    if label == 4:  # cross (plus sign)
        return np.minimum(_box(u, v, 1.0, 0.3), _box(u, v, 0.3, 1.0))
    if label == 5:  # horizontal bar
        return _box(u, v, 1.0, 0.38)
    if label == 6:  # diamond
        return (np.abs(u) + np.abs(v) - 1.0) / np.sqrt(2.0)
    if label == 7:  # x: the cross rotated by 45 degrees, arms shortened to stay inside the square
        a, b = (u + v) / np.sqrt(2.0), (u - v) / np.sqrt(2.0)
        return np.maximum(np.minimum(_box(a, b, 1.3, 0.25), _box(a, b, 0.25, 1.3)), _box(u, v, 1.0, 1.0))
    if label == 8:  # frame (hollow square)
        return np.maximum(_box(u, v, 0.95, 0.95), -_box(u, v, 0.5, 0.5))
    if label == 9:  # half-disc, flat side down: the top half of a unit disc, centred vertically
        return np.maximum(_disc(u, v - 0.5, 1.0), v - 0.5)
    raise ValueError(f"no shape for label {label}")


def _colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB in [0, 1], (n, 3) each, differing by >= 0.2 in every channel."""
    dark = rng.uniform(0.0, 0.4, size=(n, 3))  # (n, 3)
    light = rng.uniform(0.6, 1.0, size=(n, 3))  # (n, 3)
    dark_bg = rng.random(n) < 0.5  # (n,) which of the two is the background
    bg = np.where(dark_bg[:, None], dark, light)  # (n, 3)
    fg = np.where(dark_bg[:, None], light, dark)  # (n, 3)
    return bg, fg


def _render(label: int, centre: np.ndarray, radius: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `len(radius)` shapes of one class, (n, size, size)."""
    pix = (np.arange(size) + 0.5) / size  # (S,) pixel centres in image units [0, 1]
    r = radius[:, None, None]  # (n, 1, 1)
    u = (pix[None, None, :] - centre[:, 0, None, None]) / r  # (n, 1, S)
    v = (pix[None, :, None] - centre[:, 1, None, None]) / r  # (n, S, 1)
    u, v = np.broadcast_arrays(u, v)  # (n, S, S) each
    sdf = _shape_sdf(label, u, v)  # (n, S, S) in units of the radius
    # One pixel is 1 / (size * r) radius units: a linear ramp across it gives ~1-pixel anti-aliasing.
    return np.clip(0.5 - sdf * (size * r), 0.0, 1.0)  # (n, S, S)


def generate_shapes(n_per_class: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render `n_per_class` images of each of the 10 shape classes.

    Returns `(images, labels, class_names)`: uint8 images (N, 3, H, W) with N = 10 * n_per_class,
    int64 labels (N,) interleaved 0, 1, ..., 9, 0, 1, ... (so any prefix of 10k images is balanced),
    and the class names. The output is a pure function of the arguments: the same seed gives
    identical bytes on every platform (numpy's PCG64), a different seed gives different images.
    """
    if n_per_class < 1 or image_size < 4:
        raise ValueError(f"need n_per_class >= 1 and image_size >= 4, got {n_per_class}, {image_size}")
    n = n_per_class * len(CLASS_NAMES)
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(len(CLASS_NAMES), dtype=np.int64), n_per_class)  # (N,)
    radius = rng.uniform(0.32, 0.45, size=n)  # (N,) half the bounding box, in image units
    # Jitter the centre by at most the margin left by the radius, so every shape stays inside the image.
    centre = 0.5 + rng.uniform(-1.0, 1.0, size=(n, 2)) * (0.5 - radius)[:, None]  # (N, 2) x, y
    bg, fg = _colours(rng, n)  # (N, 3) each
    alpha = np.empty((n, image_size, image_size))  # (N, H, W)
    for label in range(len(CLASS_NAMES)):
        rows = labels == label
        alpha[rows] = _render(label, centre[rows], radius[rows], image_size)
    a = alpha[:, None]  # (N, 1, H, W)
    images = bg[:, :, None, None] * (1.0 - a) + fg[:, :, None, None] * a  # (N, 3, H, W)
    return np.rint(images * 255.0).astype(np.uint8), labels, list(CLASS_NAMES)

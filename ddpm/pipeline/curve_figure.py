"""The quality curve drawn with PIL (no plotting library): one small panel per metric against training step.

Panels share the x axis (training step, the images seen by then under it, as in the progression figure's
column labels); a panel's y range is its data's (with the real-data floor in the FD panel). Pure drawing:
rows in, an (H, W, 3) uint8 picture out.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# (title, [(column, colour)], y range fixed to [0, 1] for fractions)
PANELS = [
    ("class accuracy; / real (orange)", [("class_accuracy", "tab:blue"), ("class_accuracy_ratio", "tab:orange")], True),
    ("fd_classifier (floor dashed)", [("fd_classifier", "tab:blue"), ("fd_classifier_floor", "grey")], False),
    ("precision; recall (orange)", [("precision", "tab:blue"), ("recall", "tab:orange")], True),
    ("pixel mean; std gap (orange)",
     [("pixel_mean_rel_error", "tab:blue"), ("pixel_std_rel_error", "tab:orange")], False),
    ("FID", [("fid", "tab:blue")], False),
]
COLOURS = {"tab:blue": (31, 119, 180), "tab:orange": (255, 127, 14), "grey": (128, 128, 128)}
W, H, LEFT, TOP, BOTTOM, RIGHT = 260, 170, 46, 22, 34, 10  # one panel, px


def _finite(rows: list[dict], column: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[column])) for r in rows
            if isinstance(r.get(column), int | float) and math.isfinite(r[column])]


def _panel(rows: list[dict], title: str, series: list[tuple[str, str]], unit_range: bool, batch_size: int,
           font) -> Image.Image | None:
    """One metric panel, or None when no row has a value for it (FID off, an unconditional model)."""
    data = {col: _finite(rows, col) for col, _ in series}
    points = [p for pts in data.values() for p in pts]
    if not points:
        return None
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = (0.0, 1.0) if unit_range else (min(0.0, min(p[1] for p in points)), max(p[1] for p in points))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 <= y0:
        y1 = y0 + 1.0
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def at(x: float, y: float) -> tuple[float, float]:
        return LEFT + (x - x0) / (x1 - x0) * pw, TOP + (1 - (y - y0) / (y1 - y0)) * ph

    draw.rectangle([LEFT, TOP, LEFT + pw, TOP + ph], outline=(0, 0, 0))
    draw.text((LEFT, 4), title, fill="black", font=font)
    for y in (y0, y1):
        draw.text((2, at(x0, y)[1] - 5), f"{y:.3g}", fill="black", font=font)
    for x in (x0, x1):
        label = f"{x:,.0f}\n{x * batch_size / 1000:g}k img"
        width = draw.multiline_textbbox((0, 0), label, font=font)[2]
        left = at(x, y0)[0] - (width if x == x1 else width // 2)  # the last label ends at the axis' end
        draw.multiline_text((max(left, 0), TOP + ph + 3), label, fill="black", font=font, align="center")
    for col, colour in series:
        xy = [at(x, y) for x, y in data[col]]
        rgb = COLOURS[colour]
        if col == "fd_classifier_floor":  # the floor: dashes between the points
            for a, b in zip(xy, xy[1:], strict=False):
                for t in np.arange(0.0, 1.0, 0.2):
                    p = (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)
                    q = (a[0] + (b[0] - a[0]) * (t + 0.1), a[1] + (b[1] - a[1]) * (t + 0.1))
                    draw.line([p, q], fill=rgb, width=1)
        elif len(xy) > 1:
            draw.line(xy, fill=rgb, width=2)
        for x, y in xy:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=rgb)
    return img


def curve_figure(rows: list[dict], batch_size: int, columns: int = 3) -> np.ndarray:
    """The (H, W, 3) uint8 figure of the progress stage's rows (each with `step` and its metrics): a panel
    per metric group present, `columns` panels a line; `batch_size` turns steps into images seen."""
    font = ImageFont.load_default()
    panels = [p for title, series, unit in PANELS if (p := _panel(rows, title, series, unit, batch_size, font))]
    if not panels:
        raise ValueError("no metric in the curve's rows to draw")
    cols = min(columns, len(panels))
    lines = math.ceil(len(panels) / cols)
    figure = Image.new("RGB", (cols * W, lines * H), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, ((i % cols) * W, (i // cols) * H))
    return np.asarray(figure)  # (H, W, 3) uint8

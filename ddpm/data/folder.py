"""An ImageFolder-style source: `root/<class>/**/<image>` (classes = sorted subfolder names), or an archive
of one (`ddpm.data.archives`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ddpm.data.archives import ARCHIVE_SUFFIXES, is_archive, list_archive
from ddpm.data.decode import IMAGE_EXTENSIONS, read_images
from ddpm.data.splits import Split, hold_out
from ddpm.errors import UserError


def _files_under(folder: Path) -> list[Path]:
    """Every file below `folder`, sorted (os.walk: no stat per file, which matters for 50,000 files)."""
    found = []
    for dirpath, _, filenames in os.walk(folder):
        found += [Path(dirpath, f) for f in filenames]
    return sorted(found)


def list_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[str]]:
    """Class names, (image path, label) pairs and non-image files of an ImageFolder directory."""
    if not root.is_dir():
        raise UserError(f"data.folder {root} does not exist or is not a directory; set data.folder to your images")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(
            f"data.folder {root} has no class subfolders; put each class's images in {root}/<class name>/"
        )
    items, skipped = [], []
    for label, name in enumerate(classes):
        for path in _files_under(root / name):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((path, label))
            else:
                skipped.append(str(path.relative_to(root)))
    return classes, items, skipped


def load_folder(root: Path, size: int, holdout_fraction: float, seed: int) -> Split:
    """An ImageFolder directory or an archive of one, decoded to `size` and split (seeded by `seed`).

    An archive (.tar, .tar.gz/.tgz, .zip) is read in memory without extracting; a single top-level folder
    around its class folders is unwrapped. Either way the same images in the same order come out, so the
    content hash is the same for a folder and its archive.
    Every image is converted to RGB, its shorter side resized to `size` and centre-cropped.
    Files that are not images (by extension) or cannot be decoded are SKIPPED AND COUNTED rather than
    fatal, because real folders carry stray files (.txt notes, thumbnails, a truncated download); the
    count and up to 5 names go into meta.json and a warning on stderr. A class left with no readable
    image is an error.
    """
    if is_archive(root):
        classes, members, skipped = list_archive(root)
        items = [(name, label) for name, _, label in members]
        sources = [data for _, data, _ in members]
        where = lambda name: f"{root}:{name}"  # noqa: E731
    else:
        if root.is_file():
            raise UserError(
                f"data.folder {root} is a file but not a supported archive ({', '.join(ARCHIVE_SUFFIXES)}); "
                "give a directory of class folders or such an archive"
            )
        classes, paths, skipped = list_folder(root)
        items = [(str(path.relative_to(root)), label) for path, label in paths]
        sources = [path for path, _ in paths]
        where = lambda name: str(root / name)  # noqa: E731
    decoded = read_images(sources, size)
    del sources  # an archive's bytes: not needed once decoded
    skipped += [name for (name, _), img in zip(items, decoded) if img is None]
    kept = [(img, label) for img, (_, label) in zip(decoded, items) if img is not None]
    labels = np.array([label for _, label in kept], dtype=np.int64)  # (N,)
    empty = [name for c, name in enumerate(classes) if not np.any(labels == c)]
    if empty:
        raise UserError(
            f"class folder(s) {', '.join(where(e) for e in empty)} hold no readable images "
            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)"
        )
    images = np.stack([img for img, _ in kept])  # (N, 3, S, S)
    return hold_out(images, labels, classes, holdout_fraction, seed, sorted(skipped))

"""The `prepare` stage: turn a raw image source into one compact, hashed uint8 dataset file.

`prepare(cfg, out_dir)` reads CIFAR-10, an ImageFolder-style directory (or a .tar / .tar.gz / .tgz / .zip
archive of one, read without extracting) or the synthetic shapes,
splits off a held-out set, and writes `out_dir/dataset.npz` (train/eval images uint8 (N, 3, H, W),
labels int64, class names) plus `out_dir/meta.json`. `load_prepared(out_dir)` reads it back as
tensors for training and evaluation. Every check runs before anything is written, so a failed
prepare leaves `out_dir` as it was.

`dataset.npz` is written byte-for-byte reproducibly (fixed zip timestamps, no compression), so
re-running prepare on the same input gives the same DVC hash and does not invalidate later stages.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm.config import Config, TrainingConfig
from ddpm.core.atomic import atomic_open, write_text
from ddpm.data.shapes import generate_shapes
from ddpm.errors import UserError

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = (*CIFAR10_TRAIN, "test_batch", "batches.meta")
# torchvision's ImageFolder extensions; anything else in a class folder is skipped and counted.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# archives `data.folder` may name instead of a directory (read in memory, never extracted to disk)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
ARCHIVE_JUNK = ("__MACOSX",)  # macOS zip metadata folders: never a class
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


@dataclass
class _Split:
    """What a source hands to `prepare`: numpy arrays plus the files it could not read."""

    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    class_names: list[str]
    skipped: list[str]


# ---------------------------------------------------------------------------------------------- images


def _workers() -> int:
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


def _read_image(path: Path | bytes, size: int) -> np.ndarray | None:
    """One image file (a path or its bytes) as uint8 (3, size, size), or None when it is not a readable image."""
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size
            return resize_center_crop(image, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # PIL reports undecodable / truncated files with these


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """Resize + centre-crop a uint8 batch (N, 3, h, w) to (N, 3, size, size)."""
    if images.shape[-2:] == (size, size):
        return images

    def one(img: np.ndarray) -> np.ndarray:
        return resize_center_crop(Image.fromarray(img.transpose(1, 2, 0)), size)

    with ThreadPoolExecutor(_workers()) as pool:
        return np.stack(list(pool.map(one, images)))  # (N, 3, S, S)


# --------------------------------------------------------------------------------------------- splits


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class hold-out: `(train_idx, eval_idx)`, each sorted.

    Each class with n images gives round(fraction * n) of them to eval, at least 1 and at most n - 1
    (a class with a single image stays entirely in train).
    """
    rng = np.random.default_rng(seed)
    eval_parts = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = len(members)
        k = min(n - 1, max(1, round(fraction * n)))
        eval_parts.append(members[:k])
    eval_idx = np.sort(np.concatenate(eval_parts)) if eval_parts else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), eval_idx)
    return train_idx, eval_idx


def _split(images: np.ndarray, labels: np.ndarray, names: list[str], cfg: Config, skipped: list[str]) -> _Split:
    """Hold out `cfg.data.holdout_fraction` of each class, seeded by `cfg.seed`."""
    train_idx, eval_idx = stratified_split(labels, cfg.data.holdout_fraction, cfg.seed)
    return _Split(images[train_idx], labels[train_idx], images[eval_idx], labels[eval_idx], names, skipped)


# -------------------------------------------------------------------------------------------- sources


def _load_shapes(cfg: Config) -> _Split:
    """The synthetic shapes (ddpm/shapes.py), `shapes_per_class` per class, seeded by `cfg.seed`."""
    images, labels, names = generate_shapes(cfg.data.shapes_per_class, cfg.data.image_size, cfg.seed)
    return _split(images, labels, names, cfg, skipped=[])


def _files_under(folder: Path) -> list[Path]:
    """Every file below `folder`, sorted (os.walk: no stat per file, which matters for 50,000 files)."""
    found = []
    for dirpath, _, filenames in os.walk(folder):
        found += [Path(dirpath, f) for f in filenames]
    return sorted(found)


def _list_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[str]]:
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


def is_archive(path: Path) -> bool:
    """Whether `path` names a file of a supported archive type (by its suffix)."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _archive_files(path: Path) -> list[tuple[tuple[str, ...], bytes]]:
    """Every regular file of a tar (any compression) or zip archive: (path parts, bytes), in archive order.

    One sequential pass: a .tar.gz cannot seek, so reading member after member is what keeps it fast.
    Names with absolute or '..' parts are refused (they cannot be meant as class folders).
    """
    files = []
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        files.append((info.filename, zf.read(info)))
        else:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    if member.isfile():
                        f = tar.extractfile(member)
                        files.append((member.name, f.read() if f else b""))
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
        raise UserError(f"data.folder {path} is not a readable archive ({err}); re-create or re-download it") from None
    out = []
    for name, data in files:
        parts = tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))
        if name.startswith("/") or ".." in parts:
            raise UserError(f"archive {path} holds the unsafe path {name!r}; re-create it with relative paths")
        if parts and parts[0] not in ARCHIVE_JUNK:
            out.append((parts, data))
    return out


def _unwrap(files: list[tuple[tuple[str, ...], bytes]]) -> list[tuple[tuple[str, ...], bytes]]:
    """Drop a single top-level folder around the class folders (as in train/<class>/*.jpg).

    It is unwrapped when every file lies below one folder and that folder holds sub-folders: a single
    folder holding only files is itself a class.
    """
    tops = {parts[0] for parts, _ in files}
    nested = all(len(parts) >= 3 for parts, _ in files)  # top/<class>/<file>
    if len(tops) == 1 and files and nested:
        return [(parts[1:], data) for parts, data in files]
    return files


def _list_archive(path: Path) -> tuple[list[str], list[tuple[str, bytes, int]], list[str]]:
    """Class names, (relative name, bytes, label) triples and non-image files of an archive of class folders.

    The same classes, order and skipped names as `_list_folder` on the extracted directory, so the
    prepared arrays and their content hash do not depend on whether the folder was archived.
    """
    files = _unwrap(_archive_files(path))
    classes = sorted({parts[0] for parts, _ in files if len(parts) >= 2 and not parts[0].startswith(".")})
    if not classes:
        raise UserError(
            f"archive {path} has no class folders; archive one folder per class (<class name>/<image>), "
            "optionally inside one top-level folder"
        )
    label_of = {name: i for i, name in enumerate(classes)}
    # sorted by path components within each class, as sorted(Path) orders the directory walk
    members = sorted((label_of[p[0]], p[1:], data) for p, data in files if len(p) >= 2 and p[0] in label_of)
    items, skipped = [], []
    for label, rest, data in members:
        name = "/".join((classes[label], *rest))
        if rest[-1].lower().endswith(IMAGE_EXTENSIONS):
            items.append((name, data, label))
        else:
            skipped.append(name)
    return classes, items, skipped


def _load_folder(cfg: Config) -> _Split:
    """An ImageFolder directory `root/<class>/**/<image>` (classes = sorted subfolder names), or an archive of one.

    An archive (.tar, .tar.gz/.tgz, .zip) is read in memory without extracting; a single top-level folder
    around its class folders is unwrapped. Either way the same images in the same order come out, so the
    content hash is the same for a folder and its archive.
    Every image is converted to RGB, its shorter side resized to `image_size` and centre-cropped.
    Files that are not images (by extension) or cannot be decoded are SKIPPED AND COUNTED rather than
    fatal, because real folders carry stray files (.txt notes, thumbnails, a truncated download); the
    count and up to 5 names go into meta.json and a warning on stderr. A class left with no readable
    image is an error. Decoding runs in a thread pool (PIL releases the GIL while decoding).
    """
    root = Path(cfg.data.folder or "")
    size = cfg.data.image_size
    if is_archive(root):
        classes, members, skipped = _list_archive(root)
        items = [(name, label) for name, _, label in members]
        sources = [data for _, data, _ in members]
        where = lambda name: f"{root}:{name}"  # noqa: E731
    else:
        if root.is_file():
            raise UserError(
                f"data.folder {root} is a file but not a supported archive ({', '.join(ARCHIVE_SUFFIXES)}); "
                "give a directory of class folders or such an archive"
            )
        classes, paths, skipped = _list_folder(root)
        items = [(str(path.relative_to(root)), label) for path, label in paths]
        sources = [path for path, _ in paths]
        where = lambda name: str(root / name)  # noqa: E731
    with ThreadPoolExecutor(_workers()) as pool:
        decoded = list(pool.map(lambda src: _read_image(src, size), sources))
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
    return _split(images, labels, classes, cfg, sorted(skipped))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a CIFAR batch cannot run code when loaded."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol <= 2: str -> bytes, nothing more
    }

    def find_class(self, module: str, name: str):
        module = module.replace("numpy.core", "numpy._core", 1) if module.startswith("numpy.core") else module
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> dict:
    """One CIFAR-10 pickle (Python 2 format, hence latin1), or a UserError if it is damaged."""
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise UserError(
            f"{path} is damaged ({err}); delete {path.parent} and put a fresh {CIFAR10_ARCHIVE} from {CIFAR10_URL} "
            f"in {path.parent.parent}"
        ) from None
    if not isinstance(entry, dict):
        raise UserError(f"{path} is not a CIFAR-10 batch; re-download {CIFAR10_URL}")
    return entry


def _cifar_arrays(batch_dir: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 3, 32, 32) and labels int64 (N,) of the given batch files."""
    images, labels = [], []
    for name in names:
        entry = _read_cifar_batch(batch_dir / name)
        data, lab = entry.get("data"), entry.get("labels")
        if (
            not isinstance(data, np.ndarray) or not isinstance(lab, list) or data.dtype != np.uint8
            or data.shape != (len(lab), 3 * 32 * 32)
        ):
            raise UserError(f"{batch_dir / name} does not hold CIFAR-10 data; re-download {CIFAR10_URL}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are channel-major: R plane, G plane, B plane
        labels.append(np.asarray(lab, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _offline_error(raw: Path, err: Exception) -> UserError:
    """The message for 'no CIFAR-10 here and the download failed'."""
    return UserError(
        f"CIFAR-10 is not in {raw.resolve()} and downloading it failed ({err}). Download {CIFAR10_URL} "
        f"and put it at {(raw / CIFAR10_ARCHIVE).resolve()} (or its extracted {CIFAR10_DIR}/ in that "
        "directory), or set data.raw_dir to where it is"
    )


def _ensure_cifar10(raw: Path) -> Path:
    """The extracted `cifar-10-batches-py/` directory, from disk, the local archive, or a download.

    Local files are read without touching the network; the archive's md5 is not checked because the
    batches are read directly (not via torchvision), and the prepared data's content hash records
    exactly what was used.
    """
    batch_dir = raw / CIFAR10_DIR
    if all((batch_dir / f).is_file() for f in CIFAR10_FILES):
        return batch_dir
    archive = raw / CIFAR10_ARCHIVE
    if not archive.is_file():
        import torchvision  # only when a download is needed: importing it is slow

        try:
            torchvision.datasets.CIFAR10(root=str(raw), train=True, download=True)
        except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError; md5 mismatch a RuntimeError
            raise _offline_error(raw, err) from None
    else:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(raw, filter="data")  # "data" refuses absolute paths and links out of raw
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserError(
                f"{archive} is not a readable archive ({err}); delete it and download {CIFAR10_URL} again"
            ) from None
    missing = [f for f in CIFAR10_FILES if not (batch_dir / f).is_file()]
    if missing:
        raise UserError(f"{batch_dir} lacks {', '.join(missing)}; delete it and re-download {CIFAR10_URL}")
    return batch_dir


def _load_cifar10(cfg: Config) -> _Split:
    """CIFAR-10: the 50,000 training images for training and the 10,000 test images as the held-out set.

    Resized (bicubic) only when `image_size` is not 32.
    """
    batch_dir = _ensure_cifar10(Path(cfg.data.raw_dir))
    names = [str(n) for n in _read_cifar_batch(batch_dir / "batches.meta").get("label_names", [])]
    train_images, train_labels = _cifar_arrays(batch_dir, CIFAR10_TRAIN)
    eval_images, eval_labels = _cifar_arrays(batch_dir, ("test_batch",))
    labels = np.concatenate([train_labels, eval_labels])  # (N + M,)
    if not names or labels.min() < 0 or labels.max() >= len(names):
        raise UserError(f"{batch_dir} has labels that do not match batches.meta; re-download {CIFAR10_URL}")
    size = cfg.data.image_size
    return _Split(_resize_all(train_images, size), train_labels, _resize_all(eval_images, size), eval_labels,
                  names, skipped=[])


# ---------------------------------------------------------------------------------------------- files


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over each array's name, dtype, shape and bytes (class names included), in a fixed order."""
    digest = hashlib.sha256()
    for key in ARRAY_KEYS:
        arr = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update("\n".join(arr.tolist()).encode() if key == "class_names" else arr.tobytes())
    return digest.hexdigest()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
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


def _check_classes(split: _Split, cfg: Config) -> None:
    """The class count fits the model and both splits hold images."""
    check_class_count(split.class_names, cfg, f"the {cfg.data.dataset} dataset")
    if len(split.train_images) == 0 or len(split.eval_images) == 0:
        raise UserError("the prepared dataset has an empty train or eval split; add images (>= 2 per class)")


def _warn_skipped(skipped: list[str], source: str) -> None:
    """One stderr line about files that were skipped."""
    if skipped:
        examples = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        log.warning("skipped %d non-image or unreadable file(s) in %s: %s", len(skipped), source, examples)


def _load_source(cfg: Config) -> _Split:
    """Dispatch on `cfg.data.dataset`."""
    if cfg.data.dataset == "cifar10":
        return _load_cifar10(cfg)
    if cfg.data.dataset == "folder":
        return _load_folder(cfg)
    return _load_shapes(cfg)


def prepare(cfg: Config, out_dir: str | Path) -> dict:
    """Prepare `cfg.data` into `out_dir/dataset.npz` and `out_dir/meta.json`; returns the meta dict.

    meta = {dataset, image_size, num_train, num_eval, num_classes, class_names, content_hash,
    skipped_files (count), skipped_examples (up to 5 paths)}. Raises `UserError` (writing nothing)
    for a missing/empty source, a class-count mismatch with `model.num_classes`, or unusable CIFAR-10.
    """
    out_dir = Path(out_dir)
    split = _load_source(cfg)
    _check_classes(split, cfg)
    arrays = {
        "train_images": split.train_images,  # (N, 3, H, W) uint8
        "train_labels": split.train_labels.astype(np.int64),  # (N,)
        "eval_images": split.eval_images,  # (M, 3, H, W) uint8
        "eval_labels": split.eval_labels.astype(np.int64),  # (M,)
        "class_names": np.array(split.class_names, dtype=str),  # (K,)
    }
    digest = content_hash(arrays)
    _write_npz(out_dir / "dataset.npz", {**arrays, "content_hash": np.array(digest)})
    meta = {
        "dataset": cfg.data.dataset,
        "image_size": cfg.data.image_size,
        "num_train": len(split.train_labels),
        "num_eval": len(split.eval_labels),
        "num_classes": len(split.class_names),
        "class_names": split.class_names,
        "content_hash": digest,
        "skipped_files": len(split.skipped),
        "skipped_examples": split.skipped[:5],
    }
    write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    _warn_skipped(split.skipped, cfg.data.folder or cfg.data.dataset)
    return meta


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

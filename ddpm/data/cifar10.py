"""CIFAR-10 from the python version's batch files: on disk, from the local archive, or downloaded.

The batches are pickles; a restricted unpickler builds only plain containers and numpy arrays from them,
so a tampered batch file cannot run code when loaded.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np

from ddpm.data.decode import resize_all
from ddpm.data.splits import Split
from ddpm.errors import UserError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = (*CIFAR10_TRAIN, "test_batch", "batches.meta")


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


def load_cifar10(raw_dir: Path, size: int) -> Split:
    """CIFAR-10: the 50,000 training images for training and the 10,000 test images as the held-out set.

    Resized (bicubic) only when `size` is not 32.
    """
    batch_dir = _ensure_cifar10(Path(raw_dir))
    names = [str(n) for n in _read_cifar_batch(batch_dir / "batches.meta").get("label_names", [])]
    train_images, train_labels = _cifar_arrays(batch_dir, CIFAR10_TRAIN)
    eval_images, eval_labels = _cifar_arrays(batch_dir, ("test_batch",))
    labels = np.concatenate([train_labels, eval_labels])  # (N + M,)
    if not names or labels.min() < 0 or labels.max() >= len(names):
        raise UserError(f"{batch_dir} has labels that do not match batches.meta; re-download {CIFAR10_URL}")
    return Split(resize_all(train_images, size), train_labels, resize_all(eval_images, size), eval_labels,
                  names, skipped=[])

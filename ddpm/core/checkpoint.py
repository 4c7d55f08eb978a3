"""Checkpoints: plain dicts of tensors, numbers, strings, lists and dicts, written atomically.

Format (version 1): `{"format_version": 1, "config": Config.training_dict(), "step": int,
"ema": EMA.state_dict(), ...}` plus whatever the caller adds (the raw "model" state dict,
optimizer, scaler, RNG states, data position, mlflow_run_id, class names). Because nothing needs
unpickling code, every file loads with `torch.load(..., weights_only=True)`: a checkpoint can never
run code, and one that would need to is refused.

Errors are plain (FileNotFoundError, CheckpointError, TypeError/ValueError for a bad payload): the
workflows that read checkpoints turn them into messages naming the fix (`ddpm.pipeline.trained_model`).
The network rebuilt from a checkpoint is `ddpm.core.restore`.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import torch

from ddpm.config import TrainingConfig
from ddpm.core.atomic import atomic_path

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "step", "ema")
# what weights_only unpickling accepts without allow-listing; exact types for the Python containers and
# scalars, because subclasses (numpy.float64 is a float, a namedtuple is a tuple) pickle as their own class
_PLAIN_SCALARS = (bool, int, float, str, bytes, type(None))
_TORCH_LEAVES = (torch.Tensor, torch.dtype, torch.device, torch.Size)
_MAPPINGS = (dict, OrderedDict)
_SEQUENCES = (list, tuple)

# the ways a file can fail to be a usable checkpoint; each caller words the fix for its own user
Problem = Literal["corrupt", "unsafe", "foreign", "version", "mismatch"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message states the facts, `problem` which kind they are."""

    def __init__(self, problem: Problem, message: str):
        super().__init__(message)
        self.problem = problem


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError naming the first entry that `torch.load(weights_only=True)` would refuse."""
    if type(value) in _PLAIN_SCALARS or isinstance(value, _TORCH_LEAVES):
        return
    if type(value) in _MAPPINGS:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"checkpoint entry {where} has a {type(key).__name__} key; use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in _SEQUENCES:
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint entry {where} is a {type(value).__module__}.{type(value).__qualname__}, which "
        "weights_only loading refuses; store it as tensors, numbers, strings, lists or dicts"
    )


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically: the old file stays intact until the new one is complete.

    Raises ValueError for a payload without the required keys and TypeError for an entry that could
    not be loaded back with `weights_only=True` (both are bugs in the caller, caught before writing).
    """
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}; it needs {list(REQUIRED_KEYS)}")
    if payload["format_version"] != FORMAT_VERSION:
        raise ValueError(f"checkpoint format_version must be {FORMAT_VERSION}, got {payload['format_version']!r}")
    _check_plain(payload, "payload")
    # save through a file object: torch.save names the zip's inner folder after a *path*'s stem, and the
    # temporary file's random name would make two identical checkpoints differ byte for byte
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def load_weights_only(source: Any, map_location: Any = "cpu") -> Any:
    """`torch.load(..., weights_only=True)`: the package's one call of torch.load (ruff bans any other).

    Only tensors and plain data unpickle; a file that names code to run raises pickle.UnpicklingError.
    """
    return torch.load(source, map_location=map_location, weights_only=True)  # noqa: TID251


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`.

    Raises FileNotFoundError for a missing file and CheckpointError for one that cannot be used (damaged,
    refused for safety, not a ddpm checkpoint, another format version); the callers add the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files: noise here
            warnings.simplefilter("ignore", UserWarning)
            ckpt = load_weights_only(path, map_location=map_location)
    except Exception as err:  # noqa: BLE001 - torch.load fails on damaged files with struct.error, IndexError...
        raise _load_error(path, err) from None
    _check_format(ckpt, path)
    return ckpt


def _load_error(path: Path, err: Exception) -> CheckpointError:
    """Why torch.load failed: a file naming code to run (refused for safety), or a damaged one."""
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, pickle.UnpicklingError):  # weights_only refused the pickle: unsafe, or not a pickle at all
        unsafe = _refused_globals(path)
        if unsafe:
            names = ", ".join(unsafe[:3])
            return CheckpointError("unsafe", f"checkpoint {path} holds objects that are not plain tensors or data "
                                   f"({names}), so it was refused for safety (loading it would run code)")
        detail = "not a readable torch file"
    return CheckpointError("corrupt", f"checkpoint {path} is truncated or corrupt ({detail})")


class _NeedsCode(Exception):
    pass


class _FirstGlobal(pickle.Unpickler):
    """Builds nothing that needs code: the first class or function a pickle asks for stops it, by name."""

    def find_class(self, module: str, name: str):
        raise _NeedsCode(f"{module}.{name}")

    def persistent_load(self, pid):  # a legacy torch file's tensor storages: not needed to find a global
        return None


def _refused_globals(path: Path) -> list[str]:
    """The globals that made weights_only refuse `path`: torch's own list for a torch.save (zip) file; for a
    plain or legacy pickle, the first global it needs. Empty when the bytes are not a pickle (damage)."""
    if zipfile.is_zipfile(path):
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - a damaged zip raises here as it did in torch.load
            return []
    try:
        with open(path, "rb") as f:
            while True:  # a legacy torch file is several pickles in a row
                _FirstGlobal(f).load()
    except _NeedsCode as needed:
        return [str(needed)]
    except Exception:  # noqa: BLE001 - EOFError at the end, UnpicklingError and others on garbage
        return []


def _check_format(ckpt: Any, path: Path) -> None:
    """A loadable file that is not one of our checkpoints (or from another format version) is a CheckpointError."""
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError("foreign", f"{path} is not a ddpm checkpoint (it needs the keys {list(REQUIRED_KEYS)})")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            "version", f"checkpoint {path} has format_version {ckpt['format_version']!r} but this code reads "
            f"version {FORMAT_VERSION}"
        )


def config_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> TrainingConfig:
    """The run's training config, revalidated (a stored config that no longer validates is a ConfigError)."""
    return TrainingConfig.from_dict(ckpt["config"], source=f"the config stored in {source}")

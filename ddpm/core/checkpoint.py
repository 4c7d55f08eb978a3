"""Checkpoints: plain dicts of tensors, numbers, strings, lists and dicts, written atomically.

Format (version 1): `{"format_version": 1, "config": Config.training_dict(), "step": int,
"ema": EMA.state_dict(), ...}` plus whatever the caller adds (the raw "model" state dict,
optimizer, scaler, RNG states, data position, mlflow_run_id, class names). Because nothing needs
unpickling code, every file loads with `torch.load(..., weights_only=True)`: a checkpoint can never
run code, and one that would need to is refused.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ddpm.config import TrainingConfig
from ddpm.core.atomic import atomic_path
from ddpm.core.unet import build_unet
from ddpm.errors import UserError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "step", "ema")
# what weights_only unpickling accepts without allow-listing; exact types for the Python containers and
# scalars, because subclasses (numpy.float64 is a float, a namedtuple is a tuple) pickle as their own class
_PLAIN_SCALARS = (bool, int, float, str, bytes, type(None))
_TORCH_LEAVES = (torch.Tensor, torch.dtype, torch.device, torch.Size)
_MAPPINGS = (dict, OrderedDict)
_SEQUENCES = (list, tuple)


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
    """Load a checkpoint with `weights_only=True`; every unreadable file becomes a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; run the train stage first (dvc repro) or pass the right path")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files: noise here
            warnings.simplefilter("ignore", UserWarning)
            ckpt = load_weights_only(path, map_location=map_location)
    except pickle.UnpicklingError as err:
        raise _unpickling_error(path, str(err)) from None
    except Exception as err:  # noqa: BLE001 - torch.load fails on damaged files with struct.error, IndexError...
        if "CUDA" in str(err):  # a healthy file mapped onto a device this machine lacks
            raise UserError(f"cannot load checkpoint {path} onto {map_location!r}: {err}; use a CPU device") from None
        raise _corrupt_error(path, str(err) or type(err).__name__) from None
    _check_format(ckpt, path)
    return ckpt


def _corrupt_error(path: Path, detail: str) -> UserError:
    """The file exists but is not a complete checkpoint (an interrupted copy, a disk error, another format)."""
    detail = (detail.strip().splitlines() or ["unreadable"])[0]
    return UserError(
        f"checkpoint {path} is truncated or corrupt ({detail}); delete it and retrain, or resume from an earlier "
        "checkpoint"
    )


def _unpickling_error(path: Path, message: str) -> UserError:
    """weights_only refused the file: a well-formed pickle holding objects it will not build, or garbage."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+)", message)
    names = [next(g for g in match.groups() if g)] if match else _pickled_globals(path)
    if names is None:
        return _corrupt_error(path, "not a readable torch file")
    if not names:
        return UserError(f"{path} is a pickle that safe loading cannot read, not a ddpm checkpoint; pass a file "
                         "written by train")
    what = f" ({', '.join(names[:3])})" if names else ""
    return UserError(
        f"checkpoint {path} holds objects that are not plain tensors or data{what}, so it was refused for safety "
        "(loading it would run code); it was not written by this project's train stage: delete it and retrain"
    )


def _pickled_globals(path: Path) -> list[str] | None:
    """The classes/functions a pickle (or a torch zip file's data.pkl) refers to, read without unpickling;
    None when the bytes are not a well-formed pickle (then the file is damaged, not dangerous)."""
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            inner = [n for n in z.namelist() if n.endswith("data.pkl")]
            if not inner:
                return None
            data = z.read(inner[0])
    names, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - pickletools raises ValueError and others on garbage
        return None
    return names


def _check_format(ckpt: Any, path: Path) -> None:
    """A loadable file that is not one of our checkpoints (or from a newer format) is a UserError."""
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise UserError(
            f"{path} is not a ddpm checkpoint (it needs the keys {list(REQUIRED_KEYS)}); pass a file written by train"
        )
    if ckpt["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format_version {ckpt['format_version']!r} but this code reads version "
            f"{FORMAT_VERSION}; retrain, or use the code version that wrote it"
        )


def config_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> TrainingConfig:
    """The run's training config, revalidated (a stored config that no longer validates is a ConfigError)."""
    return TrainingConfig.from_dict(ckpt["config"], source=f"the config stored in {source}")


def load_ema_unet(
    path: str | Path, device: str | torch.device = "cpu", ckpt: dict[str, Any] | None = None
) -> tuple[TrainingConfig, torch.nn.Module]:
    """Rebuild the U-Net from the stored config and load the EMA weights strictly; eval mode, no grad, on `device`.

    `ckpt`: the already loaded contents of `path` (saves reading a large file twice).
    """
    ckpt = load_checkpoint(path, map_location="cpu") if ckpt is None else ckpt
    cfg = config_from_checkpoint(ckpt, source=str(path))
    model = build_unet(cfg)
    weights = ckpt["ema"].get("weights") if isinstance(ckpt["ema"], dict) else None
    if weights is None:
        raise UserError(f"checkpoint {path} has no EMA weights (ema.weights); pass a file written by train")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise UserError(
            f"checkpoint {path} does not fit the network its stored config describes: it was made with another "
            f"model config or code version; retrain it with the current code ({str(err).splitlines()[0]} ...)"
        ) from None
    return cfg, model.to(device).eval().requires_grad_(False)


def load_ema_model(
    path: str | Path, device: str | torch.device = "cpu", ckpt: dict[str, Any] | None = None
) -> tuple[TrainingConfig, torch.nn.Module, Any]:
    """`(cfg, EMA U-Net, GaussianDiffusion)` ready for sampling on `device`, all rebuilt from the checkpoint."""
    from ddpm.core.diffusion import GaussianDiffusion  # local: the diffusion module is only needed for sampling

    cfg, model = load_ema_unet(path, device, ckpt=ckpt)
    return cfg, model, GaussianDiffusion.from_config(cfg).to(device)

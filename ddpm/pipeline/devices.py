"""The run's device and precision as the workflows choose them: the core's checks, reported as a
`UserError` that names the param or flag the choice came from."""

from __future__ import annotations

import torch

from ddpm.config import DeviceName, Precision, TrainConfig
from ddpm.core import runtime
from ddpm.errors import UserError


def resolve_device(name: DeviceName, local_rank: int = 0, param: str = "train.device") -> torch.device:
    """`runtime.resolve_device`; a device this machine lacks is a UserError naming `param`."""
    try:
        return runtime.resolve_device(name, local_rank)
    except ValueError as err:
        raise UserError(f"{param} is {name!r} but {err}; set {param} to cpu (or auto)") from None


def check_precision(precision: Precision, device: torch.device, param: str = "train.precision") -> None:
    """`runtime.check_precision`; a precision the device cannot run is a UserError naming `param`."""
    try:
        runtime.check_precision(precision, device)
    except ValueError as err:
        raise UserError(f"{param} is {precision!r}, but {err}; use fp32 or bf16 on the CPU") from None


def uses_channels_last(train: TrainConfig, compiled: bool) -> bool:
    """`train.channels_last` for a network that is `compiled` or not: "auto" is channels_last exactly when
    compiled (see the param's comment), true/false as given."""
    return compiled if train.channels_last == "auto" else train.channels_last

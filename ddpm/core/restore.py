"""The EMA network (and its diffusion) rebuilt from a checkpoint alone: the config travels inside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ddpm.config import TrainingConfig
from ddpm.core.checkpoint import CheckpointError, config_from_checkpoint, load_checkpoint
from ddpm.core.diffusion import GaussianDiffusion
from ddpm.core.unet import build_unet


def load_ema_unet(
    path: str | Path, device: str | torch.device = "cpu", ckpt: dict[str, Any] | None = None
) -> tuple[TrainingConfig, torch.nn.Module]:
    """Rebuild the U-Net from the stored config and load the EMA weights strictly; eval mode, no grad, on `device`.

    `ckpt`: the already loaded contents of `path` (saves reading a large file twice). Weights that are
    missing or do not fit the stored config raise CheckpointError ("foreign" / "mismatch").
    """
    ckpt = load_checkpoint(path, map_location="cpu") if ckpt is None else ckpt
    cfg = config_from_checkpoint(ckpt, source=str(path))
    model = build_unet(cfg)
    weights = ckpt["ema"].get("weights") if isinstance(ckpt["ema"], dict) else None
    if weights is None:
        raise CheckpointError("foreign", f"checkpoint {path} has no EMA weights (ema.weights)")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            "mismatch", f"checkpoint {path} does not fit the network its stored config describes: it was made with "
            f"another model config or code version ({str(err).splitlines()[0]} ...)"
        ) from None
    return cfg, model.to(device).eval().requires_grad_(False)


def load_ema_model(
    path: str | Path, device: str | torch.device = "cpu", ckpt: dict[str, Any] | None = None
) -> tuple[TrainingConfig, torch.nn.Module, GaussianDiffusion]:
    """`(cfg, EMA U-Net, GaussianDiffusion)` ready for sampling on `device`, all rebuilt from the checkpoint."""
    cfg, model = load_ema_unet(path, device, ckpt=ckpt)
    return cfg, model, GaussianDiffusion.from_config(cfg).to(device)

"""The trained model as the sample and evaluate workflows use it: rebuilt from its checkpoint on the chosen
device, the core's checkpoint errors reported as a `UserError` with the fix, and the class-balanced
evaluation set both stages draw from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm.config import Config, TrainingConfig
from ddpm.core.checkpoint import CheckpointError, load_checkpoint
from ddpm.core.generate import SamplerSettings, balanced_labels, generate
from ddpm.core.restore import load_ema_model
from ddpm.core.samplers import respaced_timesteps
from ddpm.errors import UserError
from ddpm.pipeline.devices import check_precision, resolve_device, uses_channels_last

# what the user does about each kind of unusable checkpoint (`CheckpointError.problem`)
CHECKPOINT_FIXES = {
    "corrupt": "delete it and retrain, or resume from an earlier checkpoint",
    "unsafe": "it was not written by this project's train stage: delete it and retrain",
    "foreign": "pass a file written by train",
    "version": "retrain, or use the code version that wrote it",
    "mismatch": "retrain it with the current code",
}
MISSING_FIX = "run the train stage first (dvc repro train) or pass the right path"


@dataclass
class LoadedModel:
    """An EMA model rebuilt from a checkpoint, with what sampling needs to know about it."""

    config: TrainingConfig  # the training config stored in the checkpoint
    model: torch.nn.Module
    diffusion: torch.nn.Module
    class_names: list[str]
    device: torch.device
    step: int  # training steps behind these weights
    train_code: str = ""  # the fingerprint of the training code that made it ("" when the checkpoint has none)


def load_model(checkpoint: Path, cfg: Config, precision: str | None = None, compile: bool | None = None) -> LoadedModel:
    """Rebuild the EMA network on the device chosen by `cfg.train.device` (the current params), checking
    that the device supports the sampling `precision` (default `sample.precision`), compiled when `compile`
    (default `sample.compile`). An unusable checkpoint is a UserError naming the file and the fix.

    Run under `configure_backends`, which the workflow calls first (it sets process-wide torch flags).
    """
    device = resolve_device(cfg.train.device)
    check_precision(precision or cfg.sample.precision, device)
    try:
        ckpt = load_checkpoint(checkpoint)
        train_cfg, model, diffusion = load_ema_model(checkpoint, device, ckpt=ckpt)
    except FileNotFoundError as err:
        raise UserError(f"{err}; {MISSING_FIX}") from None
    except CheckpointError as err:
        raise UserError(f"{err}; {CHECKPOINT_FIXES[err.problem]}") from None
    compiled = cfg.sample.compile if compile is None else compile
    if uses_channels_last(cfg.train, compiled):
        model = model.to(memory_format=torch.channels_last)
    if compiled:
        model = torch.compile(model)
    names = ckpt.get("class_names") or [str(i) for i in range(train_cfg.model.num_classes)]
    train_code = str((ckpt.get("code") or {}).get("fingerprint", ""))
    return LoadedModel(train_cfg, model.eval(), diffusion, list(names), device, int(ckpt["step"]), train_code)


def check_steps(lm: LoadedModel, steps: int, name: str) -> None:
    """The sampler's own check of `steps` against the model's diffusion, as a UserError naming `name`
    (the param or flag the value came from)."""
    try:
        respaced_timesteps(lm.diffusion.num_timesteps, steps)
    except ValueError as err:
        raise UserError(f"{err}; fix {name}") from None


def evaluation_set(lm: LoadedModel, settings: SamplerSettings, num: int, seed: int, batch_size: int,
                   precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` class-balanced conditional samples: uint8 images (N, C, H, W) and their labels (N,); an
    unconditional model's samples have label -1 (no class)."""
    k = lm.config.model.num_classes
    labels = balanced_labels(num, k) if k else None
    images, _ = generate(lm.model, lm.diffusion, labels, settings, num=num, device=lm.device, seed=seed,
                         batch_size=batch_size, precision=precision)
    return images, labels if labels is not None else torch.full((num,), -1)

"""Batched, reproducible image generation from a trained (EMA) model.

Used by the progress grids during training, the sample stage, the CLI and the guidance sweep. Memory is
bounded by `batch_size`, independent of how many images are asked for; the conditional and
unconditional halves of classifier-free guidance run as one batch of 2B inside `samplers.guided`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import EllipsisType

import torch
from torch import nn

from ddpm.config import FinalStep, SampleConfig, SamplerName, Spacing
from ddpm.core.diffusion import GaussianDiffusion, ModelFn
from ddpm.core.images import to_uint8
from ddpm.core.runtime import autocast
from ddpm.core.samplers import evaluation_timesteps, guidance_flags, guided, sample


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler choice, made explicitly (never inferred)."""

    sampler: SamplerName
    steps: int
    eta: float
    guidance_scale: float
    spacing: Spacing = "time"
    guidance_interval: tuple[float, float] | None = None  # (lo, hi] in EDM sigma; None: every step
    final_step: FinalStep = "clean"  # dpm_solver only

    @classmethod
    def from_config(cls, sc: SampleConfig, guidance_scale: float | None = None,
                    guidance_interval: tuple[float, float] | None | EllipsisType = ...) -> SamplerSettings:
        """The settings of the sample section; `guidance_scale` and `guidance_interval` (None: everywhere)
        override its own when given (the sweep)."""
        w = sc.guidance_scale if guidance_scale is None else guidance_scale
        interval = sc.guidance_interval if guidance_interval is ... else guidance_interval
        return cls(sampler=sc.sampler, steps=sc.steps, eta=sc.eta, guidance_scale=w, spacing=sc.spacing,
                   guidance_interval=interval, final_step=sc.final_step)

    def options(self) -> dict:
        """The named sampler's own options (and no other sampler's)."""
        if self.sampler == "ddim":
            return {"eta": self.eta}
        if self.sampler == "dpm_solver":  # a first-order noisy last step on time-uniform steps (see the sampler)
            return {"final_step": self.final_step, "lower_order_final": self.spacing == "time"}
        return {}

    def timesteps(self, diffusion: GaussianDiffusion) -> torch.Tensor:
        """The timesteps the sampler evaluates the model at, decreasing: int64 (S,)."""
        return evaluation_timesteps(diffusion, self.sampler, self.steps, self.spacing)


def network_evaluations(diffusion: GaussianDiffusion, settings: SamplerSettings, conditional: bool) -> int:
    """Network evaluations per sample: one per step, two (conditional + unconditional, batched as one pass
    of 2B) where guidance applies."""
    flags = guidance_flags(diffusion, settings.timesteps(diffusion), settings.guidance_interval)
    guiding = conditional and settings.guidance_scale > 0
    return sum(2 if guiding and g else 1 for g in flags)


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Class labels must lie in [0, num_classes] (num_classes = the null label): checked once per call on
    the host, so the network's forward need not read labels back (a host sync per step on a GPU)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(
            f"class labels must lie in [0, {num_classes}] ({num_classes} = no class), "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )


@torch.inference_mode()
def generate(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    labels: torch.Tensor | None,
    settings: SamplerSettings,
    *,
    num: int | None = None,
    device: torch.device,
    seed: int,
    batch_size: int,
    precision: str = "fp32",
    record: Iterable[int] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Sample `len(labels)` images (or `num` unconditional ones) as uint8 (N, C, H, W) on the CPU.

    Returns the images and, for each timestep in `record` (a subset of `settings.timesteps`), the uint8 x_t
    of every image. Noise comes from one generator seeded with `seed`, consumed batch after batch, so the
    same seed, labels and batch size give the same images.
    """
    model.eval()
    n = len(labels) if labels is not None else int(num)
    if labels is not None and getattr(model, "num_classes", 0):
        check_labels(labels, model.num_classes)
    size, channels = model.image_size, model.in_channels
    gen = torch.Generator(device=device).manual_seed(seed)
    timesteps = settings.timesteps(diffusion)  # (S,) decreasing
    record = sorted(set(record))
    missing = sorted(set(record) - set(timesteps.tolist()))
    if missing:  # else the caller's picture would silently lack frames
        raise ValueError(f"cannot record timesteps {missing}: the sampler visits only {sorted(timesteps.tolist())}")
    model_fn = _model_fns(model, diffusion, labels is not None, settings, timesteps)
    images, frames = [], {t: [] for t in record}

    def keep(t: int, x: torch.Tensor) -> None:
        if t in frames:
            frames[t].append(to_uint8(x).cpu())  # (B, C, H, W)

    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        y = labels[start : start + b].to(device) if labels is not None else None  # (B,)
        with autocast(precision, device):
            x = sample(diffusion, model_fn, (b, channels, size, size), y, settings.sampler, timesteps, gen,
                       callback=keep if record else None, **settings.options())
        images.append(to_uint8(x).cpu())  # (B, C, H, W)
    return torch.cat(images), {t: torch.cat(v) for t, v in frames.items()}


def _model_fns(model: nn.Module, diffusion: GaussianDiffusion, conditional: bool, settings: SamplerSettings,
               timesteps: torch.Tensor) -> ModelFn | list[ModelFn]:
    """The model function (guided or not), or one per timestep when guidance applies on an interval only:
    outside it the conditional branch alone."""
    if not conditional:
        return _unconditional(model)
    fn = guided(model, settings.guidance_scale, getattr(model, "null_label", None))
    if settings.guidance_interval is None:
        return fn
    flags = guidance_flags(diffusion, timesteps, settings.guidance_interval)
    return [fn if g else model for g in flags]


def _unconditional(model: nn.Module):
    """Model function of an unconditional network (labels ignored)."""
    return lambda x, t, y: model(x, t, None)


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., C-1, 0, 1, ... so every class gets num/C samples (+1 for the first remainder)."""
    return torch.arange(num) % num_classes  # (N,)

"""Batched, reproducible image generation from a trained (EMA) model.

Used by the progress grids during training, the sample stage, the CLI and the guidance sweep. Memory is
bounded by `batch_size`, independent of how many images are asked for; the conditional and
unconditional halves of classifier-free guidance run as one batch of 2B inside `samplers.guided`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ddpm.config import SampleConfig, SamplerName, Spacing
from ddpm.core.diffusion import GaussianDiffusion
from ddpm.core.images import to_uint8
from ddpm.core.runtime import autocast
from ddpm.core.samplers import guided, sample


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler choice, made explicitly (never inferred)."""

    sampler: SamplerName
    steps: int
    eta: float
    guidance_scale: float
    spacing: Spacing = "time"

    @classmethod
    def from_config(cls, sc: SampleConfig, guidance_scale: float | None = None) -> SamplerSettings:
        w = sc.guidance_scale if guidance_scale is None else guidance_scale
        return cls(sampler=sc.sampler, steps=sc.steps, eta=sc.eta, guidance_scale=w, spacing=sc.spacing)


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

    Returns the images and, for each timestep in `record`, the uint8 x_t of every image. Noise comes from
    one generator seeded with `seed`, consumed batch after batch, so the same seed, labels and batch size
    give the same images.
    """
    model.eval()
    n = len(labels) if labels is not None else int(num)
    size, channels = model.image_size, model.in_channels
    gen = torch.Generator(device=device).manual_seed(seed)
    null = getattr(model, "null_label", None)
    model_fn = guided(model, settings.guidance_scale, null) if labels is not None else _unconditional(model)
    record = sorted(set(record))
    images, frames = [], {t: [] for t in record}
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        y = labels[start : start + b].to(device) if labels is not None else None  # (B,)
        with autocast(precision, device):
            x, inter = sample(
                diffusion,
                model_fn,
                (b, channels, size, size),
                y,
                sampler=settings.sampler,
                steps=settings.steps,
                eta=settings.eta,
                generator=gen,
                record=record,
                spacing=settings.spacing,
            )
        images.append(to_uint8(x).cpu())  # (B, C, H, W)
        for t in record:
            frames[t].append(to_uint8(inter[t]).cpu())
    return torch.cat(images), {t: torch.cat(v) for t, v in frames.items()}


def _unconditional(model: nn.Module):
    """Model function of an unconditional network (labels ignored)."""
    return lambda x, t, y: model(x, t, None)


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., C-1, 0, 1, ... so every class gets num/C samples (+1 for the first remainder)."""
    return torch.arange(num) % num_classes  # (N,)

"""Noise schedules beta_1..beta_T, computed in float64.

Schedules are built in float64 because 1 - alpha_bar_t is tiny at small t (1e-4) and the products
alpha_bar_t = prod(1 - beta_s) lose digits in float32; `GaussianDiffusion` derives every
coefficient from these float64 betas and only then stores float32 copies.
"""

from __future__ import annotations

import math

import torch

from ddpm.config import DiffusionConfig, Schedule


def linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM's linear schedule: beta_t = beta_start + (t-1)/(T-1) (beta_end - beta_start), t = 1..T.

    Returns a float64 tensor of shape (T,) whose first and last entries are exactly beta_start and beta_end.
    """
    if T < 2:
        raise ValueError(f"the linear schedule needs at least 2 timesteps, got T={T}")
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(f"the linear schedule needs 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
    # linspace pins both end points exactly (an arange-based formula can drift in the last digit)
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)  # (T,)


def cosine_alpha_bar(t: torch.Tensor, T: int, s: float = 0.008) -> torch.Tensor:
    """The cosine schedule's closed form alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2)."""
    t = t.to(torch.float64)

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u / T + s) / (1 + s) * (math.pi / 2)) ** 2

    return f(t) / f(torch.zeros_like(t))


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) eq. 17: beta_t = min(1 - alpha_bar(t) / alpha_bar(t-1), max_beta), t = 1..T.

    The clip keeps beta_T (= 1 exactly, since alpha_bar(T) = 0) from making the last step singular.
    Returns float64 (T,).
    """
    if T < 1:
        raise ValueError(f"the cosine schedule needs at least 1 timestep, got T={T}")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"the cosine schedule's max_beta must lie in (0, 1), got {max_beta}")
    alpha_bar = cosine_alpha_bar(torch.arange(T + 1), T, s)  # (T+1,) alpha_bar(0..T)
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]  # (T,)
    return betas.clamp(max=max_beta)


def make_betas(schedule: Schedule, cfg: DiffusionConfig) -> torch.Tensor:
    """The one place a schedule name becomes betas: float64 tensor of shape (cfg.timesteps,)."""
    if schedule == "linear":
        return linear_betas(cfg.timesteps, cfg.beta_start, cfg.beta_end)
    if schedule == "cosine":
        return cosine_betas(cfg.timesteps, cfg.cosine_s, cfg.max_beta)
    raise ValueError(f"unknown noise schedule {schedule!r}")  # unreachable from a validated config (a Literal)

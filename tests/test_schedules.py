"""Noise schedules: ranges, monotonicity, exact end points and the cosine closed form."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm.config import DiffusionConfig
from ddpm.core.schedules import cosine_betas, linear_betas, make_betas


def _both(T: int = 1000) -> list[torch.Tensor]:
    return [linear_betas(T, 1e-4, 0.02), cosine_betas(T)]


@pytest.mark.parametrize("betas", _both(), ids=["linear", "cosine"])
def test_betas_are_float64_probabilities_non_decreasing(betas: torch.Tensor) -> None:
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert bool((betas > 0).all()) and bool((betas < 1).all())
    assert bool((betas[1:] >= betas[:-1]).all())


@pytest.mark.parametrize("betas", _both(), ids=["linear", "cosine"])
def test_alpha_bar_strictly_decreasing_towards_zero(betas: torch.Tensor) -> None:
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert bool((alpha_bar[1:] < alpha_bar[:-1]).all())
    assert alpha_bar[0] > 0.99 and alpha_bar[-1] < 1e-3  # from almost clean data to almost pure noise


def test_linear_end_points_exact_and_formula() -> None:
    T, b0, b1 = 1000, 1e-4, 0.02
    betas = linear_betas(T, b0, b1)
    assert betas[0].item() == b0 and betas[-1].item() == b1
    for t in (1, 2, 250, 777, 1000):  # 1-based paper index
        assert betas[t - 1].item() == pytest.approx(b0 + (t - 1) / (T - 1) * (b1 - b0), rel=1e-12)


def test_cosine_alpha_bar_equals_closed_form() -> None:
    T, s = 1000, 0.008
    alpha_bar = torch.cumprod(1 - cosine_betas(T, s), 0)

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    # alpha_bar[t-1] is the paper's alpha_bar(t); the clip only touches the very last beta
    for t in (1, 10, 100, 500, 900, 999):
        assert alpha_bar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-10)


def test_cosine_clips_the_last_beta() -> None:
    betas = cosine_betas(1000, max_beta=0.999)
    assert betas[-1].item() == 0.999  # unclipped it would be 1 (alpha_bar(T) = 0)
    assert betas[-2].item() < 0.999
    assert cosine_betas(1000, max_beta=0.5).max().item() == 0.5


def test_make_betas_dispatches_on_the_schedule_name() -> None:
    cfg = DiffusionConfig(timesteps=50, beta_start=1e-3, beta_end=0.05, cosine_s=0.01, max_beta=0.9)
    assert torch.equal(make_betas("linear", cfg), linear_betas(50, 1e-3, 0.05))
    assert torch.equal(make_betas("cosine", cfg), cosine_betas(50, 0.01, 0.9))
    with pytest.raises(ValueError, match="quadratic"):
        make_betas("quadratic", cfg)  # type: ignore[arg-type]


def test_linear_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="timesteps"):
        linear_betas(1, 1e-4, 0.02)
    with pytest.raises(ValueError, match="beta_start"):
        linear_betas(10, 0.02, 1e-4)

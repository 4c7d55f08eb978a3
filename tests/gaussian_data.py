"""Class-conditional Gaussian data with its exact optimal predictor, for testing samplers in closed form.

For x0 ~ N(mu_y, sigma_y^2 I) and x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, with d = ab sigma^2 + 1 - ab:
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / d,   E[x0 | x_t] = mu + sqrt(ab) sigma^2 (x_t - sqrt(ab) mu) / d
A perfect network outputs `diffusion.target(E[x0|x_t], E[eps|x_t], t)` (the targets are linear in (x0, eps)),
so a correct sampler driven by it must reproduce N(mu_y, sigma_y^2) up to its discretisation error.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from ddpm.core.diffusion import GaussianDiffusion, extract
from ddpm.core.generate import SamplerSettings
from ddpm.core.samplers import sample
from ddpm.core.schedules import cosine_betas, linear_betas

MU = torch.tensor(
    [
        [-0.5, -0.5, -0.4, -0.6, 0.3, 0.3, 0.2, 0.4],
        [0.0, 0.2, -0.2, 0.1, 0.0, 0.4, -0.4, 0.0],
        [0.5, 0.6, 0.4, 0.5, 0.5, -0.3, 0.5, 0.5],
    ]
)  # (K, D) class means
SIGMA = torch.tensor([0.2, 0.3, 0.1])  # (K,) class stds
N = 2000  # samples per class


def gaussian_diffusion(schedule: str = "linear", prediction: str = "eps", variance: str = "fixed_large",
                       clip_x0: bool = False) -> GaussianDiffusion:
    betas = linear_betas(1000, 1e-4, 0.02) if schedule == "linear" else cosine_betas(1000)
    return GaussianDiffusion(betas, prediction, variance, clip_x0=clip_x0)  # type: ignore[arg-type]


def optimal_model(diffusion: GaussianDiffusion, mu: torch.Tensor = MU, sigma: torch.Tensor = SIGMA):
    """The exact minimiser of the training loss for Gaussian classes, in the diffusion's prediction space
    (sigma 0: a point mass, whose x0 prediction is mu at every noise level)."""

    def model(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ab = extract(diffusion.alphas_cumprod, t, x_t.shape)  # (B, 1)
        m, s2 = mu[y], sigma[y].unsqueeze(1) ** 2  # (B, D), (B, 1)
        resid = (x_t - ab.sqrt() * m) / (ab * s2 + 1 - ab)  # (B, D)
        eps = (1 - ab).sqrt() * resid  # (B, D)
        x0 = m + ab.sqrt() * s2 * resid  # (B, D)
        return diffusion.target(x0, eps, t)

    return model


def labels(k: int = 3, n: int = N) -> torch.Tensor:
    return torch.arange(k).repeat_interleave(n)  # (k n,)


def per_class(x: torch.Tensor, y: torch.Tensor, c: int) -> tuple[torch.Tensor, float]:
    """Per-dimension mean (D,) and the std pooled over dimensions."""
    xc = x[y == c]
    return xc.mean(0), xc.var(0).mean().sqrt().item()


def assert_matches_data(x: torch.Tensor, y: torch.Tensor, std_rtol: float) -> None:
    for c in range(MU.shape[0]):
        mean, std = per_class(x, y, c)
        se = SIGMA[c].item() / N**0.5  # standard error of each mean
        torch.testing.assert_close(mean, MU[c], atol=4.5 * se, rtol=0, msg=f"class {c} mean")
        assert std == pytest.approx(SIGMA[c].item(), rel=std_rtol), f"class {c} std"


def std_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """The worst relative error of the per-class sample std against the true SIGMA."""
    return max(abs(per_class(x, y, c)[1] / SIGMA[c].item() - 1) for c in range(3))


def run(diffusion: GaussianDiffusion, model_fn, shape: tuple[int, ...], y: torch.Tensor | None, sampler: str,
        steps: int, seed: int, spacing: str = "time", eta: float = 0.0, final_step: str = "clean",
        record=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One sampler run as `generate` sets it up (the timesteps and the sampler's options from SamplerSettings),
    on float tensors: (x_0, {t: x_t for t in record})."""
    settings = SamplerSettings(sampler=sampler, steps=steps, eta=eta, guidance_scale=0.0, spacing=spacing,
                               final_step=final_step)  # type: ignore[arg-type]
    frames: dict[int, torch.Tensor] = {}

    def keep(t: int, x: torch.Tensor) -> None:
        if t in record:
            frames[t] = x

    x = sample(diffusion, model_fn, shape, y, sampler, settings.timesteps(diffusion),  # type: ignore[arg-type]
               torch.Generator().manual_seed(seed), callback=keep, **settings.options())
    return x, frames


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The sampler loops run on tiny tensors: one thread avoids OpenMP spinning on a shared, busy CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

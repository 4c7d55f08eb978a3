"""The Gaussian diffusion process of DDPM (Ho et al. 2020) with eps / x0 / v parameterisations.

Notation (0-based index t in [0, T) stands for the paper's timestep t+1):
    alpha_bar_t = prod_{s<=t} (1 - beta_s)
    q(x_t | x_0)      = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)                    (DDPM eq. 4)
    q(x_{t-1} | x_t, x_0) = N(coef1_t x_0 + coef2_t x_t, beta_tilde_t I)                (DDPM eq. 6-7)
    v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0                               (Salimans & Ho 2022)

Every coefficient is computed once in float64 from the float64 betas and stored as a float32 buffer;
every per-timestep read goes through `extract`. The network output is interpreted in exactly two
places: `target` (what training regresses onto) and `to_x0_eps` (reading a prediction back).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ddpm.config import Prediction, TrainingConfig, Variance
from ddpm.core.schedules import make_betas

# model(x_t, t, y) -> network output in the diffusion's prediction space
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def extract(a: torch.Tensor, t: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Gather a[t] for a batch of timesteps and reshape to (B, 1, ..., 1), broadcastable to `shape`."""
    out = a.gather(0, t)  # (B,)
    return out.reshape(t.shape[0], *((1,) * (len(shape) - 1)))  # (B, 1, ..., 1)


class PMeanVariance(NamedTuple):
    """The reverse-step Gaussian p(x_{t-1} | x_t) and the x0 it was built from."""

    mean: torch.Tensor  # (B, ...)
    variance: torch.Tensor  # (B, 1, ..., 1)
    log_variance: torch.Tensor  # (B, 1, ..., 1)
    pred_x0: torch.Tensor  # (B, ...)


class GaussianDiffusion(nn.Module):
    """The forward process q, the training loss and the reverse-step Gaussians p_theta.

    Built from float64 betas (T,). The coefficient buffers are non-persistent: they are a pure function
    of the config, so they never enter a state_dict and move with `.to(device)`. `betas64` keeps the
    float64 schedule on the CPU for building respaced processes (DDIM / fewer-step sampling).
    """

    def __init__(
        self,
        betas: torch.Tensor,
        prediction: Prediction = "eps",
        variance: Variance = "fixed_large",
        clip_x0: bool = True,
    ):
        super().__init__()
        betas = betas.detach().to("cpu", torch.float64)
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"every beta must lie in (0, 1), got min {betas.min().item()}, max {betas.max().item()}")
        self.prediction: Prediction = prediction
        self.variance: Variance = variance
        self.clip_x0 = clip_x0
        self.num_timesteps = int(betas.numel())
        self.betas64 = betas
        for name, value in self._coefficients(betas).items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    @staticmethod
    def _coefficients(betas: torch.Tensor) -> dict[str, torch.Tensor]:
        """All per-timestep coefficients in float64, each of shape (T,)."""
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)  # alpha_bar_t
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)  # beta_tilde_t (DDPM eq. 7); 0 at t = 0
        # log(0) at t = 0 would be -inf; DDPM / iDDPM use beta_tilde_1 there (the last step adds no noise).
        # A one-step process (respaced to a single step) has no beta_tilde_1 and uses beta_0.
        var_at_0 = post_var[1:2] if betas.numel() > 1 else betas[:1]
        post_log_var = torch.log(torch.cat([var_at_0, post_var[1:]]))
        # iDDPM's fixed_large: beta_t, except beta_tilde_1 at t = 0 for a sensible decoder log-likelihood
        large_var = torch.cat([var_at_0, betas[1:]])
        return {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            "fixed_large_variance": large_var,
            "fixed_large_log_variance": torch.log(large_var),
            "snr": ac / (1.0 - ac),  # SNR(t) = alpha_bar / (1 - alpha_bar), for loss weighting
        }

    @classmethod
    def from_config(cls, cfg: TrainingConfig) -> GaussianDiffusion:
        """Build the process named by `cfg.schedule` with the settings of `cfg.diffusion`."""
        d = cfg.diffusion
        return cls(make_betas(cfg.schedule, d), prediction=d.prediction, variance=d.variance, clip_x0=d.clip_x0)

    def respaced(self, timesteps: torch.Tensor) -> GaussianDiffusion:
        """The process restricted to an increasing subset of timesteps (DDIM section 4.2, iDDPM section 4).

        Its alpha_bar_i is this process's alpha_bar at timesteps[i], so its betas are
        1 - alpha_bar_i / alpha_bar_{i-1}. Index i of the result stands for original timestep timesteps[i].
        """
        ac = torch.cumprod(1.0 - self.betas64, 0)[timesteps.cpu()]  # (S,) float64
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        betas = 1.0 - ac / ac_prev  # (S,)
        out = GaussianDiffusion(betas, self.prediction, self.variance, self.clip_x0)
        return out.to(self.betas.device)

    # ---- forward process -------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (DDPM eq. 4)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
        )  # (B, ...)

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x0
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )  # (B, ...)
        var = extract(self.posterior_variance, t, x_t.shape)  # (B, 1, ..., 1)
        log_var = extract(self.posterior_log_variance_clipped, t, x_t.shape)  # (B, 1, ..., 1)
        return mean, var, log_var

    # ---- the network's output space: the only two places it is interpreted ----------------------

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to predict for x_t = q_sample(x0, t, noise): eps, x0 or v."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
        )  # (B, ...)

    def to_x0_eps(
        self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read a network output back as (x0, eps), inverting x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
        out = out.to(x_t.dtype)  # autocast may hand back bf16 / fp16
        shape = x_t.shape
        if self.prediction == "eps":
            eps = out
            x0 = extract(self.sqrt_recip_alphas_cumprod, t, shape) * x_t - extract(
                self.sqrt_recipm1_alphas_cumprod, t, shape
            ) * eps  # (B, ...)
            return x0, eps
        if self.prediction == "x0":
            return out, self.eps_from_x0(out, x_t, t)
        # v: x0 = sqrt(ab) x_t - sqrt(1 - ab) v, eps = sqrt(1 - ab) x_t + sqrt(ab) v
        s_ab = extract(self.sqrt_alphas_cumprod, t, shape)  # (B, 1, ..., 1)
        s_1m = extract(self.sqrt_one_minus_alphas_cumprod, t, shape)  # (B, 1, ..., 1)
        return s_ab * x_t - s_1m * out, s_1m * x_t + s_ab * out

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The eps consistent with x_t and a given x0: (x_t / sqrt(ab) - x0) / sqrt(1/ab - 1)."""
        shape = x_t.shape
        return (extract(self.sqrt_recip_alphas_cumprod, t, shape) * x_t - x0) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, shape
        )  # (B, ...)

    def pred_x0_eps(
        self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`to_x0_eps`, then (if clip_x0) x0 clipped to [-1, 1] and eps re-derived so the pair stays consistent."""
        x0, eps = self.to_x0_eps(out, x_t, t)
        if self.clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self.eps_from_x0(x0, x_t, t)
        return x0, eps

    # ---- training --------------------------------------------------------------------------------

    def training_losses(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-example L_simple (DDPM eq. 14, in the chosen prediction space): MSE over non-batch dims, (B,)."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)  # (B, C, H, W)
        out = model(x_t, t, y)  # (B, C, H, W)
        err = (out.float() - self.target(x0, noise, t).float()) ** 2  # (B, C, H, W)
        return err.mean(dim=tuple(range(1, err.ndim)))  # (B,)

    def loss_weights(self, t: torch.Tensor, weighting: str = "uniform", gamma: float = 5.0) -> torch.Tensor:
        """Per-example weights (B,) of the L_simple terms at timesteps t (B,).

        "min_snr" is Hang et al. 2023 ("Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 9 and
        sec. 3.4): every timestep's loss, measured in x0 terms, weighted by min(SNR(t), gamma). Since
        ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2, that is
        min(SNR, gamma) / SNR on an eps loss, min(SNR, gamma) on an x0 loss and min(SNR, gamma) / (SNR + 1) on
        a v loss (diffusers' train_text_to_image uses the same eps and v forms).
        """
        if weighting == "uniform":
            return torch.ones(t.shape, device=t.device)
        if weighting != "min_snr":
            raise ValueError(f"unknown loss weighting {weighting!r}")  # unreachable from a validated config
        snr = self.snr.gather(0, t)  # (B,)
        clipped = snr.clamp(max=gamma)  # (B,) min(SNR, gamma)
        if self.prediction == "eps":
            return clipped / snr
        if self.prediction == "x0":
            return clipped
        return clipped / (snr + 1.0)

    # ---- reverse process -------------------------------------------------------------------------

    def p_mean_variance(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> PMeanVariance:
        """p(x_{t-1} | x_t): the posterior mean at the predicted x0 and the fixed variance (DDPM sec. 3.2).

        fixed_small uses beta_tilde_t, fixed_large beta_t (beta_tilde_1 at t = 0, as in iDDPM). With
        clip_x0 the predicted x0 is clipped to [-1, 1] before it enters the mean.
        """
        x0, _ = self.pred_x0_eps(model_out, x_t, t)
        mean, var, log_var = self.q_posterior(x0, x_t, t)
        if self.variance == "fixed_large":
            var = extract(self.fixed_large_variance, t, x_t.shape)  # (B, 1, ..., 1)
            log_var = extract(self.fixed_large_log_variance, t, x_t.shape)  # (B, 1, ..., 1)
        return PMeanVariance(mean, var, log_var, x0)

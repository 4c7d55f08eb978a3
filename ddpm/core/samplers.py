"""Samplers: DDPM ancestral sampling, DDIM, DPM-Solver++(2M), and classifier-free guidance.

Every sampler takes `model_fn(x_t, t, y) -> output` in the diffusion's prediction space (eps, x0 or v)
and is called with ORIGINAL timestep indices t in [0, T), int64 (B,), even when sampling over a
respaced subset of timesteps. Noise comes only from the passed `torch.Generator` (which must live on
the diffusion's device), so a seed fixes the samples. The loops read no values back to the host;
wrapping them in `torch.inference_mode()` is the caller's choice.

Respacing (DDIM sec. 4.2, iDDPM sec. 4): for a kept increasing subset tau_0 < ... < tau_{S-1} of the T
timesteps, the alpha_bar at the kept steps define a shorter process with betas
1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}}; DDPM and DDIM run on that process. The subset is
uniform in t (`spacing="time"`) or in log-SNR (`spacing="logsnr"`, the DPM-Solver paper's choice for
pixel-space models at low resolution), see `sampling_timesteps`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection

import torch

from ddpm.config import SamplerName, Spacing
from ddpm.core.diffusion import GaussianDiffusion, ModelFn, extract


def respaced_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """`steps` evenly spaced timesteps of [0, T), increasing, always including T-1 (and 0 when steps >= 2).

    Returns int64 (steps,) on the CPU. steps == T gives every timestep.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be between 1 and the {num_timesteps} diffusion timesteps, got {steps}")
    if steps == 1:
        return torch.tensor([num_timesteps - 1], dtype=torch.int64)
    # spacing (T-1)/(steps-1) >= 1, so rounding never merges two steps
    return torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().to(torch.int64)  # (steps,)


def half_log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t) = 0.5 log(ab_t / (1 - ab_t)) (DPM-Solver's half log-SNR), same shape."""
    ab = alphas_cumprod.to(torch.float64)
    return 0.5 * (ab.log() - (-ab).log1p())


def logsnr_timesteps(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """Timesteps whose half log-SNR is closest to `steps` values uniform in [lambda_{T-1}, lambda_0].

    Returns int64 (S,) increasing, S <= steps, always holding T-1 and (for steps >= 2) 0. Where two targets
    fall on the same discrete timestep (lambda moves fastest near t = 0) the duplicate is dropped and a
    warning says how many steps remain.
    """
    T = alphas_cumprod.numel()
    if not 1 <= steps <= T:
        raise ValueError(f"sampling steps must be between 1 and the {T} diffusion timesteps, got {steps}")
    if steps == 1:
        return torch.tensor([T - 1], dtype=torch.int64)
    lam = half_log_snr(alphas_cumprod.cpu())  # (T,) decreasing in t
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)  # (steps,)
    nearest = (lam.unsqueeze(0) - targets.unsqueeze(1)).abs().argmin(dim=1)  # (steps,) timestep per target
    kept = torch.unique(nearest)  # (S,) sorted increasing, duplicates dropped
    if kept.numel() < steps:
        warnings.warn(
            f"log-SNR spacing: {steps} sampling steps fall on {kept.numel()} distinct timesteps of {T}; "
            f"sampling with {kept.numel()} steps",
            stacklevel=2,
        )
    return kept


def sampling_timesteps(diffusion: GaussianDiffusion, steps: int, spacing: Spacing = "time") -> torch.Tensor:
    """The increasing timesteps a `steps`-step sampler visits: uniform in t or in log-SNR. int64 (S,), CPU."""
    if spacing == "time":
        return respaced_timesteps(diffusion.num_timesteps, steps)
    if spacing == "logsnr":
        return logsnr_timesteps(torch.cumprod(1.0 - diffusion.betas64, 0), steps)
    raise ValueError(f"unknown timestep spacing {spacing!r}")  # unreachable from a validated config (a Literal)


def guided(model: ModelFn, guidance_scale: float, null_label: int | None) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022): out = (1 + w) out(x, t, y) - w out(x, t, null).

    Both halves come from ONE forward pass on a batch of 2B. Combining in eps, x0 or v space gives the
    same sampler: each is an affine function of the others at fixed (x_t, t), and the weights (1 + w)
    and -w sum to 1, so the affine offsets cancel identically. w == 0 returns `model` itself.
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {guidance_scale}")
    if guidance_scale == 0:
        return model
    if null_label is None:
        raise ValueError(
            f"guidance scale {guidance_scale} needs a class-conditional model with a null label, but the model is "
            "unconditional (no null label)"
        )
    w = float(guidance_scale)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y; pass labels or use guidance scale 0")
        null = torch.full_like(y, null_label)  # (B,)
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, ...)
        cond, uncond = out.float().chunk(2)  # (B, ...) each, fp32 even under bf16/fp16 autocast
        # in fp32: at w = 4 a bf16 difference of two close predictions would lose most of its bits
        return (1.0 + w) * cond - w * uncond  # (B, ...) float32

    return model_fn


def _check_generator(generator: torch.Generator, device: torch.device) -> None:
    """The noise must be drawn on the diffusion's device from the caller's generator."""
    if generator.device.type != device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the diffusion is on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )


def _process(
    diffusion: GaussianDiffusion, steps: int, spacing: Spacing = "time"
) -> tuple[GaussianDiffusion, list[int]]:
    """The (possibly respaced) process to sample from and the original timestep of each of its indices."""
    timesteps = sampling_timesteps(diffusion, steps, spacing)  # (S,)
    every = timesteps.numel() == diffusion.num_timesteps
    process = diffusion if every else diffusion.respaced(timesteps)
    return process, timesteps.tolist()


def _check_record(record: Collection[int], kept: list[int]) -> None:
    """Recorded timesteps must be visited by the sampler, else the caller's picture would silently lack frames."""
    missing = sorted(set(record) - set(kept))
    if missing:
        raise ValueError(f"cannot record timesteps {missing}: the sampler visits only {kept}")


def ddpm_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    y: torch.Tensor | None,
    generator: torch.Generator,
    record: Collection[int] = (),
    steps: int | None = None,
    spacing: Spacing = "time",
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Ancestral sampling (DDPM Alg. 2) over all T steps, or over `steps` respaced steps as in iDDPM.

    Returns (x0, {t: x_t}) where the dict holds the sampler state x_t entering step t, for t in `record`.
    """
    process, kept = _process(diffusion, diffusion.num_timesteps if steps is None else steps, spacing)
    _check_record(record, kept)
    device = diffusion.betas.device
    _check_generator(generator, device)
    x = torch.randn(shape, generator=generator, device=device)  # (B, ...) x_T ~ N(0, I), Alg. 2 line 1
    frames: dict[int, torch.Tensor] = {}
    for i in reversed(range(len(kept))):
        if kept[i] in record:
            frames[kept[i]] = x
        t = torch.full((shape[0],), kept[i], dtype=torch.int64, device=device)  # (B,) original timestep
        idx = torch.full((shape[0],), i, dtype=torch.int64, device=device)  # (B,) index in the process
        p = process.p_mean_variance(model_fn(x, t, y), x, idx)  # mean: DDPM eq. 11 (via x0, eq. 7)
        if i > 0:  # Alg. 2 line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I)
            z = torch.randn(shape, generator=generator, device=device)  # (B, ...)
            x = p.mean + (0.5 * p.log_variance).exp() * z  # (B, ...)
        else:  # z = 0 at the last step: return the mean
            x = p.mean
    return x, frames


def ddim_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    y: torch.Tensor | None,
    steps: int,
    eta: float,
    generator: torch.Generator,
    record: Collection[int] = (),
    spacing: Spacing = "time",
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """DDIM (Song et al. 2021, eq. 12) on `steps` respaced timesteps; eta = 0 deterministic, eta = 1 ~ DDPM.

    Returns (x0, {t: x_t}) like `ddpm_sample`.
    """
    if not 0 <= eta <= 1:  # above 1, 1 - ab_prev - sigma^2 (the squared weight of eps below) can go negative
        raise ValueError(f"DDIM eta must lie in [0, 1], got {eta}")
    process, kept = _process(diffusion, steps, spacing)
    _check_record(record, kept)
    device = diffusion.betas.device
    _check_generator(generator, device)
    # per-step coefficients in float64 from the respaced process, stored float32 on the device
    ac = torch.cumprod(1.0 - process.betas64, 0)  # (S,) alpha_bar of the kept steps
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])  # (S,) alpha_bar_prev, 1 before the first kept step
    # eq. 16: sigma = eta sqrt((1 - ab_prev)/(1 - ab)) sqrt(1 - ab/ab_prev)
    sigma64 = eta * ((1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev)).sqrt()  # (S,)
    c_x0 = ac_prev.sqrt().to(device, torch.float32)  # (S,)
    c_eps = (1.0 - ac_prev - sigma64**2).clamp(min=0.0).sqrt().to(device, torch.float32)  # (S,)
    sigma = sigma64.to(device, torch.float32)  # (S,)

    x = torch.randn(shape, generator=generator, device=device)  # (B, ...) x_T ~ N(0, I)
    frames: dict[int, torch.Tensor] = {}
    for i in reversed(range(len(kept))):
        if kept[i] in record:
            frames[kept[i]] = x
        t = torch.full((shape[0],), kept[i], dtype=torch.int64, device=device)  # (B,) original timestep
        idx = torch.full((shape[0],), i, dtype=torch.int64, device=device)  # (B,) index in the process
        # eq. 12 "predicted x0" (eq. 9), clipped if configured, and the eps consistent with it
        x0, eps = process.pred_x0_eps(model_fn(x, t, y), x, idx)  # (B, ...) each
        # eq. 12: sqrt(ab_prev) x0 + "direction pointing to x_t" sqrt(1 - ab_prev - sigma^2) eps + sigma z
        x = extract(c_x0, idx, shape) * x0 + extract(c_eps, idx, shape) * eps  # (B, ...)
        if i > 0 and eta > 0:  # sigma = 0 at the last step (ab_prev = 1)
            z = torch.randn(shape, generator=generator, device=device)  # (B, ...)
            x = x + extract(sigma, idx, shape) * z  # (B, ...)
    return x, frames


def dpm_solver_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    y: torch.Tensor | None,
    steps: int,
    generator: torch.Generator,
    record: Collection[int] = (),
    spacing: Spacing = "logsnr",
    lower_order_final: bool | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, second order, data prediction.

    `steps` model evaluations on the `steps` + 1 timesteps t_M > ... > t_0 = 0 of `sampling_timesteps`
    (the solver integrates over intervals, so it needs one point more than it evaluates); it returns x at
    t_0 = 0 (alpha_bar_0 = 1 - beta_1: a residual noise of sigma_0 ~ 0.01, as DDIM's last state).
    With alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), lambda_t = log(alpha_t / sigma_t), the step from s to
    t (h = lambda_t - lambda_s) is the exponential-integrator update (DPM-Solver++ eq. 9 / Alg. 2)
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D,
    with D = x0_s on the first step (DPM-Solver++(1), which is DDIM) and afterwards
    D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev, r = h_prev / h (Alg. 2's multistep correction).

    `lower_order_final` (default: on for time spacing only) makes the last step first order, as diffusers'
    lower_order_final. On time-uniform steps the last interval spans a large log-SNR range after a small one
    (r << 1), and the second-order extrapolation overshoots (+26 % std at 25 steps, linear schedule, Gaussian
    test data); on log-SNR spacing r = 1 and the second-order last step is the more accurate one.
    x0 is clipped when the diffusion clips (data prediction makes that sound, DPM-Solver++ sec. 4); guidance is
    the caller's `model_fn` (see `guided`). Returns (x_0, {t: x_t}) for t in `record`.
    """
    timesteps = sampling_timesteps(diffusion, min(steps + 1, diffusion.num_timesteps), spacing)  # (M+1,)
    if timesteps.numel() < 2:
        raise ValueError("dpm_solver needs a diffusion of at least 2 timesteps")
    kept = timesteps.tolist()
    _check_record(record, kept[1:])
    if lower_order_final is None:
        lower_order_final = spacing == "time"
    device = diffusion.betas.device
    _check_generator(generator, device)
    ab = torch.cumprod(1.0 - diffusion.betas64, 0)[timesteps]  # (M+1,) float64 alpha_bar at the kept steps
    alpha, sigma, lam = ab.sqrt().tolist(), (1.0 - ab).sqrt().tolist(), half_log_snr(ab).tolist()

    x = torch.randn(shape, generator=generator, device=device)  # (B, ...) x_T ~ N(0, I)
    frames: dict[int, torch.Tensor] = {}
    prev_x0, h_prev = None, 0.0
    for s in reversed(range(1, len(kept))):
        n = s - 1  # step from kept[s] down to kept[n]
        if kept[s] in record:
            frames[kept[s]] = x
        t = torch.full((shape[0],), kept[s], dtype=torch.int64, device=device)  # (B,) original timestep
        x0, _ = diffusion.pred_x0_eps(model_fn(x, t, y), x, t)  # (B, ...) the data prediction x_theta(x_s, s)
        h = lam[n] - lam[s]  # > 0: log-SNR grows towards the data
        if prev_x0 is None or (lower_order_final and n == 0):
            d = x0  # first order: DPM-Solver++(1), eq. 9 with D = x0_s
        else:
            r = h_prev / h  # Alg. 2: r_i = h_{i-1} / h_i
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * prev_x0  # (B, ...) Alg. 2's D_i
        # Alg. 2: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D
        x = (sigma[n] / sigma[s]) * x - (alpha[n] * math.expm1(-h)) * d  # (B, ...)
        prev_x0, h_prev = x0, h
    return x, frames


def visited_timesteps(diffusion: GaussianDiffusion, sampler: SamplerName, steps: int, spacing: Spacing) -> list[int]:
    """The timesteps (increasing) at which `sample` evaluates the model: the ones `record` may name."""
    if sampler == "dpm_solver":
        return sampling_timesteps(diffusion, min(steps + 1, diffusion.num_timesteps), spacing).tolist()[1:]
    return sampling_timesteps(diffusion, steps, spacing).tolist()


def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    y: torch.Tensor | None,
    sampler: SamplerName,
    steps: int,
    eta: float,
    generator: torch.Generator,
    record: Collection[int] = (),
    spacing: Spacing = "time",
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run the named sampler: "ddpm" (ancestral; over `steps` respaced steps when steps < T, eta unused),
    "ddim" (eq. 12 with `eta`) or "dpm_solver" (DPM-Solver++(2M), eta unused), on `steps` timesteps spaced
    by `spacing`. The sampler is always named, never inferred from steps or eta.

    `record` must be a subset of `visited_timesteps(diffusion, sampler, steps, spacing)`.
    """
    if sampler == "ddpm":
        return ddpm_sample(diffusion, model_fn, shape, y, generator, record=record, steps=steps, spacing=spacing)
    if sampler == "ddim":
        return ddim_sample(diffusion, model_fn, shape, y, steps, eta, generator, record=record, spacing=spacing)
    if sampler == "dpm_solver":
        return dpm_solver_sample(diffusion, model_fn, shape, y, steps, generator, record=record, spacing=spacing)
    raise ValueError(f"unknown sampler {sampler!r}")  # unreachable from a validated config (a Literal)

"""Samplers: DDPM ancestral sampling, DDIM, and classifier-free guidance.

Every sampler takes `model_fn(x_t, t, y) -> output` in the diffusion's prediction space (eps, x0 or v)
and is called with ORIGINAL timestep indices t in [0, T), int64 (B,), even when sampling over a
respaced subset of timesteps. Noise comes only from the passed `torch.Generator` (which must live on
the diffusion's device), so a seed fixes the samples. The loops read no values back to the host;
wrapping them in `torch.inference_mode()` is the caller's choice.

Respacing (DDIM sec. 4.2, iDDPM sec. 4): for a kept increasing subset tau_0 < ... < tau_{S-1} of the T
timesteps, the alpha_bar at the kept steps define a shorter process with betas
1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}}; both samplers run on that process.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from ddpm.config import SamplerName
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


def _process(diffusion: GaussianDiffusion, steps: int) -> tuple[GaussianDiffusion, list[int]]:
    """The (possibly respaced) process to sample from and the original timestep of each of its indices."""
    timesteps = respaced_timesteps(diffusion.num_timesteps, steps)  # (S,)
    process = diffusion if steps == diffusion.num_timesteps else diffusion.respaced(timesteps)
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
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Ancestral sampling (DDPM Alg. 2) over all T steps, or over `steps` respaced steps as in iDDPM.

    Returns (x0, {t: x_t}) where the dict holds the sampler state x_t entering step t, for t in `record`.
    """
    process, kept = _process(diffusion, diffusion.num_timesteps if steps is None else steps)
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
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """DDIM (Song et al. 2021, eq. 12) on `steps` respaced timesteps; eta = 0 deterministic, eta = 1 ~ DDPM.

    Returns (x0, {t: x_t}) like `ddpm_sample`.
    """
    if not 0 <= eta <= 1:  # above 1, 1 - ab_prev - sigma^2 (the squared weight of eps below) can go negative
        raise ValueError(f"DDIM eta must lie in [0, 1], got {eta}")
    process, kept = _process(diffusion, steps)
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
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run the named sampler: "ddpm" (ancestral; over `steps` respaced steps when steps < T, eta unused)
    or "ddim" (eq. 12 with `eta`). The sampler is always named, never inferred from steps or eta.

    `record` must be a subset of `respaced_timesteps(diffusion.num_timesteps, steps)`.
    """
    if sampler == "ddpm":
        return ddpm_sample(diffusion, model_fn, shape, y, generator, record=record, steps=steps)
    if sampler == "ddim":
        return ddim_sample(diffusion, model_fn, shape, y, steps, eta, generator, record=record)
    raise ValueError(f"unknown sampler {sampler!r}")  # unreachable from a validated config (a Literal)

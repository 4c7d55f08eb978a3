"""Samplers: DDPM ancestral sampling, DDIM, DPM-Solver++(2M), classifier-free guidance and its interval.

The k-diffusion layout: every sampler has one signature,
    sampler(diffusion, model_fn, x, timesteps, y, callback=None, generator=None, **its_own_options) -> x_0,
with x = x_T drawn by the caller and `timesteps` (int64, decreasing, the ORIGINAL indices in [0, T)) computed
outside by `evaluation_timesteps`: the model is evaluated exactly there, once each, so that list is also what
a picture of the denoising may record and what the network evaluations count. `callback(t, x_t)` sees the
state entering each step. `model_fn(x_t, t, y) -> output` is in the diffusion's prediction space (eps, x0 or
v), with t an int64 (B,) tensor; a sequence of model functions, one per timestep, lets guidance apply on some
steps only (`guidance_flags`). Noise comes only from the passed `torch.Generator` (on the diffusion's
device), so a seed fixes the samples. The loops read no values back to the host; wrapping them in
`torch.inference_mode()` is the caller's choice.

Respacing (DDIM sec. 4.2, iDDPM sec. 4): for a kept increasing subset tau_0 < ... < tau_{S-1} of the T
timesteps, the alpha_bar at the kept steps define a shorter process with betas
1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}}; DDPM and DDIM run on that process. The subset is
uniform in t (`spacing="time"`) or in log-SNR (`spacing="logsnr"`, the DPM-Solver paper's choice for
pixel-space models at low resolution), see `sampling_timesteps`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from ddpm.config import FinalStep, SamplerName, Spacing
from ddpm.core.diffusion import GaussianDiffusion, ModelFn, extract

Callback = Callable[[int, torch.Tensor], None]  # (original timestep t, x_t entering the step at t)
ModelFns = ModelFn | Sequence[ModelFn]  # one model function, or one per evaluated timestep


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


def _check_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """The noise must be drawn on the diffusion's device from the caller's generator."""
    if generator is None:
        raise ValueError("this sampler draws noise: pass a torch.Generator (a seed fixes the samples)")
    if generator.device.type != device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the diffusion is on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )
    return generator


def evaluation_timesteps(
    diffusion: GaussianDiffusion, sampler: SamplerName, steps: int, spacing: Spacing
) -> torch.Tensor:
    """The original timesteps at which `sampler` evaluates the model in `steps` steps, in the order it visits
    them (decreasing, int64 (S,), CPU): the one place the samplers' noise levels are chosen.

    DDPM and DDIM evaluate at every point of `sampling_timesteps(steps)` (which holds T-1 and 0) and end on
    the clean x_0. DPM-Solver integrates over intervals: it takes `steps` + 1 points t_M > ... > t_0 = 0 and
    evaluates at t_M ... t_1 only (at most T - 1 of them), as diffusers' DPMSolverMultistepScheduler does.
    """
    if sampler == "dpm_solver":
        grid = sampling_timesteps(diffusion, min(steps + 1, diffusion.num_timesteps), spacing)  # (M+1,)
        if grid.numel() < 2:
            raise ValueError("dpm_solver needs a diffusion of at least 2 timesteps")
        return grid[1:].flip(0)  # (M,) t_M > ... > t_1
    if sampler in ("ddpm", "ddim"):
        return sampling_timesteps(diffusion, steps, spacing).flip(0)  # (S,)
    raise ValueError(f"unknown sampler {sampler!r}")  # unreachable from a validated config (a Literal)


def edm_sigma(diffusion: GaussianDiffusion, timesteps: torch.Tensor) -> torch.Tensor:
    """The noise level of each timestep in EDM's units, sigma_t = sqrt((1 - ab_t) / ab_t) (the noise-to-signal
    ratio of x_t / sqrt(ab_t); Karras et al. 2022), float64, same shape."""
    ab = torch.cumprod(1.0 - diffusion.betas64.cpu(), 0)[timesteps.cpu()]
    return ((1.0 - ab) / ab).sqrt()


def guidance_flags(
    diffusion: GaussianDiffusion, timesteps: torch.Tensor, interval: tuple[float, float] | None
) -> list[bool]:
    """For each timestep, whether guidance applies there: everywhere without an interval, else where the EDM
    noise level lies in (lo, hi] (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval": guidance
    harms at high noise and is unnecessary at low noise; their ImageNet-512 interval is (0.28, 5.42])."""
    if interval is None:
        return [True] * timesteps.numel()
    lo, hi = interval
    return [lo < s <= hi for s in edm_sigma(diffusion, timesteps).tolist()]


def _model_at(model_fn: ModelFns, i: int) -> ModelFn:
    """The model function of the sampler's i-th evaluation."""
    return model_fn if callable(model_fn) else model_fn[i]


def _t(value: int, like: torch.Tensor) -> torch.Tensor:
    """The original timestep as the network's int64 (B,) input, on x's device."""
    return torch.full((like.shape[0],), value, dtype=torch.int64, device=like.device)  # (B,)


def ddpm_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFns,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    y: torch.Tensor | None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestral sampling (DDPM Alg. 2) on the process respaced to `timesteps` (all T of them: DDPM itself;
    fewer: iDDPM sec. 4). Returns x_0, the mean of the last step."""
    generator = _check_generator(generator, x.device)
    kept = timesteps.flip(0)  # (S,) increasing, index i of the respaced process
    process = diffusion if kept.numel() == diffusion.num_timesteps else diffusion.respaced(kept)
    for n, t in enumerate(timesteps.tolist()):
        i = len(timesteps) - 1 - n  # index in the respaced process
        if callback is not None:
            callback(t, x)
        idx = _t(i, x)  # (B,)
        # DDPM eq. 11 via the predicted x0 (eq. 7): the mean of p(x_{t-1} | x_t)
        p = process.p_mean_variance(_model_at(model_fn, n)(x, _t(t, x), y), x, idx)
        if i > 0:  # Alg. 2 line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I)
            z = torch.randn(x.shape, generator=generator, device=x.device)  # (B, ...)
            x = p.mean + (0.5 * p.log_variance).exp() * z  # (B, ...)
        else:  # Alg. 2: z = 0 at the last step, return the mean
            x = p.mean
    return x


def ddim_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFns,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    y: torch.Tensor | None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) on `timesteps`; eta = 0 deterministic (no generator needed), eta = 1
    the DDPM posterior variance. Returns x_0, the last step's prediction of x0."""
    if not 0 <= eta <= 1:  # above 1, 1 - ab_prev - sigma^2 (the squared weight of eps below) can go negative
        raise ValueError(f"DDIM eta must lie in [0, 1], got {eta}")
    if eta > 0:
        generator = _check_generator(generator, x.device)
    kept = timesteps.flip(0)  # (S,) increasing
    process = diffusion if kept.numel() == diffusion.num_timesteps else diffusion.respaced(kept)
    # per-step coefficients in float64 from the respaced process, stored float32 on the device
    ac = torch.cumprod(1.0 - process.betas64, 0)  # (S,) alpha_bar of the kept steps
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])  # (S,) alpha_bar_prev, 1 before the first kept step
    # eq. 16: sigma = eta sqrt((1 - ab_prev)/(1 - ab)) sqrt(1 - ab/ab_prev)
    sigma64 = eta * ((1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev)).sqrt()  # (S,)
    c_x0 = ac_prev.sqrt().to(x.device, torch.float32)  # (S,)
    c_eps = (1.0 - ac_prev - sigma64**2).clamp(min=0.0).sqrt().to(x.device, torch.float32)  # (S,)
    sigma = sigma64.to(x.device, torch.float32)  # (S,)
    shape = x.shape
    for n, t in enumerate(timesteps.tolist()):
        i = len(timesteps) - 1 - n  # index in the respaced process
        if callback is not None:
            callback(t, x)
        idx = _t(i, x)  # (B,)
        # eq. 12's "predicted x0" (eq. 9), clipped if configured, and the eps consistent with it
        x0, eps = process.pred_x0_eps(_model_at(model_fn, n)(x, _t(t, x), y), x, idx)  # (B, ...) each
        # eq. 12: sqrt(ab_prev) x0 + "direction pointing to x_t" sqrt(1 - ab_prev - sigma^2) eps + sigma z
        x = extract(c_x0, idx, shape) * x0 + extract(c_eps, idx, shape) * eps  # (B, ...)
        if i > 0 and eta > 0:  # sigma = 0 at the last step (ab_prev = 1)
            z = torch.randn(shape, generator=generator, device=x.device)  # (B, ...)
            x = x + extract(sigma, idx, shape) * z  # (B, ...)
    return x


def dpm_solver_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFns,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    y: torch.Tensor | None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    final_step: FinalStep = "clean",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, second order, data prediction.
    Deterministic: `generator` is unused.

    With alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), lambda_t = log(alpha_t / sigma_t), the step from s to
    t (h = lambda_t - lambda_s) is the exponential-integrator update (DPM-Solver++ eq. 9 / Alg. 2)
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D,
    with D = x0_s on the first step (DPM-Solver++(1), which is DDIM) and afterwards
    D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev, r = h_prev / h (Alg. 2's multistep correction).
    The model is evaluated at `timesteps` t_M > ... > t_1 (see `evaluation_timesteps`); the last step ends
    - `final_step="clean"`: at sigma = 0 (lambda = inf), where the update is x = D; first order there, so the
      result is the model's clean prediction x0(t_1) (diffusers' final_sigmas_type="zero", its default);
    - `final_step="noisy"`: at t_0 = 0, returning x_0 with its residual noise of std sqrt(1 - ab_0) (0.010 on
      the linear schedule, 0.0064 on cosine), as DDPM's x_0 is defined.
    `lower_order_final` makes a noisy last step first order, as diffusers' lower_order_final: on time-uniform
    steps the last interval spans a large log-SNR range after a small one (r << 1) and the second-order
    extrapolation overshoots (+26 % std at 25 steps, linear schedule, Gaussian test data); on log-SNR spacing
    r = 1 and the second-order last step is the more accurate one. x0 is clipped when the diffusion clips
    (data prediction makes that sound, DPM-Solver++ sec. 4).
    """
    if final_step not in ("clean", "noisy"):
        raise ValueError(f"final_step must be 'clean' or 'noisy', got {final_step!r}")
    evaluated = timesteps.tolist()
    if final_step == "noisy" and evaluated[-1] == 0:
        raise ValueError("a noisy DPM-Solver last step integrates to t = 0, so it cannot evaluate at t = 0")
    # the points t_M > ... > t_1 > t_0 = 0 (a clean last step goes past t_0 to sigma = 0)
    ab = torch.cumprod(1.0 - diffusion.betas64, 0)[torch.tensor([*evaluated, 0])]  # (M+1,) float64
    alpha, sigma, lam = ab.sqrt().tolist(), (1.0 - ab).sqrt().tolist(), half_log_snr(ab).tolist()
    prev_x0, h_prev = None, 0.0
    for s, t in enumerate(evaluated):
        n = s + 1  # the step goes from evaluated[s] to the next point: index n of the lists above
        if callback is not None:
            callback(t, x)
        # the data prediction x_theta(x_s, s)
        x0, _ = diffusion.pred_x0_eps(_model_at(model_fn, s)(x, _t(t, x), y), x, _t(t, x))  # (B, ...)
        last = n == len(evaluated)
        if last and final_step == "clean":
            # eq. 9 with sigma_t = 0, alpha_t = 1, e^{-h} = 0: x = D, with D = x0_s (r = h_prev / inf = 0
            # leaves no second-order term), the clean prediction
            return x0
        h = lam[n] - lam[s]  # > 0: log-SNR grows towards the data
        if prev_x0 is None or (lower_order_final and last):
            d = x0  # first order: DPM-Solver++(1), eq. 9 with D = x0_s
        else:
            r = h_prev / h  # Alg. 2: r_i = h_{i-1} / h_i
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * prev_x0  # (B, ...) Alg. 2's D_i
        # Alg. 2: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D
        x = (sigma[n] / sigma[s]) * x - (alpha[n] * math.expm1(-h)) * d  # (B, ...)
        prev_x0, h_prev = x0, h
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm_sample, "ddim": ddim_sample, "dpm_solver": dpm_solver_sample,
}


def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFns,
    shape: tuple[int, ...],
    y: torch.Tensor | None,
    sampler: SamplerName,
    timesteps: torch.Tensor,
    generator: torch.Generator,
    callback: Callback | None = None,
    **options,
) -> torch.Tensor:
    """Draw x_T ~ N(0, I) from `generator` and run the named sampler from it over `timesteps` (from
    `evaluation_timesteps`), with that sampler's own `options` only (ddim: eta; dpm_solver: final_step,
    lower_order_final). The sampler is always named, never inferred from steps or eta."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}")  # unreachable from a validated config (a Literal)
    device = diffusion.betas.device
    generator = _check_generator(generator, device)
    x = torch.randn(shape, generator=generator, device=device)  # (B, ...) x_T ~ N(0, I), DDPM Alg. 2 line 1
    return SAMPLERS[sampler](diffusion, model_fn, x, timesteps, y, callback, generator, **options)

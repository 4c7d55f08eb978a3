"""Samplers against closed-form answers: class-conditional Gaussian data with its exact optimal predictor.

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
from ddpm.core.samplers import (
    ddim_sample,
    ddpm_sample,
    guided,
    respaced_timesteps,
    sample,
    sampling_timesteps,
    visited_timesteps,
)
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


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # the loops run on tiny tensors: one thread avoids OpenMP spinning on a shared, busy CPU
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _diffusion(schedule: str = "linear", prediction: str = "eps", variance: str = "fixed_large"):
    betas = linear_betas(1000, 1e-4, 0.02) if schedule == "linear" else cosine_betas(1000)
    return GaussianDiffusion(betas, prediction, variance, clip_x0=False)  # type: ignore[arg-type]


def optimal_model(diffusion: GaussianDiffusion, mu: torch.Tensor = MU, sigma: torch.Tensor = SIGMA):
    """The exact minimiser of the training loss for Gaussian classes, in the diffusion's prediction space."""

    def model(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ab = extract(diffusion.alphas_cumprod, t, x_t.shape)  # (B, 1)
        m, s2 = mu[y], sigma[y].unsqueeze(1) ** 2  # (B, D), (B, 1)
        resid = (x_t - ab.sqrt() * m) / (ab * s2 + 1 - ab)  # (B, D)
        eps = (1 - ab).sqrt() * resid  # (B, D)
        x0 = m + ab.sqrt() * s2 * resid  # (B, D)
        return diffusion.target(x0, eps, t)

    return model


def _labels(k: int = 3, n: int = N) -> torch.Tensor:
    return torch.arange(k).repeat_interleave(n)  # (k n,)


def _per_class(x: torch.Tensor, y: torch.Tensor, c: int) -> tuple[torch.Tensor, float]:
    """Per-dimension mean (D,) and the std pooled over dimensions."""
    xc = x[y == c]
    return xc.mean(0), xc.var(0).mean().sqrt().item()


def _assert_matches_data(x: torch.Tensor, y: torch.Tensor, std_rtol: float) -> None:
    for c in range(MU.shape[0]):
        mean, std = _per_class(x, y, c)
        se = SIGMA[c].item() / N**0.5  # standard error of each mean
        torch.testing.assert_close(mean, MU[c], atol=4.5 * se, rtol=0, msg=f"class {c} mean")
        assert std == pytest.approx(SIGMA[c].item(), rel=std_rtol), f"class {c} std"


def _chain_std(diffusion: GaussianDiffusion, sigma: float) -> float:
    """Exact output std of the 1000-step DDPM chain driven by the optimal model (float64 variance recursion).

    Each step is x_{t-1} = A_t x_t + const + s_t z, so Var_{t-1} = A_t^2 Var_t + s_t^2, from Var_T = 1.
    """
    b = diffusion.betas64
    ab = torch.cumprod(1 - b, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    c1, c2 = b * ab_prev.sqrt() / (1 - ab), (1 - ab_prev) * (1 - b).sqrt() / (1 - ab)
    beta_tilde = b * (1 - ab_prev) / (1 - ab)
    noise_var = b.clone() if diffusion.variance == "fixed_large" else beta_tilde.clone()
    noise_var[0] = 0.0  # no noise on the last step
    gain = c1 * ab.sqrt() * sigma**2 / (ab * sigma**2 + 1 - ab) + c2  # (T,) d x_{t-1} / d x_t
    var = 1.0
    for a, s2 in zip(reversed(gain.tolist()), reversed(noise_var.tolist())):
        var = a * a * var + s2
    return var**0.5


# ---- closed-form sampler checks --------------------------------------------------------------------


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_reproduces_gaussian_classes(schedule: str, variance: str) -> None:
    d = _diffusion(schedule, "eps", variance)
    y = _labels()
    x, _ = ddpm_sample(d, optimal_model(d), (len(y), MU.shape[1]), y, torch.Generator().manual_seed(0))
    _assert_matches_data(x, y, std_rtol=0.05)
    for c in range(3):  # and, tighter, the exact std of this discrete chain (fixed_small is ~3% low at sigma 0.1)
        _, std = _per_class(x, y, c)
        assert std == pytest.approx(_chain_std(d, SIGMA[c].item()), rel=0.02), f"class {c}"


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_all_steps_reproduces_gaussian_classes(schedule: str) -> None:
    d = _diffusion(schedule)
    y = _labels()
    x, _ = ddim_sample(d, optimal_model(d), (len(y), MU.shape[1]), y, 1000, 0.0, torch.Generator().manual_seed(0))
    _assert_matches_data(x, y, std_rtol=0.03)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_discretisation_error_shrinks_with_steps(schedule: str) -> None:
    d = _diffusion(schedule)
    y = _labels()
    shape = (len(y), MU.shape[1])
    errors = []
    for steps in (20, 100, 1000):
        x, _ = ddim_sample(d, optimal_model(d), shape, y, steps, 0.0, torch.Generator().manual_seed(0))
        means = [_per_class(x, y, c)[0] for c in range(3)]
        # the mean is right even with few steps (DDIM maps the x_T mean 0 to the data mean)
        torch.testing.assert_close(torch.stack(means), MU, atol=0.015, rtol=0)
        errors.append(abs(_per_class(x, y, 0)[1] / SIGMA[0].item() - 1))
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 0.1 and errors[2] < 0.02  # a real error at 20 steps, almost gone at 1000


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_eps_x0_v_predictions_give_the_same_samples(sampler: str) -> None:
    y = _labels(n=100)
    runs = []
    for prediction in ("eps", "x0", "v"):
        d = _diffusion("cosine", prediction)
        x, _ = sample(d, optimal_model(d), (len(y), 8), y, sampler, 50, 0.5, torch.Generator().manual_seed(7))
        runs.append(x)
    torch.testing.assert_close(runs[1], runs[0], atol=2e-3, rtol=0)
    torch.testing.assert_close(runs[2], runs[0], atol=2e-3, rtol=0)


@pytest.mark.parametrize("steps", [1000, 50])
def test_ddim_eta_one_equals_ddpm_with_fixed_small(steps: int) -> None:
    # eq. 16 with eta = 1 makes sigma_t^2 = beta_tilde_t, and the DDIM mean then equals the posterior mean
    d = _diffusion("linear", "eps", "fixed_small")
    y = _labels(n=50)
    shape = (len(y), 8)
    a, _ = ddim_sample(d, optimal_model(d), shape, y, steps, 1.0, torch.Generator().manual_seed(3))
    b, _ = ddpm_sample(d, optimal_model(d), shape, y, torch.Generator().manual_seed(3), steps=steps)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# ---- classifier-free guidance ----------------------------------------------------------------------


@pytest.mark.parametrize("w", [0.5, 2.0])
def test_guidance_moves_mean_away_from_null_by_the_formula(w: float) -> None:
    # equal stds: (1 + w) eps(mu_y) - w eps(mu_null) is exactly eps for mean mu_y + w (mu_y - mu_null),
    # so the guided sampler must produce N(mu_y + w (mu_y - mu_null), sigma^2)
    mu = torch.cat([MU[:2], torch.zeros(1, 8) + 0.1])  # (3, D); label 2 is the null "class"
    sigma = torch.full((3,), 0.2)
    d = _diffusion("cosine")
    y = _labels(k=2)
    fn = guided(optimal_model(d, mu, sigma), w, null_label=2)
    x, _ = ddim_sample(d, fn, (len(y), 8), y, 1000, 0.0, torch.Generator().manual_seed(0))
    for c in range(2):
        mean, std = _per_class(x, y, c)
        torch.testing.assert_close(mean, mu[c] + w * (mu[c] - mu[2]), atol=4.5 * 0.2 / N**0.5, rtol=0)
        assert std == pytest.approx(0.2, rel=0.03)


def test_guidance_zero_is_exactly_the_conditional_sampler() -> None:
    d = _diffusion()
    model = optimal_model(d)
    assert guided(model, 0.0, null_label=2) is model
    y = _labels(n=20)
    a, _ = ddim_sample(d, guided(model, 0.0, 2), (60, 8), y, 30, 0.0, torch.Generator().manual_seed(1))
    b, _ = ddim_sample(d, model, (60, 8), y, 30, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_guided_is_one_forward_pass_on_2b() -> None:
    calls = []

    def fake(x, t, y):
        calls.append((x.clone(), t.clone(), y.clone()))
        return x * (y.float() + 1).unsqueeze(1)  # depends on the label, so the halves differ

    fn = guided(fake, 3.0, null_label=9)
    x, t, y = torch.randn(4, 2), torch.tensor([5, 5, 7, 7]), torch.tensor([0, 1, 2, 3])
    out = fn(x, t, y)
    assert len(calls) == 1
    xx, tt, yy = calls[0]
    assert xx.shape == (8, 2)
    assert torch.equal(xx, torch.cat([x, x])) and torch.equal(tt, torch.cat([t, t]))
    assert yy.tolist() == [0, 1, 2, 3, 9, 9, 9, 9]
    expected = 4.0 * x * (y.float() + 1).unsqueeze(1) - 3.0 * x * 10.0
    torch.testing.assert_close(out, expected)


def test_guidance_needs_a_conditional_model() -> None:
    model = optimal_model(_diffusion())
    with pytest.raises(ValueError, match="unconditional"):
        guided(model, 1.0, null_label=None)
    with pytest.raises(ValueError, match="guidance"):
        guided(model, -1.0, null_label=3)
    assert guided(model, 0.0, null_label=None) is model  # an unconditional model without guidance is fine


# ---- mechanics: timesteps, recording, reproducibility, dispatch --------------------------------------


def test_respaced_timesteps() -> None:
    ts = respaced_timesteps(1000, 50)
    assert ts.dtype == torch.int64 and ts.shape == (50,)
    assert ts[0].item() == 0 and ts[-1].item() == 999
    assert bool((ts[1:] > ts[:-1]).all())
    assert torch.equal(respaced_timesteps(1000, 1000), torch.arange(1000))
    assert respaced_timesteps(1000, 1).tolist() == [999]
    assert torch.unique(respaced_timesteps(10, 9)).numel() == 9
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=f"between 1 and the 1000 diffusion timesteps, got {bad}"):
            respaced_timesteps(1000, bad)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_network_sees_original_timesteps(sampler: str) -> None:
    d = _diffusion()
    seen = []

    def model(x, t, y):
        seen.append(t[0].item())
        assert bool((t == t[0]).all()) and t.dtype == torch.int64
        return torch.zeros_like(x)

    sample(d, model, (2, 3), None, sampler, 10, 0.0, torch.Generator().manual_seed(0))
    assert seen == respaced_timesteps(1000, 10).flip(0).tolist()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_record_returns_the_requested_steps(sampler: str) -> None:
    d = _diffusion()
    y = _labels(n=4)
    shape = (12, 8)
    kept = respaced_timesteps(1000, 25).tolist()
    record = {kept[-1], kept[12], kept[0]}
    x, frames = sample(d, optimal_model(d), shape, y, sampler, 25, 1.0, torch.Generator().manual_seed(5), record)
    assert set(frames) == record
    # the first frame is x_T itself, drawn first from the generator
    assert torch.equal(frames[999], torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(frames[kept[12]], frames[999]) and not torch.equal(frames[0], x)
    with pytest.raises(ValueError, match="record"):
        sample(d, optimal_model(d), shape, y, sampler, 25, 1.0, torch.Generator().manual_seed(5), {1})


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_same_seed_same_samples(sampler: str, eta: float) -> None:
    d = _diffusion()
    y = _labels(n=10)

    def run(seed: int) -> torch.Tensor:
        return sample(d, optimal_model(d), (30, 8), y, sampler, 40, eta, torch.Generator().manual_seed(seed))[0]

    assert torch.equal(run(11), run(11))
    assert not torch.allclose(run(11), run(12))


def test_sample_dispatch_is_explicit() -> None:
    d = _diffusion()
    y = _labels(n=5)
    model = optimal_model(d)
    via = sample(d, model, (15, 8), y, "ddim", 20, 0.0, torch.Generator().manual_seed(2))[0]
    direct = ddim_sample(d, model, (15, 8), y, 20, 0.0, torch.Generator().manual_seed(2))[0]
    assert torch.equal(via, direct)
    via = sample(d, model, (15, 8), y, "ddpm", 20, 0.0, torch.Generator().manual_seed(2))[0]
    direct = ddpm_sample(d, model, (15, 8), y, torch.Generator().manual_seed(2), steps=20)[0]
    assert torch.equal(via, direct)
    with pytest.raises(ValueError, match="sampler"):
        sample(d, model, (15, 8), y, "euler", 20, 0.0, torch.Generator())  # type: ignore[arg-type]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_single_step_returns_the_predicted_x0(sampler: str) -> None:
    d = _diffusion("linear", "x0")
    target = torch.tensor([[0.3, -0.2, 0.7]])
    x, _ = sample(d, lambda x, t, y: target.expand_as(x), (4, 3), None, sampler, 1, 0.0, torch.Generator())
    torch.testing.assert_close(x, target.expand(4, 3))


def test_guidance_combination_is_computed_in_fp32() -> None:
    """cond = 1 + 2^-7 and uncond = 1 are exact in bf16; at w = 4 the answer 1 + 5 * 2^-7 = 1.0390625 is not
    (bf16 spacing near 5 is 2^-5, so a bf16 combination gives 5.03125 - 4 = 1.03125)."""
    def bf16_model(x, t, y):
        out = torch.where(y == 9, 1.0, 1.0 + 2.0**-7)  # (2B,) the null label gets 1, the class 1 + 2^-7
        return out[:, None].expand_as(x).to(torch.bfloat16)  # (2B, D) like a network under bf16 autocast

    fn = guided(bf16_model, 4.0, null_label=9)
    out = fn(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.full((3, 2), 1.0390625))
    cond, uncond = torch.tensor(1.0 + 2.0**-7, dtype=torch.bfloat16), torch.tensor(1.0, dtype=torch.bfloat16)
    assert float(5.0 * cond - 4.0 * uncond) == 1.03125  # what the old bf16 combination returned


@pytest.mark.parametrize("eta", [-0.1, 1.01, 2.0])
def test_ddim_eta_outside_0_1_is_refused(eta: float) -> None:
    d = _diffusion()
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        ddim_sample(d, optimal_model(d), (3, 8), _labels(n=1), 10, eta, torch.Generator())
# ---- DPM-Solver++(2M) and log-SNR spacing ------------------------------------------------------------


def _std_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """The worst relative error of the per-class sample std against the true SIGMA."""
    return max(abs(_per_class(x, y, c)[1] / SIGMA[c].item() - 1) for c in range(3))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_beats_ddim_at_few_steps(schedule: str) -> None:
    d = _diffusion(schedule)
    y = _labels()
    shape = (len(y), MU.shape[1])
    for steps in (10, 25):
        dpm = _std_error(sample(d, optimal_model(d), shape, y, "dpm_solver", steps, 0.0,
                                torch.Generator().manual_seed(0), spacing="logsnr")[0], y)
        for spacing in ("time", "logsnr"):
            ddim = _std_error(ddim_sample(d, optimal_model(d), shape, y, steps, 0.0, torch.Generator().manual_seed(0),
                                          spacing=spacing)[0], y)
            assert dpm < 0.3 * ddim, (steps, spacing, dpm, ddim)  # measured: 0.03 vs 0.24-0.66 at 10 steps
        if steps == 10:
            assert dpm < 0.035, dpm  # the calibration: within ~3 % of the true std at 10 steps


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_converges_to_the_ode_solution(schedule: str) -> None:
    # every deterministic solver integrates the same probability-flow ODE from the same x_T: with many steps
    # DPM-Solver++ and DDIM land on the same points, and the std is right
    d = _diffusion(schedule)
    y = _labels(n=300)
    shape = (len(y), MU.shape[1])
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731  the same x_T for every run
    limit = sample(d, optimal_model(d), shape, y, "dpm_solver", 999, 0.0, gen(), spacing="time")[0]
    ddim = ddim_sample(d, optimal_model(d), shape, y, 1000, 0.0, gen())[0]
    assert (ddim - limit).abs().max().item() < 0.01  # two solvers, one ODE solution
    gaps = []
    for steps in (25, 50, 250):
        x = sample(d, optimal_model(d), shape, y, "dpm_solver", steps, 0.0, gen(), spacing="logsnr")[0]
        gaps.append((x - limit).abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3, gaps  # measured 0.01-0.02, 0.003-0.006, 3e-4-7e-4
    assert _std_error(limit, y) < 0.03  # 300 samples per class: ~1.5 % sampling noise on the std


def test_dpm_solver_first_step_is_ddim_and_predictions_agree() -> None:
    d = _diffusion("cosine")
    y = _labels(n=50)
    # one step = DPM-Solver++(1) from T-1 to 0 = DDIM's update to t=0 with the x0 predicted at T-1
    one = sample(d, optimal_model(d), (150, 8), y, "dpm_solver", 1, 0.0, torch.Generator().manual_seed(1))[0]
    ddim2 = respaced_timesteps(1000, 2)
    assert ddim2.tolist() == [0, 999]
    x_T = torch.randn((150, 8), generator=torch.Generator().manual_seed(1))
    t = torch.full((150,), 999)
    x0, eps = d.pred_x0_eps(optimal_model(d)(x_T, t, y), x_T, t)
    expected = d.alphas_cumprod[0].sqrt() * x0 + (1 - d.alphas_cumprod[0]).sqrt() * eps  # DDIM eq. 12, eta = 0
    torch.testing.assert_close(one, expected, atol=1e-5, rtol=0)
    runs = []
    for prediction in ("eps", "x0", "v"):
        dp = _diffusion("cosine", prediction)
        runs.append(sample(dp, optimal_model(dp), (150, 8), y, "dpm_solver", 20, 0.0,
                           torch.Generator().manual_seed(7), spacing="logsnr")[0])
    torch.testing.assert_close(runs[1], runs[0], atol=2e-3, rtol=0)
    torch.testing.assert_close(runs[2], runs[0], atol=2e-3, rtol=0)


def test_dpm_solver_with_guidance_matches_the_shifted_gaussian() -> None:
    mu = torch.cat([MU[:2], torch.zeros(1, 8) + 0.1])  # label 2 is the null "class"
    sigma = torch.full((3,), 0.2)
    d, w = _diffusion("linear", "v"), 2.0
    y = _labels(k=2)
    fn = guided(optimal_model(d, mu, sigma), w, null_label=2)
    x, _ = sample(d, fn, (len(y), 8), y, "dpm_solver", 25, 0.0, torch.Generator().manual_seed(0), spacing="logsnr")
    for c in range(2):
        mean, std = _per_class(x, y, c)
        torch.testing.assert_close(mean, mu[c] + w * (mu[c] - mu[2]), atol=0.02, rtol=0)
        assert std == pytest.approx(0.2, rel=0.03)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_logsnr_spacing_is_uniform_in_log_snr_and_drops_duplicates(schedule: str) -> None:
    d = _diffusion(schedule)
    ab = torch.cumprod(1 - d.betas64, 0)
    lam = 0.5 * torch.log(ab / (1 - ab))  # (T,) by hand
    if schedule == "linear":
        ts = sampling_timesteps(d, 10, "logsnr")
        gaps = lam[ts].flip(0).diff()  # (9,) log-SNR steps from noise to data
    else:  # the clipped last beta (0.999) makes lambda jump 3.5 between t = 998 and 999: 10 targets hit 9 steps
        with pytest.warns(UserWarning, match="10 sampling steps fall on 9 distinct timesteps"):
            ts = sampling_timesteps(d, 10, "logsnr")
        gaps = lam[ts].flip(0).diff()[1:]  # the uniform steps after that jump
    assert ts[0].item() == 0 and ts[-1].item() == 999
    step = (lam[0] - lam[-1]).item() / 9
    torch.testing.assert_close(gaps, torch.full_like(gaps, step), atol=0.08 * step, rtol=0)
    # at many steps several targets land on the same timestep near t = 0, where lambda moves fastest
    with pytest.warns(UserWarning, match=r"500 sampling steps fall on (\d+) distinct timesteps") as rec:
        many = sampling_timesteps(d, 500, "logsnr")
    assert many.numel() < 500 and str(many.numel()) in str(rec[0].message)
    assert bool((many[1:] > many[:-1]).all()) and many[0].item() == 0 and many[-1].item() == 999
    with pytest.raises(ValueError, match="spacing"):
        sampling_timesteps(d, 10, "cubic")  # type: ignore[arg-type]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver"])
def test_every_sampler_visits_the_spacing_it_is_given(sampler: str) -> None:
    d = _diffusion()
    seen = []

    def model(x, t, y):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    sample(d, model, (2, 3), None, sampler, 10, 0.0, torch.Generator().manual_seed(0), spacing="logsnr")
    assert seen == visited_timesteps(d, sampler, 10, "logsnr")[::-1]
    assert len(seen) == 10 and seen != respaced_timesteps(1000, 10).flip(0).tolist()

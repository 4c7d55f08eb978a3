"""DDPM and DDIM against closed-form answers on class-conditional Gaussian data (`gaussian_data`), x0
clipping, and the mechanics every sampler shares: the timesteps, the callback, seeds and dispatch."""

from __future__ import annotations

import pytest
import torch
from gaussian_data import (  # noqa: F401 - one_thread is a fixture
    MU,
    SIGMA,
    assert_matches_data,
    gaussian_diffusion,
    labels,
    one_thread,
    optimal_model,
    per_class,
    run,
)

from ddpm.core.diffusion import GaussianDiffusion
from ddpm.core.samplers import (
    ddim_sample,
    ddpm_sample,
    evaluation_timesteps,
    respaced_timesteps,
    sample,
    sampling_timesteps,
)

SAMPLERS = ["ddpm", "ddim", "dpm_solver"]


pytestmark = pytest.mark.usefixtures("one_thread")


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
    d = gaussian_diffusion(schedule, "eps", variance)
    y = labels()
    x, _ = run(d, optimal_model(d), (len(y), MU.shape[1]), y, "ddpm", 1000, 0)
    assert_matches_data(x, y, std_rtol=0.05)
    for c in range(3):  # and, tighter, the exact std of this discrete chain (fixed_small is ~3% low at sigma 0.1)
        _, std = per_class(x, y, c)
        assert std == pytest.approx(_chain_std(d, SIGMA[c].item()), rel=0.02), f"class {c}"


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_all_steps_reproduces_gaussian_classes(schedule: str) -> None:
    d = gaussian_diffusion(schedule)
    y = labels()
    x, _ = run(d, optimal_model(d), (len(y), MU.shape[1]), y, "ddim", 1000, 0)
    assert_matches_data(x, y, std_rtol=0.03)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_discretisation_error_shrinks_with_steps(schedule: str) -> None:
    d = gaussian_diffusion(schedule)
    y = labels()
    shape = (len(y), MU.shape[1])
    errors = []
    for steps in (20, 100, 1000):
        x, _ = run(d, optimal_model(d), shape, y, "ddim", steps, 0)
        means = [per_class(x, y, c)[0] for c in range(3)]
        # the mean is right even with few steps (DDIM maps the x_T mean 0 to the data mean)
        torch.testing.assert_close(torch.stack(means), MU, atol=0.015, rtol=0)
        errors.append(abs(per_class(x, y, 0)[1] / SIGMA[0].item() - 1))
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 0.1 and errors[2] < 0.02  # a real error at 20 steps, almost gone at 1000


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_eps_x0_v_predictions_give_the_same_samples(sampler: str) -> None:
    y = labels(n=100)
    runs = []
    for prediction in ("eps", "x0", "v"):
        d = gaussian_diffusion("cosine", prediction)
        runs.append(run(d, optimal_model(d), (len(y), 8), y, sampler, 50, 7, eta=0.5)[0])
    torch.testing.assert_close(runs[1], runs[0], atol=2e-3, rtol=0)
    torch.testing.assert_close(runs[2], runs[0], atol=2e-3, rtol=0)


@pytest.mark.parametrize("steps", [1000, 50])
def test_ddim_eta_one_equals_ddpm_with_fixed_small(steps: int) -> None:
    # eq. 16 with eta = 1 makes sigma_t^2 = beta_tilde_t, and the DDIM mean then equals the posterior mean
    d = gaussian_diffusion("linear", "eps", "fixed_small")
    y = labels(n=50)
    a, _ = run(d, optimal_model(d), (len(y), 8), y, "ddim", steps, 3, eta=1.0)
    b, _ = run(d, optimal_model(d), (len(y), 8), y, "ddpm", steps, 3)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# ---- x0 clipping (clip_x0: true, the default) ------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_clipping_is_inactive_on_data_inside_the_range(sampler: str) -> None:
    # means within +-0.3 and stds <= 0.1: the optimal x0 prediction never leaves [-1, 1] (checked), so the
    # clipped sampler is the unclipped one and still reproduces the data
    mu, sigma = MU * 0.5, torch.tensor([0.1, 0.08, 0.05])
    y = labels()
    out = {}
    for clip in (False, True):
        d = gaussian_diffusion("linear", "eps", clip_x0=clip)
        model = optimal_model(d, mu, sigma)
        widest = []

        def watched(x, t, y, model=model, d=d, widest=widest):
            out_ = model(x, t, y)
            widest.append(d.to_x0_eps(out_, x, t)[0].abs().max().item())
            return out_

        out[clip] = run(d, watched, (len(y), 8), y, sampler, 25, 0, spacing="logsnr")[0]
        assert max(widest) < 1.0
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=0)
    for c in range(3):
        torch.testing.assert_close(per_class(out[True], y, c)[0], mu[c], atol=0.01, rtol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_clipping_pulls_data_outside_the_range_to_its_edge(sampler: str) -> None:
    # a point mass at 1.5 in some pixels, 0.3 in others: its optimal x0 prediction is the point itself at
    # every noise level, so with clipping every sampler ends on clip(point) = 1.0 / 0.3, without it on 1.5
    point = torch.tensor([[1.5, 0.3, -1.5, 0.3, 1.5, 0.3, -0.9, 0.3]])  # (1, D)
    y = torch.zeros(500, dtype=torch.int64)
    for clip, expected in ((True, point.clamp(-1, 1)), (False, point)):
        d = gaussian_diffusion("cosine", "v", clip_x0=clip)
        x, _ = run(d, optimal_model(d, point, torch.zeros(1)), (500, 8), y, sampler, 20, 1, eta=0.5)
        torch.testing.assert_close(x, expected.expand(500, 8), atol=1e-3, rtol=0)  # float32 v -> x0: ~1e-4


# ---- mechanics: timesteps, callback, reproducibility, dispatch -------------------------------------


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


def test_evaluation_timesteps_are_the_grid_for_ddpm_ddim_and_its_inner_points_for_dpm_solver() -> None:
    d = gaussian_diffusion()
    for sampler in ("ddpm", "ddim"):
        assert evaluation_timesteps(d, sampler, 10, "time").tolist() == respaced_timesteps(1000, 10).flip(0).tolist()
    # DPM-Solver: 10 intervals of an 11-point grid t_10 > ... > t_0 = 0, evaluated at t_10 ... t_1
    inner = respaced_timesteps(1000, 11)[1:].flip(0)
    assert evaluation_timesteps(d, "dpm_solver", 10, "time").tolist() == inner.tolist()
    assert evaluation_timesteps(d, "dpm_solver", 1000, "time").tolist() == list(range(999, 0, -1))  # at most T-1
    with pytest.raises(ValueError, match="sampler"):
        evaluation_timesteps(d, "euler", 10, "time")  # type: ignore[arg-type]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("spacing", ["time", "logsnr"])
def test_the_network_is_evaluated_exactly_at_the_evaluation_timesteps(sampler: str, spacing: str) -> None:
    d = gaussian_diffusion()
    seen = []

    def model(x, t, y):
        seen.append(t[0].item())
        assert bool((t == t[0]).all()) and t.dtype == torch.int64
        return torch.zeros_like(x)

    run(d, model, (2, 3), None, sampler, 10, 0, spacing=spacing)
    assert seen == evaluation_timesteps(d, sampler, 10, spacing).tolist()
    assert len(seen) == 10 and (seen == evaluation_timesteps(d, sampler, 10, "time").tolist()) == (spacing == "time")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_callback_sees_the_state_entering_each_step(sampler: str) -> None:
    d = gaussian_diffusion()
    y = labels(n=4)
    shape = (12, 8)
    seen: list[tuple[int, torch.Tensor]] = []
    x = sample(d, optimal_model(d), shape, y, sampler, evaluation_timesteps(d, sampler, 25, "time"),
               torch.Generator().manual_seed(5), callback=lambda t, x: seen.append((t, x)))
    assert [t for t, _ in seen] == evaluation_timesteps(d, sampler, 25, "time").tolist()
    # the first state is x_T itself, drawn first from the generator; later ones moved towards the data
    assert torch.equal(seen[0][1], torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(seen[12][1], seen[0][1]) and not torch.equal(seen[-1][1], x)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_same_seed_same_samples(sampler: str, eta: float) -> None:
    d = gaussian_diffusion()
    y = labels(n=10)

    def go(seed: int) -> torch.Tensor:
        return run(d, optimal_model(d), (30, 8), y, sampler, 40, seed, eta=eta)[0]

    assert torch.equal(go(11), go(11))
    assert not torch.allclose(go(11), go(12))


def test_sample_draws_x_T_and_dispatches_by_name_with_that_samplers_options_only() -> None:
    d = gaussian_diffusion()
    y = labels(n=5)
    model = optimal_model(d)
    ts = evaluation_timesteps(d, "ddim", 20, "time")
    via = sample(d, model, (15, 8), y, "ddim", ts, torch.Generator().manual_seed(2), eta=0.3)
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn((15, 8), generator=g)
    assert torch.equal(via, ddim_sample(d, model, x_T, ts, y, generator=g, eta=0.3))
    via = sample(d, model, (15, 8), y, "ddpm", ts, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn((15, 8), generator=g)
    assert torch.equal(via, ddpm_sample(d, model, x_T, ts, y, generator=g))
    with pytest.raises(TypeError, match="eta"):  # no sampler silently ignores another's option
        sample(d, model, (15, 8), y, "ddpm", ts, torch.Generator(), eta=0.5)
    with pytest.raises(ValueError, match="sampler"):
        sample(d, model, (15, 8), y, "euler", ts, torch.Generator())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Generator"):  # DDPM draws noise: no generator, no hidden global RNG
        ddpm_sample(d, model, x_T, ts, y)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_single_step_returns_the_predicted_x0(sampler: str) -> None:
    d = gaussian_diffusion("linear", "x0")
    target = torch.tensor([[0.3, -0.2, 0.7]])
    x, _ = run(d, lambda x, t, y: target.expand_as(x), (4, 3), None, sampler, 1, 0)
    torch.testing.assert_close(x, target.expand(4, 3))


@pytest.mark.parametrize("eta", [-0.1, 1.01, 2.0])
def test_ddim_eta_outside_0_1_is_refused(eta: float) -> None:
    d = gaussian_diffusion()
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        run(d, optimal_model(d), (3, 8), labels(n=1), "ddim", 10, 0, eta=eta)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_logsnr_spacing_is_uniform_in_log_snr_and_drops_duplicates(schedule: str) -> None:
    d = gaussian_diffusion(schedule)
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

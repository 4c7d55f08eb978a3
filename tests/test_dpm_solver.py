"""DPM-Solver++(2M) on the closed-form Gaussian data (`gaussian_data`): accuracy, its last step (clean or
noisy) and agreement with diffusers' DPMSolverMultistepScheduler."""

from __future__ import annotations

import pytest
import torch
from gaussian_data import (  # noqa: F401 - one_thread is a fixture
    MU,
    gaussian_diffusion,
    labels,
    one_thread,
    optimal_model,
    per_class,
    run,
    std_error,
)

from ddpm.core.samplers import dpm_solver_sample, guided, respaced_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_beats_ddim_at_few_steps(schedule: str) -> None:
    d = gaussian_diffusion(schedule)
    y = labels()
    shape = (len(y), MU.shape[1])
    for steps in (10, 25):
        # noisy: the second-order last step to t = 0 (a clean end jumps first order from t_1 to sigma = 0, and
        # the x0 prediction at t_1 is a posterior mean, narrower than the data: 6.4 % low at 10 steps here)
        dpm = std_error(run(d, optimal_model(d), shape, y, "dpm_solver", steps, 0, spacing="logsnr",
                            final_step="noisy")[0], y)
        for spacing in ("time", "logsnr"):
            ddim = std_error(run(d, optimal_model(d), shape, y, "ddim", steps, 0, spacing=spacing)[0], y)
            assert dpm < 0.3 * ddim, (steps, spacing, dpm, ddim)
        if steps == 10:
            assert dpm < 0.035, dpm  # the calibration: within ~3 % of the true std at 10 steps


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_converges_to_the_ode_solution(schedule: str) -> None:
    # every deterministic solver integrates the same probability-flow ODE from the same x_T: with many steps
    # DPM-Solver++ and DDIM land on the same points, and the std is right
    d = gaussian_diffusion(schedule)
    y = labels(n=300)
    shape = (len(y), MU.shape[1])
    limit = run(d, optimal_model(d), shape, y, "dpm_solver", 999, 4, final_step="noisy")[0]
    ddim = run(d, optimal_model(d), shape, y, "ddim", 1000, 4)[0]
    assert (ddim - limit).abs().max().item() < 0.01  # two solvers, one ODE solution
    gaps = []
    for steps in (25, 50, 250):
        x = run(d, optimal_model(d), shape, y, "dpm_solver", steps, 4, spacing="logsnr", final_step="noisy")[0]
        gaps.append((x - limit).abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3, gaps  # measured 0.01-0.02, 0.003-0.006, 3e-4-7e-4
    assert std_error(limit, y) < 0.03  # 300 samples per class: ~1.5 % sampling noise on the std


def test_dpm_solver_first_step_is_ddim_and_predictions_agree() -> None:
    d = gaussian_diffusion("cosine")
    y = labels(n=50)
    # one noisy step = DPM-Solver++(1) from T-1 to 0 = DDIM's update to t=0 with the x0 predicted at T-1
    one = run(d, optimal_model(d), (150, 8), y, "dpm_solver", 1, 1, final_step="noisy")[0]
    assert respaced_timesteps(1000, 2).tolist() == [0, 999]
    x_T = torch.randn((150, 8), generator=torch.Generator().manual_seed(1))
    t = torch.full((150,), 999)
    x0, eps = d.pred_x0_eps(optimal_model(d)(x_T, t, y), x_T, t)
    expected = d.alphas_cumprod[0].sqrt() * x0 + (1 - d.alphas_cumprod[0]).sqrt() * eps  # DDIM eq. 12, eta = 0
    torch.testing.assert_close(one, expected, atol=1e-5, rtol=0)
    # one clean step ends on that x0 prediction itself
    torch.testing.assert_close(run(d, optimal_model(d), (150, 8), y, "dpm_solver", 1, 1)[0], x0, atol=0, rtol=0)
    runs = []
    for prediction in ("eps", "x0", "v"):
        dp = gaussian_diffusion("cosine", prediction)
        runs.append(run(dp, optimal_model(dp), (150, 8), y, "dpm_solver", 20, 7, spacing="logsnr")[0])
    torch.testing.assert_close(runs[1], runs[0], atol=2e-3, rtol=0)
    torch.testing.assert_close(runs[2], runs[0], atol=2e-3, rtol=0)


def test_dpm_solver_with_guidance_matches_the_shifted_gaussian() -> None:
    mu = torch.cat([MU[:2], torch.zeros(1, 8) + 0.1])  # label 2 is the null "class"
    sigma = torch.full((3,), 0.2)
    d, w = gaussian_diffusion("linear", "v"), 2.0
    y = labels(k=2)
    fn = guided(optimal_model(d, mu, sigma), w, null_label=2)
    x, _ = run(d, fn, (len(y), 8), y, "dpm_solver", 25, 0, spacing="logsnr")
    for c in range(2):
        mean, std = per_class(x, y, c)
        torch.testing.assert_close(mean, mu[c] + w * (mu[c] - mu[2]), atol=0.02, rtol=0)
        assert std == pytest.approx(0.2, rel=0.03)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_clean_last_step_has_the_true_std_and_a_noisy_one_the_residual_noise(schedule: str) -> None:
    # class 0 is a point mass (std 0: a pixel every image shares), classes 1, 2 have std 0.3 and 0.2. The noisy
    # end x_0 keeps a residual noise of std sqrt(1 - ab_0) (0.010 linear, 0.0064 cosine): the point mass
    # comes out with exactly that std; the clean end has the true std 0 there, and both are right elsewhere
    sigma = torch.tensor([0.0, 0.3, 0.2])
    d = gaussian_diffusion(schedule)
    y = labels()
    residual = (1 - d.alphas_cumprod[0]).sqrt().item()
    x = {end: run(d, optimal_model(d, MU, sigma), (len(y), 8), y, "dpm_solver", 25, 0, spacing="logsnr",
                  final_step=end)[0] for end in ("clean", "noisy")}
    assert per_class(x["clean"], y, 0)[1] < 1e-6
    assert per_class(x["noisy"], y, 0)[1] == pytest.approx(residual, rel=0.03)
    for c in (1, 2):
        for end in ("clean", "noisy"):
            assert per_class(x[end], y, c)[1] == pytest.approx(sigma[c].item(), rel=0.03), (end, c)
    for c in range(3):
        torch.testing.assert_close(per_class(x["clean"], y, c)[0], MU[c], atol=0.03, rtol=0)


def test_a_noisy_end_cannot_start_at_t_0() -> None:
    d = gaussian_diffusion()
    with pytest.raises(ValueError, match="t = 0"):
        dpm_solver_sample(d, optimal_model(d), torch.zeros(3, 8), torch.tensor([500, 0]), labels(n=1),
                          final_step="noisy")
    with pytest.raises(ValueError, match="final_step"):
        dpm_solver_sample(d, optimal_model(d), torch.zeros(3, 8), torch.tensor([500]), labels(n=1),
                          final_step="zero")  # type: ignore[arg-type]


@pytest.mark.parametrize("final_step,diffusers_final", [("clean", "zero"), ("noisy", "sigma_min")])
@pytest.mark.parametrize("steps", [10, 25])
def test_dpm_solver_agrees_with_diffusers(final_step: str, diffusers_final: str, steps: int) -> None:
    """Configured alike (linear betas, eps prediction, 2nd-order multistep, time-uniform "linspace" steps, a
    first-order last step), the two solvers agree to float32 precision: "clean" is diffusers'
    final_sigmas_type="zero", "noisy" its "sigma_min" (ending at t = 0's noise level)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is part of the test install")
    d = gaussian_diffusion("linear", "eps")
    y = labels(n=100)
    model = optimal_model(d)
    ours = run(d, model, (len(y), 8), y, "dpm_solver", steps, 6, final_step=final_step)[0]
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", solver_order=2,
        prediction_type="epsilon", algorithm_type="dpmsolver++", lower_order_final=True, euler_at_final=steps >= 15,
        final_sigmas_type=diffusers_final, timestep_spacing="linspace")
    sched.set_timesteps(steps)
    x = torch.randn((len(y), 8), generator=torch.Generator().manual_seed(6))  # the same x_T
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((len(y),), int(t)), y), t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=1e-5)

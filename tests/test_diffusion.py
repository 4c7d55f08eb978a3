"""GaussianDiffusion: coefficients, forward process, posterior, output conversions and the loss."""

from __future__ import annotations

import pytest
import torch

from ddpm.config import Config
from ddpm.core.diffusion import GaussianDiffusion, extract
from ddpm.core.schedules import cosine_betas, linear_betas


def _diffusion(prediction: str = "eps", variance: str = "fixed_large", clip: bool = False, T: int = 1000):
    return GaussianDiffusion(linear_betas(T, 1e-4, 0.02), prediction, variance, clip)  # type: ignore[arg-type]


def _f64(d: GaussianDiffusion) -> dict[str, torch.Tensor]:
    """Reference schedule quantities in float64, written out independently of the module."""
    b = d.betas64
    ab = torch.cumprod(1 - b, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return {"b": b, "ab": ab, "ab_prev": ab_prev}


def test_extract_gathers_and_broadcasts() -> None:
    a = torch.arange(10, dtype=torch.float32) * 2
    t = torch.tensor([0, 3, 9])
    out = extract(a, t, (3, 2, 4, 4))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [0.0, 6.0, 18.0]
    assert extract(a, t, (3, 5)).shape == (3, 1)


def test_buffers_are_float32_and_match_float64_formulas() -> None:
    d = _diffusion()
    ref = _f64(d)
    assert d.num_timesteps == 1000
    for name, buf in d.named_buffers():
        assert buf.dtype == torch.float32, name
    torch.testing.assert_close(d.alphas_cumprod.double(), ref["ab"], rtol=1e-6, atol=0)
    torch.testing.assert_close(d.sqrt_one_minus_alphas_cumprod.double(), (1 - ref["ab"]).sqrt(), rtol=1e-6, atol=0)
    # 1 - alpha_bar_0 = 1e-4 would keep only ~3 digits if computed from a float32 alpha_bar
    assert d.sqrt_one_minus_alphas_cumprod[0].item() == pytest.approx(0.01, rel=1e-6)


def test_coefficients_stay_out_of_the_state_dict() -> None:
    assert GaussianDiffusion(cosine_betas(100)).state_dict() == {}


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_q_sample_empirical_moments(t: int) -> None:
    d = _diffusion()
    g = torch.Generator().manual_seed(0)
    n = 20_000
    x0 = torch.tensor([[-0.8, 0.0, 0.5, 1.0]]).expand(n, 4)  # (n, 4)
    tt = torch.full((n,), t)
    x_t = d.q_sample(x0, tt, torch.randn(n, 4, generator=g))  # (n, 4)
    ab = _f64(d)["ab"][t].item()
    se = (1 - ab) ** 0.5 / n**0.5
    torch.testing.assert_close(x_t.mean(0), ab**0.5 * x0[0], atol=5 * se, rtol=0)
    torch.testing.assert_close(x_t.var(0), torch.full((4,), 1 - ab), rtol=0.05, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_target_round_trips_through_to_x0_eps(prediction: str, schedule: str) -> None:
    betas = linear_betas(1000, 1e-4, 0.02) if schedule == "linear" else cosine_betas(1000)
    d = GaussianDiffusion(betas, prediction, "fixed_large", clip_x0=False)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(64, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(64, 3, 4, 4, generator=g)
    t = torch.cat([torch.tensor([0, 1, 998]), torch.randint(0, 990, (61,), generator=g)])
    x_t = d.q_sample(x0, t, noise)
    x0_back, eps_back = d.to_x0_eps(d.target(x0, noise, t), x_t, t)
    torch.testing.assert_close(x0_back, x0, atol=2e-3, rtol=0)
    torch.testing.assert_close(eps_back, noise, atol=2e-3, rtol=0)


def test_v_target_is_the_defined_combination() -> None:
    d = _diffusion("v")
    x0, noise = torch.full((2, 1), 0.5), torch.full((2, 1), -1.0)
    t = torch.tensor([0, 999])
    ab = _f64(d)["ab"][t]
    expected = ab.sqrt() * -1.0 - (1 - ab).sqrt() * 0.5
    torch.testing.assert_close(d.target(x0, noise, t).flatten().double(), expected, rtol=1e-5, atol=1e-6)


def test_q_posterior_matches_gaussian_conditioning() -> None:
    # x_{t-1} | x0 ~ N(sqrt(ab_prev) x0, 1 - ab_prev) and x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta):
    # the posterior precision and mean follow from Bayes' rule for Gaussians, independently of eq. 7
    d = _diffusion()
    ref = _f64(d)
    t = torch.tensor([1, 5, 100, 500, 999])
    x0 = torch.tensor([0.3, -0.7, 0.9, 0.0, -1.0]).reshape(5, 1)
    x_t = torch.tensor([0.2, 0.4, -1.5, 2.0, 0.1]).reshape(5, 1)
    b, ab_prev = ref["b"][t], ref["ab_prev"][t]
    prec = 1 / (1 - ab_prev) + (1 - b) / b
    var = 1 / prec
    mean = var * (ab_prev.sqrt() * x0.flatten().double() / (1 - ab_prev) + (1 - b).sqrt() * x_t.flatten().double() / b)
    m, v, log_v = d.q_posterior(x0, x_t, t)
    torch.testing.assert_close(m.flatten().double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.flatten().double(), var, rtol=1e-5, atol=0)
    torch.testing.assert_close(log_v.flatten().double(), var.log(), rtol=1e-5, atol=1e-5)


def test_q_posterior_at_t0_is_x0_with_clipped_log_variance() -> None:
    d = _diffusion()
    x0, x_t = torch.tensor([[0.25]]), torch.tensor([[0.9]])
    m, v, log_v = d.q_posterior(x0, x_t, torch.tensor([0]))
    assert m.item() == pytest.approx(0.25, abs=1e-6)
    assert v.item() == 0.0
    assert log_v.item() == pytest.approx(d.posterior_variance[1].log().item())  # finite: clipped to beta_tilde_1


def test_p_mean_eps_matches_ddpm_eq_11() -> None:
    d = _diffusion("eps")
    ref = _f64(d)
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0, 1, 300, 999])
    x_t, eps = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    b, ab = ref["b"][t].unsqueeze(1), ref["ab"][t].unsqueeze(1)
    expected = (x_t.double() - b / (1 - ab).sqrt() * eps.double()) / (1 - b).sqrt()  # eq. 11
    out = d.p_mean_variance(eps, x_t, t)
    torch.testing.assert_close(out.mean.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_p_variance_choices(variance: str) -> None:
    d = _diffusion("eps", variance)
    ref = _f64(d)
    b, ab, ab_prev = ref["b"], ref["ab"], ref["ab_prev"]
    beta_tilde = b * (1 - ab_prev) / (1 - ab)
    t = torch.arange(1000)
    out = d.p_mean_variance(torch.zeros(1000, 1), torch.zeros(1000, 1), t)
    expected = b.clone() if variance == "fixed_large" else beta_tilde.clone()
    expected[0] = beta_tilde[1]  # both use beta_tilde_1 at t = 0 (the log of beta_tilde_0 = 0 is -inf)
    torch.testing.assert_close(out.log_variance.flatten().double(), expected.log(), rtol=1e-5, atol=1e-5)
    if variance == "fixed_large":
        torch.testing.assert_close(out.variance.flatten().double(), expected, rtol=1e-5, atol=0)


def test_clip_x0_clips_the_prediction_inside_the_mean() -> None:
    clipped, free = _diffusion("x0", clip=True), _diffusion("x0", clip=False)
    x_t, t = torch.zeros(2, 3), torch.tensor([10, 500])
    out = torch.tensor([[3.0, -3.0, 0.5]] * 2)
    p = clipped.p_mean_variance(out, x_t, t)
    torch.testing.assert_close(p.pred_x0, torch.tensor([[1.0, -1.0, 0.5]] * 2))
    torch.testing.assert_close(p.mean, clipped.q_posterior(p.pred_x0, x_t, t)[0])
    assert free.p_mean_variance(out, x_t, t).pred_x0.abs().max().item() == 3.0


def test_training_losses_is_per_example_mse_on_the_target() -> None:
    d = _diffusion("v")
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 2, 500, 999])
    y = torch.tensor([0, 1, 2, 3, 4])
    seen = {}

    def oracle(x_t, tt, yy):
        seen.update(x_t=x_t, t=tt, y=yy)
        return d.target(x0, noise, tt)

    loss = d.training_losses(oracle, x0, t, y, noise)
    assert loss.shape == (5,) and loss.abs().max().item() < 1e-10
    torch.testing.assert_close(seen["x_t"], d.q_sample(x0, t, noise))
    assert seen["t"] is t and seen["y"] is y
    zero = d.training_losses(lambda x_t, tt, yy: torch.zeros_like(x_t), x0, t, y, noise)
    torch.testing.assert_close(zero, (d.target(x0, noise, t) ** 2).mean(dim=(1, 2, 3)))


def test_from_config_uses_schedule_and_settings() -> None:
    diffusion = {"timesteps": 50, "prediction": "v", "variance": "fixed_small", "clip_x0": False}
    cfg = Config.from_dict({"schedule": "cosine", "diffusion": diffusion})
    d = GaussianDiffusion.from_config(cfg)
    assert (d.num_timesteps, d.prediction, d.variance, d.clip_x0) == (50, "v", "fixed_small", False)
    torch.testing.assert_close(d.betas, cosine_betas(50).float())


def test_respaced_keeps_alpha_bar_at_the_kept_steps() -> None:
    d = _diffusion("v", "fixed_small", clip=True)
    full = d.respaced(torch.arange(1000))
    for name, buf in d.named_buffers():
        torch.testing.assert_close(getattr(full, name), buf, rtol=1e-6, atol=1e-9, msg=name)
    kept = torch.tensor([0, 249, 499, 999])
    sub = d.respaced(kept)
    assert (sub.num_timesteps, sub.prediction, sub.variance, sub.clip_x0) == (4, "v", "fixed_small", True)
    torch.testing.assert_close(sub.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-6, atol=0)


def test_rejects_betas_outside_the_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\), got min 0.1, max 1.0"):
        GaussianDiffusion(torch.tensor([0.1, 1.0], dtype=torch.float64))


# ---- min-SNR loss weighting (Hang et al. 2023) --------------------------------------------------------


def _alpha_bar_by_hand(t: int, T: int = 1000, b0: float = 1e-4, b1: float = 0.02) -> float:
    """alpha_bar_t of DDPM's linear schedule, by plain float arithmetic."""
    out = 1.0
    for s in range(t + 1):
        out *= 1.0 - (b0 + s * (b1 - b0) / (T - 1))
    return out


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weights_match_hand_computed_values(prediction: str) -> None:
    d = GaussianDiffusion(linear_betas(1000, 1e-4, 0.02), prediction)  # type: ignore[arg-type]
    t = torch.tensor([0, 50, 200, 999])
    gamma = 5.0
    expected = []
    for ti in t.tolist():
        ab = _alpha_bar_by_hand(ti)
        snr = ab / (1 - ab)  # 9999 at t=0, ~4e-5 at t=999
        w = {"eps": min(snr, gamma) / snr, "x0": min(snr, gamma), "v": min(snr, gamma) / (snr + 1)}[prediction]
        expected.append(w)
    got = d.loss_weights(t, "min_snr", gamma)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=0)
    if prediction == "eps":  # high-noise steps (SNR < gamma) keep weight 1; t = 0 is down-weighted to 5/9999
        assert got[-1].item() == 1.0 and got[0].item() == pytest.approx(5 / 9999, rel=1e-3)
    assert torch.equal(d.loss_weights(t, "uniform", gamma), torch.ones(4))
    with pytest.raises(ValueError, match="loss weighting"):
        d.loss_weights(t, "max_snr")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_is_the_same_x0_space_weight_in_every_prediction_space(prediction: str) -> None:
    # the weighted error of ANY network output, read back as x0, must be min(SNR, gamma) ||x0 - x0_hat||^2
    d = GaussianDiffusion(cosine_betas(1000), prediction)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 100, 400, 700, 990])
    out = d.target(x0, noise, t) + 0.1 * torch.randn(6, 3, 4, 4, generator=g)  # an imperfect prediction
    x_t = d.q_sample(x0, t, noise)
    x0_hat, _ = d.to_x0_eps(out, x_t, t)
    weighted = d.loss_weights(t, "min_snr", 2.0) * ((out - d.target(x0, noise, t)) ** 2).mean(dim=(1, 2, 3))
    ab = d.alphas_cumprod[t]
    x0_space = (ab / (1 - ab)).clamp(max=2.0) * ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted, x0_space, rtol=2e-3, atol=1e-6)

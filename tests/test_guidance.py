"""Classifier-free guidance and its interval, on the closed-form Gaussian data of `gaussian_data`."""

from __future__ import annotations

import pytest
import torch
from gaussian_data import (  # noqa: F401 - one_thread is a fixture
    MU,
    N,
    gaussian_diffusion,
    labels,
    one_thread,
    optimal_model,
    per_class,
    run,
)

from ddpm.core.samplers import edm_sigma, evaluation_timesteps, guidance_flags, guided

SAMPLERS = ["ddpm", "ddim", "dpm_solver"]
NULL_MU = torch.cat([MU[:2], torch.zeros(1, 8) + 0.1])  # (3, D); label 2 is the null "class"
EQUAL_SIGMA = torch.full((3,), 0.2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("w", [0.5, 2.0])
def test_guidance_moves_mean_away_from_null_by_the_formula(w: float) -> None:
    # equal stds: (1 + w) eps(mu_y) - w eps(mu_null) is exactly eps for mean mu_y + w (mu_y - mu_null),
    # so the guided sampler must produce N(mu_y + w (mu_y - mu_null), sigma^2)
    d = gaussian_diffusion("cosine")
    y = labels(k=2)
    fn = guided(optimal_model(d, NULL_MU, EQUAL_SIGMA), w, null_label=2)
    x, _ = run(d, fn, (len(y), 8), y, "ddim", 1000, 0)
    for c in range(2):
        mean, std = per_class(x, y, c)
        torch.testing.assert_close(mean, NULL_MU[c] + w * (NULL_MU[c] - NULL_MU[2]), atol=4.5 * 0.2 / N**0.5, rtol=0)
        assert std == pytest.approx(0.2, rel=0.03)


def test_guidance_zero_is_exactly_the_conditional_sampler() -> None:
    # fails if w = 0 still evaluates the null branch (batches of 2B), or mixes it in (cond/uncond swapped)
    d = gaussian_diffusion()
    model = optimal_model(d, NULL_MU, EQUAL_SIGMA)
    batches = []

    def counted(x, t, y):
        batches.append(y.clone())
        return model(x, t, y)

    y = labels(k=2, n=30)
    a, _ = run(d, guided(counted, 0.0, null_label=2), (60, 8), y, "ddim", 30, 1)
    assert len(batches) == 30 and all(torch.equal(b, y) for b in batches)  # B rows, the labels, no null
    b, _ = run(d, model, (60, 8), y, "ddim", 30, 1)
    unconditional, _ = run(d, model, (60, 8), torch.full_like(y, 2), "ddim", 30, 1)
    assert torch.equal(a, b)
    assert (a - unconditional).abs().max() > 0.1  # so a swap of the two branches would show


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
    model = optimal_model(gaussian_diffusion())
    with pytest.raises(ValueError, match="unconditional"):
        guided(model, 1.0, null_label=None)
    with pytest.raises(ValueError, match="guidance"):
        guided(model, -1.0, null_label=3)
    assert guided(model, 0.0, null_label=None) is model  # an unconditional model without guidance is fine


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


# ---- the guidance interval (Kynkaanniemi et al. 2024) ----------------------------------------------


def test_guidance_flags_follow_the_edm_sigma_of_each_timestep() -> None:
    d = gaussian_diffusion()
    ts = evaluation_timesteps(d, "ddim", 50, "time")  # (50,) decreasing
    ab = torch.cumprod(1 - d.betas64, 0)[ts]
    sigma = ((1 - ab) / ab).sqrt()  # by hand: EDM's sigma, decreasing with t
    torch.testing.assert_close(edm_sigma(d, ts), sigma)
    assert guidance_flags(d, ts, None) == [True] * 50
    flags = guidance_flags(d, ts, (0.28, 5.42))
    assert flags == [0.28 < s <= 5.42 for s in sigma.tolist()]
    assert 0 < sum(flags) < 50 and not flags[0] and not flags[-1]  # off at the noisiest and the cleanest step
    assert flags.index(True) + sum(flags) == len(flags) - flags[::-1].index(True)  # one contiguous run
    assert guidance_flags(d, ts, (0.0, 0.0)) == [False] * 50


def _interval_run(d, sampler: str, w: float, interval, y, spacing: str = "time") -> torch.Tensor:
    """A sampler with guidance on `interval` only, composed as `generate` composes it."""
    model = optimal_model(d, NULL_MU, EQUAL_SIGMA)
    fn = guided(model, w, null_label=2)
    ts = evaluation_timesteps(d, sampler, 20, spacing)
    fns = fn if interval is None else [fn if g else model for g in guidance_flags(d, ts, interval)]
    return run(d, fns, (len(y), 8), y, sampler, 20, 3, spacing=spacing, eta=0.5)[0]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_interval_covering_every_step_is_the_guided_sampler_and_an_empty_one_the_conditional(sampler) -> None:
    d = gaussian_diffusion("cosine")
    y = labels(k=2, n=200)
    guided_everywhere = _interval_run(d, sampler, 2.0, None, y)
    assert torch.equal(_interval_run(d, sampler, 2.0, (0.0, 1e9), y), guided_everywhere)  # bit for bit
    conditional = _interval_run(d, sampler, 0.0, None, y)
    assert torch.equal(_interval_run(d, sampler, 2.0, (0.0, 0.0), y), conditional)  # w applies nowhere
    partial = _interval_run(d, sampler, 2.0, (0.28, 5.42), y)
    assert (partial - guided_everywhere).abs().max() > 1e-3 and (partial - conditional).abs().max() > 1e-3


def test_guidance_on_low_noise_only_barely_moves_the_mean() -> None:
    # the mean of the data is fixed at high noise: guiding only where sigma < 0.05 moves the class mean far
    # less than guiding everywhere (by w (mu_y - mu_null)), i.e. the interval really restricts where w acts
    d = gaussian_diffusion("cosine")
    y = labels(k=2, n=500)
    shift = (2.0 * (NULL_MU[0] - NULL_MU[2])).abs().mean().item()
    everywhere = _interval_run(d, "ddim", 2.0, None, y)
    low = _interval_run(d, "ddim", 2.0, (0.0, 0.05), y)
    conditional = _interval_run(d, "ddim", 0.0, None, y)
    moved = lambda x: (per_class(x, y, 0)[0] - per_class(conditional, y, 0)[0]).abs().mean().item()  # noqa: E731
    assert moved(everywhere) == pytest.approx(shift, rel=0.1)
    assert moved(low) < 0.1 * shift

"""The training step's statistics against hand computation on a one-parameter model.

The model is eps_hat(x_t) = a * x_t with one scalar parameter a, so every per-example loss
L_i = mean((a x_t,i - eps_i)^2) and the gradient dL/da = mean(2 (a x_t,i - eps_i) x_t,i) have closed forms,
computed here in float64 numpy from the same random draws (t, then the noise, per micro-batch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ddpm.config import TrainConfig
from ddpm.core.diffusion import GaussianDiffusion
from ddpm.core.schedules import linear_betas
from ddpm.core.train_step import StepContext, StepStats, train_step

T, B, SHAPE = 8, 6, (3, 4, 4)
BETAS = np.linspace(0.1, 0.5, T)  # beta_1..beta_T (a coarse schedule: large, distinct alpha_bar per step)


class Scale(nn.Module):
    """eps_hat = a * x_t."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.a * x


class FixedBatches:
    """Hands out the given micro-batches in turn."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = iter(batches)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = next(self.batches)
        return x0, torch.zeros(len(x0), dtype=torch.int64)


def _expected(a: float, x0s: list[torch.Tensor], seed: int, grad_accum: int) -> tuple[dict[str, float], float]:
    """Per-quarter mean losses, the mean loss and |dLoss/da| of one step, and dLoss/da itself, by hand."""
    gen = torch.Generator().manual_seed(seed)
    alpha_bar = np.cumprod(1.0 - BETAS)
    losses, quarters, grad = [], [], 0.0
    for x0 in x0s:  # the step draws t, then the noise, for each micro-batch in turn
        t = torch.randint(0, T, (B,), generator=gen).numpy()
        eps = torch.randn((B, *SHAPE), generator=gen).double().numpy()
        ab = alpha_bar[t].reshape(-1, 1, 1, 1)
        x_t = np.sqrt(ab) * x0.double().numpy() + np.sqrt(1.0 - ab) * eps
        residual = a * x_t - eps
        per_example = (residual**2).mean(axis=(1, 2, 3))  # (B,)
        losses += per_example.tolist()
        quarters += (t // (T // 4)).tolist()  # T = 8: timesteps 0-1, 2-3, 4-5, 6-7
        grad += (2 * residual * x_t).mean(axis=(1, 2, 3)).mean() / grad_accum
    out = {"loss": float(np.mean(losses)), "grad_norm": abs(grad)}
    for q in range(4):
        in_q = [loss for loss, qq in zip(losses, quarters, strict=True) if qq == q]
        if in_q:
            out[f"loss_q{q}"] = float(np.mean(in_q))
    return out, grad


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_step_statistics_match_the_hand_computation(grad_accum: int):
    a, seed = 0.7, 5
    x0s = [torch.rand((B, *SHAPE), generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(grad_accum)]
    model = Scale(a)
    diffusion = GaussianDiffusion(linear_betas(T, 0.1, 0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)  # fused: takes found_inf, like AdamW
    ctx = StepContext.from_config(
        TrainConfig(precision="fp32", grad_clip=0.0, grad_accum=grad_accum), model=model, diffusion=diffusion,
        optimizer=optimizer, scaler=None, generator=torch.Generator().manual_seed(seed),
        device=torch.device("cpu"), null_label=None,
    )
    stats = StepStats(torch.device("cpu"))
    train_step(ctx, FixedBatches(x0s), stats)
    got = stats.read()
    expected, grad = _expected(a, x0s, seed, grad_accum)
    assert {k for k in got if k.startswith("loss")} == {k for k in expected if k.startswith("loss")}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    assert got["bad_steps_total"] == 0.0 and got["bad_steps_in_a_row"] == 0.0
    # the SGD update used the same gradient (no clipping): a <- a - lr * dLoss/da
    assert model.a.item() == pytest.approx(a - 0.1 * grad, rel=1e-5)


def test_read_resets_the_interval_and_keeps_the_run_counters():
    stats = StepStats(torch.device("cpu"))
    stats.add_losses(torch.tensor([1.0, 3.0, float("nan")]), torch.tensor([0, 7, 3]), T)
    stats.add_step(torch.tensor(2.0), torch.tensor(0.0))
    stats.add_step(torch.tensor(float("nan")), torch.tensor(1.0))
    first = stats.read()
    assert first["loss"] == 2.0 and first["loss_q0"] == 1.0 and first["loss_q3"] == 3.0
    assert "loss_q1" not in first  # its only example was not finite
    assert first["grad_norm"] == 2.0  # the skipped step's norm is left out
    assert (first["bad_steps_total"], first["bad_steps_in_a_row"]) == (1.0, 1.0)
    second = stats.read()
    assert np.isnan(second["loss"]) and np.isnan(second["grad_norm"])
    assert second["bad_steps_total"] == 1.0  # run-long, not reset by read


def test_the_run_context_carries_the_loss_weighting_of_the_params():
    """`StepContext.from_config` is how training builds its step: `train.loss_weighting` must reach it."""
    from ddpm.config import TrainConfig
    from ddpm.core.train_step import StepContext

    tc = TrainConfig(loss_weighting="min_snr", min_snr_gamma=3.0)
    ctx = StepContext.from_config(tc, model=None, diffusion=None, optimizer=None, scaler=None, generator=None,
                                  device=torch.device("cpu"), null_label=None)
    assert (ctx.loss_weighting, ctx.min_snr_gamma) == ("min_snr", 3.0)


# ---- classifier-free guidance training: the label dropout ------------------------------------------------

K, NULL = 10, 10  # ten classes; the null label is the extra embedding row K


class LabelTable(nn.Module):
    """out = E[y] at every pixel: one free scalar per label, the null label's row included; records the labels."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(K + 1))  # (K + 1,)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None
        self.seen.append(y)
        return self.table[y][:, None, None, None].expand_as(x)  # (B, C, H, W)


class LabelledBatches:
    """One batch of n images (1, 1, 1) with labels 0..K-1 in turn."""

    def __init__(self, n: int):
        self.n = n

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(self.n, 1, 1, 1), torch.arange(self.n) % K


def _labels_and_gradient(p_uncond: float, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels the model saw (n,) and the gradient of the label table (K + 1,) after one step."""
    model = LabelTable()
    kept: list[torch.Tensor] = []
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, fused=True)
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: kept.append(model.table.grad.clone()))
    ctx = StepContext.from_config(
        TrainConfig(precision="fp32", grad_clip=0.0, p_uncond=p_uncond), model=model,
        diffusion=GaussianDiffusion(linear_betas(T, 0.1, 0.5)), optimizer=optimizer, scaler=None,
        generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"), null_label=NULL,
    )
    train_step(ctx, LabelledBatches(n), StepStats(torch.device("cpu")))
    return torch.cat(model.seen), kept[0]


def test_labels_are_dropped_to_the_null_label_at_rate_p_uncond():
    n, p = 20_000, 0.1
    seen, _ = _labels_and_gradient(p, n)
    given = torch.arange(n) % K
    dropped = seen == NULL  # (n,)
    assert torch.equal(seen[~dropped], given[~dropped])  # a kept label is the example's own
    limit = 5 * (n * p * (1 - p)) ** 0.5  # 5 sigma of a Binomial(n, p)
    assert abs(int(dropped.sum()) - n * p) < limit
    per_class = torch.bincount(given[dropped], minlength=K).double()  # (K,): every class is dropped alike
    assert ((per_class - n / K * p).abs() < 5 * (n / K * p * (1 - p)) ** 0.5).all(), per_class
    assert (_labels_and_gradient(0.0, 1000)[0] != NULL).all()
    assert (_labels_and_gradient(1.0, 1000)[0] == NULL).all()


def test_dropped_labels_train_the_null_embedding_and_kept_ones_their_class():
    _, always = _labels_and_gradient(1.0, 64)
    assert (always[:K] == 0).all() and always[NULL] != 0  # p_uncond 1: only the null row learns
    _, never = _labels_and_gradient(0.0, 64)
    assert (never[:K] != 0).all() and never[NULL] == 0  # p_uncond 0: the null row never learns
    _, some = _labels_and_gradient(0.5, 64)
    assert (some != 0).sum() > K // 2 and some[NULL] != 0  # both


# ---- gradient clipping ----------------------------------------------------------------------------------


class TwoHalves(nn.Module):
    """x0 prediction = the two rows (a, b) of a 2x2 image, whatever the input: with target x0 = X for every
    example, dL/da and dL/db are (a - X[0]) / 2 and (b - X[1]) / 2 exactly, whatever the noise and timesteps."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1, 1, 2))  # (C, 1, W) the top row
        self.b = nn.Parameter(torch.zeros(1, 1, 2))  # (C, 1, W) the bottom row

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([self.a, self.b], dim=1).expand_as(x)  # (B, 1, 2, 2)


class SameImage:
    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor([[[6.0, 0.0], [0.0, 8.0]]]).expand(4, 1, 2, 2)  # (B, 1, 2, 2)
        return x, torch.zeros(4, dtype=torch.int64)


@pytest.mark.parametrize(("clip", "scale"), [(1.0, 1 / 5), (2.5, 1 / 2), (10.0, 1.0), (0.0, 1.0)])
def test_gradient_clipping_scales_the_total_norm_down_to_grad_clip(clip: float, scale: float):
    """The gradient is (-3, 0 | 0, -4): norm 5 over both parameters (3 and 4 each). A clip below 5 scales it
    to norm `clip` keeping its direction (per-parameter clipping would not); a larger one or 0 leaves it."""
    model = TwoHalves()
    ctx = StepContext.from_config(
        TrainConfig(precision="fp32", grad_clip=clip), model=model,
        diffusion=GaussianDiffusion(linear_betas(T, 0.1, 0.5), prediction="x0"),
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0, fused=True), scaler=None,
        generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), null_label=None,
    )
    stats = StepStats(torch.device("cpu"))
    train_step(ctx, SameImage(), stats)
    # SGD with lr 1 from zero: the parameters are minus the (clipped) gradient
    assert model.a.detach().flatten().tolist() == pytest.approx([3.0 * scale, 0.0], rel=1e-5)
    assert model.b.detach().flatten().tolist() == pytest.approx([0.0, 4.0 * scale], rel=1e-5)
    assert stats.read()["grad_norm"] == pytest.approx(5.0, rel=1e-6)  # the logged norm is before clipping

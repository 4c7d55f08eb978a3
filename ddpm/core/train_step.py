"""One optimisation step of L_simple, free of host-device synchronisation.

The optimised loss is L_simple weighted per example (`train.loss_weighting`); everything the logs need (the
unweighted loss, loss per quarter of the timestep range, gradient norm, skipped steps)
is accumulated in tensors on the device and read back by `StepStats.read` every `tracking.log_every`
steps. A step whose loss or gradients are not finite is skipped on the device: the fused AdamW kernel
takes a `found_inf` flag (the protocol GradScaler uses) and leaves parameters and moments untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ddpm.config import TrainConfig
from ddpm.core.diffusion import GaussianDiffusion
from ddpm.core.runtime import Ranks, autocast


class StepStats:
    """On-device running sums since the last read-back."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bad_total = torch.zeros((), device=device)  # skipped steps since the start of the run
        self.bad_run = torch.zeros((), device=device)  # current run of consecutive skipped steps
        self.reset()

    def reset(self) -> None:
        """Zero the per-interval sums (not the run-long bad-step counters)."""
        z = lambda *s: torch.zeros(s, dtype=torch.float64, device=self.device)  # noqa: E731
        self.loss_sum, self.loss_count = z(), z()
        self.quarter_sum, self.quarter_count = z(4), z(4)  # loss per quarter of [0, T)
        self.gnorm_sum, self.steps = z(), z()
        self.bad_run_max = torch.zeros((), device=self.device)

    _STATE = ("bad_total", "bad_run", "loss_sum", "loss_count", "quarter_sum", "quarter_count", "gnorm_sum",
              "steps", "bad_run_max")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running sums (so a resumed run logs exactly what an uninterrupted one would)."""
        return {k: getattr(self, k).clone() for k in self._STATE}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in self._STATE:
            getattr(self, k).copy_(state[k])

    def add_losses(self, losses: torch.Tensor, t: torch.Tensor, num_timesteps: int) -> None:
        """Accumulate per-example losses (B,) and their timesteps (B,) into totals and quarters."""
        losses = losses.detach().double()
        finite = torch.isfinite(losses)
        losses = torch.where(finite, losses, 0.0)  # a NaN example must not poison the interval mean
        quarter = (t * 4 // num_timesteps).clamp_(0, 3)  # (B,)
        # a one-hot product rather than index_add_: deterministic on CUDA under train.deterministic
        onehot = torch.nn.functional.one_hot(quarter, 4).double()  # (B, 4)
        self.loss_sum += losses.sum()
        self.loss_count += finite.sum()
        self.quarter_sum += onehot.t() @ losses
        self.quarter_count += onehot.t() @ finite.double()

    def add_step(self, grad_norm: torch.Tensor, found_inf: torch.Tensor) -> None:
        """Record one optimiser step's gradient norm and whether it was skipped."""
        ok = 1.0 - found_inf
        self.gnorm_sum += torch.where(found_inf > 0, 0.0, grad_norm.double())
        self.steps += ok.double()
        self.bad_total += found_inf
        self.bad_run.mul_(found_inf).add_(found_inf)  # consecutive count: reset to 0 by a good step
        torch.maximum(self.bad_run_max, self.bad_run, out=self.bad_run_max)

    # per-example sums: each rank adds its own shard's examples (the rest is the same on every rank, the
    # gradients being all-reduced)
    _PER_RANK = ("loss_sum", "loss_count", "quarter_sum", "quarter_count")

    def collect_on_main(self, ranks: Ranks) -> None:
        """Sum every rank's per-example sums into rank 0's, the others restarting from zero (a collective).

        Before a read (rank 0 logs the global batch's loss, not its shard's) and a checkpoint (which holds
        rank 0's statistics): the sum over the ranks stays the same, so nothing is counted twice.
        """
        if ranks.world_size == 1:
            return
        for name in self._PER_RANK:
            total = getattr(self, name)
            torch.distributed.all_reduce(total)  # float64 sums: only the summation order differs
            if not ranks.is_main:
                total.zero_()

    def zero_per_rank(self) -> None:
        """Zero the per-example sums: a non-main rank restored from rank 0's checkpoint (see collect_on_main)."""
        for name in self._PER_RANK:
            getattr(self, name).zero_()

    _READ = ("loss_sum", "loss_count", "gnorm_sum", "steps", "quarter_sum", "quarter_count", "bad_total",
             "bad_run_max")

    def read(self) -> dict[str, float]:
        """ONE device-to-host transfer of every statistic; resets the interval sums."""
        tensors = [getattr(self, k).double().reshape(-1) for k in self._READ]
        flat = torch.cat(tensors).tolist()  # the one sync
        v, start = {}, 0
        for name, t in zip(self._READ, tensors, strict=True):  # split back by name: (4,) for the quarters
            v[name] = flat[start : start + t.numel()] if t.numel() > 1 else flat[start]
            start += t.numel()
        out = {
            "loss": v["loss_sum"] / v["loss_count"] if v["loss_count"] else float("nan"),
            "grad_norm": v["gnorm_sum"] / v["steps"] if v["steps"] else float("nan"),
            "bad_steps_total": v["bad_total"],
            "bad_steps_in_a_row": v["bad_run_max"],
        }
        for q in range(4):
            if v["quarter_count"][q]:
                out[f"loss_q{q}"] = v["quarter_sum"][q] / v["quarter_count"][q]
        self.reset()
        return out


@dataclass
class StepContext:
    """What a step needs besides the batch: the objects and the fixed choices of the run."""

    model: nn.Module  # possibly compiled and/or DDP-wrapped
    diffusion: GaussianDiffusion
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    generator: torch.Generator  # training noise, timesteps and label dropout
    precision: str
    device: torch.device
    ranks: Ranks
    null_label: int | None
    p_uncond: float
    grad_clip: float
    grad_accum: int
    loss_weighting: str = "uniform"  # uniform | min_snr (GaussianDiffusion.loss_weights)
    min_snr_gamma: float = 5.0

    @classmethod
    def from_config(cls, tc: TrainConfig, *, model: nn.Module, diffusion: GaussianDiffusion,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                    generator: torch.Generator, device: torch.device, null_label: int | None,
                    ranks: Ranks = Ranks()) -> StepContext:
        """The context of a run with the train settings `tc` (precision, p_uncond, grad_clip, grad_accum, loss
        weighting)."""
        return cls(model=model, diffusion=diffusion, optimizer=optimizer, scaler=scaler, generator=generator,
                   precision=tc.precision, device=device, ranks=ranks, null_label=null_label,
                   p_uncond=tc.p_uncond, grad_clip=tc.grad_clip, grad_accum=tc.grad_accum,
                   loss_weighting=tc.loss_weighting, min_snr_gamma=tc.min_snr_gamma)


def _global_then_local(ctx: StepContext, local_batch: int, make) -> torch.Tensor:
    """Draw a random tensor for the GLOBAL batch and keep this rank's slice.

    Every rank draws the same global tensor from the same generator, so a run on N ranks uses exactly the
    noise, timesteps and label dropout of a single-process run with the same global batch.
    """
    full = make(local_batch * ctx.ranks.world_size)
    start = ctx.ranks.rank * local_batch
    return full[start : start + local_batch]


def _micro_step(ctx: StepContext, x0: torch.Tensor, y: torch.Tensor, stats: StepStats, sync: bool) -> torch.Tensor:
    """Forward and backward on one micro-batch; returns the mean loss (a device scalar)."""
    b, dev, gen, T = x0.shape[0], ctx.device, ctx.generator, ctx.diffusion.num_timesteps
    t = _global_then_local(ctx, b, lambda n: torch.randint(0, T, (n,), generator=gen, device=dev))  # (B,)
    noise = _global_then_local(
        ctx, b, lambda n: torch.randn((n, *x0.shape[1:]), generator=gen, device=dev)
    )  # (B, C, H, W)
    if ctx.null_label is not None:
        # classifier-free guidance training: replace the label by the null label with probability p_uncond
        drop = _global_then_local(ctx, b, lambda n: torch.rand(n, generator=gen, device=dev)) < ctx.p_uncond
        y = torch.where(drop, ctx.null_label, y)  # (B,)
    else:
        y = None
    # a new iteration for CUDA-graph trees (compile_mode reduce-overhead / max-autotune): the previous
    # micro-step's graph outputs are dead by now and may be overwritten; a no-op without CUDA graphs
    torch.compiler.cudagraph_mark_step_begin()
    no_sync = getattr(ctx.model, "no_sync", None)
    with contextlib.nullcontext() if sync or no_sync is None else no_sync():
        with autocast(ctx.precision, dev):
            losses = ctx.diffusion.training_losses(ctx.model, x0, t, y, noise=noise)  # (B,)
        weights = ctx.diffusion.loss_weights(t, ctx.loss_weighting, ctx.min_snr_gamma)  # (B,) all ones if uniform
        # the weighted mean is optimised; the logs (total and per quarter) keep the unweighted L_simple, so runs
        # with different weightings stay comparable. A non-finite loss stays non-finite after weighting
        # (weights are finite and > 0), so the step is skipped as before.
        loss = (losses.float() * weights).mean() / ctx.grad_accum
        (ctx.scaler.scale(loss) if ctx.scaler else loss).backward()
    stats.add_losses(losses, t, T)
    return loss


def train_step(ctx: StepContext, batches, stats: StepStats) -> None:
    """One optimiser step over `grad_accum` micro-batches; skipped on the device if anything is not finite."""
    loss_total = torch.zeros((), device=ctx.device)
    for i in range(ctx.grad_accum):
        x0, y = batches.next()  # (B, C, H, W), (B,)
        loss_total += _micro_step(ctx, x0, y, stats, sync=i == ctx.grad_accum - 1).detach()
    params = [p for p in ctx.model.parameters() if p.grad is not None]
    if ctx.scaler:
        ctx.scaler.unscale_(ctx.optimizer)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # device scalar, no sync
    if ctx.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, ctx.grad_clip, grad_norm)
    found_inf = (~(torch.isfinite(grad_norm) & torch.isfinite(loss_total))).float()
    if ctx.scaler:
        ctx.scaler.step(ctx.optimizer)  # GradScaler skips its own non-finite steps
        ctx.scaler.update()
    else:
        ctx.optimizer.found_inf = found_inf  # fused AdamW skips the update on the device when set
        ctx.optimizer.step()
        del ctx.optimizer.found_inf
    ctx.optimizer.zero_grad(set_to_none=True)
    stats.add_step(grad_norm, found_inf)

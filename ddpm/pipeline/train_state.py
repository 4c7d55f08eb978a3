"""The state a training run mutates (`Run`) and its checkpoint form: `payload()` / `restore()`.

On CPU a run restored from a payload continues bit-identically, so everything the loop reads between steps
(model, EMA, optimiser, LR schedule, scaler, RNG states, data position, step statistics) is in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ddpm.config import Config
from ddpm.core.checkpoint import FORMAT_VERSION
from ddpm.core.diffusion import GaussianDiffusion
from ddpm.core.ema import EMA
from ddpm.core.runtime import Ranks
from ddpm.core.seeding import rng_state, set_rng_state
from ddpm.core.train_step import StepStats


@dataclass
class Run:
    """Everything the loop mutates; `payload()` / `restore()` make it a checkpoint and back."""

    cfg: Config
    ranks: Ranks
    device: torch.device
    model: torch.nn.Module  # the plain network
    trained: torch.nn.Module  # what the loop calls: maybe compiled, maybe DDP
    diffusion: GaussianDiffusion
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator
    batches: object
    stats: StepStats
    step: int = 0
    plot_rows: list[dict[str, float]] = field(default_factory=list)  # one dict per log step, keyed by PLOT_COLUMNS
    run_id: str | None = None
    class_names: list[str] = field(default_factory=list)
    code: dict = field(default_factory=dict)  # code_identity(): the training code's fingerprint and git state

    def payload(self, data_hash: str) -> dict:
        """The full training state as plain data (weights_only-loadable)."""
        return {
            "format_version": FORMAT_VERSION,
            "config": self.cfg.training_dict(),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "rng": rng_state(),
            "generator": self.generator.get_state(),
            "batches": self.batches.state_dict(),
            "stats": self.stats.state_dict(),
            "plot_rows": self.plot_rows,
            "mlflow_run_id": self.run_id or "",
            "data_hash": data_hash,
            "code": dict(self.code),
        }

    def restore(self, ckpt: dict) -> None:
        """Load a payload written by `payload` (same config, so shapes match)."""
        self.step = int(ckpt["step"])
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler:
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.generator.set_state(ckpt["generator"])
        self.batches.load_state_dict(ckpt["batches"])
        self.stats.load_state_dict(ckpt["stats"])
        self.plot_rows = [dict(r) for r in ckpt["plot_rows"]]
        self.run_id = ckpt["mlflow_run_id"] or None

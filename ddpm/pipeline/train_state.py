"""The state a training run mutates (`Run`) and its checkpoint form: `payload()` / `restore()`.

On CPU a run restored from a payload continues bit-identically, so everything the loop reads between steps
(model, EMA, optimiser, LR schedule, scaler, RNG states, data position, step statistics) is in it. With
several ranks the payload also holds every rank's global RNG state (`rank_rng`: their dropout streams
differ), rank 0 alone reads the checkpoint and hands it to the others (`shared_checkpoint`: on several
nodes only rank 0's node has it), and the ranks agree on stopping (`StopVote`).
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
from ddpm.pipeline.resume import ResumeStore


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

    def payload(self, data_hash: str, rank_rng: list | None = None) -> dict:
        """The full training state as plain data (weights_only-loadable); `rank_rng`: every rank's
        `rng_state()` in rank order (`gather_rank_rng`), for a run of several ranks."""
        extra = {"rank_rng": rank_rng} if rank_rng is not None else {}
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
        } | extra

    def restore(self, ckpt: dict) -> None:
        """Load a payload written by `payload` (same config, so shapes match)."""
        self.step = int(ckpt["step"])
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler:
            self.scaler.load_state_dict(ckpt["scaler"])
        # each rank continues its own dropout stream (a checkpoint of one process holds only "rng")
        set_rng_state(ckpt["rank_rng"][self.ranks.rank] if "rank_rng" in ckpt else ckpt["rng"])
        self.generator.set_state(ckpt["generator"])
        self.batches.load_state_dict(ckpt["batches"])
        self.stats.load_state_dict(ckpt["stats"])
        if not self.ranks.is_main:
            self.stats.zero_per_rank()  # the checkpoint's sums are every rank's, collected on rank 0
        self.plot_rows = [dict(r) for r in ckpt["plot_rows"]]
        self.run_id = ckpt["mlflow_run_id"] or None


def gather_rank_rng(ranks: Ranks) -> list | None:
    """Every rank's global RNG state on rank 0, in rank order (None elsewhere, and for one process)."""
    if ranks.world_size == 1:
        return None
    states = [None] * ranks.world_size if ranks.is_main else None
    torch.distributed.gather_object(rng_state(), states, dst=0)
    return states


def shared_checkpoint(store: ResumeStore, ranks: Ranks, device: torch.device) -> dict | None:
    """The checkpoint to continue (None: start at step 0), the same on every rank: rank 0 reads it and
    broadcasts it (on the CPU; `restore` copies it onto the device), since other nodes lack its files."""
    if ranks.world_size == 1:
        return store.load(map_location=device)
    box = [store.load(map_location="cpu") if ranks.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class StopVote:
    """Whether any rank got SIGINT/SIGTERM, decided by all ranks together after every step.

    The launcher (or torchrun) signals every worker, but each sees it at its own step: a rank that stopped to
    checkpoint alone would wait forever for the others. One process just reads its flag. Several all-reduce
    it over gloo on the host (a process group of their own on CUDA: no device sync; ~0.1 ms on one node).
    """

    def __init__(self, ranks: Ranks, device: torch.device):
        self.ranks = ranks
        self.group = None
        if ranks.world_size > 1 and device.type != "cpu":
            self.group = torch.distributed.new_group(backend="gloo")  # collective: every rank builds it

    def __call__(self, flag: list[int]) -> int | None:
        """The signal to stop for (this rank's, else the highest any rank got), or None to go on."""
        if self.ranks.world_size == 1:
            return flag[0] if flag else None
        vote = torch.tensor([flag[0] if flag else 0], dtype=torch.int64)  # (1,) on the host
        torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return flag[0] if flag else (int(vote.item()) or None)

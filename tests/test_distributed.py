"""torchrun-style DistributedDataParallel on the CPU (gloo, 2 processes) equals one process with the same
global batch: each rank draws the global noise and keeps its slice, and takes a disjoint data shard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_params

from ddpm.config import Config
from ddpm.core.checkpoint import load_checkpoint
from ddpm.data.datasets import prepare
from ddpm.pipeline.launch import free_port
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.resume import resume_root
from ddpm.pipeline.train import train

NO_TRACKING = {"mlflow": False, "tensorboard": False, "system_metrics": False}


def _cfg() -> Config:
    return Config.from_dict(tiny_params(train={"steps": 3, "sample_every": 0, "batch_size": 8},
                                        tracking=NO_TRACKING))


def _worker(rank: int, world: int, port: int, root: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(_cfg(), Layout.under(Path(root)))


def _final_model(root: Path) -> dict:
    return load_checkpoint(next(resume_root(root).iterdir()) / "last.pt")["model"]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    cfg = _cfg()
    single, multi = tmp_path / "single", tmp_path / "multi"
    for root in (single, multi):
        prepare(cfg, root / "data/prepared")
    train(cfg, Layout.under(single))
    mp.start_processes(_worker, args=(2, free_port(), str(multi)), nprocs=2, join=True, start_method="spawn")
    a, b = _final_model(single), _final_model(multi)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # and training really moved the weights (the comparison is not trivially equal)
    initial = load_checkpoint(Layout.under(single).ema)["ema"]["weights"]
    assert any(not torch.equal(a[k], initial[k]) for k in a)
    assert (multi / "models/ema.pt").exists()  # rank 0 wrote the outputs

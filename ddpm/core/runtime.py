"""Where and how the computation runs: device choice, precision, distributed ranks.

Every choice is explicit and checked: asking for CUDA on a machine without it, or fp16 on the CPU, is an
error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from ddpm.config import DeviceName, Precision

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: DeviceName, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when available, else CPU; `cuda` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA GPU is visible")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_precision(precision: Precision, device: torch.device) -> None:
    """fp16 autocast needs a GPU (GradScaler); bf16 and fp32 run anywhere."""
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"fp16 autocast needs CUDA (a GradScaler) and the device is {device.type}")


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to the configured dtype; a no-op for fp32."""
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backends(deterministic: bool) -> None:
    """The backend settings every workflow runs under (train, sample, bench: so the bench times what runs).

    - TF32 matmuls/convolutions on Ampere+ GPUs: fp32 runs get tensor cores (no effect on the CPU).
    - `deterministic=False`: cuDNN autotunes a convolution algorithm per input shape (`cudnn.benchmark`);
      the shapes of a run never change, so the search is paid once.
    - `deterministic=True`: PyTorch's deterministic algorithms, no autotuning (slower on CUDA; README).
    Call before CUDA starts: cuBLAS reads `CUBLAS_WORKSPACE_CONFIG` when it initialises.
    """
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 when run directly)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE."""
    return Ranks(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def init_distributed(ranks: Ranks, device: torch.device) -> None:
    """Join the process group torchrun set up (NCCL on GPU, gloo on CPU); nothing for one process."""
    if ranks.world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=ranks.rank, world_size=ranks.world_size)


def close_distributed() -> None:
    """Leave the process group, if any."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device_description(device: torch.device) -> str:
    """A human name for logs and tags ('NVIDIA H100 80GB HBM3', 'cpu (2 threads)')."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"

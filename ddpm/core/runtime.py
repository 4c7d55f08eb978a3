"""Where and how the computation runs: device choice, precision, distributed ranks.

Every choice is explicit and checked: asking for CUDA on a machine without it, or fp16 on the CPU, is an
error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass

import torch

from ddpm.config import DeviceName, Precision

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# glibc's mallopt() parameter numbers (<malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


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
    # the call imports the inductor compiler to set its flag too (1.5-2.7 s of every stage's start-up); off
    # is torch's default (and inductor's, unless TORCHINDUCTOR_DETERMINISTIC=1), so it is skipped when the
    # process is already in the requested state
    if deterministic or torch.are_deterministic_algorithms_enabled() or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def configure_cpu_allocator(device: torch.device) -> bool:
    """Keep freed tensor memory in the process on a Linux/glibc CPU run; returns whether it was applied.

    PyTorch's CPU allocator is plain malloc, and every step frees and re-allocates the same activations.
    glibc's defaults hand that memory back to the kernel: blocks above the mmap threshold (at most 32 MiB)
    are munmap()ped when freed, and the top of the heap is brk()-trimmed once more than the trim threshold
    is free there. The next step faults every page in again and the kernel zeroes it (measured on the
    quickstart: ~14,000 minor faults per training step, ~500,000 per guided sampling evaluation of
    500 images). Two documented mallopt() settings stop that: M_MMAP_MAX=0 (large blocks come from the
    heap too, where freed memory is reused) and M_TRIM_THRESHOLD=-1 (never trim). Resident memory then
    stays at the run's peak instead of oscillating up to it every step.

    Only for the CPU: on CUDA the tensors live in PyTorch's caching allocator and the host side is small,
    so the process keeps glibc's defaults. A no-op elsewhere (macOS, Windows, musl). Explicit, never at import:
    it changes the whole process's allocator (train, sample and bench call it once the device is known).
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: mallopt's parameter numbers are glibc's
        return False
    # mallopt returns 1 on success; both settings apply to every arena from the next allocation / free() on
    mmap_off = libc.mallopt(_M_MMAP_MAX, 0)
    trim_off = libc.mallopt(_M_TRIM_THRESHOLD, -1)
    return bool(mmap_off and trim_off)


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

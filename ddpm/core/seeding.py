"""Seeding and RNG state capture, so that a run is a pure function of its seed and resumes exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def rank_seed(seed: int, rank: int) -> int:
    """The global-RNG seed of distributed rank `rank` >= 1 (dropout masks must differ between ranks).

    Mixed from (seed, rank) by NumPy's SeedSequence (well-separated streams, as EDM seeds each rank); 63 bits
    fit `torch.manual_seed`. Rank 0 keeps `seed` itself, so one process draws what it always drew.
    """
    if rank == 0:
        return seed
    mixed = np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint32)
    return (int(mixed[0]) << 31) ^ int(mixed[1])


def rng_state() -> dict[str, Any]:
    """Every global RNG state as plain data (loadable with `torch.load(weights_only=True)`)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


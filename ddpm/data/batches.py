"""Training batches: a seeded, resumable, rank-sharded stream of (image, label) batches.

The data order is a pure function of (seed, epoch, position): epoch `e` visits the training set in
the order of a permutation drawn from a CPU `torch.Generator` seeded with (seed, e), and the
horizontal-flip decision of each slot of that permutation comes from the same generator. Generating
both on the CPU makes them identical on every device and every rank. A global batch is the next
`batch_size` slots of the permutation; rank r of `world_size` takes the r-th disjoint shard of it.
The incomplete tail of an epoch is dropped, so every global batch is full.

Two implementations produce identical batches:
- `DeviceBatches` keeps the whole uint8 dataset on the training device and gathers, converts and
  flips there: no worker processes, no host-device copies per step, no host syncs.
- `LoaderBatches` keeps the dataset in host memory and gathers in DataLoader workers (pinned memory
  on CUDA) for datasets that do not fit on the device.
`make_batches` picks one by `cfg.train.data_on_device` (an explicit setting, never inferred).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ddpm.core.images import to_model_space
from ddpm.errors import UserError

if TYPE_CHECKING:  # imported for annotations only: keeps this module free of the data-preparation code
    from ddpm.config import Config
    from ddpm.data.prepared import PreparedData


def epoch_order(seed: int, epoch: int, n: int, hflip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The visiting order and flip mask of one epoch, on the CPU: `(perm int64 (n,), flip bool (n,))`.

    `flip[i]` belongs to slot i of the permutation (not to image `perm[i]`), so an image is flipped in
    some epochs and not in others. With `hflip` false the mask is all false.
    """
    # SeedSequence mixes (seed, epoch) into well-separated streams; 63 bits fit manual_seed's range.
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator(device="cpu").manual_seed((int(mixed[0]) << 31) ^ int(mixed[1]))
    perm = torch.randperm(n, generator=gen)  # (n,)
    flip = torch.rand(n, generator=gen) < 0.5  # (n,) drawn even when unused, so hflip never shifts the stream
    return perm, flip & hflip


def to_model_input(images_u8: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float32 in [-1, 1], mirrored left-right where `flip` (B,) is true."""
    x = to_model_space(images_u8)  # (B, 3, H, W), bit-identical on every device
    return torch.where(flip[:, None, None, None], x.flip(-1), x)  # (B, 3, H, W); no host sync


class _Cursor:
    """Where a stream is: (epoch, position), with `position` the first unused slot of the epoch."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:  # the trainer names the params (train.batch_size, grad_accum) before this
            raise ValueError(f"a global batch of {batch_size} does not split evenly over {world_size} ranks")
        if batch_size > n:
            raise UserError(
                f"train.batch_size={batch_size} is larger than the {n} training images; "
                "lower train.batch_size or prepare more data"
            )
        self.n, self.global_batch, self.rank, self.world_size = n, batch_size, rank, world_size
        self.local_batch = batch_size // world_size
        self.epoch, self.position = 0, 0

    def copy(self) -> _Cursor:
        """An independent cursor at the same place."""
        twin = _Cursor(self.n, self.global_batch, self.rank, self.world_size)
        twin.epoch, twin.position = self.epoch, self.position
        return twin

    def take(self) -> tuple[int, int, int]:
        """Claim the next global batch: `(epoch, start, stop)` of this rank's shard, and advance."""
        if self.position + self.global_batch > self.n:  # tail too short for a full batch: next epoch
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.local_batch
        self.position += self.global_batch
        return self.epoch, start, start + self.local_batch

    def state_dict(self) -> dict[str, int]:
        """The resumable state: `{"epoch", "position"}`."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where `state_dict()` was taken."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.n:
            raise UserError(
                f"batch stream state epoch={epoch}, position={position} does not fit a dataset of {self.n} "
                "images; the checkpoint was made with other data: re-prepare that data or train from scratch"
            )
        self.epoch, self.position = epoch, position


def _check_data(images_u8: torch.Tensor, labels: torch.Tensor) -> None:
    """Programming errors in what the trainer hands over (not user-fixable)."""
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images_u8.dtype} {tuple(images_u8.shape)}")
    if labels.shape != (images_u8.shape[0],):
        raise ValueError(f"labels must be ({images_u8.shape[0]},), got {tuple(labels.shape)}")


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to `device` without blocking the host (pinned staging on CUDA)."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class _BatchStream:
    """State handling shared by both implementations; subclasses provide `next()`."""

    def __init__(self, n: int, batch_size: int, seed: int, hflip: bool, rank: int, world_size: int):
        self._cursor = _Cursor(n, batch_size, rank, world_size)
        self.seed, self.hflip = seed, hflip

    @property
    def batch_size(self) -> int:
        """This rank's batch size: the global batch size // world_size."""
        return self._cursor.local_batch

    def state_dict(self) -> dict[str, int]:
        """`{"epoch", "position"}`: enough to resume the exact stream (given the same data and seed)."""
        return self._cursor.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next batch is the one an uninterrupted stream would have produced."""
        self._cursor.load_state_dict(state)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch: `(x float32 (B, 3, H, W) in [-1, 1], y int64 (B,))` on the training device."""
        raise NotImplementedError

    def close(self) -> None:
        """Release worker processes, if any (call when training ends; the stream can restart after)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next()


class DeviceBatches(_BatchStream):
    """Batches gathered from a uint8 dataset that lives on the training device (the fast path)."""

    def __init__(
        self,
        images_u8: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
        hflip: bool,
        rank: int = 0,
        world_size: int = 1,
    ):
        """`images_u8` (N, 3, H, W) uint8 and `labels` (N,) int64, both already on the training device;
        `batch_size` is the global batch, of which this rank gets `batch_size // world_size`."""
        _check_data(images_u8, labels)
        super().__init__(images_u8.shape[0], batch_size, seed, hflip, rank, world_size)
        self.images, self.labels = images_u8, labels
        self._cached: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (epoch, perm, flip) on the device

    def _order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's permutation and flip mask on the device, copied once per epoch."""
        if self._cached is None or self._cached[0] != epoch:
            perm, flip = epoch_order(self.seed, epoch, self.images.shape[0], self.hflip)
            device = self.images.device
            self._cached = (epoch, _to_device(perm, device), _to_device(flip, device))  # (N,), (N,)
        return self._cached[1], self._cached[2]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch: `(x float32 (B, 3, H, W) in [-1, 1], y int64 (B,))` on the data's device."""
        epoch, start, stop = self._cursor.take()
        perm, flip = self._order(epoch)
        idx = perm[start:stop]  # (B,)
        x = to_model_input(self.images[idx], flip[start:stop])  # (B, 3, H, W)
        return x, self.labels[idx]  # (B, 3, H, W), (B,)


class _ShardOrder(Sampler):
    """An endless stream of this rank's `(indices (B,), flips (B,))` shards, from a given (epoch, position).

    It is only ever iterated in the main process (it is the DataLoader's sampler), so the data order
    never depends on the number of workers.
    """

    def __init__(self, cursor: _Cursor, seed: int, hflip: bool):
        self.cursor, self.seed, self.hflip = cursor, seed, hflip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cached = None
        while True:
            epoch, start, stop = self.cursor.take()
            if cached is None or cached[0] != epoch:
                cached = (epoch, *epoch_order(self.seed, epoch, self.cursor.n, self.hflip))
            yield cached[1][start:stop], cached[2][start:stop]  # (B,), (B,)


class _HostImages(Dataset):
    """Gathers a whole shard per call: key `(indices (B,), flips (B,))` -> `(uint8 (B, 3, H, W), (B,), (B,))`."""

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images_u8, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        idx, flip = key
        return self.images[idx], self.labels[idx], flip  # (B, 3, H, W), (B,), (B,)


class LoaderBatches(_BatchStream):
    """The same stream as `DeviceBatches`, gathered from host memory by DataLoader workers."""

    def __init__(
        self,
        images_u8: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
        hflip: bool,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        num_workers: int = 2,
    ):
        """`images_u8` (N, 3, H, W) uint8 and `labels` (N,) on the CPU; batches are delivered on `device`."""
        _check_data(images_u8, labels)
        super().__init__(images_u8.shape[0], batch_size, seed, hflip, rank, world_size)
        self.images, self.labels = images_u8.cpu(), labels.cpu()
        self.device, self.num_workers = torch.device(device), num_workers
        self._shards: Iterator[tuple[torch.Tensor, ...]] | None = None

    def _start(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """A DataLoader iterator continuing from the current cursor.

        The sampler owns a copy of the cursor because DataLoader prefetches ahead of what `next()`
        has consumed; `self._cursor` advances only as batches are actually taken.
        """
        loader = DataLoader(
            _HostImages(self.images, self.labels),
            sampler=_ShardOrder(self._cursor.copy(), self.seed, self.hflip),
            batch_size=None,  # each sampled key is already a whole shard
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
        )
        return iter(loader)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next batch is the one an uninterrupted stream would have produced."""
        super().load_state_dict(state)
        self.close()  # the prefetched batches belong to the old position

    def close(self) -> None:
        """Shut the DataLoader's workers down now; a later `next()` starts new ones.

        Dropping the last reference runs the iterator's own shutdown at once (CPython refcounting);
        an endless loader left alive until interpreter exit can instead print a spurious
        ConnectionResetError from its pin-memory thread.
        """
        self._shards = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch: `(x float32 (B, 3, H, W) in [-1, 1], y int64 (B,))` on `device`."""
        if self._shards is None:
            self._shards = self._start()
        images, labels, flip = next(self._shards)
        self._cursor.take()  # keep the consumed position in step with the loader's sampler
        images = images.to(self.device, non_blocking=True)  # (B, 3, H, W) uint8
        flip = flip.to(self.device, non_blocking=True)  # (B,)
        return to_model_input(images, flip), labels.to(self.device, non_blocking=True)


def make_batches(
    data: PreparedData,
    cfg: Config,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
) -> DeviceBatches | LoaderBatches:
    """The training stream for `data`, chosen by `cfg.train.data_on_device`.

    `batch_size` is the global batch across all ranks (default `cfg.train.batch_size`; a trainer that
    splits a step into `grad_accum` micro-batches passes the micro-batch size). The order is seeded
    by `cfg.seed` and flips follow `cfg.data.hflip`.
    """
    size = cfg.train.batch_size if batch_size is None else batch_size
    common = {"batch_size": size, "seed": cfg.seed, "hflip": cfg.data.hflip, "rank": rank, "world_size": world_size}
    if cfg.train.data_on_device:
        device = torch.device(device)
        return DeviceBatches(data.train_images.to(device), data.train_labels.to(device), **common)
    return LoaderBatches(
        data.train_images, data.train_labels, device=device, num_workers=cfg.train.num_workers, **common
    )

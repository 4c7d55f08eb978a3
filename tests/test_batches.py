"""The training batch streams: permutations, seeding, exact resume, rank shards, flips, Device == Loader."""

import numpy as np
import pytest
import torch

from ddpm.config import Config
from ddpm.data.batches import DeviceBatches, LoaderBatches, epoch_order, make_batches, to_model_input
from ddpm.data.prepared import PreparedData
from ddpm.errors import UserError


def _data(n: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose columns hold 0, 85, 170, 255 (a flip reverses them); label i identifies image i."""
    row = torch.linspace(0, 255, size).round().to(torch.uint8)  # (W,)
    images = row.expand(n, 3, size, size).clone()  # (N, 3, H, W)
    return images, torch.arange(n)


def _take(stream, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [stream.next() for _ in range(k)]


def _device(n=20, batch=6, seed=0, hflip=False, rank=0, world=1) -> DeviceBatches:
    images, labels = _data(n)
    return DeviceBatches(images, labels, batch, seed, hflip, rank=rank, world_size=world)


def test_every_epoch_is_a_permutation_and_the_tail_is_dropped():
    stream = _device(n=20, batch=6)  # 3 full batches per epoch; 2 images left over each epoch
    for _ in range(3):  # three epochs
        ys = torch.cat([y for _, y in _take(stream, 3)])  # (18,)
        assert len(set(ys.tolist())) == 18  # no image twice within an epoch
    full = _device(n=24, batch=6)
    assert sorted(torch.cat([y for _, y in _take(full, 4)]).tolist()) == list(range(24))


def test_order_is_seeded_and_differs_between_epochs_and_seeds():
    a = [y for _, y in _take(_device(seed=1), 6)]
    b = [y for _, y in _take(_device(seed=1), 6)]
    c = [y for _, y in _take(_device(seed=2), 6)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    assert not torch.equal(torch.cat(a[:3]), torch.cat(a[3:]))  # epoch 1 is a new order


def test_order_is_a_pure_function_of_seed_and_epoch():
    perm, flip = epoch_order(5, 3, 50, hflip=True)
    perm2, flip2 = epoch_order(5, 3, 50, hflip=True)
    assert torch.equal(perm, perm2) and torch.equal(flip, flip2)
    assert sorted(perm.tolist()) == list(range(50))
    perm_noflip, flip_none = epoch_order(5, 3, 50, hflip=False)
    assert torch.equal(perm, perm_noflip) and not flip_none.any()  # hflip never changes the order


def test_resume_from_state_dict_continues_the_uninterrupted_stream():
    whole = _take(_device(seed=3, hflip=True), 8)  # crosses two epoch boundaries
    first = _device(seed=3, hflip=True)
    _take(first, 4)
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 6}
    resumed = _device(seed=3, hflip=True)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(whole[4:], _take(resumed, 4)):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_rank_shards_are_disjoint_and_union_is_the_global_batch():
    single = _take(_device(n=40, batch=8, seed=7, hflip=True), 7)
    rank0 = _take(_device(n=40, batch=8, seed=7, hflip=True, rank=0, world=2), 7)
    rank1 = _take(_device(n=40, batch=8, seed=7, hflip=True, rank=1, world=2), 7)
    for (x, y), (x0, y0), (x1, y1) in zip(single, rank0, rank1):
        assert len(y0) == len(y1) == 4
        assert not set(y0.tolist()) & set(y1.tolist())
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)


def test_values_are_scaled_to_minus_one_one_and_flips_only_with_hflip():
    x, _ = _device(n=1000, batch=1000, hflip=False).next()
    unflipped = x[0, 0, 0]  # (W,) the four columns 0, 85, 170, 255, scaled
    torch.testing.assert_close(unflipped, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]), rtol=0, atol=1e-6)
    assert unflipped[0] == -1.0 and unflipped[-1] == 1.0  # the ends exactly
    assert x.dtype == torch.float32 and torch.equal(x, unflipped.expand_as(x))
    x, _ = _device(n=1000, batch=1000, hflip=True).next()
    flipped = (x[:, :, :, 0] == 1.0).all(dim=(1, 2))  # (B,) first column holds the former last column
    assert torch.equal(x[flipped], unflipped.flip(0).expand_as(x[flipped]))
    assert torch.equal(x[~flipped], unflipped.expand_as(x[~flipped]))
    assert 0.4 < flipped.float().mean() < 0.6


def test_to_model_input_flips_only_marked_images():
    images = torch.arange(2 * 3 * 2 * 3, dtype=torch.uint8).reshape(2, 3, 2, 3)  # (B, C, H, W)
    x = to_model_input(images, torch.tensor([True, False]))
    ref = to_model_input(images, torch.tensor([False, False]))
    torch.testing.assert_close(ref, images.float() / 127.5 - 1, rtol=0, atol=1e-6)
    assert torch.equal(x[0], ref[0].flip(-1)) and torch.equal(x[1], ref[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_equal_device_batches_and_resume_identically(workers):
    images, labels = _data(30)
    device = DeviceBatches(images, labels, 8, seed=11, hflip=True)
    loader = LoaderBatches(images, labels, 8, seed=11, hflip=True, num_workers=workers)
    for (x, y), (x2, y2) in zip(_take(device, 9), _take(loader, 9)):  # three epochs of 3 batches
        assert torch.equal(x, x2) and torch.equal(y, y2)
    state = loader.state_dict()
    later = _take(device, 2)
    resumed = LoaderBatches(images, labels, 8, seed=11, hflip=True, num_workers=workers)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(later, _take(resumed, 2)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert resumed.state_dict() == device.state_dict()
    resumed.close()  # workers go; the stream restarts where it stands
    x, y = resumed.next()
    x2, y2 = device.next()
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_loader_rank_shard_matches_device_rank_shard():
    images, labels = _data(30)
    dev = _take(DeviceBatches(images, labels, 8, 2, True, rank=1, world_size=2), 5)
    load = _take(LoaderBatches(images, labels, 8, 2, True, rank=1, world_size=2, num_workers=0), 5)
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(dev, load))


def test_bad_batch_sizes():
    images, labels = _data(10)
    with pytest.raises(ValueError, match="batch of 6 does not split evenly over 4 ranks"):
        DeviceBatches(images, labels, 6, 0, False, rank=0, world_size=4)
    with pytest.raises(UserError, match="larger than the 10 training images"):
        DeviceBatches(images, labels, 16, 0, False)


def test_a_state_from_other_data_is_rejected():
    stream = _device(n=20)
    with pytest.raises(UserError, match="other data"):
        stream.load_state_dict({"epoch": 0, "position": 500})


@pytest.mark.parametrize(("on_device", "kind"), [(True, DeviceBatches), (False, LoaderBatches)])
def test_make_batches_follows_data_on_device(on_device, kind):
    images, labels = _data(12)
    data = PreparedData(images, labels, images[:2], labels[:2], ["a"] * 12, "hash")
    cfg = Config.from_dict(
        {"seed": 4, "data": {"hflip": True}, "train": {"batch_size": 4, "data_on_device": on_device, "num_workers": 0}}
    )
    stream = make_batches(data, cfg, "cpu", rank=1, world_size=2)
    assert isinstance(stream, kind) and stream.batch_size == 2
    x, y = stream.next()
    perm, flip = epoch_order(4, 0, 12, hflip=True)
    assert torch.equal(y, perm[2:4])  # rank 1's half of the first global batch
    assert torch.equal(x, to_model_input(images[perm[2:4]], flip[2:4]))
    assert np.isclose(x.abs().max().item(), 1.0)

"""EMA: the update formula (with and without warm-up), buffers, wrappers (compile, DDP) and state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddpm.core.ema import EMA, ema_decay, unwrap


class Toy(nn.Module):
    """A linear layer plus a BatchNorm, so there are parameters and running-statistics buffers."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


class Wrapper(nn.Module):
    """DDP / DataParallel-style wrapper: the real model under `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_decay_schedule():
    assert ema_decay(0.9999, 0, warmup=True) == pytest.approx(0.1)
    assert ema_decay(0.9999, 10, warmup=True) == pytest.approx(11 / 20)
    assert ema_decay(0.9, 10**6, warmup=True) == 0.9  # capped at the configured decay
    assert ema_decay(0.9999, 0, warmup=False) == 0.9999


@pytest.mark.parametrize("warmup", [False, True])
def test_constant_target_decays_geometrically(warmup: bool):
    """With the model held at p, e_k = p + (e_0 - p) * prod_{n<k} d_n."""
    model = Toy()
    fill(model, 1.0)
    ema = EMA(model, decay=0.9, warmup=warmup)
    fill(model, 3.0)
    steps = 25
    for _ in range(steps):
        ema.update(model)
    factor = math.prod(min(0.9, (1 + n) / (10 + n)) if warmup else 0.9 for n in range(steps))
    expected = 3.0 + (1.0 - 3.0) * factor
    for p in ema.model.parameters():
        torch.testing.assert_close(p, torch.full_like(p, expected), rtol=0, atol=1e-6)
    assert ema.num_updates == steps


def test_changing_target_follows_recurrence():
    model = Toy()
    fill(model, 0.0)
    ema = EMA(model, decay=0.5, warmup=True)
    expected = 0.0
    for n, value in enumerate([1.0, -2.0, 4.0, 0.5]):
        fill(model, value)
        ema.update(model)
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
    assert ema.model.lin.weight[0, 0].item() == pytest.approx(expected, abs=1e-6)


def test_buffers_are_copied_not_averaged():
    model = Toy().train()
    ema = EMA(model, decay=0.99, warmup=False)
    model(torch.randn(8, 3) * 5 + 2)  # moves the BatchNorm running statistics
    ema.update(model)
    torch.testing.assert_close(ema.model.bn.running_mean, model.bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(ema.model.bn.running_var, model.bn.running_var, rtol=0, atol=0)
    assert ema.model.bn.num_batches_tracked.item() == 1


def test_ema_is_a_frozen_independent_copy():
    model = Toy().train()
    ema = EMA(model)
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    fill(model, 7.0)
    assert all((p != 7.0).any() for p in ema.model.parameters())


def test_unwrap_strips_nested_wrappers_only():
    model = Toy()
    assert unwrap(Wrapper(Wrapper(model))) is model
    assert unwrap(torch.compile(Wrapper(model), backend="eager")) is model

    class HasModuleChild(nn.Module):  # a real network with a child that happens to be called "module"
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(1, 1)
            self.head = nn.Linear(1, 1)

    plain = HasModuleChild()
    assert unwrap(plain) is plain


def test_wrappers_do_not_change_keys_or_updates():
    plain, wrapped = Toy(), Toy()
    wrapped.load_state_dict(plain.state_dict())
    ema_plain = EMA(plain, decay=0.5)
    ema_wrapped = EMA(Wrapper(wrapped), decay=0.5)
    assert ema_wrapped.state_dict()["weights"].keys() == plain.state_dict().keys()
    fill(plain, 2.0)
    fill(wrapped, 2.0)
    ema_plain.update(plain)
    ema_wrapped.update(Wrapper(wrapped))
    for a, b in zip(ema_plain.model.parameters(), ema_wrapped.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ema_keeps_updating_under_compile():
    """Train the same model eagerly and compiled: the EMAs must agree step for step (no frozen copy)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = Toy()
    compiled_model = Toy()
    compiled_model.load_state_dict(eager_model.state_dict())
    compiled = torch.compile(compiled_model, backend="eager")
    ema_eager, ema_compiled = EMA(eager_model, decay=0.8), EMA(compiled, decay=0.8)
    assert ema_compiled.state_dict()["weights"].keys() == eager_model.state_dict().keys()
    opt_e = torch.optim.SGD(eager_model.parameters(), lr=0.5)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.5)
    start = ema_eager.model.lin.weight.clone()
    for step in range(4):
        x = torch.randn(6, 3, generator=torch.Generator().manual_seed(step))
        for net, opt, ema in ((eager_model, opt_e, ema_eager), (compiled, opt_c, ema_compiled)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
            ema.update(net)
    assert not torch.allclose(ema_compiled.model.lin.weight, start)
    for a, b in zip(ema_eager.model.state_dict().values(), ema_compiled.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_real_ddp_wrapper(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = Toy()
        ddp = nn.parallel.DistributedDataParallel(model)
        assert unwrap(ddp) is model
        ema = EMA(ddp, decay=0.5)
        assert list(ema.state_dict()["weights"]) == list(model.state_dict())
        fill(model, 1.0)
        ema.update(ddp)
        assert ema.num_updates == 1
    finally:
        dist.destroy_process_group()


def test_state_dict_round_trip_resumes_the_warmup():
    model = Toy()
    ema = EMA(model, decay=0.9)
    fill(model, 1.0)
    for _ in range(3):
        ema.update(model)
    state = ema.state_dict()
    assert state["num_updates"] == 3

    restored = EMA(Toy(), decay=0.9)
    restored.load_state_dict(state)
    assert restored.num_updates == 3
    fill(model, 5.0)
    ema.update(model)
    restored.update(model)  # same (4th) warm-up decay, so the same result
    for a, b in zip(ema.model.state_dict().values(), restored.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_update_from_another_architecture_is_an_error():
    ema = EMA(Toy())
    with pytest.raises(ValueError, match="differ"):
        ema.update(nn.Linear(3, 2))

"""`train.channels_last: auto` pairs channels_last with torch.compile (eager channels_last costs transposes
around every GroupNorm on CUDA); true/false are kept as given, in training and in the sampling workflows."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_params

from ddpm.config import Config
from ddpm.data.datasets import prepare
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.train import train
from ddpm.pipeline.trained_model import load_model

NO_TRACKING = {"mlflow": False, "tensorboard": False, "system_metrics": False}


def _conv_weight(model: torch.nn.Module) -> torch.Tensor:
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the module
    return next(p for p in model.parameters() if p.dim() == 4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory-format")
    cfg = Config.from_dict(tiny_params(train={"steps": 1, "sample_every": 0}, tracking=NO_TRACKING))
    prepare(cfg, root / "data/prepared")
    train(cfg, Layout.under(root))
    return Layout.under(root).ema


@pytest.mark.parametrize(("setting", "compiled", "want"), [
    ("auto", False, False), ("auto", True, True), (True, False, True), (False, True, False)])
def test_the_sampled_network_is_channels_last_as_the_param_and_compile_say(checkpoint, setting, compiled, want):
    """Catches "auto" read as true (every eager CUDA run paying the transposes) or as false (compiled runs
    losing the channels_last kernels), and an explicit true/false overridden by the rule."""
    cfg = Config.from_dict(tiny_params(train={"channels_last": setting}))
    weight = _conv_weight(load_model(checkpoint, cfg, compile=compiled).model)
    assert weight.is_contiguous(memory_format=torch.channels_last) == want
    assert weight.is_contiguous() == (not want)


def test_training_follows_the_same_rule(tmp_path, monkeypatch):
    """The training network: eager with "auto" trains NCHW (what the quickstart's explicit false does)."""
    import ddpm.pipeline.train as train_mod

    seen = []
    real = train_mod.EMA
    monkeypatch.setattr(train_mod, "EMA", lambda model, **kw: seen.append(_conv_weight(model)) or real(model, **kw))
    for setting in ("auto", True):
        cfg = Config.from_dict(tiny_params(train={"steps": 1, "sample_every": 0, "channels_last": setting},
                                           tracking=NO_TRACKING))
        prepare(cfg, tmp_path / str(setting) / "data/prepared")
        train(cfg, Layout.under(tmp_path / str(setting)))
    assert [w.is_contiguous(memory_format=torch.channels_last) for w in seen] == [False, True]

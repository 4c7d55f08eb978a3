"""`python -m ddpm bench`: the diffusers twin matches our network, the figures are consistent, bad input fails."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_params

import ddpm.pipeline.bench as bench_mod
from ddpm.cli import main
from ddpm.config import Config, ModelConfig
from ddpm.core.unet import UNet, forward_flops
from ddpm.pipeline.bench import bench_config, diffusers_unet, format_table, run_bench

pytest.importorskip("diffusers", reason="the bench extra (diffusers) is part of the test install")


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    "model",
    [
        {"num_classes": 10},  # the DDPM CIFAR-10 reference network
        {"channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": [8],
         "num_classes": 10},
        {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 2, "attention_resolutions": [16],
         "num_groups": 8, "num_classes": 0},
    ],
)
def test_diffusers_twin_has_our_parameter_count(model):
    """Same channels, blocks, attention placement and class embedding => the same number of parameters."""
    cfg = ModelConfig(**model)
    size = 32 if model.get("channels", 128) == 128 else 16
    ours, theirs = _count(UNet(cfg, size)), _count(diffusers_unet(cfg, size))
    assert ours == theirs
    if model == {"num_classes": 10}:
        assert ours == 35_751_939  # DDPM's 35.7M plus the 11 x 512 class embedding


def test_diffusers_twin_follows_the_class_label():
    """The twin really is class-conditional (a different label changes its output)."""
    cfg = ModelConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8], num_groups=8,
                      num_classes=10)
    net = diffusers_unet(cfg, 16).eval()
    for p in net.parameters():  # random weights everywhere, so no zero-initialised layer can hide the label
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 10])
    with torch.no_grad():
        a = net(x, t, torch.tensor([0, 0]))
        b = net(x, t, torch.tensor([3, 3]))
    assert a.shape == x.shape
    assert not torch.allclose(a, b)


# seconds a fake clock charges for one timed call of (network, what, batch size)
FAKE_SECONDS = {("ours", "train_steps", 2): [1.0, 4.0, 1.0], ("diffusers", "train_steps", 2): [2.0, 2.0, 2.0],
                ("ours", "train_steps", 4): [1.5, 1.5, 1.5], ("diffusers", "train_steps", 4): [2.0, 2.0, 2.0],
                ("ours", "sample_nfe", 2): [0.5] * 3, ("diffusers", "sample_nfe", 2): [0.25] * 3,
                ("ours", "sample_nfe", 4): [0.5] * 3, ("diffusers", "sample_nfe", 4): [0.25] * 3}


def test_run_bench_reports_images_per_s_medians_and_the_least_favourable_ratio(monkeypatch):
    """With a fake clock the figures are known: images/s = batch x steps / seconds, the median of the rounds,
    the ratio ours / diffusers, and the headline the smallest ratio over the settings."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    calls = {}

    def fake_time(fn, n, device):
        key = (fn.__self__.name, fn.__name__, len(fn.__self__.batches.x))
        i = calls[key] = calls.get(key, -1) + 1
        return FAKE_SECONDS[key][i % 3]

    monkeypatch.setattr(bench_mod, "_time", fake_time)
    cfg = Config.from_dict(tiny_params())
    result = run_bench(cfg, batches=[2, 4], steps=5, warmup=1, precisions=["fp32"], compiles=[False],
                       channels_last=[False], vs_diffusers=True, device=torch.device("cpu"), rounds=3)
    assert [r["batch_size"] for r in result["runs"]] == [2, 4]
    small, large = result["runs"]
    assert small["train_images_per_s_ours"] == 2 * 5 / 1.0  # the median round, not the slow 4 s one
    assert small["train_images_per_s_diffusers"] == 2 * 5 / 2.0
    assert small["sample_images_per_s_per_nfe_diffusers"] == 2 * 5 / 0.25
    assert (small["train_ratio_vs_diffusers"], large["train_ratio_vs_diffusers"]) == (2.0, pytest.approx(4 / 3))
    assert result["train_ratio_vs_diffusers"] == pytest.approx(4 / 3)  # the least favourable setting
    assert result["forward_gflop_per_image"] == pytest.approx(forward_flops(cfg.model, 16) / 1e9)
    assert result["params_ours"] == result["params_diffusers"]
    # no data-sheet peak for a CPU: the MFU is against its own matmul rate, measured (for real) and named so
    assert result["peak_source"] == {"fp32": "matmul"} and result["peak_flops"]["fp32"] > 0
    # timed under training's backend settings (cuDNN autotuning on, not left at PyTorch's default)
    assert torch.backends.cudnn.benchmark is True
    table = format_table(result)
    assert table.count("\n") == 1 + len(result["runs"]) + len(result["peak_flops"])  # + one line per peak


def test_bench_config_reference_is_the_ddpm_network():
    cfg = bench_config(Config.from_dict(tiny_params()), reference=True)
    assert cfg.data.image_size == 32
    assert cfg.model == ModelConfig(num_classes=10)
    assert forward_flops(cfg.model, 32) / 1e9 == pytest.approx(12.44, abs=0.01)


def test_bench_cli_prints_a_table_then_one_json_line(repo, capsys):
    code = main(["bench", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                 "--precision", "fp32", "--channels-last", "off", "--rounds", "2"])
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert code == 0
    # progress on stderr: the setting, then network, phase and round; 1 network x 2 phases x (1 warm-up + 2 x 1)
    assert "setting 1/1: batch 2 fp32 eager NCHW" in captured.err
    assert "ours sample round 2/2" in captured.err and "6/6" in captured.err
    figures = json.loads(out[-1])
    assert figures["runs"][0]["batch_size"] == 2 and figures["runs"][0]["channels_last"] is False
    assert out[0].startswith("device: cpu")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--batch-size", "0"], "positive integers"),
        (["--batch-size", "64,x"], "positive integers"),
        (["--compile-mode", "fastest"], "invalid choice"),
        (["--rounds", "0"], "positive integer"),
    ],
)
def test_bench_cli_rejects_bad_options(repo, capsys, argv, fragment):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cpu", *argv])
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_bench_cli_rejects_a_precision_the_device_lacks(repo, capsys):
    assert main(["bench", "--device", "cpu", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "fp16" in err and "cpu" in err


def test_cpu_mfu_is_against_the_measured_matmul_rate_and_below_one():
    """A real (untimed-by-fakes) bench of the tiny network: its MFU against the CPU's measured fp32 matmul rate
    lies in (0, 1]. Catches a peak counted in multiply-adds instead of FLOPs, a peak timed on a matrix too
    small to reach the rate, or a missing MFU on the CPU (each moves the figure out of range or drops it)."""
    cfg = Config.from_dict(tiny_params())
    result = run_bench(cfg, batches=[8], steps=2, warmup=1, precisions=["fp32"], compiles=[False],
                       channels_last=[False], vs_diffusers=False, device=torch.device("cpu"), rounds=1)
    (run,) = result["runs"]
    assert 0.0 < run["mfu_ours"] <= 1.0  # the tiny network reaches a few per cent: load cannot push it past 1

"""`python -m ddpm bench`: training and sampling throughput, peak memory and MFU, optionally A/B against
diffusers' `UNet2DModel` at the matching configuration, timed in the same process and the same loop.

Both networks are trained through the SAME step (`train_step.train_step`: L_simple, fused AdamW, grad
clipping, the on-device NaN guard), on a fixed synthetic batch held on the device, so the comparison
measures the networks. Measurements alternate (ours, theirs, ours, ...) and report the median round.
Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ddpm.config import CompileMode, Config, ModelConfig
from ddpm.core.diffusion import GaussianDiffusion
from ddpm.core.runtime import (
    autocast,
    configure_backends,
    configure_cpu_allocator,
    device_description,
)
from ddpm.core.train_step import StepContext, StepStats, train_step
from ddpm.core.unet import UNet, forward_flops
from ddpm.errors import UserError
from ddpm.pipeline.devices import resolve_device

# dense peak FLOP/s per precision (fp32 runs use TF32 tensor cores), from the vendors' data sheets
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
}


class _DiffusersAdapter(nn.Module):
    """diffusers' UNet2DModel behind our `model(x, t, y)` interface."""

    def __init__(self, unet: nn.Module, image_size: int):
        super().__init__()
        self.unet, self.image_size, self.in_channels = unet, image_size, 3

    def forward(self, x, t, y=None):
        return self.unet(x, t, class_labels=y).sample


def diffusers_unet(cfg: ModelConfig, image_size: int) -> nn.Module:
    """diffusers' UNet2DModel matching our U-Net: channels, blocks, attention resolutions, class embedding."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise UserError("--vs diffusers needs the optional bench extra: pip install -e '.[bench]'") from None
    levels = len(cfg.channel_mult)
    attn = [image_size // 2**i in cfg.attention_resolutions for i in range(levels)]
    unet = UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=cfg.num_groups,
        dropout=cfg.dropout,
        attention_head_dim=_head_dim(cfg, attn),
        num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
        flip_sin_to_cos=False,
        freq_shift=0,
    )
    return _DiffusersAdapter(unet, image_size)


def _head_dim(cfg: ModelConfig, attn: list[bool]) -> int:
    """diffusers takes ONE head width for every attention block (ours: `num_heads` heads at every width).

    The narrowest attention width / num_heads gives every block at least one head; where all attention
    widths agree (the reference network: 16x16 and the middle, both 256 channels) the heads match exactly.
    """
    widths = [cfg.channels * m for m, a in zip(cfg.channel_mult, attn, strict=True) if a]
    widths.append(cfg.channels * cfg.channel_mult[-1])  # the middle block's attention
    return min(widths) // cfg.num_heads


class _FixedBatch:
    """A synthetic batch that never changes (the benchmark measures the step, not the data path)."""

    def __init__(self, batch: int, size: int, num_classes: int, device: torch.device, channels_last: bool):
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.rand((batch, 3, size, size), generator=gen) * 2 - 1  # (B, C, H, W)
        self.x = x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.y = torch.randint(0, max(num_classes, 1), (batch,), generator=gen).to(device)  # (B,)

    def next(self):
        return self.x, self.y


@dataclass
class Candidate:
    """One network set up for timing: its training step and its forward pass."""

    name: str
    model: nn.Module
    ctx: StepContext
    batches: _FixedBatch
    stats: StepStats
    progress: tqdm | None = None  # advanced by one per step / network evaluation

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def train_steps(self, n: int) -> None:
        """n training steps in train mode (dropout on), as the training loop runs them."""
        self.model.train()
        for _ in range(n):
            train_step(self.ctx, self.batches, self.stats)
            self._tick()

    @torch.inference_mode()
    def sample_nfe(self, n: int) -> None:
        """n guided network evaluations in eval mode (as `generate` samples): a batch of 2B (cond + uncond)."""
        self.model.eval()
        x, y = self.batches.next()
        x2, y2 = torch.cat([x, x]), torch.cat([y, torch.full_like(y, max(self.ctx.null_label or 0, 0))])
        t = torch.full((len(x2),), 500 % self.ctx.diffusion.num_timesteps, device=x.device)
        for _ in range(n):
            torch.compiler.cudagraph_mark_step_begin()  # each call a new CUDA-graph iteration (reduce-overhead)
            with autocast(self.ctx.precision, x.device):
                self.ctx.model(x2, t, y2 if self.ctx.null_label is not None else None)
            self._tick()


@dataclass(frozen=True)
class Setting:
    """One timed configuration: batch size, autocast precision, compile on/off, memory format."""

    batch: int
    precision: str
    compile: bool
    channels_last: bool


def _candidate(name: str, net: nn.Module, cfg: Config, s: Setting, compile_mode: CompileMode,
               device: torch.device) -> Candidate:
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    net = net.to(device).to(memory_format=fmt)
    diffusion = GaussianDiffusion.from_config(cfg).to(device)
    trained = torch.compile(net, mode=compile_mode) if s.compile else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    null = cfg.model.num_classes if cfg.model.num_classes else None
    scaler = torch.amp.GradScaler(device.type) if s.precision == "fp16" else None
    # the run's own step settings (p_uncond, grad clipping) at this setting's precision, one micro-batch a step
    tc = cfg.train.model_copy(update={"precision": s.precision, "grad_accum": 1})
    ctx = StepContext.from_config(tc, model=trained, diffusion=diffusion, optimizer=opt, scaler=scaler,
                                  generator=torch.Generator(device=device).manual_seed(0), device=device,
                                  null_label=null)
    batches = _FixedBatch(s.batch, cfg.data.image_size, cfg.model.num_classes, device, s.channels_last)
    return Candidate(name, trained, ctx, batches, StepStats(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, n: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn(n)
    _sync(device)
    return time.perf_counter() - t0


def _measure(cands: list[Candidate], steps: int, warmup: int, rounds: int, device: torch.device,
             label: str = "") -> dict:
    """Interleaved rounds (A, B, A, B, ...); median images/s for training and for one guided NFE.

    Progress goes to stderr: which setting, which network and phase, step k of n for the whole setting.
    """
    total = len(cands) * 2 * (warmup + rounds * steps)
    with tqdm(total=total, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        for c in cands:
            c.progress = bar

        def phase(c: Candidate, what: str, r: int | None = None) -> None:
            bar.set_postfix_str(f"{c.name} {what}" + ("" if r is None else f" round {r + 1}/{rounds}"))

        for c in cands:  # warm-up (and compilation) outside the timed rounds
            phase(c, "train warm-up")
            c.train_steps(warmup)
            phase(c, "sample warm-up")
            c.sample_nfe(warmup)
        train = {c.name: [] for c in cands}
        nfe = {c.name: [] for c in cands}
        for r in range(rounds):
            for c in cands:
                batch = len(c.batches.x)
                phase(c, "train", r)
                train[c.name].append(batch * steps / _time(c.train_steps, steps, device))
                phase(c, "sample", r)
                nfe[c.name].append(batch * steps / _time(c.sample_nfe, steps, device))
        for c in cands:
            c.progress = None
    return {c.name: {"train_images_per_s": statistics.median(train[c.name]),
                     "sample_images_per_s_per_nfe": statistics.median(nfe[c.name])} for c in cands}


def _precisions(spec: str, device: torch.device) -> list[str]:
    supported = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    wanted = supported if spec == "all" else [p.strip() for p in spec.split(",")]
    bad = [p for p in wanted if p not in supported]
    if bad:
        raise UserError(f"precision {bad} is not supported on {device.type}; choose from {supported}")
    return wanted


def _peak(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[precision] for key, p in PEAK_FLOPS.items() if key in name), None)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measured_peak(device: torch.device, precision: str, size: int = 2048, rounds: int = 5) -> float:
    """The device's own dense rate at `precision` (FLOP/s, 2 per multiply-add): a size x size matmul, the
    median of `rounds` rounds of about 0.2 s each after a warm-up. A CPU has no data-sheet figure, and its
    rate depends on the vector units (AVX2, AVX-512, AVX512_BF16: bf16 without them is emulated and slow),
    so the bench's MFU on the CPU is against this: how close a setting gets to what the machine can do."""
    gen = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, generator=gen).to(DTYPES[precision]) for _ in range(2))

    def timed(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            torch.mm(a, b)
        _sync(device)
        return time.perf_counter() - t0

    per_call = timed(2) / 2  # also the warm-up
    n = max(1, round(0.2 / max(per_call, 1e-6)))
    return statistics.median(2 * size**3 * n / timed(n) for _ in range(rounds))


def bench_config(cfg: Config, reference: bool) -> Config:
    """params.yaml's network, or the DDPM CIFAR-10 reference network (10 classes, 32x32)."""
    if not reference:
        return cfg
    return cfg.model_copy(update={"model": ModelConfig(num_classes=10),
                                  "data": cfg.data.model_copy(update={"image_size": 32})})


def run_bench(cfg: Config, *, batches: list[int], steps: int, warmup: int, precisions: list[str],
              compiles: list[bool], vs_diffusers: bool, device: torch.device, channels_last: list[bool] = (True,),
              compile_mode: CompileMode = "default", rounds: int = 3) -> dict:
    """Every (batch, precision, compile, memory format) combination: images/s, peak memory, MFU, the ratio to diffusers.

    Runs under the backend settings training uses (`configure_backends`: TF32, cuDNN autotuning), so the
    figures are those a training run gets.
    """
    configure_backends(deterministic=False)
    configure_cpu_allocator(device)  # as training and sampling run on the CPU
    image_size = cfg.data.image_size
    flops = forward_flops(cfg.model, image_size)
    ours_params = sum(p.numel() for p in UNet(cfg.model, image_size).parameters())
    result = {"device": device_description(device), "torch": torch.__version__, "image_size": image_size,
              "compile_mode": compile_mode, "forward_gflop_per_image": flops / 1e9, "params_ours": ours_params,
              "runs": []}
    if vs_diffusers:
        result["params_diffusers"] = sum(p.numel() for p in diffusers_unet(cfg.model, image_size).parameters())
    # data-sheet peaks for known GPUs, else (the CPU, other GPUs) the device's own matmul rate, measured first
    peaks = {p: (_peak(device, p), "datasheet") for p in precisions}
    # (the best of two sizes: a 1024 matmul ran 15 % faster than a 2048 one on one core of an AVX-512 EPYC)
    peaks = {p: (v, src) if v else (max(measured_peak(device, p, n) for n in (1024, 2048)), "matmul")
             for p, (v, src) in peaks.items()}
    result["peak_flops"] = {p: v for p, (v, _) in peaks.items()}
    result["peak_source"] = {p: src for p, (_, src) in peaks.items()}
    settings = [Setting(b, p, c, cl) for b in batches for p in precisions for c in compiles for cl in channels_last]
    for i, s in enumerate(settings):
        label = (f"setting {i + 1}/{len(settings)}: batch {s.batch} {s.precision} "
                 f"{'compiled' if s.compile else 'eager'} {'channels_last' if s.channels_last else 'NCHW'}")
        result["runs"].append(_bench_setting(cfg, s, compile_mode, flops, steps, warmup, rounds, vs_diffusers,
                                             device, label, result["peak_flops"][s.precision]))
    for key in ("train_ratio_vs_diffusers", "sample_ratio_vs_diffusers"):
        ratios = [r[key] for r in result["runs"] if key in r]
        if ratios:
            result[key] = min(ratios)  # the least favourable setting, not a cherry-pick
    return result


def _bench_setting(cfg: Config, s: Setting, compile_mode: CompileMode, flops: int, steps: int, warmup: int,
                   rounds: int, vs_diffusers: bool, device: torch.device, label: str = "",
                   peak: float | None = None) -> dict:
    """Time one setting (ours, and diffusers A/B interleaved): the run's row of the table."""
    image_size = cfg.data.image_size
    torch.manual_seed(0)
    cands = [_candidate("ours", UNet(cfg.model, image_size), cfg, s, compile_mode, device)]
    if vs_diffusers:
        cands.append(_candidate("diffusers", diffusers_unet(cfg.model, image_size), cfg, s, compile_mode, device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    figures = _measure(cands, steps, warmup, rounds, device, label)
    run = {"batch_size": s.batch, "precision": s.precision, "compile": s.compile, "channels_last": s.channels_last,
           **{f"{k}_{n}": v for n, f in figures.items() for k, v in f.items()}}
    if device.type == "cuda":
        run["peak_memory_gib_all"] = torch.cuda.max_memory_allocated(device) / 2**30
    if peak:
        # training = forward + backward (about 2x the forward), so 3x the forward FLOPs per image
        run["mfu_ours"] = figures["ours"]["train_images_per_s"] * 3 * flops / peak
    if vs_diffusers:
        run["train_ratio_vs_diffusers"] = (figures["ours"]["train_images_per_s"]
                                           / figures["diffusers"]["train_images_per_s"])
        run["sample_ratio_vs_diffusers"] = (figures["ours"]["sample_images_per_s_per_nfe"]
                                            / figures["diffusers"]["sample_images_per_s_per_nfe"])
    return run


def format_table(result: dict) -> str:
    """A human-readable table of `run_bench`'s runs."""
    first = ["batch_size", "precision", "compile", "channels_last"]
    keys = sorted({k for r in result["runs"] for k in r} - set(first))
    head = first + keys
    lines = ["  ".join(f"{h:>14}" for h in head)]
    for r in result["runs"]:
        cells = [str(r[k]) for k in first] + [
            f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append("  ".join(f"{c:>14}" for c in cells))
    header = (f"device: {result['device']}  torch {result['torch']}  {result['image_size']}x"
              f"{result['image_size']}  forward {result['forward_gflop_per_image']:.2f} GFLOP/image  "
              f"compile mode {result['compile_mode']}  params ours {result['params_ours'] / 1e6:.2f}M")
    if "params_diffusers" in result:
        header += f"  diffusers {result['params_diffusers'] / 1e6:.2f}M"
    header += "".join(f"\npeak {p}: {v / 1e9:.1f} GFLOP/s ({result['peak_source'][p]}; mfu_ours is against it)"
                      for p, v in result.get("peak_flops", {}).items())
    return header + "\n" + "\n".join(lines)


def bench_cli(cfg: Config, args) -> None:
    """`python -m ddpm bench`: the table, then one JSON line."""
    device = resolve_device(args.device, param="--device")
    bcfg = bench_config(cfg, args.reference)
    both = {"on": [True], "off": [False], "both": [False, True]}
    result = run_bench(bcfg, batches=args.batch_size, steps=args.steps, warmup=args.warmup,
                       precisions=_precisions(args.precision, device), compiles=both[args.compile],
                       channels_last=both[args.channels_last], compile_mode=args.compile_mode,
                       vs_diffusers=args.vs == "diffusers", device=device, rounds=args.rounds)
    print(format_table(result))
    print(json.dumps(result))

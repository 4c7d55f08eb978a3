"""The class-conditional U-Net of DDPM (Ho et al. 2020, CIFAR-10 network: 35.7M parameters unconditional).

Layout (defaults): 128 base channels, channel multipliers (1, 2, 2, 2), two residual blocks per level,
self-attention at 16x16 and in the middle, GroupNorm(32) + SiLU, dropout 0.1. The timestep goes
through a sinusoidal embedding and a two-layer MLP (4x base channels); a learned class embedding with
one extra "null" row (used by classifier-free guidance) is added to it, and the sum is projected into
every residual block. The last convolution of every residual block, of every attention block and of
the network is zero-initialised, so each block starts as the identity and the network outputs zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.config import ModelConfig, TrainingConfig, network_resolutions


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / the Transformer.

    Returns `cat(sin(t * f_i), cos(t * f_i))` with `f_i = max_period ** (-i / (half - 1))`, i < half = dim // 2,
    in float32 whatever the autocast state (the MLP that follows decides the compute dtype).
    An odd `dim` gets one trailing zero column.
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)  # (half,)
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias so its block starts as the identity (DDPM's init_scale=0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected embedding, GroupNorm-SiLU-dropout-conv, plus a skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        # a 1x1 "network-in-network" projection only where the channel count changes (as DDPM)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (B, in_ch, H, W), emb: (B, emb_dim) -> (B, out_ch, H, W)."""
        # The in-place additions write into convolution outputs, which no backward pass reads (a convolution
        # saves its input and weight): one activation-sized allocation and write fewer each, same values.
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        h += self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, out_ch, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, out_ch, H, W)
        return h.add_(self.skip(x))  # (B, out_ch, H, W); addition commutes exactly: skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)  # same parameters as DDPM's separate q, k, v 1x1 layers
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c, hgt, wid = x.shape
        heads, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        qkv = qkv.flatten(2).transpose(1, 2)  # (B, HW, 3C)
        q, k, v = qkv.reshape(b, hgt * wid, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d), softmax(q k^T / sqrt(d)) v
        out = out.transpose(1, 2).reshape(b, hgt * wid, c)  # (B, HW, C)
        out = out.transpose(1, 2).reshape(b, c, hgt, wid)  # (B, C, H, W)
        return x + self.proj(out)  # (B, C, H, W)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual blocks (each optionally followed by attention) of one resolution, on one side of the U."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)


class UNet(nn.Module):
    """Class-conditional DDPM U-Net: `forward(x, t, y) -> tensor shaped like x` (the eps / x0 / v prediction)."""

    def __init__(self, cfg: ModelConfig, image_size: int, in_channels: int = 3):
        super().__init__()
        resolutions = network_resolutions(cfg, image_size)  # ValueError when the network cannot fit
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = cfg.num_classes
        ch, emb_dim, groups = cfg.channels, 4 * cfg.channels, cfg.num_groups
        self.base_channels = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # the extra last row is the "no label" embedding used for classifier-free guidance
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, cfg.dropout, groups)

        def attn(c: int, resolution: int) -> nn.Module:
            use = resolution in cfg.attention_resolutions
            return AttentionBlock(c, cfg.num_heads, groups) if use else nn.Identity()

        # down path: remember the channel count of every tensor pushed onto the skip stack
        skip_chs, cur = [ch], ch
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, (mult, resolution) in enumerate(zip(cfg.channel_mult, resolutions, strict=True)):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(res(cur, ch * mult))
                cur = ch * mult
                attns.append(attn(cur, resolution))
                skip_chs.append(cur)
            self.down.append(Level(blocks, attns))
            last = i == len(cfg.channel_mult) - 1
            self.downsample.append(nn.Identity() if last else Downsample(cur))
            if not last:
                skip_chs.append(cur)

        self.mid_block1 = res(cur, cur)
        self.mid_attn = AttentionBlock(cur, cfg.num_heads, groups)
        self.mid_block2 = res(cur, cur)

        # up path: one more block per level than the down path, each consuming one skip tensor
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(cfg.channel_mult))):
            mult, resolution = cfg.channel_mult[i], resolutions[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(res(cur + skip_chs.pop(), ch * mult))
                cur = ch * mult
                attns.append(attn(cur, resolution))
            self.up.append(Level(blocks, attns))
            self.upsample.append(Upsample(cur) if i > 0 else nn.Identity())

        self.norm_out = nn.GroupNorm(groups, cur)
        self.conv_out = _zero(nn.Conv2d(cur, in_channels, 3, padding=1))

    @property
    def null_label(self) -> int | None:
        """The label meaning "no class" (== num_classes), or None for an unconditional network."""
        return self.num_classes if self.num_classes > 0 else None

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> None:
        """Raise a readable error for wrong shapes instead of a cryptic conv / matmul failure deep inside."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"U-Net input has shape {tuple(x.shape)} but this network expects (B, {expected[0]}, "
                f"{expected[1]}, {expected[2]})"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if y is None:
            return
        if self.class_emb is None:
            raise ValueError("this U-Net is unconditional (model.num_classes=0): pass y=None")
        if y.shape != (x.shape[0],) or y.is_floating_point():
            raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        # the range check reads y back: free on the CPU, a host sync on a GPU. So it runs in the CPU training
        # step only; a GPU training step's labels come from the validated prepared data, and sampling checks
        # its labels once per generate() call (ddpm.core.generate.check_labels), not once per network call
        checkable = self.training and y.device.type == "cpu"
        if checkable and not torch.compiler.is_compiling() and y.numel():
            low, high = int(y.min()), int(y.max())
            if low < 0 or high > self.num_classes:
                raise ValueError(
                    f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = no class), "
                    f"got values in [{low}, {high}]"
                )

    def _embedding(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Time MLP output plus the class embedding (y=None on a conditional network means the null label)."""
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))  # (B, 4C)
        if self.class_emb is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)  # (B,)
            emb = emb + self.class_emb(y)  # (B, 4C)
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) timesteps, y: (B,) labels in [0, num_classes] or None -> (B, C, H, W).

        On a conditional network y=None is the same as passing the null label for every image.
        """
        self._check_inputs(x, t, y)
        emb = self._embedding(t, y)  # (B, 4C)
        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for level, down in zip(self.down, self.downsample, strict=True):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(h, emb))  # (B, Ci, Hi, Wi)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)  # (B, Ci, Hi/2, Wi/2)
                skips.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)  # (B, Cmid, Hmin, Wmin)
        for level, up in zip(self.up, self.upsample, strict=True):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))  # (B, Ci, Hi, Wi)
            h = up(h)  # (B, Ci, 2Hi, 2Wi) except at the top level
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)


def build_unet(cfg: TrainingConfig) -> UNet:
    """The U-Net described by `cfg.model` for `cfg.data.image_size` RGB images."""
    return UNet(cfg.model, cfg.data.image_size)


def forward_flops(cfg: ModelConfig, image_size: int, in_channels: int = 3) -> int:
    """FLOPs (2 per multiply-add) of one forward pass for one image, counted on the meta device (no compute).

    About 12.4 GFLOP for the reference CIFAR-10 network at 32x32. Used for throughput / MFU reporting.
    """
    from torch.utils.flop_counter import FlopCounterMode  # imported here: only reporting needs it

    with torch.device("meta"):
        model = UNet(cfg, image_size, in_channels).eval()
        x = torch.zeros(1, in_channels, image_size, image_size)  # (1, C, H, W)
        t = torch.zeros(1, dtype=torch.long)  # (1,)
        y = torch.zeros(1, dtype=torch.long) if cfg.num_classes > 0 else None  # (1,)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y)
    return int(counter.get_total_flops())

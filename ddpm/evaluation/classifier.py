"""A small ResNet-like classifier for offline evaluation of class-conditional samples.

The network is the "ResNet-9" of the DAWNBench CIFAR-10 entries (conv-BN-ReLU stages with max
pooling and two residual blocks), with the channel counts scaled by `width`: at width 64 it reaches
>= 90 % on CIFAR-10 within ~20-30 epochs, and at width 16 it learns the 16x16 shapes quickstart in
a few CPU epochs. It is trained on the whole uint8 dataset held as one tensor on the device, with
random-crop and flip augmentation done on tensors, so there is no DataLoader and no worker process.

Images go in as uint8 (N, 3, H, W) and are scaled to [-1, 1] inside, like the diffusion model's data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.config import ClassifierConfig
from ddpm.core.atomic import atomic_path
from ddpm.core.checkpoint import load_weights_only
from ddpm.core.images import to_model_space
from ddpm.errors import UserError
from ddpm.evaluation.metrics import class_accuracy

FORMAT = "ddpm-classifier-v1"
ImagesU8 = np.ndarray | torch.Tensor


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv (no bias: BN follows) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    """x + conv_bn(conv_bn(x)) at constant width."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Classifier(nn.Module):
    """ResNet-9-style CNN: width -> 2w (pool, residual) -> 4w (pool) -> 8w (pool, residual) -> linear.

    `image_size` is recorded (and checked by `predict`/`extract_features`) because the features are
    only meaningful at the resolution the network was trained on; the layers themselves accept any
    size >= 8.
    """

    def __init__(self, num_classes: int, width: int = 64, image_size: int = 32):
        super().__init__()
        if num_classes < 2 or width < 1 or image_size < 8:
            raise ValueError(
                f"need num_classes >= 2, width >= 1, image_size >= 8; got {num_classes}, {width}, {image_size}"
            )
        self.num_classes, self.width, self.image_size = num_classes, width, image_size
        self.meta: dict[str, Any] = {}  # what save_classifier stored with it (accuracy, class names, ...)
        w = width
        self.body = nn.Sequential(
            _conv_bn(3, w),  # (B, w, H, W)
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),  # (B, 2w, H/2, W/2)
            _Residual(2 * w),
            _conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),  # (B, 4w, H/4, W/4)
            _conv_bn(4 * w, 8 * w),
            nn.MaxPool2d(2),  # (B, 8w, H/8, W/8)
            _Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),  # (B, 8w, 1, 1)
            nn.Flatten(),  # (B, 8w)
        )
        self.head = nn.Linear(8 * w, num_classes)

    # The max-pooled features are large and positive; scaling the logits down (as the DAWNBench
    # ResNet-9 does) keeps the first steps at lr 0.1 from blowing up the loss.
    logit_scale = 0.125

    @property
    def arch(self) -> dict[str, int]:
        """The constructor arguments, stored in checkpoints to rebuild the network."""
        return {"num_classes": self.num_classes, "width": self.width, "image_size": self.image_size}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 8*width) of images x (B, 3, H, W) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) of images x (B, 3, H, W) in [-1, 1]."""
        return self.head(self.features(x)) * self.logit_scale


def _augment(x: torch.Tensor, pad: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop (reflect-pad by `pad`) and random horizontal flip of a float batch (B, C, H, W).

    Offsets and flips are drawn on the CPU from `gen` so a seed gives the same augmentation on any
    device; the crop itself is one gather on x's device.
    """
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, H+2p, W+2p)
        offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen).to(x.device)  # (B, 2)
        rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (B, H)
        cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (B, W)
        batch = torch.arange(b, device=x.device)[:, None, None]  # (B, 1, 1)
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
    if hflip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)  # (B,)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)  # (B, C, H, W)
    return x.contiguous()


def _as_images(images_u8: ImagesU8, image_size: int | None = None) -> torch.Tensor:
    """Validate uint8 images (N, 3, H, W) (numpy or tensor) and return them as a tensor."""
    images = torch.as_tensor(images_u8)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        raise UserError(
            f"the classifier was trained on {image_size}x{image_size} images but got "
            f"{images.shape[2]}x{images.shape[3]}; retrain it for data.image_size (rerun the classifier stage)"
        )
    return images


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch of full batches (a ragged last batch is dropped: BN needs > 1 sample)."""
    order = torch.randperm(n, generator=gen)  # (N,)
    size = min(batch_size, n)
    return list(order[: n - n % size].split(size))


def train_classifier(
    train_images_u8: ImagesU8,
    train_labels: ImagesU8,
    eval_images_u8: ImagesU8,
    eval_labels: ImagesU8,
    cfg: ClassifierConfig,
    device: torch.device | str,
    seed: int,
    hflip: bool = True,
) -> tuple[Classifier, float, list[float]]:
    """Train a `Classifier` on uint8 images and report its held-out accuracy.

    SGD with Nesterov momentum and a one-cycle (triangular) LR peaking at `cfg.lr`, weight decay
    `cfg.weight_decay`, random crop (reflect pad = image_size // 8, i.e. 4 at 32x32) and, when
    `hflip`, horizontal flips (pass `data.hflip`: flips must not change the class). The training set
    lives on `device` as uint8. Deterministic for a seed on the CPU; the caller's global RNG state
    is left untouched. The class count is 1 + the largest label.
    Returns (model in eval mode, overall eval accuracy, per-class eval accuracy).
    """
    device = torch.device(device)
    x_train = _as_images(train_images_u8).to(device)  # (N, 3, H, W) uint8
    y_train = torch.as_tensor(train_labels).to(device, torch.int64)  # (N,)
    if x_train.shape[0] != y_train.shape[0] or x_train.shape[2] != x_train.shape[3]:
        raise ValueError(f"need square images and one label each, got {tuple(x_train.shape)} / {tuple(y_train.shape)}")
    num_classes = 1 + max(int(torch.as_tensor(train_labels).max()), int(torch.as_tensor(eval_labels).max()))
    image_size = x_train.shape[2]
    model = _init_model(num_classes, cfg.width, image_size, seed).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = x_train.shape[0] // min(cfg.batch_size, x_train.shape[0])  # as in _batches
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _one_cycle(cfg.epochs * steps_per_epoch))
    for _ in range(cfg.epochs):
        _train_epoch(model, optimizer, schedule, x_train, y_train, cfg.batch_size, hflip, gen)
    model.eval()
    pred = predict(model, eval_images_u8, batch_size=max(cfg.batch_size, 256))
    accuracy, per_class = class_accuracy(pred, eval_labels, num_classes)
    return model, accuracy, per_class


def _one_cycle(total_steps: int, warmup_fraction: float = 0.25) -> Callable[[int], float]:
    """LR factor: linear ramp 0 -> 1 over the first quarter, then linear decay to 0 at `total_steps`.

    (torch's OneCycleLR divides by zero when a phase is shorter than one step, as in tiny test runs.)
    """
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _init_model(num_classes: int, width: int, image_size: int, seed: int) -> Classifier:
    """Build the network with weights drawn from `seed`, without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return Classifier(num_classes, width, image_size)


def _train_epoch(
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    batch_size: int,
    hflip: bool,
    gen: torch.Generator,
) -> None:
    """One pass over the shuffled training set (no read-back to the host)."""
    model.train()
    device = x_train.device
    pad = x_train.shape[-1] // 8
    # bf16 autocast on CUDA for speed; fp32 on the CPU keeps training bit-reproducible.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = _batches(x_train.shape[0], batch_size, gen)
    for idx in batches:
        idx = idx.to(device)
        x = _augment(to_model_space(x_train[idx]), pad, hflip, gen)  # (B, 3, H, W)
        if device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
        with autocast:
            loss = F.cross_entropy(model(x), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _same_device(a: torch.device, b: torch.device) -> bool:
    """'cuda' and 'cuda:0' are the same device when 0 is the current one."""
    index = torch.cuda.current_device() if "cuda" in (a.type, b.type) and torch.cuda.is_available() else 0
    a_index = index if a.index is None else a.index
    b_index = index if b.index is None else b.index
    return a.type == b.type and a_index == b_index


def extract_features(
    model: Classifier, images_u8: ImagesU8, batch_size: int = 500, device: torch.device | str | None = None
) -> torch.Tensor:
    """Penultimate features (N, 8*width) float32 on the CPU, `batch_size` images at a time.

    The images may stay on the CPU (only one batch is on the model's device at a time). `device`,
    if given, must be the model's device. Puts the model in eval mode.
    """
    return _batched(model, images_u8, batch_size, model.features, device)


def predict_logits(
    model: Classifier, images_u8: ImagesU8, batch_size: int = 500, device: torch.device | str | None = None
) -> torch.Tensor:
    """Logits (N, num_classes) float32 on the CPU, batched like `extract_features`."""
    return _batched(model, images_u8, batch_size, model, device)


def predict(
    model: Classifier, images_u8: ImagesU8, batch_size: int = 500, device: torch.device | str | None = None
) -> torch.Tensor:
    """Predicted labels (N,) int64 on the CPU, batched like `extract_features`."""
    return predict_logits(model, images_u8, batch_size, device).argmax(dim=1)


def _batched(
    model: Classifier,
    images_u8: ImagesU8,
    batch_size: int,
    fn: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device | str | None,
) -> torch.Tensor:
    """Apply fn to [-1, 1] batches of uint8 images under inference_mode; concatenate on the CPU."""
    images = _as_images(images_u8, model.image_size)  # (N, 3, H, W) uint8
    model.eval()
    model_device = _device_of(model)
    if device is not None and not _same_device(torch.device(device), model_device):
        # Moving the model here would be a hidden side effect on the caller's model.
        raise ValueError(f"the classifier is on {model_device}, not {device}: move it with model.to(device)")
    device = model_device
    outputs = []
    with torch.inference_mode():
        for batch in images.split(batch_size):
            x = to_model_space(batch.to(device))  # (b, 3, H, W)
            outputs.append(fn(x).float().cpu())  # (b, ...)
    return torch.cat(outputs)


def save_classifier(path: str | Path, model: Classifier, meta: dict[str, Any] | None = None) -> None:
    """Atomically save weights, architecture arguments and `meta` (JSON-like data: accuracies, class names)."""
    meta = dict(meta or {})
    try:  # weights_only loading accepts only plain containers and numbers: check before writing
        json.dumps(meta, allow_nan=True)
    except TypeError as err:
        raise ValueError(f"classifier meta must be JSON-like (str/int/float/bool/list/dict): {err}") from None
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "arch": model.arch, "state_dict": state, "meta": meta}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object keeps the bytes reproducible
        torch.save(payload, f)


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """Rebuild a classifier saved by `save_classifier`, in eval mode on `device`; its meta is `model.meta`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"classifier checkpoint {path} not found; train it first (run the classifier stage)")
    try:
        payload = load_weights_only(path)
    except Exception as err:  # a truncated or foreign file: say which and how to recover
        raise UserError(f"cannot read classifier checkpoint {path} ({err}); delete it and retrain") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a classifier checkpoint ({FORMAT}); delete it and retrain")
    model = Classifier(**payload["arch"])
    model.load_state_dict(payload["state_dict"])
    model.meta = payload["meta"]
    return model.to(device).eval()

"""The sampling workflow (the `sample` stage and `python -m ddpm sample`).

Rebuilds the EMA model and its diffusion from the checkpoint alone (the config travels inside it), then
writes the class grid, the denoising-progression picture and the evaluation set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpm.config import Config
from ddpm.core.atomic import atomic_path
from ddpm.core.checkpoint import load_checkpoint, load_ema_model
from ddpm.core.generate import SamplerSettings, balanced_labels, generate
from ddpm.core.images import grid_hwc, save_png
from ddpm.core.runtime import check_precision, configure_backends, configure_cpu_allocator, resolve_device
from ddpm.core.samplers import respaced_timesteps
from ddpm.errors import UserError
from ddpm.pipeline.layout import Layout
from ddpm.tracking.files import read_run_id, write_run_id
from ddpm.tracking.tracker import Tracker


@dataclass
class LoadedModel:
    """An EMA model rebuilt from a checkpoint, with what sampling needs to know about it."""

    config: Config  # the TRAINING config stored in the checkpoint
    model: torch.nn.Module
    diffusion: torch.nn.Module
    class_names: list[str]
    device: torch.device
    step: int  # training steps behind these weights


def load_model(checkpoint: Path, cfg: Config) -> LoadedModel:
    """Rebuild the EMA network on the device chosen by `cfg.train.device` (the current params)."""
    configure_backends(cfg.train.deterministic)
    device = resolve_device(cfg.train.device)
    check_precision(cfg.train.precision, device)
    configure_cpu_allocator(device)  # CPU: freed activations stay in the process (no page faults per call)
    ckpt = load_checkpoint(checkpoint)
    train_cfg, model, diffusion = load_ema_model(checkpoint, device, ckpt=ckpt)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sample.compile:
        model = torch.compile(model)
    names = ckpt.get("class_names") or [str(i) for i in range(train_cfg.model.num_classes)]
    return LoadedModel(train_cfg, model.eval(), diffusion, list(names), device, int(ckpt["step"]))


def parse_classes(spec: str, class_names: list[str]) -> list[int]:
    """'cat,dog' or '3,5' -> class indices; an unknown class is an error listing the known ones."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in class_names:
            out.append(class_names.index(item))
        elif item.isdigit() and int(item) < len(class_names):
            out.append(int(item))
        else:
            known = ", ".join(class_names)
            raise UserError(f"unknown class {item!r}; the model knows {known} (or 0-{len(class_names) - 1})")
    if not out:
        raise UserError("--classes is empty; give class names or indices separated by commas")
    return out


def class_grid(lm: LoadedModel, settings: SamplerSettings, classes: list[int], per_class: int, seed: int,
               batch_size: int, precision: str) -> np.ndarray:
    """One row per class, `per_class` samples in each row, as an (H, W, 3) uint8 picture."""
    labels = torch.tensor(classes).repeat_interleave(per_class)  # (K * n,) row-major: class k's row
    if not lm.config.model.num_classes:
        labels = None  # an unconditional model: rows are just more samples
    images, _ = generate(lm.model, lm.diffusion, labels, settings, num=len(classes) * per_class,
                         device=lm.device, seed=seed, batch_size=batch_size, precision=precision)
    return grid_hwc(images, nrow=per_class)


def denoise_picture(lm: LoadedModel, settings: SamplerSettings, frames: int, seed: int, precision: str) -> np.ndarray:
    """The same seeds seen at `frames` timesteps from pure noise to the final image: one row per class."""
    kept = respaced_timesteps(lm.diffusion.num_timesteps, settings.steps).tolist()
    idx = np.linspace(len(kept) - 1, 0, frames - 1).round().astype(int)  # from noise towards the data
    record = sorted({kept[i] for i in idx}, reverse=True)
    k = max(lm.config.model.num_classes, 1)
    labels = torch.arange(k) if lm.config.model.num_classes else None
    images, inter = generate(lm.model, lm.diffusion, labels, settings, num=k, device=lm.device, seed=seed,
                             batch_size=k, precision=precision, record=record)
    columns = [inter[t] for t in record] + [images]  # each (K, C, H, W)
    stacked = torch.stack(columns, dim=1).flatten(0, 1)  # (K * frames, C, H, W), row = one seed
    return grid_hwc(stacked, nrow=len(columns))


def evaluation_set(lm: LoadedModel, settings: SamplerSettings, num: int, seed: int, batch_size: int,
                   precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` class-balanced conditional samples: uint8 images (N, C, H, W) and their labels (N,)."""
    k = lm.config.model.num_classes
    labels = balanced_labels(num, k) if k else None
    images, _ = generate(lm.model, lm.diffusion, labels, settings, num=num, device=lm.device, seed=seed,
                         batch_size=batch_size, precision=precision)
    return images, labels if labels is not None else torch.full((num,), -1)


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor, meta: dict) -> None:
    """The evaluation set as one compact .npz (uint8 images, int64 labels, JSON metadata)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images.numpy(), labels=labels.numpy(), meta=json.dumps(meta))


def load_samples(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Read what `save_samples` wrote."""
    if not Path(path).exists():
        raise UserError(f"{path} not found; run the sample stage first (dvc repro sample)")
    with np.load(path, allow_pickle=False) as z:
        return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), json.loads(str(z["meta"]))


def sample_stage(cfg: Config, paths: Layout) -> dict:
    """The sample stage: grid, denoising picture and evaluation set, logged into the training's MLflow run (or a
    child of it when these params are not the ones it logged); `samples/run.json` names that run for evaluate."""
    lm = load_model(paths.ema, cfg)
    sc, precision = cfg.sample, cfg.train.precision
    settings = SamplerSettings.from_config(sc)
    classes = list(range(max(lm.config.model.num_classes, 1)))
    grid = class_grid(lm, settings, classes, sc.grid_per_class, cfg.seed, sc.batch_size, precision)
    denoise = denoise_picture(lm, settings, sc.denoise_frames, cfg.seed, precision)
    images, labels = evaluation_set(lm, settings, sc.num_samples, cfg.seed + 1, sc.batch_size, precision)
    meta = {"seed": cfg.seed, "sampler": settings.sampler, "steps": settings.steps, "eta": settings.eta,
            "guidance_scale": settings.guidance_scale, "class_names": lm.class_names}
    save_png(paths.grid, grid)
    save_png(paths.denoise, denoise)
    save_samples(paths.samples, images, labels, meta)
    run_id = read_run_id(paths.train_run)
    if run_id:
        # the training's run, or a new child run of it when these sampling params are not the ones it logged
        tracker = Tracker.start(cfg, paths.root, run_name=None, run_id=run_id, tags={},
                                new_run_if_params_differ=True)
        try:
            tracker.log_image("samples/grid", grid, step=lm.step)
            tracker.log_artifact(paths.grid)
            tracker.log_artifact(paths.denoise)
        finally:
            tracker.finish("FINISHED")
        run_id = tracker.run_id
    write_run_id(paths.sample_run, run_id)
    return meta


def sample_cli(cfg: Config, args) -> None:
    """`python -m ddpm sample --checkpoint ... --classes cat,dog --n 16 --guidance 2 --out grid.png`."""
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.guidance is not None and args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")
    lm = load_model(Path(args.checkpoint), cfg)
    sc = cfg.sample
    settings = SamplerSettings(
        sampler=args.sampler or sc.sampler,
        steps=args.steps or sc.steps,
        eta=sc.eta if args.eta is None else args.eta,
        guidance_scale=sc.guidance_scale if args.guidance is None else args.guidance,
    )
    if lm.config.model.num_classes:
        classes = parse_classes(args.classes, lm.class_names) if args.classes else list(range(len(lm.class_names)))
    elif args.classes:
        raise UserError(f"{args.checkpoint} is an unconditional model; drop --classes")
    else:
        classes = [0]
    seed = cfg.seed if args.seed is None else args.seed
    grid = class_grid(lm, settings, classes, args.n, seed, sc.batch_size, cfg.train.precision)
    save_png(args.out, grid)
    print(f"wrote {args.out}: {len(classes)} row(s) x {args.n}, {settings}")

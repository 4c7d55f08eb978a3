"""The sampling workflow (the `sample` stage and `python -m ddpm sample`).

Rebuilds the EMA model and its diffusion from the checkpoint alone (the config travels inside it), then
writes the class grid, the denoising-progression picture and the evaluation set.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from ddpm.config import Config, SampleConfig
from ddpm.core.generate import SamplerSettings, generate, network_evaluations
from ddpm.core.images import grid_hwc, save_png, viewable
from ddpm.core.runtime import configure_backends, configure_cpu_allocator
from ddpm.errors import UserError
from ddpm.pipeline.fingerprint import SAMPLE_CODE_DIFFERS_TAG, SAMPLE_CODE_TAG, training_fingerprint
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.run_files import pipeline_tracker, save_samples
from ddpm.pipeline.trained_model import LoadedModel, check_steps, evaluation_set, load_model
from ddpm.tracking.files import write_run_id
from ddpm.tracking.names import SAMPLES
from ddpm.tracking.tracker import Tracker

log = logging.getLogger(__name__)

# the sample command's flags, by the SampleConfig field each one overrides
SAMPLE_FLAGS = {"sampler": "--sampler", "steps": "--steps", "eta": "--eta", "guidance_scale": "--guidance",
                "spacing": "--spacing"}


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
    """One row per class, `per_class` samples in each row, as an (H, W, 3) uint8 picture (`viewable` size)."""
    labels = torch.tensor(classes).repeat_interleave(per_class)  # (K * n,) row-major: class k's row
    if not lm.config.model.num_classes:
        labels = None  # an unconditional model: rows are just more samples
    images, _ = generate(lm.model, lm.diffusion, labels, settings, num=len(classes) * per_class,
                         device=lm.device, seed=seed, batch_size=batch_size, precision=precision)
    return viewable(grid_hwc(images, nrow=per_class))


def denoise_picture(lm: LoadedModel, settings: SamplerSettings, frames: int, seed: int, precision: str) -> np.ndarray:
    """The same seeds seen at `frames` timesteps from pure noise to the final image: one row per class."""
    kept = settings.timesteps(lm.diffusion).flip(0).tolist()  # increasing
    idx = np.linspace(len(kept) - 1, 0, frames - 1).round().astype(int)  # from noise towards the data
    record = sorted({kept[i] for i in idx}, reverse=True)
    k = max(lm.config.model.num_classes, 1)
    labels = torch.arange(k) if lm.config.model.num_classes else None
    images, inter = generate(lm.model, lm.diffusion, labels, settings, num=k, device=lm.device, seed=seed,
                             batch_size=k, precision=precision, record=record)
    columns = [inter[t] for t in record] + [images]  # each (K, C, H, W)
    stacked = torch.stack(columns, dim=1).flatten(0, 1)  # (K * frames, C, H, W), row = one seed
    return viewable(grid_hwc(stacked, nrow=len(columns)))


def training_code_record(lm: LoadedModel, checkpoint: Path) -> dict:
    """Whether the checkpoint's recorded training code is the running code's: sampling other code's model is
    allowed (sampling code may improve), but said once and recorded (samples/run.json, MLflow tags)."""
    running = training_fingerprint()
    differs = lm.train_code != running
    if differs:
        log.warning("%s was trained by other training code (fingerprint %s, running code %s): sampling it anyway",
                    checkpoint, lm.train_code or "unrecorded", running)
    return {"checkpoint_fingerprint": lm.train_code or "unrecorded", "running_fingerprint": running,
            "differs": differs}


def sample_stage(cfg: Config, paths: Layout) -> dict:
    """The sample stage: grid, denoising picture and evaluation set, logged into the training's MLflow run (or a
    child of it when these params are not the ones it logged); `samples/run.json` names that run for evaluate.

    The run is open while sampling, so a crash marks it FAILED and SIGINT/SIGTERM KILLED. The checkpoint is
    loaded first: an unreadable one is bad input, which stops the stage before it touches any run."""
    configure_backends(cfg.train.deterministic)
    lm = load_model(paths.ema, cfg, cfg.sample.precision)
    configure_cpu_allocator(lm.device)  # CPU: freed activations stay in the process (no page faults per call)
    code = training_code_record(lm, paths.ema)
    tags = {SAMPLE_CODE_TAG: code["running_fingerprint"], SAMPLE_CODE_DIFFERS_TAG: str(code["differs"]).lower()}
    with pipeline_tracker(cfg, paths, paths.train_run, tags) as tracker:
        meta = _sample(cfg, paths, lm, tracker)
        write_run_id(paths.sample_run, tracker.run_id, {"train_code": code})
    return meta


def _sample(cfg: Config, paths: Layout, lm: LoadedModel, tracker: Tracker) -> dict:
    """Generate and write the stage's pictures and evaluation set; log the pictures."""
    sc, precision = cfg.sample, cfg.sample.precision
    settings = SamplerSettings.from_config(sc)
    check_steps(lm, settings.steps, "sample.steps")
    classes = list(range(max(lm.config.model.num_classes, 1)))
    log.info("sample: class grid and denoising picture")
    grid = class_grid(lm, settings, classes, sc.grid_per_class, cfg.seed, sc.batch_size, precision)
    denoise = denoise_picture(lm, settings, sc.denoise_frames, cfg.seed, precision)
    log.info("sample: evaluation set of %d images", sc.num_samples)
    images, labels = evaluation_set(lm, settings, sc.num_samples, cfg.seed + 1, sc.batch_size, precision)
    with warnings.catch_warnings():  # sampling itself already warned if log-SNR steps collapsed
        warnings.simplefilter("ignore")
        nfe = network_evaluations(lm.diffusion, settings, conditional=bool(lm.config.model.num_classes))
    meta = {"seed": cfg.seed, "sampler": settings.sampler, "steps": settings.steps, "spacing": settings.spacing,
            "network_evaluations": nfe,  # per sample: a guided step counts 2 (conditional + unconditional)
            "eta": settings.eta, "guidance_scale": settings.guidance_scale,
            "guidance_interval": settings.guidance_interval, "final_step": settings.final_step, "precision": precision,
            "class_names": lm.class_names}
    save_png(paths.grid, grid)
    save_png(paths.denoise, denoise)
    save_samples(paths.samples, images, labels, meta)
    tracker.log_image(f"{SAMPLES}/grid", grid, step=lm.step)
    tracker.log_artifact(paths.grid)
    tracker.log_artifact(paths.denoise)
    return meta


def sample_cli(cfg: Config, args) -> None:
    """`python -m ddpm sample --checkpoint ... --classes cat,dog --n 16 --guidance 2 --out grid.png`."""
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    sc = _with_flags(cfg.sample, args)
    settings = SamplerSettings.from_config(sc)
    configure_backends(cfg.train.deterministic)
    lm = load_model(Path(args.checkpoint), cfg)
    configure_cpu_allocator(lm.device)
    check_steps(lm, settings.steps, "--steps" if args.steps is not None else "sample.steps")
    if lm.config.model.num_classes:
        classes = parse_classes(args.classes, lm.class_names) if args.classes else list(range(len(lm.class_names)))
    elif args.classes:
        raise UserError(f"{args.checkpoint} is an unconditional model; drop --classes")
    else:
        classes = [0]
    seed = cfg.seed if args.seed is None else args.seed
    grid = class_grid(lm, settings, classes, args.n, seed, sc.batch_size, sc.precision)
    save_png(args.out, grid)
    print(f"wrote {args.out}: {len(classes)} row(s) x {args.n}, {settings}")


def _with_flags(sc: SampleConfig, args) -> SampleConfig:
    """The sample section with the given flags applied, validated by the same rules as params.yaml's;
    a bad value is a UserError naming the flag."""
    overrides = {field: getattr(args, flag[2:]) for field, flag in SAMPLE_FLAGS.items()
                 if getattr(args, flag[2:]) is not None}
    try:
        return SampleConfig.model_validate({**sc.model_dump(), **overrides})
    except ValidationError as err:
        e = err.errors()[0]
        raise UserError(f"{SAMPLE_FLAGS[e['loc'][0]]}: {e['msg']} (got {e['input']!r})") from None

"""The training workflow (the `train` stage): data, model, EMA, optimiser, loop, checkpoints, tracking.

`train(cfg, paths)` resumes from `.resume/<key>/` when an earlier run with the same training params, data
and training code (`ddpm.pipeline.fingerprint`) was interrupted (a finished one only writes its outputs
again), checkpoints every `train.checkpoint_every` steps and on SIGINT/SIGTERM, and writes the stage's
outputs (EMA checkpoint, metrics, loss curve, progress grids) at the end. On CPU a resumed run gives
bit-identical EMA weights to an uninterrupted one.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from ddpm.config import Config
from ddpm.core.checkpoint import FORMAT_VERSION, save_checkpoint
from ddpm.core.diffusion import GaussianDiffusion
from ddpm.core.ema import EMA
from ddpm.core.generate import SamplerSettings, balanced_labels, generate
from ddpm.core.images import grid_hwc, save_png, viewable
from ddpm.core.runtime import (
    Ranks,
    close_distributed,
    configure_backends,
    configure_cpu_allocator,
    device_description,
    init_distributed,
    ranks_from_env,
)
from ddpm.core.seeding import rank_seed, seed_everything
from ddpm.core.train_step import StepContext, StepStats, train_step
from ddpm.core.unet import build_unet
from ddpm.data.batches import make_batches
from ddpm.data.prepared import PreparedData, check_class_count, load_prepared
from ddpm.errors import Interrupted, UserError
from ddpm.pipeline.devices import check_precision, resolve_device, uses_channels_last
from ddpm.pipeline.fingerprint import TRAIN_CODE_TAG, TRAIN_COMMIT_TAG, TRAIN_DIRTY_TAG, code_identity
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.progression import progression_figure
from ddpm.pipeline.resume import ResumeStore, checkpoints_of_other_code, params_key, resume_key, resume_root
from ddpm.pipeline.snapshots import publish_snapshots, snapshot_name, snapshot_steps
from ddpm.pipeline.train_state import Run, StopVote, gather_rank_rng, shared_checkpoint
from ddpm.tracking.files import write_metrics, write_run_id, write_tsv
from ddpm.tracking.names import TRAIN, final_train, grouped
from ddpm.tracking.resources import ResourceMonitor
from ddpm.tracking.tracker import Tracker

PLOT_COLUMNS = ["step", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm", "lr"]
log = logging.getLogger(__name__)


@contextmanager
def _signal_flag():
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (so a checkpoint can be written)."""
    flag: list[int] = []
    handler = lambda signum, frame: flag.append(signum)  # noqa: E731
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def lr_lambda(warmup: int):
    """Linear warm-up to the base LR over `warmup` steps, then constant (as in DDPM)."""
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _build(cfg: Config, ranks: Ranks, device: torch.device, data) -> Run:
    """Model, EMA, optimiser, schedule and data stream, seeded from `cfg.seed`."""
    seed_everything(cfg.seed)
    model = build_unet(cfg).to(device)  # the same initial weights on every rank
    if ranks.rank:  # own dropout masks; the batch's data, noise and timesteps stay global (`generator`)
        seed_everything(rank_seed(cfg.seed, ranks.rank))
    if uses_channels_last(cfg.train, compiled=cfg.train.compile):
        model = model.to(memory_format=torch.channels_last)
    diffusion = GaussianDiffusion.from_config(cfg).to(device)
    ema = EMA(model, decay=cfg.train.ema_decay, warmup=cfg.train.ema_warmup)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.warmup_steps))
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    trained = model
    if ranks.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        trained = torch.compile(trained, mode=cfg.train.compile_mode)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    batches = make_batches(data, cfg, device, rank=ranks.rank, world_size=ranks.world_size,
                           batch_size=cfg.train.batch_size // cfg.train.grad_accum)  # one micro-batch
    return Run(cfg, ranks, device, model, trained, diffusion, ema, optimizer, scheduler, scaler, generator,
               batches, StepStats(device))


def _check_world(cfg: Config, ranks: Ranks) -> None:
    per_step = cfg.train.grad_accum * ranks.world_size
    if cfg.train.batch_size % per_step:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by grad_accum x world size = {per_step}; "
            "choose a batch size that splits evenly"
        )


def _warn_disk(cfg: Config, root: Path, model: torch.nn.Module) -> None:
    """Warn when free disk is below what the checkpoints and sample grids will take."""
    params = sum(p.numel() for p in model.parameters())
    ckpt = params * 4 * 4  # model + EMA + two Adam moments, float32
    need = 3 * ckpt + params * 4  # last + previous + a write in progress, plus models/ema.pt
    if cfg.train.sample_every:
        need += (cfg.train.steps // cfg.train.sample_every + 1) * 3 * cfg.data.image_size**2 * 200
    need += 2 * len(snapshot_steps(cfg.train)) * params * 4  # EMA snapshots: the store's + models/snapshots/
    free = shutil.disk_usage(root).free
    if free < need:
        log.warning("%.2f GiB free on %s, training needs about %.2f GiB for checkpoints and samples",
                    free / 2**30, root, need / 2**30)


def train(cfg: Config, paths: Layout) -> dict:
    """Run (or resume) training; write the stage outputs on rank 0; return the reproducible metrics.

    The steps: set up the process (`_setup_process`), load the data and build the run (`_build`), then,
    holding the lock of the run's resume key (params, data and training code), continue its checkpoint or
    start at step 0 (`_resume_or_start`).
    """
    ranks = ranks_from_env()
    device = _setup_process(cfg, ranks)
    try:
        data = load_prepared(paths.prepared)
        check_class_count(data.class_names, cfg, "the prepared data")
        run = _build(cfg, ranks, device, data)
        run.class_names = list(data.class_names)
        run.code = code_identity(paths.root)
        key = resume_key(cfg, data.content_hash, run.code["fingerprint"], ranks.world_size)
        store = ResumeStore(resume_root(paths.root) / key)
        with store.exclusive() if ranks.is_main else nullcontext():
            return _resume_or_start(run, store, paths, data)
    finally:
        close_distributed()


def _setup_process(cfg: Config, ranks: Ranks) -> torch.device:
    """Check the world size, set the process-wide torch flags, pick the device and join the process group."""
    _check_world(cfg, ranks)
    configure_backends(cfg.train.deterministic)  # before CUDA starts (cuBLAS reads its workspace setting)
    device = resolve_device(cfg.train.device, ranks.local_rank)
    check_precision(cfg.train.precision, device)
    configure_cpu_allocator(device)  # CPU: freed activations stay in the process (no page faults per step)
    init_distributed(ranks, device)
    return device


def _resume_or_start(run: Run, store: ResumeStore, paths: Layout, data: PreparedData) -> dict:
    """Continue the store's checkpoint (or start at step 0), open the MLflow run before any work, train, write
    the outputs; the run ends with the tracker (FINISHED / KILLED / FAILED)."""
    cfg, ranks, device, data_hash = run.cfg, run.ranks, run.device, data.content_hash
    ckpt = shared_checkpoint(store, ranks, device)
    if ckpt is not None:
        run.restore(ckpt)
        if ranks.is_main:
            log.info("resuming from %s at step %d", store.dir, run.step)
            _restore_progress(store, paths)
    elif ranks.is_main:
        _say_why_not_resumed(store, params_key(cfg, data_hash, ranks.world_size), run.code["fingerprint"])
        shutil.rmtree(paths.progress, ignore_errors=True)  # a fresh run starts a fresh progress table
        shutil.rmtree(store.progress, ignore_errors=True)
        shutil.rmtree(store.snapshots, ignore_errors=True)
    if not ranks.is_main:
        _loop(run, store, None, paths, data_hash)
        return {}
    store.record_key(params_key(cfg, data_hash, ranks.world_size), run.code["fingerprint"])
    _warn_disk(cfg, paths.root, run.model)
    # killed before its first checkpoint: continue the MLflow run (and TensorBoard dir) that start created
    orphan = store.recorded_run_id() if ckpt is None else None
    run_id = run.run_id or orphan
    resume_step = run.step if ckpt is not None else (0 if orphan else None)
    tags = _tags(data_hash, device, run.code, ranks.world_size)
    with Tracker.start(cfg, paths.root, run_name=None, run_id=run_id, tags=tags, resume_step=resume_step) as tracker:
        run.run_id = tracker.run_id
        tracker.log_dataset(cfg, paths.prepared, data_hash, len(data.train_labels), len(data.eval_labels),
                            list(data.class_names))
        store.record_run_id(tracker.run_id)
        timing = _loop(run, store, tracker, paths, data_hash)
        return _finish(run, store, tracker, paths, timing)


def _say_why_not_resumed(store: ResumeStore, params: str, fingerprint: str) -> None:
    """One line when the same params and data have a checkpoint made by other training code (not resumed)."""
    other = checkpoints_of_other_code(store.dir.parent, params, fingerprint)
    if other:
        folder, old = other[0]
        log.warning("training code changed since the checkpoint in %s (fingerprint %s -> %s): training from step 0",
                    folder, old, fingerprint)


def _tags(data_hash: str, device: torch.device, code: dict, world_size: int) -> dict[str, str]:
    return {
        "data_hash": data_hash,
        TRAIN_CODE_TAG: code["fingerprint"],
        TRAIN_COMMIT_TAG: code["git_commit"],
        TRAIN_DIRTY_TAG: str(code["git_dirty"]).lower(),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "device": device_description(device),
        "ddpm.train.world_size": str(world_size),
    }


def _loop(run: Run, store: ResumeStore, tracker, paths: Layout, data_hash: str) -> dict:
    """The training loop: steps, periodic logging, progress grids and checkpoints."""
    cfg, main = run.cfg, run.ranks.is_main
    ctx = StepContext.from_config(
        cfg.train, model=run.trained, diffusion=run.diffusion, optimizer=run.optimizer, scaler=run.scaler,
        generator=run.generator, device=run.device, ranks=run.ranks, null_label=run.model.null_label,
    )
    log_every = cfg.tracking.log_every
    monitor = ResourceMonitor(run.device) if main and cfg.tracking.system_metrics else None
    bar = tqdm(total=cfg.train.steps, initial=run.step, disable=not main, desc="train", dynamic_ncols=True)
    start_step, t_start = run.step, time.perf_counter()
    snapshots = set(snapshot_steps(cfg.train)) if main else set()
    t_log, step_log = t_start, run.step
    stop = StopVote(run.ranks, run.device)
    with _signal_flag() as flag:
        while run.step < cfg.train.steps:
            run.trained.train()
            train_step(ctx, run.batches, run.stats)
            run.scheduler.step()
            run.ema.update(run.model)
            run.step += 1
            bar.update(1)
            if run.step % log_every == 0 or run.step == cfg.train.steps:
                now = time.perf_counter()
                ips = (run.step - step_log) * cfg.train.batch_size / (now - t_log)
                t_log, step_log = now, run.step
                _log(run, tracker, bar, ips, paths, monitor)
            if main and cfg.train.sample_every and run.step % cfg.train.sample_every == 0:
                _progress_grid(run, tracker, paths, store)
            if run.step in snapshots:
                save_checkpoint(store.snapshots / snapshot_name(run.step), _ema_payload(run))
            signum = stop(flag)  # every rank stops at the same step
            if signum:
                _checkpoint(run, store, data_hash)
                raise Interrupted(signum, "checkpoint saved, run again to resume")
            if run.step % cfg.train.checkpoint_every == 0 and run.step < cfg.train.steps:
                _checkpoint(run, store, data_hash)
    bar.close()
    _checkpoint(run, store, data_hash)
    wall = time.perf_counter() - t_start
    steps_done = run.step - start_step
    return {"wall_time_s": wall, "images_per_s": steps_done * cfg.train.batch_size / wall if wall else 0.0}


def _log(run: Run, tracker, bar, images_per_s: float, paths: Layout, monitor: ResourceMonitor | None) -> None:
    """Read the device-side statistics back (one sync), stop on too many bad steps, log everywhere."""
    run.stats.collect_on_main(run.ranks)  # the global batch's losses, not rank 0's shard's
    stats = run.stats.read()
    cfg = run.cfg
    if stats["bad_steps_in_a_row"] > cfg.train.max_bad_steps:
        raise UserError(
            f"training stopped at step {run.step}: {int(stats['bad_steps_in_a_row'])} consecutive steps had a "
            f"non-finite loss or gradient (train.max_bad_steps={cfg.train.max_bad_steps}); lower train.lr, "
            "use precision fp32/bf16, or check the data"
        )
    lr = run.scheduler.get_last_lr()[0]
    if not run.ranks.is_main:
        return
    row = {"step": run.step, **{c: stats.get(c, float("nan")) for c in PLOT_COLUMNS[1:-1]}, "lr": lr}
    run.plot_rows.append(row)
    _write_plot(paths.loss_plot, run.plot_rows)
    bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{images_per_s:.0f}")
    if tracker is not None:
        resources = monitor.sample() if monitor is not None else {}
        tracker.log_metrics(grouped(TRAIN, {**stats, "lr": lr, "images_per_s": images_per_s, **resources}),
                            step=run.step)


def _write_plot(path: Path, rows: list[dict[str, float]]) -> None:
    write_tsv(path, PLOT_COLUMNS, rows)


def _restore_progress(store: ResumeStore, paths: Layout) -> None:
    """Copy the progress grids kept beside the checkpoint that the stage's folder lacks.

    A resumed run can be in another directory than the attempt it continues (a re-queued DVC experiment
    runs in a fresh temporary copy), where the persistent `samples/progress/` output starts empty.
    """
    if not store.progress.is_dir():
        return
    paths.progress.mkdir(parents=True, exist_ok=True)
    for png in store.progress.glob("step_*.png"):
        if not (paths.progress / png.name).exists():
            shutil.copy2(png, paths.progress / png.name)


def _progress_grid(run: Run, tracker, paths: Layout, store: ResumeStore) -> None:
    """Sample the same seeds with the EMA model: one row per class (the seed's table over training)."""
    cfg = run.cfg
    k = cfg.model.num_classes or 1
    tc = cfg.train
    per_class = tc.progress_per_class
    labels = balanced_labels(k * per_class, k).view(per_class, k).t().reshape(-1) if cfg.model.num_classes else None
    settings = SamplerSettings(sampler=tc.progress_sampler, steps=tc.progress_steps, eta=0.0,
                               guidance_scale=tc.progress_guidance_scale, spacing=tc.progress_spacing)
    images, _ = generate(
        run.ema.model, run.diffusion, labels, settings, num=k * per_class,
        device=run.device, seed=cfg.seed, batch_size=tc.batch_size, precision=tc.precision,
    )
    grid = viewable(grid_hwc(images, nrow=per_class))  # small images enlarged for the screen
    save_png(paths.progress / f"step_{run.step:07d}.png", grid)
    save_png(store.progress / f"step_{run.step:07d}.png", grid)  # for a resume in another directory
    if tracker is not None:
        tracker.log_image(f"{TRAIN}/progress", grid, step=run.step)


def _checkpoint(run: Run, store: ResumeStore, data_hash: str) -> None:
    run.stats.collect_on_main(run.ranks)  # collectives: rank 0's checkpoint holds every rank's sums...
    rank_rng = gather_rank_rng(run.ranks)  # ... and every rank's dropout stream
    if run.ranks.is_main:
        store.save(run.payload(data_hash, rank_rng))
    if run.ranks.world_size > 1:
        torch.distributed.barrier()


def _finish(run: Run, store: ResumeStore, tracker, paths: Layout, timing: dict) -> dict:
    """Write the stage outputs: EMA checkpoint, run info, metrics (reproducible numbers apart from timings)."""
    if not (paths.progress / f"step_{run.step:07d}.png").exists():
        _progress_grid(run, tracker, paths, store)  # the final model always gets the progression's last column
    store.finish()
    # a run resumed from a finished (or late) checkpoint in a fresh directory logs nothing more: write
    # every output from the state itself
    _write_plot(paths.loss_plot, run.plot_rows)
    paths.progress.mkdir(parents=True, exist_ok=True)
    save_checkpoint(paths.ema, _ema_payload(run))
    publish_snapshots(store.snapshots, paths.snapshots)  # those saved before an interruption included
    last = run.plot_rows[-1] if run.plot_rows else {"loss": float("nan")}
    metrics = {
        "loss": last["loss"],
        "steps": run.step,
        "images_seen": run.step * run.cfg.train.batch_size,
        "bad_steps": int(run.stats.bad_total.item()),
        "timing": {k: round(v, 3) for k, v in timing.items()},
        "code": run.code,
    }
    write_metrics(paths.train_metrics, metrics)
    write_run_id(paths.train_run, run.run_id, {"code": run.code})
    if tracker is not None:
        tracker.log_final(final_train({k: v for k, v in metrics.items() if k not in ("timing", "code")}))
        tracker.log_model(paths.ema, run.cfg, registered_name=run.cfg.tracking.register_model)
    _write_progression(run, tracker, paths)
    return metrics


def _ema_payload(run: Run) -> dict:
    """The EMA network as `models/ema.pt` (and each snapshot) stores it: weights, training config, class names."""
    return {
        "format_version": FORMAT_VERSION, "config": run.cfg.training_dict(), "step": run.step,
        "ema": run.ema.state_dict(), "class_names": run.class_names,
        # the fingerprint only: with a git commit in it, the same weights would be a new file at each commit
        "code": {"fingerprint": run.code["fingerprint"]},
    }


def _write_progression(run: Run, tracker, paths: Layout) -> None:
    """samples/progression.png from every stored progress grid (those of an interrupted run included)."""
    rows = run.class_names if run.cfg.model.num_classes else []  # an unconditional model's grid: one row
    figure = progression_figure(paths.progress, run.cfg.data.image_size, run.cfg.train.batch_size, rows)
    if figure is None:  # unreachable after _finish's final grid; kept so a missing figure is never silent
        raise UserError(f"no progress grids in {paths.progress} to compose {paths.progression} from")
    save_png(paths.progression, figure)
    if tracker is not None:
        tracker.log_image(f"{TRAIN}/progression", figure, step=run.step)  # MLflow stepped image + TensorBoard
        tracker.log_artifact(paths.progression)

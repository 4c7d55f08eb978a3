"""The training workflow: outputs, exact resume, determinism, the NaN guard, signals, bad input."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_params
from PIL import Image

import ddpm.pipeline.train as train_mod
from ddpm.config import Config, TrainingConfig
from ddpm.core.checkpoint import load_checkpoint
from ddpm.data.datasets import prepare
from ddpm.errors import UserError
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.resume import ResumeStore, resume_key, resume_root
from ddpm.pipeline.train import Interrupted, train

NO_TRACKING = {"mlflow": False, "tensorboard": False, "system_metrics": False}


def _cfg(**sections) -> Config:
    sections.setdefault("tracking", NO_TRACKING)
    return Config.from_dict(tiny_params(**sections))


def _prepared(root: Path, cfg: Config) -> Layout:
    paths = Layout.under(root)
    prepare(cfg, paths.prepared)
    return paths


def _tensors(state, prefix=""):
    """Flatten nested dicts/lists of tensors to {path: tensor}."""
    out = {}
    if isinstance(state, torch.Tensor):
        out[prefix] = state
    elif isinstance(state, dict):
        for k, v in state.items():
            out.update(_tensors(v, f"{prefix}.{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_tensors(v, f"{prefix}[{i}]"))
    return out


def _assert_identical(a: dict, b: dict) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs"


def _crash_on_step(monkeypatch, n: int):
    """Make the n-th call of train_step raise (a crash mid-run); returns a function that undoes it."""
    real_step = train_mod.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step)
    return lambda: monkeypatch.setattr(train_mod, "train_step", real_step)


def test_train_writes_declared_outputs(tmp_path):
    cfg = _cfg()
    paths = _prepared(tmp_path, cfg)
    metrics = train(cfg, paths)
    assert metrics["steps"] == cfg.train.steps
    ckpt = load_checkpoint(paths.ema)
    assert ckpt["config"] == cfg.training_dict()  # the training config travels with the weights
    assert TrainingConfig.from_dict(ckpt["config"]) == cfg.training()
    assert ckpt["class_names"][0] == "circle" and len(ckpt["class_names"]) == 10
    assert all(torch.isfinite(t).all() for t in _tensors(ckpt["ema"]).values())
    stored = json.loads(paths.train_metrics.read_text())
    assert stored["steps"] == cfg.train.steps and "images_per_s" in stored["timing"]
    rows = paths.loss_plot.read_text().splitlines()
    assert rows[0].split("\t")[:2] == ["step", "loss"]
    assert [int(r.split("\t")[0]) for r in rows[1:]] == [2, 4, 6]  # every tracking.log_every steps
    assert sorted(p.name for p in paths.progress.iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert paths.progression.is_file()
    # a finished run keeps only its last resume checkpoint
    store_dir = next(resume_root(tmp_path).iterdir())
    # lock: see ResumeStore.exclusive; progress: the grids kept for a resume in another directory
    # key.json: the params-only key and the code fingerprint behind the folder's name
    # snapshots: the EMA at the progress points, published as models/snapshots/ (the progress stage's input)
    assert sorted(p.name for p in store_dir.iterdir()) == ["key.json", "last.pt", "lock", "progress", "snapshots"]
    assert sorted(p.name for p in (store_dir / "progress").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert sorted(p.name for p in paths.snapshots.iterdir()) == ["step_0000003.pt", "step_0000006.pt"]
    # the final snapshot is models/ema.pt, byte for byte (same payload), and loads like it
    assert (paths.snapshots / "step_0000006.pt").read_bytes() == paths.ema.read_bytes()
    assert load_checkpoint(paths.snapshots / "step_0000003.pt")["step"] == 3


def test_two_clean_runs_are_byte_identical(tmp_path):
    """...even when the sample / evaluate params differ: training never reads them (so DVC's train stage
    does not depend on them, and `dvc exp run -S sample.guidance_scale=2` re-samples without retraining)."""
    cfg = _cfg()
    other = _cfg(sample={"guidance_scale": 3.0, "steps": 7, "grid_per_class": 3, "batch_size": 5},
                 evaluate={"sweep_samples": 11})
    a = _prepared(tmp_path / "a", cfg)
    b = _prepared(tmp_path / "b", other)
    ma, mb = train(cfg, a), train(other, b)
    assert a.ema.read_bytes() == b.ema.read_bytes()
    grids = [[p.read_bytes() for p in sorted(run.progress.iterdir())] for run in (a, b)]
    assert grids[0] == grids[1]
    assert {k: v for k, v in ma.items() if k != "timing"} == {k: v for k, v in mb.items() if k != "timing"}
    assert a.loss_plot.read_text() == b.loss_plot.read_text()


def test_resume_after_a_crash_is_bit_identical(tmp_path, monkeypatch):
    cfg = _cfg(train={"steps": 7, "checkpoint_every": 3})
    reference = _prepared(tmp_path / "ref", cfg)
    train(cfg, reference)

    crashed = _prepared(tmp_path / "crash", cfg)
    undo = _crash_on_step(monkeypatch, 5)  # steps 1-4 done, a checkpoint exists at step 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, crashed)
    assert not crashed.ema.exists()
    undo()
    train(cfg, crashed)  # resumes at step 3
    _assert_identical(load_checkpoint(reference.ema), load_checkpoint(crashed.ema))
    assert reference.loss_plot.read_text() == crashed.loss_plot.read_text()
    # the progression is rebuilt from the stored grids: step 3's (drawn before the crash), 6 and the final 7
    assert sorted(p.name for p in crashed.progress.iterdir()) == [f"step_000000{i}.png" for i in (3, 6, 7)]
    assert reference.progression.read_bytes() == crashed.progression.read_bytes()
    # the EMA snapshots too: step 3's was saved before the crash (kept in the resume store), 6 and 7 after it
    names = [f"step_000000{i}.pt" for i in (3, 6, 7)]
    assert sorted(p.name for p in crashed.snapshots.iterdir()) == names
    assert [(crashed.snapshots / n).read_bytes() for n in names] == [(reference.snapshots / n).read_bytes()
                                                                     for n in names]


def test_snapshots_leave_the_trained_weights_and_the_progress_grids_bit_identical(tmp_path):
    """Catches a snapshot that perturbs training: an RNG draw, a weight or EMA write, a changed data order."""
    off = _cfg(train={"max_snapshots": 0})
    on = _cfg(train={"snapshot_every": 1})  # a snapshot after every one of the 6 steps
    a, b = _prepared(tmp_path / "off", off), _prepared(tmp_path / "on", on)
    train(off, a)
    train(on, b)
    _assert_identical(load_checkpoint(a.ema)["ema"], load_checkpoint(b.ema)["ema"])
    assert a.loss_plot.read_text() == b.loss_plot.read_text()
    grids = [[p.read_bytes() for p in sorted(run.progress.iterdir())] for run in (a, b)]
    assert grids[0] == grids[1]
    assert list(a.snapshots.iterdir()) == []
    assert sorted(p.name for p in b.snapshots.iterdir()) == [f"step_000000{i}.pt" for i in range(1, 7)]
    # each snapshot is the EMA as it was at its step: the EMA counts one update per step
    assert [load_checkpoint(b.snapshots / f"step_000000{i}.pt")["ema"]["num_updates"] for i in (1, 4)] == [1, 4]


def test_a_resume_in_another_directory_publishes_the_stored_snapshots(tmp_path, monkeypatch):
    """A re-queued DVC experiment runs in a fresh copy whose models/snapshots/ is empty: the finished run's
    snapshots must come from the resume store (catches publishing only what this process saved)."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "parent"))  # both copies share the parent's .resume/
    cfg = _cfg()
    first, second = _prepared(tmp_path / "first", cfg), _prepared(tmp_path / "second", cfg)
    train(cfg, first)
    train(cfg, second)  # finds the finished checkpoint: writes the outputs only
    names = ["step_0000003.pt", "step_0000006.pt"]
    assert sorted(p.name for p in second.snapshots.iterdir()) == names
    assert [(second.snapshots / n).read_bytes() for n in names] == [(first.snapshots / n).read_bytes() for n in names]


def _count_steps(monkeypatch) -> dict:
    """Count the optimiser steps the next runs take."""
    real_step, calls = train_mod.train_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step)
    return calls


def test_a_changed_training_param_starts_afresh_and_a_tracking_param_resumes(tmp_path, monkeypatch):
    cfg = _cfg(train={"sample_every": 0})  # 6 steps, a checkpoint every 2
    other = _cfg(train={"sample_every": 0, "lr": 5e-4})
    fresh = _prepared(tmp_path / "fresh", other)
    train(other, fresh)  # the reference: `other` from scratch

    paths = _prepared(tmp_path / "run", cfg)
    undo = _crash_on_step(monkeypatch, 4)  # steps 1-3 done, a checkpoint of `cfg` at step 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, paths)
    undo()
    steps = _count_steps(monkeypatch)
    train(other, paths)  # another learning rate: cfg's checkpoint must not be resumed
    assert steps["n"] == 6 and paths.ema.read_bytes() == fresh.ema.read_bytes()

    steps["n"] = 0
    train(_cfg(train={"sample_every": 0}, tracking={**NO_TRACKING, "log_every": 3}), paths)
    assert steps["n"] == 4  # only tracking differs: resumed cfg's checkpoint at step 2
    data_hash = json.loads((paths.prepared / "meta.json").read_text())["content_hash"]
    assert resume_key(cfg, data_hash, "code") != resume_key(cfg, "another dataset", "code")
    assert resume_key(cfg, data_hash, "code") != resume_key(cfg, data_hash, "other code")


def test_corrupt_last_checkpoint_falls_back_to_previous(tmp_path, caplog):
    cfg = _cfg()
    store = ResumeStore(tmp_path / "store")
    base = {"format_version": 1, "config": cfg.training_dict(), "ema": {}, "model": {}}
    store.save({**base, "step": 1})
    store.save({**base, "step": 2})
    store.last.write_bytes(store.last.read_bytes()[:100])  # truncated, as after a crash mid-copy
    assert store.load()["step"] == 1
    assert "truncated or corrupt" in caplog.text and "trying an older checkpoint" in caplog.text


def test_a_nan_step_is_skipped_and_counted(tmp_path, monkeypatch):
    cfg = _cfg(train={"steps": 4, "max_bad_steps": 2}, tracking={**NO_TRACKING, "log_every": 1})
    paths = _prepared(tmp_path, cfg)
    real_losses = train_mod.GaussianDiffusion.training_losses
    calls = {"n": 0}

    def nan_on_second_call(self, *args, **kwargs):
        calls["n"] += 1
        losses = real_losses(self, *args, **kwargs)
        return losses * float("nan") if calls["n"] == 2 else losses

    monkeypatch.setattr(train_mod.GaussianDiffusion, "training_losses", nan_on_second_call)
    metrics = train(cfg, paths)
    assert metrics["bad_steps"] == 1
    ckpt = load_checkpoint(paths.ema)
    assert all(torch.isfinite(t).all() for t in _tensors(ckpt).values())
    resume = load_checkpoint(next(resume_root(tmp_path).iterdir()) / "last.pt")
    assert all(torch.isfinite(t).all() for t in _tensors(resume["model"]).values())
    # AdamW's own step count shows the skipped update did not happen
    steps = {int(s["step"]) for s in resume["optimizer"]["state"].values()}
    assert steps == {3}


def test_too_many_bad_steps_in_a_row_stop_training(tmp_path, monkeypatch):
    cfg = _cfg(train={"steps": 6, "max_bad_steps": 2}, tracking={**NO_TRACKING, "log_every": 3})
    paths = _prepared(tmp_path, cfg)
    real_losses = train_mod.GaussianDiffusion.training_losses
    monkeypatch.setattr(train_mod.GaussianDiffusion, "training_losses",
                        lambda self, *a, **k: real_losses(self, *a, **k) * float("inf"))
    with pytest.raises(UserError, match="3 consecutive steps had a non-finite loss"):
        train(cfg, paths)
    assert not paths.ema.exists()


def test_sigterm_checkpoints_and_marks_the_run_killed(tmp_path, monkeypatch):
    import mlflow

    cfg = _cfg(tracking={"mlflow": True, "tensorboard": False, "system_metrics": False, "log_every": 1})
    paths = _prepared(tmp_path, cfg)
    real_step = train_mod.train_step
    calls = {"n": 0}

    def terminate_during_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", terminate_during_step_3)
    with pytest.raises(Interrupted) as info:
        train(cfg, paths)
    assert info.value.signum == signal.SIGTERM
    store = ResumeStore(next(resume_root(tmp_path).iterdir()))
    ckpt = store.load()
    assert ckpt["step"] == 3  # the step in flight finished, then the state was saved
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(ckpt["mlflow_run_id"])
    assert run.info.status == "KILLED"

    monkeypatch.setattr(train_mod, "train_step", real_step)
    train(cfg, paths)  # resumes the same MLflow run; its loss history continues
    run = client.get_run(ckpt["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads(paths.train_run.read_text())["mlflow_run_id"] == run.info.run_id


def test_class_count_mismatch_is_a_clear_error(tmp_path):
    cfg = _cfg()
    paths = _prepared(tmp_path, cfg)
    wrong = _cfg(model={"num_classes": 7})
    with pytest.raises(UserError, match="prepared data has 10 classes but model.num_classes is 7"):
        train(wrong, paths)
    assert not paths.ema.exists()


def test_fp16_on_cpu_is_refused(tmp_path):
    cfg = _cfg(train={"precision": "fp16"})
    paths = _prepared(tmp_path, cfg)
    with pytest.raises(UserError, match="fp16"):
        train(cfg, paths)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_weights(tmp_path, procs):
    """A real `kill -9` of `python -m ddpm train` once a checkpoint exists; the rerun resumes from it."""
    import subprocess
    import sys
    import time

    import yaml

    params = tiny_params(train={"steps": 40, "checkpoint_every": 5, "sample_every": 0}, tracking=NO_TRACKING)
    cfg = Config.from_dict(params)
    reference = _prepared(tmp_path / "ref", cfg)
    train(cfg, reference)

    repo = tmp_path / "killed"
    paths = _prepared(repo, cfg)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "ddpm", "train"]
    proc = procs.popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(resume_root(repo).glob("*/previous.pt")) and time.time() < deadline:
        time.sleep(0.05)  # wait until at least two checkpoints exist, i.e. mid-run
    proc.kill()
    proc.wait()
    assert not paths.ema.exists(), "the run finished before it could be killed"
    # killed at any moment: possibly between rotating last.pt to previous.pt and writing the new last.pt,
    # in which case the store falls back to previous.pt
    resumed_from = ResumeStore(next(resume_root(repo).iterdir())).load()["step"]
    assert 0 < resumed_from < 40
    done = procs.run(cmd, timeout=300, cwd=repo)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at step {resumed_from}" in done.stderr
    assert paths.ema.read_bytes() == reference.ema.read_bytes()


def test_low_disk_space_is_warned_about(tmp_path, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    cfg = _cfg(train={"steps": 1})
    paths = _prepared(tmp_path, cfg)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    train(cfg, paths)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("GiB free" in w and "checkpoints and samples" in w for w in warnings), warnings


def test_gradient_accumulation_counts_images_once(tmp_path, monkeypatch):
    cfg = _cfg(train={"grad_accum": 2, "steps": 2, "sample_every": 0})
    paths = _prepared(tmp_path, cfg)
    drawn = []  # the size of every batch the loop takes from the data stream
    real_make = train_mod.make_batches

    def counting_batches(*args, **kwargs):
        stream = real_make(*args, **kwargs)
        real_next = stream.next

        def counted_next():
            x, y = real_next()
            drawn.append(len(x))
            return x, y

        stream.next = counted_next
        return stream

    monkeypatch.setattr(train_mod, "make_batches", counting_batches)
    metrics = train(cfg, paths)
    assert drawn == [4, 4, 4, 4]  # two steps of two micro-batches of 4
    assert metrics["images_seen"] == sum(drawn)
    resume = load_checkpoint(next(resume_root(tmp_path).iterdir()) / "last.pt")
    # two steps of batch 8 as micro-batches of 4: 16 images consumed from the data stream
    assert resume["batches"]["position"] + resume["batches"]["epoch"] * 90 == 16
    with pytest.raises(UserError, match="not divisible by grad_accum"):
        train(_cfg(train={"grad_accum": 3}), paths)


def test_compiled_training_keeps_ema_checkpoints_and_resume_working(tmp_path, monkeypatch):
    """train.compile wraps the model; EMA must keep updating from it, no `_orig_mod.` may leak into files,
    and resume must load into the compiled run. (aot_eager instead of inductor keeps this test fast.)"""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend="aot_eager"))
    eager_cfg = _cfg(train={"steps": 4, "checkpoint_every": 2, "sample_every": 0})
    compiled_cfg = _cfg(train={"steps": 4, "checkpoint_every": 2, "sample_every": 0, "compile": True})
    eager = _prepared(tmp_path / "eager", eager_cfg)
    train(eager_cfg, eager)

    compiled = _prepared(tmp_path / "compiled", compiled_cfg)
    undo = _crash_on_step(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compiled_cfg, compiled)
    undo()
    train(compiled_cfg, compiled)  # resumes at step 2 into a freshly compiled model

    a = load_checkpoint(eager.ema)["ema"]
    b = load_checkpoint(compiled.ema)["ema"]
    assert b["num_updates"] == 4
    assert not any("_orig_mod" in k or k.startswith("module.") for k in b["weights"])
    for k, v in a["weights"].items():
        torch.testing.assert_close(b["weights"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    initial = load_checkpoint(next(resume_root(tmp_path / "compiled").iterdir()) / "last.pt")["model"]
    assert not any("_orig_mod" in k for k in initial)


def test_progress_grid_rows_are_the_classes_in_order(tmp_path, monkeypatch):
    """Row k of a progress grid holds class k's samples, `progress_per_class` of them, in label order."""
    cfg = _cfg(train={"progress_per_class": 3})
    seen = {}

    def fake_generate(model, diffusion, labels, settings, *, num, device, seed, batch_size, precision):
        seen.update(labels=labels, num=num, settings=settings)
        # every image is filled with 20 x its label, so the picture shows where each label landed
        return (labels * 20).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 16, 16), {}

    monkeypatch.setattr(train_mod, "generate", fake_generate)
    run = SimpleNamespace(cfg=cfg, ema=SimpleNamespace(model=None), diffusion=None, device=torch.device("cpu"),
                          step=3)
    paths = Layout.under(tmp_path)
    store = SimpleNamespace(progress=tmp_path / "kept")
    train_mod._progress_grid(run, None, paths, store)
    assert (store.progress / "step_0000003.png").read_bytes() == (paths.progress / "step_0000003.png").read_bytes()
    assert seen["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7,
                                       8, 8, 8, 9, 9, 9]
    assert (seen["settings"].steps, seen["settings"].guidance_scale) == (4, 1.0)  # train.progress_* settings
    grid = np.array(Image.open(paths.progress / "step_0000003.png"))  # (H, W, 3): 10 rows x 3 columns of 16 px
    f = 5  # 56 px wide, enlarged nearest-neighbour by the smallest whole factor reaching 256 px
    assert grid.shape == (f * (2 + 10 * 18), f * (2 + 3 * 18), 3)
    centres = grid[f * (2 + 8) :: f * 18, f * (2 + 8) :: f * 18, 0]  # (10, 3): one pixel inside each tile
    assert centres.tolist() == [[20 * k] * 3 for k in range(10)]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_the_optimised_loss_but_not_the_logged_one(prediction: str) -> None:
    """Each timestep's share of the step is scaled by exactly Hang et al. 2023's min-SNR weight; the log is not.

    The model is one free scalar per timestep (out = P[t]), so the update of P[t] is the gradient of that
    timestep's examples alone: min_snr / uniform row by row is the weight itself. Expected by hand from the
    schedule: SNR(t) = alpha_bar / (1 - alpha_bar), alpha_bar_t = prod_{s<=t} (1 - beta_s); the weight of an
    L_simple term is min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v (Hang et al. 2023,
    "Efficient Diffusion Training via Min-SNR Weighting Strategy", sec. 3.4, as GaussianDiffusion.loss_weights
    documents: the x0-space weight min(SNR, gamma), divided by the factor between that space's error and
    the prediction space's).
    """
    from ddpm.core.diffusion import GaussianDiffusion
    from ddpm.core.runtime import Ranks
    from ddpm.core.schedules import linear_betas
    from ddpm.core.train_step import StepContext, StepStats, train_step

    T, gamma = 100, 5.0

    class KeepGradient(torch.optim.Optimizer):
        """Keeps the gradient the step was given (train_step sets and removes `found_inf`)."""

        def __init__(self, params):
            super().__init__(params, {})

        @torch.no_grad()
        def step(self, closure=None):
            self.grad = self.param_groups[0]["params"][0].grad.double().clone()  # (T,)

    class Batches:
        def next(self):
            return torch.full((64, 1, 2, 2), 0.5), torch.zeros(64, dtype=torch.int64)

    def run(weighting: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
        # (T,) one output per timestep; far from every target, so no row's gradient is a near-cancelling sum
        table = torch.nn.Parameter(torch.full((T,), 10.0))
        seen: list[torch.Tensor] = []

        def model(x, t, y):
            seen.append(t)
            return table[t][:, None, None, None].expand_as(x)  # (B, 1, 2, 2)

        model.parameters = lambda: iter([table])  # what train_step reads the gradients from
        diffusion = GaussianDiffusion(linear_betas(T, 1e-4, 0.02), prediction)  # type: ignore[arg-type]
        opt = KeepGradient([table])
        ctx = StepContext(model, diffusion, opt, None, torch.Generator().manual_seed(1),  # type: ignore[arg-type]
                          "fp32", torch.device("cpu"), Ranks(), None, 0.0, 0.0, 1, weighting, gamma)
        stats = StepStats(torch.device("cpu"))
        train_step(ctx, Batches(), stats)
        return opt.grad, torch.cat(seen), stats.read()

    uniform_grad, t_uniform, uniform_log = run("uniform")
    snr_grad, t, snr_log = run("min_snr")
    assert torch.equal(t, t_uniform)  # same generator: same timesteps and noise
    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))  # (T,)
    snr = alpha_bar / (1.0 - alpha_bar)  # (T,)
    expected = np.minimum(snr, gamma) / (snr if prediction == "eps" else snr + 1.0)  # (T,)
    used = sorted(set(t.tolist()))
    assert snr[used].max() > gamma > snr[used].min()  # both sides of the clamp are sampled
    assert (uniform_grad[used] != 0).all()
    got = (snr_grad[used] / uniform_grad[used]).numpy()
    np.testing.assert_allclose(got, expected[used], rtol=1e-6)
    unused = [s for s in range(T) if s not in used]
    assert (snr_grad[unused] == 0).all() and (uniform_grad[unused] == 0).all()
    # same noise and timesteps: the logged L_simple is identical
    assert snr_log["loss"] == pytest.approx(uniform_log["loss"], rel=1e-12)
    assert snr_log.keys() == uniform_log.keys()

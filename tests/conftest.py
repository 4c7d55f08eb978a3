"""Shared fixtures: a tiny, fast configuration and a prepared `shapes` dataset in a temporary repo."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ddpm.config import Config

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 0,
    "schedule": "linear",
    "data": {"dataset": "shapes", "image_size": 16, "shapes_per_class": 12, "holdout_fraction": 0.25},
    "model": {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
              "num_groups": 8, "dropout": 0.0, "num_classes": 10},
    "diffusion": {"timesteps": 40},
    "train": {"device": "cpu", "batch_size": 8, "steps": 6, "lr": 1e-3, "warmup_steps": 2, "precision": "fp32",
              "compile": False, "channels_last": False, "sample_every": 3, "checkpoint_every": 2,
              "progress_steps": 4, "progress_per_class": 2, "ema_decay": 0.9},
    "sample": {"steps": 4, "num_samples": 20, "batch_size": 20, "grid_per_class": 2, "denoise_frames": 3,
               "guidance_scale": 1.0},
    "evaluate": {"fid": False, "classifier": {"epochs": 1, "width": 8, "batch_size": 32},
                 "guidance_sweep": [0.0, 1.0], "sweep_samples": 20},
    "tracking": {"experiment": "test", "log_every": 2, "system_metrics": False},
}


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge `overrides` into a copy of `base`."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_params(**overrides) -> dict:
    """The tiny params as plain data, with section overrides (`train={"steps": 4}`)."""
    return merge(TINY, overrides)


@pytest.fixture
def tiny_cfg() -> Config:
    return Config.from_dict(tiny_params())


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    """A temporary repository root holding the tiny params.yaml; the cwd for the test."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def project_params_text() -> str:
    """The project's params.yaml as git has it (the index, i.e. committed or staged), else the file.

    The workspace copy is experiment state: `dvc exp run` (so `make quickstart`, the README's first command)
    applies the experiment's params to it, so tests of the project's defaults must not read it.
    """
    out = subprocess.run(["git", "-C", str(ROOT), "show", ":params.yaml"], capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else (ROOT / "params.yaml").read_text()


@pytest.fixture
def project_params(tmp_path: Path) -> Path:
    """A file holding `project_params_text()`, for code that reads params from a path."""
    path = tmp_path / "project_params.yaml"
    path.write_text(project_params_text())
    return path


def recipe_params(name: str, *extra: str) -> dict:
    """The params `recipes/NAME.yaml` runs (with `-S KEY=VALUE` texts `extra`): its overrides, as the recipe
    command passes them to `dvc exp run`, applied to params.yaml as git has it (a dict)."""
    from ddpm.pipeline.recipe import recipe_overrides

    params = yaml.safe_load(project_params_text())
    for key, text in recipe_overrides(ROOT / "recipes" / f"{name}.yaml", params, list(extra)).items():
        *parents, leaf = key.split(".")
        node = params
        for p in parents:
            node = node[p]
        assert leaf in node, f"{key} is not in params.yaml"
        node[leaf] = yaml.safe_load(text)
    return params


# --------------------------------------------------------------------------------- subprocesses


class Processes:
    """Every subprocess a test starts, each leading its own process group (its `dvc`/`python -m stages.*`
    children included), so teardown can end the whole group, whether the test passed or failed."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        """`subprocess.Popen` in a new session (process group), owned by this fixture."""
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, args: list[str], timeout: float, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
        """Like `subprocess.run(args, capture_output=True, text=True, timeout=...)`, but a time-out ends the
        whole process group (plain `subprocess.run` kills only the direct child) before raising."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = self.popen(args, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.end(proc)
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    @staticmethod
    def end(proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left of it after `grace` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break  # nothing of the group is left
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(proc.pid):
                proc.poll()  # reap the leader, so it does not count as alive
                time.sleep(0.05)
            if not _group_alive(proc.pid):
                break
        proc.poll()

    def end_all(self) -> None:
        for proc in self._procs:
            self.end(proc)
        self._procs.clear()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@pytest.fixture
def procs():
    """Start subprocesses through this (`procs.popen`, `procs.run`): teardown ends their process groups."""
    owned = Processes()
    try:
        yield owned
    finally:
        owned.end_all()

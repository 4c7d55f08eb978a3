"""Where a run comes from: git commit and dirty flag, the DVC experiment, the run name, and how a derived
run (sampling/evaluation of a cached training) relates to the training run it samples."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm.config import Config

if TYPE_CHECKING:
    pass


FINAL_KEYS_TAG = "ddpm.final_metrics"  # comma-separated keys logged through log_final
TRAIN_RUN_TAG = "ddpm.train_run_id"  # on a derived run (see Tracker.start): the training run it samples

# --------------------------------------------------------------------------------------------
# Run metadata
# --------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str | None:
    """Output of a git command in `repo`, or None without git / outside a repository."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_tags(repo: Path) -> dict[str, str]:
    """The commit (as MLflow's own source tag, so the UI shows it) and whether the tree is dirty."""
    commit = _git(repo, "rev-parse", "HEAD")
    if not commit:
        return {}
    status = _git(repo, "status", "--porcelain")
    tags = {"mlflow.source.git.commit": commit}
    if status is not None:
        tags["git.dirty"] = str(bool(status)).lower()
    return tags


def source_tags(repo: Path) -> dict[str, str]:
    """MLflow's *Source* column: the script that runs (relative to the repository when inside it), LOCAL.

    `mlflow run` writes its own (type PROJECT) into the run it creates; those are never overwritten.
    """
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c") else "python"
    script = Path(argv0).resolve()
    root = Path(repo).resolve()
    name = str(script.relative_to(root)) if script.is_relative_to(root) else str(script)
    return {"mlflow.source.name": name, "mlflow.source.type": "LOCAL"}


def dvc_tags() -> dict[str, str]:
    """The DVC experiment baseline and name, when running under `dvc exp run`."""
    names = {"DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev", "DVC_EXP_NAME": "dvc.exp_name"}
    return {tag: os.environ[env] for env, tag in names.items() if os.environ.get(env)}


def default_run_name(cfg: Config, run_name: str | None) -> str:
    """`DVC_EXP_NAME` when set, else the caller's name, else `<dataset>-<schedule>-<timestamp>`."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    if run_name:
        return run_name
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.data.dataset}-{cfg.schedule}-{stamp}"



def param_text(value: Any) -> str:
    """How MLflow stores a param value (lists as JSON-ish text, like `str`)."""
    return str(value)


def final_keys(tags: Mapping[str, str]) -> list[str]:
    """The keys recorded by `log_final` (the run's final-metrics tag)."""
    return [k for k in tags.get(FINAL_KEYS_TAG, "").split(",") if k]


def changed_params(stored: Mapping[str, str], params: Mapping[str, Any]) -> list[str]:
    """The params whose value differs from (or is missing in) a run's logged params."""
    return [k for k, v in params.items() if stored.get(k) != param_text(v)]


def train_run_id(run: Any) -> str:
    """The training run behind `run`: its `ddpm.train_run_id` tag for a derived run, else the run itself."""
    return run.data.tags.get(TRAIN_RUN_TAG) or run.info.run_id


def param_overrides(stored: Mapping[str, str], params: Mapping[str, Any]) -> dict[str, str]:
    """Tags for config values that differ from the re-opened run's params (MLflow params are immutable).

    E.g. training resumed after a crash with other `sample` or `evaluate` params (the resume key only
    hashes the training sections): the run continues, and the values now in force stay visible.
    """
    return {
        f"param_override.{k}": param_text(v)
        for k, v in params.items()
        if k in stored and stored[k] != param_text(v)
    }

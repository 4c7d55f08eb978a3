"""Temporary git + DVC repositories holding this project's pipeline, and running the real tools in them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT, tiny_params
from processes import Processes

from ddpm.config import Config

DVC = [sys.executable, "-m", "dvc"]
DATA_STAGES = ["prepare", "classifier", "fid_stats"]  # what no diffusion experiment changes


def tool_env() -> dict:
    """The environment for `dvc`/`mlflow`/stage commands: `python` in dvc.yaml is this venv's."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    for k in ("DVC_ROOT", "MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        env.pop(k, None)
    return env


def run_ok(procs: Processes, cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`cmd` in `cwd` (owned by `procs`), which must succeed."""
    proc = procs.run(cmd, timeout=900, cwd=cwd, env=tool_env())
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def init_pipeline_repo(procs: Processes, root: Path) -> Path:
    """A fresh git + DVC repository at `root` holding this project's pipeline with the tiny params, committed."""
    for item in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / item, root / item)
    for folder in ("stages", "ddpm"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = tiny_params(tracking={"experiment": "cmp", "log_every": 2, "system_metrics": False,
                                   "tensorboard": True})
    full = Config.from_dict(params).to_dict()  # DVC needs every key a stage lists to be in the file
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    run_ok(procs, ["git", "init", "-q"], root)
    run_ok(procs, ["git", "config", "user.email", "t@example.com"], root)
    run_ok(procs, ["git", "config", "user.name", "test"], root)
    run_ok(procs, [*DVC, "init", "-q"], root)
    run_ok(procs, ["git", "add", "-A"], root)
    run_ok(procs, ["git", "commit", "-qm", "pipeline"], root)
    return root


def reproduce_data_stages(procs: Processes, root: Path) -> None:
    """`dvc repro` of the data stages in a pipeline repo, committed (dvc.lock and the outputs' .gitignore)."""
    run_ok(procs, [*DVC, "repro", *DATA_STAGES], root)
    run_ok(procs, ["git", "add", "-A"], root)
    run_ok(procs, ["git", "commit", "-qm", "data stages"], root)
    stores = [p.name for p in root.iterdir() if p.name in ("mlflow.db", "mlartifacts", "logs", ".resume")]
    assert not stores, f"the data stages wrote {stores}: a copy would share their absolute paths"


def copy_repo(source: Path, dest: Path) -> Path:
    """A copy of a pipeline repo (git history, DVC cache and outputs) at `dest`; DVC's scratch `.dvc/tmp`
    (locks, its hash state) is left for DVC to rebuild there."""
    shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True,
                    ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc" else [])
    return dest

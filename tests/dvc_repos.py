"""Temporary git + DVC repositories holding this project's pipeline, and running the real tools in them."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
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


def reproduce_pipeline(procs: Processes, root: Path) -> None:
    """`dvc repro` of the whole pipeline, committed (what a user has after the quickstart and a commit)."""
    run_ok(procs, [*DVC, "repro"], root)
    run_ok(procs, ["git", "add", "-A"], root)
    run_ok(procs, ["git", "commit", "-qm", "trained"], root)


def copy_repo(source: Path, dest: Path) -> Path:
    """A copy of a pipeline repo (git history, DVC cache and outputs, the MLflow store) at `dest`; DVC's
    scratch `.dvc/tmp` (locks, its hash state) is left for DVC to rebuild there.

    The MLflow store names its artifact folders by absolute path (in mlflow.db and in each logged model's
    MLmodel): they are moved to the copy's, so a run the copy re-opens or creates writes its artifacts into
    the copy, not into `source` (shared by other tests)."""
    shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True,
                    ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc" else [])
    old, new = str(source.resolve()), str(dest.resolve())
    if (dest / "mlflow.db").exists():
        _relocate_store(dest / "mlflow.db", old, new)
    for model_file in (dest / "mlartifacts").rglob("MLmodel"):
        model_file.write_text(model_file.read_text().replace(old, new))
    return dest


def _relocate_store(db: Path, old: str, new: str) -> None:
    """Replace the path prefix `old` by `new` in every text column of the sqlite store that holds it."""
    with contextlib.closing(sqlite3.connect(db)) as con, con:  # closed, and committed
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")') if "CHAR" in r[2].upper()
                       or "TEXT" in r[2].upper()]
            for col in columns:
                con.execute(f'UPDATE "{table}" SET "{col}" = replace("{col}", ?, ?) WHERE instr("{col}", ?) > 0',
                            (old, new, old))


def built_once(root: Path, build: Callable[[Processes, Path], None]) -> Path:
    """`root`, made by `build(procs, root)` unless another process of this test run already made it (the
    processes it starts are owned by `procs` and ended when it returns or fails): pytest-xdist's workers each
    build their own session fixtures, so a setup they share is built under one lock, once."""
    done = root.with_name(root.name + ".done")
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if build fails
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed in another worker
            root.mkdir(parents=True)
            owned = Processes(workdir=root)
            try:
                build(owned, root)
            finally:
                owned.end_all()
            done.touch()
    return root

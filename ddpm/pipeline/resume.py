"""Where an interrupted training run keeps its state, so that running the stage again continues it.

DVC deletes a stage's (non-persistent) outputs before running it and `dvc exp run` checks out the
baseline's outputs, so resume state lives outside every DVC output: in
`<store root>/.resume/<key>/`, where the key hashes every training-relevant param, the dataset's
content hash and the fingerprint of the training code (`ddpm.pipeline.fingerprint`). Changing any of
them gives another key, so a run never resumes from an incompatible checkpoint, nor from one that other
code made; `key.json` in each folder records its params-only key and code fingerprint, so a start can
say that (and which) checkpoint of the same params it is not resuming. Two files are kept while training
(`last.pt` and `previous.pt`, so a corrupt last one falls back to the one before); a finished run keeps
only `last.pt`.

The store root is the parent repository under `dvc exp run --temp/--queue` (`DVC_ROOT`), not the
temporary copy the stage runs in, which DVC deletes: a killed queued experiment resumes when it is
queued again, and the key keeps experiments apart. Two experiments with the same training params
(e.g. a sweep over `sample.*` run with `dvc queue start -j 2`) share one key: `exclusive()` makes the
second wait for the first, then it finds the finished checkpoint and only writes the outputs.

`run.json` records the MLflow run id as soon as the run is created, before the first checkpoint, so a
run killed before it checkpointed is continued (same MLflow run, same TensorBoard dir) by the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddpm.config import Config
from ddpm.core.atomic import write_text
from ddpm.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ddpm.tracking.store import store_root

log = logging.getLogger(__name__)


def params_key(cfg: Config, data_hash: str, world_size: int = 1) -> str:
    """A short hash of the training params, the data and the number of ranks: the resume key without the code.

    The world size is the one the processes really train with (`RANK`/`WORLD_SIZE` of the launcher or of a
    hand-started torchrun), not `train.nproc_per_node`: N ranks all-reduce their gradients in another order
    than one process sums them (float-level differences) and each continues its own dropout stream, so a
    checkpoint resumes bit-for-bit only at its own world size. Another world size trains from step 0. One
    process hashes what it always hashed.
    """
    ranks = {"world_size": world_size} if world_size > 1 else {}
    return _short_hash(cfg.training_dict() | {"data_hash": data_hash} | ranks)


def resume_key(cfg: Config, data_hash: str, code_fingerprint: str, world_size: int = 1) -> str:
    """A short hash of everything that determines the trained weights: params, data, ranks and training code."""
    return _short_hash({"params_key": params_key(cfg, data_hash, world_size), "code_fingerprint": code_fingerprint})


def _short_hash(relevant: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def checkpoints_of_other_code(root: Path, params: str, code_fingerprint: str) -> list[tuple[Path, str]]:
    """`(folder, its code fingerprint)` of every resume folder under `root` holding a checkpoint of the same
    params and data (`params`, a `params_key`) made by other training code; the newest first.

    A folder without `key.json` named `params` was made before the key covered the code ("unrecorded").
    """
    found = []
    for folder in root.glob("*/"):
        store = ResumeStore(folder)
        recorded = store.recorded_key() or ({"params_key": params, "code_fingerprint": "unrecorded"}
                                            if folder.name == params else {})
        other_code = recorded.get("params_key") == params and recorded.get("code_fingerprint") != code_fingerprint
        if other_code and store.newest_mtime():
            found.append((folder, str(recorded["code_fingerprint"])))
    return sorted(found, key=lambda item: ResumeStore(item[0]).newest_mtime(), reverse=True)


def resume_root(repo_root: Path) -> Path:
    """The `.resume/` folder (git- and DVC-ignored) of the store root: the parent repository under
    `dvc exp run --temp/--queue`, else `repo_root` (see the module docstring)."""
    return store_root(repo_root) / ".resume"


class ResumeStore:
    """The last two training checkpoints of one configuration."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.last = directory / "last.pt"
        self.previous = directory / "previous.pt"
        self.run_info = directory / "run.json"
        self.key_info = directory / "key.json"  # what the key covers: {"params_key", "code_fingerprint"}
        self.progress = directory / "progress"  # copies of the progress grids, for a resume elsewhere
        self.snapshots = directory / "snapshots"  # EMA snapshots for the progress stage (models/snapshots/)

    def load(self, map_location: Any = "cpu") -> dict | None:
        """The newest readable checkpoint, or None for a fresh start; a corrupt last one falls back."""
        for path in (self.last, self.previous):
            if not path.exists():
                continue
            try:
                return load_checkpoint(path, map_location=map_location)
            except CheckpointError as err:
                log.warning("%s; trying an older checkpoint", err)
        return None

    def save(self, payload: dict) -> None:
        """Write a new last checkpoint, keeping the current one as previous (both writes atomic)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.last.exists():
            self.last.replace(self.previous)
        save_checkpoint(self.last, payload)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold this configuration's lock while training: a second process with the same key waits.

        An flock, so the kernel releases it when the holder dies (even by SIGKILL).
        """
        import fcntl  # POSIX only

        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another training of the same params to finish ({self.dir})", file=sys.stderr)
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def record_key(self, params: str, code_fingerprint: str) -> None:
        """Remember the params-only key and the code fingerprint behind this folder's key (atomic write)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text(self.key_info, json.dumps({"params_key": params, "code_fingerprint": code_fingerprint}) + "\n")

    def recorded_key(self) -> dict[str, Any]:
        """What `record_key` wrote ({} when nothing readable was recorded)."""
        try:
            recorded = json.loads(self.key_info.read_text())
        except (OSError, ValueError):
            return {}
        return recorded if isinstance(recorded, dict) else {}

    def newest_mtime(self) -> float:
        """When a checkpoint was last written here (0 without one)."""
        return max((p.stat().st_mtime for p in (self.last, self.previous) if p.exists()), default=0.0)

    def recorded_run_id(self) -> str | None:
        """The MLflow run id a start with this key created (None when none was recorded)."""
        if not self.run_info.is_file():
            return None
        try:
            return json.loads(self.run_info.read_text()).get("mlflow_run_id") or None
        except (ValueError, AttributeError):
            return None  # a damaged record only costs the continuity of the MLflow run

    def record_run_id(self, run_id: str | None) -> None:
        """Remember the MLflow run right after it is created (atomic write)."""
        if not run_id:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text(self.run_info, json.dumps({"mlflow_run_id": run_id, "pid": os.getpid()}) + "\n")

    def finish(self) -> None:
        """A finished run keeps only its last checkpoint."""
        self.previous.unlink(missing_ok=True)

"""Where an interrupted training run keeps its state, so that running the stage again continues it.

DVC deletes a stage's (non-persistent) outputs before running it and `dvc exp run` checks out the
baseline's outputs, so resume state lives outside every DVC output: in
`<repo root>/.resume/<key>/`, where the key hashes every training-relevant param and the dataset's
content hash. Changing any of them gives another key, so a run never resumes from an incompatible
checkpoint. Two files are kept while training (`last.pt` and `previous.pt`, so a corrupt last one
falls back to the one before); a finished run keeps only `last.pt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ddpm.config import Config
from ddpm.core.checkpoint import load_checkpoint, save_checkpoint
from ddpm.errors import UserError

log = logging.getLogger(__name__)


def resume_key(cfg: Config, data_hash: str) -> str:
    """A short hash of everything that determines the trained weights."""
    relevant = cfg.training_dict() | {"data_hash": data_hash}
    blob = json.dumps(relevant, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def resume_root(repo_root: Path) -> Path:
    """The `.resume/` folder of the repository (git- and DVC-ignored)."""
    return repo_root / ".resume"


class ResumeStore:
    """The last two training checkpoints of one configuration."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.last = directory / "last.pt"
        self.previous = directory / "previous.pt"

    def load(self, map_location: Any = "cpu") -> dict | None:
        """The newest readable checkpoint, or None for a fresh start; a corrupt last one falls back."""
        for path in (self.last, self.previous):
            if not path.exists():
                continue
            try:
                return load_checkpoint(path, map_location=map_location)
            except UserError as err:
                log.warning("%s; trying an older checkpoint", err)
        return None

    def save(self, payload: dict) -> None:
        """Write a new last checkpoint, keeping the current one as previous (both writes atomic)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.last.exists():
            self.last.replace(self.previous)
        save_checkpoint(self.last, payload)

    def finish(self) -> None:
        """A finished run keeps only its last checkpoint."""
        self.previous.unlink(missing_ok=True)

"""EMA snapshots at progress points, for the progress stage's quality curve (scored after training).

Training saves the EMA weights (the `models/ema.pt` format: weights_only loadable, config and class names
inside) at `snapshot_steps(train)` into the resume store, `.resume/<key>/snapshots/`, so they survive a
kill and a resume in another directory like the progress grids; the train stage's output folder
`models/snapshots/` is published from there at the end. Which steps is decided before training starts
(a pure function of the params), so the set is bounded without deleting anything during the run.

Fingerprinted (`ddpm.pipeline.fingerprint`): the stored snapshots of a finished run are reused as they are,
so code that would pick other steps must not resume that run.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ddpm.config import TrainConfig

SNAPSHOT_NAME = re.compile(r"step_(\d+)\.pt")


def snapshot_steps(train: TrainConfig) -> list[int]:
    """The steps training snapshots its EMA at: every `snapshot_every` steps (0: every `sample_every`, the
    progress points) and the final step, thinned evenly to at most `max_snapshots` (first and last kept)."""
    every = train.snapshot_every or train.sample_every
    candidates = list(range(every, train.steps + 1, every)) if every else []
    if not candidates or candidates[-1] != train.steps:
        candidates.append(train.steps)
    keep, n = train.max_snapshots, len(candidates)
    if keep >= n:
        return candidates
    if keep <= 1:
        return candidates[n - keep:]  # [] or the final model alone
    return [candidates[round(i * (n - 1) / (keep - 1))] for i in range(keep)]  # distinct: n > keep


def snapshot_name(step: int) -> str:
    """`step_0000500.pt`: sorts by step like the progress grids' names."""
    return f"step_{step:07d}.pt"


def stored_snapshots(folder: Path) -> list[tuple[int, Path]]:
    """The snapshots in `folder` as (step, path), in step order."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("step_*.pt") if (m := SNAPSHOT_NAME.fullmatch(p.name))]
    return sorted(found)


def publish_snapshots(store: Path, out: Path) -> list[int]:
    """Make `out` hold exactly the snapshots in `store` (hard links where the file system allows, else copies:
    the reference network's snapshots are 143 MB each); return their steps."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    steps = []
    for step, path in stored_snapshots(store):
        try:
            os.link(path, out / path.name)
        except OSError:
            shutil.copy2(path, out / path.name)
        steps.append(step)
    return steps

"""The TensorBoard side of a `Tracker`: its run directory, its writer and the HParams tab's final metrics.

TensorBoard is imported inside the functions (importing it costs seconds; a run with it off never does).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm.tracking.store import safe_name

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TB_DIR_TAG = "ddpm.tensorboard_dir"  # so a re-opened run writes into its own TensorBoard dir


def tb_hparams(params: Mapping[str, Any]) -> dict[str, int | float | str | bool]:
    """TensorBoard accepts only scalars and strings as hyperparameters: lists and None become text."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}


def run_dir_name(base: Path, run_name: str, recorded: str | None, run_id: str | None) -> str:
    """The run's `recorded` TensorBoard dir; for a new run its name, made unique if already taken."""
    if recorded:
        return recorded
    name = safe_name(run_name)
    if (base / name).exists():  # a rerun under the same name must not mix its curves into the old run
        suffix = run_id[:8] if run_id else datetime.datetime.now().strftime("%H%M%S%f")
        name = f"{name}-{suffix}"
    return name


def open_writer(run_dir: Path, resume_step: int | None) -> SummaryWriter:
    """A SummaryWriter in `run_dir`; after a resume from `resume_step` TensorBoard drops the crashed
    attempt's events logged after the checkpoint (`purge_step`)."""
    from torch.utils.tensorboard import SummaryWriter

    purge = resume_step + 1 if resume_step is not None else None
    return SummaryWriter(str(run_dir), purge_step=purge, flush_secs=30)


def log_final_hparams(writer: SummaryWriter, hparams: Mapping[str, Any], final: Mapping[str, float],
                      values: Mapping[str, float], step: int) -> None:
    """The three hparams summaries + the metric scalars `values`, all in the writer's own run directory
    (not `add_hparams`, which opens a timestamped sub-run), so the HParams table row is this run.

    `final`: every final metric seen so far, which the experiment summary lists (not only this call's).
    """
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    exp, ssi, sei = hparams_summaries(dict(hparams), dict(final))
    file_writer = writer.file_writer
    assert file_writer is not None
    for summary in (exp, ssi, sei):
        file_writer.add_summary(summary, step)
    for key, value in values.items():
        writer.add_scalar(key, value, step)
    writer.flush()

"""The `Tracker`: one pipeline run in MLflow and TensorBoard.

Workflows (train, sample, evaluate) hold a `Tracker` and call `log_metrics` / `log_image` /
`log_final`; the tracker fans each call out to MLflow (sqlite store) and TensorBoard. The train
stage creates the MLflow run; sample and evaluate re-open it by id, so one run holds the whole
pipeline (or derive a child run when their params differ, see `ddpm.tracking.opening`).

MLflow and TensorBoard are imported lazily inside the functions that need them: importing them
costs seconds, and a run with tracking disabled must not touch them at all.
"""


from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ddpm.config import Config, flatten
from ddpm.errors import Interrupted, UserError
from ddpm.tracking.lineage import FINAL_KEYS_TAG, default_run_name, dvc_tags, git_tags
from ddpm.tracking.opening import HOST_RUN_ENV, open_run, set_tags
from ddpm.tracking.signals import StopSignals
from ddpm.tracking.store import retrying, store_root
from ddpm.tracking.tensorboard import TB_DIR_TAG, log_final_hparams, open_writer, run_dir_name, tb_hparams

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.utils.async_logging.run_operations import RunOperations
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["HOST_RUN_ENV", "RunStatus", "Tracker", "exit_status"]

log = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "KILLED", "FAILED"]

_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit for metrics
_MAX_PENDING = 32  # async metric batches in flight before we wait on them (bounds memory)
_KILLED_DETAIL = "the MLflow run is marked KILLED; run the stage again"


def exit_status(exc_type: type[BaseException] | None) -> RunStatus:
    """How a run ends: FINISHED without an exception, KILLED for an interruption, FAILED otherwise."""
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, Interrupted | KeyboardInterrupt | SystemExit):
        return "KILLED"
    return "FAILED"


class Tracker:
    """One pipeline run in MLflow + TensorBoard. Build it with `Tracker.start`, use it as a context manager.

    The one way a stage ends its run: `with Tracker.start(...) as tracker:` opened before the work, it
    finishes with FINISHED on success, KILLED on an interruption (SIGINT/SIGTERM, which raise
    `Interrupted` from `start` until the run ends, see `ddpm.tracking.signals`, or KeyboardInterrupt/SystemExit)
    and FAILED on any other exception. A stop signal that arrives while the run is being ended is not lost:
    the run ends KILLED and `Interrupted` is raised once it has.
    `Tracker()` is a tracker that logs nothing (a stage whose pipeline run has no MLflow run).
    """

    def __init__(self) -> None:
        self.run_id: str | None = None  # None when MLflow tracking is off
        self.run_name: str = ""
        self.tensorboard_dir: Path | None = None
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None
        self._client: MlflowClient | None = None
        self._writer: SummaryWriter | None = None
        self._system_monitor: Any = None
        self._pending: list[tuple[RunOperations, list[Metric]]] = []
        self._hparams: dict[str, int | float | str | bool] = {}
        self._final: dict[str, float] = {}
        self._last_step = 0
        self._finished = False
        self._asynchronous = False
        self._signals = StopSignals(_KILLED_DETAIL)

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        cfg: Config,
        repo_root: Path,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        new_run_if_params_differ: bool = False,
        asynchronous: bool = True,
    ) -> Tracker:
        """Create (or, with `run_id`, re-open) the run and open its TensorBoard writer.

        `repo_root` is where the code runs (git tags come from it); the store lives at
        `store_root(repo_root)`. `resume_step`: training resumed from a checkpoint at that step,
        so TensorBoard drops the events logged after it by the crashed attempt.

        `new_run_if_params_differ` (sample, evaluate): when the params differ from those `run_id` logged
        (`dvc exp run -S sample.guidance_scale=2` re-runs sampling on a training DVC took from its cache),
        results must not overwrite the other experiment's, so a NEW run is made: the current params, a
        child of the training run (`mlflow.parentRunId`, tag `ddpm.train_run_id`), starting with a copy
        of the training's final metrics. Without it (train resuming), the run is re-opened and the
        differing values are recorded as `param_override.*` tags. See `ddpm.tracking.opening.open_run`.

        `asynchronous` (training): metrics go through MLflow's async logger, so a training loop never waits
        on the store (~1 ms a call instead of ~10 ms, and no stall while another process holds the sqlite
        lock); ending such a run costs ~1 s (MLflow's logging thread polls its queue once a second), so the
        stages that log a few batches at their end (sample, evaluate, progress) pass False and write them
        synchronously.
        """
        self = cls()
        self._asynchronous = asynchronous
        self._signals.__enter__()  # before the run exists: a SIGTERM from now on ends it KILLED, never RUNNING
        try:
            repo_root = Path(repo_root)
            params = flatten(cfg.to_dict())
            self._hparams = tb_hparams(params)
            self.run_name = default_run_name(cfg, run_name)
            all_tags = {**git_tags(repo_root), **dvc_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
            if resume_step is not None:
                self._last_step = resume_step
            if cfg.tracking.mlflow:
                self._start_mlflow(cfg, repo_root, run_id, params, all_tags, new_run_if_params_differ)
            if cfg.tracking.tensorboard:
                self._start_tensorboard(store_root(repo_root), resume_step)
        except BaseException as err:
            self.finish(exit_status(type(err)))
            raise
        return self

    def _start_mlflow(
        self, cfg: Config, repo_root: Path, run_id: str | None, params: dict[str, Any], tags: dict[str, str],
        new_run_if_params_differ: bool,
    ) -> None:
        """The run `open_run` finds or makes, and MLflow's system metrics when on."""
        opened = open_run(cfg, repo_root, self.run_name, run_id, params, tags, new_run_if_params_differ)
        self._client, self.tracking_uri, self.experiment_id = opened.client, opened.tracking_uri, opened.experiment_id
        self.run_id, self.run_name, self._final = opened.run_id, opened.run_name, opened.final
        if opened.copied_finals:
            self.log_final(opened.copied_finals)
        if cfg.tracking.system_metrics:
            self._start_system_metrics(resume=self.run_id == run_id)  # a re-opened run continues its steps

    def _start_system_metrics(self, resume: bool) -> None:
        """MLflow's own background system metrics (CPU, memory, disk, network, GPU) under `system/`."""
        try:
            import psutil  # noqa: F401 - MLflow's monitor needs it; without it we skip quietly
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,
            )
        except ImportError:
            log.warning("psutil is not installed: MLflow system metrics are off (pip install psutil)")
            return
        self._system_monitor = SystemMetricsMonitor(
            self.run_id, resume_logging=resume, tracking_uri=self.tracking_uri
        )
        self._system_monitor.start()

    def _start_tensorboard(self, root: Path, resume_step: int | None) -> None:
        """A SummaryWriter in logs/tensorboard/<run name>/ (the MLflow run's own dir when re-opened)."""
        base = root / "logs" / "tensorboard"
        mlflow_run = self._client is not None and self.run_id is not None
        recorded = self._client.get_run(self.run_id).data.tags.get(TB_DIR_TAG) if mlflow_run else None
        name = run_dir_name(base, self.run_name, recorded, self.run_id)
        self.tensorboard_dir = base / name
        self._writer = open_writer(self.tensorboard_dir, resume_step)
        if mlflow_run:
            set_tags(self._client, self.run_id, {TB_DIR_TAG: name})

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_status(exc_type))

    def finish(self, status: RunStatus = "FINISHED") -> None:
        """Flush everything, end the MLflow run with `status` and close TensorBoard (idempotent).

        A stop signal during this cleanup does not cut it short: the run then ends KILLED, and a run that
        was finishing raises `Interrupted` once it is closed.
        """
        if self._finished:
            return
        self._finished = True
        requested = status
        try:
            with self._signals.deferred():
                if self._system_monitor is not None:
                    self._system_monitor.finish()
                self.flush()
                if self._signals.received is not None:
                    status = "KILLED"
                if self._client is not None and self.run_id is not None:
                    retrying("set_terminated", self._client.set_terminated, self.run_id, status)
                if self._writer is not None:
                    self._writer.close()
        finally:
            self._signals.release()
        if self._signals.received is not None and requested == "FINISHED":  # else an exception is on its way
            raise Interrupted(self._signals.received, _KILLED_DETAIL)

    def flush(self) -> None:
        """Wait for every queued MLflow write (retrying failed ones) and flush TensorBoard to disk."""
        self._drain()
        if self._writer is not None:
            self._writer.flush()

    # ---- logging ---------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars at `step`: MLflow (asynchronous, ~1 ms per call) and TensorBoard."""
        values = {k: float(v) for k, v in metrics.items()}
        self._last_step = max(self._last_step, step)
        if self._client is not None and values:
            self._send(values, step)
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)

    def _send(self, values: Mapping[str, float], step: int) -> None:
        """A metric batch to MLflow: queued on its async logger when `asynchronous`, else written now."""
        from mlflow.entities import Metric

        assert self._client is not None and self.run_id is not None
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), _METRICS_PER_BATCH):
            chunk = metrics[i : i + _METRICS_PER_BATCH]
            if not self._asynchronous:
                retrying("log_batch", self._client.log_batch, self.run_id, metrics=chunk, synchronous=True)
                continue
            op = self._client.log_batch(self.run_id, metrics=chunk, synchronous=False)
            self._pending.append((op, chunk))
        if len(self._pending) >= _MAX_PENDING:
            self._drain()

    def _drain(self) -> None:
        """Wait for the queued batches; a batch the store rejected is written again synchronously."""
        pending, self._pending = self._pending, []
        for op, metrics in pending:
            try:
                op.wait()
            except Exception:  # noqa: BLE001 - the async logger wraps every store error
                assert self._client is not None and self.run_id is not None
                retrying("log_batch", self._client.log_batch, self.run_id, metrics=metrics)

    def log_image(self, key: str, image: Any, step: int) -> None:
        """An (H, W, C) uint8 image at `step`: MLflow's stepped images (artifacts under images/) + TensorBoard."""
        if self._client is not None and self.run_id is not None:
            # synchronous: images are rare (every sample_every steps) and the PNG must exist before finish
            retrying("log_image", self._client.log_image, self.run_id, image, key=key, step=step, synchronous=True)
        if self._writer is not None:
            self._writer.add_image(key, image, step, dataformats="HWC")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (or a whole directory) into the run's artifacts, optionally under `artifact_path`."""
        if self._client is None or self.run_id is None:
            return
        path = Path(path)
        if not path.exists():
            raise UserError(f"cannot log artifact {path}: it does not exist; write it before logging it")
        upload = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        retrying("log_artifact", upload, self.run_id, str(path), artifact_path)

    def log_dataset(self, cfg: Config, prepared_dir: Path, content_hash: str, num_train: int, num_eval: int,
                    class_names: list[str]) -> None:
        """The training data as an MLflow dataset input (the runs table's *Dataset* column), context `training`.

        Name, digest (the content hash), source and profile (image and class counts): `ddpm.tracking.inputs`.
        """
        if self._client is None or self.run_id is None:
            return
        from mlflow.entities import DatasetInput, InputTag

        from ddpm.tracking.inputs import dataset_entity

        dataset = dataset_entity(cfg, prepared_dir, content_hash, num_train, num_eval, class_names)
        entry = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])
        retrying("log_inputs", self._client.log_inputs, self.run_id, datasets=[entry])

    def log_model(self, checkpoint: Path, cfg: Config, registered_name: str | None = None) -> None:
        """The EMA checkpoint as the run's MLflow pyfunc model `ema` (`ddpm.tracking.mlflow_model`).

        Registered in the Model Registry as `registered_name` when given. Like every tracking write, a
        failure is a warning: the DVC outputs are written already and must not be lost to it.
        """
        if self._client is None or self.run_id is None:
            return
        from ddpm.tracking.mlflow_model import log_ema_model

        self._drain()  # MLflow copies the run's metrics at `step` into the model
        try:
            experiment_id = self._client.get_run(self.run_id).info.experiment_id  # a re-opened run's own
            info = log_ema_model(self.tracking_uri, self.run_id, experiment_id, checkpoint, cfg,
                                 step=self._last_step, registered_name=registered_name)
        except Exception as err:  # noqa: BLE001 - see docstring
            log.warning("MLflow could not log the model %s: %s", checkpoint, err)
            return
        log.info("logged the EMA model as %s", info.model_uri)

    def log_final(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Final metrics: MLflow (remembered for `compare_runs`) and TensorBoard's HParams tab.

        The hparams summaries go into the run's own directory through its file writer (not
        `add_hparams`, which opens a timestamped sub-run), so the HParams table row is this run.
        """
        values = {k: float(v) for k, v in metrics.items()}
        step = self._last_step if step is None else step
        self._final.update(values)
        if self._client is not None and self.run_id is not None:
            self._drain()
            self._log_final_mlflow(values, step)
        if self._writer is not None:
            log_final_hparams(self._writer, self._hparams, self._final, values, step)

    def _log_final_mlflow(self, values: Mapping[str, float], step: int) -> None:
        """Synchronous write of the final metrics and of the tag listing every final key."""
        from mlflow.entities import Metric, RunTag

        assert self._client is not None and self.run_id is not None
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        tag = RunTag(FINAL_KEYS_TAG, ",".join(sorted(self._final)))
        retrying("log_final", self._client.log_batch, self.run_id, metrics=metrics, tags=[tag])

"""The `Tracker`: one pipeline run in MLflow and TensorBoard.

Workflows (train, sample, evaluate) hold a `Tracker` and call `log_metrics` / `log_image` /
`log_final`; the tracker fans each call out to MLflow (sqlite store) and TensorBoard. The train
stage creates the MLflow run; sample and evaluate re-open it by id, so one run holds the whole
pipeline (or derive a child run when their params differ, see `ddpm.tracking.lineage`).

MLflow and TensorBoard are imported lazily inside the functions that need them: importing them
costs seconds, and a run with tracking disabled must not touch them at all.
"""


from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ddpm.config import Config, flatten
from ddpm.errors import Interrupted, UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.utils.async_logging.run_operations import RunOperations
    from torch.utils.tensorboard import SummaryWriter


from ddpm.tracking.lineage import (
    FINAL_KEYS_TAG,
    TRAIN_RUN_TAG,
    changed_params,
    default_run_name,
    dvc_tags,
    final_keys,
    git_tags,
    param_overrides,
    param_text,
    source_tags,
    train_run_id,
)
from ddpm.tracking.names import TRAIN_FINAL
from ddpm.tracking.store import (
    mark_experiment_kind,
    open_store,
    retrying,
    safe_name,
    store_root,
    tracking_uri,
)

log = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "KILLED", "FAILED"]

_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params
_METRICS_PER_BATCH = 1000  # ... and for metrics
_MAX_PENDING = 32  # async metric batches in flight before we wait on them (bounds memory)
HOST_RUN_ENV = "MLFLOW_RUN_ID"  # set by `mlflow run` for its command: the run to log into
_TB_DIR_TAG = "ddpm.tensorboard_dir"  # so a re-opened run writes into its own TensorBoard dir


def exit_status(exc_type: type[BaseException] | None) -> RunStatus:
    """How a run ends: FINISHED without an exception, KILLED for an interruption, FAILED otherwise."""
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, Interrupted | KeyboardInterrupt | SystemExit):
        return "KILLED"
    return "FAILED"


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum, "the MLflow run is marked KILLED; run the stage again")


def _tb_hparams(params: Mapping[str, Any]) -> dict[str, int | float | str | bool]:
    """TensorBoard accepts only scalars and strings as hyperparameters: lists and None become text."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}


# --------------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------------


class Tracker:
    """One pipeline run in MLflow + TensorBoard. Build it with `Tracker.start`, use it as a context manager.

    The one way a stage ends its run: `with Tracker.start(...) as tracker:` opened before the work, it
    finishes with FINISHED on success, KILLED on an interruption (SIGINT/SIGTERM, which raise
    `Interrupted` from `start` until the run ends, or KeyboardInterrupt/SystemExit) and FAILED on any other exception.
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
        self._old_handlers: dict[int, Any] = {}

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
        differing values are recorded as `param_override.*` tags.
        """
        self = cls()
        repo_root = Path(repo_root)
        params = flatten(cfg.to_dict())
        self._hparams = _tb_hparams(params)
        self.run_name = default_run_name(cfg, run_name)
        all_tags = {**git_tags(repo_root), **dvc_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
        if resume_step is not None:
            self._last_step = resume_step
        self._catch_signals()  # before the run exists: a SIGTERM from now on ends it KILLED, never RUNNING
        try:
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
        """Open the store, create, derive or re-open the run, log params (new runs) and tags.

        Under `mlflow run` (which creates a run and passes its id in `MLFLOW_RUN_ID`) that run is used
        instead of a new one, see `_host_run`.
        """
        self.tracking_uri = tracking_uri(repo_root)
        self._client, _ = open_store(self.tracking_uri, None)
        host = self._host_run()
        if host is None:
            self._client, self.experiment_id = open_store(self.tracking_uri, cfg.tracking.experiment)
        source = self._find(run_id) if run_id else None
        derive = source is not None and new_run_if_params_differ and bool(changed_params(source.data.params, params))
        if host is not None and (source is None or source.info.run_id != host.info.run_id):
            run = self._adopt(host, source)
            self._log_params(params)
            self._set_tags(tags)
            if source is not None and new_run_if_params_differ:
                self._copy_final_metrics(self._client.get_run(train_run_id(source)))
        elif (run := None if source is None or derive else self._reopen(source)) is None:
            parent = train_run_id(source) if derive else None
            if parent:
                tags = {**tags, "mlflow.parentRunId": parent, TRAIN_RUN_TAG: parent}
            tags = {**source_tags(repo_root), **tags}
            run = self._client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            self._log_params(params)
            if parent:
                self._copy_final_metrics(source if source.info.run_id == parent else self._client.get_run(parent))
        else:
            self.run_id = run.info.run_id
            self.run_name = run.info.run_name or self.run_name
            self._final = {k: run.data.metrics[k] for k in final_keys(run.data.tags) if k in run.data.metrics}
            overrides = param_overrides(run.data.params, params)
            self._set_tags({**tags, **overrides})
        if cfg.tracking.system_metrics:
            self._start_system_metrics(resume=self.run_id == run_id)  # a re-opened run continues its steps

    def _host_run(self) -> Any:
        """The run `mlflow run` created for this command (`MLFLOW_RUN_ID`), or None.

        Every pipeline run started under `mlflow run` logs into that run, in the experiment
        `mlflow run --experiment-name` chose, rather than leaving it empty beside a run of its own.
        """
        from mlflow.exceptions import MlflowException

        host_id = os.environ.get(HOST_RUN_ENV)
        if not host_id:
            return None
        assert self._client is not None
        try:
            host = self._client.get_run(host_id)
        except MlflowException:
            raise UserError(
                f"{HOST_RUN_ENV}={host_id} names no run in the MLflow store {self.tracking_uri}; point "
                "MLFLOW_TRACKING_URI at the store `mlflow run` uses, or unset MLFLOW_RUN_ID"
            ) from None
        self.experiment_id = host.info.experiment_id
        mark_experiment_kind(self._client, self._client.get_experiment(self.experiment_id))
        return host

    def _adopt(self, host: Any, source: Any) -> Any:
        """Log into `host` (set RUNNING) what would have gone into a new or re-opened run.

        `source`: the run the pipeline would have re-opened or derived from (sampling a cached training,
        a resumed training); its training run is named in the `ddpm.train_run_id` tag, as a derived run does.
        """
        assert self._client is not None
        self.run_id, self.run_name = host.info.run_id, host.info.run_name or self.run_name
        if source is not None:
            self._set_tags({TRAIN_RUN_TAG: train_run_id(source)})
        return self._reopen(host)

    def _find(self, run_id: str) -> Any:
        """The run `run_id`, or None (with a warning) when the store lacks it."""
        from mlflow.exceptions import MlflowException

        assert self._client is not None
        try:
            return self._client.get_run(run_id)
        except MlflowException:
            log.warning(
                "MLflow run %s is not in %s (deleted, or another store); starting a new run",
                run_id,
                self.tracking_uri,
            )
            return None

    def _reopen(self, run: Any) -> Any:
        """`run` set back to RUNNING."""
        assert self._client is not None
        self._client.update_run(run.info.run_id, status="RUNNING")
        return run

    def _copy_final_metrics(self, source: Any) -> None:
        """The training's own final metrics (`train/final_*`) from its run `source` into this one.

        Not the evaluation's: the training run also holds the results of the sampling params it was
        created with, which are not this run's.
        """
        finals = {k: source.data.metrics[k] for k in final_keys(source.data.tags)
                  if k.startswith(TRAIN_FINAL) and k in source.data.metrics}
        if finals:
            self.log_final(finals)

    def _log_params(self, params: Mapping[str, Any]) -> None:
        """Every flattened config value once, in batches of MLflow's limit."""
        from mlflow.entities import Param

        assert self._client is not None and self.run_id is not None
        items = [Param(k, param_text(v)) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def _set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (overwrite) run tags."""
        from mlflow.entities import RunTag

        assert self._client is not None and self.run_id is not None
        if tags:
            self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

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
        from torch.utils.tensorboard import SummaryWriter

        base = root / "logs" / "tensorboard"
        name = self._tensorboard_name(base)
        self.tensorboard_dir = base / name
        # purge_step makes TensorBoard drop the crashed attempt's events after the checkpoint
        purge = resume_step + 1 if resume_step is not None else None
        self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=purge, flush_secs=30)
        if self._client is not None and self.run_id is not None:
            self._set_tags({_TB_DIR_TAG: name})

    def _tensorboard_name(self, base: Path) -> str:
        """The run's recorded TensorBoard dir; for a new run its name, made unique if already taken."""
        if self._client is not None and self.run_id is not None:
            recorded = self._client.get_run(self.run_id).data.tags.get(_TB_DIR_TAG)
            if recorded:
                return recorded
        name = safe_name(self.run_name)
        if (base / name).exists():  # a rerun under the same name must not mix its curves into the old run
            suffix = self.run_id[:8] if self.run_id else datetime.datetime.now().strftime("%H%M%S%f")
            name = f"{name}-{suffix}"
        return name

    def _catch_signals(self) -> None:
        """Turn SIGINT/SIGTERM into `Interrupted` from `start` to `finish`, so the run ends KILLED, not RUNNING.

        (Training installs its own handlers around its loop to checkpoint first; they raise `Interrupted` too.)
        """
        if threading.current_thread() is threading.main_thread():
            self._old_handlers = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}

    def _release_signals(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers = {}

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_status(exc_type))

    def finish(self, status: RunStatus = "FINISHED") -> None:
        """Flush everything, end the MLflow run with `status` and close TensorBoard (idempotent)."""
        if self._finished:
            return
        self._finished = True
        self._release_signals()
        if self._system_monitor is not None:
            self._system_monitor.finish()
        self.flush()
        if self._client is not None and self.run_id is not None:
            retrying("set_terminated", self._client.set_terminated, self.run_id, status)
        if self._writer is not None:
            self._writer.close()

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
        """Queue a metric batch on MLflow's async logger; a synchronous log_batch takes ~10x longer."""
        from mlflow.entities import Metric

        assert self._client is not None and self.run_id is not None
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), _METRICS_PER_BATCH):
            chunk = metrics[i : i + _METRICS_PER_BATCH]
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
            self._log_final_tensorboard(values, step)

    def _log_final_mlflow(self, values: Mapping[str, float], step: int) -> None:
        """Synchronous write of the final metrics and of the tag listing every final key."""
        from mlflow.entities import Metric, RunTag

        assert self._client is not None and self.run_id is not None
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        tag = RunTag(FINAL_KEYS_TAG, ",".join(sorted(self._final)))
        retrying("log_final", self._client.log_batch, self.run_id, metrics=metrics, tags=[tag])

    def _log_final_tensorboard(self, values: Mapping[str, float], step: int) -> None:
        """The three hparams summaries + the metric scalars, all in this run's directory."""
        from torch.utils.tensorboard.summary import hparams

        assert self._writer is not None
        # the experiment summary lists every final metric seen so far, not only this call's
        exp, ssi, sei = hparams(self._hparams, dict(self._final))
        writer = self._writer.file_writer
        assert writer is not None
        for summary in (exp, ssi, sei):
            writer.add_summary(summary, step)
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

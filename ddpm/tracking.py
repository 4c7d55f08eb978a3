"""Experiment tracking: the one module that talks to MLflow and TensorBoard, plus the DVC metric files.

Workflows (train, sample, evaluate) hold a `Tracker` and call `log_metrics` / `log_image` /
`log_final`; the tracker fans each call out to MLflow (sqlite store) and TensorBoard. The train
stage creates the MLflow run; sample and evaluate re-open it by id, so one run holds the whole
pipeline. DVC reads its own plain files, written here by `write_metrics` (JSON) and `write_tsv` (TSV).

MLflow and TensorBoard are imported lazily inside the functions that need them: importing them
costs seconds, and a run with tracking disabled must not touch them at all.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ddpm.atomic import write_text
from ddpm.config import Config, flatten
from ddpm.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.utils.async_logging.run_operations import RunOperations
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "KILLED", "FAILED"]

_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params
_METRICS_PER_BATCH = 1000  # ... and for metrics
_MAX_PENDING = 32  # async metric batches in flight before we wait on them (bounds memory)
_RETRIES = 5  # attempts for a write the sqlite store rejected (e.g. "database is locked")
_FINAL_KEYS_TAG = "ddpm.final_metrics"  # comma-separated keys logged through log_final
TRAIN_FINAL_PREFIX = "train_"  # the train stage's final metrics (log_final) carry this prefix
_TRAIN_RUN_TAG = "ddpm.train_run_id"  # on a derived run (see Tracker.start): the training run it samples
_TB_DIR_TAG = "ddpm.tensorboard_dir"  # so a re-opened run writes into its own TensorBoard dir
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------------------------
# Where the store lives
# --------------------------------------------------------------------------------------------


def store_root(repo_root: Path) -> Path:
    """The directory that holds mlflow.db, mlartifacts/ and logs/: `DVC_ROOT` when set, else `repo_root`.

    `dvc exp run --temp/--queue` runs each experiment in a temporary copy that is deleted
    afterwards; DVC points `DVC_ROOT` at the real repository, so the store must follow it.
    """
    return Path(os.environ.get("DVC_ROOT") or repo_root).resolve()


def tracking_uri(repo_root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else an absolute sqlite store `<root>/mlflow.db` (never ./mlruns)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{store_root(repo_root) / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for servers and other backends)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).resolve()


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store live next to the db file (mlartifacts/<experiment>); servers choose their own."""
    db = _sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / "mlartifacts" / _safe_name(experiment)).as_uri()


def _safe_name(name: str) -> str:
    """A file-system friendly version of a run or experiment name."""
    return _SAFE_NAME.sub("_", name).strip("._") or "run"


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a sqlite store across processes.

    Two processes opening a fresh mlflow.db at once (`dvc queue start -j 2`) both run the schema
    migration and one dies with "table ... already exists"; two creating the same experiment
    collide on its unique name. An exclusive flock around that step removes both races.
    """
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl  # POSIX only; imported here so the module still imports elsewhere

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f"{db.name}-init.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _open_store(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """A client for `uri` and the id of `experiment`, created (artifacts in mlartifacts/) if new.

    MlflowClient() itself creates and migrates a fresh sqlite store, so it is built under the lock.
    """
    from mlflow import MlflowClient

    with _store_lock(uri):
        try:
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                location = _artifact_location(uri, experiment)
                return client, client.create_experiment(experiment, artifact_location=location)
        except Exception as err:  # noqa: BLE001 - any store failure is reported the same way
            raise UserError(
                f"cannot open the MLflow store {uri}: {err}; fix or move the store "
                "(or set MLFLOW_TRACKING_URI), or set tracking.mlflow: false"
            ) from err
    if exp.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow experiment {experiment!r} is deleted in {uri}; restore it (`mlflow experiments restore "
            f"--experiment-id {exp.experiment_id}`) or set another tracking.experiment"
        )
    return client, exp.experiment_id


def _retrying(action: str, fn: Any, *args: Any, **kwargs: Any) -> bool:
    """Call `fn`, retrying with backoff; a write that still fails is logged, never raised.

    Tracking must not kill a training run: SQLite rejects a write while another process holds
    the lock for longer than its busy timeout, and a retry a moment later succeeds.
    """
    for attempt in range(_RETRIES):
        try:
            fn(*args, **kwargs)
            return True
        except Exception as err:  # noqa: BLE001 - see docstring
            if attempt == _RETRIES - 1:
                log.warning("MLflow %s failed after %d attempts: %s", action, _RETRIES, err)
                return False
            time.sleep(0.2 * 2**attempt)
    return False


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


def _tb_hparams(params: Mapping[str, Any]) -> dict[str, int | float | str | bool]:
    """TensorBoard accepts only scalars and strings as hyperparameters: lists and None become text."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}


def _param_text(value: Any) -> str:
    """How MLflow stores a param value (lists as JSON-ish text, like `str`)."""
    return str(value)


# --------------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------------


class Tracker:
    """One pipeline run in MLflow + TensorBoard. Build it with `Tracker.start`; end it with `finish`.

    Used as a context manager it finishes with FINISHED, KILLED (KeyboardInterrupt/SystemExit)
    or FAILED (any other exception).
    """

    def __init__(self) -> None:
        self.run_id: str | None = None  # None when MLflow tracking is off
        self.run_name: str = ""
        self.tensorboard_dir: Path | None = None
        self.tracking_uri: str | None = None
        self._client: MlflowClient | None = None
        self._writer: SummaryWriter | None = None
        self._system_monitor: Any = None
        self._pending: list[tuple[RunOperations, list[Metric]]] = []
        self._hparams: dict[str, int | float | str | bool] = {}
        self._final: dict[str, float] = {}
        self._last_step = 0
        self._finished = False

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
        if cfg.tracking.mlflow:
            self._start_mlflow(cfg, repo_root, run_id, params, all_tags, new_run_if_params_differ)
        if cfg.tracking.tensorboard:
            self._start_tensorboard(store_root(repo_root), resume_step)
        return self

    def _start_mlflow(
        self, cfg: Config, repo_root: Path, run_id: str | None, params: dict[str, Any], tags: dict[str, str],
        new_run_if_params_differ: bool,
    ) -> None:
        """Open the store, create, derive or re-open the run, log params (new runs) and tags."""
        self.tracking_uri = tracking_uri(repo_root)
        self._client, experiment_id = _open_store(self.tracking_uri, cfg.tracking.experiment)
        source = self._find(run_id) if run_id else None
        derive = source is not None and new_run_if_params_differ and bool(_changed_params(source.data.params, params))
        run = None if source is None or derive else self._reopen(source)
        if run is None:
            parent = _train_run_id(source) if derive else None
            if parent:
                tags = {**tags, "mlflow.parentRunId": parent, _TRAIN_RUN_TAG: parent}
            run = self._client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            self._log_params(params)
            if parent:
                self._copy_final_metrics(source if source.info.run_id == parent else self._client.get_run(parent))
        else:
            self.run_id = run.info.run_id
            self.run_name = run.info.run_name or self.run_name
            self._final = {k: run.data.metrics[k] for k in _final_keys(run.data.tags) if k in run.data.metrics}
            overrides = _param_overrides(run.data.params, params)
            self._set_tags({**tags, **overrides})
        if cfg.tracking.system_metrics:
            self._start_system_metrics(resume=self.run_id == run_id)  # a re-opened run continues its steps

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
        """The training's own final metrics (`train_*`) from its run `source` into this one.

        Not the evaluation's: the training run also holds the results of the sampling params it was
        created with, which are not this run's.
        """
        finals = {k: source.data.metrics[k] for k in _final_keys(source.data.tags)
                  if k.startswith(TRAIN_FINAL_PREFIX) and k in source.data.metrics}
        if finals:
            self.log_final(finals)

    def _log_params(self, params: Mapping[str, Any]) -> None:
        """Every flattened config value once, in batches of MLflow's limit."""
        from mlflow.entities import Param

        assert self._client is not None and self.run_id is not None
        items = [Param(k, _param_text(v)) for k, v in params.items()]
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
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
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
        name = _safe_name(self.run_name)
        if (base / name).exists():  # a rerun under the same name must not mix its curves into the old run
            suffix = self.run_id[:8] if self.run_id else datetime.datetime.now().strftime("%H%M%S%f")
            name = f"{name}-{suffix}"
        return name

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt | SystemExit):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    def finish(self, status: RunStatus = "FINISHED") -> None:
        """Flush everything, end the MLflow run with `status` and close TensorBoard (idempotent)."""
        if self._finished:
            return
        self._finished = True
        if self._system_monitor is not None:
            self._system_monitor.finish()
        self.flush()
        if self._client is not None and self.run_id is not None:
            _retrying("set_terminated", self._client.set_terminated, self.run_id, status)
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
                _retrying("log_batch", self._client.log_batch, self.run_id, metrics=metrics)

    def log_image(self, key: str, image: Any, step: int) -> None:
        """An (H, W, C) uint8 image at `step`: MLflow's stepped images (artifacts under images/) + TensorBoard."""
        if self._client is not None and self.run_id is not None:
            # synchronous: images are rare (every sample_every steps) and the PNG must exist before finish
            _retrying("log_image", self._client.log_image, self.run_id, image, key=key, step=step, synchronous=True)
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
        _retrying("log_artifact", upload, self.run_id, str(path), artifact_path)

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
        tag = RunTag(_FINAL_KEYS_TAG, ",".join(sorted(self._final)))
        _retrying("log_final", self._client.log_batch, self.run_id, metrics=metrics, tags=[tag])

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


def _final_keys(tags: Mapping[str, str]) -> list[str]:
    """The keys recorded by `log_final` (the run's final-metrics tag)."""
    return [k for k in tags.get(_FINAL_KEYS_TAG, "").split(",") if k]


def read_run_id(run_info: Path) -> str | None:
    """The MLflow run id a stage recorded in `run_info` (None when tracking was off)."""
    if not run_info.exists():
        return None
    return json.loads(run_info.read_text()).get("mlflow_run_id") or None


def write_run_id(run_info: Path, run_id: str | None) -> None:
    """Record the MLflow run a stage logged into ("" when none), for the stage after it."""
    write_text(run_info, json.dumps({"mlflow_run_id": run_id or ""}, indent=2) + "\n")


def _changed_params(stored: Mapping[str, str], params: Mapping[str, Any]) -> list[str]:
    """The params whose value differs from (or is missing in) a run's logged params."""
    return [k for k, v in params.items() if stored.get(k) != _param_text(v)]


def _train_run_id(run: Any) -> str:
    """The training run behind `run`: its `ddpm.train_run_id` tag for a derived run, else the run itself."""
    return run.data.tags.get(_TRAIN_RUN_TAG) or run.info.run_id


def _param_overrides(stored: Mapping[str, str], params: Mapping[str, Any]) -> dict[str, str]:
    """Tags for config values that differ from the re-opened run's params (MLflow params are immutable).

    E.g. training resumed after a crash with other `sample` or `evaluate` params (the resume key only
    hashes the training sections): the run continues, and the values now in force stay visible.
    """
    return {
        f"param_override.{k}": _param_text(v)
        for k, v in params.items()
        if k in stored and stored[k] != _param_text(v)
    }


# --------------------------------------------------------------------------------------------
# Comparing runs
# --------------------------------------------------------------------------------------------


def compare_runs(experiment_name: str, tracking_uri: str, run_ids: Sequence[str] | None = None) -> str:
    """A plain-text table of runs side by side: names, the params that differ, and final metrics."""
    from mlflow import MlflowClient

    db = _sqlite_path(tracking_uri)
    if db is not None and not db.is_file():  # MlflowClient would silently create an empty store
        raise UserError(f"no MLflow store at {db}; run the pipeline first or set MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        raise UserError(
            f"no MLflow experiment {experiment_name!r} in {tracking_uri}; "
            "check tracking.experiment or MLFLOW_TRACKING_URI"
        )
    if run_ids:
        runs = [_get_run(client, rid) for rid in run_ids]
    else:
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    if not runs:
        raise UserError(f"MLflow experiment {experiment_name!r} has no runs yet; run the pipeline first")
    return _format_table(_comparison_rows(runs), [r.info.run_name or r.info.run_id[:8] for r in runs])


def _get_run(client: MlflowClient, run_id: str) -> Any:
    """A run by id, or a UserError naming it."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(f"MLflow run {run_id} not found; list the runs with `python -m ddpm compare`") from None


def _comparison_rows(runs: Sequence[Any]) -> list[tuple[str, list[str]]]:
    """(label, one cell per run) for the run id, status, differing params and final metrics."""
    rows = [("run_id", [r.info.run_id[:8] for r in runs]), ("status", [r.info.status for r in runs])]
    keys = sorted({k for r in runs for k in r.data.params})
    for key in keys:
        cells = [r.data.params.get(key, "-") for r in runs]
        if len(set(cells)) > 1:
            rows.append((key, cells))
    final = sorted({k for r in runs for k in _final_keys(r.data.tags)})
    if not final:  # runs that never reached log_final: show their latest non-system metrics
        final = sorted({k for r in runs for k in r.data.metrics if not k.startswith("system/")})
    for key in final:
        rows.append((key, [_fmt(r.data.metrics.get(key)) for r in runs]))
    return rows


def _fmt(value: float | None) -> str:
    """A metric cell: 4 significant digits, '-' when the run lacks it."""
    return "-" if value is None else f"{value:.4g}"


def _format_table(rows: list[tuple[str, list[str]]], names: list[str]) -> str:
    """Left column = row label, one column per run, aligned with spaces."""
    table = [["run", *names], *[[label, *cells] for label, cells in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# DVC files
# --------------------------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    """Plain JSON for DVC: numpy/torch scalars as floats/ints, NaN/inf as null (strict JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int):
        return value
    number = float(value)
    return number if math.isfinite(number) else None


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> None:
    """Atomically write a DVC metrics JSON file (nested dicts allowed)."""
    write_text(path, json.dumps(_json_value(metrics), indent=2, sort_keys=True) + "\n")


def write_tsv(path: str | Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Atomically write a DVC plots TSV: a header, then one line per row; missing or non-finite cells are empty.

    The whole file is rewritten each time. Callers keep the rows (the train stage keeps them inside its
    resume checkpoint), because DVC deletes a stage's plot file before running the stage again.
    """
    lines = ["\t".join(columns)] + ["\t".join(_tsv_cell(r.get(c)) for c in columns) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def _tsv_cell(value: Any) -> str:
    """A TSV number: integers without a decimal point, floats at full precision, empty when missing."""
    if value is None:
        return ""
    number = float(value)
    if not math.isfinite(number):
        return ""
    return str(int(number)) if number.is_integer() else repr(number)

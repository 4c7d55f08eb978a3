"""Where the MLflow store lives (a sqlite file and an artifact folder under the repository) and safe access
to it: one process at a time creates the store, and writes the sqlite store rejects are retried."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient


log = logging.getLogger(__name__)

_RETRIES = 5  # attempts for a write the sqlite store rejected (e.g. "database is locked")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# The experiment kind MLflow 3's UI offers (its experiment-kind selector writes the same tag). In MLflow 3.17.2
# it does not change the landing page (a headless browser showed the GenAI overview either way), so
# `make mlflow-ui` prints each experiment's runs-table address (`#/experiments/<id>/runs`) instead
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
KIND_TAGS = {EXPERIMENT_KIND_TAG: "custom_model_development"}

# --------------------------------------------------------------------------------------------
# Where the store lives
# --------------------------------------------------------------------------------------------


def store_root(repo_root: Path) -> Path:
    """The directory of the shared stores (mlflow.db, mlartifacts/, logs/, .resume/): `DVC_ROOT` when set,
    else `repo_root` (the directory the stage runs in).

    `dvc exp run --temp/--queue` runs each experiment in a temporary copy under `.dvc/tmp/exps/` that
    is deleted afterwards, with the copy as the current directory and `DVC_ROOT` pointing at the parent
    repository (dvc/repo/experiments/queue/base.py); plain `dvc repro` sets `DVC_ROOT` to the repository
    itself. So a stage reads params and writes its outputs in the current directory, and only what must
    outlive the copy lives here.
    """
    return Path(os.environ.get("DVC_ROOT") or repo_root).resolve()


def tracking_uri(repo_root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else an absolute sqlite store `<root>/mlflow.db` (never ./mlruns)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{store_root(repo_root) / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for servers and other backends)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).resolve()


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store live next to the db file (mlartifacts/<experiment>); servers choose their own."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / "mlartifacts" / safe_name(experiment)).as_uri()


def safe_name(name: str) -> str:
    """A file-system friendly version of a run or experiment name."""
    return _SAFE_NAME.sub("_", name).strip("._") or "run"


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a sqlite store across processes.

    Two processes opening a fresh mlflow.db at once (`dvc queue start -j 2`) both run the schema
    migration and one dies with "table ... already exists"; two creating the same experiment
    collide on its unique name. An exclusive flock around that step removes both races.
    """
    db = sqlite_path(uri)
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


def open_store(uri: str, experiment: str | None) -> tuple[MlflowClient, str | None]:
    """A client for `uri` and the id of `experiment`, created (artifacts in mlartifacts/) if new.

    MlflowClient() itself creates and migrates a fresh sqlite store, so it is built under the lock.
    `experiment=None`: only the client (the caller logs into a run that exists already).
    """

    with store_lock(uri):
        try:
            client = _client(uri)
            if experiment is None:
                return client, None
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                location = artifact_location(uri, experiment)
                return client, client.create_experiment(experiment, artifact_location=location, tags=KIND_TAGS)
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
    mark_experiment_kind(client, exp)
    return client, exp.experiment_id


def _client(uri: str) -> MlflowClient:
    """`MlflowClient(uri)`, retried while another initializer creates a fresh sqlite store's tables.

    The lock above serialises this project's processes only: an `mlflow ui`, a notebook or a test's own client
    opening the same fresh mlflow.db migrates it too, and the loser of that race fails ("table ... already
    exists", an AttributeError from a half-made schema: tests/test_tracking.py races them). Once the other is
    done the store is whole; a store that stays broken fails after ~3 s of retries.
    """
    from mlflow import MlflowClient

    for attempt in range(_RETRIES - 1):
        try:
            return MlflowClient(uri)
        except Exception:  # noqa: BLE001 - whatever the race raises; the last attempt's error is reported
            time.sleep(0.2 * 2**attempt)
    return MlflowClient(uri)


def mark_experiment_kind(client: MlflowClient, exp: Any) -> None:
    """Tag an experiment as model training (MLflow's own experiment kind) unless it has a kind."""
    if EXPERIMENT_KIND_TAG not in exp.tags:
        retrying("set_experiment_tag", client.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND_TAG,
                 KIND_TAGS[EXPERIMENT_KIND_TAG])


def retrying(action: str, fn: Any, *args: Any, **kwargs: Any) -> bool:
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

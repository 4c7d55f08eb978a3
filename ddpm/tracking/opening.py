"""How a stage finds its MLflow run: created, re-opened by id, derived as a child, or adopted from `mlflow run`.

`open_run` is what `Tracker.start` does in MLflow; the `Tracker` (`ddpm.tracking.tracker`) then logs into
the run it returns. MLflow is imported inside the functions (see the tracker's module docstring).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm.config import Config
from ddpm.errors import UserError
from ddpm.tracking.lineage import (
    TRAIN_RUN_TAG,
    changed_params,
    final_keys,
    param_overrides,
    param_text,
    source_tags,
    train_run_id,
)
from ddpm.tracking.names import TRAIN_FINAL
from ddpm.tracking.store import mark_experiment_kind, open_store, tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params
HOST_RUN_ENV = "MLFLOW_RUN_ID"  # set by `mlflow run` for its command: the run to log into


@dataclass
class OpenedRun:
    """The run a stage logs into, and what the tracker must know about it."""

    client: MlflowClient
    tracking_uri: str
    experiment_id: str | None
    run_id: str
    run_name: str
    final: dict[str, float] = field(default_factory=dict)  # final metrics a re-opened run already holds
    copied_finals: dict[str, float] = field(default_factory=dict)  # the training's, for a new child run to log


def open_run(cfg: Config, repo_root: Path, run_name: str, run_id: str | None, params: dict[str, Any],
             tags: dict[str, str], new_run_if_params_differ: bool) -> OpenedRun:
    """Open the store, create, derive or re-open the run, log params (new runs) and tags.

    `run_id` given: re-open it, or with `new_run_if_params_differ` and params that differ from its own, make a
    new child of its training run (`mlflow.parentRunId`, tag `ddpm.train_run_id`) whose `copied_finals` are the
    training's final metrics. Without it the differing values become `param_override.*` tags. Under `mlflow run`
    (which creates a run and passes its id in `MLFLOW_RUN_ID`) that run is used instead of a new one.
    """
    uri = tracking_uri(repo_root)
    client, _ = open_store(uri, None)
    host = _host_run(client, uri)
    experiment_id = host.info.experiment_id if host is not None else None
    if host is None:
        client, experiment_id = open_store(uri, cfg.tracking.experiment)
    opened = OpenedRun(client, uri, experiment_id, "", run_name)
    source = _find(client, uri, run_id) if run_id else None
    derive = source is not None and new_run_if_params_differ and bool(changed_params(source.data.params, params))
    if host is not None and (source is None or source.info.run_id != host.info.run_id):
        opened.run_id, opened.run_name = host.info.run_id, host.info.run_name or run_name
        if source is not None:
            set_tags(client, opened.run_id, {TRAIN_RUN_TAG: train_run_id(source)})
        client.update_run(opened.run_id, status="RUNNING")
        log_params(client, opened.run_id, params)
        set_tags(client, opened.run_id, tags)
        if source is not None and new_run_if_params_differ:
            opened.copied_finals = _training_finals(client.get_run(train_run_id(source)))
    elif source is None or derive:
        parent = train_run_id(source) if derive else None
        if parent:
            tags = {**tags, "mlflow.parentRunId": parent, TRAIN_RUN_TAG: parent}
        tags = {**source_tags(repo_root), **tags}
        opened.run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        log_params(client, opened.run_id, params)
        if parent:
            opened.copied_finals = _training_finals(source if source.info.run_id == parent else client.get_run(parent))
    else:
        client.update_run(source.info.run_id, status="RUNNING")
        opened.run_id, opened.run_name = source.info.run_id, source.info.run_name or run_name
        opened.final = {k: source.data.metrics[k] for k in final_keys(source.data.tags) if k in source.data.metrics}
        set_tags(client, opened.run_id, {**tags, **param_overrides(source.data.params, params)})
    return opened


def _host_run(client: MlflowClient, uri: str) -> Any:
    """The run `mlflow run` created for this command (`MLFLOW_RUN_ID`), or None.

    Every pipeline run started under `mlflow run` logs into that run, in the experiment
    `mlflow run --experiment-name` chose, rather than leaving it empty beside a run of its own.
    """
    from mlflow.exceptions import MlflowException

    host_id = os.environ.get(HOST_RUN_ENV)
    if not host_id:
        return None
    try:
        host = client.get_run(host_id)
    except MlflowException:
        raise UserError(
            f"{HOST_RUN_ENV}={host_id} names no run in the MLflow store {uri}; point "
            "MLFLOW_TRACKING_URI at the store `mlflow run` uses, or unset MLFLOW_RUN_ID"
        ) from None
    mark_experiment_kind(client, client.get_experiment(host.info.experiment_id))
    return host


def _find(client: MlflowClient, uri: str, run_id: str) -> Any:
    """The run `run_id`, or None (with a warning) when the store lacks it."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        log.warning("MLflow run %s is not in %s (deleted, or another store); starting a new run", run_id, uri)
        return None


def _training_finals(source: Any) -> dict[str, float]:
    """The training's own final metrics (`train/final_*`) of its run `source`.

    Not the evaluation's: the training run also holds the results of the sampling params it was
    created with, which are not this run's.
    """
    return {k: source.data.metrics[k] for k in final_keys(source.data.tags)
            if k.startswith(TRAIN_FINAL) and k in source.data.metrics}


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Every flattened config value once, in batches of MLflow's limit."""
    from mlflow.entities import Param

    items = [Param(k, param_text(v)) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + _PARAMS_PER_BATCH])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """Set (overwrite) run tags."""
    from mlflow.entities import RunTag

    if tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

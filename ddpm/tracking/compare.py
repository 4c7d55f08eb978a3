"""`python -m ddpm compare`: MLflow runs side by side (the params that differ, final metrics).

Plain text puts one run per column; `--markdown` puts one run per row (params that differ, then the chosen
metrics), the shape of an ablation table for the README.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ddpm.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient


from ddpm.tracking.lineage import final_keys
from ddpm.tracking.store import sqlite_path

# --------------------------------------------------------------------------------------------
# Comparing runs
# --------------------------------------------------------------------------------------------


def compare_runs(experiment_name: str, tracking_uri: str, run_ids: Sequence[str] | None = None,
                 markdown: bool = False, metrics: Sequence[str] | None = None,
                 where: Sequence[str] = (), sort: str | None = None) -> str:
    """A table of runs: names, the params that differ, and final metrics (only `metrics` when given).

    `where` keeps the runs whose params equal each `key=value` (e.g. `sample.sampler=ddim`); `sort` orders
    them by a metric, ascending, or descending with a leading '-'. Plain text has one column per run;
    `markdown` gives a GitHub table with one row per run.
    """
    from mlflow import MlflowClient

    db = sqlite_path(tracking_uri)
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
    runs = _select(runs, where)
    values = _metric_values(client, runs, [*(metrics or []), *([sort.removeprefix("-")] if sort else [])])
    if sort:
        runs, values = _sorted_by_metric(runs, values, sort)
    rows = _comparison_rows(runs, values, metrics)
    names = [r.info.run_name or r.info.run_id[:8] for r in runs]
    return _format_markdown(rows, names) if markdown else _format_table(rows, names)


def _select(runs: Sequence[Any], where: Sequence[str]) -> list[Any]:
    """The runs whose params match every `key=value` of `where` (string equality, as MLflow stores params)."""
    known = {k for r in runs for k in r.data.params}
    for cond in where:
        key, sep, value = cond.partition("=")
        if not sep or not key:
            raise UserError(f"--where {cond!r} is not KEY=VALUE; write e.g. --where sample.sampler=ddim")
        if key not in known:
            raise UserError(f"--where {key!r}: no run has this param; params are e.g. {', '.join(sorted(known)[:8])}")
        runs = [r for r in runs if r.data.params.get(key) == value]
    if not runs:
        raise UserError(f"no run matches --where {' '.join(where)}; list the runs without --where")
    return list(runs)


def _metric_values(client: MlflowClient, runs: Sequence[Any], specs: Sequence[str]) -> list[dict[str, float]]:
    """Per run: its latest metric values, plus `NAME@STEP` for each such spec (the value NAME had at STEP,
    e.g. `sweep/class_accuracy@200`: the guidance sweep logs one step per scale x 100)."""
    values = [dict(r.data.metrics) for r in runs]
    for spec in {s for s in specs if "@" in s}:
        name, _, step = spec.rpartition("@")
        if not step.lstrip("-").isdigit():
            raise UserError(f"metric {spec!r}: the part after '@' must be a step number, e.g. {name}@200")
        for run, vals in zip(runs, values, strict=True):
            hits = [m.value for m in client.get_metric_history(run.info.run_id, name) if m.step == int(step)]
            if hits:
                vals[spec] = hits[-1]
    return values


def _sorted_by_metric(runs: Sequence[Any], values: Sequence[dict], sort: str) -> tuple[list[Any], list[dict]]:
    """Runs (and their values) ordered by a metric (a leading '-' for descending); runs without it go last."""
    key, descending = sort.removeprefix("-"), sort.startswith("-")
    pairs = list(zip(runs, values, strict=True))
    if not any(key in v for v in values):
        raise UserError(f"--sort {key!r}: no run logged this metric; pick one of the table's metric rows")
    present = sorted((p for p in pairs if key in p[1]), key=lambda p: p[1][key], reverse=descending)
    ordered = present + [p for p in pairs if key not in p[1]]
    return [p[0] for p in ordered], [p[1] for p in ordered]


def _get_run(client: MlflowClient, run_id: str) -> Any:
    """A run by id, or a UserError naming it."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(f"MLflow run {run_id} not found; list the runs with `python -m ddpm compare`") from None


def _comparison_rows(runs: Sequence[Any], values: Sequence[dict], metrics: Sequence[str] | None = None,
                     ) -> list[tuple[str, list[str]]]:
    """(label, one cell per run) for the run id, status, differing params and final metrics (or `metrics`,
    looked up in `values`, one dict per run).

    Metric rows are sorted by name, so they come grouped by prefix (`eval/`, `train/final_`, ...).
    """
    rows = [("run_id", [r.info.run_id[:8] for r in runs]), ("status", [r.info.status for r in runs])]
    keys = sorted({k for r in runs for k in r.data.params})
    for key in keys:
        cells = [r.data.params.get(key, "-") for r in runs]
        if len(set(cells)) > 1:
            rows.append((key, cells))
    final = sorted({k for r in runs for k in final_keys(r.data.tags)})
    if not final:  # runs that never reached log_final: show their latest non-system metrics
        final = sorted({k for r in runs for k in r.data.metrics if not k.startswith(("system/", "resources/"))})
    if metrics:
        unknown = sorted(set(metrics) - {k for v in values for k in v})
        if unknown:
            raise UserError(f"no run logged metric(s) {', '.join(unknown)}; the runs have e.g. {', '.join(final[:8])}")
        final = list(metrics)
    for key in final:
        rows.append((key, [_fmt(v.get(key)) for v in values]))
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


def _format_markdown(rows: list[tuple[str, list[str]]], names: list[str]) -> str:
    """A GitHub markdown table: one row per run, one column per label ('|' in cells escaped)."""
    esc = lambda text: text.replace("|", "\\|")  # noqa: E731
    header = ["run", *(label for label, _ in rows)]
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for i, name in enumerate(names):
        lines.append("| " + " | ".join(esc(c) for c in [name, *(cells[i] for _, cells in rows)]) + " |")
    return "\n".join(lines)

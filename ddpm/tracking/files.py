"""The plain files DVC reads (metrics JSON, plots TSV) and the run-id files that chain the stages."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm.core.atomic import write_text

if TYPE_CHECKING:
    pass


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


def read_run_id(run_info: Path) -> str | None:
    """The MLflow run id a stage recorded in `run_info` (None when tracking was off)."""
    if not run_info.exists():
        return None
    return json.loads(run_info.read_text()).get("mlflow_run_id") or None


def write_run_id(run_info: Path, run_id: str | None, extra: Mapping[str, Any] | None = None) -> None:
    """Record the MLflow run a stage logged into ("" when none), for the stage after it, with `extra` fields
    (e.g. the code that made the stage's outputs)."""
    write_text(run_info, json.dumps({"mlflow_run_id": run_id or "", **(extra or {})}, indent=2) + "\n")

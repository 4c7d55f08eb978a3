"""The MLflow UI's address of each experiment's runs table, printed by `make mlflow-ui` before the server starts.

MLflow 3's UI opens an experiment on its GenAI overview; the `#/experiments/<id>/runs` route is the runs table
(checked in headless Chromium against MLflow 3.17.2), so that is the address worth printing.

    python -m ddpm.tracking.ui --store mlflow.db [--experiment NAME] [--base http://127.0.0.1:5000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ddpm.errors import UserError

DEFAULT_BASE = "http://127.0.0.1:5000"


def runs_table_addresses(db: Path, base: str = DEFAULT_BASE, experiment: str | None = None) -> list[tuple[str, str]]:
    """(experiment name, runs-table address) for each active experiment of the sqlite store `db` that has runs,
    or for `experiment` alone (with or without runs); oldest experiment first."""
    from mlflow import MlflowClient

    if not db.is_file():  # MlflowClient would silently create an empty store
        raise UserError(f"no MLflow store at {db}; run the pipeline first (make quickstart)")
    client = MlflowClient(f"sqlite:///{db.resolve()}")
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise UserError(f"no MLflow experiment {experiment!r} in {db} (there are: {names}); "
                            "drop EXPERIMENT= or name one of them")
        experiments = [exp]
    else:
        experiments = [e for e in client.search_experiments(order_by=["creation_time ASC"])
                       if client.search_runs([e.experiment_id], max_results=1)]
    return [(e.name, f"{base.rstrip('/')}/#/experiments/{e.experiment_id}/runs") for e in experiments]


def main(argv: list[str] | None = None) -> int:
    """Print one `name  address` line per experiment; a missing store or experiment is one line, exit 2."""
    parser = argparse.ArgumentParser(prog="python -m ddpm.tracking.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("mlflow.db"), help="the sqlite file (default: mlflow.db)")
    parser.add_argument("--experiment", default=None, help="only this experiment (default: every one with runs)")
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"the UI's address (default: {DEFAULT_BASE})")
    args = parser.parse_args(argv)
    try:
        rows = runs_table_addresses(args.store, args.base, args.experiment or None)
    except UserError as err:
        print(f"error: {err}")
        return 2
    if not rows:
        print(f"no runs in {args.store} yet; the UI is at {args.base.rstrip('/')}/")
    width = max((len(name) for name, _ in rows), default=0)
    for name, address in rows:
        print(f"runs table of {name:<{width}}  {address}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make mlflow-ui`'s first lines: the address of each experiment's runs table, looked up in a real sqlite store."""

from __future__ import annotations

from ddpm.tracking.store import open_store
from ddpm.tracking.ui import main, runs_table_addresses


def test_addresses_name_each_experiment_with_runs_by_its_id(tmp_path):
    db = tmp_path / "mlflow.db"
    client, first = open_store(f"sqlite:///{db}", "quickstart")
    _, second = open_store(f"sqlite:///{db}", "cifar-cpu")
    _, empty = open_store(f"sqlite:///{db}", "no-runs-yet")
    for exp_id in (first, second, second):
        client.create_run(exp_id)
    assert len({first, second, empty}) == 3

    rows = dict(runs_table_addresses(db, base="http://127.0.0.1:5001/"))
    assert rows == {"quickstart": f"http://127.0.0.1:5001/#/experiments/{first}/runs",
                    "cifar-cpu": f"http://127.0.0.1:5001/#/experiments/{second}/runs"}
    # a named experiment is printed even before its first run
    assert runs_table_addresses(db, experiment="no-runs-yet") == [
        ("no-runs-yet", f"http://127.0.0.1:5000/#/experiments/{empty}/runs")]


def test_unknown_experiment_or_missing_store_is_one_line_and_exit_2(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    open_store(f"sqlite:///{db}", "quickstart")
    assert main(["--store", str(db), "--experiment", "quickstrat"]) == 2
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and "'quickstrat'" in out and "quickstart" in out

    missing = tmp_path / "elsewhere" / "mlflow.db"
    assert main(["--store", str(missing)]) == 2
    assert "make quickstart" in capsys.readouterr().out
    assert not missing.exists()  # looking up addresses never creates an empty store

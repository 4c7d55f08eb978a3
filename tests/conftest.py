"""Shared fixtures: a tiny, fast configuration and a prepared `shapes` dataset in a temporary repo."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from processes import Processes, describe, end_processes, stray_processes

from ddpm.config import Config, flatten

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 0,
    "schedule": "linear",
    "data": {"dataset": "shapes", "image_size": 16, "shapes_per_class": 12, "holdout_fraction": 0.25},
    "model": {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
              "num_groups": 8, "dropout": 0.0, "num_classes": 10},
    "diffusion": {"timesteps": 40},
    "train": {"device": "cpu", "batch_size": 8, "steps": 6, "lr": 1e-3, "warmup_steps": 2, "precision": "fp32",
              "compile": False, "channels_last": False, "sample_every": 3, "checkpoint_every": 2,
              "progress_steps": 4, "progress_per_class": 2, "ema_decay": 0.9},
    "sample": {"steps": 4, "num_samples": 20, "batch_size": 20, "grid_per_class": 2, "denoise_frames": 3,
               "guidance_scale": 1.0},
    "evaluate": {"fid": False, "classifier": {"epochs": 1, "width": 8, "batch_size": 32},
                 "guidance_sweep": [0.0, 1.0], "sweep_samples": 20},
    "progress": {"num_samples": 20, "sampler": "ddim", "spacing": "time", "steps": 4, "batch_size": 20},
    "tracking": {"experiment": "test", "log_every": 2, "system_metrics": False},
}


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge `overrides` into a copy of `base`."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_params(**overrides) -> dict:
    """The tiny params as plain data, with section overrides (`train={"steps": 4}`)."""
    return merge(TINY, overrides)


@pytest.fixture
def tiny_cfg() -> Config:
    return Config.from_dict(tiny_params())


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    """A temporary repository root holding the tiny params.yaml; the cwd for the test."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def project_params_text() -> str:
    """The project's params.yaml as git has it (the index, i.e. committed or staged), else the file.

    The workspace copy is experiment state: `dvc exp run` (so `make quickstart`, the README's first command)
    applies the experiment's params to it, so tests of the project's defaults must not read it.
    """
    out = subprocess.run(["git", "-C", str(ROOT), "show", ":params.yaml"], capture_output=True, text=True,
                         timeout=120)
    return out.stdout if out.returncode == 0 else (ROOT / "params.yaml").read_text()


@pytest.fixture
def project_params(tmp_path: Path) -> Path:
    """A file holding `project_params_text()`, for code that reads params from a path."""
    path = tmp_path / "project_params.yaml"
    path.write_text(project_params_text())
    return path


def recipe_params(name: str, *extra: str) -> dict:
    """The params `recipes/NAME.yaml` runs (with `-S KEY=VALUE` texts `extra`): its overrides, as the recipe
    command passes them to `dvc exp run`, applied to params.yaml as git has it (a dict)."""
    from ddpm.pipeline.recipe import recipe_overrides

    params = yaml.safe_load(project_params_text())
    for key, text in recipe_overrides(ROOT / "recipes" / f"{name}.yaml", params, list(extra)).items():
        *parents, leaf = key.split(".")
        node = params
        for p in parents:
            node = node[p]
        assert leaf in node, f"{key} is not in params.yaml"
        node[leaf] = yaml.safe_load(text)
    return params


# --------------------------------------------------------------------------------- the environment

# what the code reads (ddpm/tracking: store, lineage, tracker) and what `dvc exp run` / `mlflow run` set; with a
# user's `export MLFLOW_TRACKING_URI=...` the tests would log to their server, with DVC_ROOT into their repository
_CLEARED = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "DVC_ROOT",
            "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")


def _clean_environment(mp: pytest.MonkeyPatch) -> None:
    for name in {*_CLEARED, *(k for k in os.environ if k.startswith(("MLFLOW_", "DVC_")))}:
        mp.delenv(name, raising=False)
    mp.setenv("DVC_NO_ANALYTICS", "1")  # no network, and no detached `dvc daemon analytics` process
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no network from MLflow's usage reports either


@pytest.fixture(scope="session", autouse=True)
def _session_environment():
    """No tracking/DVC variable of the user's shell reaches the session-scoped fixtures (or their processes)."""
    with pytest.MonkeyPatch.context() as mp:
        _clean_environment(mp)
        yield


@pytest.fixture(autouse=True)
def _test_environment(monkeypatch):
    """...nor a test, even if an earlier test (or code it ran in-process) exported one."""
    _clean_environment(monkeypatch)


# --------------------------------------------------------------------------------- subprocesses

_BASETEMP = pytest.StashKey[Path]()
_PREVIOUS_SIGTERM = pytest.StashKey[object]()


@pytest.fixture
def procs(tmp_path: Path):
    """Start subprocesses through this (`procs.popen`, `procs.run`): teardown ends their process groups, and
    any `dvc`/`mlflow`/`python -m ddpm|stages.*` process left working in the test's tmp_path."""
    owned = Processes(workdir=tmp_path)
    try:
        yield owned
    finally:
        owned.end_all()


@pytest.fixture(scope="session", autouse=True)
def _basetemp(request, tmp_path_factory):
    """Where every test's files are: the session's leak check also looks for processes working there."""
    request.config.stash[_BASETEMP] = tmp_path_factory.getbasetemp()


@pytest.fixture(autouse=True)
def _no_process_left(request):
    """A test whose tool subprocess outlives it fails (after `procs`' teardown, which is set up later and so
    ends first); the process is ended."""
    yield
    left = stray_processes(None)
    if left:
        lines = describe(left)
        end_processes(left)
        pytest.fail("the test left processes running (now ended):\n" + "\n".join(lines), pytrace=False)


@pytest.hookimpl(trylast=True)  # after the runner's own sessionfinish, which tears the fixtures down
def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a tool process it started is still alive: a descendant of pytest, or (detached daemons
    such as DVC queue workers are re-parented to init) one working under the session's basetemp. End them.

    Under pytest-xdist the controller checks, after its workers have ended, under its basetemp (which holds
    the workers' own): a worker's failing exit status would not reach the run's."""
    if hasattr(session.config, "workerinput"):  # an xdist worker (not its environment: a child pytest inherits it)
        return
    basetemp = session.config.stash.get(_BASETEMP, None)
    if basetemp is None and _is_xdist_controller(session.config):
        basetemp = session.config._tmp_path_factory.getbasetemp()  # noqa: SLF001 (pytest's own, as xdist uses it)
    left = stray_processes(basetemp)
    if not left:
        return
    lines = describe(left)
    end_processes(left)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = "processes of the test run were still alive at its end (now ended):\n" + "\n".join(lines)
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("!", "processes left behind", red=True)
        reporter.write_line(message)
    else:
        sys.stderr.write(message + "\n")
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --------------------------------------------------------------------------------- stopping the test run


def _stop_on_sigterm(signum, frame):
    """SIGTERM (a CI time-out, `kill`) stops the run like Ctrl-C: KeyboardInterrupt, so pytest still runs the
    teardowns that end the tests' process groups. Later SIGTERMs are ignored until those are done.

    Under pytest-xdist nothing more is needed: the interrupted controller shuts its workers down, and execnet
    interrupts each one (SIGINT) whose test does not finish, so their teardowns run too (tests/test_harness.py)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def _is_xdist_controller(config) -> bool:
    return config.getoption("dist", "no") != "no" and not hasattr(config, "workerinput")


def pytest_collection_modifyitems(session, config, items):
    """Modules holding slow tests run first (each module kept whole, so its module fixtures are built once):
    under xdist the long real-tool tests then start at once and the short ones fill the gaps, instead of a
    long test starting last and running alone on one core."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow_modules)  # stable: the order within stays


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (`make test`): one worker per core this process may use (`taskset` is honoured; xdist's own
    count, psutil's physical cores, is not), at most 8: each worker builds the session's shared setup."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def _share_the_cores(config) -> None:
    """In an xdist worker, torch (and the stage processes, via OMP_NUM_THREADS) use this worker's share of the
    cores: N workers each with every core's threads oversubscribe the machine (OpenMP threads spin-wait)."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def _accept_the_controllers_interrupt(config) -> None:
    """An xdist worker is stopped by its controller's SIGINT (execnet). A run started with SIGINT ignored (a
    background job of a non-interactive shell: `make test &` in a script, some CI runners) passes that on to
    its workers, which would then go on with their tests, and the processes those start, after the controller
    is stopped: a worker always takes SIGINT as KeyboardInterrupt."""
    if hasattr(config, "workerinput") and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config):
    config.stash[_PREVIOUS_SIGTERM] = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    _accept_the_controllers_interrupt(config)
    _share_the_cores(config)


def pytest_unconfigure(config):
    previous = config.stash.get(_PREVIOUS_SIGTERM, None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# --------------------------------------------------------------------------------- shared expensive setup


def _shared_dir(request, tmp_path_factory, name: str) -> Path:
    """A folder every xdist worker of this run sees (the run's basetemp; the workers' own are inside it)."""
    base = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):
        base = base.parent
    return base / name


@pytest.fixture(scope="session")
def dvc_data_repo(request, tmp_path_factory) -> Path:
    """One pipeline repo per test run (see `dvc_repos`) where `dvc repro` ran the data stages (prepare,
    classifier, fid_stats): the real DVC run of those stages, shared by the tests that copy it."""
    from dvc_repos import built_once, init_pipeline_repo, reproduce_data_stages

    def build(procs: Processes, root: Path) -> None:
        init_pipeline_repo(procs, root)
        reproduce_data_stages(procs, root)

    return built_once(_shared_dir(request, tmp_path_factory, "dvc-data"), build)


@pytest.fixture(scope="session")
def dvc_trained_repo(request, dvc_data_repo: Path, tmp_path_factory) -> Path:
    """`dvc_data_repo` after a real `dvc repro` of the whole pipeline (train, progress, sample, evaluate) with
    the tiny params, committed: one per test run, for the tests that start from a trained pipeline."""
    from dvc_repos import built_once, copy_repo, reproduce_pipeline

    def build(procs: Processes, root: Path) -> None:
        copy_repo(dvc_data_repo, root)
        reproduce_pipeline(procs, root)

    return built_once(_shared_dir(request, tmp_path_factory, "dvc-trained"), build)


@pytest.fixture
def dvc_repo_with_data(dvc_data_repo: Path, tmp_path: Path) -> Path:
    """A git + DVC pipeline repo (tiny params) whose data stages are reproduced and committed: a copy of the
    session's `dvc_data_repo` in tmp_path, so each test's experiments start from the same committed state."""
    from dvc_repos import copy_repo

    return copy_repo(dvc_data_repo, tmp_path)


@pytest.fixture
def dvc_repo_trained(dvc_trained_repo: Path, tmp_path: Path) -> Path:
    """A copy of the run's `dvc_trained_repo` in tmp_path (its MLflow store moved with it): a trained, committed
    pipeline for a test to change."""
    from dvc_repos import copy_repo

    return copy_repo(dvc_trained_repo, tmp_path)


def data_stage_params(cfg: Config) -> dict:
    """The params the data stages (prepare, classifier, fid_stats) read, as dvc.yaml declares them."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = [p for name in ("prepare", "classifier", "fid_stats") for p in stages[name]["params"]]
    flat = flatten(cfg.to_dict())
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(f"{p}.") for p in declared)}


@pytest.fixture(scope="session")
def data_stages(tmp_path_factory):
    """prepare, classifier and fid_stats run once per session (in-process, the tiny params): a function
    `copy_to(dest, cfg)` puts their outputs into `dest` for a test that trains on them with `cfg`, which must
    not change a param those stages read (it would need its own data stages)."""
    from ddpm.data.datasets import prepare
    from ddpm.pipeline.classifier import classifier_stage
    from ddpm.pipeline.fid_stats import fid_stats_stage
    from ddpm.pipeline.layout import Layout

    root = tmp_path_factory.mktemp("data-stages")
    cfg = Config.from_dict(tiny_params())
    paths = Layout.under(root)
    prepare(cfg, paths.prepared)
    classifier_stage(cfg, paths)
    fid_stats_stage(cfg, paths)
    made_with = data_stage_params(cfg)

    def copy_to(dest: Path, test_cfg: Config) -> None:
        assert data_stage_params(test_cfg) == made_with, "these params change the data stages: run them here"
        shutil.copytree(root, dest, dirs_exist_ok=True)

    return copy_to

"""The training code fingerprint: what it covers (the real import closure of the train stage), what changes
it, and what the train and sample stages do with a checkpoint made by other training code."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import tiny_params

import ddpm.pipeline.train as train_mod
from ddpm.config import Config
from ddpm.core.checkpoint import load_checkpoint
from ddpm.data.datasets import prepare
from ddpm.pipeline.fingerprint import EXCLUDED, PACKAGE, fingerprinted_files, training_fingerprint
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.resume import resume_root
from ddpm.pipeline.sample import sample_stage
from ddpm.pipeline.train import train

ROOT = Path(__file__).resolve().parents[1]
NO_TRACKING = {"mlflow": False, "tensorboard": False, "system_metrics": False}


def _module_file(name: str) -> Path:
    """`ddpm.core.unet` -> ddpm/core/unet.py, a package -> its __init__.py."""
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imported_at_import_time(module: str) -> set[str]:
    """The `ddpm` modules in `sys.modules` after importing `module` in a fresh interpreter (the project's code)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (f"import importlib, json, sys; importlib.import_module({module!r}); "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'ddpm' or m.startswith('ddpm.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return set(json.loads(out.stdout))


def _imported_inside_functions(name: str) -> set[str]:
    """The `ddpm` modules that module `name` imports inside its functions (run later, e.g. when logging the model)."""
    tree = ast.parse(_module_file(name).read_text())
    found = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ddpm"):
                    found.add(node.module)
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names if a.name.startswith("ddpm")}
    return found


def training_closure() -> set[str]:
    """Every `ddpm` module `python -m stages.train` runs: the import closure, plus what the modules in it
    import inside functions (followed transitively). `ddpm.cli` is the stage's entry point: its other
    commands' lazy imports are not training's."""
    closure = _imported_at_import_time("stages.train")
    todo = [m for m in closure if m != "ddpm.cli"]
    while todo:
        for name in _imported_inside_functions(todo.pop()) - closure:
            new = _imported_at_import_time(name) - closure
            closure |= new
            todo += sorted(new)
    return closure


def outside_the_fingerprint(modules: set[str]) -> list[str]:
    """The modules neither fingerprinted nor excluded (with a reason) from the fingerprint."""
    covered = set(fingerprinted_files())
    return sorted(m for m in modules if m not in EXCLUDED and _module_file(m) not in covered)


def test_every_module_training_runs_is_fingerprinted_or_excluded_for_a_reason():
    closure = training_closure()
    assert {"ddpm.core.unet", "ddpm.pipeline.train", "ddpm.tracking.mlflow_model"} <= closure  # lazily imported too
    assert outside_the_fingerprint(closure) == [], "fingerprint it (ddpm.pipeline.fingerprint) or exclude it"
    assert all(reason for reason in EXCLUDED.values())
    assert not any(name.startswith(("ddpm.core.", "ddpm.data.")) for name in EXCLUDED)  # those change weights


def test_the_closure_check_can_fail():
    """A reporting module that training does not import today is caught, once training would import it."""
    assert outside_the_fingerprint({"ddpm.core.unet", "ddpm.tracking.compare"}) == ["ddpm.tracking.compare"]


def test_the_train_stage_depends_on_every_fingerprinted_file():
    """Else an edit could change the resume key without DVC re-running train (the lock would hide it)."""
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    for path in fingerprinted_files():
        rel = path.relative_to(ROOT).as_posix()
        assert any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps), f"train does not depend on {rel}"


def test_the_fingerprint_follows_training_code_not_reporting_code(tmp_path):
    copy = tmp_path / "ddpm"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = training_fingerprint(copy)
    assert base == training_fingerprint(PACKAGE)  # contents, not location or git
    with open(copy / "tracking" / "compare.py", "a") as f:
        f.write("# a comment in reporting code\n")
    assert training_fingerprint(copy) == base
    with open(copy / "core" / "unet.py", "a") as f:
        f.write("# a comment in the network\n")
    assert training_fingerprint(copy) != base
    (copy / "core" / "unet.py").write_bytes((PACKAGE / "core" / "unet.py").read_bytes())
    (copy / "core" / "extra.py").write_text("X = 1\n")  # a new module in a fingerprinted folder
    assert training_fingerprint(copy) != base


def test_a_checkpoint_of_other_training_code_is_not_resumed_and_sampling_it_is_recorded(tmp_path, monkeypatch,
                                                                                      caplog):
    cfg = Config.from_dict(tiny_params(train={"sample_every": 0}, tracking=NO_TRACKING))
    paths = Layout.under(tmp_path)
    prepare(cfg, paths.prepared)
    first = train(cfg, paths)
    old = first["code"]["fingerprint"]
    assert old == training_fingerprint() and set(first["code"]) == {"fingerprint", "git_commit", "git_dirty"}
    assert json.loads(paths.train_run.read_text())["code"] == first["code"]
    assert json.loads(paths.train_metrics.read_text())["code"] == first["code"]
    assert load_checkpoint(paths.ema)["code"] == {"fingerprint": old}
    (old_dir,) = resume_root(tmp_path).iterdir()
    assert load_checkpoint(old_dir / "last.pt")["code"] == first["code"]
    weights, old_weights = paths.ema.read_bytes(), load_checkpoint(paths.ema)["ema"]["weights"]

    # the same params and data under other training code (its fingerprint): a finished checkpoint exists
    steps = {"n": 0}
    real_step = train_mod.train_step

    def counted(*args, **kwargs):
        steps["n"] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", counted)
    monkeypatch.setattr(train_mod, "code_identity", lambda root: {**first["code"], "fingerprint": "0" * 16})
    with caplog.at_level(logging.INFO, logger="ddpm"):
        again = train(cfg, paths)
    assert steps["n"] == cfg.train.steps  # from step 0, not the finished checkpoint's last step
    said = [r.getMessage() for r in caplog.records if "training code changed" in r.getMessage()]
    assert said == [f"training code changed since the checkpoint in {old_dir} (fingerprint {old} -> {'0' * 16}): "
                    "training from step 0"]
    assert not any("resuming" in r.getMessage() for r in caplog.records)
    assert again["code"]["fingerprint"] == "0" * 16 and len(list(resume_root(tmp_path).iterdir())) == 2
    assert paths.ema.read_bytes() != weights  # the model file records the code that made it ...
    new_weights = load_checkpoint(paths.ema)["ema"]["weights"]
    assert all(torch.equal(new_weights[k], old_weights[k]) for k in new_weights)  # ... not the weights: same code

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddpm"):
        sample_stage(cfg, paths)  # the running code's fingerprint is the real one: allowed, but recorded
    record = json.loads(paths.sample_run.read_text())["train_code"]
    assert record == {"checkpoint_fingerprint": "0" * 16, "running_fingerprint": old, "differs": True}
    assert any("trained by other training code" in r.getMessage() for r in caplog.records)

"""Each stage in dvc.yaml depends on exactly the code it runs, so an edit re-runs only the stages it can change.

A stage's code is its stage script plus the `ddpm` files of its import closure, found two ways:

- **static** (what dvc.yaml must list): from `stages/<name>.py`, every `import ddpm...` / `from ddpm... import`
  statement of every module reached, followed transitively, *at any depth of the file*: an import inside a
  function counts (e.g. the tracker imports the MLflow model code only when it logs a model), because a
  stage may run that function. Only `if TYPE_CHECKING:` blocks are skipped (they never run). A module's
  parent packages count too (Python runs their `__init__.py`).
- **run-time** (a cross-check): the `ddpm` modules in `sys.modules` after importing the stage module in a
  fresh interpreter (`python -c "import stages.<name>"` from the repository root). It must lie inside the
  static closure; a module found only here would be a dynamic import the static walk cannot see.

dvc.yaml lists a folder (`ddpm/core`) only where the closure holds every `.py` file below it, else the
files; expanded, the listed code must equal the static closure exactly: a missing file would let a code
change go unnoticed, an extra one re-runs a stage that the change cannot affect.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ddpm"


def _module_file(module: str) -> Path | None:
    """The source file of a `ddpm` module or package, relative to the repository root (None: not a module)."""
    base = Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (ROOT / candidate).is_file():
            return candidate
    return None


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_modules(path: Path) -> set[str]:
    """The `ddpm` modules a file imports anywhere (functions included), outside `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against the file's package
                    pkg = path.relative_to(ROOT).with_suffix("").parts[: -child.level]
                    base = ".".join(pkg + ((child.module,) if child.module else ()))
                else:
                    base = child.module or ""
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)  # `from ddpm.core import runtime`
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {m for m in found if (m == PACKAGE or m.startswith(PACKAGE + ".")) and _module_file(m)}


def static_closure(script: Path) -> set[Path]:
    """The `ddpm` files a script (relative to the root, or absolute) can run: its imports at any depth,
    followed transitively (see the module docstring)."""
    seen: set[str] = set()
    todo = sorted(_imported_modules(ROOT / script))
    while todo:
        module = todo.pop()
        for m in _with_parents(module):
            if m not in seen:
                seen.add(m)
                todo += sorted(_imported_modules(ROOT / _module_file(m)) - seen)
    return {_module_file(m) for m in seen}


def runtime_closure(stage: str) -> set[Path]:
    """The `ddpm` files in `sys.modules` after importing `stages.<stage>` in a fresh interpreter at the root."""
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'ddpm' or m.startswith('ddpm.'))))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, f"stages.{stage}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600, check=True)
    return {_module_file(m) for m in json.loads(out.stdout)}


def declared_code(stage: dict) -> set[Path]:
    """The `ddpm` files a dvc.yaml stage lists, folders expanded to their `.py` files."""
    files: set[Path] = set()
    for dep in stage["deps"]:
        if dep == PACKAGE or dep.startswith(PACKAGE + "/"):
            path = ROOT / dep
            assert path.exists(), f"dvc.yaml lists {dep}, which does not exist"
            listed = sorted(path.rglob("*.py")) if path.is_dir() else [path]
            files.update(p.relative_to(ROOT) for p in listed if "__pycache__" not in p.parts)
    return files


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def suggested_deps(closure: set[Path]) -> list[str]:
    """The shortest honest listing of a closure: a folder where it holds all of the folder's .py files."""
    out, covered = [], set()
    for folder in sorted({p.parent for p in closure}, key=lambda p: (len(p.parts), str(p))):
        if any(folder.is_relative_to(c) for c in covered):
            continue
        every = {p.relative_to(ROOT) for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
        if every <= closure and folder != Path(PACKAGE):
            out.append(str(folder))
            covered.add(folder)
    out += [str(p) for p in sorted(closure) if not any(p.is_relative_to(c) for c in covered)]
    return sorted(out)


@pytest.mark.parametrize("name", list(_stages()))
def test_each_stage_lists_exactly_the_code_it_runs(name: str):
    stage = _stages()[name]
    script = Path("stages", f"{name}.py")
    assert str(script) in stage["deps"], f"{name}: dvc.yaml must list its stage script {script}"
    closure = static_closure(script)
    declared = declared_code(stage)
    missing, extra = sorted(map(str, closure - declared)), sorted(map(str, declared - closure))
    assert not missing and not extra, (
        f"stage {name}: dvc.yaml misses {missing} and lists {extra}, which it does not import; "
        f"its ddpm deps should be {suggested_deps(closure)}"
    )


@pytest.mark.parametrize("name", list(_stages()))
def test_what_a_stage_imports_at_run_time_is_in_its_static_closure(name: str):
    seen = runtime_closure(name)
    static = static_closure(Path("stages", f"{name}.py"))
    assert seen - static == set(), f"stage {name} imports {sorted(map(str, seen - static))} where the walk cannot see"
    assert Path("ddpm/pipeline/entry.py") in seen  # the subprocess really imported the stage


def _stages_depending_on(file: str) -> set[str]:
    return {name for name, stage in _stages().items() if Path(file) in declared_code(stage)}


def test_an_edit_marks_only_the_stages_it_can_change():
    """The network's code re-runs training and what reads its model, not the data or the reference stages;
    reporting code that no stage runs re-runs nothing."""
    assert _stages_depending_on("ddpm/core/unet.py") == {"train", "sample", "evaluate", "progress"}
    assert _stages_depending_on("ddpm/tracking/compare.py") == set()
    assert _stages_depending_on("ddpm/data/cifar10.py") == {"prepare"}
    assert _stages_depending_on("ddpm/evaluation/fid.py") == {"fid_stats", "evaluate", "progress"}
    assert _stages_depending_on("ddpm/evaluation/classifier.py") == {"classifier", "evaluate", "progress"}
    # the quality curve's scoring re-runs the progress stage alone, never the training
    assert _stages_depending_on("ddpm/pipeline/curve.py") == {"progress"}
    assert _stages_depending_on("ddpm/pipeline/snapshots.py") == {"train", "progress"}


def test_the_walk_follows_imports_inside_functions(tmp_path: Path):
    """What makes the listing safe against lazy imports: an import inside a function is part of the closure,
    an import under `if TYPE_CHECKING:` is not."""
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from ddpm.tracking import compare\n\n"
                     "def main():\n    from ddpm.core.ema import EMA\n    return EMA\n")
    closure = static_closure(probe)
    assert closure == {Path("ddpm/__init__.py"), Path("ddpm/core/__init__.py"), Path("ddpm/core/ema.py")}


# ----------------------------------------------------------------------------------- with real DVC


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # `python` in dvc.yaml = this venv
    for k in ("DVC_ROOT", "MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "PYTHONPATH"):
        env.pop(k, None)
    return env


def _changed_stages(repo: Path, procs) -> set[str]:
    out = procs.run([sys.executable, "-m", "dvc", "status", "--json"], timeout=600, cwd=repo, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout or "{}"))


@pytest.mark.slow
def test_a_comment_in_reporting_code_leaves_the_pipeline_up_to_date(dvc_repo_trained: Path, procs):
    """Issue 19, 3(c): after a finished `dvc repro`, a comment in a module no stage runs re-runs nothing; an
    edit in the network marks the stages that run it (and no other)."""
    repro_done = dvc_repo_trained  # after a real `dvc repro` of the whole pipeline
    assert _changed_stages(repro_done, procs) == set()
    compare = repro_done / "ddpm/tracking/compare.py"
    compare.write_text(compare.read_text() + "# a reader's note: nothing a stage runs\n")
    assert _changed_stages(repro_done, procs) == set()
    unet = repro_done / "ddpm/core/unet.py"
    unet.write_text(unet.read_text() + "# an edit in the network's module\n")
    assert _changed_stages(repro_done, procs) == {"train", "sample", "evaluate", "progress"}


if __name__ == "__main__":  # `python tests/test_stage_deps.py`: the ddpm deps each stage should list
    for stage_name in _stages():
        deps = suggested_deps(static_closure(Path("stages", f"{stage_name}.py")))
        print(f"{stage_name}:", *(f"  - {d}" for d in deps), sep="\n")

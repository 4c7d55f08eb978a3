"""The folder tree is the architecture: imports point one way, from the pipeline down to the core.

    cli / stages  ->  pipeline  ->  tracking, data, evaluation  ->  core  ->  config
                                                                errors (not from core)

Any import (top-level or inside a function) of a higher layer from a lower one fails this test. The core
raises plain errors (ValueError, FileNotFoundError, its own exception classes) stating the facts; the
workflows above it turn them into a `UserError` naming the param, flag or file to fix, so `ddpm.errors`
(UserError, Interrupted) is not the core's to import. No module is over MAX_LINES lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ddpm"

# For each subpackage, the ddpm modules it must never import.
FORBIDDEN = {
    "core": ("ddpm.data", "ddpm.evaluation", "ddpm.tracking", "ddpm.pipeline", "ddpm.cli", "ddpm.errors"),
    "data": ("ddpm.evaluation", "ddpm.tracking", "ddpm.pipeline", "ddpm.cli"),
    "evaluation": ("ddpm.tracking", "ddpm.pipeline", "ddpm.cli"),
    "tracking": ("ddpm.pipeline", "ddpm.cli"),
    "pipeline": ("ddpm.cli",),
}
BOTTOM = ("config.py", "errors.py")  # import no other ddpm module
MAX_LINES = 400


def _imports(path: Path) -> list[str]:
    """Every module name `path` imports, absolute or relative, at any depth of the file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level]
                names.append(".".join(parts + ((node.module,) if node.module else ())))
            else:
                names.append(node.module or "")
    return names


def _violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{f.relative_to(PACKAGE.parent) if f.is_relative_to(PACKAGE.parent) else f.name} imports {name}"
        for f in files
        for name in _imports(f)
        if any(name == bad or name.startswith(bad + ".") for bad in forbidden)
    ]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"ddpm/{layer}/ is missing"
    assert _violations(files, FORBIDDEN[layer]) == []


def test_config_and_errors_import_no_other_ddpm_module():
    files = [PACKAGE / name for name in BOTTOM]
    assert _violations(files, ("ddpm.core", "ddpm.data", "ddpm.evaluation", "ddpm.tracking", "ddpm.pipeline",
                               "ddpm.cli")) == []


def test_every_module_belongs_to_a_layer():
    """A new flat module would sit outside the layering; it must go into a subpackage."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py", "config.py", "errors.py"]


def test_the_checker_sees_a_violation(tmp_path):
    """The test above can fail: a core module importing the pipeline (even inside a function) is caught."""
    bad = tmp_path / "probe.py"
    bad.write_text("import torch\n\ndef f():\n    from ddpm.pipeline.train import train\n    return train\n")
    assert _violations([bad], FORBIDDEN["core"]) == ["probe.py imports ddpm.pipeline.train"]


def test_the_checker_sees_the_core_raising_the_pipelines_error(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("from ddpm.errors import UserError\n\n\ndef f():\n    raise UserError('run dvc repro')\n")
    assert _violations([bad], FORBIDDEN["core"]) == ["probe.py imports ddpm.errors"]


def test_no_module_is_over_the_line_limit():
    """Short modules, each named for what it holds: a file past the limit holds more than one thing."""
    files = sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE.parent / "stages").glob("*.py"))
    long = {str(f.relative_to(PACKAGE.parent)): n for f in files if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}

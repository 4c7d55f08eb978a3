"""Servers on 127.0.0.1 in the docs and the Makefile.

The Python rules (no eval/exec of strings, no pickle loading, torch.load only through the weights-only
loader, no server bound to every interface) are ruff's: see [tool.ruff] in pyproject.toml; `make test`
runs `ruff check` first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_servers_bind_to_localhost_in_docs_and_makefile():
    checked = 0
    for name in ("README.md", "Makefile", "MLproject"):
        for line in (ROOT / name).read_text().splitlines():
            if "mlflow ui" in line or "mlflow server" in line or ("tensorboard" in line and "--logdir" in line):
                checked += 1
                assert "--host 127.0.0.1" in line, f"{name}: {line.strip()}"
    assert checked >= 4


@pytest.mark.parametrize(
    ("source", "rule"),
    [
        ("eval('1 + 1')\n", "S307"),
        ("exec('x = 1')\n", "S102"),
        ("import pickle\n\npickle.loads(b'')\n", "S301"),
        ("import torch\n\ntorch.load('m.pt', weights_only=True)\n", "TID251"),
        ("import socket\n\nsocket.socket().bind(('0.0.0.0', 80))\n", "S104"),
    ],
)
def test_the_linter_refuses_unsafe_code(source, rule):
    """pyproject.toml's ruff rules fire on a package module doing each unsafe thing (and pass clean code)."""
    def lint(text: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
             "--stdin-filename", str(ROOT / "ddpm" / "probe.py"), "-"],
            input=text, capture_output=True, text=True, cwd=ROOT, check=False, timeout=120,
        )

    bad = lint(source)
    assert bad.returncode == 1 and f" {rule} " in bad.stdout, bad.stdout + bad.stderr
    assert lint("print('ok')\n").returncode == 0


def test_stage_scripts_may_import_only_ddpm():
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
         "--stdin-filename", str(ROOT / "stages" / "probe.py"), "-"],
        input="import torch\n\nprint(torch)\n", capture_output=True, text=True, cwd=ROOT, check=False, timeout=120,
    )
    assert out.returncode == 1 and "TID251 `torch` is banned" in out.stdout, out.stdout + out.stderr

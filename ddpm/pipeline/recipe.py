"""Recipes: a YAML file of params overrides, nested like params.yaml, run as one `dvc exp run -S key=value ...`.

`python -m ddpm recipe recipes/quickstart.yaml` runs it (`--print` shows the command instead, `--queue`
queues it, `-S key=value` adds or replaces an override, e.g. DVC's grid syntax `-S 'schedule=linear,cosine'`).
Every override stays a `-S` flag, so `dvc exp show` lists each one. A recipe is validated against `Config`
merged into the current params.yaml before DVC sees it: a misspelt key or a bad value is a one-line error.
A list in a recipe is a list value (`model.channel_mult: [1, 2, 2]`), never a sweep; sweeps are `-S` flags.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from ddpm.config import Config, flatten
from ddpm.errors import UserError


def load_recipe(path: Path) -> dict[str, Any]:
    """The recipe file's overrides as nested plain data (a mapping at the top)."""
    if not path.is_file():
        raise UserError(f"recipe {path} not found; pass a file such as recipes/quickstart.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML ({str(err).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"recipe {path} holds no overrides; write them nested like params.yaml (data: ...)")
    return data


def override_text(value: Any) -> str:
    """A value as `dvc exp run -S` reads it (YAML): true/false, null, [a,b], floats with a decimal point."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    if isinstance(value, float):
        text = repr(value)
        return text.replace("e", ".0e") if "e" in text and "." not in text else text  # YAML 1.1 needs the dot
    if isinstance(value, str) and yaml.safe_load(value) != value:
        return json.dumps(value)  # a string YAML would read as something else ("true", "1.0"): quoted
    return str(value)


def _set(params: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = params
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise UserError(f"{key}: {name} is not a section of params.yaml; check the key")
    node[leaf] = value


def _choices(text: str) -> list[str]:
    """DVC's grid syntax `a,b,c` split at the commas outside brackets (`[1,2],[2,2]` is two lists)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    return [*out, text[start:]]


def recipe_overrides(path: Path, base: dict[str, Any], extra: list[str]) -> dict[str, str]:
    """`{"key": "value text"}` for every leaf of the recipe at `path`, then the `-S key=value` texts of `extra`
    (replacing the recipe's value of the same key). Validated against `Config` on top of `base` (params.yaml):
    the recipe alone, then with every `-S` flag (each further choice of a grid on its own)."""
    recipe = load_recipe(path)
    merged = json.loads(json.dumps(base))  # a deep copy
    for key, value in flatten(recipe).items():
        _set(merged, key, value)
    Config.from_dict(merged, source=str(path))  # unknown keys and bad values: one line naming them
    overrides = {key: override_text(value) for key, value in flatten(recipe).items()}
    known = set(flatten(Config().to_dict()))
    grids: dict[str, list[str]] = {}
    for item in extra:
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            raise UserError(f"-S {item}: not KEY=VALUE with a key of params.yaml; e.g. -S train.steps=100")
        grids[key] = _choices(text)
        overrides[key] = text
        _set(merged, key, yaml.safe_load(grids[key][0]))
    flags = " ".join(f"-S {key}={overrides[key]}" for key in grids)
    Config.from_dict(merged, source=f"{path} with {flags}" if grids else str(path))
    for key, choices in grids.items():  # each further value of a grid, the other flags at their first
        for choice in choices[1:]:
            trial = json.loads(json.dumps(merged))
            _set(trial, key, yaml.safe_load(choice))
            Config.from_dict(trial, source=f"-S {key}={overrides[key]}")
    return overrides


def exp_run_command(overrides: dict[str, str], queue: bool = False) -> list[str]:
    """`dvc exp run [--queue] -S key=value ...`, one flag per override."""
    flags = [word for key, text in overrides.items() for word in ("-S", f"{key}={text}")]
    return ["dvc", "exp", "run", *(["--queue"] if queue else []), *flags]


def run_recipe(path: Path, base: dict[str, Any], extra: list[str], queue: bool, print_only: bool) -> None:
    """Print the recipe's `dvc exp run` command, or replace this process with it (its exit status is ours)."""
    command = exp_run_command(recipe_overrides(path, base, extra), queue)
    if print_only:
        print(shlex.join(command))
        return
    print(shlex.join(command), flush=True)
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        raise UserError("dvc is not on PATH; activate the project's virtualenv (.venv/bin) first") from None

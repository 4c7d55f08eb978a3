"""Recipes are files: recipes/*.yaml hold only overrides, validated against Config, and `python -m ddpm recipe`
turns one into the `dvc exp run -S ...` command that `make quickstart` / `make cifar-cpu` / `make experiment` run."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import project_params_text, recipe_params

from ddpm.config import Config
from ddpm.pipeline.recipe import exp_run_command, recipe_overrides

ROOT = Path(__file__).resolve().parents[1]

# `make quickstart`'s overrides before recipes were files: the Makefile's QUICKSTART_PARAMS at commit 0898301,
# as make expanded it (the recipe must give exactly these, so the quickstart trains the same model)
QUICKSTART_0898301 = """
-S data.dataset=shapes -S data.image_size=16 -S data.shapes_per_class=600 -S model.channels=32
-S model.channel_mult=[1,2,2] -S model.num_res_blocks=1 -S model.attention_resolutions=[8] -S model.dropout=0.0
-S train.device=cpu -S train.precision=fp32 -S train.compile=false -S train.channels_last=false
-S train.batch_size=64 -S train.steps=900 -S train.lr=0.001 -S train.warmup_steps=100 -S train.ema_decay=0.995
-S train.sample_every=500 -S train.checkpoint_every=250 -S train.min_snr_gamma=5.0 -S train.progress_steps=25
-S train.progress_guidance_scale=4.0 -S sample.num_samples=500 -S sample.batch_size=500 -S sample.grid_per_class=8
-S evaluate.fid=false -S evaluate.classifier.epochs=3 -S evaluate.classifier.width=16
-S evaluate.guidance_sweep=[0.0,1.0,2.0,4.0] -S evaluate.sweep_samples=200 -S tracking.log_every=25
-S schedule=cosine -S diffusion.prediction=v -S train.loss_weighting=min_snr -S sample.sampler=dpm_solver
-S sample.spacing=time -S sample.steps=10 -S sample.guidance_scale=1.0 -S tracking.experiment=quickstart
""".split()


def _command(recipe: str, *extra: str) -> list[str]:
    base = yaml.safe_load(project_params_text())
    return exp_run_command(recipe_overrides(ROOT / "recipes" / f"{recipe}.yaml", base, list(extra)))


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ddpm", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_quickstart_recipe_gives_exactly_the_earlier_quickstart_overrides():
    words = _command("quickstart")
    assert words[:3] == ["dvc", "exp", "run"]
    assert words[3::2] == ["-S"] * (len(words[3:]) // 2)
    # the quality curve's settings came later: its EMA snapshots and the progress stage cannot change the weights
    # (tests/test_train.py checks the final EMA with snapshots on against them off, bit for bit)
    later = [w for w in words[4::2] if w.startswith(("train.snapshot_every=", "progress."))]
    assert sorted(later) == ["progress.batch_size=200", "progress.num_samples=200", "progress.sampler=dpm_solver",
                             "progress.spacing=time", "progress.steps=10", "train.snapshot_every=150"]
    earlier = [w for w in words[4::2] if w not in later]
    assert sorted(earlier) == sorted(QUICKSTART_0898301[1::2])  # same keys, same value texts, each once


@pytest.mark.parametrize("recipe", ["quickstart", "cifar-cpu"])
def test_recipes_are_valid_configs_naming_each_key_once(recipe):
    """Each key once, so the command line (and `dvc exp show`) says exactly what runs; both recipes use the
    ablations' winner (v-prediction on the cosine schedule with min-SNR weighting)."""
    keys = [w.split("=", 1)[0] for w in _command(recipe)[4::2]]
    assert len(keys) == len(set(keys))
    cfg = Config.from_dict(recipe_params(recipe))
    assert (cfg.schedule, cfg.diffusion.prediction, cfg.train.loss_weighting) == ("cosine", "v", "min_snr")
    assert cfg.data.image_size == 16 and cfg.sample.sampler == "dpm_solver" and cfg.model.num_classes == 10
    if recipe == "quickstart":
        assert cfg.train.steps * cfg.train.batch_size <= 0.6 * 1500 * 64  # issue 13: <= 60 % of the old budget


def _make_dry_run(*args: str) -> str:
    """The commands `make -n` would run (VENV elsewhere: nothing is installed or run)."""
    out = subprocess.run(["make", "-n", "-s", "-C", str(ROOT), "VENV=/nonexistent", *args], capture_output=True,
                         text=True, check=True, timeout=60)
    return out.stdout


@pytest.mark.parametrize("cifar", ["", "../shared/data/cifar10-jpeg-train.tar.gz"])
def test_make_cifar_cpu_runs_the_recipe_with_the_data_source_of_cifar(cifar):
    (line,) = [ln for ln in _make_dry_run("cifar-cpu", f"CIFAR={cifar}").splitlines() if "ddpm recipe" in ln]
    words = shlex.split(line)
    command = words[words.index("recipe") + 1:]
    assert command[0] == "recipes/cifar-cpu.yaml"
    printed = _cli("recipe", *command, "--print")
    assert printed.returncode == 0, printed.stderr
    flags = shlex.split(printed.stdout)[4::2]
    assert len({f.split("=", 1)[0] for f in flags}) == len(flags)  # the data source replaced, not repeated
    params = recipe_params("cifar-cpu", *command[2::2])
    cfg = Config.from_dict(params)
    assert cfg.data.dataset == ("folder" if cifar else "cifar10") and cfg.data.folder == (cifar or None)
    assert ("data.dataset=folder" in flags) == bool(cifar)


def test_make_quickstart_and_make_experiment_run_a_recipe_file():
    assert "python -m ddpm recipe recipes/quickstart.yaml" in _make_dry_run("quickstart")
    assert "python -m ddpm recipe my/recipe.yaml" in _make_dry_run("experiment", "RECIPE=my/recipe.yaml")
    makefile = (ROOT / "Makefile").read_text()
    assert "QUICKSTART_PARAMS" not in makefile and "CIFAR_CPU_PARAMS" not in makefile


def test_a_user_recipe_prints_its_command_and_extra_flags_replace_its_values(tmp_path):
    (tmp_path / "params.yaml").write_text(project_params_text())
    (tmp_path / "mine.yaml").write_text("data:\n  dataset: shapes\ntrain:\n  steps: 50\n  compile: false\n")
    out = _cli("recipe", "mine.yaml", "-S", "train.steps=60", "-S", "schedule=linear,cosine", "--queue", "--print",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == ["dvc", "exp", "run", "--queue", "-S", "data.dataset=shapes",
                                       "-S", "train.steps=60", "-S", "train.compile=false",
                                       "-S", "schedule=linear,cosine"]


@pytest.mark.parametrize(("recipe", "extra", "named"), [
    ("train:\n  stepz: 5\n", [], "train.stepz"),  # a misspelt key
    ("train:\n  steps: -5\n", [], "train.steps"),  # a bad value
    ("train:\n  steps: 5\n", ["-S", "train.stepz=5"], "train.stepz"),  # a misspelt extra flag
    ("train:\n  steps: 5\n", ["-S", "schedule=linear,cosnie"], "schedule"),  # a bad choice of a grid
])
def test_a_bad_recipe_is_a_one_line_error_and_exit_2(tmp_path, recipe, extra, named):
    (tmp_path / "params.yaml").write_text(project_params_text())
    (tmp_path / "bad.yaml").write_text(recipe)
    out = _cli("recipe", "bad.yaml", *extra, "--print", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and named in out.stderr, out.stderr

"""Bad input through the CLI: a short error naming the problem and the fix, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_params
from ddpm.core.checkpoint import load_checkpoint, save_checkpoint
from ddpm.cli import main

NO_TRACKING = {"mlflow": False, "tensorboard": False, "system_metrics": False}


def _write_params(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, f"{f!r} not in {err!r}"
    return err


def _outputs(repo: Path) -> list[Path]:
    return [p for p in repo.rglob("*") if p.is_file() and p.name != "params.yaml"]


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"schedul": "cosine"}, ["schedul", "unknown key"]),
        ({"schedule": "quadratic"}, ["schedule", "'linear' or 'cosine'", "quadratic"]),
        ({"train": {"batch_size": "big"}}, ["train.batch_size", "'big'"]),
        ({"train": {"lr": -1.0}}, ["train.lr", "greater than 0"]),
        ({"data": {"image_size": 17}}, ["data.image_size=17", "not divisible by 2^(levels-1)=2"]),
        ({"model": {"attention_resolutions": [5]}}, ["attention_resolutions [5]", "resolutions are [16, 8]"]),
        ({"diffusion": {"beta_start": 0.1, "beta_end": 0.01}}, ["beta_start", "smaller than"]),
        ({"sample": {"guidance_scale": -1.0}}, ["sample.guidance_scale", "greater than or equal to 0"]),
        ({"train": {"progress_steps": 41}}, ["train.progress_steps=41", "diffusion.timesteps=40"]),
    ],
)
def test_invalid_params_name_the_field_and_exit_2(repo, capsys, change, fragments):
    _write_params(repo, tiny_params(**change))
    _fails(capsys, ["prepare"], *fragments)
    assert _outputs(repo) == []


def test_debug_shows_the_traceback(repo):
    _write_params(repo, tiny_params(schedule="quadratic"))
    with pytest.raises(Exception, match="schedule"):
        main(["--debug", "prepare"])


def test_missing_and_empty_data_folders(repo, capsys, tmp_path):
    _write_params(repo, tiny_params(data={"dataset": "folder", "folder": str(tmp_path / "nope")}))
    _fails(capsys, ["prepare"], str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    _write_params(repo, tiny_params(data={"dataset": "folder", "folder": str(empty)}))
    _fails(capsys, ["prepare"], str(empty))
    assert not (repo / "data").exists()


def test_class_count_mismatch_at_prepare(repo, capsys):
    _write_params(repo, tiny_params(model={"num_classes": 7}))
    _fails(capsys, ["prepare"], "10", "7", "num_classes")
    assert not (repo / "data").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny trained checkpoint shared by the sampling tests."""
    import os

    repo = tmp_path_factory.mktemp("trained")
    _write_params(repo, tiny_params(train={"steps": 2, "sample_every": 0}, tracking=NO_TRACKING))
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        assert main(["prepare"]) == 0
        assert main(["train"]) == 0
    finally:
        os.chdir(cwd)
    return repo


def test_sample_cli_writes_the_requested_grid(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    out = trained / "two.png"
    assert main(["sample", "--classes", "circle,3", "--n", "2", "--guidance", "2", "--steps", "3",
                 "--out", str(out)]) == 0
    from PIL import Image

    w, h = Image.open(out).size
    # 2 rows (classes) x 2 samples of 16 px, 2 px padding = 38 px, enlarged 7x (nearest) to reach 256 px
    assert (w, h) == (7 * (2 + 2 * 18), 7 * (2 + 2 * 18))
    out.unlink()


def test_unknown_class_lists_the_known_ones(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    _fails(capsys, ["sample", "--classes", "dragon", "--out", "x.png"], "dragon", "circle, square")
    _fails(capsys, ["sample", "--classes", "circle", "--guidance", "-1", "--out", "x.png"], "--guidance")
    assert not (trained / "x.png").exists()


def test_checkpoint_of_another_architecture_is_refused(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    ckpt = load_checkpoint(trained / "models/ema.pt")
    ckpt["config"]["model"]["channels"] = 32  # the weights no longer fit the stored architecture
    save_checkpoint(trained / "other.pt", ckpt)
    _fails(capsys, ["sample", "--checkpoint", "other.pt", "--out", "x.png"], "other.pt", "another model config")
    _fails(capsys, ["sample", "--checkpoint", "missing.pt", "--out", "x.png"], "missing.pt", "not found")
    assert not (trained / "x.png").exists()


def test_a_pickled_callable_checkpoint_is_refused(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    torch.save({"format_version": 1, "config": {}, "step": 0, "ema": {}, "hook": print}, trained / "evil.pt")
    _fails(capsys, ["sample", "--checkpoint", "evil.pt", "--out", "x.png"], "evil.pt", "refused")

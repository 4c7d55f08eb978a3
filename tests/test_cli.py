"""Bad input through the CLI: a short error naming the problem and the fix, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_params

from ddpm.cli import main
from ddpm.core.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.xdist_group("cli")  # under `-n`: one worker builds its module fixtures once

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


def test_sampler_errors_name_the_flag_or_param_the_value_came_from(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    _fails(capsys, ["sample", "--steps", "41", "--out", "x.png"],
           "between 1 and the 40 diffusion timesteps, got 41", "fix --steps")
    _fails(capsys, ["sample", "--eta", "-0.5", "--out", "x.png"], "--eta", "greater than or equal to 0")
    _fails(capsys, ["sample", "--sampler", "ddim", "--steps", "0", "--out", "x.png"], "--steps", "got 0")
    _fails(capsys, ["evaluate", "--guidance-sweep", "1,-2"], "--guidance-sweep", "'1,-2'")
    params = yaml.safe_load((trained / "params.yaml").read_text())
    _write_params(trained, {**params, "sample": {**params["sample"], "steps": 41}})
    try:
        _fails(capsys, ["sample", "--out", "x.png"], "got 41", "fix sample.steps")
    finally:
        _write_params(trained, params)
    assert not (trained / "x.png").exists()


# ------------------------------------------------------------- the bad inputs of issue 11, one line, exit 2


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below `root` with its mtime and bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def _one_line(err: str) -> None:
    assert len(err.strip().splitlines()) == 1, err


@pytest.fixture
def pipeline_copy(trained, tmp_path) -> Path:
    """A copy of the trained repo the test may damage, as the cwd; the sample stage already ran there."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(trained, repo)
    cwd = Path.cwd()
    import os

    os.chdir(repo)
    _write_params(repo, tiny_params(train={"steps": 2, "sample_every": 0}, tracking=NO_TRACKING,
                                    evaluate={"guidance_sweep": []}))
    assert main(["sample"]) == 0
    yield repo
    os.chdir(cwd)


@pytest.mark.parametrize("junk", [b"junk", b"\x01\x02\x03\x04", b"\x80\x02}q"], ids=["ascii", "bytes", "pickle-head"])
def test_a_checkpoint_of_four_junk_bytes_exits_2(pipeline_copy, capsys, junk):
    (pipeline_copy / "models/ema.pt").write_bytes(junk)
    before = _snapshot(pipeline_copy)
    err = _fails(capsys, ["sample"], "models/ema.pt", "truncated or corrupt", "retrain")
    _one_line(err)
    assert _snapshot(pipeline_copy) == before


def test_a_pickle_with_a_code_payload_is_refused_for_safety_not_called_corrupt(pipeline_copy, capsys):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    (pipeline_copy / "models/ema.pt").write_bytes(pickle.dumps({"ema": Payload()}))
    before = _snapshot(pipeline_copy)
    err = _fails(capsys, ["sample"], "models/ema.pt", "not plain tensors or data", "refused for safety", "system")
    _one_line(err)
    assert "corrupt" not in err
    assert not (pipeline_copy / "pwned").exists() and _snapshot(pipeline_copy) == before


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"train": {"lr": float("inf")}}, ["train.lr", "finite number", "inf", "correct it in"]),
        ({"train": {"ema_decay": float("nan")}}, ["train.ema_decay", "finite number"]),
        ({"sample": {"guidance_scale": float("inf")}}, ["sample.guidance_scale", "finite number"]),
        ({"evaluate": {"guidance_sweep": [1.0, float("-inf")]}}, ["evaluate.guidance_sweep", "finite number"]),
        ({"sample": {"eta": 1.5}}, ["sample.eta", "less than or equal to 1", "1.5"]),
    ],
)
def test_non_finite_floats_and_eta_above_1_are_refused(pipeline_copy, capsys, change, fragments):
    """`.inf` / `.nan` in YAML, anywhere, and DDIM eta outside [0, 1]: one line, exit 2, nothing written."""
    params = tiny_params(**change)
    text = yaml.safe_dump(params, sort_keys=False)
    assert ".inf" in text or ".nan" in text or "1.5" in text  # what the user wrote: YAML's spelling
    (pipeline_copy / "params.yaml").write_text(text)
    before = _snapshot(pipeline_copy)
    for command in (["train"], ["sample"], ["evaluate"]):
        _one_line(_fails(capsys, command, *fragments))
    assert _snapshot(pipeline_copy) == before


def test_eta_above_1_on_the_command_line_is_refused(pipeline_copy, capsys):
    _one_line(_fails(capsys, ["sample", "--eta", "1.5", "--out", "x.png"], "--eta", "less than or equal to 1", "1.5"))
    assert not (pipeline_copy / "x.png").exists()

"""Checkpoints: round trip, safe loading, damaged files, crash-safe saving, architecture mismatch; the core's
plain errors, and the workflows' UserError naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddpm.config import Config, TrainingConfig
from ddpm.core.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    config_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ddpm.core.ema import EMA
from ddpm.core.restore import load_ema_model, load_ema_unet
from ddpm.core.unet import build_unet
from ddpm.errors import UserError
from ddpm.pipeline.trained_model import load_model


class Opaque:
    """A custom class: unpickling it would need code, so safe loading must refuse it."""


def payload(cfg: Config, seed: int = 0, **extra) -> dict:
    torch.manual_seed(seed)
    model = build_unet(cfg)
    ema = EMA(model, decay=cfg.train.ema_decay)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # random, so a load that silently kept the init would be caught
    ema.update(model)  # warm-up decay 0.1: the EMA differs from both the init and the raw weights
    return {"format_version": FORMAT_VERSION, "config": cfg.training_dict(), "step": 7, "model": model.state_dict(),
            "ema": ema.state_dict(), **extra}


def assert_same(a, b) -> None:
    """Recursive equality of nested dicts / lists with exact tensor comparison."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def test_round_trip(tmp_path: Path, tiny_cfg: Config):
    extra = {"optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
             "rng": [torch.get_rng_state(), (1, 2, 3)], "mlflow_run_id": "abc", "data_position": 12}
    original = payload(tiny_cfg, **extra)
    path = tmp_path / "sub" / "last.pt"
    save_checkpoint(path, original)
    loaded = load_checkpoint(path)
    assert_same(loaded, original)
    assert config_from_checkpoint(loaded) == tiny_cfg.training()
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary files left behind


def test_same_payload_gives_identical_bytes(tmp_path: Path, tiny_cfg: Config):
    # DVC hashes outputs: the random temporary file name must not leak into the file
    data = payload(tiny_cfg)
    save_checkpoint(tmp_path / "a.pt", data)
    save_checkpoint(tmp_path / "b.pt", data)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_load_ema_unet_restores_ema_weights(tmp_path: Path, tiny_cfg: Config):
    data = payload(tiny_cfg)
    save_checkpoint(tmp_path / "ema.pt", data)
    cfg, model = load_ema_unet(tmp_path / "ema.pt")
    assert cfg == tiny_cfg.training()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, data["ema"]["weights"][name])
        assert not torch.equal(tensor, data["model"][name])  # the EMA weights, not the raw ones


def test_load_ema_model_builds_the_diffusion(tmp_path: Path, tiny_cfg: Config):
    save_checkpoint(tmp_path / "ema.pt", payload(tiny_cfg))
    cfg, model, diffusion = load_ema_model(tmp_path / "ema.pt", "cpu")
    assert diffusion.num_timesteps == cfg.diffusion.timesteps
    x = torch.zeros(1, 3, 16, 16)
    assert model(x, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)).shape == x.shape


@pytest.mark.parametrize("bad", [print, Opaque()], ids=["function", "custom-object"])
def test_file_needing_code_is_refused(tmp_path: Path, tiny_cfg: Config, bad):
    path = tmp_path / "evil.pt"
    torch.save({**payload(tiny_cfg), "extra": bad}, path)  # plain torch.save: bypasses our checks
    with pytest.raises(CheckpointError, match="holds objects that are not plain tensors or data") as err:
        load_checkpoint(path)
    assert err.value.problem == "unsafe"
    name = "builtins.print" if bad is print else f"{__name__}.Opaque"
    assert str(path) in str(err.value) and "refused for safety" in str(err.value) and name in str(err.value)
    assert "corrupt" not in str(err.value)  # not a disk problem: the user must not go hunting for one


@pytest.mark.parametrize("legacy", [False, True], ids=["plain-pickle", "legacy-torch-format"])
def test_a_pickle_that_is_not_a_torch_zip_is_refused_naming_the_code_it_needs(tmp_path: Path, legacy: bool):
    """torch's own list of refused globals reads torch.save's zip files only; other pickles are named too."""
    import pickle

    path = tmp_path / "other.pt"
    if legacy:
        torch.save({"extra": Opaque()}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({"ema": Opaque()}))
    with pytest.raises(CheckpointError, match="refused for safety") as err:
        load_checkpoint(path)
    assert f"{__name__}.Opaque" in str(err.value) and err.value.problem == "unsafe"


def test_save_refuses_entries_that_could_not_be_loaded_back(tmp_path: Path, tiny_cfg: Config):
    import numpy as np

    with pytest.raises(TypeError, match=r"payload\['rng'\]\[0\]"):
        save_checkpoint(tmp_path / "x.pt", payload(tiny_cfg, rng=[np.zeros(3)]))
    with pytest.raises(TypeError, match=r"payload\['loss'\].*numpy"):  # a float subclass pickles as numpy
        save_checkpoint(tmp_path / "x.pt", payload(tiny_cfg, loss=np.float64(0.5)))
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(tmp_path / "x.pt", {"step": 1})
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "junk4", "bytes4", "pickle-head"])
def test_damaged_file_is_a_user_error_naming_it(tmp_path: Path, tiny_cfg: Config, damage: str):
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload(tiny_cfg))
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00junk" * 100,
                      "junk4": b"junk", "bytes4": b"\x01\x02\x03\x04", "pickle-head": b"\x80\x02}q"}[damage])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and err.value.problem == "corrupt"


def test_missing_file_and_foreign_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ddpm checkpoint") as err:
        load_checkpoint(tmp_path / "other.pt")
    assert err.value.problem == "foreign"
    torch.save({"format_version": 99, "config": {}, "step": 0, "ema": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format_version 99") as err:
        load_checkpoint(tmp_path / "future.pt")
    assert err.value.problem == "version"


def test_crash_during_save_keeps_previous_file(tmp_path: Path, tiny_cfg: Config, monkeypatch):
    path = tmp_path / "last.pt"
    first = payload(tiny_cfg, seed=1)
    save_checkpoint(path, first)
    real_save = torch.save

    def half_write_then_crash(obj, f, *args, **kwargs):
        partial = b"PK\x03\x04partial"  # the start of a zip, as torch.save would begin
        f.write(partial) if hasattr(f, "write") else Path(f).write_bytes(partial)
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(torch, "save", half_write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, payload(tiny_cfg, seed=2))
    monkeypatch.setattr(torch, "save", real_save)
    assert_same(load_checkpoint(path), first)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_architecture_mismatch_is_a_checkpoint_error(tmp_path: Path, tiny_cfg: Config):
    wider = Config.from_dict({**tiny_cfg.to_dict(), "model": {**tiny_cfg.to_dict()["model"], "channels": 32}})
    data = payload(wider)
    data["config"] = tiny_cfg.training_dict()  # weights of a 32-channel net under a 16-channel config
    save_checkpoint(tmp_path / "ema.pt", data)
    with pytest.raises(CheckpointError, match="another model config") as err:
        load_ema_unet(tmp_path / "ema.pt")
    assert str(tmp_path / "ema.pt") in str(err.value) and err.value.problem == "mismatch"


def _damaged(path: Path, tiny_cfg: Config, kind: str) -> Path:
    """A checkpoint file with the given problem (or none: "missing")."""
    if kind == "corrupt":
        save_checkpoint(path, payload(tiny_cfg))
        path.write_bytes(path.read_bytes()[:100])
    elif kind == "unsafe":
        torch.save({**payload(tiny_cfg), "extra": Opaque()}, path)
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    elif kind == "version":
        torch.save({**payload(tiny_cfg), "format_version": 99}, path)
    elif kind == "mismatch":
        data = payload(tiny_cfg)
        data["config"]["model"]["channels"] = 32
        save_checkpoint(path, data)
    return path


@pytest.mark.parametrize(("kind", "fix"), [
    ("missing", "run the train stage first"), ("corrupt", "delete it and retrain"),
    ("unsafe", "delete it and retrain"), ("foreign", "pass a file written by train"),
    ("version", "use the code version that wrote it"), ("mismatch", "retrain it with the current code"),
])
def test_the_workflow_reports_an_unusable_checkpoint_as_a_user_error_with_the_fix(tmp_path, tiny_cfg, kind, fix):
    """The core states the facts (a plain error); the sample/evaluate workflows add what to do about them."""
    path = _damaged(tmp_path / "ema.pt", tiny_cfg, kind)
    with pytest.raises(UserError) as err:
        load_model(path, tiny_cfg)
    message = str(err.value)
    assert str(path) in message and fix in message and "\n" not in message


def test_a_checkpoint_carries_the_training_sections_only(tmp_path: Path, tiny_cfg: Config):
    """What train stores is a TrainingConfig: no sample/evaluate/tracking sections filled with defaults."""
    data = payload(tiny_cfg)
    assert list(data["config"]) == ["seed", "schedule", "data", "model", "diffusion", "train"]
    cfg = config_from_checkpoint(data)
    assert type(cfg) is TrainingConfig and not hasattr(cfg, "sample")
    data["config"] = tiny_cfg.to_dict()  # a full params file is not a training config
    with pytest.raises(UserError, match=r"sample: unknown key"):
        config_from_checkpoint(data)


def test_stored_config_is_revalidated(tmp_path: Path, tiny_cfg: Config):
    data = payload(tiny_cfg)
    data["config"]["model"]["channels"] = 3  # fails validation (below the minimum)
    save_checkpoint(tmp_path / "ema.pt", data)
    with pytest.raises(UserError, match="model.channels"):  # a ConfigError: it names the config key
        load_ema_unet(tmp_path / "ema.pt")

"""One source of defaults: params.yaml and `Config()` agree key for key and value for value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import project_params_text

from ddpm.config import LAUNCH_KEYS, TRAINING_SECTIONS, Config, ConfigError, TrainingConfig, flatten, load_config
from ddpm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _params_yaml() -> dict:
    return yaml.safe_load(project_params_text())


def test_every_config_field_is_in_params_yaml_and_vice_versa():
    in_yaml, in_config = set(flatten(_params_yaml())), set(flatten(Config().to_dict()))
    assert sorted(in_config - in_yaml) == [], "Config fields missing from params.yaml (add them, with a comment)"
    assert sorted(in_yaml - in_config) == [], "params.yaml keys that Config does not know"


def test_params_yaml_values_are_the_config_defaults(project_params):
    defaults = flatten(Config().to_dict())
    different = {k: (v, defaults[k]) for k, v in flatten(_params_yaml()).items() if v != defaults.get(k)}
    assert different == {}, "params.yaml value vs Config() default"
    assert load_config(project_params) == Config()


def test_training_config_is_exactly_the_training_sections():
    assert tuple(TrainingConfig.model_fields) == TRAINING_SECTIONS
    cfg = Config.from_dict({"seed": 3, "train": {"lr": 1e-3}, "sample": {"steps": 7}})
    training = cfg.training()
    assert type(training) is TrainingConfig and training.seed == 3 and training.train.lr == 1e-3
    expected = {k: v for k, v in cfg.to_dict().items() if k in TRAINING_SECTIONS}
    expected["train"] = {k: v for k, v in expected["train"].items() if k not in LAUNCH_KEYS}
    assert cfg.training_dict() == expected
    assert TrainingConfig.from_dict(cfg.training_dict()) == training


def test_launch_settings_stay_out_of_checkpoints_and_need_an_endpoint_for_several_nodes():
    """How many processes train is not what they train: a checkpoint (models/ema.pt) and the params part of the
    resume key do not hold it (the real world size joins the key: ddpm.pipeline.resume.params_key), so the
    quickstart's files stay as they were. Catches a launch key leaking into training_dict, and a multi-node
    config without a rendezvous address passing until the nodes wait for each other."""
    launched = Config.from_dict({"train": {"nproc_per_node": 8, "nnodes": 2, "rdzv_endpoint": "10.0.0.1:29500",
                                           "rdzv_id": "job"}})
    assert launched.training_dict() == Config().training_dict()
    with pytest.raises(UserError, match="train.nnodes=2 needs train.rdzv_endpoint"):
        Config.from_dict({"train": {"nnodes": 2}})
    with pytest.raises(UserError, match="nproc_per_node"):
        Config.from_dict({"train": {"nproc_per_node": 0}})


def test_training_config_applies_the_cross_section_checks():
    with pytest.raises(ConfigError, match=r"data.image_size=20 is not divisible by 2\^\(levels-1\)=8"):
        TrainingConfig.from_dict({"data": {"image_size": 20}})
    with pytest.raises(ConfigError, match="train.progress_steps=60 exceeds diffusion.timesteps=50"):
        TrainingConfig.from_dict({"diffusion": {"timesteps": 50}, "train": {"progress_steps": 60}})

"""One source of defaults: params.yaml and `Config()` agree key for key and value for value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import project_params_text

from ddpm.config import TRAINING_SECTIONS, Config, ConfigError, TrainingConfig, flatten, load_config

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
    assert cfg.training_dict() == {k: v for k, v in cfg.to_dict().items() if k in TRAINING_SECTIONS}
    assert TrainingConfig.from_dict(cfg.training_dict()) == training


def test_training_config_applies_the_cross_section_checks():
    with pytest.raises(ConfigError, match=r"data.image_size=20 is not divisible by 2\^\(levels-1\)=8"):
        TrainingConfig.from_dict({"data": {"image_size": 20}})
    with pytest.raises(ConfigError, match="train.progress_steps=60 exceeds diffusion.timesteps=50"):
        TrainingConfig.from_dict({"diffusion": {"timesteps": 50}, "train": {"progress_steps": 60}})

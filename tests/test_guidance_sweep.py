"""The guidance sweep over intervals as well as scales (`evaluate.guidance_interval_sweep`), on a tiny pipeline."""

from __future__ import annotations

import csv

import pytest
from conftest import tiny_params

from ddpm.config import Config, ConfigError
from ddpm.pipeline.evaluate import evaluate_stage
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.sample import sample_stage
from ddpm.pipeline.train import train

NO_TRACKING = {"mlflow": False, "tensorboard": False, "system_metrics": False}
METRICS = ["class_accuracy", "fd_classifier", "precision", "recall", "pixel_mean_rel_error", "pixel_std_rel_error"]


def test_the_sweep_crosses_scales_with_intervals_and_an_empty_interval_is_the_unguided_row(tmp_path, data_stages):
    params = tiny_params(train={**tiny_params()["train"], "steps": 2, "sample_every": 0}, tracking=NO_TRACKING,
                         evaluate={**tiny_params()["evaluate"], "guidance_sweep": [0.0, 2.0],
                                   "guidance_interval_sweep": [None, [0.0, 0.0]]})
    cfg = Config.from_dict(params)
    paths = Layout.under(tmp_path)
    data_stages(tmp_path, cfg)
    train(cfg, paths)
    sample_stage(cfg, paths)
    evaluate_stage(cfg, paths)
    with open(paths.sweep) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0])[:4] == ["guidance_scale", "guidance_interval_lo", "guidance_interval_hi", "samples"]
    key = lambda r: (float(r["guidance_scale"]), r["guidance_interval_lo"], r["guidance_interval_hi"])  # noqa: E731
    by = {key(r): r for r in rows}
    assert set(by) == {(0.0, "", ""), (0.0, "0", "0"), (2.0, "", ""), (2.0, "0", "0")}  # empty cells: everywhere
    # scale 2 on an empty interval guides nowhere: the same samples, so the same metrics, as scale 0
    assert [by[(2.0, "0", "0")][m] for m in METRICS] == [by[(0.0, "", "")][m] for m in METRICS]
    assert [by[(2.0, "", "")][m] for m in METRICS] != [by[(0.0, "", "")][m] for m in METRICS]


def test_interval_sweep_entries_are_validated():
    with pytest.raises(ConfigError, match="0 <= lo <= hi"):
        Config.from_dict(tiny_params(evaluate={**tiny_params()["evaluate"], "guidance_interval_sweep": [[2.0, 1.0]]}))
    with pytest.raises(ConfigError, match="0 <= lo <= hi"):
        Config.from_dict(tiny_params(sample={**tiny_params()["sample"], "guidance_interval": [-1.0, 1.0]}))

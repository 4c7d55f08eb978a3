"""The EMA network as an MLflow pyfunc model: `mlflow.pyfunc.load_model(uri).predict(...)` draws images.

What is stored is data, never pickled code: the model's only artifact is the training's `models/ema.pt`
(EMA weights + the validated training config + class names, read back with `torch.load(weights_only=True)`),
and the code is this package itself, copied into the model (`code_paths`) and instantiated through
MLflow's models-from-code entry file `pyfunc_entry.py`.

`predict` takes one row per image: a `class` column of class names or indices (as text), plus params
`guidance_scale`, `steps`, `seed`, `sampler`, `eta`, `batch_size`, `precision` and `device`. It returns
uint8 images (N, H, W, 3) equal to those `python -m ddpm sample` draws with the same settings: the same
labels in the same order, the same seed and batch size give the same images (`ddpm.core.generate`). The
params' defaults are the sampling params in force when the model was logged.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from ddpm.config import Config
from ddpm.core.checkpoint import load_checkpoint
from ddpm.core.generate import SamplerSettings, generate
from ddpm.core.restore import load_ema_model
from ddpm.core.runtime import resolve_device

CLASS_COLUMN = "class"
CHECKPOINT_ARTIFACT = "checkpoint"
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
# what importing ddpm.core needs (distribution names), pinned to the versions installed here; given
# explicitly so MLflow never infers requirements (that would load the model and may reach the network)
_REQUIREMENTS = ("torch", "torchvision", "numpy", "pandas", "pydantic", "PyYAML", "pillow")


class EmaSampler(mlflow.pyfunc.PythonModel):
    """Class-conditional sampling from the logged EMA checkpoint (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        """Rebuild the network and its diffusion from the checkpoint artifact alone (weights_only)."""
        path = context.artifacts[CHECKPOINT_ARTIFACT]
        ckpt = load_checkpoint(path)
        self.config, self.model, self.diffusion = load_ema_model(path, "cpu", ckpt=ckpt)
        classes = self.config.model.num_classes
        self.class_names = list(ckpt.get("class_names") or [str(i) for i in range(classes)])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """One image per input row: uint8 (N, H, W, 3)."""
        p = dict(params or {})
        device = resolve_device(str(p.get("device", "auto")))
        model = self.model.to(device)
        diffusion = self.diffusion.to(device)
        rows = _column(model_input)
        labels = self._labels(rows) if self.config.model.num_classes else None
        settings = SamplerSettings(sampler=str(p.get("sampler", "ddim")), steps=int(p.get("steps", 100)),
                                   eta=float(p.get("eta", 0.0)), guidance_scale=float(p.get("guidance_scale", 1.0)))
        images, _ = generate(model, diffusion, labels, settings, num=len(rows), device=device,
                             seed=int(p.get("seed", 0)), batch_size=int(p.get("batch_size", 500)),
                             precision=str(p.get("precision", "fp32")))  # (N, C, H, W) uint8
        return images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)

    def _labels(self, rows: list[Any]) -> torch.Tensor:
        """Class names or indices -> an int64 tensor; anything else is a ValueError listing the classes."""
        out = []
        for item in rows:
            text = str(item).strip()
            if text in self.class_names:
                out.append(self.class_names.index(text))
            elif text.isdigit() and int(text) < len(self.class_names):
                out.append(int(text))
            else:
                raise ValueError(f"unknown class {item!r}; the model knows {', '.join(self.class_names)} "
                                 f"(or 0-{len(self.class_names) - 1})")
        return torch.tensor(out, dtype=torch.int64)  # (N,)


def _column(model_input: Any) -> list[Any]:
    """The `class` column of a DataFrame (or the values of a plain list/array/Series)."""
    if isinstance(model_input, pd.DataFrame):
        if CLASS_COLUMN not in model_input.columns:
            raise ValueError(f"the input needs a {CLASS_COLUMN!r} column (one class per image), "
                             f"got columns {list(model_input.columns)}")
        return model_input[CLASS_COLUMN].tolist()
    return list(np.asarray(model_input).reshape(-1))


def signature(cfg: Config) -> Any:
    """Input: a `class` text column; output: uint8 (N, H, W, 3) images; params with the logging defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    sc, size = cfg.sample, cfg.data.image_size
    params = ParamSchema([
        ParamSpec("guidance_scale", "double", float(sc.guidance_scale)),
        ParamSpec("steps", "long", int(sc.steps)),
        ParamSpec("seed", "long", int(cfg.seed)),
        ParamSpec("sampler", "string", sc.sampler),
        ParamSpec("eta", "double", float(sc.eta)),
        ParamSpec("batch_size", "long", int(sc.batch_size)),
        ParamSpec("precision", "string", cfg.train.precision),
        ParamSpec("device", "string", "auto"),
    ])
    return ModelSignature(
        inputs=Schema([ColSpec("string", CLASS_COLUMN)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))]),
        params=params,
    )


def pip_requirements() -> list[str]:
    """The packages the model's code imports, pinned to the installed versions (mlflow is added by MLflow)."""
    return [f"{name}=={metadata.version(name)}" for name in _REQUIREMENTS]


@contextlib.contextmanager
def _fluent_target(uri: str, experiment_id: str) -> Iterator[None]:
    """Point MLflow's fluent API (which `log_model` uses) at our store and experiment, then restore.

    Environment variables, not `mlflow.set_tracking_uri`: that one leaves the variable changed behind.
    """
    keys = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": experiment_id}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_ema_model(uri: str, run_id: str, experiment_id: str, checkpoint: Path, cfg: Config, step: int,
                  registered_name: str | None = None) -> Any:
    """Log `checkpoint` as the run's pyfunc model `ema` (registered as `registered_name` when given)."""
    from mlflow.models import Model

    import ddpm

    with _fluent_target(uri, experiment_id), warnings.catch_warnings():
        # no input example on purpose: MLflow would validate it by sampling with the full network
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        # `Model.log` is what `mlflow.pyfunc.log_model` calls; unlike it, it takes the run to log into
        return Model.log(
            artifact_path=None,
            flavor=mlflow.pyfunc,
            name="ema",
            python_model=str(ENTRY_FILE),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            code_paths=[str(Path(ddpm.__file__).parent)],
            signature=signature(cfg),
            pip_requirements=pip_requirements(),
            registered_model_name=registered_name,
            run_id=run_id,
            step=step,
        )

"""The training data as an MLflow dataset (the runs table's *Dataset* column): name, content hash as
digest, where it came from, and its size in the profile."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.config import Config

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def dataset_entity(cfg: Config, prepared_dir: Path, content_hash: str, num_train: int, num_eval: int,
                   class_names: list[str]) -> Any:
    """An `mlflow.entities.Dataset` for `log_inputs`: digest = the prepared data's content hash.

    Source: CIFAR-10's download URL, the image folder, or (generated `shapes`) the prepared file.
    """
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset
    from mlflow.types import Schema, TensorSpec

    data = cfg.data
    if data.dataset == "cifar10":
        source = HTTPDatasetSource(CIFAR10_URL)
    else:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        where = Path(data.folder) if data.dataset == "folder" and data.folder else Path(prepared_dir) / "dataset.npz"
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(where.resolve().as_uri())
    size = data.image_size
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, size, size), "images"),
                     TensorSpec(np.dtype(np.int64), (-1,), "labels")])
    meta = MetaDataset(source, name=f"{data.dataset}-{size}px", digest=content_hash[:36], schema=schema)
    profile = {"num_images": num_train, "num_eval_images": num_eval, "num_classes": len(class_names),
               "class_names": class_names, "image_size": size, "content_hash": content_hash}
    entity = meta._to_mlflow_entity()
    return Dataset(name=entity.name, digest=entity.digest, source_type=entity.source_type, source=entity.source,
                   schema=entity.schema, profile=json.dumps(profile))

"""Which code trained a model: a fingerprint of the source that can change the trained weights, and git state.

The fingerprint hashes the bytes of the `ddpm` files below (sorted, named relative to the package's parent
folder, so `ddpm/core/unet.py`): file contents, not git, so it means the same inside a repository, in a
DVC experiment's temporary copy and in an installed package. It is part of the resume key
(`ddpm.pipeline.resume.resume_key`): a checkpoint written by other training code is never resumed.

The boundary (tests/test_fingerprint.py fails when training imports a `ddpm` module in neither list):

- fingerprinted, because it can change the weights: the config (defaults, validation), `core` (network,
  diffusion, losses, EMA, samplers, RNG handling, checkpoints), `data`'s batching and prepared-file reader
  (what the batches hold; the prepared data itself is in the key by its content hash, so the prepare
  stage's decoding code is not) and the training workflow (`pipeline/train.py`, `train_state.py`,
  `resume.py`, which restores the state a run continues from, and `devices.py`, which picks the device and
  precision);
- `EXCLUDED`: modules the training imports that only report or locate things; none of them touches a
  tensor the optimiser sees, draws a random number or decides a value training uses.

A file in the fingerprint that training does not actually run only costs a retraining when it changes;
a file training runs that is missing from it would let other code's checkpoint be resumed, which the test
prevents.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import ddpm
from ddpm.tracking.lineage import git_tags

PACKAGE = Path(ddpm.__file__).resolve().parent
# MLflow tags: the training run's code (train sets them; sample/evaluate re-opening the run leave them alone)
TRAIN_CODE_TAG, TRAIN_COMMIT_TAG, TRAIN_DIRTY_TAG = ("ddpm.train.code_fingerprint", "ddpm.train.git_commit",
                                                     "ddpm.train.git_dirty")
# ... and the sample stage's record of the checkpoint it sampled: the running code's fingerprint, and whether
# the checkpoint's recorded one differs ("true" also when the checkpoint records none)
SAMPLE_CODE_TAG, SAMPLE_CODE_DIFFERS_TAG = "ddpm.sample.code_fingerprint", "ddpm.sample.train_code_differs"
FINGERPRINTED_FOLDERS = ("core",)  # every .py file in it, but for NOT_TRAINING
# files in those folders that training never imports (if it ever does, tests/test_fingerprint.py fails)
NOT_TRAINING = {
    "core/interruptible.py": "runs FID's linear algebra in a worker thread, so evaluation stays stoppable",
}
FINGERPRINTED_FILES = (
    "config.py", "data/__init__.py", "data/batches.py", "data/prepared.py",
    "pipeline/train.py", "pipeline/train_state.py", "pipeline/resume.py", "pipeline/devices.py",
    "pipeline/snapshots.py",  # which EMA snapshots a run keeps: a finished run's stored set is reused as it is
)

# ddpm modules the training imports that cannot change the weights, with the reason
EXCLUDED = {
    "ddpm": "the package docstring and version",
    "ddpm.pipeline": "the package docstring",
    "ddpm.cli": "finds params.yaml and turns errors into exit codes; the config it loads is in the key itself",
    "ddpm.errors": "exception classes and their messages",
    "ddpm.pipeline.entry": "runs the stage: finds params.yaml, turns errors and signals into exit codes",
    "ddpm.pipeline.fingerprint": "computes this fingerprint and reads git state",
    "ddpm.pipeline.launch": "starts the workers; the world size they train with is in the resume key itself",
    "ddpm.pipeline.layout": "file paths; the prepared data is keyed by its content hash",
    "ddpm.pipeline.progression": "composes the progression figure from grids already sampled",
    "ddpm.tracking": "MLflow/TensorBoard logging, metric names, run-id files, resource readings (package)",
    "ddpm.tracking.files": "writes the DVC metrics/plots files and run-id files",
    "ddpm.tracking.inputs": "the MLflow dataset entry",
    "ddpm.tracking.lineage": "git and DVC tags, run names",
    "ddpm.tracking.mlflow_model": "logs the finished EMA checkpoint as an MLflow model",
    "ddpm.tracking.names": "metric names",
    "ddpm.tracking.resources": "CPU/GPU memory and utilisation readings",
    "ddpm.tracking.store": "where the MLflow store and .resume/ live",
    "ddpm.tracking.tracker": "sends metrics, images and the model to MLflow and TensorBoard",
    "ddpm.tracking.opening": "finds, creates or re-opens the MLflow run",
    "ddpm.tracking.signals": "turns SIGINT/SIGTERM into an exception (training checkpoints and stops)",
    "ddpm.tracking.tensorboard": "the TensorBoard writer and its folder",
}


def fingerprinted_files(package: Path = PACKAGE) -> list[Path]:
    """The source files the fingerprint covers, sorted by their path relative to the package's parent."""
    files = {package / name for name in FINGERPRINTED_FILES}
    for folder in FINGERPRINTED_FOLDERS:
        files |= set((package / folder).glob("*.py"))
    files -= {package / name for name in NOT_TRAINING}
    return sorted(files, key=lambda p: p.relative_to(package.parent).as_posix())


def training_fingerprint(package: Path = PACKAGE) -> str:
    """16 hex digits of a SHA-256 over each fingerprinted file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in fingerprinted_files(package):
        name = path.relative_to(package.parent).as_posix().encode()
        data = path.read_bytes()
        digest.update(b"%d:%s\0%d:" % (len(name), name, len(data)) + data)  # lengths: no two sets hash alike
    return digest.hexdigest()[:16]


def code_identity(repo_root: Path, fingerprint: str | None = None) -> dict[str, str | bool]:
    """The training code's fingerprint plus the git commit of `repo_root` and whether its tree is dirty
    ("" and False outside git)."""
    tags = git_tags(repo_root)
    return {
        "fingerprint": fingerprint or training_fingerprint(),
        "git_commit": tags.get("mlflow.source.git.commit", ""),
        "git_dirty": tags.get("git.dirty") == "true",
    }

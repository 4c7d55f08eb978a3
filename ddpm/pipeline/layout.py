"""Where every stage reads and writes below the repository root: the file layout `dvc.yaml` declares.

One object for all stages, so a path is spelled once (tests check it against dvc.yaml's outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Absolute paths of the pipeline's files under `root` (the directory holding params.yaml)."""

    root: Path

    @classmethod
    def under(cls, root: Path | str) -> Layout:
        return cls(Path(root).resolve())

    # prepare
    @property
    def prepared(self) -> Path:
        return self.root / "data/prepared"

    # classifier, fid_stats
    @property
    def classifier(self) -> Path:
        return self.root / "models/classifier.pt"

    @property
    def classifier_metrics(self) -> Path:
        return self.root / "metrics/classifier.json"

    @property
    def fid_stats(self) -> Path:
        return self.root / "models/fid_stats.npz"

    # train
    @property
    def ema(self) -> Path:
        return self.root / "models/ema.pt"

    @property
    def train_run(self) -> Path:
        """The training's MLflow run id."""
        return self.root / "models/run.json"

    @property
    def train_metrics(self) -> Path:
        return self.root / "metrics/train.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "plots/train_loss.tsv"

    @property
    def progress(self) -> Path:
        return self.root / "samples/progress"

    @property
    def progression(self) -> Path:
        """The progress grids composed into one labelled figure (a column per checkpoint, a row per class)."""
        return self.root / "samples/progression.png"

    @property
    def snapshots(self) -> Path:
        """EMA snapshots at the progress points (`ddpm.pipeline.snapshots`), scored by the progress stage."""
        return self.root / "models/snapshots"

    # progress
    @property
    def progress_plot(self) -> Path:
        """The quality curve: one row of metrics per snapshot."""
        return self.root / "plots/progress.tsv"

    @property
    def progress_curve(self) -> Path:
        """The quality curve drawn, beside samples/progression.png."""
        return self.root / "samples/progress_curve.png"

    # sample
    @property
    def grid(self) -> Path:
        return self.root / "samples/grid.png"

    @property
    def denoise(self) -> Path:
        return self.root / "samples/denoise.png"

    @property
    def samples(self) -> Path:
        return self.root / "samples/samples.npz"

    @property
    def sample_run(self) -> Path:
        """The MLflow run the sample stage logged into (evaluate logs there too)."""
        return self.root / "samples/run.json"

    # evaluate
    @property
    def eval_metrics(self) -> Path:
        return self.root / "metrics/eval.json"

    @property
    def sweep(self) -> Path:
        return self.root / "plots/guidance_sweep.tsv"

"""DVC stage `progress`: models/snapshots/ + classifier (+ FID statistics) -> plots/progress.tsv,
samples/progress_curve.png."""

from ddpm.pipeline.curve import progress_stage
from ddpm.pipeline.entry import run_stage
from ddpm.pipeline.layout import Layout

if __name__ == "__main__":
    run_stage(lambda cfg, root: progress_stage(cfg, Layout.under(root)))

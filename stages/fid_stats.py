"""DVC stage `fid_stats`: data/prepared/ -> models/fid_stats.npz (Inception statistics of the training set)."""

from ddpm.pipeline.entry import run_stage
from ddpm.pipeline.fid_stats import fid_stats_stage
from ddpm.pipeline.layout import Layout

if __name__ == "__main__":
    run_stage(lambda cfg, root: fid_stats_stage(cfg, Layout.under(root)))

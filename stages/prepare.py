"""DVC stage `prepare`: params -> data/prepared/ (dataset.npz + meta.json)."""

from ddpm.data.datasets import prepare
from ddpm.pipeline.entry import run_stage
from ddpm.pipeline.layout import Layout

if __name__ == "__main__":
    run_stage(lambda cfg, root: prepare(cfg, Layout.under(root).prepared))

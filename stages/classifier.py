"""DVC stage `classifier`: data/prepared/ -> models/classifier.pt, metrics/classifier.json."""

from ddpm.pipeline.classifier import classifier_stage
from ddpm.pipeline.entry import run_stage
from ddpm.pipeline.layout import Layout

if __name__ == "__main__":
    run_stage(lambda cfg, root: classifier_stage(cfg, Layout.under(root)))

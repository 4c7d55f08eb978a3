"""DVC stage `train`: data/prepared/ -> models/ema.pt, models/run.json, metrics/train.json,
plots/train_loss.tsv, samples/progress/. Also the torchrun entry point for multi-GPU training."""

from ddpm.pipeline.entry import run_stage
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.train import train

if __name__ == "__main__":
    run_stage(lambda cfg, root: train(cfg, Layout.under(root)))

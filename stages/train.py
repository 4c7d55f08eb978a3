"""DVC stage `train`: data/prepared/ -> models/ema.pt, models/run.json, metrics/train.json,
plots/train_loss.tsv, samples/progress/. With `train.nproc_per_node`/`train.nnodes` above 1 it starts its own
workers (ddpm.pipeline.launch); it is also a `torchrun` entry point (then it trains as the rank torchrun set)."""

from ddpm.pipeline.entry import run_stage
from ddpm.pipeline.launch import train_stage

if __name__ == "__main__":
    run_stage(train_stage)

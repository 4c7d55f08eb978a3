"""DVC stage `sample`: models/ema.pt -> samples/grid.png, samples/denoise.png, samples/samples.npz,
samples/run.json."""

from ddpm.pipeline.entry import run_stage
from ddpm.pipeline.layout import Layout
from ddpm.pipeline.sample import sample_stage

if __name__ == "__main__":
    run_stage(lambda cfg, root: sample_stage(cfg, Layout.under(root)))

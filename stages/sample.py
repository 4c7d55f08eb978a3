"""DVC stage `sample`: models/ema.pt -> samples/grid.png, samples/denoise.png, samples/samples.npz."""

from ddpm.cli import run_stage
from ddpm.sample import SamplePaths, sample_stage

if __name__ == "__main__":
    run_stage(lambda cfg, root: sample_stage(cfg, SamplePaths.under(root)))

"""DVC stage `evaluate`: samples + classifier (+ FID statistics) -> metrics/eval.json, plots/guidance_sweep.tsv."""

from ddpm.pipeline.entry import run_stage
from ddpm.pipeline.evaluate import evaluate_stage
from ddpm.pipeline.layout import Layout

if __name__ == "__main__":
    run_stage(lambda cfg, root: evaluate_stage(cfg, Layout.under(root)))

"""Batched generation: the same seed, labels and batch size give the same images."""

from __future__ import annotations

import torch

from ddpm.config import Config
from ddpm.core.diffusion import GaussianDiffusion
from ddpm.core.generate import SamplerSettings, generate
from ddpm.core.unet import build_unet


def _model(cfg: Config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_unet(cfg)
    with torch.no_grad():  # zero-initialised blocks ignore the label: perturb every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_same_seed_labels_and_batch_size_give_the_same_images(tiny_cfg: Config):
    model, diffusion = _model(tiny_cfg), GaussianDiffusion.from_config(tiny_cfg)
    settings = SamplerSettings(sampler="ddpm", steps=3, eta=0.0, guidance_scale=1.5)
    labels = torch.tensor([3, 1, 4, 1, 5])

    def run(seed: int, labels: torch.Tensor, batch_size: int, record=()):
        return generate(model, diffusion, labels, settings, device=torch.device("cpu"), seed=seed,
                        batch_size=batch_size, record=record)

    kept_last = diffusion.num_timesteps - 1  # every respaced run visits T-1
    a, frames_a = run(7, labels, 2, record=[kept_last])
    b, frames_b = run(7, labels, 2, record=[kept_last])
    assert a.dtype == torch.uint8 and a.shape == (5, 3, 16, 16)
    assert torch.equal(a, b) and torch.equal(frames_a[kept_last], frames_b[kept_last])
    assert not torch.equal(a, run(8, labels, 2)[0])  # another seed: other noise
    assert not torch.equal(a, run(7, labels.flip(0), 2)[0])  # other labels
    # the noise stream is consumed batch after batch: another batch size gives other images
    assert not torch.equal(a, run(7, labels, 5)[0])

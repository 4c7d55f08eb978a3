"""Batched generation: the same seed, labels and batch size give the same images."""

from __future__ import annotations

import pytest
import torch
from gaussian_data import MU, gaussian_diffusion, optimal_model
from torch.overrides import TorchFunctionMode

from ddpm.config import Config
from ddpm.core.diffusion import GaussianDiffusion
from ddpm.core.generate import SamplerSettings, generate, network_evaluations
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


class GaussianNet(torch.nn.Module):
    """The optimal predictor of `gaussian_data` as a network on (B, 2, 2, 2) images (D = 8), classes 0 and 1,
    null label 2; it counts the images it evaluates."""

    image_size, in_channels, num_classes, null_label = 2, 2, 2, 2

    def __init__(self, diffusion: GaussianDiffusion):
        super().__init__()
        mu = torch.cat([MU[:2], torch.zeros(1, 8) + 0.1])  # (3, D)
        self.fn, self.rows = optimal_model(diffusion, mu, torch.full((3,), 0.2)), 0

    def forward(self, x, t, y):
        self.rows += x.shape[0]
        return self.fn(x.flatten(1), t, y).view_as(x)


def _gaussian_run(settings: SamplerSettings, labels: torch.Tensor):
    d = gaussian_diffusion("cosine")
    net = GaussianNet(d)
    images, _ = generate(net, d, labels, settings, device=torch.device("cpu"), seed=4, batch_size=50)
    return images, net.rows / len(labels), network_evaluations(d, settings, conditional=True)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver"])
def test_the_guidance_interval_sets_the_cost_and_the_ends_are_the_guided_and_the_conditional_sampler(sampler):
    labels = torch.arange(2).repeat(60)  # (120,)
    at = lambda w, interval=None: SamplerSettings(sampler=sampler, steps=12, eta=0.0, guidance_scale=w,  # noqa: E731
                                                  guidance_interval=interval)
    guided_all, rows, nfe = _gaussian_run(at(2.0), labels)
    assert rows == nfe == 24  # every step both branches
    covering, rows, nfe = _gaussian_run(at(2.0, (0.0, 1e9)), labels)
    assert torch.equal(covering, guided_all) and rows == nfe == 24
    conditional, rows, nfe = _gaussian_run(at(0.0), labels)
    assert rows == nfe == 12
    empty, rows, nfe = _gaussian_run(at(2.0, (0.0, 0.0)), labels)
    assert torch.equal(empty, conditional) and rows == nfe == 12  # w applies nowhere, half the cost
    partial, rows, nfe = _gaussian_run(at(2.0, (0.28, 5.42)), labels)
    assert 12 < rows == nfe < 24
    assert not torch.equal(partial, guided_all) and not torch.equal(partial, conditional)


def test_generate_rejects_out_of_range_labels_before_sampling(tiny_cfg: Config):
    model, diffusion = _model(tiny_cfg), GaussianDiffusion.from_config(tiny_cfg)
    settings = SamplerSettings(sampler="ddim", steps=3, eta=0.0, guidance_scale=1.0)
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    k = tiny_cfg.model.num_classes
    for bad in (-1, k + 1):
        with pytest.raises(ValueError, match=rf"class labels must lie in \[0, {k}\].*{bad}"):
            generate(model, diffusion, torch.tensor([0, bad]), settings, device=torch.device("cpu"), seed=0,
                     batch_size=2)
    assert calls == []  # refused once, up front
    generate(model, diffusion, torch.tensor([0, k]), settings, device=torch.device("cpu"), seed=0, batch_size=2)
    assert calls  # the null label k is a valid label


class _LabelReads(TorchFunctionMode):
    """Records the value-reading functions (min, max, item, int, tolist, ...) applied to one tensor."""

    READS = {torch.Tensor.min, torch.Tensor.max, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.tolist,
             torch.Tensor.aminmax, torch.min, torch.max, torch.Tensor.__bool__, torch.Tensor.any, torch.Tensor.all}

    def __init__(self, watched: torch.Tensor):
        super().__init__()
        self.watched, self.reads = watched, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS and any(a is self.watched for a in args):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_unet_forward_reads_no_label_values_when_sampling(tiny_cfg: Config):
    # reading labels back is a host sync per network call on a GPU: sampling checks them once in generate()
    model = _model(tiny_cfg)
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    with _LabelReads(y) as mode, torch.no_grad():
        model.eval()(x, t, y)
    assert mode.reads == []
    with _LabelReads(y) as mode, torch.no_grad():  # the CPU training step still checks (free there)
        model.train()(x, t, y)
    assert "min" in mode.reads and "max" in mode.reads

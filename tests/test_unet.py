"""The U-Net: DDPM's size and cost, shapes, conditioning, init, attention math, layouts, precision, compile."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm.config import Config, ModelConfig
from ddpm.core.unet import AttentionBlock, UNet, build_unet, forward_flops, timestep_embedding

SMALL = ModelConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                    num_groups=4, num_heads=2, dropout=0.0, num_classes=3)
SIZE = 16


def randomised(model: UNet, seed: int = 0) -> UNet:
    """Replace the (partly zero) init with random weights so every path influences the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=gen)  # (B, 3, H, W)
    t = torch.randint(0, 1000, (batch,), generator=gen)  # (B,)
    y = torch.randint(0, SMALL.num_classes + 1, (batch,), generator=gen)  # (B,)
    return x, t, y


def test_reference_network_has_ddpm_parameter_count():
    with torch.device("meta"):  # no memory, no init cost
        model = UNet(ModelConfig(num_classes=0), 32)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 35.7


def test_class_embedding_adds_one_row_per_label_plus_null():
    with torch.device("meta"):
        uncond = UNet(ModelConfig(num_classes=0), 32)
        cond = UNet(ModelConfig(num_classes=10), 32)
    extra = sum(p.numel() for p in cond.parameters()) - sum(p.numel() for p in uncond.parameters())
    assert extra == 11 * 4 * 128
    assert cond.null_label == 10 and uncond.null_label is None


def test_forward_flops_of_reference_network():
    flops = forward_flops(ModelConfig(), 32)
    assert 12.2e9 < flops < 12.6e9


@pytest.mark.parametrize("size", [8, 16])
def test_forward_flops_match_hand_count_for_one_level(size: int):
    """One level, 16 channels, one res block: count 2 * multiply-adds of every matmul / conv by hand."""
    cfg = ModelConfig(channels=16, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
                      num_groups=4, num_classes=0)
    pixels = size * size
    mlps = 2 * (16 * 64 + 64 * 64) + 5 * 2 * 64 * 16  # time MLP + 5 res blocks' embedding projections
    conv3 = 2 * 9  # per pixel and per (in, out) channel pair
    per_pixel = (
        conv3 * 3 * 16  # conv_in
        + 3 * 2 * conv3 * 16 * 16  # down block and two middle blocks: two 16->16 convs each
        + 2 * 16 * 48 + 2 * 16 * 16  # middle attention: qkv and output 1x1 convs
        + 2 * (conv3 * 32 * 16 + conv3 * 16 * 16 + 2 * 32 * 16)  # two up blocks on the 32-channel concat + skip
        + conv3 * 16 * 3  # conv_out
    )
    attention = 2 * 2 * pixels * pixels * 16  # q k^T and (weights) v, one head of width 16
    assert forward_flops(cfg, size) == mlps + per_pixel * pixels + attention

def test_timestep_embedding_matches_formula():
    t = torch.tensor([0, 1, 37])
    emb = timestep_embedding(t, 8)  # (3, 8)
    assert emb.shape == (3, 8)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    for i in range(4):
        freq = 10_000 ** (-i / 3)
        assert emb[2, i].item() == pytest.approx(math.sin(37 * freq), abs=1e-5)
        assert emb[2, 4 + i].item() == pytest.approx(math.cos(37 * freq), abs=1e-5)


def test_output_shape_and_zero_init():
    model = UNet(SMALL, SIZE).eval()
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv: the network starts predicting zeros
    # every residual block starts as its skip path (zero last conv), as in DDPM
    assert all(torch.count_nonzero(blk.conv2.weight) == 0 for lvl in [*model.down, *model.up] for blk in lvl.blocks)


def test_output_depends_on_time_and_label_and_none_means_null():
    model = randomised(UNet(SMALL, SIZE))
    x, t, _ = inputs()
    y0, y1 = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    with torch.no_grad():
        base = model(x, t, y0)
        assert not torch.allclose(base, model(x, t, y1))
        assert not torch.allclose(base, model(x, t + 1, y0))
        null = torch.full((2,), model.null_label, dtype=torch.long)
        assert torch.equal(model(x, t, None), model(x, t, null))


def test_batch_elements_are_independent():
    model = randomised(UNet(SMALL, SIZE))
    x, t, y = inputs(batch=3)
    with torch.no_grad():
        full = model(x, t, y)
        single = model(x[1:2], t[1:2], y[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-4, atol=1e-5)


def test_every_parameter_gets_a_gradient():
    # DDP without find_unused_parameters needs every parameter to take part in the loss
    model = randomised(UNet(SMALL, SIZE)).train()
    x, t, y = inputs()
    model(x, t, y).square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_attention_block_matches_naive_softmax_attention():
    torch.manual_seed(0)
    block = AttentionBlock(8, num_heads=2, groups=2)
    torch.nn.init.normal_(block.proj.weight)
    x = torch.randn(2, 8, 4, 4)  # (B, C, H, W)
    with torch.no_grad():
        qkv = block.qkv(block.norm(x)).reshape(2, 3, 2, 4, 16)  # (B, qkv, heads, d, HW)
        q, k, v = qkv.unbind(1)  # each (B, heads, d, HW)
        w = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(4), dim=-1)  # (B, heads, HW, HW)
        out = (v @ w.transpose(-1, -2)).reshape(2, 8, 4, 4)  # (B, C, H, W)
        expected = x + block.proj(out)
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_wrong_inputs_are_clear_errors():
    model = UNet(SMALL, SIZE)
    x, t, y = inputs()
    with pytest.raises(ValueError, match="expects"):
        model(torch.zeros(2, 3, 32, 32), t, y)
    with pytest.raises(ValueError, match="expects"):
        model(torch.zeros(2, 1, SIZE, SIZE), t, y)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(SMALL.model_copy(update={"num_classes": 0}), SIZE)(x, t, y)
    with pytest.raises(ValueError, match="labels"):
        model(x, t, y.float())


def test_geometry_that_cannot_fit_is_an_error():
    with pytest.raises(ValueError, match=r"image_size=17 is not divisible by 2\^\(levels-1\)=2"):
        UNet(SMALL, 17)
    with pytest.raises(ValueError, match=r"attention_resolutions \[8\] do not occur.*\[32, 16\]"):
        UNet(SMALL, 32)  # levels at 32 and 16: no 8x8 level for the attention


def test_build_unet_uses_config_sizes(tiny_cfg: Config):
    model = build_unet(tiny_cfg)
    assert model.image_size == tiny_cfg.data.image_size and model.null_label == tiny_cfg.model.num_classes


def test_channels_last_input_gives_same_output():
    model = randomised(UNet(SMALL, SIZE))
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_is_close_to_fp32():
    model = randomised(UNet(SMALL, SIZE))
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_compiles_without_graph_breaks():
    # aot_eager traces forward and backward like inductor does, without its (slow on CPU) code generation
    torch._dynamo.reset()
    model = randomised(UNet(SMALL, SIZE))
    x, t, y = inputs()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x, t, y)
    torch.testing.assert_close(out, model(x, t, y), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())



@pytest.mark.parametrize("bad", [-1, SMALL.num_classes + 1, 100])
def test_labels_outside_0_to_num_classes_are_a_value_error(bad: int):
    """Out-of-range labels would index past the class embedding (a device-side assert on CUDA). The CPU
    training step checks them; sampling checks once per generate() call (tests/test_generate.py)."""
    model = UNet(SMALL, SIZE).train()
    x, t, y = inputs(batch=3)
    y = torch.tensor([0, SMALL.num_classes, bad])  # the null label (== num_classes) is allowed
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {SMALL.num_classes}\].*{bad}"):
        model(x, t, y)
    model(x, t, torch.tensor([0, 1, SMALL.num_classes]))  # in range: fine


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels_last"])
def test_attention_computes_the_same_bits_when_sampling_as_when_training(layout):
    """One formulation: a no-grad forward (sampling) gives exactly the training forward's values, in x's
    memory format (so a network's layout is its own choice, not the attention block's)."""
    torch.manual_seed(0)
    block = AttentionBlock(32, 2, 8).to(memory_format=layout)
    torch.nn.init.normal_(block.proj.weight, std=0.1)  # zero-initialised, which would hide the projection
    x = torch.randn(2, 32, 8, 8).to(memory_format=layout)  # (B, C, H, W)
    with torch.no_grad():
        sampled = block(x)
    trained = block(x.clone().requires_grad_())
    assert sampled.is_contiguous(memory_format=layout) and trained.is_contiguous(memory_format=layout)
    assert torch.equal(sampled, trained.detach())

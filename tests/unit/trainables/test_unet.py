"""The authors' residual pre-activation 3D U-Net (SPEC §3)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from trainables.losses import bce_loss
from trainables.unet import (
    CPU_PRESET_WIDTH,
    PreActivation,
    ResBlock,
    UNet3D,
    _upsample_like,
    count_parameters,
    scaled_channels,
)

torch.set_num_threads(1)


def test_parameter_count_of_the_paper_network() -> None:
    # reference/authors-code.md §3: 11,074,306 for one input channel (bridge 7.59 M, encoder 1.95 M,
    # decoder 1.51 M, skips 21 k, init/out 8 k).
    model = UNet3D()
    assert count_parameters(model) == 11_074_306
    assert model.channels == (16, 64, 128, 256)
    bridge = sum(p.numel() for p in model.bridge.parameters())
    skips = sum(p.numel() for m in (model.skip1, model.skip2, model.skip3) for p in m.parameters())
    assert bridge == 7_588_352 and skips == 21_360


def test_building_blocks() -> None:
    # ResBlock a -> b: BN(a) + Conv(a, b, 3, no bias) + BN(b) + Conv(b, b, 3, no bias) + 1x1 shortcut if a != b.
    assert count_parameters(ResBlock(16, 64)) == 2 * 16 + 16 * 64 * 27 + 2 * 64 + 64 * 64 * 27 + 16 * 64
    assert count_parameters(ResBlock(16, 16)) == 2 * (2 * 16 + 16 * 16 * 27)
    assert count_parameters(ResBlock(16, 16, kernel_size=1)) == 2 * (2 * 16 + 16 * 16)
    model = UNet3D()
    assert isinstance(model.out[-1], nn.BatchNorm3d) and model.out[-1].num_features == 1
    assert sum(isinstance(m, nn.MaxPool3d) for m in model.modules()) == 1  # one module used three times


def test_pre_activation_order() -> None:
    layers = list(PreActivation(4, 8, kernel_size=3, bias=False))
    assert [type(m) for m in layers] == [nn.BatchNorm3d, nn.ReLU, nn.Conv3d]
    assert layers[2].bias is None and layers[2].padding == (1, 1, 1)


def test_upsampling_is_trilinear_with_aligned_corners() -> None:
    # align_corners=True maps the end points onto each other: [0, 1] -> [0, 1/3, 2/3, 1] along each axis
    # (align_corners=False would give [0, 1/4, 3/4, 1]).
    x = torch.tensor([0.0, 1.0]).reshape(1, 1, 2, 1, 1).expand(1, 1, 2, 2, 2)
    up = _upsample_like(x, torch.empty(1, 1, 4, 4, 4))
    torch.testing.assert_close(up[0, 0, :, 0, 0], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))


def test_width_scales_channels() -> None:
    assert [scaled_channels(c, 0.25) for c in (16, 64, 128, 256)] == [4, 16, 32, 64]
    assert scaled_channels(16, 0.01) == 1
    small = UNet3D(width=CPU_PRESET_WIDTH)
    assert count_parameters(small) < count_parameters(UNet3D()) / 10
    assert UNet3D(in_channels=2, out_channels=3, width=0.25).channels == (4, 16, 32, 64)


@pytest.mark.parametrize(
    ("width", "shape"),
    [
        (0.25, (2, 1, 16, 16, 16)),
        (0.25, (1, 1, 8, 24, 40)),
        (0.125, (2, 1, 32, 8, 16)),
        (1.0, (2, 1, 8, 8, 8)),
    ],
)
def test_output_shape_equals_input_shape(width: float, shape: tuple[int, ...]) -> None:
    model = UNet3D(width=width)
    out = model(torch.randn(shape))
    assert out.shape == shape
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, *shape[1:])).shape == (1, *shape[1:])


def test_multichannel_input_and_output() -> None:
    model = UNet3D(in_channels=2, out_channels=3, width=0.125).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 2, 16, 8, 8)).shape == (1, 3, 16, 8, 8)


@pytest.mark.parametrize(
    "shape", [(1, 1, 12, 16, 16), (1, 1, 16, 16, 20), (1, 1, 4, 8, 8), (1, 2, 16, 16, 16), (1, 16, 16, 16)]
)
def test_bad_input_shapes_raise(shape: tuple[int, ...]) -> None:
    model = UNet3D(width=0.125).eval()
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        model(torch.randn(shape))


def test_bad_constructor_arguments_raise() -> None:
    for kwargs in (
        {"width": 0.0},
        {"width": -1.0},
        {"width": float("inf")},
        {"in_channels": 0},
        {"out_channels": 1.5},
        {"channels_last": "yes"},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            UNet3D(**kwargs)


def test_channels_last_gives_the_same_output() -> None:
    torch.manual_seed(0)
    plain = UNet3D(width=0.25, channels_last=False).eval()
    fast = UNet3D(width=0.25, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = plain(x)
        got = fast(x)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_sgd_steps_lower_the_loss() -> None:
    # A toy volume: a bright cube on noise; the target is the cube. A few SGD steps (the paper's optimiser) on
    # the same batch must lower the loss clearly.
    torch.manual_seed(0)
    x = 0.1 * torch.randn(2, 1, 16, 16, 16)
    y = torch.zeros_like(x)
    y[:, :, 4:10, 5:11, 6:12] = 1.0
    x = x + y
    model = UNet3D(width=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = bce_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses  # seed 0: 0.76 -> 0.55

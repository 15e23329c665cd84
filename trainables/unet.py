"""The authors' 3D U-Net: residual, pre-activation, additive skips (docs/definitions.md §3).

``iw/model/unet.py::get_unet`` built from dpipe ``FPN``, ``ResBlock3d`` and ``PreActivation3d``, rebuilt here
module by module (no code copied). Channel widths 16 / 64 / 128 with a 256-channel bridge, three 2× max-pools,
trilinear upsampling (``align_corners=True``) added to 1×1 BN-ReLU-Conv skips, and a final BatchNorm on the single
logit: 11,074,306 parameters for one input channel at ``width=1.0``.

Layers (R = resolution relative to the input; "Res a→b" = :class:`ResBlock`, "PreAct" = :class:`PreActivation`):

========  ===  ==============================================================================================
stage     R    layers
========  ===  ==============================================================================================
init      1    Conv3d(C_in→16, 3, no bias); PreAct(16→16, 3)
enc 1     1    Res 16→16, Res 16→16               skip 1: PreAct(16→16, 1)    then MaxPool 2
enc 2     1/2  Res 16→64, Res 64→64               skip 2: PreAct(64→64, 1)    then MaxPool 2
enc 3     1/4  Res 64→128, Res 128→128            skip 3: PreAct(128→128, 1)  then MaxPool 2
bridge    1/8  Res 128→256, Res 256→256, Res 256→128
dec 3     1/4  upsample ×2 + skip 3; Res 128→128, Res 128→64
dec 2     1/2  upsample ×2 + skip 2; Res 64→64, Res 64→16
dec 1     1    upsample ×2 + skip 1; Res 16→16, Res 16→16
out       1    Res 16→16 (1×1×1 kernels); PreAct(16→C_out, 1, no bias); BatchNorm3d(C_out)
========  ===  ==============================================================================================

BatchNorm3d has PyTorch's defaults (eps 1e-5, momentum 0.1), ReLU everywhere, no dropout, PyTorch's default
initialisation. ``width`` scales every channel count (``max(1, floor(c * width + 0.5))``) for CPU presets.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CPU_PRESET_WIDTH",
    "DIVISOR",
    "PreActivation",
    "ResBlock",
    "UNet3D",
    "count_parameters",
    "scaled_channels",
]

#: Width multiplier of the CPU presets and the demo: channels 2 / 8 / 16, bridge 32; 173,766 parameters.
#: Chosen so that one SGD step (forward + backward) on a 2×1×32³ batch with 1 torch thread takes roughly
#: 100-150 ms on one core of the development machine (measured about 140-150 ms in channels-last, the CPU
#: default; width 0.25 took about 225 ms). ``python -m benchmarks.weights`` measures it.
CPU_PRESET_WIDTH: float = 0.125

#: Input sides must be multiples of this (three 2× poolings).
DIVISOR = 8

_BASE_CHANNELS = (16, 64, 128, 256)


def scaled_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded half up, at least 1."""
    return max(1, math.floor(channels * width + 0.5))


class PreActivation(nn.Sequential):
    """BatchNorm3d → ReLU → Conv3d(k, 'same' padding): ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(
            nn.BatchNorm3d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias),
        )


class ResBlock(nn.Module):
    """Two bias-free :class:`PreActivation` convolutions plus a shortcut (identity, or 1×1 conv if C changes).

    ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv_path = nn.Sequential(
            PreActivation(in_channels, out_channels, kernel_size, bias=False),
            PreActivation(out_channels, out_channels, kernel_size, bias=False),
        )
        self.shortcut: nn.Module
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_path(x) + self.shortcut(x)


class UNet3D(nn.Module):
    """The authors' residual pre-activation 3D U-Net (module docstring), returning logits.

    Args:
        in_channels: input channels, ``>= 1`` (1 for CT).
        out_channels: output channels (logits), ``>= 1`` (1 in the paper: lesion vs background).
        width: channel multiplier, ``> 0``; 1.0 is the paper's network (11,074,306 parameters with one input and
            one output channel), :data:`CPU_PRESET_WIDTH` the CPU presets.
        channels_last: run the layers in ``torch.channels_last_3d`` memory format (the input is converted in
            ``forward``; the output is returned contiguous). ``None``/``False`` = the plain NCDHW layout. A study
            leaves ``model.channels_last: null`` to the measurement of :func:`trainables.timing.layout_seconds`
            (the faster layout of its own step on the trials' device kind, chosen once per study). Same results
            up to float rounding.

    Forward:
        ``x``: float tensor ``(B, in_channels, D, H, W)`` with D, H, W positive multiples of 8 (the network pools
        three times). Any other shape raises ValueError naming it; the sliding-window inference pads volumes to
        multiples of 8 itself. Returns logits ``(B, out_channels, D, H, W)``. In training mode BatchNorm needs
        more than one value per channel at the bridge, i.e. ``B * D * H * W / 512 > 1``. Under autocast (mixed
        precision) the output block (its 1×1 residual block, the last convolution and the final BatchNorm) runs in
        float32, so the logits are float32 with float32 resolution: confidences (max logit per component) and
        the calibrated threshold do not inherit bf16's 3 significant digits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        width: float = 1.0,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"UNet3D: {name} must be an integer >= 1, got {value!r}")
        if isinstance(width, bool) or not isinstance(width, numbers.Real) or not (0 < width < math.inf):
            raise ValueError(f"UNet3D: width must be a finite number > 0, got {width!r}")
        if channels_last not in (None, True, False):
            raise ValueError(f"UNet3D: channels_last must be None, True or False, got {channels_last!r}")
        in_channels, out_channels = int(in_channels), int(out_channels)
        self.in_channels = in_channels
        self.channels_last = channels_last
        self.out_channels = out_channels
        self.width = float(width)
        self.divisor = (DIVISOR,) * 3  # what every input side must be a multiple of (trainables.networks)
        c1, c2, c3, c4 = (scaled_channels(c, width) for c in _BASE_CHANNELS)
        self.channels = (c1, c2, c3, c4)

        self.init = nn.Sequential(
            nn.Conv3d(in_channels, c1, kernel_size=3, padding=1, bias=False),
            PreActivation(c1, c1, kernel_size=3, bias=True),
        )
        self.enc1 = nn.Sequential(ResBlock(c1, c1), ResBlock(c1, c1))
        self.enc2 = nn.Sequential(ResBlock(c1, c2), ResBlock(c2, c2))
        self.enc3 = nn.Sequential(ResBlock(c2, c3), ResBlock(c3, c3))
        self.skip1 = PreActivation(c1, c1, kernel_size=1)
        self.skip2 = PreActivation(c2, c2, kernel_size=1)
        self.skip3 = PreActivation(c3, c3, kernel_size=1)
        self.pool = nn.MaxPool3d(kernel_size=2)
        self.bridge = nn.Sequential(ResBlock(c3, c4), ResBlock(c4, c4), ResBlock(c4, c3))
        self.dec3 = nn.Sequential(ResBlock(c3, c3), ResBlock(c3, c2))
        self.dec2 = nn.Sequential(ResBlock(c2, c2), ResBlock(c2, c1))
        self.dec1 = nn.Sequential(ResBlock(c1, c1), ResBlock(c1, c1))
        self.out = nn.Sequential(
            ResBlock(c1, c1, kernel_size=1),
            PreActivation(c1, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm3d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x = self.init(x)
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        x = self.bridge(self.pool(e3))
        x = self.dec3(_upsample_like(x, e3) + self.skip3(e3))
        x = self.dec2(_upsample_like(x, e2) + self.skip2(e2))
        x = self.dec1(_upsample_like(x, e1) + self.skip1(e1))
        if torch.is_autocast_enabled(x.device.type):  # the output block in float32 under mixed precision
            with torch.autocast(x.device.type, enabled=False):
                return self.out(x.float()).contiguous()
        return self.out(x).contiguous()

    def _check_input(self, x: Tensor) -> None:
        shape = tuple(x.shape)
        if x.ndim != 5 or shape[1] != self.in_channels:
            raise ValueError(f"UNet3D expects input of shape (B, {self.in_channels}, D, H, W), got {shape}")
        spatial = shape[2:]
        if any(side <= 0 or side % DIVISOR for side in spatial):
            raise ValueError(
                f"UNet3D input spatial shape {spatial} (input {shape}) must have every side a positive "
                f"multiple of {DIVISOR}; pad the volume (the sliding-window inference does)"
            )

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, width={self.width:g}"


def _upsample_like(x: Tensor, reference: Tensor) -> Tensor:
    """Trilinear resize of ``x`` to the spatial shape of ``reference`` (align_corners=True, as the authors)."""
    return F.interpolate(x, size=reference.shape[2:], mode="trilinear", align_corners=True)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

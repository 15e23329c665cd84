"""The network registry: one record per architecture a study can train (``model.network``).

"Universal" reweighting means across networks: the paper trains one (the authors' 2020 residual U-Net with
BatchNorm), today's researchers train nnU-Net-style networks (instance norm, strided convolutions, deep
supervision) or MONAI's SegResNet. Each record says how to build the network from the study's ``model`` section
and patch size, what divides its input sides, where it comes from and what it is checked against; ``study
catalog`` prints them.

* ``unet2020``: :class:`trainables.unet.UNet3D` (default; no MONAI needed).
* ``dynunet``: MONAI's ``DynUNet`` planned the way nnU-Net plans its U-Net (:func:`plan_dynunet`): from the patch
  size and the voxel spacing (``model.spacing``, null = isotropic), each level halves every axis whose spacing is
  within 2× of the finest and that is still at least 8 voxels, up to 5 times; an axis much coarser than the finest
  gets kernel 1 until the finer ones catch up. Filters 32, 64, 128, 256, 320, 320 (nnU-Net's) times
  ``model.width``; instance norm, leaky ReLU. ``model.deep_supervision``: the decoder's lower-resolution heads are
  trained too, with nnU-Net's weights (:func:`deep_supervision_weights`). MONAI interpolates those heads to the
  full size, so the targets and the iw map are used as they are (nnU-Net instead downsamples the targets; the
  lowest head has weight 0 either way).
* ``segresnet``: MONAI's ``SegResNet`` (Myronenko 2018; group norm, three 2× downsamplings), ``init_filters`` =
  8 × max(1, round(4 × width)).

MONAI is an optional extra (``pip install -e ".[monai]"``): a study naming a MONAI network without it is refused
at load with the install line. Every network returns float32 logits ``(B, 1, D, H, W)`` (eval mode; a deep
supervised ``dynunet`` in training mode ``(B, heads, 1, D, H, W)``), runs in channels-last when asked, and exposes
``divisor`` (per axis: what its input sides must be multiples of).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: nnU-Net's filters per level (capped at 320 for 3D)
NNUNET_FILTERS = (32, 64, 128, 256, 320, 320)
#: the most poolings nnU-Net plans for a 3D network
MAX_POOLS = 5
#: an axis is not halved below this many voxels at the lowest level (nnU-Net: 4; 8 before the last halving)
MIN_FEATURE_SIZE = 4

MONAI_INSTALL = 'pip install -e ".[monai]"  (or: pip install "monai==1.6.1")'


def monai_available() -> bool:
    return importlib.util.find_spec("monai") is not None


def plan_dynunet(patch_size: Sequence[int], spacing: Sequence[float] | None = None
                 ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """``(kernels, strides)`` per level of a DynUNet for ``patch_size`` at ``spacing`` (module docstring):
    ``strides[0]`` is (1, 1, 1) (the input level), ``strides[k]`` the downsampling into level ``k``."""
    size = [int(s) for s in patch_size]
    sp = [float(s) for s in (spacing or (1.0, 1.0, 1.0))]
    kernels: list[tuple[int, int, int]] = []
    strides: list[tuple[int, int, int]] = [(1, 1, 1)]
    while len(strides) <= MAX_POOLS:
        finest = min(sp)
        near = [s / finest <= 2 for s in sp]  # within 2x of the finest spacing: treated as isotropic
        stride = tuple(2 if n and z >= 2 * MIN_FEATURE_SIZE else 1 for n, z in zip(near, size))
        if all(s == 1 for s in stride):
            break
        kernels.append(tuple(3 if n else 1 for n in near))
        strides.append(stride)
        size = [z // s for z, s in zip(size, stride)]
        sp = [p * s for p, s in zip(sp, stride)]
    finest = min(sp)
    kernels.append(tuple(3 if s / finest <= 2 else 1 for s in sp))
    return kernels, strides


def divisor_of(strides: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """The product of the strides per axis: what an input side must be a multiple of."""
    return tuple(math.prod(s[a] for s in strides) for a in range(3))


def deep_supervision_weights(heads: int) -> list[float]:
    """nnU-Net's deep-supervision loss weights for ``heads`` outputs (full resolution first): 1 / 2^i, the
    lowest resolution 0, normalised to sum 1 (a single head: [1])."""
    if heads == 1:
        return [1.0]
    w = [1.0 / 2**i for i in range(heads)]
    w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


class MonaiNetwork(nn.Module):
    """A MONAI network as this project's networks behave: float32 logits, channels-last when asked, ``divisor``
    checked on the input (a ValueError naming the shape)."""

    def __init__(self, net: nn.Module, *, name: str, divisor: tuple[int, int, int], channels_last: bool | None):
        super().__init__()
        self.net = net
        self.name = name
        self.divisor = tuple(int(d) for d in divisor)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last_3d)

    def forward(self, x: Tensor) -> Tensor:
        spatial = tuple(x.shape[2:])
        if x.ndim != 5 or any(s <= 0 or s % d for s, d in zip(spatial, self.divisor)):
            raise ValueError(f"{self.name} input {tuple(x.shape)}: expected (B, C, D, H, W) with sides multiples of "
                             f"{self.divisor}; pad the volume (the sliding-window inference does)")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.net(x).float().contiguous()


@dataclass(frozen=True)
class NetworkRecord:
    name: str
    doc: str
    source: str
    checked: str
    monai: bool
    #: (model config, patch size) -> the module
    build: Callable[..., nn.Module]
    #: (model config, patch size) -> what the input sides must be multiples of, per axis
    divisor: Callable[..., tuple[int, int, int]]


def _unet2020(model, patch_size) -> nn.Module:
    from trainables.unet import UNet3D

    return UNet3D(in_channels=model.in_channels, out_channels=1, width=model.width, channels_last=model.channels_last)


def dynunet_filters(levels: int, width: float) -> list[int]:
    return [max(4, int(math.floor(NNUNET_FILTERS[min(i, len(NNUNET_FILTERS) - 1)] * width + 0.5)))
            for i in range(levels)]


def _dynunet(model, patch_size) -> nn.Module:
    from monai.networks.nets import DynUNet

    kernels, strides = plan_dynunet(patch_size, model.spacing)
    heads = max(1, len(strides) - 2)  # every decoder level but the lowest two (MONAI: deep_supr_num < levels - 1)
    net = DynUNet(spatial_dims=3, in_channels=model.in_channels, out_channels=1, kernel_size=kernels,
                  strides=strides, upsample_kernel_size=strides[1:], filters=dynunet_filters(len(strides), model.width),
                  norm_name=("INSTANCE", {"affine": True}), act_name=("leakyrelu", {"inplace": True,
                                                                                    "negative_slope": 0.01}),
                  deep_supervision=bool(model.deep_supervision), deep_supr_num=heads)
    return MonaiNetwork(net, name="dynunet", divisor=divisor_of(strides), channels_last=model.channels_last)


def segresnet_filters(width: float) -> int:
    return 8 * max(1, round(4 * width))


def _segresnet(model, patch_size) -> nn.Module:
    from monai.networks.nets import SegResNet

    net = SegResNet(spatial_dims=3, init_filters=segresnet_filters(model.width), in_channels=model.in_channels,
                    out_channels=1)
    return MonaiNetwork(net, name="segresnet", divisor=(8, 8, 8), channels_last=model.channels_last)


NETWORKS: dict[str, NetworkRecord] = {
    r.name: r for r in (
        NetworkRecord("unet2020", "the authors' residual pre-activation U-Net, BatchNorm, 3 max-pools (default)",
                      "Shirokikh et al. 2020 (iw/model/unet.py)", "the authors' layer table; 11,074,306 parameters",
                      False, _unet2020, lambda model, patch: (8, 8, 8)),
        NetworkRecord("dynunet", "MONAI DynUNet planned like nnU-Net from the patch and spacing: instance norm, "
                      "strided convolutions, optional deep supervision", "Isensee et al. 2021 (nnU-Net); MONAI "
                      "DynUNet", "MONAI's own DynUNet (shapes, parameters); nnU-Net's planning rule", True, _dynunet,
                      lambda model, patch: divisor_of(plan_dynunet(patch, model.spacing)[1])),
        NetworkRecord("segresnet", "MONAI SegResNet: residual encoder, group norm, 3 downsamplings",
                      "Myronenko 2018; MONAI SegResNet", "MONAI's own SegResNet (shapes, parameters)", True,
                      _segresnet, lambda model, patch: (8, 8, 8)),
    )
}


def network_record(name: str) -> NetworkRecord:
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; known: {', '.join(NETWORKS)}")
    return NETWORKS[name]

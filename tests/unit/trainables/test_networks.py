"""The network registry: nnU-Net's planning rule for DynUNet, each MONAI network against MONAI's own construction
(shapes, parameter counts), deep supervision's weights and loss, test-time mirroring against the direct 8-flip
mean, and the configuration's refusals."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from study.loader import config_from_dict
from trainables.build import build_model
from trainables.config import ModelConfig
from trainables.errors import ConfigError
from trainables.inference import sliding_window_logits
from trainables.losses import get_loss
from trainables.networks import (
    NETWORKS,
    deep_supervision_weights,
    divisor_of,
    dynunet_filters,
    plan_dynunet,
    segresnet_filters,
)
from trainables.step import supervised_loss
from trainables.unet import count_parameters

monai = pytest.importorskip("monai")


def test_dynunet_is_planned_by_nnunets_rule():
    # isotropic 128^3: five poolings down to 4^3, 3x3x3 kernels everywhere (nnU-Net's 3d_fullres on isotropic data)
    kernels, strides = plan_dynunet((128, 128, 128))
    assert strides == [(1, 1, 1)] + [(2, 2, 2)] * 5 and kernels == [(3, 3, 3)] * 6
    # anisotropic (thick slices): z is not pooled and gets 1x3x3 kernels until y and x are within 2x of it
    kernels, strides = plan_dynunet((32, 64, 64), (2.5, 0.7, 0.7))
    assert strides == [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert kernels[0] == (1, 3, 3) and kernels[1:] == [(3, 3, 3)] * 4
    # a 32^3 patch stops when a side would drop below 8 before halving: 32 -> 16 -> 8 -> 4
    assert plan_dynunet((32, 32, 32))[1] == [(1, 1, 1)] + [(2, 2, 2)] * 3
    assert divisor_of(plan_dynunet((32, 64, 64), (2.5, 0.7, 0.7))[1]) == (8, 16, 16)


@pytest.mark.parametrize("deep", [False, True])
def test_dynunet_equals_monais_own_construction(deep):
    from monai.networks.nets import DynUNet

    patch = (32, 32, 32)
    model = ModelConfig(network="dynunet", width=0.25, deep_supervision=deep)
    ours = build_model(model, patch)
    kernels, strides = plan_dynunet(patch)
    theirs = DynUNet(3, 1, 1, kernels, strides, strides[1:], filters=dynunet_filters(len(strides), 0.25),
                     norm_name=("INSTANCE", {"affine": True}), deep_supervision=deep, deep_supr_num=len(strides) - 2)
    assert count_parameters(ours) == count_parameters(theirs)
    theirs.load_state_dict({k.removeprefix("net."): v for k, v in ours.state_dict().items()})
    x = torch.rand(2, 1, *patch)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x)) and ours(x).shape == (2, 1, *patch)
    ours.train()
    out = ours(x)
    assert out.shape == ((2, len(strides) - 1, 1, *patch) if deep else (2, 1, *patch)) and out.dtype == torch.float32


def test_segresnet_equals_monais_own_construction():
    from monai.networks.nets import SegResNet

    ours = build_model(ModelConfig(network="segresnet", width=0.125), (32, 32, 32))
    theirs = SegResNet(spatial_dims=3, init_filters=segresnet_filters(0.125), in_channels=1, out_channels=1)
    assert segresnet_filters(0.125) == 8 and segresnet_filters(1.0) == 32
    assert count_parameters(ours) == count_parameters(theirs)
    assert ours(torch.rand(1, 1, 24, 32, 32)).shape == (1, 1, 24, 32, 32)
    with pytest.raises(ValueError, match=r"segresnet input \(1, 1, 20, 32, 32\).*multiples of \(8, 8, 8\)"):
        ours(torch.rand(1, 1, 20, 32, 32))


def test_deep_supervision_weights_and_loss_follow_nnunet():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])  # 1, 1/2, (1/4 -> 0), normalised
    assert sum(deep_supervision_weights(5)) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    heads = torch.randn(2, 3, 1, 8, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, 8, generator=g) > 0.8).to(torch.uint8)
    weight = 1 + 10 * torch.rand(2, 1, 8, 8, 8, generator=g)  # an iw map: every head is weighted by it alike
    loss = get_loss("bce")
    direct = 2 / 3 * loss(heads[:, 0], target, weight) + 1 / 3 * loss(heads[:, 1], target, weight)
    assert supervised_loss(loss, heads, target, weight) == pytest.approx(float(direct), rel=1e-6)
    assert supervised_loss(loss, heads[:, 0], target, weight) == loss(heads[:, 0], target, weight)


def test_mirrored_inference_is_the_mean_of_the_eight_flipped_predictions():
    torch.manual_seed(0)  # any network: a small convolutional one whose random kernels are not symmetric
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv3d(4, 1, 3, padding=1)).eval()
    image = torch.rand(16, 24, 16)
    got = sliding_window_logits(model, image, window=(16, 24, 16), stride=(16, 24, 16), tta="mirror")
    x = image[None, None]
    direct = torch.zeros(16, 24, 16)
    with torch.no_grad():
        for bits in itertools.product((0, 1), repeat=3):
            axes = [a for a, on in zip((2, 3, 4), bits) if on]
            direct += torch.flip(model(torch.flip(x, axes)), axes)[0, 0]
    torch.testing.assert_close(got, direct / 8, rtol=1e-6, atol=1e-6)
    plain = sliding_window_logits(model, image, window=(16, 24, 16), stride=(16, 24, 16))
    assert not torch.allclose(got, plain)  # the flips change the logits: the mean is not the plain pass
    with pytest.raises(ValueError, match="tta must be one of none, mirror"):
        sliding_window_logits(model, image, window=(16, 24, 16), stride=(16, 24, 16), tta="rotate")


def _space(**changes):
    base = {"search": {"losses": {"bce": {"iw": [False, True]}}}, "training": {"patch_size": [32, 32, 32]},
            "inference": {"window": [48, 64, 64], "stride": [48, 64, 64]}, "model": {"width": 0.125}}
    for k, v in changes.items():
        base[k] = {**base.get(k, {}), **v}
    return base


def test_a_search_over_networks_selects_and_labels_per_network():
    cfg = config_from_dict(_space(search={"models": ["unet2020", "dynunet"]}))
    labels = [t.label for t in cfg.trials]
    assert labels == ["bce[model.network=unet2020]/s0", "iw-bce[model.network=unet2020]/s0",
                      "bce[model.network=dynunet]/s0", "iw-bce[model.network=dynunet]/s0"]
    assert [cfg.for_trial(t).model.network for t in cfg.trials] == ["unet2020"] * 2 + ["dynunet"] * 2
    assert all(t.loss_params == {} for t in cfg.trials)


@pytest.mark.parametrize("changes, key, needle", [
    ({"model": {"network": "vnet"}}, "model.network", "known: unet2020, dynunet, segresnet"),
    ({"model": {"deep_supervision": True}}, "model.deep_supervision", "only dynunet"),
    ({"search": {"models": ["dynunet", "unet2020"]}, "training": {"patch_size": [128, 128, 128]}},
     "inference.window", "multiple of [32, 32, 32] for dynunet"),
    ({"search": {"models": ["unet2020", "unet2020"]}}, "search.models", "duplicate"),
])
def test_bad_network_settings_name_the_key(changes, key, needle):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*{re.escape(needle)}"):
        config_from_dict(_space(**changes))


def test_a_monai_network_without_monai_is_refused_with_the_install_line(monkeypatch):
    import trainables.networks as networks

    monkeypatch.setattr(networks, "monai_available", lambda: False)
    with pytest.raises(ConfigError, match=r'model.network: dynunet is a MONAI network .* pip install -e "\.\[monai\]"'):
        config_from_dict(_space(model={"network": "dynunet"}))
    assert set(NETWORKS) == {"unet2020", "dynunet", "segresnet"}

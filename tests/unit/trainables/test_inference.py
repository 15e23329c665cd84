"""Sliding-window inference: equal to a full-volume pass where it must be, equal to MONAI at matching settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainables.inference import importance_map, sliding_window_inference, window_starts


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pointwise_net() -> torch.nn.Module:
    """Output at a voxel depends on that voxel only: any tiling must give the full-volume result."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 6, 1), torch.nn.Tanh(), torch.nn.Conv3d(6, 1, 1)).eval()


def conv_net() -> torch.nn.Module:
    """Two 3x3x3 zero-padded convolutions: receptive radius 2 voxels."""
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 1, 3, padding=1)
    ).eval()


def full_pass(net: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.as_tensor(image, dtype=torch.float32)[None, None])[0, 0].numpy()


def test_window_starts_align_the_last_window_to_the_far_edge():
    assert window_starts(40, 16, 12) == [0, 12, 24]
    assert window_starts(41, 16, 12) == [0, 12, 24, 25]
    assert window_starts(16, 16, 4) == [0]
    with pytest.raises(ValueError, match="smaller than the window"):
        window_starts(10, 16, 8)


@pytest.mark.parametrize("blending", ["uniform", "gaussian"])
@pytest.mark.parametrize(
    "shape,window,stride,batch",
    [
        ((40, 37, 29), (16, 16, 16), (12, 12, 12), 1),  # last windows moved back to the edges
        ((33, 48, 20), (16, 24, 8), (16, 7, 5), 3),  # no overlap on one axis, batches of 3
        ((10, 30, 12), (16, 16, 16), (8, 8, 8), 2),  # smaller than the window on two axes: padded
    ],
)
def test_pointwise_net_equals_full_pass(shape, window, stride, batch, blending):
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32)
    net = pointwise_net()
    out = sliding_window_inference(
        net, image, window=window, stride=stride, blending=blending, batch_size=batch
    )
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out, full_pass(net, image), rtol=1e-5, atol=1e-6)


def interior_mask(shape, window, stride, radius):
    """Voxels that are >= ``radius`` away from every window face inside the volume, for every window that covers
    them: there each window sees the same neighbourhood as the full pass, whatever the blending."""
    good = np.ones(shape, bool)
    for axis, (n, w, s) in enumerate(zip(shape, window, stride)):
        bad = np.zeros(n, bool)
        for a in window_starts(n, w, s):
            if a > 0:
                bad[a : a + radius] = True  # near the window's inner low face
            if a + w < n:
                bad[a + w - radius : a + w] = True  # near its inner high face
        good &= np.expand_dims(~bad, tuple(i for i in range(3) if i != axis))
    return good


@pytest.mark.parametrize("blending", ["uniform", "gaussian"])
def test_conv_net_equals_full_pass_away_from_inner_window_faces(blending):
    shape, window, stride = (40, 44, 36), (16, 24, 16), (8, 12, 10)
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    net = conv_net()
    out = sliding_window_inference(net, image, window=window, stride=stride, blending=blending)
    ref = full_pass(net, image)
    good = interior_mask(shape, window, stride, radius=2)
    assert good.mean() > 0.1
    np.testing.assert_allclose(out[good], ref[good], rtol=1e-5, atol=1e-6)
    # and the receptive field is real: near inner faces the windows do see a different neighbourhood
    assert np.abs(out[~good] - ref[~good]).max() > 1e-3


@pytest.mark.parametrize("blending,mode", [("uniform", "constant"), ("gaussian", "gaussian")])
@pytest.mark.parametrize("shape", [(40, 37, 29), (12, 40, 30)])
def test_agrees_with_monai(blending, mode, shape):
    from monai.inferers import sliding_window_inference as monai_swi

    window, stride = (16, 16, 16), (12, 12, 12)  # MONAI overlap 0.25 -> interval int(16 * 0.75) = 12
    image = torch.as_tensor(np.random.default_rng(2).normal(size=shape).astype(np.float32))
    net = conv_net()
    ours = sliding_window_inference(
        net, image, window=window, stride=stride, blending=blending, pad_value=0.0
    )
    with torch.inference_mode():
        theirs = monai_swi(image[None, None], window, 1, net, overlap=0.25, mode=mode)[0, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_importance_map_equals_monai():
    from monai.data.utils import compute_importance_map

    for window in [(16, 16, 16), (8, 24, 17)]:
        for sigma in (0.125, 0.3):
            ours = importance_map(window, "gaussian", sigma)
            theirs = compute_importance_map(window, mode="gaussian", sigma_scale=sigma)
            torch.testing.assert_close(ours, theirs)
    assert torch.equal(importance_map((8, 8, 8)), torch.ones(8, 8, 8))


def test_padding_uses_the_image_minimum_by_default():
    class Edge(torch.nn.Module):  # sees the padding: output = the input's window minimum
        def forward(self, x):
            return x.amin(dim=(2, 3, 4), keepdim=True).expand_as(x)

    image = np.full((8, 16, 16), 5.0, np.float32)
    image[0, 0, 0] = 2.0
    out = sliding_window_inference(Edge(), image, window=(16, 16, 16), stride=(16, 16, 16))
    assert np.all(out == 2.0)
    out = sliding_window_inference(Edge(), image, window=(16, 16, 16), stride=(16, 16, 16), pad_value=-1.0)
    assert np.all(out == -1.0)


def test_accepts_channel_axis_restores_training_mode_and_validates():
    net = pointwise_net().train()
    image = np.random.default_rng(3).normal(size=(1, 16, 16, 16)).astype(np.float32)
    out = sliding_window_inference(net, image, window=(8, 8, 8), stride=(8, 8, 8))
    assert out.shape == (16, 16, 16) and net.training
    with pytest.raises(ValueError, match="multiples of 8"):
        sliding_window_inference(net, image, window=(12, 8, 8), stride=(8, 8, 8))
    with pytest.raises(ValueError, match="stride"):
        sliding_window_inference(net, image, window=(8, 8, 8), stride=(9, 8, 8))
    with pytest.raises(ValueError, match="blending"):
        sliding_window_inference(net, image, window=(8, 8, 8), stride=(8, 8, 8), blending="max")
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        sliding_window_inference(net, image[0, 0], window=(8, 8, 8), stride=(8, 8, 8))


@pytest.mark.parametrize("blending", ["uniform", "gaussian"])
@pytest.mark.parametrize("shape", [(40, 52, 44), (20, 70, 30)])  # overlapping windows; padded on one axis
def test_device_stitching_gives_the_same_logits_bit_for_bit_on_the_cpu(blending, shape):
    """The windows are now summed and normalised where they are predicted (the GPU); on the CPU with one window
    per pass the logits are exactly those of the loop that copied every window to the host and added it there."""
    from tests.helpers import reference_sliding_window
    from trainables.unet import UNet3D

    torch.manual_seed(0)
    model = UNet3D(width=0.125).eval()
    image = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    window, stride = (24, 32, 24), (16, 20, 16)
    ours = sliding_window_inference(model, image, window=window, stride=stride, blending=blending)
    before = reference_sliding_window(model, image, window=window, stride=stride, blending=blending)
    assert ours.dtype == before.dtype == np.float32
    np.testing.assert_array_equal(ours, before)
    # batch_size None (chosen for the device) is one window per pass on a CPU: the same bits
    auto = sliding_window_inference(model, image, window=window, stride=stride, blending=blending, batch_size=None)
    np.testing.assert_array_equal(auto, before)
    # several windows per pass: the same values up to the convolutions' float rounding
    batched = sliding_window_inference(model, image, window=window, stride=stride, blending=blending, batch_size=3)
    np.testing.assert_allclose(batched, before, rtol=1e-5, atol=1e-5)


def test_masks_made_beside_the_logits_equal_the_host_threshold_and_records_agree():
    """predict_volume binarises where the logits are (the GPU) at every calibration threshold: the masks equal
    the host's logit > log(t / (1 - t)), and records built from them equal records that threshold themselves."""
    from trainables.config import InferenceConfig
    from trainables.evaluate import CALIBRATION_THRESHOLDS, case_records, predict_volume
    from trainables.metrics import volume_records_multi

    class Gain(torch.nn.Module):  # logits = 3 x image: they span every calibration threshold
        def forward(self, x):
            return 3.0 * x

    model = Gain()
    rng = np.random.default_rng(5)
    image = rng.normal(size=(24, 40, 40)).astype(np.float32)
    gt = np.zeros(image.shape, np.uint8)
    gt[4:9, 5:12, 6:10] = 1
    gt[15:17, 30:33, 30:32] = 1
    inference = InferenceConfig(window=(24, 24, 24), stride=(16, 16, 16))
    logits, masks = predict_volume(model, image, inference=inference, device=torch.device("cpu"),
                                   thresholds=CALIBRATION_THRESHOLDS)
    assert sorted(masks) == sorted(CALIBRATION_THRESHOLDS)
    rules = {"any": ("any", None), "strict": ("iou", 0.3)}
    shared = case_records(logits, masks, gt, (1.0, 1.0, 1.0), rules)  # the lesions labelled once for all t
    for t, mask in masks.items():
        assert mask.dtype == np.bool_
        np.testing.assert_array_equal(mask, logits > np.log(t / (1 - t)))
        given = volume_records_multi(logits, gt, (1.0, 1.0, 1.0), rules=rules, threshold=t, foreground=mask)
        own = volume_records_multi(logits, gt, (1.0, 1.0, 1.0), rules=rules, threshold=t)
        assert given == own == shared[t] and given["any"].records
    assert masks[0.5].sum() > masks[0.9].sum() > masks[0.99].sum() > 0  # not vacuous

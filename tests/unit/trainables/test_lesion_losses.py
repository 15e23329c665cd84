"""The lesion-aware losses since the paper (SPEC §9): dice_ce, blob, cc_dice_ce. Toy values derived by hand from
the definitions, MONAI's DiceCELoss for dice_ce at w = 1, finiteness on empty patches and at extreme logits, and
clear errors without instance labels; the sampler yields the labels and regions the losses take."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainables.losses import blob_loss, cc_dice_ce_loss, dice_ce_loss, get_loss, loss_record
from trainables.weights import label_components, voronoi_regions


def _line(values, dtype=torch.float64) -> torch.Tensor:
    """A (1, 1, 1, 1, n) tensor: a 1-D patch, easy to work out by hand."""
    return torch.tensor(values, dtype=dtype).reshape(1, 1, 1, 1, -1)


def _logit(p) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p) - torch.log1p(-p)


# ------------------------------------------------------------------------------------------------- dice_ce


def test_dice_ce_by_hand():
    """p = 0.5 everywhere, one lesion voxel of 8: CE = log 2, Dice = 1 - (2·0.5 + s) / (8·0.5 + 1 + s)."""
    logits = torch.zeros(1, 1, 2, 2, 2, dtype=torch.float64)
    target = torch.zeros_like(logits)
    target[0, 0, 0, 0, 0] = 1
    s = 1e-5
    expected = math.log(2) + 1 - (1 + s) / (5 + s)
    assert float(dice_ce_loss(logits, target)) == pytest.approx(expected, rel=1e-12)
    # iw multiplies both terms: weight 3 on the lesion voxel
    weight = torch.ones_like(logits)
    weight[0, 0, 0, 0, 0] = 3
    expected_w = 10 / 8 * math.log(2) + 1 - (2 * 3 * 0.5 + s) / (7 * 0.5 + 3 * 1.5 + s)
    assert float(dice_ce_loss(logits, target, weight)) == pytest.approx(expected_w, rel=1e-12)
    assert float(dice_ce_loss(logits, target, lambda_ce=0.0, lambda_dice=2.0)) == pytest.approx(
        2 * (1 - (1 + s) / (5 + s)), rel=1e-12)


def test_dice_ce_equals_monai_at_unit_weight():
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 6, 7, 5, generator=g, dtype=torch.float64) * 3
    target = (torch.rand(3, 1, 6, 7, 5, generator=g) > 0.8).double()
    target[2] = 0  # one empty sample
    monai = DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=1.0, lambda_ce=1.0)
    torch.testing.assert_close(dice_ce_loss(logits, target), monai(logits, target), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------- blob


def _soft_dice(p, y):
    return 1 - 2 * (p * y).sum() / (p * p + y * y).sum()


def test_blob_by_hand():
    """Two lesions on a line: global Dice × 2 + the mean over lesions of the Dice on background ∪ that lesion."""
    labels = _line([1, 1, 0, 0, 2, 0], torch.int64)
    target = (labels > 0).double()
    p = _line([0.9, 0.6, 0.2, 0.1, 0.3, 0.7])
    logits = _logit(p)
    blobs = []
    for k in (1, 2):
        keep = ((labels == 0) | (labels == k)).double()
        blobs.append(_soft_dice(p * keep, target * keep))
    expected = 2 * _soft_dice(p, target) + 1 * (blobs[0] + blobs[1]) / 2
    assert float(blob_loss(logits, target, labels=labels)) == pytest.approx(float(expected), rel=1e-12)
    only_blob = blob_loss(logits, target, labels=labels, lambda_main=0.0, lambda_blob=1.0)
    assert float(only_blob) == pytest.approx(float((blobs[0] + blobs[1]) / 2), rel=1e-12)


def test_blob_averages_per_sample_then_over_samples_with_lesions():
    """Sample 0 has two lesions, sample 1 one, sample 2 none: the blob term is the mean of the two per-sample
    means (the empty sample has no blob term; its global Dice still counts)."""
    lab = torch.zeros(3, 1, 1, 1, 6, dtype=torch.int64)
    lab[0, 0, 0, 0] = torch.tensor([1, 0, 0, 2, 2, 0])
    lab[1, 0, 0, 0] = torch.tensor([0, 0, 5, 5, 0, 0])
    target = (lab > 0).double()
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 1, 1, 6, generator=g, dtype=torch.float64)
    p = torch.sigmoid(logits)

    def blob_of(b, k):
        keep = ((lab[b] == 0) | (lab[b] == k)).double()
        return _soft_dice(p[b] * keep, target[b] * keep)

    blob = ((blob_of(0, 1) + blob_of(0, 2)) / 2 + blob_of(1, 5)) / 2
    main = torch.stack([_soft_dice(p[b], target[b]) if target[b].any() else torch.tensor(1.0, dtype=p.dtype)
                        for b in range(3)]).mean()
    assert float(blob_loss(logits, target, labels=lab)) == pytest.approx(float(2 * main + blob), rel=1e-10)


# ------------------------------------------------------------------------------------------------- cc_dice_ce


def _dice_ce_region(p, y, s=1e-5):
    bce = -(y * torch.log(p) + (1 - y) * torch.log1p(-p)).mean()
    return bce + 1 - (2 * (p * y).sum() + s) / (p.sum() + y.sum() + s)


def test_voronoi_regions_by_hand():
    assert voronoi_regions(np.array([1, 0, 0, 0, 0, 2])).tolist() == [1, 1, 1, 2, 2, 2]
    grid = np.zeros((5, 5), dtype=np.int32)
    grid[0, 0], grid[4, 4] = 1, 2
    regions = voronoi_regions(grid)
    for idx in np.ndindex(grid.shape):
        d1, d2 = math.dist(idx, (0, 0)), math.dist(idx, (4, 4))
        if d1 != d2:
            assert regions[idx] == (1 if d1 < d2 else 2), idx
    assert not voronoi_regions(np.zeros((3, 3), dtype=np.int32)).any()


def test_cc_dice_ce_by_hand():
    regions = _line([1, 1, 1, 2, 2, 2], torch.int64)
    target = _line([1, 0, 0, 0, 0, 1])
    p = _line([0.8, 0.3, 0.1, 0.4, 0.6, 0.2])
    expected = (_dice_ce_region(p[..., :3], target[..., :3]) + _dice_ce_region(p[..., 3:], target[..., 3:])) / 2
    assert float(cc_dice_ce_loss(_logit(p), target, regions=regions)) == pytest.approx(float(expected), rel=1e-10)


def test_cc_dice_ce_of_an_empty_patch_is_the_global_dice_ce():
    """No lesion: one region (the whole patch), i.e. dice_ce with the same smoothing."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 4, 4, 4, generator=g, dtype=torch.float64)
    target = torch.zeros_like(logits)
    regions = torch.zeros_like(logits, dtype=torch.int64)
    torch.testing.assert_close(cc_dice_ce_loss(logits, target, regions=regions), dice_ce_loss(logits, target))


def test_cc_regions_match_ccmetrics():
    """The region partition equals CC-Metrics' own (the ccmetrics package): exactly its single-EDT partition, and
    its reference one (a distance transform per component) wherever a voxel is not equidistant to two."""
    grad = torch.is_grad_enabled()
    try:
        space = pytest.importorskip("CCMetrics.space_separation")
    finally:  # ccmetrics switches autograd off for the whole process when imported; switch it back
        torch.set_grad_enabled(grad)
    from scipy.ndimage import distance_transform_edt

    rng = np.random.default_rng(3)
    for _ in range(3):
        mask = np.zeros((20, 22, 24), dtype=np.uint8)
        for _ in range(4):
            c = rng.integers(3, 17, 3)
            mask[tuple(slice(x - 1, x + int(rng.integers(1, 3))) for x in c)] = 1
        labels, n = label_components(mask)
        ours = voronoi_regions(labels)
        np.testing.assert_array_equal(ours, space.compute_voronoi_regions_fast(mask))
        reference = space.compute_voronoi_regions(mask)
        dist = np.stack([distance_transform_edt(labels != k) for k in range(1, n + 1)])
        dist.sort(axis=0)
        unique = dist[0] < dist[1] - 1e-9 if n > 1 else np.ones(mask.shape, bool)
        np.testing.assert_array_equal(ours[unique], reference[unique])


# ------------------------------------------------------------------------------------------------- all three


@pytest.mark.parametrize("name", ["dice_ce", "blob", "cc_dice_ce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_on_empty_patches_and_extreme_logits(name, dtype):
    for fill in (-100.0, 0.0, 100.0):
        for with_lesion in (False, True):
            logits = torch.full((2, 1, 4, 4, 4), fill, dtype=dtype, requires_grad=True)
            labels = torch.zeros((2, 1, 4, 4, 4), dtype=torch.int64)
            if with_lesion:
                labels[0, 0, 1:3, 1:3, 1:3] = 1
                labels[1, 0, 0, 0, 0] = 4
            extras = {n: (labels if n == "labels" else torch.from_numpy(voronoi_regions(labels.numpy())).long())
                      for n in loss_record(name).needs}
            loss = get_loss(name)(logits, (labels > 0).to(dtype), **extras)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(logits.grad).all(), (name, fill, with_lesion)


@pytest.mark.parametrize(("name", "key"), [("blob", "labels"), ("cc_dice_ce", "regions")])
def test_per_lesion_losses_without_labels_name_the_loss(name, key):
    logits = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match=rf"{name}: needs the patch's {key}"):
        get_loss(name)(logits, torch.zeros_like(logits))
    with pytest.raises(ValueError, match=rf"{name}: {key} must be an integer tensor"):
        get_loss(name)(logits, torch.zeros_like(logits), **{key: torch.zeros(1, 1, 2, 2)})


def test_iw_support_of_the_new_losses():
    """dice_ce takes the iw map (like iw-dice); blob and cc_dice_ce already count every lesion once, so iw is not
    offered for them (it would weight small lesions twice)."""
    assert (loss_record("dice_ce").iw, loss_record("blob").iw, loss_record("cc_dice_ce").iw) == (True, False, False)
    logits = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="no weight map"):
        get_loss("blob")(logits, torch.zeros_like(logits), torch.ones_like(logits),
                         labels=torch.zeros_like(logits, dtype=torch.int64))


def test_the_sampler_yields_the_labels_and_regions_the_losses_take(tmp_path):
    from trainables.data import Cache, PatchSampler, make_phantom, prepare_cache

    manifest = make_phantom(tmp_path / "ph", n_cases=4, seed=0, shape=(24, 32, 32))
    cache = Cache(prepare_cache(manifest, tmp_path / "cache", progress=False).root)
    ids = cache.case_ids(["train"])
    plain = PatchSampler(cache, ids, patch_size=(16, 16, 16), batch_size=2, iw=False, num_workers=0).batch(0)
    rich = PatchSampler(cache, ids, patch_size=(16, 16, 16), batch_size=2, iw=False, num_workers=0,
                        extras=("labels", "regions")).batch(0)
    assert plain._fields == ("image", "target", "weight") and rich.regions is not None
    np.testing.assert_array_equal(rich.image, plain.image)  # the same patches
    np.testing.assert_array_equal(rich.labels > 0, rich.target > 0)
    for b in range(2):
        np.testing.assert_array_equal(rich.regions[b, 0], voronoi_regions(rich.labels[b, 0]))


@pytest.mark.parametrize(("axes", "key"), [({"gamma": 2.0}, "search.losses.blob"),
                                           ({"smooth": 0}, "search.losses.cc_dice_ce.smooth"),
                                           ({"iw": True}, "search.losses.cc_dice_ce.iw")])
def test_bad_parameters_of_the_new_losses_exit_2_naming_the_key(tmp_path, capsys, axes, key):
    import yaml

    from study.cli import main

    loss = key.split(".")[2]
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump({"search": {"losses": {loss: axes}}}))
    assert main(["launch", str(space), "--dry-run", "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"{space}: {key}" in err, err

"""Inverse weights (SPEC §1): definitions, the authors' worked example, and fast path == direct path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from trainables.weights import DEFAULT_CLIP, inverse_weights, label_components, weights_from_labels


def reference_weights(components: np.ndarray, clip: tuple[float, float] | None, power: float = 1.0) -> np.ndarray:
    """The authors' ``cc2weight`` written out literally (slow, independent of the module's bincount/peeling):
    ``K + 1 = len(unique(cc))``; every voxel of component i gets ``N / ((K + 1) * |cc == i|)`` (to the power
    ``power``); then clip."""
    n = components.size
    ids = np.unique(components)
    weights = np.zeros(components.shape, dtype=np.float64)
    for i in ids:
        weights[components == i] = (n / (len(ids) * np.sum(components == i))) ** power
    if clip is not None:
        weights = np.clip(weights, *clip)
    return weights.astype(np.float32)


def scipy_components(mask: np.ndarray) -> np.ndarray:
    """26-connected (full connectivity) labelling straight from scipy, for an independent check."""
    labels, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    return labels


def separated_blobs() -> np.ndarray:
    """A 20³ mask with lesions of 27, 8 and 1 voxels, pairwise far apart."""
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[2:5, 2:5, 2:5] = True  # 27 voxels
    mask[10:12, 10:12, 10:12] = True  # 8 voxels
    mask[17, 3, 15] = True  # 1 voxel
    return mask


# ----------------------------------------------------------------------------------------------------------- labels


def test_label_components_full_connectivity_3d() -> None:
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # touch at one corner only: one lesion under 26-connectivity
    mask[3, 3, 3] = True  # 2 steps away from (1, 1, 1): a second lesion
    labels, k = label_components(mask)
    assert k == 2
    assert labels.dtype == np.int32
    assert labels[0, 0, 0] == labels[1, 1, 1] != 0
    assert labels[3, 3, 3] not in (0, labels[0, 0, 0])
    assert labels[~mask].max() == 0


def test_label_components_full_connectivity_2d() -> None:
    mask = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=np.uint8)  # diagonal neighbours: 8-connected
    labels, k = label_components(mask)
    assert k == 1
    assert labels[0, 0] == labels[1, 1] == 1


def test_label_components_empty() -> None:
    labels, k = label_components(np.zeros((3, 4, 5)))
    assert k == 0
    assert labels.shape == (3, 4, 5) and not labels.any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cc3d_and_scipy_labelling_agree(monkeypatch, seed: int) -> None:
    """The package labels with cc3d when installed; the scipy fallback must give the same partition."""
    from trainables import weights as weights_mod

    mask = np.random.default_rng(seed).random((20, 24, 28)) < 0.3
    fast, k_fast = label_components(mask)
    monkeypatch.setattr(weights_mod, "_cc3d", None)
    slow, k_slow = label_components(mask)
    assert k_fast == k_slow == ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]
    assert slow.dtype == fast.dtype == np.int32
    # same partition: the pairs (fast, slow) are in one-to-one correspondence
    pairs = np.unique(np.stack([fast[mask], slow[mask]]), axis=1)
    assert pairs.shape[1] == k_fast


# ------------------------------------------------------------------------------------------------ the definition


def test_diagonal_touching_voxels_are_one_lesion_in_weights() -> None:
    # 4³ patch, N = 64, lesion {(0,0,0), (1,1,1)} touching at a corner: one component of 2 voxels, K = 1.
    # Eq. 1: lesion w = 64 / (2 * 2) = 16, background w = 64 / (2 * 62) = 16/31 (unclipped).
    # Were the two voxels two lesions (6-connectivity), K = 2 and each would get 64 / (3 * 1) = 21.33.
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True
    weights = inverse_weights(mask, clip=None)
    assert weights[0, 0, 0] == weights[1, 1, 1] == pytest.approx(16.0)
    assert weights[2, 2, 2] == pytest.approx(16 / 31)


def test_edge_touching_voxels_are_one_lesion_in_2d() -> None:
    # 3×3, diagonal pair: one lesion of 2 voxels, K = 1: lesion 9 / (2 * 2) = 2.25, background 9 / (2 * 7).
    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = mask[1, 1] = True
    weights = inverse_weights(mask, clip=None)
    assert weights[0, 0] == weights[1, 1] == pytest.approx(2.25)
    assert weights[2, 2] == pytest.approx(9 / 14)


def test_component_totals_equal_unclipped() -> None:
    mask = separated_blobs()
    weights = inverse_weights(mask, clip=None).astype(np.float64)
    components = scipy_components(mask)
    n, k = mask.size, components.max()
    assert k == 3
    totals = [weights[components == j].sum() for j in range(k + 1)]  # j = 0: background
    # every component carries N / (K + 1)
    np.testing.assert_allclose(totals, n / (k + 1), rtol=1e-6)


def test_mean_exactly_one_unclipped() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((24, 24, 24)) < 0.05  # many lesions of many sizes
    weights = inverse_weights(mask, clip=None)
    assert weights.dtype == np.float32
    assert weights.astype(np.float64).mean() == pytest.approx(1.0, rel=1e-6)


def test_values_match_literal_authors_formula() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((16, 12, 10)) < 0.08
    components = scipy_components(mask)
    for clip in (None, DEFAULT_CLIP, (0.5, 40.0)):
        np.testing.assert_array_equal(inverse_weights(mask, clip=clip), reference_weights(components, clip))


def test_power_softens_eq1_square_root_at_one_half_ones_at_zero() -> None:
    """iw.power: p = 0.5 gives the square root of Eq. 1's weights (computed directly here), p = 0 all ones
    (the plain loss), p = 1 exactly Eq. 1; the power comes before the clip."""
    mask = separated_blobs()
    n, k1 = mask.size, 4  # three lesions and the background
    eq1 = np.empty(mask.shape)
    eq1[...] = n / (k1 * (n - 36))
    eq1[2:5, 2:5, 2:5], eq1[10:12, 10:12, 10:12], eq1[17, 3, 15] = n / (k1 * 27), n / (k1 * 8), n / k1
    np.testing.assert_allclose(inverse_weights(mask, clip=None, power=0.5), np.sqrt(eq1), rtol=1e-6)
    np.testing.assert_array_equal(inverse_weights(mask, clip=None, power=0.0), np.ones(mask.shape, np.float32))
    np.testing.assert_array_equal(inverse_weights(mask, clip=None, power=1.0), inverse_weights(mask, clip=None))
    clipped = inverse_weights(mask, clip=(1.0, 20.0), power=0.5)  # sqrt(2000) = 44.7 -> 20, sqrt(74.1) -> 8.6
    np.testing.assert_allclose(clipped, np.clip(np.sqrt(eq1), 1.0, 20.0), rtol=1e-6)
    rng = np.random.default_rng(4)
    noisy = rng.random((16, 12, 10)) < 0.08
    np.testing.assert_array_equal(inverse_weights(noisy, clip=DEFAULT_CLIP, power=0.5),
                                  reference_weights(scipy_components(noisy), DEFAULT_CLIP, power=0.5))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="power must be in"):
            inverse_weights(mask, power=bad)


@pytest.mark.parametrize("clip", [None, DEFAULT_CLIP])
def test_no_lesion_gives_ones(clip: tuple[float, float] | None) -> None:
    # K = 0: w = N / (1 * N) = 1.
    direct = inverse_weights(np.zeros((8, 8, 8)), clip=clip)
    fast = weights_from_labels(np.zeros((8, 8, 8), np.int32), clip=clip)
    for weights in (direct, fast):
        assert weights.dtype == np.float32
        np.testing.assert_array_equal(weights, 1.0)


@pytest.mark.parametrize("clip", [None, DEFAULT_CLIP])
def test_patch_inside_one_lesion_gives_ones(clip: tuple[float, float] | None) -> None:
    # No background voxel: the authors' K = len(unique) - 1 = 0, so w = N / (1 * N) = 1.
    np.testing.assert_array_equal(inverse_weights(np.ones((6, 6, 6), bool), clip=clip), 1.0)
    np.testing.assert_array_equal(weights_from_labels(np.full((6, 6, 6), 1234, np.int32), clip=clip), 1.0)


def test_no_background_two_lesions_mean_one() -> None:
    # A crop with two lesion ids and no background: K + 1 = 2 present components, 24 + 40 voxels, N = 64:
    # w = 64 / (2 * 24) = 4/3 and 64 / (2 * 40) = 0.8; mean = (24 * 4/3 + 40 * 0.8) / 64 = 1.
    labels = np.full((4, 4, 4), 7, np.int32)
    labels.reshape(-1)[:24] = 9
    weights = weights_from_labels(labels, clip=None)
    assert weights.reshape(-1)[0] == pytest.approx(4 / 3)
    assert weights.reshape(-1)[-1] == pytest.approx(0.8)
    assert weights.astype(np.float64).mean() == pytest.approx(1.0)


def test_clip_bounds_respected() -> None:
    rng = np.random.default_rng(2)
    mask = rng.random((20, 20, 20)) < 0.03
    unclipped = inverse_weights(mask, clip=None)
    for lo, hi in [DEFAULT_CLIP, (1.0, 50.0), (0.1, 3.0)]:
        clipped = inverse_weights(mask, clip=(lo, hi))
        assert clipped.min() >= np.float32(lo) and clipped.max() <= np.float32(hi)
        np.testing.assert_array_equal(clipped, np.clip(unclipped, np.float32(lo), np.float32(hi)))
    # the default clip lifts the background (N / ((K+1)|L_0|) < 1) to exactly 1
    assert (inverse_weights(mask)[~mask] == 1.0).all()
    assert (unclipped[~mask] < 1.0).all()


def test_authors_worked_example_128() -> None:
    """reference/authors-code.md §1.3: a 128³ patch with lesions of 1000, 8 and 1 voxels (K = 3).

    N = 128³ = 2,097,152, K + 1 = 4, so N / (K + 1) = 524,288 and:
      lesion of 1000: 524288 / 1000 = 524.288;  lesion of 8: 524288 / 8 = 65,536;
      lesion of 1: 524,288 -> clipped to 2e5;  background: 524288 / (N - 1009) = 0.2501 -> clipped to 1.
    Mean after the clip: (N - 1009 + 1000 * 524.288 + 8 * 65536 + 200000) / N = 3,344,719 / N = 1.5949.
    """
    mask = np.zeros((128, 128, 128), dtype=bool)
    mask[10:20, 10:20, 10:20] = True  # 1000
    mask[60:62, 60:62, 60:62] = True  # 8
    mask[100, 100, 100] = True  # 1
    weights = inverse_weights(mask)
    assert weights[15, 15, 15] == np.float32(524.288)
    assert weights[60, 61, 60] == 65536.0
    assert weights[100, 100, 100] == 200000.0
    assert weights[0, 0, 0] == 1.0 and weights[127, 127, 127] == 1.0
    assert weights.astype(np.float64).mean() == pytest.approx(3_344_719 / 128**3, rel=1e-6)
    unclipped = inverse_weights(mask, clip=None)
    assert unclipped[100, 100, 100] == 524288.0
    assert unclipped[0, 0, 0] == pytest.approx(524288 / (128**3 - 1009))


# ----------------------------------------------------------------------------------------- fast path == direct


@st.composite
def masks_and_crops(draw: st.DrawFn) -> tuple[np.ndarray, tuple[slice, ...]]:
    """A random 3D mask and a crop box that may reach outside the image (the outside is padding)."""
    shape = tuple(draw(st.integers(3, 14)) for _ in range(3))
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.sampled_from([0.02, 0.08, 0.2, 0.45]))
    mask = np.random.default_rng(seed).random(shape) < density
    starts = [draw(st.integers(-3, side - 1)) for side in shape]
    sizes = [draw(st.integers(1, side + 3)) for side in shape]
    box = tuple(slice(start, start + size) for start, size in zip(starts, sizes))
    return mask, box


def crop_with_padding(array: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """Crop ``array`` to ``box``; parts of the box outside the array are filled with 0 (label padding)."""
    out = np.zeros(tuple(s.stop - s.start for s in box), dtype=array.dtype)
    src, dst = [], []
    for s, side in zip(box, array.shape):
        lo, hi = max(s.start, 0), min(s.stop, side)
        if lo >= hi:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s.start, hi - s.start))
    out[tuple(dst)] = array[tuple(src)]
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(masks_and_crops(), st.integers(0, 10**6))
def test_fast_path_equals_direct_path(case, id_offset: int) -> None:
    mask, box = case
    labels, _ = label_components(mask)
    # Global ids as in a cache: large, with gaps (offset plus a stride).
    labels = np.where(labels > 0, labels.astype(np.int64) * 3 + id_offset, 0)
    crop = crop_with_padding(labels, box)
    # Remove (from the whole image) every lesion the crop border cuts: then no lesion crosses the border.
    whole_counts = dict(zip(*np.unique(labels, return_counts=True)))
    crop_ids, crop_counts = np.unique(crop, return_counts=True)
    cut = [i for i, c in zip(crop_ids, crop_counts) if i != 0 and c != whole_counts[i]]
    crop[np.isin(crop, cut)] = 0
    for clip in (None, DEFAULT_CLIP):
        fast = weights_from_labels(crop, clip=clip)
        direct = inverse_weights(crop > 0, clip=clip)
        np.testing.assert_array_equal(fast, direct)
        np.testing.assert_array_equal(fast, reference_weights(crop, clip))
        for power in (0.0, 0.5):  # iw.power: the two paths agree too
            np.testing.assert_array_equal(weights_from_labels(crop, clip=clip, power=power),
                                          inverse_weights(crop > 0, clip=clip, power=power))


def test_fast_path_dense_foreground_matches_reference() -> None:
    # Crops with more than N/32 lesion voxels take the "peeling" branch of the fast path: check it on purpose,
    # (a) one dominant lesion plus small and scattered ones, (b) more large lesions than the peeling limit (8).
    rng = np.random.default_rng(3)
    dominant = np.zeros((40, 40, 40), np.int64)
    dominant[:30, :25, :] = 50_000
    dominant[30:, :, :20] = 7
    dominant[5:8, 30:33, 2:5] = 123
    dominant[rng.random(dominant.shape) < 0.01] = 999  # scattered single voxels sharing one id
    slabs = np.zeros((40, 40, 40), np.int32)
    for k in range(16):  # 16 lesions of 40 * 40 * 2 = 3200 voxels each, well above N/32 = 2000
        slabs[k * 2 + 1 : k * 2 + 3, :, :] = 100 + 17 * k
    for labels in (dominant, slabs):
        for clip in (None, DEFAULT_CLIP):
            np.testing.assert_array_equal(
                weights_from_labels(labels, clip=clip), reference_weights(labels, clip)
            )
    # a non-contiguous view and other integer dtypes
    view = dominant[::2, 1:, ::-1]
    expected = reference_weights(np.ascontiguousarray(view), DEFAULT_CLIP)
    np.testing.assert_array_equal(weights_from_labels(view), expected)
    for dtype in (np.uint16, np.uint32, np.uint64, np.int32):
        np.testing.assert_array_equal(
            weights_from_labels(dominant.astype(dtype)), weights_from_labels(dominant)
        )
    huge = np.where(slabs > 0, slabs.astype(np.uint64) + np.uint64(2**63), np.uint64(0))  # ids beyond int64
    np.testing.assert_array_equal(weights_from_labels(huge), weights_from_labels(slabs))


def test_fast_path_keeps_a_split_lesion_whole() -> None:
    # A U-shaped lesion of 12 voxels whose bottom row lies outside the crop (rows 0..3 of 8 x 6): in the 4 x 6
    # crop (N = 24) it shows as two vertical pieces of 4 voxels each.
    # Fast path (one global label, like the authors): one component of 8 visible voxels, K = 1:
    #   w = 24 / (2 * 8) = 1.5 on both pieces. Direct path (labels the crop): K = 2, w = 24 / (3 * 4) = 2.
    image = np.zeros((8, 6), dtype=bool)
    image[0:4, 1] = True
    image[0:4, 4] = True
    image[4, 1:5] = True  # the bottom joins the two arms
    labels, k = label_components(image)
    assert k == 1
    crop = labels[:4]
    fast = weights_from_labels(crop, clip=None)
    direct = inverse_weights(crop > 0, clip=None)
    assert fast[0, 1] == fast[0, 4] == pytest.approx(1.5)
    assert direct[0, 1] == direct[0, 4] == pytest.approx(2.0)


def test_out_argument() -> None:
    labels = np.zeros((2, 9, 9, 9), np.int32)
    labels[0, 1:3, 1:3, 1:3] = 5
    labels[0, 7, 7, 7] = 9
    batch = np.full((2, 1, 9, 9, 9), -1.0, np.float32)  # like a sampler's preallocated weight tensor
    for b in range(2):
        result = weights_from_labels(labels[b], out=batch[b, 0])
        assert np.shares_memory(result, batch[b, 0])
        np.testing.assert_array_equal(batch[b, 0], weights_from_labels(labels[b]))
    np.testing.assert_array_equal(batch[1], 1.0)  # K = 0
    for bad in (
        np.zeros((9, 9, 9)),
        np.zeros((9, 9, 8), np.float32),
        np.zeros((9, 9, 18), np.float32)[..., ::2],
    ):
        with pytest.raises(ValueError, match="out must be"):
            weights_from_labels(labels[0], out=bad)


# ---------------------------------------------------------------------------------------------------- arguments


def test_argument_errors() -> None:
    with pytest.raises(TypeError, match="inverse_weights"):
        weights_from_labels(np.zeros((4, 4), bool))
    with pytest.raises(TypeError, match="integer"):
        weights_from_labels(np.zeros((4, 4), np.float32))
    negative = np.zeros((4, 4), np.int32)
    negative[1, 1] = -2
    with pytest.raises(ValueError, match=">= 0"):
        weights_from_labels(negative)
    with pytest.raises(ValueError, match="empty"):
        inverse_weights(np.zeros((0, 4)))
    for bad in [(2.0, 1.0), (-1.0, 2.0), (1.0,), "x", (1.0, float("nan"))]:
        with pytest.raises(ValueError, match="clip"):
            inverse_weights(np.zeros((4, 4)), clip=bad)

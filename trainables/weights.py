"""Inverse weighting (iw): one weight per voxel, inversely proportional to the size of its lesion.

Shirokikh et al. (MICCAI 2020), Eq. 1 and docs/definitions.md §1. A patch of ``N`` voxels is split into its 26-connected
lesions ``L_1..L_K`` and the background ``L_0``; every voxel of component ``j`` gets::

    w_j = N / ((K + 1) * |L_j|)          (|L_j| counted inside the patch)

so that each component carries the same total weight ``N / (K + 1)`` and the weights average exactly 1. The
authors' code then clips ``w`` to ``[1, 2e5]`` (:data:`DEFAULT_CLIP`): the background weight becomes 1 and a lesion
of which one voxel is visible cannot get a weight of ~1e6. ``clip=None`` gives Eq. 1 unchanged.

Beyond the paper, ``power=p`` (0 <= p <= 1) softens the reweighting: ``w_j = clip((N / ((K + 1) |L_j|))^p)``;
``p = 1`` is Eq. 1 exactly (the default), ``p = 0`` gives all ones (the plain loss), ``p = 0.5`` the square root.
The power is applied before the clip.

Two paths give the same map whenever no lesion crosses the patch border:

- :func:`inverse_weights` labels a binary mask itself (direct path; reference and tests).
- :func:`weights_from_labels` takes a crop of a label map computed once per whole image (:func:`label_components`
  at preprocessing time) and only counts and gathers (fast path used by the training sampler). As in the
  authors' code, a lesion that the crop splits into several pieces keeps its one label and is weighted as one
  component, and a lesion cut by the border is weighted by its visible size.

Conventions shared by both paths (they follow the authors' ``cc2weight``, where ``K + 1 = len(np.unique(cc))``):

- ``K + 1`` is the number of distinct components present in the patch, the background counted only if the patch
  has background voxels. With background present this is exactly Eq. 1. A patch with no lesion (K = 0) gets
  ``w = N / N = 1`` everywhere. A patch lying entirely inside one lesion (no background voxel) has a single
  component too and also gets all ones (the authors' ``K = len(unique) - 1 = 0``); in general the unclipped
  weights always average exactly 1.
- Out-of-image padding is label 0, i.e. background, and counts in ``N`` and ``|L_0|``.
- Weights are computed in float64 and returned as float32, so ``clip=None`` gives a mean of 1 up to float32
  rounding of the individual values.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

try:  # optional, faster labelling (a declared dependency); scipy is the fallback
    import cc3d as _cc3d
except ImportError:  # pragma: no cover - depends on the environment
    _cc3d = None

__all__ = ["DEFAULT_CLIP", "label_components", "inverse_weights", "voronoi_regions", "weights_from_labels"]

#: The authors' clip of the weights, ``[w_min, w_max]`` (``iw/batch_iter.py::cc2weight``).
DEFAULT_CLIP: tuple[float, float] = (1.0, 2e5)

# Fast-path tuning. A patch whose foreground is at most N / _SPARSE_FRACTION voxels is handled sparsely
# (indices of the foreground voxels, bincount over their labels, gather). Larger foreground is first "peeled":
# the dominant labels (found on a strided sample) are counted and written with one vectorised comparison each,
# which is several times cheaper than a bincount over hundreds of thousands of voxels.
_SPARSE_FRACTION = 32
_MAX_PEEL = 8
_SAMPLE_STRIDE = 61
# Global label ids above this use np.unique instead of a bincount table of size max_id + 1.
_MAX_DENSE_ID = 1 << 24


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the connected components of a binary mask with full connectivity.

    Full connectivity means every neighbour sharing a face, an edge or a corner: 26 in 3D, 8 in 2D (the authors'
    ``skimage.measure.label(..., connectivity=ndim)``).

    Args:
        mask: array of any shape with ``ndim >= 1``; voxels that are nonzero (``True``) are foreground.

    Returns:
        ``(labels, K)``: ``labels`` is an int32 array of the mask's shape, 0 on background and ``1..K`` on the
        ``K`` components (numbered in raster order of their first voxel).
    """
    mask = _as_mask(mask)
    if _cc3d is not None and mask.ndim in (2, 3) and mask.size:
        # connected-components-3d: several times faster than scipy on large volumes (uint8 view: no copy)
        labels, n_components = _cc3d.connected_components(
            np.ascontiguousarray(mask).view(np.uint8), connectivity=26 if mask.ndim == 3 else 8, return_N=True
        )
        return labels.astype(np.int32, copy=False), int(n_components)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels = np.empty(mask.shape, dtype=np.int32)
    n_components = ndimage.label(mask, structure=structure, output=labels)
    return labels, int(n_components)


def inverse_weights(mask: np.ndarray, clip: tuple[float, float] | None = DEFAULT_CLIP, *,
                    power: float = 1.0) -> np.ndarray:
    """Inverse weights of a binary patch (direct path: labels the mask, then weighs its components).

    Args:
        mask: binary array, any shape with ``ndim >= 1`` (a 3D patch in training); nonzero = lesion.
        clip: ``(w_min, w_max)`` applied to the weights, :data:`DEFAULT_CLIP` = the authors' ``(1, 2e5)``;
            ``None`` = the paper's Eq. 1 exactly (unclipped weights, mean 1).
        power: ``p`` in ``[0, 1]``: the weights are ``(N / ((K + 1) |L_j|))^p`` before the clip (1: Eq. 1).

    Returns:
        float32 array of the mask's shape, values ``(N / ((K + 1) |L_j|))^p`` (clipped if ``clip``); all ones when
        the mask is empty or entirely foreground and connected.
    """
    labels, _ = label_components(mask)
    return weights_from_labels(labels, clip=clip, power=power)


def weights_from_labels(
    labels: np.ndarray,
    clip: tuple[float, float] | None = DEFAULT_CLIP,
    out: np.ndarray | None = None,
    power: float = 1.0,
) -> np.ndarray:
    """Inverse weights of a patch from a crop of a precomputed label map (fast path, no labelling).

    Args:
        labels: integer array (any shape, ``ndim >= 1``), a crop of the whole image's component labels: 0 =
            background (and padding), ids ``> 0`` = lesions. Ids may be large and need not be consecutive. A
            lesion split by the crop keeps one id and is weighted as one component (the authors' behaviour).
        clip: as in :func:`inverse_weights`.
        power: as in :func:`inverse_weights`.
        out: optional C-contiguous float32 array of the crop's shape to write into (e.g. ``weight[b, 0]`` of a
            preallocated batch), which saves allocating and copying the map.

    Returns:
        float32 array of the crop's shape (``out`` if given). Equals ``inverse_weights(labels > 0, clip, power=)``
        whenever no lesion crosses the crop border.

    Raises:
        TypeError: ``labels`` is not an integer array (a boolean mask goes to :func:`inverse_weights`).
        ValueError: negative ids, an empty array, an invalid ``clip`` or ``power``, or an unsuitable ``out``.

    Cost: a few vectorised passes over the patch, independent of the largest id: about 1.3 ms for a 128³ patch
    with a few percent of lesion voxels on one core, about 2.5-3.5 ms when a large lesion fills half of it
    (``python -m benchmarks.weights``).
    """
    labels = np.asarray(labels)
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"labels must be an integer label map (0 = background), got dtype {labels.dtype}; "
            "for a binary mask use inverse_weights(mask)"
        )
    _check_shape(labels, "labels")
    lo, hi = _check_clip(clip)
    power = float(power)
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"power must be in [0, 1] (1: Eq. 1, 0: no reweighting), got {power!r}")
    if out is not None and (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != labels.shape
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise ValueError(
            f"out must be a writeable C-contiguous float32 array of shape {labels.shape}, got "
            + (
                f"{out.dtype} array of shape {out.shape}"
                if isinstance(out, np.ndarray)
                else type(out).__name__
            )
        )
    labels = np.ascontiguousarray(labels)
    flat = labels.reshape(-1)
    n_total = flat.size

    foreground = flat != 0
    n_foreground = int(np.count_nonzero(foreground))
    if n_foreground == 0:  # K = 0: w = N / (1 * N) = 1 everywhere (also inside the clip)
        if out is None:
            return np.ones(labels.shape, dtype=np.float32)
        out.fill(1.0)
        return out
    n_background = n_total - n_foreground

    # 1. Peel dominant labels with one comparison each while the remaining foreground is large.
    peeled_ids: list[int] = []
    peeled_masks: list[np.ndarray] = []
    peeled_counts: list[int] = []
    remaining = foreground
    n_remaining = n_foreground
    sparse_limit = n_total // _SPARSE_FRACTION
    while n_remaining > sparse_limit and len(peeled_ids) < _MAX_PEEL:
        sample = flat[::_SAMPLE_STRIDE][remaining[::_SAMPLE_STRIDE]]
        if sample.size == 0:
            break
        if sample.min() < 0:
            raise ValueError(f"labels must be >= 0, found {int(sample.min())}")
        ids, counts = np.unique(sample, return_counts=True)
        dominant = ids[np.argmax(counts)]
        is_dominant = flat == dominant
        remaining = np.greater(remaining, is_dominant)  # remaining and not dominant, in one pass
        n_dominant = int(np.count_nonzero(is_dominant))
        peeled_ids.append(int(dominant))
        peeled_masks.append(is_dominant)
        peeled_counts.append(n_dominant)
        n_remaining -= n_dominant

    # 2. The rest sparsely: indices of the remaining foreground voxels, their ids, counts per id.
    index = np.flatnonzero(remaining) if n_remaining else np.empty(0, dtype=np.intp)
    rest_ids = flat[index]
    if rest_ids.size and rest_ids.min() < 0:
        raise ValueError(f"labels must be >= 0, found {int(rest_ids.min())}")
    if rest_ids.size and int(rest_ids.max()) > _MAX_DENSE_ID:
        _, inverse, rest_counts = np.unique(rest_ids, return_inverse=True, return_counts=True)
        rest_table_index = inverse.reshape(-1)
    else:
        rest_table_index = rest_ids.astype(np.intp, copy=False)  # also uint64 ids, known to be small here
        rest_counts = np.bincount(rest_table_index)
    present = rest_counts > 0

    # 3. K + 1 = number of distinct components present (background only if the patch has some).
    n_components = len(peeled_ids) + int(np.count_nonzero(present)) + (1 if n_background > 0 else 0)
    scale = n_total / n_components  # = N / (K + 1), the total weight of every component

    background_weight = scale / n_background if n_background else 1.0
    peeled_weights = [scale / count for count in peeled_counts]
    rest_table = np.zeros(rest_counts.size, dtype=np.float64)
    rest_table[present] = scale / rest_counts[present].astype(np.float64)
    if power != 1.0:  # p = 1 leaves Eq. 1's values untouched (bit for bit)
        background_weight = background_weight ** power
        peeled_weights = [weight ** power for weight in peeled_weights]
        np.power(rest_table, power, out=rest_table)
    if clip is not None:
        background_weight = min(max(background_weight, lo), hi)
        peeled_weights = [min(max(weight, lo), hi) for weight in peeled_weights]
        np.clip(rest_table, lo, hi, out=rest_table)

    if out is None:
        out = np.full(labels.shape, background_weight, dtype=np.float32)
    else:
        out.fill(background_weight)
    out_flat = out.reshape(-1)
    for is_label, weight in zip(peeled_masks, peeled_weights):
        np.copyto(out_flat, np.float32(weight), where=is_label)
    if index.size:
        out_flat[index] = rest_table.astype(np.float32)[rest_table_index]
    return out


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    _check_shape(mask, "mask")
    return mask if mask.dtype == np.bool_ else mask != 0


def _check_shape(array: np.ndarray, name: str) -> None:
    if array.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")


def _check_clip(clip: tuple[float, float] | None) -> tuple[float, float]:
    if clip is None:
        return 0.0, float("inf")
    try:
        lo, hi = (float(value) for value in clip)
    except (TypeError, ValueError):
        raise ValueError(f"clip must be None or a pair (w_min, w_max) of numbers, got {clip!r}") from None
    if not (0.0 <= lo <= hi) or np.isnan(hi):
        raise ValueError(f"clip must satisfy 0 <= w_min <= w_max, got {clip!r}")
    return lo, hi


def voronoi_regions(labels: np.ndarray) -> np.ndarray:
    """The Voronoi regions of a label map's components: every voxel gets the label of its nearest labelled
    voxel (Euclidean, in voxels; CC-Metrics' partition), so each component owns the part of the patch closest
    to it. All zeros when there is no label. Ties go to the voxel ``scipy.ndimage.distance_transform_edt``
    picks. Returns an int32 array of the labels' shape.
    """
    labels = np.asarray(labels)
    if labels.ndim < 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"voronoi_regions: labels must be an integer array, got {labels.dtype}")
    if not labels.any():
        return np.zeros(labels.shape, dtype=np.int32)
    _, nearest = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    return labels[tuple(nearest)].astype(np.int32, copy=False)

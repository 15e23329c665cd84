"""Intensity presets (docs/definitions.md §5), ROI cropping and per-lesion statistics.

All arrays are ``[z, y, x]``. A preset turns a raw image (any dtype, e.g. HU), a binary lesion mask and an
optional binary ROI mask into the cached arrays:

=========  =================  =====================  ==========================  ======================
preset     ROI                crop                   clip (raw units)            outside ROI set to
=========  =================  =====================  ==========================  ======================
luna16     required (lungs)   ROI bbox + 5 voxels    [-1000, 300] HU             -1000
lits       required (liver)   ROI bbox + 5 voxels    [-300, 300] HU              -300
none       optional           ROI bbox + 5 if ROI    none                        unchanged
=========  =================  =====================  ==========================  ======================

After clipping and ROI masking the cropped image is min-max scaled to [0, 1] (``x -= min; x /= max``, the
authors' ``scale_ct``; a constant image becomes all zeros). The bounding box is clamped to the image. No
resampling: the spacing is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainables.errors import DataError
from trainables.metrics.records import equivalent_diameter

ROI_MARGIN = 5


@dataclass(frozen=True)
class Preset:
    """How a raw image becomes a cached [0, 1] image; ``doc``: one line for the command line's help."""

    name: str
    roi_required: bool
    clip: tuple[float, float] | None
    mask_outside_roi: bool
    margin: int = ROI_MARGIN
    doc: str = ""


#: the presets by name; the command line (``study data prepare --preset``) and the config read this table
PRESETS: dict[str, Preset] = {
    "none": Preset(
        "none", roi_required=False, clip=None, mask_outside_roi=False, doc="min-max, ROI optional"
    ),
    "luna16": Preset(
        "luna16",
        roi_required=True,
        clip=(-1000.0, 300.0),
        mask_outside_roi=True,
        doc="lung ROI required, clip [-1000, 300] HU",
    ),
    "lits": Preset(
        "lits",
        roi_required=True,
        clip=(-300.0, 300.0),
        mask_outside_roi=True,
        doc="liver ROI required, clip [-300, 300] HU",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise DataError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}") from None


@dataclass
class Preprocessed:
    """The arrays and facts a preset produces for one case.

    image: float32 [z, y, x] in [0, 1]; mask: uint8 0/1, same shape; crop_box: ``[[z0, z1], [y0, y1], [x0, x1]]``
    half-open voxel ranges of the source image; raw_range: (min, max) of the cropped, clipped, masked raw image
    before scaling; mask_voxels_outside_roi: lesion voxels outside the ROI (they keep their label).
    """

    image: np.ndarray
    mask: np.ndarray
    crop_box: list[list[int]]
    raw_range: tuple[float, float]
    mask_voxels_outside_roi: int


def bbox(mask: np.ndarray, margin: int = 0) -> list[list[int]]:
    """Half-open bounding box ``[[z0, z1], [y0, y1], [x0, x1]]`` of the nonzero voxels + margin, clamped."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(np.any(mask, axis=others))
        lo, hi = int(idx[0]) - margin, int(idx[-1]) + 1 + margin
        box.append([max(lo, 0), min(hi, mask.shape[axis])])
    return box


def apply_preset(
    image: np.ndarray, mask: np.ndarray, roi: np.ndarray | None, preset: Preset | str, *, case_id: str = "?"
) -> Preprocessed:
    """Crop, clip, mask outside the ROI and scale one case (see the module table).

    image: raw [z, y, x], any numeric dtype; mask, roi: uint8/bool 0/1 on the same grid (roi may be None
    unless the preset requires it).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if roi is None and preset.roi_required:
        raise DataError(f"case {case_id}: preset {preset.name} needs an ROI mask, none given")
    if roi is not None:
        roi = roi.astype(bool, copy=False)
        if not roi.any():
            raise DataError(f"case {case_id}: the ROI mask is empty (no voxel set)")
        box = bbox(roi, preset.margin)
    else:
        box = [[0, s] for s in image.shape]
    sl = tuple(slice(a, b) for a, b in box)
    out = np.array(image[sl], dtype=np.float32)  # a copy
    m = np.ascontiguousarray(mask[sl], dtype=np.uint8)
    outside = 0
    if preset.clip is not None:
        np.clip(out, preset.clip[0], preset.clip[1], out=out)
    if roi is not None:
        r = roi[sl]
        outside = int(np.count_nonzero(m[~r]))
        if preset.mask_outside_roi:
            out[~r] = preset.clip[0] if preset.clip is not None else out.min()
    lo, hi = float(out.min()), float(out.max())
    out -= lo
    if hi > lo:
        out /= hi - lo
        np.clip(out, 0.0, 1.0, out=out)  # float rounding
    return Preprocessed(image=out, mask=m, crop_box=box, raw_range=(lo, hi), mask_voxels_outside_roi=outside)


def lesion_stats(labels: np.ndarray, n_lesions: int, spacing: tuple[float, float, float]) -> dict:
    """Per-lesion voxel counts and equivalent diameters (mm) of a label map with labels 1..n_lesions."""
    sizes = np.bincount(labels.ravel(), minlength=n_lesions + 1)[1 : n_lesions + 1]
    return {
        "n_lesions": int(n_lesions),
        "lesion_sizes_vox": [int(s) for s in sizes],
        "diameters_mm": [round(float(d), 4) for d in equivalent_diameter(sizes, spacing)],
    }

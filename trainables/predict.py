"""Prediction on new images with trained models: the study's preset, sliding window and threshold.

For one image (anything SimpleITK reads: NIfTI, MHA/MHD, NRRD): the study's preprocessing preset exactly as the
cache applied it (crop to the ROI box + margin, clip, outside-ROI fill, min-max scaling; :mod:`trainables.data
.preprocess`), the whole-volume sliding window of the study's inference settings (:mod:`trainables.inference`),
the mean probability over the given models (one, or every seed of a configuration: an ensemble), pasted back
into the input's grid (0 outside the crop). Written next to each other, each under a temporary name and then
renamed (nothing half-written):

- ``<case>_prob.nii.gz``: float32 probability, the input's spacing, origin and direction;
- ``<case>_mask.nii.gz``: uint8, probability > threshold;
- ``<case>_lesions.csv``: one row per predicted 26-connected component: id, voxels, volume (mm³), equivalent
  diameter (mm), centroid in physical coordinates (x, y, z mm, ITK order), max logit and max probability.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainables.config import InferenceConfig
from trainables.data.io import Geometry, as_binary, read_image, read_on_grid, write_image
from trainables.data.preprocess import apply_preset, get_preset
from trainables.errors import DataError
from trainables.inference import study_logits
from trainables.io_utils import write_text_atomic
from trainables.metrics.records import equivalent_diameter
from trainables.step import Precision
from trainables.weights import label_components

#: what ``--input DIR`` picks up
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
LESION_COLUMNS = ("id", "voxels", "volume_mm3", "diameter_mm", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
                  "max_logit", "max_probability")


@dataclass(frozen=True)
class InputCase:
    case_id: str
    image: Path
    roi: Path | None = None


def case_id_of(path: Path) -> str:
    """``lung_007.nii.gz`` -> ``lung_007``."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_inputs(source: str | os.PathLike, roi_dir: str | os.PathLike | None = None) -> list[InputCase]:
    """The cases of ``source``: a folder of images (sorted; ROIs, if any, in ``roi_dir`` under the same file
    names) or a manifest CSV (its ``image`` and ``roi`` columns)."""
    src = Path(source).expanduser().resolve()
    if src.is_file() and src.suffix.lower() == ".csv":
        from trainables.data.manifest import read_manifest

        return [InputCase(r.case_id, r.image, r.roi) for r in read_manifest(src, required_splits=())]
    if not src.is_dir():
        raise DataError(f"--input {source}: not a folder of images or a manifest CSV")
    images = sorted(p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise DataError(f"--input {src}: no image ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    cases = []
    for p in images:
        roi = None
        if roi_dir is not None:
            roi = Path(roi_dir).expanduser().resolve() / p.name
            if not roi.is_file():
                raise DataError(f"--roi {roi_dir}: no ROI for {p.name} (expected {roi})")
        cases.append(InputCase(case_id_of(p), p, roi))
    ids = [c.case_id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"--input {src}: several images share the case id(s) {', '.join(dup)}")
    return cases


def predict_probability(models: Sequence[torch.nn.Module], case: InputCase, *, preset: str,
                        inference: InferenceConfig, device: torch.device, precision: Precision | None = None,
                        ) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """``(probability, logit, geometry)`` of one input on its own grid: the mean probability over ``models``
    (the logit is that of the mean probability), 0 (logit -inf) outside the preset's crop."""
    image, geom = read_image(case.image, case_id=case.case_id, role="image")
    p = get_preset(preset)
    roi = None
    if case.roi is not None:
        # the cache's own reading of an ROI: on the image's grid, binary
        roi = as_binary(read_on_grid(case.roi, geom, case_id=case.case_id, ref_path=case.image, role="ROI"),
                        case_id=case.case_id, role="ROI", path=case.roi).astype(bool)
    elif p.roi_required:
        raise DataError(f"case {case.case_id}: preset {preset} needs an ROI mask ({case.image}); give --roi DIR "
                        "or a manifest with an roi column")
    pre = apply_preset(image, np.zeros(image.shape, dtype=np.uint8), roi, p, case_id=case.case_id)
    prob_crop = np.zeros(pre.image.shape, dtype=np.float64)
    for model in models:
        logits = study_logits(model, pre.image, inference, device=device,
                              dtype=None if precision is None else precision.dtype).cpu().numpy()
        prob_crop += 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    prob_crop /= len(models)
    prob = np.zeros(image.shape, dtype=np.float64)  # float64 until written: p > t exactly as on the logits
    prob[tuple(slice(a, b) for a, b in pre.crop_box)] = prob_crop
    with np.errstate(divide="ignore"):
        logit = np.log(prob) - np.log1p(-prob)
    return prob, logit, geom


def index_to_physical(index_zyx: np.ndarray, geom: Geometry) -> np.ndarray:
    """Physical (x, y, z) mm of voxel indices ``(..., 3)`` in ``[z, y, x]`` order (ITK: origin + D · (i ⊙ s))."""
    ijk = np.asarray(index_zyx, dtype=np.float64)[..., ::-1]  # (x, y, z) index
    spacing_xyz = np.asarray(geom.spacing, dtype=np.float64)[::-1]
    d = np.asarray(geom.direction, dtype=np.float64).reshape(3, 3)
    return np.asarray(geom.origin, dtype=np.float64) + (ijk * spacing_xyz) @ d.T


def lesion_rows(prob: np.ndarray, logit: np.ndarray, geom: Geometry, threshold: float) -> list[dict]:
    """One row per 26-connected component of ``prob > threshold`` (columns :data:`LESION_COLUMNS`)."""
    labels, n = label_components(prob > threshold)
    if n == 0:
        return []
    flat = labels.ravel()
    idx = np.flatnonzero(flat)
    lab = flat[idx]
    counts = np.bincount(lab, minlength=n + 1)[1:]
    coords = np.stack(np.unravel_index(idx, labels.shape), axis=1).astype(np.float64)
    centroid = np.stack([np.bincount(lab, weights=coords[:, a], minlength=n + 1)[1:] / counts for a in range(3)],
                        axis=1)
    physical = index_to_physical(centroid, geom)
    max_prob = np.full(n + 1, -np.inf)
    np.maximum.at(max_prob, lab, prob.ravel()[idx])
    max_logit = np.full(n + 1, -np.inf)
    np.maximum.at(max_logit, lab, logit.ravel()[idx])
    voxel_mm3 = float(np.prod(geom.spacing))
    diam = equivalent_diameter(counts, geom.spacing)
    return [{"id": k + 1, "voxels": int(counts[k]), "volume_mm3": round(counts[k] * voxel_mm3, 4),
             "diameter_mm": round(float(diam[k]), 4),
             "centroid_x_mm": round(float(physical[k, 0]), 4), "centroid_y_mm": round(float(physical[k, 1]), 4),
             "centroid_z_mm": round(float(physical[k, 2]), 4),
             "max_logit": float(max_logit[k + 1]) if math.isfinite(max_logit[k + 1]) else "inf",
             "max_probability": float(max_prob[k + 1])} for k in range(n)]


def output_paths(out_dir: Path, case_id: str) -> dict[str, Path]:
    return {"prob": out_dir / f"{case_id}_prob.nii.gz", "mask": out_dir / f"{case_id}_mask.nii.gz",
            "lesions": out_dir / f"{case_id}_lesions.csv"}


def write_outputs(out_dir: Path, case_id: str, prob: np.ndarray, logit: np.ndarray, geom: Geometry,
                  threshold: float) -> dict[str, Path]:
    """The three files of one case (module docstring), each written under a temporary name then renamed."""
    paths = output_paths(out_dir, case_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = {"spacing": geom.spacing, "origin": geom.origin, "direction": geom.direction}
    for key, array in (("prob", prob.astype(np.float32)), ("mask", (prob > threshold).astype(np.uint8))):
        tmp = paths[key].with_name(f".{paths[key].name[:-7]}.{os.getpid()}.tmp.nii.gz")
        try:
            write_image(array, tmp, **grid)
            os.replace(tmp, paths[key])
        finally:
            tmp.unlink(missing_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LESION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(lesion_rows(prob, logit, geom, threshold))
    write_text_atomic(paths["lesions"], text.getvalue())
    return paths

"""The phantom: a deterministic synthetic lesion-segmentation dataset, the embedded default of every study.

Each case is a ``[z, y, x]`` float32 volume (default 48 x 64 x 64 voxels, spacing (2.0, 1.0, 1.0) mm, so a
96 x 64 x 64 mm box) made of

- a smooth low-frequency background (Gaussian-filtered noise);
- an organ: a smoothly deformed ellipsoid, brighter than its surroundings, with its own soft texture and soft
  edge; it is written as the ROI mask;
- lesions, only inside the organ, never touching each other: one large (18-30 mm), 0-2 medium (6-14 mm) and
  2-4 small (2.2-5 mm nominal) per case, i.e. 5 on average and a > 10x diameter span; randomly
  rotated ellipsoids with soft edges (the mask is the inside of the ellipsoid) and a smooth intensity variation;
  **contrast grows with size** (``contrast`` = (small, large), default 0.14 -> 0.40 above the organ) so the
  small lesions are subtle: faint, few voxels, easy for an unweighted loss to neglect, but above the noise;
- distractors that are NOT in the mask: vessel-like bright tubes crossing the volume (inside and outside the
  organ) and bright blobs outside the organ, as bright as lesions;
- white plus spatially correlated Gaussian noise (``noise`` = total standard deviation).

Calibration (measured on this project's 2-core machine, 24 cases, U-Net width 0.125, Dice, 20 epochs × 50
iterations of 2×32³ patches, seed 1, validation split of 6 cases, small = diameter < 6 mm, `any` / IoU ≥ 0.3):
with the historical small-lesion contrast 0.14 a plain model found 3 % / 0 % of the small lesions (avg recall
0.43 overall), and 0.22 gave the same 3 % / 0 %: no loss can show a gain on lesions that no model sees. At
contrast 0.30 the plain model found 17 % / 5 % of them (avg recall 0.54 / 0.48, object Dice 0.73, 1.7 FP/image),
so the search spaces shipped with the project (demo, claim) use ``contrast: [0.30, 0.40]``; the default of this
function stays 0.14 so that existing phantoms regenerate byte for byte.

Case ``i`` is drawn from ``numpy.random.default_rng([seed, i])``: a case does not depend on ``n_cases``, and
the same seed gives the same bytes (SimpleITK writes no timestamps into NIfTI headers and a zero gzip mtime).
Splits: the first half train, then a quarter val, a quarter holdout (each at least one case).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from trainables.data.io import write_image
from trainables.data.manifest import ManifestRow, write_manifest
from trainables.errors import DataError

PHANTOM_VERSION = 1
DEFAULT_SHAPE = (48, 64, 64)
DEFAULT_SPACING = (2.0, 1.0, 1.0)

# lesion size classes: (min count, max count, min diameter mm, max diameter mm)
_SIZE_CLASSES = ((1, 1, 18.0, 30.0), (0, 2, 6.0, 14.0), (2, 4, 2.2, 5.0))
_MIN_LESION_VOXELS = 4


def phantom_splits(n_cases: int) -> list[str]:
    """Split of each case index: the first ~half train, then ~a quarter val, the last ~quarter holdout."""
    if n_cases < 3:
        raise DataError(f"the phantom needs at least 3 cases (one per split), got {n_cases}")
    n_val = max(1, round(n_cases / 4))
    n_hold = max(1, round(n_cases / 4))
    n_train = n_cases - n_val - n_hold
    return ["train"] * n_train + ["val"] * n_val + ["holdout"] * n_hold


def check_shape(shape) -> tuple[int, int, int]:
    """The phantom's volume size as 3 ints (z, y, x), each at least 8 voxels (the U-Net pools three times)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise DataError(f"phantom shape must be 3 sizes >= 8 voxels (z, y, x), got {shape}")
    return shape


def make_phantom(
    out: str | Path,
    *,
    n_cases: int = 12,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    contrast: tuple[float, float] = (0.14, 0.40),
    noise: float = 0.05,
    with_roi: bool = True,
    progress: bool = False,
) -> Path:
    """Write the phantom dataset into ``out`` and return the path of its ``manifest.csv``.

    Files: ``images/<id>.nii.gz`` (float32), ``masks/<id>.nii.gz`` (uint8 0/1), ``rois/<id>.nii.gz`` (uint8 organ
    mask, when ``with_roi``), ``manifest.csv`` (case_id,image,mask,split[,roi], relative paths) and
    ``phantom.json`` (the parameters and every lesion's diameter).
    """
    shape = check_shape(shape)
    splits = phantom_splits(n_cases)
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows, summary = [], []
    for i in range(n_cases):
        case_id = f"phantom_{i:03d}"
        image, mask, roi, lesions = make_phantom_case(
            seed, i, shape=shape, spacing=spacing, contrast=contrast, noise=noise
        )
        img_path = write_image(image, out / "images" / f"{case_id}.nii.gz", spacing=spacing)
        mask_path = write_image(mask, out / "masks" / f"{case_id}.nii.gz", spacing=spacing)
        roi_path = write_image(roi, out / "rois" / f"{case_id}.nii.gz", spacing=spacing) if with_roi else None
        rows.append(ManifestRow(case_id, img_path, mask_path, splits[i], roi_path))
        summary.append({"case_id": case_id, "split": splits[i], "lesions": lesions})
        if progress:
            print(f"[{i + 1}/{n_cases}] {case_id} ({splits[i]}): {len(lesions)} lesions", flush=True)
    params = {
        "version": PHANTOM_VERSION,
        "seed": seed,
        "n_cases": n_cases,
        "shape": list(shape),
        "spacing": list(spacing),
        "contrast": list(contrast),
        "noise": noise,
        "cases": summary,
    }
    (out / "phantom.json").write_text(json.dumps(params, indent=1) + "\n")
    return write_manifest(out / "manifest.csv", rows)


def make_phantom_case(
    seed: int,
    index: int,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    contrast: tuple[float, float] = (0.14, 0.40),
    noise: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """One phantom case: ``(image float32, mask uint8, roi uint8, lesions)``, arrays ``[z, y, x]``.

    ``lesions``: one dict per lesion with its centre (voxel, z y x), nominal diameter (mm), voxel count and
    contrast.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    sp = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(shape) * sp  # mm
    grid = [np.arange(n) * s for n, s in zip(shape, sp)]  # voxel centres, mm
    zz, yy, xx = np.meshgrid(*grid, indexing="ij")
    pts = np.stack([zz, yy, xx], axis=-1)  # [z, y, x, 3] mm

    # background: smooth low-frequency field
    image = 0.20 + 0.05 * _smooth_noise(rng, shape, sigma_mm=12.0, spacing=sp)

    # organ: deformed ellipsoid, soft edge, own texture
    centre = extent / 2 + rng.uniform(-0.04, 0.04, 3) * extent
    semi = extent * rng.uniform(0.33, 0.39, 3)
    rnorm = np.sqrt((((pts - centre) / semi) ** 2).sum(-1)) + 0.06 * _smooth_noise(rng, shape, 10.0, sp)
    roi = (rnorm <= 1.0).astype(np.uint8)
    organ_w = _sigmoid((1.0 - rnorm) / 0.03)
    image += organ_w * (0.22 + 0.03 * _smooth_noise(rng, shape, 3.0, sp))

    # lesions (the mask), inside the organ, not touching
    lesions: list[dict] = []
    mask = np.zeros(shape, dtype=np.uint8)
    taken: list[tuple[np.ndarray, float]] = []
    diameters = []
    for lo_n, hi_n, lo_d, hi_d in _SIZE_CLASSES:
        for _ in range(int(rng.integers(lo_n, hi_n + 1))):
            diameters.append(float(np.exp(rng.uniform(np.log(lo_d), np.log(hi_d)))))
    c_small, c_large = contrast
    for d in diameters:
        r = d / 2
        axes = r * rng.uniform(0.85, 1.15, 3)
        rot = _random_rotation(rng)
        c = _place(rng, r, centre, semi, extent, sp, taken)
        if c is None:
            continue
        edge = 0.35 + 0.05 * r  # mm, softer for larger lesions
        for _ in range(6):
            box = _box(c, 1.2 * float(axes.max()) + 4 * edge, sp, shape)
            q = _ellipsoid_norm(pts[box], c, axes, rot)
            inside = q <= 1.0
            if inside.sum() >= _MIN_LESION_VOXELS:
                break
            axes = axes * 1.15
        taken.append((c, float(axes.max())))
        t = float(np.clip((d - 4.0) / (16.0 - 4.0), 0.0, 1.0))
        con = c_small + t * (c_large - c_small)
        profile = _sigmoid((1.0 - q) * float(axes.mean()) / edge)
        variation = 1.0 + 0.15 * _smooth_noise(rng, q.shape, max(1.5, r / 2), sp)
        image[box] += con * profile * variation
        mask[box][inside] = 1
        lesions.append(
            {
                "centre_vox": [round(float(v), 2) for v in c / sp],
                "diameter_mm": round(d, 3),
                "voxels": int(inside.sum()),
                "contrast": round(con, 4),
            }
        )

    # distractors: vessel-like tubes (anywhere) and blobs outside the organ; not in the mask
    for _ in range(int(rng.integers(3, 6))):
        _add_tube(rng, image, pts, extent, sp, rng.uniform(0.25, 0.40))
    for _ in range(int(rng.integers(2, 4))):
        bc = _outside_point(rng, centre, semi, extent)
        br = rng.uniform(1.5, 4.0)
        box = _box(bc, br + 3.0, sp, shape)
        q = np.sqrt((((pts[box] - bc) / br) ** 2).sum(-1))
        image[box] += rng.uniform(0.2, 0.4) * _sigmoid((1.0 - q) * br / 0.5)

    # noise: white + spatially correlated, total std = noise
    white = rng.standard_normal(shape)
    corr = _smooth_noise(rng, shape, 1.0, sp)
    image += noise * (0.8 * white + 0.6 * corr)
    return image.astype(np.float32), mask, roi, lesions


def _smooth_noise(rng: np.random.Generator, shape, sigma_mm: float, spacing) -> np.ndarray:
    """Gaussian-filtered white noise, normalised to zero mean and unit std."""
    f = ndimage.gaussian_filter(
        rng.standard_normal(shape), sigma=np.asarray(sigma_mm) / np.asarray(spacing), mode="wrap"
    )
    f -= f.mean()
    return f / (f.std() + 1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.clip(x, -60, 60)))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _ellipsoid_norm(pts: np.ndarray, c: np.ndarray, axes: np.ndarray, rot: np.ndarray) -> np.ndarray:
    local = (pts - c) @ rot
    return np.sqrt(((local / axes) ** 2).sum(-1))


def _place(rng, r, organ_c, organ_semi, extent, sp, taken, tries: int = 200):
    """A lesion centre on a voxel centre, well inside the organ, >= 4 mm (surface gap) from other lesions."""
    for _ in range(tries):
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        c = organ_c + u * organ_semi * rng.uniform(0.0, 1.0) ** (1 / 3)
        c = np.round(c / sp) * sp
        if r > 3:
            c = c + rng.uniform(-0.3, 0.3, 3) * sp
        # inside the organ with a margin of 1.3 r (in the organ's normalised units, conservatively)
        if np.sqrt((((c - organ_c) / (organ_semi - 1.15 * r - 1.0).clip(1e-3)) ** 2).sum()) > 1.0:
            continue
        if np.any(c - 1.2 * r < sp) or np.any(c + 1.2 * r > extent - 2 * sp):
            continue
        if all(np.linalg.norm(c - oc) > 1.15 * r + 1.15 * orad + 4.0 for oc, orad in taken):
            return c
    return None


def _box(c: np.ndarray, half_mm: float, sp: np.ndarray, shape) -> tuple[slice, ...]:
    """Voxel slices covering the cube of half-size ``half_mm`` around the point ``c`` (mm), clamped."""
    lo = np.floor((c - half_mm) / sp).astype(int).clip(0)
    hi = (np.ceil((c + half_mm) / sp).astype(int) + 1).clip(None, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _add_tube(rng, image, pts, extent, sp, contrast) -> None:
    """Add a smoothly curved vessel-like tube (radius 0.6-1.5 mm) crossing the volume along one axis."""
    a = rng.uniform(0, 1, 3) * extent
    b = rng.uniform(0, 1, 3) * extent
    axis = rng.integers(0, 3)
    a[axis], b[axis] = 0.0, extent[axis]
    t = np.linspace(0, 1, 16)[:, None]
    wiggle = np.sin(np.pi * t * rng.uniform(1, 3) + rng.uniform(0, np.pi)) * rng.uniform(-6, 6, 3)
    line = a + t * (b - a) + wiggle
    radius = rng.uniform(0.6, 1.5)
    reach = radius + 2.5
    lo = np.floor((line.min(0) - reach) / sp).astype(int).clip(0)
    hi = (np.ceil((line.max(0) + reach) / sp).astype(int) + 1).clip(None, np.asarray(image.shape))
    box = tuple(slice(int(x), int(y)) for x, y in zip(lo, hi))
    local = pts[box]
    dist = np.full(local.shape[:3], np.inf)
    for p, q in zip(line[:-1], line[1:]):
        seg_box = _box((p + q) / 2, float(np.abs(q - p).max()) / 2 + reach, sp, image.shape)
        sub = tuple(
            slice(max(s.start, o.start) - o.start, min(s.stop, o.stop) - o.start)
            for s, o in zip(seg_box, box)
        )
        sp_pts = local[sub]
        seg = q - p
        s = np.clip(((sp_pts - p) @ seg) / max(seg @ seg, 1e-9), 0, 1)
        dist[sub] = np.minimum(dist[sub], np.linalg.norm(sp_pts - (p + s[..., None] * seg), axis=-1))
    image[box] += contrast * _sigmoid((radius - dist) / 0.4)


def _outside_point(rng, organ_c, organ_semi, extent) -> np.ndarray:
    for _ in range(500):
        p = rng.uniform(0.08, 0.92, 3) * extent
        rn = math.sqrt((((p - organ_c) / organ_semi) ** 2).sum())
        if 1.15 <= rn <= 1.5:
            return p
    return rng.uniform(0.05, 0.95, 3) * extent

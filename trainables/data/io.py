"""Image I/O with SimpleITK, geometry checks and small atomic-write helpers.

Axis order: every array in this package is indexed ``[z, y, x]``, as ``SimpleITK.GetArrayFromImage`` returns it.
Spacing is therefore given as ``(z, y, x)`` in mm; origin and direction stay in ITK's physical ``(x, y, z)``
order, exactly as ``SimpleITK.Image.GetOrigin()`` / ``GetDirection()`` give them.

Every error raised here is a :class:`trainables.errors.DataError` whose message names the case, the role of the
file (image, mask, roi) and the path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainables.errors import DataError
from trainables.io_utils import why_unreadable, write_text_atomic

#: file endings SimpleITK reads for us (anything else is still tried, SimpleITK decides)
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mhd", ".mha", ".nrrd", ".nhdr")

#: geometry tolerances: spacing relative, origin as a fraction of the smallest spacing, direction absolute
SPACING_RTOL = 1e-4
ORIGIN_TOL_FRACTION = 0.01
DIRECTION_ATOL = 1e-3


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a 3D image.

    shape: ``(z, y, x)`` voxels; spacing: ``(z, y, x)`` mm; origin: ``(x, y, z)`` mm (ITK order);
    direction: 9 numbers, ITK row-major direction cosines.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def z_positions(self) -> np.ndarray:
        """Physical z (mm) of every slice ``k`` (array index 0), i.e. of the voxel ``(x=0, y=0, z=k)``."""
        k = np.arange(self.shape[0], dtype=np.float64)
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        # physical = origin + D @ (index * spacing_xyz); the z row, with index = (0, 0, k)
        return self.origin[2] + d[2, 2] * k * self.spacing[0]


def _sitk():
    import SimpleITK as sitk

    return sitk


def _where(case_id: str | None, role: str) -> str:
    return f"case {case_id}: {role}" if case_id else role


def read_geometry(path: str | Path, *, case_id: str | None = None, role: str = "image") -> Geometry:
    """Read only the header of a 3D image (cheap: no voxel data is read)."""

    def header(name: str):
        reader = _sitk().ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        return reader

    reader = _read(path, header, case_id=case_id, role=role)
    return _geometry(reader, reader.GetNumberOfComponents(), path=Path(path), case_id=case_id, role=role)


def read_image(
    path: str | Path, *, case_id: str | None = None, role: str = "image", dtype: Any = None
) -> tuple[np.ndarray, Geometry]:
    """Read a 3D image: ``(array [z, y, x], geometry)``; ``dtype`` casts the array when given."""
    sitk = _sitk()
    img = _read(path, sitk.ReadImage, case_id=case_id, role=role)
    geom = _geometry(img, img.GetNumberOfComponentsPerPixel(), path=Path(path), case_id=case_id, role=role)
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 4:
        arr = arr[0]
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr, geom


def _read(path: str | Path, read, *, case_id: str | None, role: str):
    """``read(str(path))``, a SimpleITK call; a missing or unreadable file becomes a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{_where(case_id, role)} file {why_unreadable(path)}: {path}")
    try:
        return read(str(path))
    except RuntimeError as exc:
        raise DataError(f"{_where(case_id, role)} file cannot be read: {path} ({_short(exc)})") from None


def _geometry(src, n_components: int, *, path, case_id, role) -> Geometry:
    """Geometry of ``src``, a SimpleITK image or an image file reader that has read the header."""
    size, spacing, origin, direction = src.GetSize(), src.GetSpacing(), src.GetOrigin(), src.GetDirection()
    if n_components != 1:
        raise DataError(
            f"{_where(case_id, role)} file {path} has {n_components} components per voxel; "
            "expected a scalar image"
        )
    size = tuple(int(s) for s in size)
    if len(size) == 4 and size[3] == 1:  # a 3D image stored as 4D with one time point
        size, spacing, origin = size[:3], spacing[:3], origin[:3]
        d = np.asarray(direction, dtype=float).reshape(4, 4)[:3, :3]
        direction = tuple(d.ravel())
    if len(size) != 3:
        raise DataError(
            f"{_where(case_id, role)} file {path} is {len(size)}-D (size {size}); expected a 3D image"
        )
    return Geometry(
        shape=(size[2], size[1], size[0]),
        spacing=(float(spacing[2]), float(spacing[1]), float(spacing[0])),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(v) for v in direction),
    )


def write_image(
    array: np.ndarray,
    path: str | Path,
    *,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction: tuple[float, ...] | None = None,
) -> Path:
    """Write ``array [z, y, x]`` with ``spacing (z, y, x)``; format from the suffix (.nii.gz is compressed).

    SimpleITK writes no timestamp into NIfTI headers and a zero gzip mtime, so identical arrays give identical
    bytes (the phantom relies on this; a test checks it).
    """
    sitk = _sitk()
    path = Path(path)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(v) for v in direction))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), path.name.endswith(".gz"))
    return path


def check_same_grid(
    ref: Geometry,
    other: Geometry,
    *,
    case_id: str | None,
    ref_path: str | Path,
    other_path: str | Path,
    other_role: str = "mask",
) -> None:
    """Raise when ``other`` is not on the voxel grid of ``ref`` (shape, spacing, origin, direction)."""
    where = _where(case_id, other_role)
    if ref.shape != other.shape:
        raise DataError(
            f"{where} file {other_path} has shape (z, y, x) {other.shape}, but the image {ref_path} "
            f"has {ref.shape}"
        )
    if not np.allclose(ref.spacing, other.spacing, rtol=SPACING_RTOL, atol=1e-6):
        raise DataError(
            f"{where} file {other_path} has spacing (z, y, x) {_fmt(other.spacing)} mm, but the "
            f"image {ref_path} has {_fmt(ref.spacing)} mm"
        )
    tol = ORIGIN_TOL_FRACTION * min(ref.spacing)
    if not np.allclose(ref.origin, other.origin, rtol=0, atol=tol):
        raise DataError(
            f"{where} file {other_path} has origin (x, y, z) {_fmt(other.origin)} mm, but the image "
            f"{ref_path} has {_fmt(ref.origin)} mm (tolerance {tol:.3g} mm)"
        )
    if not np.allclose(ref.direction, other.direction, rtol=0, atol=DIRECTION_ATOL):
        raise DataError(
            f"{where} file {other_path} has direction {_fmt(other.direction)}, but the image "
            f"{ref_path} has {_fmt(ref.direction)}"
        )


def read_case_geometry(
    image: str | Path, others: dict[str, str | Path | None], *, case_id: str | None
) -> Geometry:
    """Headers of a case: the image's geometry, after checking that every file of ``others`` (role -> path,
    e.g. ``{"mask": ..., "roi": None}``; None is skipped) lies on its voxel grid (:func:`check_same_grid`)."""
    ref = read_geometry(image, case_id=case_id, role="image")
    for role, path in others.items():
        if path is not None:
            geom = read_geometry(path, case_id=case_id, role=role)
            check_same_grid(ref, geom, case_id=case_id, ref_path=image, other_path=path, other_role=role)
    return ref


def read_on_grid(
    path: str | Path, ref: Geometry, *, case_id: str | None, ref_path: str | Path, role: str
) -> np.ndarray:
    """Voxels of the case file ``path`` (``[z, y, x]``), after checking it lies on the grid ``ref`` of the
    image ``ref_path`` (:func:`check_same_grid`)."""
    arr, geom = read_image(path, case_id=case_id, role=role)
    check_same_grid(ref, geom, case_id=case_id, ref_path=ref_path, other_path=path, other_role=role)
    return arr


def as_binary(array: np.ndarray, *, case_id: str | None, role: str, path: str | Path) -> np.ndarray:
    """Return ``array`` as uint8 0/1; raise when it holds any value other than 0 and 1."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    values = np.unique(array)
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise DataError(
            f"{_where(case_id, role)} file {path} is not binary: values {shown}; expected only 0 and 1"
        )
    return (array != 0).astype(np.uint8)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 1, a final newline), atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _short(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__

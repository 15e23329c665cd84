"""Small helpers shared by several test modules."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative path -> sha1); {} if the folder does not exist.

    Two equal snapshots mean a failed command left the folder exactly as it was.
    """
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _xy(coords):
    return np.array([[int(v) for v in line.split(",")] for line in coords.strip().splitlines()])


def reference_consensus(info, min_readers=2) -> np.ndarray:
    """Independent rasterisation: matplotlib point-in-polygon at pixel centres; outline vertices are nodule."""
    shape, zpos = info["shape"], info["z"]
    yy, xx = np.mgrid[0 : shape[1], 0 : shape[2]]
    centres = np.c_[xx.ravel(), yy.ravel()]
    per_ann: dict[int, np.ndarray] = {}
    holes: dict[int, np.ndarray] = {}
    for ann, inclusion, z, coords in info["contours"]:
        xy = _xy(coords)
        k = int(np.argmin(np.abs(zpos - z)))
        assert abs(zpos[k] - z) < 1e-3
        inside = _mpl_path(xy).contains_points(centres).reshape(shape[1:])
        vertices = np.zeros(shape[1:], bool)
        vertices[xy[:, 1], xy[:, 0]] = True
        if inclusion:
            vol = per_ann.setdefault(ann, np.zeros(shape, bool))
            vol[k] |= inside | vertices
        else:
            vol = holes.setdefault(ann, np.zeros(shape, bool))
            vol[k] |= inside & ~vertices
    count = np.zeros(shape, np.int32)
    for ann, vol in per_ann.items():
        count += vol & ~holes.get(ann, np.zeros(shape, bool))
    return (count >= min_readers).astype(np.uint8)


def _mpl_path(xy):
    from matplotlib.path import Path as MplPath

    return MplPath(xy)

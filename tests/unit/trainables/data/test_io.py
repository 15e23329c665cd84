"""SimpleITK readers, geometry checks, manifest parsing and the presets."""

from __future__ import annotations

import numpy as np
import pytest

from trainables.data.io import (
    as_binary,
    check_same_grid,
    read_geometry,
    read_image,
    write_image,
    write_json_atomic,
)
from trainables.data.manifest import ManifestRow, read_manifest, write_manifest
from trainables.data.preprocess import apply_preset, bbox
from trainables.errors import DataError
from trainables.metrics.records import equivalent_diameter


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mhd", ".nrrd"])
def test_roundtrip_keeps_axis_order_and_spacing(tmp_path, suffix):
    arr = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    path = write_image(arr, tmp_path / f"img{suffix}", spacing=(2.5, 0.7, 0.6), origin=(1.0, 2.0, 3.0))
    back, geom = read_image(path)
    np.testing.assert_array_equal(back, arr)
    assert geom.shape == (3, 4, 5)
    np.testing.assert_allclose(geom.spacing, (2.5, 0.7, 0.6), rtol=1e-6)
    np.testing.assert_allclose(geom.origin, (1.0, 2.0, 3.0))
    assert read_geometry(path) == geom


def test_z_positions_follow_direction(tmp_path):
    arr = np.zeros((4, 2, 2), np.uint8)
    up = write_image(arr, tmp_path / "up.mhd", spacing=(2.0, 1.0, 1.0), origin=(0, 0, -10.0))
    down = write_image(
        arr,
        tmp_path / "down.mhd",
        spacing=(2.0, 1.0, 1.0),
        origin=(0, 0, -10.0),
        direction=(1, 0, 0, 0, 1, 0, 0, 0, -1),
    )
    np.testing.assert_allclose(read_geometry(up).z_positions(), [-10, -8, -6, -4])
    np.testing.assert_allclose(read_geometry(down).z_positions(), [-10, -12, -14, -16])


def test_missing_and_unreadable_files_name_case_and_path(tmp_path):
    with pytest.raises(DataError, match=r"case c1: image file not found: .*nope\.nii"):
        read_geometry(tmp_path / "nope.nii", case_id="c1")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=r"case c2: mask file cannot be read: .*bad\.nii\.gz"):
        read_image(bad, case_id="c2", role="mask")


def test_grid_checks(tmp_path):
    a = read_geometry(write_image(np.zeros((3, 4, 5), np.uint8), tmp_path / "a.nii", spacing=(2, 1, 1)))
    shape = read_geometry(write_image(np.zeros((3, 4, 6), np.uint8), tmp_path / "b.nii", spacing=(2, 1, 1)))
    spacing = read_geometry(
        write_image(np.zeros((3, 4, 5), np.uint8), tmp_path / "c.nii", spacing=(2, 1, 1.1))
    )
    origin = read_geometry(
        write_image(np.zeros((3, 4, 5), np.uint8), tmp_path / "d.nii", spacing=(2, 1, 1), origin=(0, 0, 1.0))
    )
    check_same_grid(a, a, case_id="x", ref_path="a.nii", other_path="a.nii")
    with pytest.raises(DataError, match=r"case x: mask file b\.nii has shape"):
        check_same_grid(a, shape, case_id="x", ref_path="a.nii", other_path="b.nii")
    with pytest.raises(DataError, match="spacing"):
        check_same_grid(a, spacing, case_id="x", ref_path="a.nii", other_path="c.nii")
    with pytest.raises(DataError, match="origin"):
        check_same_grid(a, origin, case_id="x", ref_path="a.nii", other_path="d.nii")


def test_as_binary():
    assert as_binary(np.array([0.0, 1.0]), case_id="c", role="mask", path="m").dtype == np.uint8
    with pytest.raises(DataError, match=r"case c: mask file m\.nii is not binary: values 0, 1, 2"):
        as_binary(np.array([0, 1, 2]), case_id="c", role="mask", path="m.nii")


def test_write_json_atomic_leaves_no_temp(tmp_path):
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _manifest(tmp_path, text: str):
    p = tmp_path / "m.csv"
    p.write_text(text)
    return p


def test_manifest_paths_relative_to_manifest_and_roundtrip(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    p = _manifest(
        sub,
        "case_id,image,mask,split\na,i/a.nii,m/a.nii,train\nb,i/b.nii,m/b.nii,val\n"
        "c,/abs/c.nii,m/c.nii,holdout\n",
    )
    rows = read_manifest(p)
    assert rows[0].image == sub / "i" / "a.nii"
    assert str(rows[2].image) == "/abs/c.nii"
    write_manifest(
        tmp_path / "again.csv", [ManifestRow("a", sub / "x.nii", sub / "y.nii", "train", sub / "r.nii")]
    )
    assert (tmp_path / "again.csv").read_text().splitlines()[1] == "a,sub/x.nii,sub/y.nii,train,sub/r.nii"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("case_id,image,split\na,x,train\n", "missing column"),
        ("case_id,image,mask,split\na,x,y,train\na,x,y,val\nb,x,y,holdout\n", "duplicate case id a"),
        ("case_id,image,mask,split\na,x,y,train\nb,x,y,\nc,x,y,holdout\n", "case b has an empty split"),
        ("case_id,image,mask,split\na,x,y,train\nb,x,y,test\n", "case b has split 'test'"),
        ("case_id,image,mask,split\na,x,y,train\nb,x,y,train\nc,x,y,holdout\n", "split 'val' has no case"),
        ("case_id,image,mask,split\n../a,x,y,train\n", "not a valid name"),
        ("case_id,image,mask,split\n", "has no case"),
    ],
)
def test_manifest_errors(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        read_manifest(_manifest(tmp_path, text))


def test_manifest_roi_required(tmp_path):
    with pytest.raises(DataError, match="no 'roi' column"):
        read_manifest(
            _manifest(tmp_path, "case_id,image,mask,split\na,x,y,train\n"),
            require_roi=True,
            required_splits=(),
        )
    with pytest.raises(DataError, match="case a has no ROI mask"):
        read_manifest(
            _manifest(tmp_path, "case_id,image,mask,split,roi\na,x,y,train,\n"),
            require_roi=True,
            required_splits=(),
        )


def test_presets():
    image = np.full((10, 10, 10), 500.0)
    image[3:6, 3:6, 3:6] = -200.0
    image[0, 0, 0] = -3000.0
    roi = np.zeros_like(image, dtype=np.uint8)
    roi[4, 4, 4] = 1
    roi[5, 5, 5] = 1
    mask = np.zeros_like(roi)
    mask[4, 4, 4] = 1
    out = apply_preset(image, mask, roi, "lits")
    assert out.crop_box == [[0, 10], [0, 10], [0, 10]]  # box + 5 clamped
    # clip to [-300, 300], -300 outside the ROI, then min-max over the crop: ROI voxels (-200) -> 1, rest -> 0
    assert out.raw_range == (-300.0, -200.0)
    assert out.image.dtype == np.float32 and out.image.min() == 0.0 and out.image.max() == 1.0
    assert out.image[4, 4, 4] == 1.0 and out.image[0, 0, 0] == 0.0
    luna = apply_preset(image, mask, roi, "luna16")
    assert luna.raw_range == (-1000.0, -200.0)
    none = apply_preset(image, mask, None, "none")
    assert none.raw_range == (-3000.0, 500.0) and none.crop_box == [[0, 10]] * 3
    with pytest.raises(DataError, match="needs an ROI"):
        apply_preset(image, mask, None, "luna16", case_id="c")
    with pytest.raises(DataError, match="case c: the ROI mask is empty"):
        apply_preset(image, mask, np.zeros_like(roi), "lits", case_id="c")


def test_bbox_and_diameters():
    m = np.zeros((20, 20, 20), bool)
    m[2:4, 10:12, 18:20] = True
    assert bbox(m) == [[2, 4], [10, 12], [18, 20]]
    assert bbox(m, 5) == [[0, 9], [5, 17], [13, 20]]
    # a sphere of volume V has diameter (6V/pi)^(1/3): 1 voxel of 2x1x1 mm
    np.testing.assert_allclose(equivalent_diameter([1], (2.0, 1.0, 1.0)), (12 / np.pi) ** (1 / 3))

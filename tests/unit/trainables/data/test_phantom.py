"""The phantom: deterministic bytes, lesion counts and sizes, splits, distractors, and the default pipeline."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from study.cli import main
from trainables.data import Cache, make_phantom, prepare_cache
from trainables.data.io import read_image
from trainables.data.manifest import read_manifest
from trainables.data.phantom import make_phantom_case, phantom_splits
from trainables.errors import DataError
from trainables.weights import label_components


def _digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    small = (24, 32, 32)
    a = _digest(make_phantom(tmp_path / "a", n_cases=3, seed=7, shape=small).parent)
    b = _digest(make_phantom(tmp_path / "b", n_cases=3, seed=7, shape=small).parent)
    c = _digest(make_phantom(tmp_path / "c", n_cases=3, seed=8, shape=small).parent)
    d = _digest(make_phantom(tmp_path / "d", n_cases=4, seed=7, shape=small).parent)
    assert a == b
    assert set(a) == set(c)
    assert all(a[k] != c[k] for k in a if k.startswith(("images/", "masks/")))
    # a case depends on (seed, index) only, not on the number of cases
    assert all(a[k] == d[k] for k in a if k.startswith(("images/", "masks/", "rois/")))


@pytest.fixture(scope="module")
def default_phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    manifest = make_phantom(root / "ds")
    return manifest, prepare_cache(manifest, root / "cache", progress=False)


def test_default_dataset(default_phantom):
    manifest, cache = default_phantom
    rows = read_manifest(manifest)
    assert len(rows) == 12
    assert [r.split for r in rows] == ["train"] * 6 + ["val"] * 3 + ["holdout"] * 3
    assert all(r.roi is not None for r in rows)
    assert manifest.read_text().splitlines()[1] == (
        "phantom_000,images/phantom_000.nii.gz,masks/phantom_000.nii.gz,train,rois/phantom_000.nii.gz"
    )
    image, geom = read_image(rows[0].image)
    assert image.dtype == np.float32 and geom.shape == (48, 64, 64)
    assert geom.spacing == pytest.approx((2.0, 1.0, 1.0))
    counts = [cache.meta(c)["n_lesions"] for c in cache.case_ids()]
    diameters = [d for c in cache.case_ids() for d in cache.meta(c)["diameters_mm"]]
    assert np.mean(counts) >= 3 and min(counts) >= 2
    assert max(diameters) / min(diameters) >= 10
    assert min(diameters) < 4.0 and max(diameters) > 25.0
    sizes = [v for c in cache.case_ids() for v in cache.meta(c)["lesion_sizes_vox"]]
    assert min(sizes) >= 4  # a few voxels, never a single one


def test_lesions_are_separate_inside_the_organ_and_small_ones_are_fainter():
    for i in range(4):
        image, mask, roi, lesions = make_phantom_case(0, i)
        labels, k = label_components(mask)
        assert k == len(lesions)  # no two lesions touch
        assert np.all(roi[mask > 0] == 1) or (mask[roi == 0].sum() <= 0.02 * mask.sum())
        contrasts = sorted((les["diameter_mm"], les["contrast"]) for les in lesions)
        assert contrasts[0][1] < contrasts[-1][1]  # the smallest lesion has the lowest contrast
    # distractors: bright voxels outside the mask (tubes, blobs) as bright as the small lesions
    image, mask, roi, lesions = make_phantom_case(0, 0)
    small = min(lesions, key=lambda les: les["diameter_mm"])
    z, y, x = (int(round(v)) for v in small["centre_vox"])
    background = np.median(image[roi > 0])
    assert image[z, y, x] > background  # brighter than the organ
    bright_outside = (image > image[z, y, x]) & (mask == 0)
    assert bright_outside.sum() > 50


def test_splits_and_errors():
    assert phantom_splits(3) == ["train", "val", "holdout"]
    assert phantom_splits(16) == ["train"] * 8 + ["val"] * 4 + ["holdout"] * 4
    with pytest.raises(DataError, match="at least 3 cases"):
        phantom_splits(2)


def test_cli_phantom_and_prepare(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "phantom",
                "--out",
                str(tmp_path / "ph"),
                "--cases",
                "3",
                "--seed",
                "1",
                "--shape",
                "24",
                "32",
                "32",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "prepare",
                "--manifest",
                str(tmp_path / "ph" / "manifest.csv"),
                "--out",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "[3/3] phantom_002 (holdout)" in err and "prepared 3 case(s)" in err
    cache = Cache(tmp_path / "cache")
    assert cache.case_ids("val") == ["phantom_001"]
    assert main(["data", "phantom", "--out", str(tmp_path / "x"), "--cases", "2"]) == 2

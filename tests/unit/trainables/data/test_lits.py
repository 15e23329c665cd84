"""LiTS layout: liver ROI, tumour mask, preset lits, the paper's / a file's splits, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from study.cli import main
from tests.helpers import snapshot
from trainables.data.io import write_image
from trainables.data.lits import paper_split, prepare_lits, read_splits_file
from trainables.errors import DataError

SHAPE = (10, 40, 40)
SPACING = (2.5, 0.7, 0.7)


def _write_case(raw, n: int, nested: str = "") -> None:
    rng = np.random.default_rng(n)
    vol = rng.normal(60, 20, SHAPE).astype(np.int16)
    vol[:, :5] = -1000  # air
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:8, 10:30, 12:32] = 1  # liver
    seg[4:6, 14:18, 15:19] = 2  # tumour 1
    seg[3, 25, 28] = 2  # tumour 2 (one voxel)
    vol[seg == 2] = 20
    folder = raw / nested if nested else raw
    write_image(vol, folder / f"volume-{n}.nii", spacing=SPACING)
    write_image(seg, folder / f"segmentation-{n}.nii", spacing=SPACING)


@pytest.fixture
def raw(tmp_path):
    raw = tmp_path / "lits"
    for n in (0, 5):
        _write_case(raw, n, "Training Batch 1")
    for n in (28, 40, 41):
        _write_case(raw, n, "Training Batch 2")
    return raw


def test_paper_split_and_preset(raw, tmp_path):
    cache = prepare_lits(raw, tmp_path / "cache", progress=False)
    assert cache.preset == "lits"
    assert cache.case_ids("holdout") == ["lits-000", "lits-005"]
    assert cache.case_ids("val") == ["lits-028"]
    assert cache.case_ids("train") == ["lits-040", "lits-041"]
    case = cache.load("lits-040")
    meta = case.meta
    # liver box [2:8, 10:30, 12:32] + 5, clamped
    assert meta["crop_box"] == [[0, 10], [5, 35], [7, 37]]
    assert case.image.shape == (10, 30, 30) and case.image.min() == 0 and case.image.max() == 1
    assert meta["n_lesions"] == 2 and sorted(meta["lesion_sizes_vox"]) == [1, 32]
    assert meta["raw_range"][0] == -300.0  # outside the liver set to -300
    assert np.all(case.image[0] == 0.0)  # slice 0 is outside the liver
    assert meta["sources"]["mask"].endswith("segmentation-40.nii")
    assert [paper_split(n) for n in (0, 27, 28, 32, 33, 130)] == ["holdout"] * 2 + ["val"] * 2 + ["train"] * 2


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_splits_file(raw, tmp_path, fmt):
    table = {"lits-000": "holdout", "5": "val", "volume-40": "train"}
    path = tmp_path / f"splits.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(table))
    else:
        path.write_text("case_id,split\n" + "".join(f"{k},{v}\n" for k, v in table.items()))
    assert read_splits_file(path) == {0: "holdout", 5: "val", 40: "train"}
    cache = prepare_lits(raw, tmp_path / "cache", splits=path, progress=False)
    assert cache.case_ids() == ["lits-000", "lits-005", "lits-040"]  # 28 and 41 are left out


def test_splits_file_errors(raw, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"lits-000": "test"}))
    with pytest.raises(DataError, match="split 'test'"):
        read_splits_file(path)
    path.write_text(json.dumps({"lits-099": "train", "0": "val", "5": "holdout"}))
    with pytest.raises(DataError, match="lits-099 have no volume"):
        prepare_lits(raw, tmp_path / "c", splits=path, progress=False)
    path.write_text(json.dumps({"0": "train", "5": "train", "28": "holdout"}))
    with pytest.raises(DataError, match="split 'val' has no case"):
        prepare_lits(raw, tmp_path / "c", splits=path, progress=False)
    with pytest.raises(DataError, match="splits file not found"):
        read_splits_file(tmp_path / "nope.csv")


def _bad_label(raw):
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:8, 10:30, 12:32] = 1
    seg[5, 20, 20] = 3
    write_image(seg, raw / "Training Batch 2" / "segmentation-41.nii", spacing=SPACING)
    return r"case lits-041: segmentation file .*segmentation-41\.nii has label\(s\) 3"


def _no_liver(raw):
    write_image(np.zeros(SHAPE, np.uint8), raw / "Training Batch 2" / "segmentation-41.nii", spacing=SPACING)
    return r"case lits-041: segmentation file .*segmentation-41\.nii has no liver"


def _missing_segmentation(raw):
    (raw / "Training Batch 2" / "segmentation-40.nii").unlink()
    return r"case lits-040: segmentation file .*segmentation-40\.nii not found"


def _spacing(raw):
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:8, 10:30, 12:32] = 1
    write_image(seg, raw / "Training Batch 2" / "segmentation-41.nii", spacing=(2.5, 0.7, 0.8))
    return r"case lits-041: segmentation file .*segmentation-41\.nii has spacing"


@pytest.mark.parametrize("breaker", [_bad_label, _no_liver, _missing_segmentation, _spacing])
def test_bad_input_exit_2_cache_unchanged(raw, tmp_path, capsys, breaker):
    out = tmp_path / "cache"
    before = snapshot(out)
    pattern = breaker(raw)
    assert main(["data", "lits", "--raw", str(raw), "--out", str(out), "--quiet"]) == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert snapshot(out) == before == {}


def test_cli_lits(raw, tmp_path, capsys):
    assert main(["data", "lits", "--raw", str(raw), "--out", str(tmp_path / "c")]) == 0
    assert "prepared 5 case(s)" in capsys.readouterr().err
    assert main(["data", "lits", "--raw", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "LiTS folder not found" in capsys.readouterr().err

"""Prediction outputs (trainables.predict): physical centroids as SimpleITK computes them, one CSV row per
component, inputs found or refused with the file named, an ROI of another grid refused."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from trainables.data.io import Geometry, write_image
from trainables.errors import DataError
from trainables.predict import (
    LESION_COLUMNS,
    InputCase,
    find_inputs,
    index_to_physical,
    lesion_rows,
    write_outputs,
)

GEOM = Geometry(shape=(6, 8, 10), spacing=(2.5, 0.7, 0.9), origin=(-10.0, 4.0, 30.0),
                direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))


def test_index_to_physical_equals_simpleitk():
    img = sitk.Image(GEOM.shape[::-1], sitk.sitkFloat32)
    img.SetSpacing(GEOM.spacing[::-1])
    img.SetOrigin(GEOM.origin)
    img.SetDirection(GEOM.direction)
    rng = np.random.default_rng(0)
    for zyx in rng.uniform(0, 5, (10, 3)):
        expected = img.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in zyx[::-1]))
        np.testing.assert_allclose(index_to_physical(zyx, GEOM), expected, atol=1e-9)


def test_lesion_rows_and_written_files(tmp_path):
    prob = np.zeros(GEOM.shape)
    prob[1:3, 1:3, 1:3] = 0.9  # 8 voxels
    prob[4, 6, 7] = 0.6  # 1 voxel
    prob[4, 0, 0] = 0.4  # below the threshold
    with np.errstate(divide="ignore"):
        logit = np.log(prob) - np.log1p(-prob)
    rows = lesion_rows(prob, logit, GEOM, 0.5)
    assert [r["voxels"] for r in rows] == [8, 1]
    assert rows[0]["volume_mm3"] == pytest.approx(8 * 2.5 * 0.7 * 0.9)
    assert rows[0]["diameter_mm"] == pytest.approx((6 * 8 * 2.5 * 0.7 * 0.9 / np.pi) ** (1 / 3), abs=1e-4)
    np.testing.assert_allclose([rows[0][f"centroid_{a}_mm"] for a in "xyz"],
                               index_to_physical(np.array([1.5, 1.5, 1.5]), GEOM), atol=1e-4)
    assert rows[1]["max_probability"] == pytest.approx(0.6)
    paths = write_outputs(tmp_path, "c1", prob, logit, GEOM, 0.5)
    with open(paths["lesions"]) as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == LESION_COLUMNS and len(table) == 2
    mask = sitk.ReadImage(str(paths["mask"]))
    assert mask.GetSpacing() == pytest.approx(GEOM.spacing[::-1], rel=1e-6)  # NIfTI stores float32
    assert mask.GetDirection() == pytest.approx(GEOM.direction, abs=1e-6)
    assert int(sitk.GetArrayFromImage(mask).sum()) == 9
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # nothing half-written left


def test_inputs_are_found_or_refused_naming_the_file(tmp_path):
    images = tmp_path / "in"
    write_image(np.zeros((4, 4, 4), np.float32), images / "a.nii.gz", spacing=(1, 1, 1))
    write_image(np.zeros((4, 4, 4), np.float32), images / "b.mha", spacing=(1, 1, 1))
    (images / "notes.txt").write_text("not an image")
    assert [c.case_id for c in find_inputs(images)] == ["a", "b"]
    with pytest.raises(DataError, match=r"--roi .*: no ROI for a\.nii\.gz"):
        find_inputs(images, tmp_path / "rois")
    with pytest.raises(DataError, match="not a folder of images or a manifest"):
        find_inputs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image"):
        find_inputs(tmp_path / "empty")


def test_an_roi_of_another_grid_or_a_vector_image_is_refused(tmp_path):
    import torch

    from trainables.config import InferenceConfig
    from trainables.predict import predict_probability

    image = write_image(np.zeros((8, 8, 8), np.float32), tmp_path / "a.nii.gz", spacing=(1, 1, 1))
    roi = write_image(np.ones((8, 8, 8), np.uint8), tmp_path / "roi.nii.gz", spacing=(2, 1, 1))
    model = torch.nn.Conv3d(1, 1, 1)
    inference = InferenceConfig(window=(8, 8, 8), stride=(8, 8, 8))
    with pytest.raises(DataError, match=r"case a: .*spacing"):
        predict_probability([model], InputCase("a", image, roi), preset="none", inference=inference, device="cpu")
    with pytest.raises(DataError, match="needs an ROI"):
        predict_probability([model], InputCase("a", image), preset="luna16", inference=inference, device="cpu")
    vec = sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3)
    sitk.WriteImage(vec, str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(DataError, match=r"rgb\.nii\.gz has 3 components"):
        predict_probability([model], InputCase("rgb", tmp_path / "rgb.nii.gz"), preset="none", inference=inference,
                            device="cpu")


def _summary(entries):
    return {"configs": {lb: {"config": cfg, "strict": {"avg_recall": s}, "luna16": {"obj_dice": d},
                             **({"calibrated": {"threshold": t}} if t else {})}
                        for lb, cfg, s, d, t in entries}}


def test_choose_models_by_configuration_name_seed_or_default():
    from study.cli.predict import best_configuration, choose_models
    from trainables.errors import UserError

    summary = _summary([("iw-focal[alpha=0.75,gamma=2]/s0", "iw-focal", 0.4, 0.5, 0.6),
                        ("iw-focal[alpha=0.75,gamma=2]/s1", "iw-focal", 0.6, 0.5, 0.8),
                        ("dice/s0", "dice", 0.5, 0.7, None), ("dice/s1", "dice", 0.3, 0.7, None)])
    assert best_configuration(summary) == "iw-focal[alpha=0.75,gamma=2]"  # mean strict 0.5 > dice's 0.4
    assert choose_models(summary, None, False) == ["iw-focal[alpha=0.75,gamma=2]/s1"]  # its best seed
    assert choose_models(summary, ["iw-focal"], True) == ["iw-focal[alpha=0.75,gamma=2]/s0",
                                                          "iw-focal[alpha=0.75,gamma=2]/s1"]
    assert choose_models(summary, ["dice/s1"], False) == ["dice/s1"]
    with pytest.raises(UserError, match="--config focal: not a configuration"):
        choose_models(summary, ["focal"], False)
    two = _summary([("focal[alpha=0.25,gamma=2]/s0", "focal", 0.1, 0.1, None),
                    ("focal[alpha=0.75,gamma=2]/s0", "focal", 0.2, 0.1, None)])
    with pytest.raises(UserError, match="2 settings of it"):
        choose_models(two, ["focal"], False)


def test_baseline_pairs_key_by_setting_and_need_one_baseline():
    from study.stages.holdout import baseline_pairs

    def c(loss, iw, seed):
        return {"loss": loss, "iw": iw, "seed": seed}

    configs = {"dice_ce[s=1]/s0": c("dice_ce", False, 0), "dice_ce[s=1]/s1": c("dice_ce", False, 1),
               "blob[l=2]/s0": c("blob", False, 0), "blob[l=2]/s1": c("blob", False, 1),
               "iw-dice_ce[s=1]/s0": c("dice_ce", True, 0), "gdl/s2": c("gdl", False, 2)}
    assert baseline_pairs(configs, "dice_ce") == [
        ("blob[l=2]", 0, "dice_ce[s=1]/s0", "blob[l=2]/s0"), ("blob[l=2]", 1, "dice_ce[s=1]/s1", "blob[l=2]/s1"),
        ("iw-dice_ce[s=1]", 0, "dice_ce[s=1]/s0", "iw-dice_ce[s=1]/s0")]  # gdl's seed 2 has no baseline twin
    configs["dice_ce[s=2]/s0"] = c("dice_ce", False, 0)  # two settings of the baseline: refused
    assert baseline_pairs(configs, "dice_ce") == []

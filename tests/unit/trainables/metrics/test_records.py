"""Per-object records from volumes (SPEC §7) and their JSON formats."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.special import expit

from trainables import weights as weights_mod
from trainables.errors import RecordsError
from trainables.metrics import (
    CaseRecords,
    load_records,
    read_records,
    save_records,
    summarize,
    volume_records,
    volume_records_multi,
)
from trainables.metrics import records as rec_mod

SP = (1.0, 1.0, 1.0)


def _split(cr: CaseRecords) -> tuple[dict, dict]:
    les = {r["obj"]: r for r in cr.records if r["is_tum"]}
    comp = {r["obj"]: r for r in cr.records if not r["is_tum"]}
    return les, comp


def _vol(shape=(12, 20, 20)):
    return np.zeros(shape, bool), np.full(shape, -4.0, np.float32)


# ---------------------------------------------------------------- basic situations


def test_hit_records_dice_confidence_and_links():
    gt, pred = _vol()
    gt[2:5, 2:5, 2:5] = True  # 27 voxels
    pred[2:5, 2:6, 2:5] = 2.0  # 36 voxels, 27 inside the lesion
    pred[3, 3, 3] = 5.0
    les, comp = _split(volume_records(pred, gt, SP))
    dice = 2 * 27 / (27 + 36)
    assert les["tum_1"]["hit_dice"] == pytest.approx(dice)
    assert les["tum_1"]["hit_logit"] == 5.0
    assert les["tum_1"]["hit_max"] == pytest.approx(expit(5.0))
    assert les["tum_1"]["hit_obj"] == "pred_1"
    assert les["tum_1"]["self_logit"] == math.inf
    assert comp["pred_1"]["hit_dice"] == pytest.approx(dice)
    assert comp["pred_1"]["self_logit"] == 5.0
    assert comp["pred_1"]["self_stat"] == pytest.approx(expit(5.0))
    assert comp["pred_1"]["hit_logit"] == math.inf and comp["pred_1"]["hit_obj"] == "tum_1"
    assert comp["pred_1"]["volume_vox"] == 36 and les["tum_1"]["volume_vox"] == 27


def test_miss_and_false_positive():
    gt, pred = _vol()
    gt[2:5, 2:5, 2:5] = True
    pred[8:10, 12:15, 12:15] = 1.5
    cr = volume_records(pred, gt, SP)
    les, comp = _split(cr)
    assert les["tum_1"]["hit_dice"] == 0.0
    assert les["tum_1"]["hit_logit"] == -math.inf and les["tum_1"]["hit_max"] == 0.0
    assert les["tum_1"]["hit_obj"] is None
    assert comp["pred_1"]["hit_dice"] == 0.0 and comp["pred_1"]["hit_logit"] == -math.inf
    assert comp["pred_1"]["self_logit"] == 1.5
    assert cr.n_voxels == gt.size and cr.n_pred_positive == 18


def test_one_component_over_two_lesions_hits_both_under_any():
    gt, pred = _vol()
    gt[2:4, 2:4, 2:4] = True  # 8 voxels
    gt[2:4, 2:4, 6:9] = True  # 12 voxels, separated by a gap of 2 columns
    pred[2:4, 2:4, 2:9] = 3.0  # 28 voxels covering both
    les, comp = _split(volume_records(pred, gt, SP))
    assert les["tum_1"]["hit_obj"] == les["tum_2"]["hit_obj"] == "pred_1"
    assert les["tum_1"]["hit_dice"] == pytest.approx(2 * 8 / (8 + 28))
    assert les["tum_2"]["hit_dice"] == pytest.approx(2 * 12 / (12 + 28))
    assert comp["pred_1"]["hit_dice"] == pytest.approx(2 * 12 / 40)  # best of the two
    assert comp["pred_1"]["hit_obj"] == "tum_2"
    assert comp["pred_1"]["n_overlap"] == 2


def test_two_components_over_one_lesion_best_dice_wins():
    gt, pred = _vol()
    gt[2:6, 2:6, 2:10] = True  # 128 voxels
    pred[2:6, 2:6, 2:4] = 6.0  # 32 voxels, more confident
    pred[2:6, 2:6, 6:10] = 2.0  # 64 voxels, better Dice
    recs = volume_records_multi(pred, gt, SP, rules={"any": ("any", None), "o2o": ("one-to-one", None)})
    les, comp = _split(recs["any"])
    big = next(k for k, r in comp.items() if r["volume_vox"] == 64)
    small = next(k for k, r in comp.items() if r["volume_vox"] == 32)
    assert les["tum_1"]["hit_obj"] == big
    assert les["tum_1"]["hit_dice"] == pytest.approx(2 * 64 / (128 + 64))
    assert les["tum_1"]["hit_logit"] == 2.0  # the confidence of the best-Dice component (SPEC §7)
    assert comp[small]["hit_dice"] == pytest.approx(2 * 32 / 160)  # touches the lesion: never an FP
    les, comp = _split(recs["o2o"])
    assert les["tum_1"]["hit_obj"] == big
    assert comp[small]["hit_dice"] == 0.0  # the duplicate is a false positive under one-to-one
    assert comp[small]["n_overlap"] == 1


def test_empty_ground_truth():
    gt, pred = _vol()
    pred[1:3, 1:3, 1:3] = 1.0
    pred[6:8, 6:8, 6:8] = 2.0
    cr = volume_records(pred, gt, SP)
    assert all(not r["is_tum"] for r in cr.records) and len(cr.records) == 2
    assert all(r["hit_dice"] == 0.0 for r in cr.records)


def test_empty_prediction():
    gt, pred = _vol()
    gt[1:3, 1:3, 1:3] = True
    cr = volume_records(pred, gt, SP)
    assert [r["is_tum"] for r in cr.records] == [True]
    assert cr.records[0]["hit_dice"] == 0.0 and cr.n_pred_positive == 0
    empty = volume_records(pred, np.zeros_like(gt), SP)
    assert empty.records == [] and empty.n_voxels == gt.size


def test_anisotropic_spacing_diameter():
    gt, pred = _vol()
    gt[1:3, 1:4, 1:5] = True  # 2 x 3 x 4 = 24 voxels
    spacing = (2.5, 0.5, 1.0)  # 1.25 mm³ per voxel
    cr = volume_records(pred, gt, spacing)
    expected = (6 * 24 * 1.25 / math.pi) ** (1 / 3)
    assert cr.records[0]["diameter"] == pytest.approx(expected)
    assert volume_records(pred, gt, SP).records[0]["diameter"] == pytest.approx((6 * 24 / math.pi) ** (1 / 3))


def test_full_connectivity_diagonal_voxels_are_one_component():
    gt, pred = _vol()
    pred[1, 1, 1] = pred[2, 2, 2] = pred[3, 3, 3] = 1.0  # corner neighbours only
    assert len(volume_records(pred, gt, SP).records) == 1


def test_probabilities_equal_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(-1, 2, (10, 12, 14)).astype(np.float32)
    gt = rng.random((10, 12, 14)) > 0.8
    a = volume_records(logits, gt, SP)
    b = volume_records(expit(logits.astype(np.float64)), gt, SP, is_logit=False)
    assert len(a.records) == len(b.records)
    for ra, rb in zip(a.records, b.records):
        assert ra["obj"] == rb["obj"] and ra["hit_dice"] == pytest.approx(rb["hit_dice"])
        assert ra["self_stat"] == pytest.approx(rb["self_stat"])
        if math.isfinite(ra["self_logit"]):
            assert ra["self_logit"] == pytest.approx(rb["self_logit"], rel=1e-6, abs=1e-6)


# ---------------------------------------------------------------- hit rules on a merged component


@pytest.fixture()
def merged():
    """One large component (1000 voxels) covering three small lesions (8 voxels each), plus one exact match."""
    gt, pred = _vol((16, 24, 24))
    for z in (2, 5, 8):
        gt[z : z + 2, 3:5, 3:5] = True
    pred[1:11, 1:11, 1:11] = 3.0
    gt[12:15, 16:19, 16:19] = True
    pred[12:15, 16:19, 16:19] = 4.0
    return pred, gt


def _summary(cr: CaseRecords) -> dict:
    return summarize({"c": cr}, "luna16", n_boot=0)


def test_rule_any_rewards_the_merged_component(merged):
    pred, gt = merged
    cr = volume_records(pred, gt, SP, hit_rule="any")
    les, comp = _split(cr)
    small = [r for r in les.values() if r["volume_vox"] == 8]
    assert all(r["hit_dice"] == pytest.approx(2 * 8 / 1008) for r in small)
    assert comp["pred_1"]["n_overlap"] == 3 and comp["pred_1"]["hit_dice"] > 0
    s = _summary(cr)
    assert s["n_detected"] == 4 and s["n_fp"] == 0


@pytest.mark.parametrize(
    "rule,threshold", [("fraction", None), ("fraction", 0.2), ("iou", None), ("iou", 0.5)]
)
def test_strict_rules_turn_the_merged_component_into_a_false_positive(merged, rule, threshold):
    pred, gt = merged
    cr = volume_records(pred, gt, SP, hit_rule=rule, hit_threshold=threshold)
    les, comp = _split(cr)
    big = next(r for r in comp.values() if r["volume_vox"] == 1000)
    exact = next(r for r in comp.values() if r["volume_vox"] == 27)
    assert big["hit_dice"] == 0.0 and big["n_overlap"] == 3
    assert exact["hit_dice"] == pytest.approx(1.0)
    assert sorted(r["hit_dice"] > 0 for r in les.values()) == [False, False, False, True]
    s = _summary(cr)
    assert s["n_detected"] == 1 and s["n_fp"] == 1


def test_fraction_rule_counts_the_share_of_the_component():
    gt, pred = _vol()
    gt[2:6, 2:6, 2:6] = True  # 64 voxels
    pred[2:6, 2:6, 4:8] = 2.0  # 64 voxels, half inside
    assert volume_records(pred, gt, SP, hit_rule="fraction", hit_threshold=0.5).records[0]["hit_dice"] > 0
    assert volume_records(pred, gt, SP, hit_rule="fraction", hit_threshold=0.51).records[0]["hit_dice"] == 0
    iou = 32 / 96
    assert volume_records(pred, gt, SP, hit_rule="iou", hit_threshold=iou).records[0]["hit_dice"] > 0
    assert volume_records(pred, gt, SP, hit_rule="iou", hit_threshold=iou + 1e-3).records[0]["hit_dice"] == 0


def test_rule_one_to_one_matches_the_merged_component_once(merged):
    pred, gt = merged
    cr = volume_records(pred, gt, SP, hit_rule="one-to-one")
    les, comp = _split(cr)
    hit_small = [k for k, r in les.items() if r["volume_vox"] == 8 and r["hit_dice"] > 0]
    assert hit_small == ["tum_1"]  # equal Dice: the lowest lesion label wins
    assert comp["pred_1"]["hit_obj"] == "tum_1"
    s = _summary(cr)
    assert s["n_detected"] == 2 and s["n_fp"] == 0
    # with an IoU floor the merged component matches nothing and becomes a false positive
    s = _summary(volume_records(pred, gt, SP, hit_rule="one-to-one", hit_threshold=0.1))
    assert s["n_detected"] == 1 and s["n_fp"] == 1


def test_multi_equals_single_rule_calls(merged):
    pred, gt = merged
    rules = {"a": ("any", None), "f": ("fraction", 0.3), "i": ("iou", None), "o": ("one-to-one", None)}
    multi = volume_records_multi(pred, gt, (1.0, 0.8, 0.8), rules=rules)
    for name, (rule, t) in rules.items():
        single = volume_records(pred, gt, (1.0, 0.8, 0.8), hit_rule=rule, hit_threshold=t)
        assert multi[name] == single


# ---------------------------------------------------------------- against a brute-force reference


def _reference_any(pred: np.ndarray, gt: np.ndarray) -> tuple[list, list]:
    """Per-object loops over full masks (slow, obvious): lesion (hit_dice, hit_logit), component (hit_dice, conf)."""
    full = np.ones((3, 3, 3), bool)
    gl, ng = ndimage.label(gt > 0.5, structure=full)
    pl, npr = ndimage.label(pred > 0, structure=full)
    conf = [float(pred[pl == j].max()) for j in range(1, npr + 1)]
    les = []
    for i in range(1, ng + 1):
        g = gl == i
        best = (0.0, -math.inf)
        for j in range(1, npr + 1):
            p = pl == j
            inter = (g & p).sum()
            if inter:
                d = 2 * inter / (g.sum() + p.sum())
                if (d, conf[j - 1]) > best:
                    best = (d, conf[j - 1])
        les.append(best)
    comp = []
    for j in range(1, npr + 1):
        p = pl == j
        d = max([2 * (p & (gl == i)).sum() / (p.sum() + (gl == i).sum()) for i in range(1, ng + 1)] or [0.0])
        comp.append((d, conf[j - 1]))
    return les, comp


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), p_gt=st.floats(0.05, 0.4), p_pred=st.floats(0.05, 0.4))
def test_records_match_brute_force(seed, p_gt, p_pred):
    rng = np.random.default_rng(seed)
    shape = (5, 7, 6)
    gt = rng.random(shape) < p_gt
    pred = np.where(rng.random(shape) < p_pred, rng.integers(1, 9, shape) / 2.0, -1.0).astype(np.float32)
    les_ref, comp_ref = _reference_any(pred, gt)
    les, comp = _split(volume_records(pred, gt, SP))
    got_les = [(les[f"tum_{i + 1}"]["hit_dice"], les[f"tum_{i + 1}"]["hit_logit"]) for i in range(len(les))]
    got_comp = [
        (comp[f"pred_{j + 1}"]["hit_dice"], comp[f"pred_{j + 1}"]["self_logit"]) for j in range(len(comp))
    ]
    assert len(got_les) == len(les_ref) and len(got_comp) == len(comp_ref)
    for (d, c), (rd, rc) in zip(got_les + got_comp, les_ref + comp_ref):
        assert d == pytest.approx(rd) and c == rc


def test_sparse_histogram_and_scipy_labelling_give_the_same_records(monkeypatch, merged):
    pred, gt = merged
    ref = volume_records(pred, gt, SP, hit_rule="one-to-one")
    monkeypatch.setattr(rec_mod, "_DENSE_HIST_LIMIT", 0)
    monkeypatch.setattr(weights_mod, "_cc3d", None)
    assert volume_records(pred, gt, SP, hit_rule="one-to-one") == ref


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"hit_rule": "nearest"}, "unknown hit rule"),
        ({"hit_rule": "any", "hit_threshold": 0.5}, "takes no hit_threshold"),
        ({"hit_rule": "iou", "hit_threshold": 1.5}, r"in \(0, 1\]"),
    ],
)
def test_bad_rule_arguments(kwargs, match):
    gt, pred = _vol()
    with pytest.raises(ValueError, match=match):
        volume_records(pred, gt, SP, **kwargs)


def test_bad_inputs():
    gt, pred = _vol()
    with pytest.raises(ValueError, match="same shape"):
        volume_records(pred[:-1], gt, SP)
    with pytest.raises(ValueError, match="spacing"):
        volume_records(pred, gt, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        volume_records(pred, gt, (1.0, 0.0, 1.0))
    pred[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        volume_records(pred, gt, SP)


# ---------------------------------------------------------------- JSON


def _recordset(merged) -> dict:
    pred, gt = merged
    return {
        "case-b": volume_records(pred, gt, (1.0, 0.7, 0.7)),
        "case-a": volume_records(pred, np.zeros_like(gt), SP),
        "empty": CaseRecords([], n_voxels=100, n_pred_positive=0),
    }


def test_save_load_roundtrip_keeps_infinities_diagnostics_and_meta(tmp_path, merged):
    rs = _recordset(merged)
    path = tmp_path / "sub" / "records.json"
    save_records(path, rs, meta={"hit_rule": ["any", None], "epoch": np.int64(3)})
    loaded, meta = read_records(path)
    assert loaded == rs
    assert meta == {"hit_rule": ["any", None], "epoch": 3}
    assert "Infinity" in path.read_text() and "NaN" not in path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["records.json"]  # no temporary left behind
    assert load_records(path) == rs


def test_save_refuses_nan(tmp_path):
    rs = {
        "c": CaseRecords(
            [
                {
                    "is_tum": False,
                    "diameter": 1.0,
                    "hit_dice": 0.0,
                    "hit_logit": -math.inf,
                    "self_logit": float("nan"),
                }
            ]
        )
    }
    with pytest.raises(RecordsError, match="self_logit is NaN"):
        save_records(tmp_path / "r.json", rs)
    assert not (tmp_path / "r.json").exists()


def test_load_authors_format(paper_records_dir):
    rs = load_records(paper_records_dir / "lits" / "dl.json")
    assert len(rs) == 28
    assert all(c.n_voxels is None and c.n_pred_positive is None for c in rs.values())
    assert sum(r["is_tum"] for c in rs.values() for r in c.records) == 138
    assert summarize(rs, n_boot=0)["pred_positive_fraction"] is None


_GOOD = '{"is_tum": true, "diameter": 3.0, "hit_dice": 0.5, "hit_logit": 2.0, "self_logit": Infinity}'


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"c": {"a": 1}}', "must map to a list of records"),
        ('{"c": [1]}', "must be a JSON object"),
        (
            '{"c": [{"is_tum": true, "diameter": 3.0, "hit_dice": 0.5, "self_logit": 1}]}',
            "missing field.*hit_logit",
        ),
        ('{"c": [' + _GOOD.replace("2.0", "NaN") + "]}", "hit_logit is NaN"),
        ('{"c": [' + _GOOD.replace("true", '"yes"') + "]}", "is_tum must be"),
        ('{"c": [' + _GOOD.replace("3.0", '"3"') + "]}", "diameter must be a number"),
        ('{"format": "iw-records", "version": 1, "cases": {"c": []}}', "'records' list"),
        ('{"format": "iw-records", "version": 9, "cases": {}}', "unsupported"),
    ],
)
def test_load_errors_name_the_file(tmp_path, text, match):
    path = tmp_path / "bad_file.json"
    path.write_text(text)
    with pytest.raises(RecordsError, match=match) as info:
        load_records(path)
    assert str(path) in str(info.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(RecordsError, match="no such file"):
        load_records(tmp_path / "nope.json")


def test_load_accepts_a_valid_minimal_record(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text('{"c": [' + _GOOD + '], "d": []}')
    rs = load_records(path)
    assert set(rs) == {"c", "d"} and rs["c"].records[0]["self_logit"] == math.inf
    assert rs["d"].records == []


def test_binarisation_threshold_and_calibration():
    """p > threshold decides the components; the calibrated threshold maximises object Dice (smallest on ties)."""
    from scipy.special import logit as to_logit

    from trainables.evaluate import calibrate_threshold
    from trainables.metrics import volume_records_multi

    gt = np.zeros((1, 8, 8), np.uint8)
    gt[0, 2:4, 2:4] = 1                      # a 4-voxel lesion
    p = np.full((1, 8, 8), 0.01)
    p[0, 2:4, 2:4] = 0.97                    # the lesion, confidently
    p[0, 1:5, 1:5][p[0, 1:5, 1:5] < 0.5] = 0.75  # a halo of 12 voxels at p = 0.75 around it
    logits = to_logit(p)
    rules = {"any": ("any", None)}
    at = {t: {"c": volume_records_multi(logits, gt, (1, 1, 1), rules=rules, threshold=t)["any"]}
          for t in (0.5, 0.7, 0.8, 0.9, 0.98)}
    dice = {t: next(r["hit_dice"] for r in recs["c"].records if r["is_tum"]) for t, recs in at.items()}
    assert dice[0.5] == dice[0.7] == pytest.approx(2 * 4 / (16 + 4))  # the halo is foreground
    assert dice[0.8] == dice[0.9] == pytest.approx(1.0)                # the halo is not
    assert dice[0.98] == 0.0                                           # nothing is foreground
    assert at[0.5]["c"].n_pred_positive == 16 and at[0.8]["c"].n_pred_positive == 4
    assert calibrate_threshold(at) == 0.8
    with pytest.raises(ValueError, match="threshold"):
        volume_records_multi(logits, gt, (1, 1, 1), rules=rules, threshold=1.0)


# ---------------------------------------------------------------- the hit-rule registry


def test_hit_rule_records_drive_validation_and_matching(merged):
    assert list(rec_mod.HIT_RULES) == ["any", "fraction", "iou", "one-to-one", "hungarian"]
    assert dict(rec_mod.DEFAULT_HIT_THRESHOLDS) == {"any": None, "fraction": 0.5, "iou": 0.3, "one-to-one": None,
                                                    "hungarian": 0.5}
    assert [r.name for r in rec_mod.HIT_RULES.values() if r.strict] == ["fraction", "iou", "one-to-one",
                                                                         "hungarian"]
    assert rec_mod.HIT_RULES["one-to-one"].threshold_optional and not rec_mod.HIT_RULES["iou"].threshold_optional
    assert rec_mod.HIT_RULES["iou"].title(0.3) == "IoU ≥ 0.3" and rec_mod.HIT_RULES["any"].title() == "any"
    # a rule added by one function and one record: only the exact-size components may hit
    rule = rec_mod.register_hit_rule(rec_mod.HitRule(
        name="toy-same-size", doc="a component of its size overlaps it", takes_threshold=False, strict=False,
        pairs=lambda ov, t: ov.size_gt[ov.pair_g] == ov.size_pred[ov.pair_p], assign=rec_mod._best_per_object))
    try:
        with pytest.raises(ValueError, match="already registered"):
            rec_mod.register_hit_rule(rule)
        with pytest.raises(ValueError, match="takes no hit_threshold"):
            volume_records(*merged, SP, hit_rule="toy-same-size", hit_threshold=0.5)
        pred, gt = merged
        les, comp = _split(volume_records(pred, gt, SP, hit_rule="toy-same-size"))
        any_les, _ = _split(volume_records(pred, gt, SP, hit_rule="any"))
        assert sum(r["hit_dice"] > 0 for r in les.values()) == 1 < sum(r["hit_dice"] > 0 for r in any_les.values())
        assert "toy-same-size" in rec_mod.DEFAULT_HIT_THRESHOLDS
    finally:
        rec_mod.HIT_RULES.pop("toy-same-size")

"""Summaries from records: luna16 FROC by hand, vectorised vs naive, bootstrap, paired bootstrap, size groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainables.errors import RecordsError
from trainables.metrics import (
    CLINICAL_CUTOFFS_MM,
    LUNA_FP_RATES,
    CaseRecords,
    froc_curve,
    size_groups,
    summarize,
)
from trainables.metrics.bootstrap import case_weights, hierarchical_bootstrap, replicate_metric
from trainables.metrics.froc import interp_rows, object_arrays

INF = math.inf


def les(hit_logit: float | None, dice: float = 0.0, diameter: float = 5.0, obj: str | None = None) -> dict:
    r = {
        "is_tum": True,
        "diameter": diameter,
        "hit_dice": dice if hit_logit is not None else 0.0,
        "hit_logit": -INF if hit_logit is None else hit_logit,
        "self_logit": INF,
    }
    if obj:
        r["obj"] = obj
    return r


def comp(self_logit: float, dice: float = 0.0, diameter: float = 3.0, hit_obj: str | None = None) -> dict:
    return {
        "is_tum": False,
        "diameter": diameter,
        "hit_dice": dice,
        "hit_logit": INF if dice > 0 else -INF,
        "self_logit": self_logit,
        "hit_obj": hit_obj,
    }


def hand_set(with_empty: bool = False) -> dict[str, CaseRecords]:
    """Worked by hand. Two images, three lesions, five false positives:

    case A: L1 hit (logit 5, Dice .8) by C1; L2 missed; false positives F1 (4) and F2 (1).
    case B: L3 hit (logit 1, Dice .6) by C3; false positives F3 (1), F4 (3) and F5 (1).

    Thresholds (distinct confidences, descending) 5, 4, 3, 1 give (FP/image, recall), FP counted at >= t:
        anchor (0, 0); t=5 (0, 1/3); t=4 (1/2, 1/3); t=3 (1, 1/3); t=1 (5/2, 2/3)   [F2, F3, F5, L3 all at 1]
    Recall at 1/8, 1/4, 1/2, 1 = 1/3; at 2: 1/3 + (2 - 1) / (5/2 - 1) * 1/3 = 5/9; at 4, 8 (flat) = 2/3.
    avg recall = (4/3 + 5/9 + 4/3) / 7 = 29/63. FP/image (all components) = 5/2. Object Dice = .7 ± .1.

    With an empty third image C the FP/image are divided by 3: points (0, 1/3), (1/3, 1/3), (2/3, 1/3),
    (5/3, 2/3); at 1: 1/3 + (1 - 2/3) / 1 * 1/3 = 4/9; at 2, 4, 8: 2/3; avg = (3/3 + 4/9 + 6/3) / 7 = 31/63.
    """
    rs = {
        "A": CaseRecords([les(5, 0.8), les(None), comp(5, 0.8), comp(4), comp(1)]),
        "B": CaseRecords([les(1, 0.6), comp(1, 0.6), comp(1), comp(3), comp(1)]),
    }
    if with_empty:
        rs["C"] = CaseRecords([])
    return rs


def test_luna16_by_hand():
    s = summarize(hand_set(), "luna16", n_boot=0)
    third = 1 / 3
    expected = [third, third, third, third, 5 / 9, 2 * third, 2 * third]
    assert [s["recall_at"][r] for r in LUNA_FP_RATES] == pytest.approx(expected)
    assert s["avg_recall"] == pytest.approx(29 / 63)
    assert s["froc"]["fps"] == pytest.approx([0, 0, 0.5, 1, 2.5])
    assert s["froc"]["recall"] == pytest.approx([0, third, third, third, 2 * third])
    assert s["fp_per_image"] == 2.5 and s["n_images"] == 2 and s["n_lesions"] == 3 and s["n_fp"] == 5
    assert s["obj_dice"] == pytest.approx(0.7) and s["obj_dice_std"] == pytest.approx(0.1)
    assert s["avg_recall_ci_low"] is None and s["froc_band"] is None  # n_boot=0


def test_luna16_counts_empty_images_in_the_denominator():
    s = summarize(hand_set(with_empty=True), "luna16", n_boot=0)
    assert s["recall_at"][1.0] == pytest.approx(4 / 9)
    assert s["avg_recall"] == pytest.approx(31 / 63)
    assert s["fp_per_image"] == pytest.approx(5 / 3) and s["n_images"] == 3


def test_froc_curve_matches_summary_and_is_monotone():
    fps, recall = froc_curve(hand_set())
    assert fps.tolist() == pytest.approx([0, 0, 0.5, 1, 2.5]) and recall[-1] == pytest.approx(2 / 3)
    assert np.all(np.diff(fps) >= 0) and np.all(np.diff(recall) >= 0)
    fps_b, recall_b = froc_curve(hand_set(), case_ids=["B"])
    assert fps_b.tolist() == pytest.approx([0, 1, 3]) and recall_b.tolist() == pytest.approx([0, 0, 1])
    with pytest.raises(RecordsError, match="not in the record set"):
        froc_curve(hand_set(), case_ids=["Z"])


def test_undefined_values_are_none():
    s = summarize({"a": CaseRecords([comp(2.0)]), "b": CaseRecords([])}, "luna16", n_boot=50)
    assert s["avg_recall"] is None and s["obj_dice"] is None and s["avg_recall_ci_low"] is None
    assert s["fp_per_image"] == 0.5
    s = summarize({"a": CaseRecords([les(None)])}, "luna16", n_boot=20)
    assert s["avg_recall"] == 0 and s["obj_dice"] is None
    with pytest.raises(RecordsError, match="no cases"):
        summarize({})
    with pytest.raises(ValueError, match="unknown protocol"):
        summarize(hand_set(), "froc7")


def test_pred_positive_fraction_over_images_with_diagnostics():
    rs = hand_set()
    rs["A"].n_voxels, rs["A"].n_pred_positive = 1000, 30
    rs["B"].n_voxels, rs["B"].n_pred_positive = 3000, 10
    assert summarize(rs, n_boot=0)["pred_positive_fraction"] == pytest.approx(40 / 4000)
    rs["B"].n_voxels = None
    assert summarize(rs, n_boot=0)["pred_positive_fraction"] == pytest.approx(30 / 1000)


# ---------------------------------------------------------------- vectorised vs naive


def naive_luna16(rs: dict[str, CaseRecords]) -> float:
    """Per-threshold loop over the records: the luna16 definition read literally."""
    recs = [r for c in rs.values() for r in c.records]
    n_les = sum(r["is_tum"] for r in recs)
    conf = {r["hit_logit"] for r in recs if r["is_tum"] and r["hit_dice"] > 0}
    conf |= {r["self_logit"] for r in recs if not r["is_tum"] and r["hit_dice"] <= 0}
    fps, recall = [0.0], [0.0]
    for t in sorted(conf, reverse=True):
        tp = sum(1 for r in recs if r["is_tum"] and r["hit_dice"] > 0 and r["hit_logit"] >= t)
        fp = sum(1 for r in recs if not r["is_tum"] and r["hit_dice"] <= 0 and r["self_logit"] >= t)
        fps.append(fp / len(rs))
        recall.append(tp / n_les)
    return float(np.mean(np.interp(LUNA_FP_RATES, fps, recall)))


@st.composite
def recordsets(draw):
    n_cases = draw(st.integers(1, 6))
    levels = st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0])  # few values: many ties
    out = {}
    for c in range(n_cases):
        recs = [les(draw(st.one_of(st.none(), levels)), 0.5) for _ in range(draw(st.integers(0, 3)))]
        recs += [comp(draw(levels)) for _ in range(draw(st.integers(0, 6)))]
        out[f"c{c}"] = CaseRecords(recs)
    return out


@settings(max_examples=60, deadline=None)
@given(rs=recordsets())
def test_vectorised_luna16_equals_naive_loop(rs):
    s = summarize(rs, "luna16", n_boot=0)
    if s["n_lesions"] == 0:
        assert s["avg_recall"] is None
    else:
        assert s["avg_recall"] == pytest.approx(naive_luna16(rs), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.lists(st.tuples(st.integers(0, 6), st.floats(0, 1)), min_size=1, max_size=8),
        min_size=1,
        max_size=5,
    ),
    targets=st.lists(
        st.sampled_from([0, 0.5, 1, 1.5, 2, 3, 7, 9]) | st.floats(0, 10), min_size=1, max_size=6
    ),
)
def test_interp_rows_equals_np_interp(data, targets):
    n = max(len(r) for r in data)
    xs, ys = [], []
    for row in data:
        row = row + [row[-1]] * (n - len(row))
        x = np.concatenate([[0.0], np.cumsum([a for a, _ in row]) / 2.0])  # non-decreasing, with ties
        y = np.concatenate([[0.0], np.cumsum([b for _, b in row])])
        xs.append(x)
        ys.append(y)
    got = interp_rows(np.array(xs), np.array(ys), targets)
    for r in range(len(xs)):
        assert got[r] == pytest.approx(np.interp(targets, xs[r], ys[r]), abs=1e-12)


# ---------------------------------------------------------------- bootstrap


def random_set(n_cases: int = 40, seed: int = 0, detect: float = 0.6) -> dict[str, CaseRecords]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_cases):
        recs = [
            les(
                float(rng.normal(3, 1)) if rng.random() < detect else None,
                float(rng.uniform(0.2, 0.9)),
                diameter=float(rng.uniform(2, 25)),
                obj=f"tum_{k}",
            )
            for k in range(int(rng.integers(0, 3)))
        ]
        recs += [
            comp(float(rng.exponential(2)), diameter=float(rng.uniform(1, 20))) for _ in range(rng.poisson(3))
        ]
        out[f"case{i:03d}"] = CaseRecords(recs)
    return out


def test_bootstrap_is_deterministic_and_brackets_the_estimate():
    rs = random_set()
    a = summarize(rs, n_boot=300, seed=7)
    b = summarize(rs, n_boot=300, seed=7)
    c = summarize(rs, n_boot=300, seed=8)
    assert (a["avg_recall_ci_low"], a["avg_recall_ci_high"]) == (
        b["avg_recall_ci_low"],
        b["avg_recall_ci_high"],
    )
    assert (a["avg_recall_ci_low"], a["avg_recall_ci_high"]) != (
        c["avg_recall_ci_low"],
        c["avg_recall_ci_high"],
    )
    assert a["avg_recall_ci_low"] < a["avg_recall"] < a["avg_recall_ci_high"]
    assert a["obj_dice_ci_low"] < a["obj_dice"] < a["obj_dice_ci_high"]
    assert a["avg_recall_std"] > 0 and a["n_boot_valid"] == 300
    band = a["froc_band"]
    assert len(band["fps_grid"]) == len(band["lo"]) == len(band["hi"]) == len(band["mid"])
    assert np.all(np.array(band["lo"]) <= np.array(band["hi"]))


def test_a_replicate_equals_the_summary_of_the_resampled_cases():
    rs = random_set(12, seed=3)
    objs = object_arrays(rs)
    w = case_weights(objs.n_cases, 5, np.random.default_rng(1))
    reps = replicate_metric(objs, w, "avg_recall")
    dice = replicate_metric(objs, w, "obj_dice")
    for r in range(5):
        resampled = {
            f"{cid}#{k}": rs[cid] for cid, m in zip(objs.case_ids, w[r].astype(int)) for k in range(m)
        }
        s = summarize(resampled, n_boot=0)
        assert reps[r] == pytest.approx(s["avg_recall"], abs=1e-12)
        assert dice[r] == pytest.approx(s["obj_dice"], abs=1e-12)


def test_subsampling_option_draws_distinct_cases_and_uses_their_count():
    w = case_weights(10, 50, np.random.default_rng(0), subsample=0.8)
    assert np.all(w.sum(axis=1) == 8) and set(np.unique(w)) <= {0.0, 1.0}
    s = summarize(random_set(), n_boot=100, subsample=0.8)
    assert s["resampling"] == "subsample-0.8"
    assert s["avg_recall_ci_low"] <= s["avg_recall_ci_high"]


def test_one_pair_bootstrap_of_a_set_with_itself_is_zero():
    """With one (a, b) pair the hierarchical bootstrap is the paired case-level bootstrap."""
    rs = random_set()
    out = hierarchical_bootstrap([(rs, rs)], n_boot=200)
    assert out["delta"] == 0 and out["ci_low"] == 0 and out["ci_high"] == 0 and out["per_seed"] == [0.0]


def test_one_pair_bootstrap_detects_a_better_configuration():
    a = random_set(seed=5, detect=0.3)
    b = {
        cid: CaseRecords(
            [
                dict(r, hit_logit=max(r["hit_logit"], 9.0), hit_dice=max(r["hit_dice"], 0.5))
                if r["is_tum"]
                else r
                for r in c.records
            ]
        )
        for cid, c in a.items()
    }  # b finds them all
    out = hierarchical_bootstrap([(a, b)], n_boot=300, seed=1)
    sa, sb = summarize(a, n_boot=0), summarize(b, n_boot=0)
    assert out["delta"] == pytest.approx(sb["avg_recall"] - sa["avg_recall"])
    assert out["delta"] > 0 and out["ci_low"] > 0
    assert hierarchical_bootstrap([(a, b)], n_boot=300, seed=1) == out
    d = hierarchical_bootstrap([(a, b)], metric="obj_dice", n_boot=100)
    assert d["delta"] == pytest.approx(sb["obj_dice"] - sa["obj_dice"])
    f = hierarchical_bootstrap([(a, b)], metric="fp_per_image", n_boot=100)
    assert f["delta"] == pytest.approx(sb["fp_per_image"] - sa["fp_per_image"])


def test_one_pair_bootstrap_needs_the_same_cases():
    a = random_set(5)
    b = dict(a)
    b["other"] = b.pop("case000")
    with pytest.raises(RecordsError, match="other cases than pair 0"):
        hierarchical_bootstrap([(a, b)])
    with pytest.raises(ValueError, match="unknown metric"):
        hierarchical_bootstrap([(a, a)], metric="dice")


# ---------------------------------------------------------------- size groups


def groups_set() -> dict[str, CaseRecords]:
    """Case A: small lesion (5 mm) hit by a 4 mm component, large lesion (15 mm) hit by a 14 mm component,
    false positives of 3 mm (logit 2) and 12 mm (logit 1). Case B: one small lesion missed. Case C: empty."""
    return {
        "A": CaseRecords(
            [
                les(4.0, 0.7, diameter=5.0, obj="tum_1"),
                les(3.0, 0.9, diameter=15.0, obj="tum_2"),
                comp(4.0, 0.7, diameter=4.0, hit_obj="tum_1"),
                comp(3.0, 0.9, diameter=14.0, hit_obj="tum_2"),
                comp(2.0, diameter=3.0),
                comp(1.0, diameter=12.0),
            ]
        ),
        "B": CaseRecords([les(None, diameter=6.0, obj="tum_1")]),
        "C": CaseRecords([]),
    }


def test_size_groups_clinical_cutoff():
    g = size_groups(groups_set(), cutoffs_mm=CLINICAL_CUTOFFS_MM["luna16"], n_boot=0)
    assert list(g) == ["<10 mm", ">=10 mm"]
    small, large = g["<10 mm"], g[">=10 mm"]
    assert small["bounds_mm"] == [None, 10.0] and large["bounds_mm"] == [10.0, None]
    assert small["n_lesions"] == 2 and large["n_lesions"] == 1
    # each group keeps every image in the denominator and the false positive of its own size
    assert small["n_images"] == large["n_images"] == 3
    assert small["n_fp"] == 1 and large["n_fp"] == 1
    assert small["fp_per_image"] == pytest.approx(1 / 3)
    # small: L(4) detected, L missed; FP at 2 -> points (0, 1/2), (1/3, 1/2): recall 1/2 everywhere
    assert small["avg_recall"] == pytest.approx(0.5)
    assert large["avg_recall"] == pytest.approx(1.0) and large["obj_dice"] == pytest.approx(0.9)


def test_size_groups_terciles_and_several_cutoffs():
    rs = random_set(30, seed=2)
    diam = [r["diameter"] for c in rs.values() for r in c.records if r["is_tum"]]
    g = size_groups(rs, terciles=True, n_boot=0)
    q1, q2 = np.quantile(diam, [1 / 3, 2 / 3])
    assert list(g) == ["small", "medium", "large"]
    assert g["small"]["bounds_mm"] == [None, pytest.approx(q1)] and g["large"]["bounds_mm"] == [
        pytest.approx(q2),
        None,
    ]
    assert sum(x["n_lesions"] for x in g.values()) == len(diam)
    fp_total = summarize(rs, n_boot=0)["n_fp"]
    assert sum(x["n_fp"] for x in g.values()) == fp_total  # each false positive in exactly one group
    g3 = size_groups(rs, cutoffs_mm=[5, 10], n_boot=0)
    assert list(g3) == ["<5 mm", "5-10 mm", ">=10 mm"]
    with pytest.raises(ValueError, match="either cutoffs_mm or terciles"):
        size_groups(rs)


def test_size_groups_paper2020_keep_the_whole_file_denominator(paper_records_dir):
    from trainables.metrics import load_records

    rs = load_records(paper_records_dir / "lits" / "dl.json")
    whole = summarize(rs, "paper2020")
    g = size_groups(rs, cutoffs_mm=CLINICAL_CUTOFFS_MM["lits"], protocol="paper2020")
    assert all(x["n_images"] == whole["n_images"] for x in g.values())
    assert sum(x["n_lesions"] for x in g.values()) == whole["n_lesions"]
    assert g["<12 mm"]["avg_recall"] < g[">=12 mm"]["avg_recall"]  # small lesions are harder

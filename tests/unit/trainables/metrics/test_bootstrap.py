"""The verdict's statistic (SPEC §9): a hierarchical bootstrap over seeds, then cases, of iw − plain.

Tested on simulated records with a known answer: the 95 % interval covers the true difference in about 95 % of
repetitions, and identical inputs give exactly 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from trainables.errors import RecordsError
from trainables.metrics import CaseRecords
from trainables.metrics.bootstrap import hierarchical_bootstrap

INF = float("inf")


def _lesion(hit: bool) -> dict:
    return {"is_tum": True, "diameter": 5.0, "hit_dice": 0.8 if hit else 0.0,
            "hit_logit": 3.0 if hit else -INF, "self_logit": INF}


def _fp() -> dict:
    return {"is_tum": False, "diameter": 3.0, "hit_dice": 0.0, "hit_logit": -INF, "self_logit": 1.0,
            "hit_obj": None}


def _records(detect_p: np.ndarray, n_fp: np.ndarray, rng) -> dict[str, CaseRecords]:
    """One record set: case c has 5 lesions, each found with probability detect_p[c], and n_fp[c] false
    positives whose confidence is below every hit (so avg recall = the fraction of lesions found)."""
    out = {}
    for c, (p, k) in enumerate(zip(detect_p, n_fp)):
        recs = [_lesion(bool(h)) for h in rng.random(5) < np.clip(p, 0, 1)] + [_fp() for _ in range(int(k))]
        out[f"case{c:02d}"] = CaseRecords(recs)
    return out


def _study(rng, *, n_seeds: int, n_cases: int, effect: float):
    """A simulated study: plain detects 40 % of lesions, iw 40 % + ``effect``; seeds and cases vary."""
    case_effect = rng.normal(0, 0.1, n_cases)  # some cases are harder, for both arms alike
    pairs = []
    for _ in range(n_seeds):
        seed_plain, seed_iw = rng.normal(0, 0.03, 2)  # the luck of one training run
        plain = _records(0.4 + seed_plain + case_effect, np.zeros(n_cases), rng)
        iw = _records(0.4 + effect + seed_iw + case_effect, np.zeros(n_cases), rng)
        pairs.append((plain, iw))
    return pairs


def test_the_interval_covers_a_known_effect_about_95_percent_of_the_time():
    rng = np.random.default_rng(2026)
    effect, reps, covered, centres = 0.1, 160, 0, []
    for r in range(reps):
        res = hierarchical_bootstrap(_study(rng, n_seeds=5, n_cases=12, effect=effect), metric="avg_recall",
                                     n_boot=300, seed=r)
        covered += res["ci_low"] <= effect <= res["ci_high"]
        centres.append(res["delta"])
    print(f"coverage of the 95 % interval: {covered}/{reps}; mean estimate {np.mean(centres):.3f} (true {effect})")
    assert 0.88 <= covered / reps <= 0.99, covered / reps
    assert np.mean(centres) == pytest.approx(effect, abs=0.02)  # the estimate is unbiased


def test_identical_inputs_give_zero_and_one_seed_cannot_exclude_much():
    rng = np.random.default_rng(1)
    pairs = _study(rng, n_seeds=3, n_cases=10, effect=0.0)
    same = [(a, a) for a, _ in pairs]
    for metric in ("avg_recall", "obj_dice", "fp_per_image"):
        res = hierarchical_bootstrap(same, metric=metric, n_boot=200)
        assert res["delta"] == 0 and res["ci_low"] == 0 and res["ci_high"] == 0, metric
        assert res["per_seed"] == [0.0, 0.0, 0.0]
    # the per-seed values are the per-seed differences on all cases, and the estimate is their mean
    res = hierarchical_bootstrap(pairs, metric="avg_recall", n_boot=200)
    assert res["delta"] == pytest.approx(np.mean(res["per_seed"]))
    assert res["n_seeds"] == 3 and res["n_cases"] == 10


def test_fp_per_image_difference_is_exact_on_a_hand_case():
    rng = np.random.default_rng(0)
    plain = _records(np.full(4, 0.5), np.array([0, 1, 0, 1]), rng)   # 2 FPs on 4 images: 0.5 FP/image
    iw = _records(np.full(4, 0.5), np.array([3, 3, 2, 0]), rng)      # 8 FPs: 2 FP/image
    res = hierarchical_bootstrap([(plain, iw)], metric="fp_per_image", n_boot=500)
    assert res["delta"] == pytest.approx(1.5) and res["per_seed"] == [pytest.approx(1.5)]
    assert res["ci_low"] < 1.5 < res["ci_high"]  # cases resampled: the interval has width


def test_record_sets_of_different_cases_are_refused():
    rng = np.random.default_rng(0)
    a = _records(np.full(3, 0.5), np.zeros(3), rng)
    b = {**a, "extra": CaseRecords([])}
    with pytest.raises(RecordsError, match="other cases"):
        hierarchical_bootstrap([(a, b)], metric="avg_recall", n_boot=10)
    with pytest.raises(RecordsError, match="no"):
        hierarchical_bootstrap([], metric="avg_recall", n_boot=10)

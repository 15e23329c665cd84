"""Cross-checks of the per-object records (SPEC §7, §9) against two peer libraries.

**panoptica 2.1.7**, run in a venv of its own (it pins numpy < 2.3 and cc3d < 4, which the product does not:
``tests/peers``), fed the cases' masks through a file (semantic input -> ``ConnectedComponentsInstanceApproximator`` with cc3d, 26-connectivity
like ours -> a matcher -> per-instance Dice):

* ``NaiveThresholdMatching(IOU, t)`` is a greedy matcher: pairs sorted by IoU (best first), each reference and
  each prediction matched at most once, score ``>= t`` by default (``> t`` only with ``strict_threshold=True``).
  Our ``"one-to-one"`` rule is greedy by Dice, which orders the pairs as IoU does (Dice = 2 IoU / (1 + IoU)),
  and also uses ``>=``. So they agree per case at any threshold (up to exact ties of IoU between two pairs, which
  the random data below does not produce); at t = 0.5 every allowed pair is isolated (see below), so every
  matcher agrees there.
* ``MaxBipartiteMatching(IOU, t)`` is ``linear_sum_assignment`` on cost ``1 - IoU`` for pairs with IoU ``>= t``
  and ``1 + 1e-6`` elsewhere, keeping assigned entries of cost < 1. Our ``"hungarian"`` rule solves the same
  problem with cost 1 for pairs below the threshold: both maximise the sum of IoU over the one-to-one matchings
  of allowed pairs; panoptica's extra 1e-6 only breaks near-exact ties toward more matches.
* TP / FP / FN: panoptica's ``tp``, ``fp = n_pred - tp``, ``fn = n_ref - tp``. Ours: lesions with a
  ``hit_obj`` / lesions without / components without ``hit_obj`` (under a one-to-one rule an unmatched component
  is a false positive even if it touches a lesion).

**picai_eval 1.4.13** (``evaluate_case`` on a detection map where every predicted component carries its max
probability; ground truth and candidates labelled with 26-connectivity like ours):

* Matching: IoU zeroed below ``min_overlap``, +1 on the remaining entries, ``linear_sum_assignment(maximize=True)``:
  it maximises ``#matches + sum of IoU``, ours ``sum of IoU`` only. The two coincide (provably) on a case whose
  minimum-cost matching M* already has the maximum cardinality nu of the allowed-pair graph: every matching M has
  ``|M| <= nu = |M*|`` and ``IoU(M) <= IoU(M*)``. Elsewhere picai finds at least as many matches (``TP_picai >=
  TP_ours`` always, since M* beats any matching with fewer matches on picai's objective too) and can find more:
  the "cardinality trap" case below has two weak matches (IoU 0.18 + 0.23) against one stronger one (0.43).
  At ``min_overlap >= 0.5`` the allowed pairs are disjoint (two components with IoU >= 0.5 with one lesion
  would have to tile it, hence be connected), so every rule coincides on every case.
* FP, ``allow_unmatched_candidates_with_minimal_overlap=False``: every unmatched candidate is FP, as under our
  one-to-one rules (equal when the matchings coincide). With the default (True), a candidate with IoU >= min to
  some lesion is never FP, matched or not: that is exactly our ``"iou"`` rule's FP (a component is FP iff it has
  IoU >= t with no lesion), whatever the assignment, so it is compared on every case.
* picai's IoU carries an epsilon ((inter + 1e-8) / (union + 1e-8)); harmless here (no pair within 1e-8 of a
  threshold other than the exact 0.5 one, which passes either way).
* FROC: picai's lesion TPR / FPR (FP per case) over its thresholds (the unique confidences, descending, then 0
  from the FN rows, whose point picai overwrites with TP[-2] / inf) against our ``froc_curve`` (anchor (0, 0),
  one point per distinct confidence): compared point by point, less picai's last point and our anchor, on the
  cases where the matchings coincide.

No expected number is hard-coded: every assertion compares with the peer's own output (or checks a property of
the data, e.g. that it contains cases where the rules differ, so that the comparisons can fail).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from trainables.metrics import CaseRecords, froc_curve, volume_records_multi

picai_eval = pytest.importorskip("picai_eval")

from picai_eval.eval import evaluate_case  # noqa: E402
from picai_eval.metrics import Metrics  # noqa: E402

SHAPE = (32, 32, 32)
SPACING = (1.0, 1.0, 1.0)
N_RANDOM = 20
STRUCT26 = np.ones((3, 3, 3), dtype=bool)
#: name -> (rule, hit_threshold) of the records computed for every case
RULES = {
    "o2o@0.5": ("one-to-one", 0.5),
    "o2o@0.1": ("one-to-one", 0.1),
    "hun@0.5": ("hungarian", 0.5),
    "hun@0.3": ("hungarian", 0.3),
    "hun@0.1": ("hungarian", 0.1),
    "iou@0.5": ("iou", 0.5),
    "iou@0.3": ("iou", 0.3),
    "iou@0.1": ("iou", 0.1),
    "any": ("any", None),
}


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Case:
    name: str
    gt: np.ndarray  # bool
    prob: np.ndarray  # float32 probabilities, foreground = p > 0.5
    records: dict[str, CaseRecords]

    @property
    def pred(self) -> np.ndarray:
        return self.prob > 0.5


_GRID = np.indices(SHAPE, dtype=np.float64)


def _ellipsoid(center, radii) -> np.ndarray:
    c = np.asarray(center, dtype=np.float64).reshape(3, 1, 1, 1)
    r = np.asarray(radii, dtype=np.float64).reshape(3, 1, 1, 1)
    return (((_GRID - c) / r) ** 2).sum(axis=0) <= 1.0


def _tube(a, b, radius: float) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(3, 1, 1, 1)
    b = np.asarray(b, dtype=np.float64).reshape(3, 1, 1, 1)
    ab = b - a
    t = np.clip(((_GRID - a) * ab).sum(axis=0) / max(float((ab**2).sum()), 1e-9), 0.0, 1.0)
    return (((_GRID - (a + t * ab)) ** 2).sum(axis=0)) <= radius**2


def _random_masks(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Lesions = ellipsoids; prediction per lesion: copy, shift, rescale, dilation, erosion, split in two by a
    slab (two components on one lesion), small partial blob, miss, or a bridge to the next lesion (one component
    on two lesions); plus false-positive blobs anywhere (some touch lesions)."""
    gt = np.zeros(SHAPE, dtype=bool)
    pred = np.zeros(SHAPE, dtype=bool)
    lesions = []
    for _ in range(int(rng.integers(2, 6))):
        c, r = rng.uniform(5.0, 27.0, 3), rng.uniform(1.5, 5.0, 3)
        gt |= _ellipsoid(c, r)
        lesions.append((c, r))
    modes = ["same", "shift", "scale", "dilate", "erode", "split", "split", "partial", "miss", "bridge"]
    for i, (c, r) in enumerate(lesions):
        mode = modes[int(rng.integers(len(modes)))]
        if mode == "same":
            pred |= _ellipsoid(c, r)
        elif mode == "shift":
            pred |= _ellipsoid(c + rng.integers(-3, 4, 3), r)
        elif mode == "scale":
            pred |= _ellipsoid(c + rng.normal(0.0, 0.7, 3), r * rng.uniform(0.6, 1.5, 3))
        elif mode == "dilate":
            pred |= ndimage.binary_dilation(_ellipsoid(c, r), STRUCT26, iterations=int(rng.integers(1, 3)))
        elif mode == "erode":
            pred |= ndimage.binary_erosion(_ellipsoid(c, r * 1.2))
        elif mode == "split":
            blob = _ellipsoid(c + rng.normal(0.0, 0.5, 3), r * rng.uniform(0.9, 1.3, 3))
            axis, width = int(rng.integers(3)), int(rng.integers(1, 3))
            at = int(round(c[axis] + rng.uniform(-0.5, 0.5) * r[axis]))
            slab = np.zeros(SHAPE, dtype=bool)
            index = [slice(None)] * 3
            index[axis] = slice(max(at, 0), max(at + width, 0))
            slab[tuple(index)] = True
            pred |= blob & ~slab
        elif mode == "partial":
            pred |= _ellipsoid(
                c + r * rng.uniform(-0.8, 0.8, 3), np.maximum(r * rng.uniform(0.3, 0.6, 3), 1.0)
            )
        elif mode == "bridge":
            c2, r2 = lesions[(i + 1) % len(lesions)]
            pred |= _ellipsoid(c, r * 0.9) | _ellipsoid(c2, r2 * 0.9) | _tube(c, c2, 1.2)
        # "miss": nothing
    for _ in range(int(rng.integers(0, 4))):
        pred |= _ellipsoid(rng.uniform(2.0, 30.0, 3), rng.uniform(1.0, 2.5, 3))
    if not pred.any():
        pred |= _ellipsoid(rng.uniform(2.0, 30.0, 3), rng.uniform(1.0, 2.5, 3))
    return gt, pred


def _box(x0: int, x1: int, yz: tuple[int, int] = (10, 16)) -> np.ndarray:
    m = np.zeros(SHAPE, dtype=bool)
    m[x0:x1, yz[0] : yz[1], yz[0] : yz[1]] = True
    return m


def _constructed_masks() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Boxes of 6 x 6 voxels in (y, z) along x, each with an isolated false positive.

    * greedy trap: lesions A = x[4, 14), B = x[15, 21); components X = x[8, 18) (over the gap: on both lesions),
      Y = x[2, 7). IoU A-X 6/14, A-Y 3/12, B-X 3/13: greedy takes A-X alone, the optimum A-Y + B-X.
    * cardinality trap: as above with Y = x[3, 6): IoU A-Y 2/11, so A-X alone (0.43) beats A-Y + B-X (0.41) on
      the sum of IoU (ours, panoptica) while picai's +1 per match prefers the two matches.
    * exact half: lesion x[4, 10), component x[6, 12): IoU exactly 4/8 (>= vs > at 0.5).
    """
    fp = _box(24, 28, (24, 28))
    a, b = _box(4, 14), _box(15, 21)
    return {
        "greedy-trap": (a | b, _box(8, 18) | _box(2, 7) | fp),
        "cardinality-trap": (a | b, _box(8, 18) | _box(3, 6) | fp),
        "exact-half": (_box(4, 10), _box(6, 12) | fp),
    }


def _probabilities(pred: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per component a peak in (0.55, 0.99), voxels in (0.5, peak]; background below 0.45 (float32)."""
    lab, n = ndimage.label(pred, structure=STRUCT26)
    peak = np.r_[0.0, rng.uniform(0.55, 0.99, n)]
    fg = 0.5 + (peak[lab] - 0.5) * rng.uniform(0.1, 1.0, SHAPE)
    return np.where(pred, fg, rng.uniform(0.0, 0.45, SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    masks = {f"random-{k:02d}": _random_masks(np.random.default_rng(1000 + k)) for k in range(N_RANDOM)}
    masks.update(_constructed_masks())
    out = []
    for k, (name, (gt, pred)) in enumerate(masks.items()):
        prob = _probabilities(pred, np.random.default_rng(5000 + k))
        assert np.array_equal(prob > 0.5, pred)
        records = volume_records_multi(prob, gt, SPACING, is_logit=False, rules=RULES)
        out.append(Case(name, gt, prob, records))
    return out


def _case(cases: list[Case], name: str) -> Case:
    return next(c for c in cases if c.name == name)


# ------------------------------------------------------------------------------------------------ helpers


def _ours(case: Case, rule: str) -> dict:
    """TP / FP / FN, the sorted Dice of the matched lesions, the matched (lesion, component) labels."""
    recs = case.records[rule].records
    les = [r for r in recs if r["is_tum"]]
    comp = [r for r in recs if not r["is_tum"]]
    hit = [r for r in les if r["hit_obj"] is not None]
    return {
        "tp": len(hit),
        "fp": sum(r["hit_obj"] is None for r in comp),
        "fn": len(les) - len(hit),
        "dice": sorted(r["hit_dice"] for r in hit),
        "pairs": sorted((int(r["obj"].split("_")[1]), int(r["hit_obj"].split("_")[1])) for r in hit),
        "n_les": len(les),
        "n_comp": len(comp),
    }


#: every (kind, threshold, strict) the panoptica comparisons below ask for, computed for every case at once
PANOPTICA = [("naive", 0.5, False), ("naive", 0.1, False), ("bipartite", 0.1, False), ("bipartite", 0.3, False),
             ("bipartite", 0.5, False), ("naive", 0.5, True), ("bipartite", 0.5, True)]


@pytest.fixture(scope="module")
def panoptica(cases, tmp_path_factory) -> dict:
    """panoptica's results for every case and setting of :data:`PANOPTICA`, from its peer venv."""
    from tests.peers import HERE, peer_python

    python, why = peer_python("panoptica")
    if python is None:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("panoptica")
    np.savez(tmp / "cases.npz", **{f"{c.name}/{k}": getattr(c, k).astype(np.uint8) for c in cases
                                   for k in ("pred", "gt")})
    requests = [[c.name, kind, t, strict] for c in cases for kind, t, strict in PANOPTICA]
    (tmp / "requests.json").write_text(json.dumps(requests))
    res = subprocess.run([str(python), str(HERE / "panoptica_matching.py"), str(tmp / "cases.npz"),
                          str(tmp / "requests.json"), str(tmp / "out.json")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp / "out.json").read_text())
    assert out.pop("_versions")["numpy"].startswith("2.2")  # the peer's own pins, not the product's numpy
    return out


def _panoptica(results: dict, case: Case, kind: str, threshold: float, strict: bool = False) -> dict:
    d = results[json.dumps([case.name, kind, threshold, strict])]
    return {**d, "pairs": [tuple(p) for p in d["pairs"]]}


def _counts(d: dict) -> tuple[int, int, int]:
    return d["tp"], d["fp"], d["fn"]


def _pair_iou(case: Case) -> np.ndarray:
    """(n_lesions, n_components) IoU, from an independent scipy labelling (26-connected, raster order)."""
    g, ng = ndimage.label(case.gt, structure=STRUCT26)
    p, npred = ndimage.label(case.pred, structure=STRUCT26)
    inter = np.zeros((ng + 1, npred + 1))
    np.add.at(inter, (g.ravel(), p.ravel()), 1.0)
    size_g, size_p = inter.sum(axis=1)[1:], inter.sum(axis=0)[1:]
    inter = inter[1:, 1:]
    return inter / (size_g[:, None] + size_p[None, :] - inter)


def _max_cardinality(iou: np.ndarray, threshold: float) -> int:
    """Size of a maximum matching of the pairs with IoU >= threshold."""
    allowed = (iou >= threshold).astype(np.float64)
    if allowed.size == 0:
        return 0
    r, c = linear_sum_assignment(allowed, maximize=True)
    return int(allowed[r, c].sum())


def _detection_map(case: Case) -> np.ndarray:
    """Each predicted component (26-connected) at its max probability, 0 elsewhere."""
    lab, n = ndimage.label(case.pred, structure=STRUCT26)
    peak = np.r_[0.0, ndimage.maximum(case.prob, lab, np.arange(1, n + 1))] if n else np.zeros(1)
    return peak[lab].astype(np.float32)


def _picai_rows(case: Case, threshold: float, allow_unmatched: bool) -> list[tuple[int, float, float]]:
    rows, *_ = evaluate_case(
        y_det=_detection_map(case),
        y_true=case.gt.astype(np.int32),
        min_overlap=threshold,
        overlap_func="IoU",
        allow_unmatched_candidates_with_minimal_overlap=allow_unmatched,
    )
    return rows


def _picai(rows) -> dict:
    tp = [(c, o) for is_les, c, o in rows if is_les == 1 and c > 0]
    return {
        "tp": len(tp),
        "fn": sum(1 for is_les, c, _ in rows if is_les == 1 and c == 0),
        "fp": sum(1 for is_les, _, _ in rows if is_les == 0),
        "conf": sorted(c for c, _ in tp),
        "iou": sorted(o for _, o in tp),
    }


# ------------------------------------------------------------------------------------------------ the data


def test_data_contains_the_hard_situations(cases):
    """Components on two lesions, lesions under two components, matched and missed lesions, and FPs occur."""
    merged = sum(
        r.get("n_overlap", 0) >= 2 for c in cases for r in c.records["any"].records if not r["is_tum"]
    )
    split = sum(int(((_pair_iou(c) > 0).sum(axis=1) >= 2).sum()) for c in cases)
    assert merged >= 3 and split >= 3
    counts = [_ours(c, "o2o@0.5") for c in cases]
    assert sum(d["tp"] for d in counts) and sum(d["fn"] for d in counts) and sum(d["fp"] for d in counts)
    # no empty side (panoptica's edge cases are not at stake)
    assert all(d["n_les"] and d["n_comp"] for d in counts)


# ------------------------------------------------------------------------------------------------ panoptica


@pytest.mark.parametrize("threshold", [0.5, 0.1])
def test_one_to_one_equals_panoptica_naive_threshold_matching(cases, panoptica, threshold):
    """Greedy one-to-one at IoU >= t == panoptica's NaiveThresholdMatching(IOU, t): counts, matched Dice, pairs."""
    rule = f"o2o@{threshold}"
    for case in cases:
        ours, peer = _ours(case, rule), _panoptica(panoptica, case, "naive", threshold)
        assert _counts(ours) == _counts(peer), case.name
        np.testing.assert_allclose(ours["dice"], peer["dice"], rtol=0, atol=1e-12, err_msg=case.name)
        assert ours["pairs"] == peer["pairs"], case.name


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5])
def test_hungarian_equals_panoptica_max_bipartite_matching(cases, panoptica, threshold):
    """Hungarian at IoU >= t == panoptica's MaxBipartiteMatching(IOU, t): counts, matched Dice, the pairs."""
    rule = f"hun@{threshold}"
    for case in cases:
        ours, peer = _ours(case, rule), _panoptica(panoptica, case, "bipartite", threshold)
        assert _counts(ours) == _counts(peer), case.name
        np.testing.assert_allclose(ours["dice"], peer["dice"], rtol=0, atol=1e-12, err_msg=case.name)
        assert ours["pairs"] == peer["pairs"], (case.name, ours["pairs"], peer["pairs"])


def test_hungarian_at_05_equals_one_to_one_at_05(cases):
    """docs/definitions.md §9: at IoU >= 0.5 the matching is unique, so the optimal and the greedy rule give the same records."""
    for case in cases:
        a, b = case.records["hun@0.5"].records, case.records["o2o@0.5"].records
        assert [r["hit_obj"] for r in a] == [r["hit_obj"] for r in b], case.name
        assert [r["hit_dice"] for r in a] == [r["hit_dice"] for r in b], case.name


def test_threshold_is_inclusive_like_panoptica_default(cases, panoptica):
    """A pair with IoU exactly 0.5 is a match for us and for panoptica's default (``>=``, strict_threshold=False);
    panoptica's ``strict_threshold=True`` (``>``) drops it, so the comparison sees the difference."""
    case = _case(cases, "exact-half")
    assert 0.5 in _pair_iou(case)  # the data really has the boundary case
    ours = _ours(case, "o2o@0.5")
    assert _counts(ours) == _counts(_panoptica(panoptica, case, "naive", 0.5))
    assert _counts(ours) == _counts(_panoptica(panoptica, case, "bipartite", 0.5))
    assert _counts(ours) != _counts(_panoptica(panoptica, case, "naive", 0.5, strict=True))
    assert _counts(_ours(case, "hun@0.5")) != _counts(_panoptica(panoptica, case, "bipartite", 0.5, strict=True))


def test_the_comparison_fails_when_the_rule_changes(cases, panoptica):
    """Other rules give other counts than the peer on the same data: the comparisons above can fail."""
    # the paper's any-overlap rule against panoptica's one-to-one at IoU >= 0.5
    assert any(_counts(_ours(c, "any")) != _counts(_panoptica(panoptica, c, "naive", 0.5)) for c in cases)
    # greedy against optimal at IoU >= 0.1: differ on some case (at least the greedy trap), on our side and the peer's
    differ = [
        c.name for c in cases if _counts(_ours(c, "o2o@0.1")) != _counts(_panoptica(panoptica, c, "bipartite", 0.1))
    ]
    assert "greedy-trap" in differ
    assert any(_counts(_ours(c, "hun@0.1")) != _counts(_panoptica(panoptica, c, "naive", 0.1)) for c in cases)
    # the threshold matters too
    assert any(_counts(_ours(c, "hun@0.1")) != _counts(_panoptica(panoptica, c, "bipartite", 0.5)) for c in cases)


# ------------------------------------------------------------------------------------------------ picai_eval


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5])
def test_hungarian_against_picai_evaluate_case(cases, threshold):
    """picai's matching (max #matches + sum IoU) against ours (max sum IoU) at min_overlap = IoU threshold.

    Always: same lesions (TP + FN) and candidates; TP_picai >= TP_ours; picai's default FP (unmatched candidates
    with overlap >= min not counted) == our ``"iou"`` rule's FP. Where our matching has the maximum cardinality
    (all cases at t = 0.5): TP, FN, FP (all unmatched candidates FP), matched IoU and confidences equal.
    """
    rule = f"hun@{threshold}"
    coincide, differ = [], []
    for case in cases:
        ours = _ours(case, rule)
        strict = _picai(_picai_rows(case, threshold, allow_unmatched=False))
        loose = _picai(_picai_rows(case, threshold, allow_unmatched=True))
        assert strict["tp"] + strict["fn"] == ours["n_les"], case.name
        assert strict["tp"] + strict["fp"] == ours["n_comp"], case.name
        assert strict["tp"] >= ours["tp"], case.name
        assert loose["fp"] == _ours(case, f"iou@{threshold}")["fp"], case.name
        if ours["tp"] == _max_cardinality(_pair_iou(case), threshold):
            coincide.append(case.name)
            assert _counts(strict) == _counts(ours), case.name
            hit = [r for r in case.records[rule].records if r["is_tum"] and r["hit_obj"] is not None]
            np.testing.assert_allclose(strict["iou"], [d / (2 - d) for d in ours["dice"]], atol=1e-9)
            assert strict["conf"] == sorted(float(np.float32(r["hit_max"])) for r in hit), case.name
        else:
            differ.append(case.name)
    assert len(coincide) >= len(cases) // 2
    if threshold >= 0.5:
        assert not differ  # provably: allowed pairs are disjoint
    if threshold == 0.1:  # the definitions really differ on the data (picai's +1 per match)
        assert "cardinality-trap" in differ
        trap = _case(cases, "cardinality-trap")
        assert _picai(_picai_rows(trap, threshold, False))["tp"] > _ours(trap, rule)["tp"]


@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_froc_against_picai_metrics(cases, threshold):
    """picai's lesion TPR / FPR curve == our luna16 ``froc_curve`` (hungarian records) on the coincident cases."""
    rule = f"hun@{threshold}"
    subset = [c for c in cases if _ours(c, rule)["tp"] == _max_cardinality(_pair_iou(c), threshold)]
    assert sum(_ours(c, rule)["fn"] for c in subset) > 0  # picai's last threshold is then the FN rows' 0
    metrics = Metrics(lesion_results={c.name: _picai_rows(c, threshold, False) for c in subset})
    tpr, fpr = np.asarray(metrics.lesion_TPR), np.asarray(metrics.lesion_FPR)
    assert metrics.thresholds[-1] == 0
    fps, recall = froc_curve({c.name: c.records[rule] for c in subset})
    assert tpr.size == recall.size  # picai: the confidences + 0; ours: the anchor + the confidences
    np.testing.assert_allclose(tpr[:-1], recall[1:], atol=1e-6)
    np.testing.assert_allclose(fpr[:-1], fps[1:], atol=1e-6)

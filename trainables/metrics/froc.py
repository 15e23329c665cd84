"""FROC numerics on per-object records: flat arrays, vectorised curves, row-wise interpolation.

Everything here is a pure function of arrays. A *curve* is a pair of rows ``(fps, recall)``, both
non-decreasing, that starts at the anchor ``(0, 0)`` and has one point per threshold, from the highest threshold
to the lowest. Many curves (bootstrap replicates) are stacked as ``(R, P)`` arrays and computed at once: the
objects are sorted by confidence once, each replicate weights every object by the multiplicity of its case,
and the counts per threshold are cumulative sums of those weights.

Holds: :class:`ObjectArrays` / :func:`object_arrays` (a record set as flat arrays), :func:`interp_rows` (many
curves read at the same FP rates), the luna16 curves (:func:`luna_events`, :func:`luna_curves`,
:func:`luna_recall_at`), the paper2020 thresholds and counts, and ``LUNA_FP_RATES``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from trainables.metrics.records import RecordSet

__all__ = [
    "LUNA_FP_RATES",
    "ObjectArrays",
    "object_arrays",
    "interp_rows",
    "interp_at_counts",
    "LunaEvents",
    "luna_events",
    "luna_curves",
    "luna_recall_at",
    "paper2020_thresholds",
    "paper2020_counts",
]

#: the LUNA16 / paper FP-per-image operating points
LUNA_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# weights gathered per block of replicates: at most this many (replicate, object) entries in memory
_BLOCK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class ObjectArrays:
    """A record set as flat arrays, cases indexed by their position in ``case_ids`` (sorted, string order).

    ``les_*`` have one entry per lesion, ``comp_*`` one per predicted component; ``n_voxels`` and
    ``n_pred_positive`` one per case (NaN where unknown); ``n_records`` the number of records per case.
    """

    case_ids: tuple[str, ...]
    les_case: np.ndarray
    les_hit_dice: np.ndarray
    les_hit_logit: np.ndarray
    les_self_logit: np.ndarray
    les_diameter: np.ndarray
    comp_case: np.ndarray
    comp_hit_dice: np.ndarray
    comp_self_logit: np.ndarray
    comp_diameter: np.ndarray
    n_voxels: np.ndarray
    n_pred_positive: np.ndarray
    n_records: np.ndarray

    @property
    def n_cases(self) -> int:
        return len(self.case_ids)

    @property
    def les_detectable(self) -> np.ndarray:
        """Lesions hit by a component (detected at the lowest threshold)."""
        return (self.les_hit_dice > 0) & (self.les_hit_logit > -np.inf)

    @property
    def comp_fp(self) -> np.ndarray:
        """Components that hit no lesion (false positives while kept)."""
        return self.comp_hit_dice <= 0

    def lesions_per_case(self) -> np.ndarray:
        return np.bincount(self.les_case, minlength=self.n_cases).astype(np.float64)


def object_arrays(recordset: RecordSet, case_ids: Iterable[str] | None = None) -> ObjectArrays:
    """Flatten ``recordset`` (restricted to ``case_ids`` if given) into :class:`ObjectArrays`."""
    ids = tuple(sorted(recordset)) if case_ids is None else tuple(sorted(case_ids))
    les: list[tuple] = []
    comp: list[tuple] = []
    n_vox = np.full(len(ids), np.nan)
    n_pos = np.full(len(ids), np.nan)
    n_rec = np.zeros(len(ids), dtype=np.int64)
    for c, cid in enumerate(ids):
        case = recordset[cid]
        if case.n_voxels is not None and case.n_pred_positive is not None:
            n_vox[c], n_pos[c] = case.n_voxels, case.n_pred_positive
        n_rec[c] = len(case.records)
        for r in case.records:
            row = (c, r["hit_dice"], r["hit_logit"], r["self_logit"], r["diameter"])
            (les if r["is_tum"] else comp).append(row)

    def cols(rows: list[tuple]) -> list[np.ndarray]:
        a = np.array(rows, dtype=np.float64).reshape(-1, 5)
        return [a[:, 0].astype(np.int64)] + [a[:, i] for i in range(1, 5)]

    lc, ld, ll, ls, ldiam = cols(les)
    cc, cd, _, cs, cdiam = cols(comp)
    return ObjectArrays(ids, lc, ld, ll, ls, ldiam, cc, cd, cs, cdiam, n_vox, n_pos, n_rec)


def interp_rows(x: np.ndarray, y: np.ndarray, targets: Sequence[float]) -> np.ndarray:
    """Row-wise linear interpolation of many curves at the same ``targets``.

    Per row, the segment is found with ``np.searchsorted`` (:func:`interp_at_counts` does the rest): the same
    points and segments as ``np.interp(targets, x[r], y[r])``, whose own formula rounds differently (the two
    agree to a few ulp; the summaries keep this formula, bit for bit).

    Args:
        x: (R, P), every row non-decreasing (ties allowed, as ``np.interp``: the last of equal x is used).
        y: (R, P) values.
        targets: (G,) query points, each >= ``x[:, 0]`` (below it the first segment is extended).

    Returns:
        (R, G); flat beyond the last point of each row (``np.interp``'s right extrapolation).
    """
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    if x.shape[0] == 0:
        return np.zeros((0, t.size))
    return interp_at_counts(x, y, t, np.stack([np.searchsorted(row, t, side="right") for row in x]))


def interp_at_counts(x: np.ndarray, y: np.ndarray, targets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """:func:`interp_rows` given ``counts`` (R, G): how many points of row r have ``x <= targets[g]``.

    Value ``y0 + (t - x0) / (x1 - x0) * (y1 - y0)`` on the segment that ends at the first point beyond t; the
    last value where every point is <= t.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    n_pts = x.shape[1]
    j = np.maximum(counts, 1)
    lo = j - 1
    hi = np.minimum(j, n_pts - 1)
    rows = np.arange(x.shape[0])[:, None]
    x0, x1 = x[rows, lo], x[rows, hi]
    y0, y1 = y[rows, lo], y[rows, hi]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(x1 > x0, (t[None, :] - x0) / (x1 - x0), 0.0)
    return np.where(j >= n_pts, y[:, -1:], y0 + frac * (y1 - y0))


@dataclass(frozen=True)
class LunaEvents:
    """Objects that change the luna16 curve, sorted by confidence (descending).

    ``thresholds``: (K,) distinct confidences, descending. ``tp_case`` / ``fp_case``: case index of every
    detectable lesion / false-positive component, in that order; ``tp_upto`` / ``fp_upto``: (K,) how many of
    them have a confidence >= ``thresholds[k]``.
    """

    thresholds: np.ndarray
    tp_case: np.ndarray
    fp_case: np.ndarray
    tp_upto: np.ndarray
    fp_upto: np.ndarray

    @property
    def n_events(self) -> int:
        return self.tp_case.size + self.fp_case.size


def luna_events(objs: ObjectArrays) -> LunaEvents:
    """luna16 rules: a lesion is detected at t iff it is hit and ``hit_logit >= t``; a component is a false
    positive at t iff it hits no lesion and ``self_logit >= t``; the thresholds are the distinct confidences."""
    det = objs.les_detectable
    fp = objs.comp_fp & (objs.comp_self_logit > -np.inf)
    tp_conf, fp_conf = objs.les_hit_logit[det], objs.comp_self_logit[fp]
    thresholds = np.unique(np.concatenate([tp_conf, fp_conf]))[::-1]
    tp_order, fp_order = np.argsort(-tp_conf, kind="stable"), np.argsort(-fp_conf, kind="stable")
    # count of events with conf >= t: searchsorted on the ascending negated confidences
    return LunaEvents(
        thresholds=thresholds,
        tp_case=objs.les_case[det][tp_order],
        fp_case=objs.comp_case[fp][fp_order],
        tp_upto=np.searchsorted(-tp_conf[tp_order], -thresholds, side="right"),
        fp_upto=np.searchsorted(-fp_conf[fp_order], -thresholds, side="right"),
    )


def _cum_at(weights: np.ndarray, case: np.ndarray, upto: np.ndarray) -> np.ndarray:
    """(R, K): weighted count of the first ``upto[k]`` events, from one cumulative sum per replicate."""
    cum = np.zeros((weights.shape[0], case.size + 1))
    np.cumsum(weights[:, case], axis=1, out=cum[:, 1:])
    return cum[:, upto]


def luna_curves(
    ev: LunaEvents, weights: np.ndarray, n_lesions: np.ndarray, n_images: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """FROC curves of weighted case sets.

    Args:
        ev: from :func:`luna_events`.
        weights: (R, n_cases) multiplicity of every case in each replicate (1 = the case once, 0 = left out).
        n_lesions: (R,) lesions in each replicate (the recall denominator).
        n_images: (R,) images in each replicate (the FP/image denominator).

    Returns:
        ``(fps, recall)``, each (R, K + 1): the anchor (0, 0), then one point per threshold, descending.
        Recall is NaN in a replicate without lesions.
    """
    weights = np.asarray(weights, dtype=np.float64)
    n_rows, k = weights.shape[0], ev.thresholds.size
    fp = np.zeros((n_rows, k + 1))
    tp = np.zeros((n_rows, k + 1))
    if k:
        tp[:, 1:] = _cum_at(weights, ev.tp_case, ev.tp_upto)
        fp[:, 1:] = _cum_at(weights, ev.fp_case, ev.fp_upto)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / np.asarray(n_lesions, dtype=np.float64)[:, None]
        fps = fp / np.asarray(n_images, dtype=np.float64)[:, None]
    return fps, recall


def luna_recall_at(
    objs: ObjectArrays, ev: LunaEvents, weights: np.ndarray, targets: Sequence[float]
) -> np.ndarray:
    """Recall at FP/image ``targets`` (linear interpolation, anchored at (0, 0), flat beyond the last point)
    for every replicate: (R, G); NaN rows for replicates without lesions. Denominators: all images of the
    replicate (``weights.sum(1)``) and all its lesions."""
    weights = np.asarray(weights, dtype=np.float64)
    out = np.empty((weights.shape[0], len(targets)))
    block = max(1, _BLOCK_ENTRIES // max(ev.n_events + ev.thresholds.size, 1))
    per_case = objs.lesions_per_case()
    for a in range(0, weights.shape[0], block):
        w = weights[a : a + block]
        fps, recall = luna_curves(ev, w, w @ per_case, w.sum(axis=1))
        ok = np.isfinite(recall[:, -1])
        out[a : a + block] = np.nan
        if ok.any():
            out[a : a + block][ok] = interp_rows(fps[ok], recall[ok], targets)
    return out


def paper2020_thresholds(objs: ObjectArrays) -> np.ndarray:
    """Step 2 of the fixture README: ``concat(linspace(-0.1, 10, 101), linspace(10, m + 1, 100))``,
    m = the largest finite component ``self_logit`` (without components: the first part only)."""
    finite = objs.comp_self_logit[np.isfinite(objs.comp_self_logit)]
    first = np.linspace(-0.1, 10, 101)
    if finite.size == 0:
        return first
    return np.concatenate([first, np.linspace(10, float(finite.max()) + 1, 100)])


def paper2020_counts(objs: ObjectArrays, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per case and threshold (step 3 of the fixture README): TP, kept lesions (TP + FN) and FP counts.

    kept = ``self_logit >= t``; TP = kept lesions with ``hit_dice > 0`` and ``hit_logit >= t``; FP = kept
    components with ``hit_dice <= 0`` and ``self_logit > t`` (strict). Returns three (n_cases, K) arrays.
    """
    th = np.asarray(thresholds, dtype=np.float64)

    def count(case: np.ndarray, n_thr_passed: np.ndarray) -> np.ndarray:
        # an object counts at threshold index k iff k < n_thr_passed
        hist = np.zeros((objs.n_cases, th.size + 1))
        np.add.at(hist, (case, n_thr_passed), 1.0)
        return np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]

    kept = count(objs.les_case, np.searchsorted(th, objs.les_self_logit, side="right"))
    hit = objs.les_hit_dice > 0
    tp_conf = np.minimum(objs.les_hit_logit[hit], objs.les_self_logit[hit])
    tp = count(objs.les_case[hit], np.searchsorted(th, tp_conf, side="right"))
    fpm = objs.comp_fp
    fp = count(objs.comp_case[fpm], np.searchsorted(th, objs.comp_self_logit[fpm], side="left"))
    return tp, kept, fp

"""Case-level resampling: bootstrap weights, percentile intervals, the verdict's hierarchical comparison.

A replicate is a vector of case multiplicities (how many times each case is drawn); every metric of a
replicate is computed from the per-object records weighted by those multiplicities, so no record set is ever
copied (see :mod:`trainables.metrics.froc`).
"""

from __future__ import annotations

import warnings

import numpy as np

from trainables.errors import RecordsError
from trainables.metrics.froc import LUNA_FP_RATES, ObjectArrays, luna_events, luna_recall_at, object_arrays
from trainables.metrics.records import RecordSet

__all__ = ["VERDICT_METRICS", "case_weights", "hierarchical_bootstrap", "percentile_ci", "replicate_metric"]

#: what the iw-vs-plain verdict compares (docs/definitions.md §9): detection, delineation and its price in false positives
VERDICT_METRICS = ("avg_recall", "obj_dice", "fp_per_image")


def case_weights(
    n_cases: int, n_boot: int, rng: np.random.Generator, subsample: float | None = None
) -> np.ndarray:
    """Multiplicities of the cases in ``n_boot`` replicates: (n_boot, n_cases) float64.

    ``subsample=None``: bootstrap, ``n_cases`` draws with replacement (multinomial). ``subsample=f`` in (0, 1]:
    ``int(f * n_cases)`` (at least 1) distinct cases without replacement (the paper's 80 % scheme).
    """
    if n_cases <= 0:
        return np.zeros((n_boot, 0))
    if subsample is None:
        return rng.multinomial(n_cases, np.full(n_cases, 1.0 / n_cases), size=n_boot).astype(np.float64)
    if not 0.0 < subsample <= 1.0:
        raise ValueError(f"subsample must be in (0, 1], got {subsample}")
    k = max(1, int(subsample * n_cases))
    chosen = np.argsort(rng.random((n_boot, n_cases)), axis=1)[:, :k]
    w = np.zeros((n_boot, n_cases))
    np.put_along_axis(w, chosen, 1.0, axis=1)
    return w


def percentile_ci(values: np.ndarray, ci: float) -> tuple[float | None, float | None]:
    """Percentile interval ``[(1 - ci) / 2, (1 + ci) / 2]`` of the finite ``values`` (None, None if none)."""
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None, None
    lo, hi = np.percentile(v, [50.0 * (1.0 - ci), 50.0 * (1.0 + ci)])
    return float(lo), float(hi)


def replicate_metric(objs: ObjectArrays, weights: np.ndarray, metric: str) -> np.ndarray:
    """luna16 ``avg_recall`` (mean recall at the 7 FP rates) or ``obj_dice`` (mean hit Dice of the lesions
    detected at the lowest threshold) of every weighted replicate: (R,), NaN where undefined."""
    weights = np.asarray(weights, dtype=np.float64)
    if metric == "avg_recall":
        return luna_recall_at(objs, luna_events(objs), weights, LUNA_FP_RATES).mean(axis=1)
    if metric == "obj_dice":
        det = objs.les_detectable
        dice_sum = np.bincount(objs.les_case[det], weights=objs.les_hit_dice[det], minlength=objs.n_cases)
        n_det = np.bincount(objs.les_case[det], minlength=objs.n_cases).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (weights @ dice_sum) / (weights @ n_det)
    if metric == "fp_per_image":
        fp = objs.comp_hit_dice <= 0
        n_fp = np.bincount(objs.comp_case[fp], minlength=objs.n_cases).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (weights @ n_fp) / weights.sum(axis=1)
    raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(VERDICT_METRICS)}")


def hierarchical_bootstrap(
    pairs: list[tuple[RecordSet, RecordSet]],
    *,
    metric: str = "avg_recall",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict:
    """Difference ``metric(b) - metric(a)`` over seeds, with a two-level bootstrap CI (docs/definitions.md §9, the verdict).

    ``pairs``: one ``(a, b)`` per seed (e.g. plain and iw of one loss trained with the same seed), every record
    set on the same cases. The estimate is the mean over seeds of the per-seed difference on all cases. A
    replicate draws as many seeds as there are, with replacement, then for each drawn seed the cases with
    replacement (the same draw for both arms), and averages the per-seed differences; the CI is the percentile
    interval of the replicates. Seeds and cases are both sources of variance: one seed cannot tell an effect of
    the loss from the luck of one training run, and the interval says so by being wide.

    Returns:
        ``{"metric", "delta", "ci_low", "ci_high", "per_seed", "n_seeds", "n_cases", "n_boot", "n_valid",
        "seed", "ci"}``; ``per_seed`` are the per-seed differences on all cases (None where undefined, e.g.
        object Dice with no lesion detected).

    Raises:
        RecordsError: no pairs, or record sets that do not cover the same cases.
    """
    if metric not in VERDICT_METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(VERDICT_METRICS)}")
    if not pairs:
        raise RecordsError("hierarchical bootstrap: no (a, b) pair")
    ids = set(pairs[0][0])
    for i, (a, b) in enumerate(pairs):
        for name, rs in (("a", a), ("b", b)):
            if set(rs) != ids:
                raise RecordsError(f"hierarchical bootstrap: pair {i} ({name}) covers other cases than pair 0 "
                                   f"({len(set(rs) ^ ids)} differ)")
    if not ids:
        raise RecordsError("hierarchical bootstrap: no cases")
    arrays = [(object_arrays(a), object_arrays(b)) for a, b in pairs]
    n_seeds, n_cases = len(pairs), len(ids)
    full = np.ones((1, n_cases))
    per_seed = np.array([replicate_metric(ob, full, metric)[0] - replicate_metric(oa, full, metric)[0]
                         for oa, ob in arrays])
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # seeds, with replacement
    w = case_weights(n_cases, n_boot * n_seeds, rng).reshape(n_boot, n_seeds, n_cases)
    d = np.full((n_boot, n_seeds), np.nan)
    for s, (oa, ob) in enumerate(arrays):
        rows = drawn == s
        if rows.any():
            ws = w[rows]
            d[rows] = replicate_metric(ob, ws, metric) - replicate_metric(oa, ws, metric)
    with warnings.catch_warnings():  # a replicate whose every drawn seed is undefined stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        reps = np.nanmean(d, axis=1)
    lo, hi = percentile_ci(reps, ci)
    finite = per_seed[np.isfinite(per_seed)]
    return {
        "metric": metric,
        "delta": float(finite.mean()) if finite.size else None,
        "ci_low": lo,
        "ci_high": hi,
        "per_seed": [float(v) if np.isfinite(v) else None for v in per_seed],
        "n_seeds": n_seeds,
        "n_cases": n_cases,
        "n_boot": int(n_boot),
        "n_valid": int(np.isfinite(reps).sum()),
        "seed": seed,
        "ci": ci,
    }

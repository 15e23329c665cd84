"""Detection summaries of record sets: the metric-protocol registry, ``summarize``, FROC curves, size groups.

Holds:

* :class:`Protocol` records in the registry ``PROTOCOLS`` (name -> record; :func:`register_protocol`). A record
  names the summary function and what the rest of the code asks about the protocol (its one-line doc, the
  :func:`summarize` options it takes, whether it reports a CI, how it resamples, what a size group inherits
  from the whole record set). Adding a protocol = one function + one record; :func:`summarize`,
  :func:`size_groups` and ``study metrics`` (choices, help, table columns) read the record.
* the protocols: ``luna16`` (the default; :func:`_luna16`) and ``paper2020`` (the fixture README's six steps,
  what produced Table 2; :func:`_paper2020`). Their exact rules are in their docstrings (docs/definitions.md §7).
* :func:`froc_curve` (the luna16 curve of a record set), :func:`size_groups` / :func:`restrict_to_size`
  (summaries per lesion-size group, the authors' ``get_size_df``), ``CLINICAL_CUTOFFS_MM`` and the FP/image
  grid of the plotting band ``BAND_FPS_GRID``.

Undefined values (no lesion, no detected lesion, no diagnostics) are ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from trainables.errors import RecordsError
from trainables.metrics.bootstrap import case_weights, percentile_ci, replicate_metric
from trainables.metrics.froc import (
    LUNA_FP_RATES,
    ObjectArrays,
    interp_rows,
    luna_curves,
    luna_events,
    luna_recall_at,
    object_arrays,
    paper2020_counts,
    paper2020_thresholds,
)
from trainables.metrics.records import CaseRecords, RecordSet
from trainables.registry import Registry

__all__ = [
    "Protocol",
    "PROTOCOLS",
    "DEFAULT_PROTOCOL",
    "SUMMARY_OPTIONS",
    "register_protocol",
    "get_protocol",
    "CLINICAL_CUTOFFS_MM",
    "BAND_FPS_GRID",
    "summarize",
    "froc_curve",
    "size_groups",
    "restrict_to_size",
]

#: "small" lesion cut-offs (equivalent diameter, mm): paper text (LUNA16 10, LiTS 12, metastases 5) and the
#: authors' code (LUNA16 8)
CLINICAL_CUTOFFS_MM: dict[str, float] = {"luna16": 10.0, "luna16-code": 8.0, "lits": 12.0, "metastases": 5.0}
#: FP/image grid of the plotting band: 49 points, log2-uniform from 1/8 to 8
BAND_FPS_GRID: np.ndarray = 2.0 ** np.linspace(-3.0, 3.0, 49)

_PAPER_N_SUBSAMPLES = 50
_PAPER_SEED = 42
_PAPER_FRACTION = 0.8

#: the protocol of :func:`summarize` / :func:`size_groups` / ``study metrics`` when none is given
DEFAULT_PROTOCOL = "luna16"
#: the resampling options of :func:`summarize`; a protocol takes some of them (``Protocol.options``)
SUMMARY_OPTIONS: tuple[str, ...] = ("n_boot", "seed", "subsample", "ci")


@dataclass(frozen=True)
class Protocol:
    """One metric protocol: its summary function and everything the rest of the code asks about it.

    Attributes:
        name: registry key (``summarize(..., protocol=name)``, ``study metrics --protocol name``).
        summarize_fn: ``(ObjectArrays, **options) -> summary dict``; ``options`` are those named in
            ``options`` plus, for a size group, ``group_kwargs(whole)``.
        doc: one line, what it reports (``study metrics --help``, ``study catalog``).
        options: the :data:`SUMMARY_OPTIONS` it takes; the others are fixed by the protocol and ignored.
        reports_ci: whether it reports a percentile CI of avg recall (``avg_recall_ci_low/high``).
        resampling: how it resamples, for headers; ``str.format`` fields ``{n_boot}`` and ``{seed}``.
        group_kwargs: what a size group inherits from the whole record set: ``whole ObjectArrays -> extra
            keyword arguments of summarize_fn``; None = nothing (the group is summarised on its own).
    """

    name: str
    summarize_fn: Callable[..., dict]
    doc: str
    options: tuple[str, ...] = ()
    reports_ci: bool = False
    resampling: str = ""
    group_kwargs: Callable[[ObjectArrays], dict] | None = None
    checked: str = ""  # what the tests check it against

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - set(SUMMARY_OPTIONS))
        if unknown:
            raise ValueError(
                f"protocol {self.name!r}: unknown options {unknown}; expected some of {SUMMARY_OPTIONS}"
            )

    def describe_resampling(self, **values) -> str:
        """``resampling`` with ``{n_boot}`` / ``{seed}`` filled in."""
        return self.resampling.format(**values)

    def take(self, options: Mapping[str, object]) -> dict:
        """The entries of ``options`` this protocol takes (``options`` keys must be :data:`SUMMARY_OPTIONS`)."""
        unknown = sorted(set(options) - set(SUMMARY_OPTIONS))
        if unknown:
            raise TypeError(
                f"unknown summary options {unknown}; expected some of {', '.join(SUMMARY_OPTIONS)}"
            )
        return {k: v for k, v in options.items() if k in self.options}


def _num(x: float | np.floating | None) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _curve_points(fps: np.ndarray, recall: np.ndarray) -> dict[str, list[float]]:
    """Curve as lists, dropping consecutive duplicate points."""
    keep = np.r_[True, (np.diff(fps) != 0) | (np.diff(recall) != 0)]
    return {"fps": fps[keep].tolist(), "recall": recall[keep].tolist()}


def _common(objs: ObjectArrays, n_images: int) -> dict:
    """Counts and over-segmentation diagnostics shared by the protocols."""
    det = objs.les_detectable
    dice = objs.les_hit_dice[det]
    known = np.isfinite(objs.n_voxels)
    n_fp = int(objs.comp_fp.sum())
    return {
        "n_images": n_images,
        "n_cases": objs.n_cases,
        "n_lesions": int(objs.les_case.size),
        "n_detected": int(det.sum()),
        "n_components": int(objs.comp_case.size),
        "n_fp": n_fp,
        "fp_per_image": n_fp / n_images if n_images else None,
        "pred_positive_fraction": (
            float(objs.n_pred_positive[known].sum() / objs.n_voxels[known].sum())
            if known.any() and objs.n_voxels[known].sum() > 0
            else None
        ),
        "obj_dice": float(dice.mean()) if dice.size else None,
        "obj_dice_std": float(dice.std()) if dice.size else None,
    }


def _luna16(
    objs: ObjectArrays, *, n_boot: int = 1000, seed: int = 0, subsample: float | None = None, ci: float = 0.95
) -> dict:
    """The ``luna16`` protocol (the default).

    Thresholds = the distinct confidences (max logit) of the objects. At threshold t a lesion is detected iff it
    is hit (``hit_dice > 0``) and ``hit_logit >= t``; a component is a false positive iff it hits no lesion
    (``hit_dice <= 0``) and ``self_logit >= t`` (ties: ``>=`` on both sides, i.e. the operating point "keep
    the components of confidence >= t"; the lowest threshold keeps every component). Recall = detected / all
    lesions; FP/image = false positives / **all** images of the record set (empty ones included). The curve is
    anchored at (0, 0) and read by linear interpolation (``np.interp``) at FP/image {1/8, 1/4, 1/2, 1, 2, 4, 8},
    flat beyond its last point; ``avg_recall`` = mean of the 7. Uncertainty: a seeded case-level bootstrap with
    replacement (percentile CI; ``avg_recall_std`` = standard deviation of the replicates), or, with
    ``subsample=f``, ``int(f n)`` cases without replacement whose FP/image is divided by their own count.
    Object Dice = mean (std over lesions) of ``hit_dice`` over the lesions detected at the lowest threshold.
    """
    n = objs.n_cases
    n_rates = len(LUNA_FP_RATES)
    targets = np.concatenate([LUNA_FP_RATES, BAND_FPS_GRID])
    ev = luna_events(objs)
    ones = np.ones((1, n))
    point = luna_recall_at(objs, ev, ones, targets)[0]
    fps, recall = luna_curves(ev, ones, np.array([objs.les_case.size]), np.array([n]))
    has_lesions = objs.les_case.size > 0
    out = {"protocol": "luna16", **_common(objs, n)}
    out.update(
        avg_recall=_num(point[:n_rates].mean()) if has_lesions else None,
        recall_at={r: _num(v) for r, v in zip(LUNA_FP_RATES, point[:n_rates])},
        froc=_curve_points(fps[0], recall[0]) if has_lesions else {"fps": [], "recall": []},
        resampling="bootstrap" if subsample is None else f"subsample-{subsample:g}",
        n_boot=int(n_boot),
        seed=seed,
        ci=ci,
        avg_recall_std=None,
        avg_recall_ci_low=None,
        avg_recall_ci_high=None,
        obj_dice_ci_low=None,
        obj_dice_ci_high=None,
        n_boot_valid=0,
        froc_band=None,
    )
    if n_boot > 0 and has_lesions:
        w = case_weights(n, n_boot, np.random.default_rng(seed), subsample)
        reps = luna_recall_at(objs, ev, w, targets)
        avg = reps[:, :n_rates].mean(axis=1)
        ok = np.isfinite(avg)
        lo, hi = percentile_ci(avg, ci)
        dlo, dhi = percentile_ci(replicate_metric(objs, w, "obj_dice"), ci)
        band = reps[ok][:, n_rates:]
        q = [50.0 * (1.0 - ci), 50.0 * (1.0 + ci)]
        out.update(
            avg_recall_std=float(avg[ok].std(ddof=1)) if ok.sum() > 1 else None,
            avg_recall_ci_low=lo,
            avg_recall_ci_high=hi,
            obj_dice_ci_low=dlo,
            obj_dice_ci_high=dhi,
            n_boot_valid=int(ok.sum()),
            froc_band={
                "fps_grid": BAND_FPS_GRID.tolist(),
                "lo": np.percentile(band, q[0], axis=0).tolist() if band.size else [],
                "hi": np.percentile(band, q[1], axis=0).tolist() if band.size else [],
                "mid": point[n_rates:].tolist(),
            },
        )
    return out


def _paper2020(
    objs: ObjectArrays, *, ids: Sequence[str] | None = None, thresholds: np.ndarray | None = None
) -> dict:
    """The ``paper2020`` protocol: the fixture README's six steps exactly (what produced Table 2).

    Thresholds ``concat(linspace(-0.1, 10, 101), linspace(10, m + 1, 100))``; kept = ``self_logit >= t``; TP =
    kept lesions with ``hit_dice > 0`` and ``hit_logit >= t``; FP = kept non-hitting components with
    ``self_logit > t`` (strict); 50 cumulative shuffles by ``RandomState(42)`` keeping ``int(0.8 n_ids)`` ids;
    FP/image divided by ``n_ids`` of the whole file; mean (± std) of the 7-point average over the subsamples;
    object DSC over lesions with ``hit_dice > 0`` and ``hit_logit >= -0.1``. ``ids`` = the sorted case ids that
    have at least one record (the authors' ``df.id.unique()``; a case with an empty record list is absent from
    their table). Reading step 1 as "every key of the file" misses Table 2 on LUNA16 dl, gdl, iwasl (by up to
    0.014); this reading matches all 19 files.

    ``ids`` / ``thresholds`` default to the file's own (size groups pass the whole file's:
    :func:`_paper2020_group_kwargs`).
    """
    if ids is None:
        ids = _paper2020_ids(objs)
    ids = sorted(ids)
    th = paper2020_thresholds(objs) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    n_ids = len(ids)
    out = {"protocol": "paper2020", **_common(objs, n_ids)}
    # step 6: object DSC at the lowest threshold, on all records
    sel = (objs.les_hit_dice > 0) & (objs.les_hit_logit >= th[0])
    dice = objs.les_hit_dice[sel]
    out.update(
        obj_dice=float(dice.mean()) if dice.size else None,
        obj_dice_std=float(dice.std()) if dice.size else None,
        resampling=f"subsample-{_PAPER_FRACTION:g}-cumulative-shuffle",
        n_boot=_PAPER_N_SUBSAMPLES,
        seed=_PAPER_SEED,
        ci=None,
        avg_recall_ci_low=None,
        avg_recall_ci_high=None,
    )
    pos = {c: i for i, c in enumerate(objs.case_ids)}
    missing = [c for c in ids if c not in pos]
    if missing:
        raise RecordsError(f"paper2020: ids not in the records: {missing[:3]}")
    tp, kept, fp = paper2020_counts(objs, th)
    # step 4: 50 cumulative shuffles of the ids, first int(0.8 n_ids) of each
    rs = np.random.RandomState(_PAPER_SEED)
    order = list(ids)
    k = int(_PAPER_FRACTION * n_ids)
    sel_w = np.zeros((_PAPER_N_SUBSAMPLES + 1, objs.n_cases))
    for it in range(_PAPER_N_SUBSAMPLES):
        rs.shuffle(order)
        sel_w[it, [pos[c] for c in order[:k]]] = 1.0
    sel_w[-1, [pos[c] for c in ids]] = 1.0  # last row: all ids (the curve for plotting)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = (sel_w @ tp) / (sel_w @ kept)
        fps = (sel_w @ fp) / n_ids
    # step 5: anchor (0, 0), increasing FP/image (= decreasing threshold), 7-point average
    zeros = np.zeros((sel_w.shape[0], 1))
    x = np.hstack([zeros, fps[:, ::-1]])
    y = np.hstack([zeros, recall[:, ::-1]])
    ok = np.isfinite(y).all(axis=1) & np.isfinite(x).all(axis=1)
    targets = np.concatenate([LUNA_FP_RATES, BAND_FPS_GRID])
    at = np.full((x.shape[0], targets.size), np.nan)
    if ok.any():
        at[ok] = interp_rows(x[ok], y[ok], targets)
    n_rates = len(LUNA_FP_RATES)
    sub = at[:-1]
    avg = sub[:, :n_rates].mean(axis=1)
    good = np.isfinite(avg)
    out.update(
        avg_recall=float(avg[good].mean()) if good.any() else None,
        avg_recall_std=float(avg[good].std()) if good.any() else None,
        recall_at={r: _num(sub[good, i].mean()) if good.any() else None for i, r in enumerate(LUNA_FP_RATES)},
        froc=_curve_points(x[-1], y[-1]) if ok[-1] else {"fps": [], "recall": []},
        froc_band=(
            {
                "fps_grid": BAND_FPS_GRID.tolist(),
                "lo": (sub[good, n_rates:].mean(0) - sub[good, n_rates:].std(0)).tolist(),
                "hi": (sub[good, n_rates:].mean(0) + sub[good, n_rates:].std(0)).tolist(),
                "mid": sub[good, n_rates:].mean(0).tolist(),
            }
            if good.any()
            else None
        ),
    )
    return out


def _paper2020_ids(objs: ObjectArrays) -> list[str]:
    """The case ids with at least one record (the authors' ``df.id.unique()``)."""
    return [c for c, k in zip(objs.case_ids, objs.n_records) if k > 0]


def _paper2020_group_kwargs(whole: ObjectArrays) -> dict:
    """A size group keeps the whole record set's ids (FP/image denominator) and thresholds."""
    return {"ids": _paper2020_ids(whole), "thresholds": paper2020_thresholds(whole)}


#: protocol name -> :class:`Protocol`, in registration order (a dict; the CLI lists them in this order)
PROTOCOLS: Registry[Protocol] = Registry("protocol")
#: add a :class:`Protocol` (its name must be new); returns it
register_protocol = PROTOCOLS.register
#: the record of a protocol by name; ValueError naming the registered ones if unknown
get_protocol = PROTOCOLS.lookup


register_protocol(
    Protocol(
        name="luna16",
        summarize_fn=_luna16,
        doc="recall at 1/8 to 8 FP/image (7 rates, all images) averaged, with a case-level bootstrap CI",
        checked="a FROC worked by hand; a naive per-threshold loop",
        options=SUMMARY_OPTIONS,
        reports_ci=True,
        resampling="bootstrap n={n_boot}, seed={seed}",
    )
)
register_protocol(
    Protocol(
        name="paper2020",
        summarize_fn=_paper2020,
        doc="the paper's Table 2 exactly (the fixture README's six steps: 50 subsamples of 80 %)",
        checked="the paper's Table 2 from the authors' per-lesion records",
        resampling=f"{_PAPER_N_SUBSAMPLES} subsamples of {_PAPER_FRACTION * 100:g} %, seed {_PAPER_SEED}",
        group_kwargs=_paper2020_group_kwargs,
    )
)


def _objects(recordset: RecordSet) -> ObjectArrays:
    if not recordset:
        raise RecordsError("no cases in the record set")
    return object_arrays(recordset)


def summarize(
    recordset: RecordSet,
    protocol: str = DEFAULT_PROTOCOL,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    subsample: float | None = None,
    ci: float = 0.95,
) -> dict:
    """Detection summary of a record set.

    Args:
        recordset: case id -> :class:`CaseRecords` (every evaluated image, empty ones included).
        protocol: a name in :data:`PROTOCOLS` (``"luna16"``, ``"paper2020"``). ``n_boot``, ``seed``,
            ``subsample`` and ``ci`` go to the protocols whose record lists them in ``options`` (``luna16``);
            the others fix their own resampling (``paper2020``: 50 subsamples, seed 42).
        n_boot: bootstrap replicates (0 = no resampling; the CI keys are then None).
        seed: seed of ``numpy.random.default_rng`` for the replicates.
        subsample: None = bootstrap with replacement; a fraction (e.g. 0.8) = subsampling without replacement.
        ci: mass of the percentile interval.

    Returns:
        dict with at least ``protocol, n_images, n_cases, n_lesions, n_detected, n_components, n_fp,
        fp_per_image`` (all components: the lowest threshold), ``pred_positive_fraction`` (p > 0.5 voxels over
        the images with diagnostics, None if none), ``avg_recall, avg_recall_std, avg_recall_ci_low,
        avg_recall_ci_high, obj_dice, obj_dice_std, recall_at`` (FP rate -> recall), ``froc`` ({"fps",
        "recall"}, anchored at (0, 0)), ``froc_band`` ({"fps_grid", "lo", "hi", "mid"} or None),
        ``resampling, n_boot, seed, ci``; luna16 adds ``obj_dice_ci_low, obj_dice_ci_high, n_boot_valid`` (the
        replicates with at least one lesion).
    """
    record = get_protocol(protocol)
    objs = _objects(recordset)
    return record.summarize_fn(
        objs, **record.take({"n_boot": n_boot, "seed": seed, "subsample": subsample, "ci": ci})
    )


def froc_curve(recordset: RecordSet, case_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """luna16 FROC curve of ``recordset`` (or of ``case_ids`` only): ``(fps_per_image, recall)``, both
    non-decreasing, starting at the anchor (0, 0), one point per distinct confidence (descending)."""
    if case_ids is not None:
        unknown = sorted(set(case_ids) - set(recordset))
        if unknown:
            raise RecordsError(f"case ids not in the record set: {unknown[:3]}")
    objs = object_arrays(recordset, case_ids)
    if objs.n_cases == 0:
        raise RecordsError("no cases in the record set")
    ev = luna_events(objs)
    fps, recall = luna_curves(
        ev, np.ones((1, objs.n_cases)), np.array([objs.les_case.size]), np.array([objs.n_cases])
    )
    return fps[0], np.nan_to_num(recall[0])


def _group_bounds(
    diameters: np.ndarray, cutoffs_mm: float | Sequence[float] | None, terciles: bool
) -> list[tuple[str, float, float]]:
    if (cutoffs_mm is None) == (not terciles):
        raise ValueError("give either cutoffs_mm or terciles=True")
    if terciles:
        if diameters.size == 0:
            raise RecordsError("terciles need at least one lesion")
        q1, q2 = (float(v) for v in np.quantile(diameters, [1 / 3, 2 / 3]))
        return [("small", -math.inf, q1), ("medium", q1, q2), ("large", q2, math.inf)]
    cuts = sorted({float(cutoffs_mm)} if np.isscalar(cutoffs_mm) else {float(c) for c in cutoffs_mm})
    if not cuts or any(not math.isfinite(c) or c <= 0 for c in cuts):
        raise ValueError(f"cutoffs_mm must be positive finite numbers, got {cutoffs_mm}")
    edges = [-math.inf, *cuts, math.inf]
    groups = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        name = f"<{hi:g} mm" if lo == -math.inf else f">={lo:g} mm" if hi == math.inf else f"{lo:g}-{hi:g} mm"
        groups.append((name, lo, hi))
    return groups


def restrict_to_size(recordset: RecordSet, lo: float, hi: float) -> RecordSet:
    """The authors' ``get_size_df``: lesions of the group, components of the group's size, components linked
    (``hit_obj``) to a lesion of the group. Every case stays (all images count in FP/image)."""
    out: RecordSet = {}
    for cid, case in recordset.items():
        keep_les = {r.get("obj") for r in case.records if r["is_tum"] and lo <= r["diameter"] < hi}
        keep_les.discard(None)
        recs = [
            r
            for r in case.records
            if lo <= r["diameter"] < hi or (not r["is_tum"] and r.get("hit_obj") in keep_les)
        ]
        out[cid] = CaseRecords(records=recs, n_voxels=case.n_voxels, n_pred_positive=case.n_pred_positive)
    return out


def size_groups(
    recordset: RecordSet,
    *,
    cutoffs_mm: float | Sequence[float] | None = None,
    terciles: bool = False,
    protocol: str = DEFAULT_PROTOCOL,
    **summary_kwargs,
) -> dict[str, dict]:
    """Summaries restricted to lesions of one size group each (equivalent diameter, mm).

    Groups: ``cutoffs_mm`` (e.g. ``CLINICAL_CUTOFFS_MM["luna16"]``, or several values) gives ``"<c mm"``,
    ``"a-b mm"``, ``">=c mm"`` with ``lo <= d < hi``; ``terciles=True`` gives ``"small"``, ``"medium"``,
    ``"large"`` split at the 1/3 and 2/3 quantiles of the lesion diameters.

    A group keeps, as the authors' ``get_size_df``: its lesions, the predicted components whose own diameter
    falls in the group, and the components linked to its lesions. Hence a false-positive component (hitting no
    lesion) is charged to the group of **its own size**, and a component linked to a lesion of another group
    is not a false positive of this group. Every image stays in the FP/image denominator; what else a group
    inherits from the whole record set is the protocol's ``group_kwargs`` (``paper2020``: ``n_ids`` and the
    thresholds). ``summary_kwargs``: options of :func:`summarize`, passed to the protocols that take them.

    Returns:
        group name -> summary (as :func:`summarize`) plus ``bounds_mm`` ([low, high], None = open).
    """
    record = get_protocol(protocol)
    options = record.take(summary_kwargs)
    whole = _objects(recordset)
    groups = _group_bounds(whole.les_diameter, cutoffs_mm, terciles)
    inherited = record.group_kwargs(whole) if record.group_kwargs is not None else {}
    out: dict[str, dict] = {}
    for name, lo, hi in groups:
        objs = object_arrays(restrict_to_size(recordset, lo, hi))
        summary = record.summarize_fn(objs, **options, **inherited)
        summary["bounds_mm"] = [None if math.isinf(lo) else lo, None if math.isinf(hi) else hi]
        out[name] = summary
    return out

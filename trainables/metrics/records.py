"""Per-object records of one predicted volume (SPEC §7).

A *record* describes either a ground-truth lesion (``is_tum: True``) or a connected component of the binarised
prediction (``is_tum: False``), with the fields of the authors' ``prc_records.json`` so that their files and ours
feed the same summaries:

================  ==========================================================================================
field             meaning
================  ==========================================================================================
``obj``           ``"tum_<label>"`` / ``"pred_<label>"`` (26-connected label, raster order, from 1)
``is_tum``        ``True`` for a lesion, ``False`` for a predicted component
``diameter``      equivalent-sphere diameter ``(6 V / pi) ** (1/3)`` in mm, V = voxels x prod(spacing)
``volume_vox``    number of voxels of the object
``hit_dice``      lesion: Dice with the component that hits it (best Dice among the components allowed by
                  the hit rule), 0 if none. Component: best Dice among the lesions it hits, 0 = false positive
``hit_logit``     lesion: max logit of the hitting component (``-inf`` if none); component: ``+inf`` if it
                  hits a lesion, else ``-inf`` (the authors' convention)
``hit_max``       as ``hit_logit`` in probabilities (0 if none; 1 for a hitting component)
``hit_obj``       ``obj`` of the matched object of the other kind, ``None`` if none
``self_logit``    lesion: ``+inf``; component: its confidence, the max logit over its voxels
``self_stat``     lesion: 1; component: max probability over its voxels (``sigmoid(self_logit)``)
``n_overlap``     component only: number of lesions it overlaps by >= 1 voxel, whatever the rule (a merged
                  component touching many lesions shows up here)
================  ==========================================================================================

Hit rules (``HIT_RULES``), applied when records are made from volumes:

* ``"any"`` (default, the paper's): every overlapping (lesion, component) pair is a hit. A lesion takes the
  overlapping component of best Dice; a component overlapping any lesion is never a false positive; one component
  can hit several lesions.
* ``"fraction"``: a pair counts only if at least ``hit_threshold`` (default 0.5) of the **component** lies inside
  that lesion. Otherwise as ``"any"``.
* ``"iou"``: a pair counts only if IoU >= ``hit_threshold`` (default 0.3). Otherwise as ``"any"``.
* ``"one-to-one"``: greedy matching over the pairs (with IoU >= ``hit_threshold`` if given, else any
  overlap), best Dice first (ties: higher component confidence, then lower labels); each lesion and each
  component is matched at most once.

Under the stricter rules a component that ends up matched to no lesion **is** a false positive, even if it
touches one (that is the point of those rules).

Computation: both masks are labelled once (connected-components-3d if installed, else ``scipy.ndimage.label``;
full connectivity), every overlap and size comes from one joint histogram over the union of the foregrounds, and
the per-component max logit from one sort of the predicted foreground. No per-object pass over the volume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, logit

from trainables.weights import label_components

__all__ = [
    "HIT_RULES",
    "DEFAULT_HIT_THRESHOLDS",
    "REQUIRED_FIELDS",
    "CaseRecords",
    "RecordSet",
    "equivalent_diameter",
    "volume_records",
    "volume_records_multi",
]

HIT_RULES = ("any", "fraction", "iou", "one-to-one")
#: threshold used when ``hit_threshold`` is None (``one-to-one``: None = any overlap)
DEFAULT_HIT_THRESHOLDS: dict[str, float | None] = {
    "any": None,
    "fraction": 0.5,
    "iou": 0.3,
    "one-to-one": None,
}
#: fields every record must carry (the summaries read nothing else)
REQUIRED_FIELDS = ("is_tum", "diameter", "hit_dice", "hit_logit", "self_logit")

# dense joint histogram up to this many bins, np.unique on the overlap codes above
_DENSE_HIST_LIMIT = 1 << 24


@dataclass
class CaseRecords:
    """Records of one image plus over-segmentation diagnostics.

    Args:
        records: one dict per lesion and per predicted component (fields: module docstring).
        n_voxels: voxels in the image; ``None`` when unknown (records loaded from the authors' files).
        n_pred_positive: voxels with p > 0.5 (logit > 0); ``None`` when unknown.
    """

    records: list[dict] = field(default_factory=list)
    n_voxels: int | None = None
    n_pred_positive: int | None = None


#: case id -> records. Images with no lesion and no prediction are present with an empty list.
RecordSet = dict[str, CaseRecords]


def equivalent_diameter(n_voxels: np.ndarray | float, spacing: Sequence[float]) -> np.ndarray:
    """Equivalent-sphere diameter ``(6 V / pi) ** (1/3)`` in mm, V = ``n_voxels * prod(spacing)`` in mm³."""
    volume = np.asarray(n_voxels, dtype=np.float64) * float(np.prod(np.asarray(spacing, dtype=np.float64)))
    return np.cbrt(6.0 * volume / math.pi)


def _check_rule(rule: str, threshold: float | None) -> float | None:
    if rule not in HIT_RULES:
        raise ValueError(f"unknown hit rule {rule!r}; expected one of {', '.join(HIT_RULES)}")
    if rule == "any":
        if threshold is not None:
            raise ValueError("hit rule 'any' takes no hit_threshold (any voxel of overlap is a hit)")
        return None
    if threshold is None:
        threshold = DEFAULT_HIT_THRESHOLDS[rule]
    if threshold is not None and not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"hit_threshold of rule {rule!r} must be in (0, 1], got {threshold}")
    return None if threshold is None else float(threshold)


@dataclass(frozen=True)
class _Overlaps:
    """Everything the hit rules need, from one labelling of each mask (internal)."""

    size_gt: np.ndarray  # (n_gt,) voxels per lesion
    size_pred: np.ndarray  # (n_pred,) voxels per component
    conf: np.ndarray  # (n_pred,) max logit per component (float64)
    stat: np.ndarray  # (n_pred,) max probability per component
    pair_g: np.ndarray  # (n_pairs,) 0-based lesion index of each overlapping pair
    pair_p: np.ndarray  # (n_pairs,) 0-based component index
    pair_inter: np.ndarray  # (n_pairs,) overlap voxels
    n_voxels: int

    @property
    def dice(self) -> np.ndarray:
        return 2.0 * self.pair_inter / (self.size_gt[self.pair_g] + self.size_pred[self.pair_p])

    @property
    def iou(self) -> np.ndarray:
        union = self.size_gt[self.pair_g] + self.size_pred[self.pair_p] - self.pair_inter
        return self.pair_inter / union


def _overlaps(pred: np.ndarray, gt: np.ndarray, is_logit: bool, threshold: float = 0.5) -> _Overlaps:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D volume, got shape {pred.shape}")
    if not np.issubdtype(pred.dtype, np.floating):
        pred = pred.astype(np.float32)
    if np.isnan(pred).any():
        raise ValueError("pred contains NaN")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
    pred_fg = pred > math.log(threshold / (1.0 - threshold)) if is_logit else pred > threshold
    gt_fg = gt > 0.5
    gt_lab, n_gt = label_components(gt_fg)
    pred_lab, n_pred = label_components(pred_fg)

    union = gt_fg | pred_fg
    g_u = gt_lab[union].astype(np.int64)
    p_u = pred_lab[union].astype(np.int64)
    width = n_pred + 1
    codes = g_u * width + p_u
    if (n_gt + 1) * width <= _DENSE_HIST_LIMIT:
        hist = np.bincount(codes, minlength=(n_gt + 1) * width).reshape(n_gt + 1, width)
        size_gt = hist[1:, :].sum(axis=1)
        size_pred = hist[:, 1:].sum(axis=0)
        pg, pp = np.nonzero(hist[1:, 1:])
        inter = hist[1:, 1:][pg, pp]
    else:  # many components: sparse histogram of the same codes
        uniq, counts = np.unique(codes, return_counts=True)
        g, p = np.divmod(uniq, width)
        size_gt = np.bincount(g, weights=counts, minlength=n_gt + 1)[1:].astype(np.int64)
        size_pred = np.bincount(p, weights=counts, minlength=width)[1:].astype(np.int64)
        both = (g > 0) & (p > 0)
        pg, pp, inter = g[both] - 1, p[both] - 1, counts[both]

    # max of pred per component: one stable sort of the predicted foreground
    in_pred = p_u > 0
    labs = p_u[in_pred]
    vals = pred[union][in_pred].astype(np.float64)
    if n_pred:
        order = np.argsort(labs, kind="stable")
        starts = np.searchsorted(labs[order], np.arange(1, n_pred + 1))
        peak = np.maximum.reduceat(vals[order], starts)
    else:
        peak = np.zeros(0)
    if is_logit:
        conf, stat = peak, expit(peak)
    else:
        conf, stat = logit(np.clip(peak, 0.0, 1.0)), peak
    return _Overlaps(
        size_gt=np.asarray(size_gt, dtype=np.int64),
        size_pred=np.asarray(size_pred, dtype=np.int64),
        conf=np.asarray(conf, dtype=np.float64),
        stat=np.asarray(stat, dtype=np.float64),
        pair_g=np.asarray(pg, dtype=np.int64),
        pair_p=np.asarray(pp, dtype=np.int64),
        pair_inter=np.asarray(inter, dtype=np.float64),
        n_voxels=int(pred.size),
    )


def _best_per_group(group: np.ndarray, keys: Sequence[np.ndarray], n_groups: int) -> np.ndarray:
    """Index (into the pair arrays) of the pair with the lexicographically largest ``keys`` per group; -1 if none."""
    best = np.full(n_groups, -1, dtype=np.int64)
    if group.size:
        order = np.lexsort(tuple(reversed(keys)) + (group,))  # primary: group, then keys[0], keys[1], ...
        last = np.r_[group[order][1:] != group[order][:-1], True]
        best[group[order][last]] = order[last]
    return best


def _match(ov: _Overlaps, rule: str, threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Matched pair index per lesion and per component (-1 = none) under a hit rule."""
    n_gt, n_pred = ov.size_gt.size, ov.size_pred.size
    dice = ov.dice
    if rule == "any":
        valid = np.ones(dice.size, dtype=bool)
    elif rule == "fraction":
        valid = ov.pair_inter / ov.size_pred[ov.pair_p] >= threshold
    elif rule == "iou" or (rule == "one-to-one" and threshold is not None):
        valid = ov.iou >= threshold
    else:
        valid = np.ones(dice.size, dtype=bool)
    idx = np.flatnonzero(valid)
    g, p, d, c = ov.pair_g[idx], ov.pair_p[idx], dice[idx], ov.conf[ov.pair_p[idx]]

    if rule != "one-to-one":
        # lesion: best Dice, ties to the more confident component, then the lower label
        les = _best_per_group(g, (d, c, -p), n_gt)
        # component: best Dice, ties to the lower lesion label
        comp = _best_per_group(p, (d, -g), n_pred)
    else:
        les = np.full(n_gt, -1, dtype=np.int64)
        comp = np.full(n_pred, -1, dtype=np.int64)
        for k in np.lexsort((p, g, -c, -d)):  # greedy over pairs (not voxels), best Dice first
            if les[g[k]] < 0 and comp[p[k]] < 0:
                les[g[k]] = comp[p[k]] = k
    # back to indices into the full pair arrays
    for sel in (les, comp):
        hit = sel >= 0
        sel[hit] = idx[sel[hit]]
    return les, comp


def _records_from_overlaps(ov: _Overlaps, rule: str, threshold: float | None, spacing) -> CaseRecords:
    les, comp = _match(ov, rule, threshold)
    dice = ov.dice
    d_gt = equivalent_diameter(ov.size_gt, spacing)
    d_pred = equivalent_diameter(ov.size_pred, spacing)
    n_overlap = np.bincount(ov.pair_p, minlength=ov.size_pred.size)
    records: list[dict] = []
    for i in range(ov.size_gt.size):
        k = les[i]
        hit = k >= 0
        p = int(ov.pair_p[k]) if hit else -1
        records.append(
            {
                "obj": f"tum_{i + 1}",
                "is_tum": True,
                "diameter": float(d_gt[i]),
                "volume_vox": int(ov.size_gt[i]),
                "hit_dice": float(dice[k]) if hit else 0.0,
                "hit_logit": float(ov.conf[p]) if hit else -math.inf,
                "hit_max": float(ov.stat[p]) if hit else 0.0,
                "hit_obj": f"pred_{p + 1}" if hit else None,
                "self_logit": math.inf,
                "self_stat": 1.0,
            }
        )
    for j in range(ov.size_pred.size):
        k = comp[j]
        hit = k >= 0
        records.append(
            {
                "obj": f"pred_{j + 1}",
                "is_tum": False,
                "diameter": float(d_pred[j]),
                "volume_vox": int(ov.size_pred[j]),
                "hit_dice": float(dice[k]) if hit else 0.0,
                "hit_logit": math.inf if hit else -math.inf,
                "hit_max": 1.0 if hit else 0.0,
                "hit_obj": f"tum_{int(ov.pair_g[k]) + 1}" if hit else None,
                "self_logit": float(ov.conf[j]),
                "self_stat": float(ov.stat[j]),
                "n_overlap": int(n_overlap[j]),
            }
        )
    return CaseRecords(records=records, n_voxels=ov.n_voxels, n_pred_positive=int(ov.size_pred.sum()))


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(s > 0 and math.isfinite(s) for s in sp):
        raise ValueError(f"spacing must be {ndim} positive finite numbers (mm), got {tuple(spacing)}")
    return sp


def volume_records_multi(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    *,
    is_logit: bool = True,
    rules: Mapping[str, tuple[str, float | None]],
    threshold: float = 0.5,
) -> dict[str, CaseRecords]:
    """Records of one volume under several hit rules, labelling the volume once.

    Args:
        pred: logits (``is_logit=True``, foreground = logit > 0, i.e. p > 0.5) or probabilities in [0, 1]
            (foreground = p > 0.5), shape (D, H, W) (or (H, W)), any float dtype; no NaN.
        gt: ground-truth mask of the same shape (foreground = value > 0.5: bool, {0, 1} or a float mask).
        spacing: voxel size in mm along each axis of ``pred``.
        is_logit: whether ``pred`` holds logits.
        rules: name -> ``(rule, hit_threshold)``, e.g. ``{"any": ("any", None), "strict": ("iou", 0.3)}``;
            ``rule`` in :data:`HIT_RULES`, ``hit_threshold`` None = the rule's default.
        threshold: the probability above which a voxel is foreground (the paper: 0.5; a calibrated one is chosen
            on validation). Confidences stay the components' max logits.

    Returns:
        name -> :class:`CaseRecords` (records: lesions first, then components, each in label order).
    """
    checked = {name: (r, _check_rule(r, t)) for name, (r, t) in rules.items()}
    pred = np.asarray(pred)
    sp = _check_spacing(spacing, pred.ndim)
    ov = _overlaps(pred, gt, is_logit, threshold)
    return {name: _records_from_overlaps(ov, r, t, sp) for name, (r, t) in checked.items()}


def volume_records(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    *,
    is_logit: bool = True,
    hit_rule: str = "any",
    hit_threshold: float | None = None,
) -> CaseRecords:
    """Records of one volume under one hit rule (see :func:`volume_records_multi` for the arguments)."""
    rules = {"_": (hit_rule, hit_threshold)}
    return volume_records_multi(pred, gt, spacing, is_logit=is_logit, rules=rules)["_"]

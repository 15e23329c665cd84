"""Per-object records of one predicted volume (docs/definitions.md §7), and the hit-rule registry.

Holds :func:`volume_records` / :func:`volume_records_multi` (volume -> :class:`CaseRecords`), the record
types (:class:`CaseRecords`, ``RecordSet``, ``REQUIRED_FIELDS``), :func:`equivalent_diameter`, and the hit rules:
one :class:`HitRule` record per rule in ``HIT_RULES`` (name -> record, :func:`register_hit_rule`).

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

Hit rules, applied when records are made from volumes. A rule is a :class:`HitRule` record: which overlapping
(lesion, component) pairs may hit (``pairs``, a function of the overlaps and the threshold), how the hits are
assigned (``assign``: :func:`_best_per_object` or :func:`_greedy_one_to_one`), whether it takes a
``hit_threshold`` and its default, whether a study may show it as its strict rule, a one-line doc and the label
reports give it. Adding a rule = one ``pairs``
function (or an ``assign`` one) + one record; validation (here and in the study config) reads the record.

* ``"any"`` (default, the paper's): every overlapping (lesion, component) pair is a hit. A lesion takes the
  overlapping component of best Dice (ties: the more confident component, then the lower label); a component
  overlapping any lesion is never a false positive; one component can hit several lesions.
* ``"fraction"``: a pair counts only if at least ``hit_threshold`` (default 0.5) of the **component** lies inside
  that lesion. Otherwise as ``"any"``.
* ``"iou"``: a pair counts only if IoU >= ``hit_threshold`` (default 0.3). Otherwise as ``"any"``.
* ``"one-to-one"``: greedy matching over the pairs (with IoU >= ``hit_threshold`` if given, else any
  overlap), best Dice first (ties: higher component confidence, then lower labels); each lesion and each
  component is matched at most once.
* ``"hungarian"``: the one-to-one assignment that minimises Σ(1 − IoU) over the pairs with IoU >=
  ``hit_threshold`` (default 0.5), a pair below it costing as much as no match (``linear_sum_assignment``;
  panoptica's ``MaxBipartiteMatching``). Each lesion and component is matched at most once.

Under the stricter rules a component that ends up matched to no lesion **is** a false positive, even if it
touches one (that is the point of those rules).

Computation: both masks are labelled once (connected-components-3d if installed, else ``scipy.ndimage.label``;
full connectivity), every overlap and size comes from one joint histogram over the union of the foregrounds, and
the per-component max logit from one sort of the predicted foreground. No per-object pass over the volume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from trainables.registry import Registry

__all__ = [
    "HitRule",
    "HIT_RULES",
    "DEFAULT_HIT_THRESHOLDS",
    "register_hit_rule",
    "get_hit_rule",
    "REQUIRED_FIELDS",
    "CaseRecords",
    "RecordSet",
    "equivalent_diameter",
    "volume_records",
    "volume_records_multi",
]

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


def _overlaps(pred: np.ndarray, gt: np.ndarray, is_logit: bool, threshold: float = 0.5,
              foreground: np.ndarray | None = None,
              gt_labels: tuple[np.ndarray, int] | None = None) -> _Overlaps:
    # imported here so that the registries (read by the command line) do not load scipy
    from scipy.special import expit, logit

    from trainables.weights import label_components

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
    if foreground is None:
        pred_fg = pred > math.log(threshold / (1.0 - threshold)) if is_logit else pred > threshold
    else:  # binarised where the logits were made (on the GPU: trainables.evaluate)
        if foreground.shape != pred.shape or foreground.dtype != np.bool_:
            raise ValueError(f"foreground must be a bool mask of shape {pred.shape}, got {foreground.dtype} "
                             f"{foreground.shape}")
        pred_fg = foreground
    gt_fg = gt > 0.5
    gt_lab, n_gt = label_components(gt_fg) if gt_labels is None else gt_labels
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


# ------------------------------------------------------------------------------------------------ hit rules
# pairs(ov, threshold) -> (n_pairs,) bool: the overlapping pairs that may hit


def _all_pairs(ov: _Overlaps, threshold: float | None) -> np.ndarray:
    return np.ones(ov.pair_inter.size, dtype=bool)


def _component_fraction_pairs(ov: _Overlaps, threshold: float | None) -> np.ndarray:
    return ov.pair_inter / ov.size_pred[ov.pair_p] >= threshold


def _iou_pairs(ov: _Overlaps, threshold: float | None) -> np.ndarray:
    return ov.iou >= threshold


def _iou_pairs_if_threshold(ov: _Overlaps, threshold: float | None) -> np.ndarray:
    return _all_pairs(ov, threshold) if threshold is None else _iou_pairs(ov, threshold)


# assign(g, p, dice, conf, n_gt, n_pred) -> (lesion -> pair, component -> pair), -1 = none; the pair arrays are
# those of the allowed pairs


def _best_per_object(g, p, d, c, n_gt: int, n_pred: int) -> tuple[np.ndarray, np.ndarray]:
    """Every object takes its best allowed pair; a component may hit several lesions."""
    # lesion: best Dice, ties to the more confident component, then the lower label
    les = _best_per_group(g, (d, c, -p), n_gt)
    # component: best Dice, ties to the lower lesion label
    comp = _best_per_group(p, (d, -g), n_pred)
    return les, comp


def _greedy_one_to_one(g, p, d, c, n_gt: int, n_pred: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy over the pairs (not voxels), best Dice first; every object matched at most once."""
    les = np.full(n_gt, -1, dtype=np.int64)
    comp = np.full(n_pred, -1, dtype=np.int64)
    for k in np.lexsort((p, g, -c, -d)):
        if les[g[k]] < 0 and comp[p[k]] < 0:
            les[g[k]] = comp[p[k]] = k
    return les, comp


def _hungarian(g, p, d, c, n_gt: int, n_pred: int) -> tuple[np.ndarray, np.ndarray]:
    """The one-to-one assignment minimising Σ (1 − IoU) over the allowed pairs, a pair outside them costing as
    much as no match (``scipy.optimize.linear_sum_assignment``; panoptica's ``MaxBipartiteMatching``)."""
    from scipy.optimize import linear_sum_assignment

    les = np.full(n_gt, -1, dtype=np.int64)
    comp = np.full(n_pred, -1, dtype=np.int64)
    if g.size == 0:
        return les, comp
    rows, gi = np.unique(g, return_inverse=True)
    cols, pi = np.unique(p, return_inverse=True)
    cost = np.ones((rows.size, cols.size))
    pair = np.full((rows.size, cols.size), -1, dtype=np.int64)
    cost[gi, pi] = 1.0 - d / (2.0 - d)  # IoU = Dice / (2 - Dice)
    pair[gi, pi] = np.arange(g.size)
    for r, q in zip(*linear_sum_assignment(cost)):
        k = pair[r, q]
        if k >= 0:
            les[g[k]] = comp[p[k]] = k
    return les, comp


@dataclass(frozen=True)
class HitRule:
    """One hit rule: which overlapping (lesion, component) pairs may hit, and how hits are assigned.

    Attributes:
        name: registry key (``volume_records(hit_rule=name)``, ``evaluation.strict.rule`` of a study).
        pairs: ``(overlaps, threshold) -> (n_pairs,) bool``, the pairs that may hit.
        assign: :func:`_best_per_object` (every object takes its best allowed pair) or
            :func:`_greedy_one_to_one`.
        doc: one line that completes "a lesion is hit when ..." (``study catalog``, error messages).
        takes_threshold: whether it accepts a ``hit_threshold`` (then in (0, 1]); False = giving one is an error.
        strict: whether a study may show it as its strict rule beside ``any`` (``evaluation.strict.rule``).
        default_threshold: the threshold used when ``hit_threshold`` is None; None = no threshold (for a rule
            that takes one: optional, e.g. ``one-to-one`` without a threshold matches on any overlap).
        label: how reports name it, ``str.format``-ted with ``threshold`` (e.g. ``"IoU ≥ {threshold:g}"``).
    """

    name: str
    pairs: Callable[[_Overlaps, float | None], np.ndarray]
    assign: Callable[..., tuple[np.ndarray, np.ndarray]]
    doc: str
    takes_threshold: bool
    strict: bool
    default_threshold: float | None = None
    label: str = ""
    checked: str = ""  # what the tests check it against (a peer library, a brute-force reference)

    @property
    def threshold_optional(self) -> bool:
        """Takes a threshold but works without one (no default)."""
        return self.takes_threshold and self.default_threshold is None

    def check_threshold(self, threshold: float | None) -> float | None:
        """The threshold to use (the default when None); ValueError if the rule cannot take ``threshold``."""
        if not self.takes_threshold:
            if threshold is not None:
                raise ValueError(
                    f"hit rule {self.name!r} takes no hit_threshold (a lesion is hit when {self.doc})"
                )
            return None
        if threshold is None:
            threshold = self.default_threshold
        if threshold is not None and not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"hit_threshold of rule {self.name!r} must be in (0, 1], got {threshold}")
        return None if threshold is None else float(threshold)

    def title(self, threshold: float | None = None) -> str:
        """``label`` with ``threshold`` (the default when None) filled in; the name when there is no label."""
        t = self.default_threshold if threshold is None else threshold
        return self.label.format(threshold=t) if self.label else self.name


#: hit rule name -> :class:`HitRule`, in registration order (a dict)
HIT_RULES: Registry[HitRule] = Registry("hit rule")
#: add a :class:`HitRule` (its name must be new); returns it
register_hit_rule = HIT_RULES.register
#: the record of a hit rule by name; ValueError naming the registered ones if unknown
get_hit_rule = HIT_RULES.lookup


register_hit_rule(
    HitRule(
        name="any",
        pairs=_all_pairs,
        assign=_best_per_object,
        doc="a component overlaps it by any voxel (the paper's rule)",
        checked="the authors' records (paper2020 fixture); a brute-force reference",
        takes_threshold=False,
        strict=False,
    )
)
register_hit_rule(
    HitRule(
        name="fraction",
        pairs=_component_fraction_pairs,
        assign=_best_per_object,
        doc="at least hit_threshold of a component's voxels lie inside it",
        takes_threshold=True,
        strict=True,
        default_threshold=0.5,
        label="component share ≥ {threshold:g}",
        checked="hand-built cases (a merged component, component shares)",
    )
)
register_hit_rule(
    HitRule(
        name="iou",
        pairs=_iou_pairs,
        assign=_best_per_object,
        doc="its IoU with a component is at least hit_threshold",
        takes_threshold=True,
        strict=True,
        default_threshold=0.3,
        label="IoU ≥ {threshold:g}",
        checked="hand-built cases (a merged component)",
    )
)
register_hit_rule(
    HitRule(
        name="one-to-one",
        pairs=_iou_pairs_if_threshold,
        assign=_greedy_one_to_one,
        doc="it is matched to a component one-to-one, greedily by Dice (IoU >= hit_threshold if given, "
        "else any overlap)",
        takes_threshold=True,
        strict=True,
        label="one-to-one",
        checked="panoptica NaiveThresholdMatching (IoU ≥ 0.5)",
    )
)


register_hit_rule(
    HitRule(
        name="hungarian",
        pairs=_iou_pairs,
        assign=_hungarian,
        doc="it is matched to a component by the one-to-one assignment minimising the sum of (1 - IoU) over "
        "pairs with IoU >= hit_threshold (Hungarian; panoptica's MaxBipartiteMatching)",
        takes_threshold=True,
        strict=True,
        default_threshold=0.5,
        label="Hungarian IoU ≥ {threshold:g}",
        checked="panoptica MaxBipartiteMatching; picai-eval evaluate_case",
    )
)


class _DefaultThresholds(Mapping[str, float | None]):
    """Read-only view name -> ``HIT_RULES[name].default_threshold`` (kept for older callers)."""

    def __getitem__(self, name: str) -> float | None:
        return HIT_RULES[name].default_threshold

    def __iter__(self) -> Iterator[str]:
        return iter(HIT_RULES)

    def __len__(self) -> int:
        return len(HIT_RULES)

    def __repr__(self) -> str:
        return repr(dict(self))


#: threshold used when ``hit_threshold`` is None (``one-to-one``: None = any overlap); a view of ``HIT_RULES``
DEFAULT_HIT_THRESHOLDS: Mapping[str, float | None] = _DefaultThresholds()


def _match(ov: _Overlaps, rule: str, threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Matched pair index per lesion and per component (-1 = none) under a hit rule."""
    record = HIT_RULES[rule]
    idx = np.flatnonzero(record.pairs(ov, threshold))
    g, p, d, c = ov.pair_g[idx], ov.pair_p[idx], ov.dice[idx], ov.conf[ov.pair_p[idx]]
    les, comp = record.assign(g, p, d, c, ov.size_gt.size, ov.size_pred.size)
    # back to indices into the full pair arrays
    for sel in (les, comp):
        hit = sel >= 0
        sel[hit] = idx[sel[hit]]
    return les, comp


def _take(values: np.ndarray, index: np.ndarray, fill: float) -> np.ndarray:
    """``values[index]``, ``fill`` where ``index < 0`` (no match); dtype of ``values``."""
    out = np.full(index.shape, fill, dtype=values.dtype)
    hit = index >= 0
    out[hit] = values[index[hit]]
    return out


def _names(prefix: str, labels: np.ndarray) -> list[str | None]:
    """``prefix_<label + 1>`` per 0-based label, None where ``label < 0``."""
    return [None if k < 0 else f"{prefix}_{k + 1}" for k in labels.tolist()]


def _records_from_overlaps(ov: _Overlaps, rule: str, threshold: float | None, spacing) -> CaseRecords:
    """One record per object, lesions first, then components (fields: module docstring)."""
    les, comp = _match(ov, rule, threshold)
    n_gt, n_pred = ov.size_gt.size, ov.size_pred.size
    comp_of_les = _take(ov.pair_p, les, -1)  # 0-based component hitting each lesion, -1 = none
    les_of_comp = _take(ov.pair_g, comp, -1)  # 0-based lesion hit by each component, -1 = none
    comp_hits = comp >= 0
    sizes = np.concatenate([ov.size_gt, ov.size_pred])
    columns = {
        "obj": _names("tum", np.arange(n_gt)) + _names("pred", np.arange(n_pred)),
        "is_tum": [True] * n_gt + [False] * n_pred,
        "diameter": equivalent_diameter(sizes, spacing).tolist(),
        "volume_vox": sizes.tolist(),
        "hit_dice": _take(ov.dice, np.concatenate([les, comp]), 0.0).tolist(),
        "hit_logit": np.r_[
            _take(ov.conf, comp_of_les, -math.inf), np.where(comp_hits, math.inf, -math.inf)
        ].tolist(),
        "hit_max": np.r_[_take(ov.stat, comp_of_les, 0.0), np.where(comp_hits, 1.0, 0.0)].tolist(),
        "hit_obj": _names("pred", comp_of_les) + _names("tum", les_of_comp),
        "self_logit": np.r_[np.full(n_gt, math.inf), ov.conf].tolist(),
        "self_stat": np.r_[np.ones(n_gt), ov.stat].tolist(),
    }
    records = [dict(zip(columns, row)) for row in zip(*columns.values())]
    for record, n in zip(records[n_gt:], np.bincount(ov.pair_p, minlength=n_pred).tolist()):
        record["n_overlap"] = n
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
    foreground: np.ndarray | None = None,
    gt_labels: tuple[np.ndarray, int] | None = None,
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
        foreground: ``pred`` binarised at ``threshold`` already (a bool mask, e.g. computed on the GPU that made
            the logits); None = binarised here. Must equal what this function would compute.
        gt_labels: ``label_components(gt > 0.5)`` already (labels, count), e.g. shared by the records of one case
            at several thresholds; None = labelled here.

    Returns:
        name -> :class:`CaseRecords` (records: lesions first, then components, each in label order).
    """
    checked = {name: (r, get_hit_rule(r).check_threshold(t)) for name, (r, t) in rules.items()}
    pred = np.asarray(pred)
    sp = _check_spacing(spacing, pred.ndim)
    ov = _overlaps(pred, gt, is_logit, threshold, foreground, gt_labels)
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

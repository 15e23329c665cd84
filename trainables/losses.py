"""The losses: the paper's six and the lesion-aware ones since (dice_ce, blob, cc_dice_ce), one registry record each.

Logits in, an optional per-voxel weight map (inverse weights) for the losses that take one.

docs/definitions.md §2 (the paper and the authors' code). Every loss has the same call::

    loss(logits, target, weight=None, **params) -> scalar tensor

- ``logits``: float tensor ``(B, 1, *spatial)``, raw network outputs (one output channel, sigmoid activation).
- ``target``: same shape, binary ``{0, 1}`` (soft values in ``[0, 1]`` are accepted and used as given); any
  dtype, cast to the dtype of ``logits``.
- ``weight``: ``None`` or a non-negative tensor of the same shape (the iw map of :mod:`trainables.weights`); only
  for the losses with ``supports_iw(name)`` (bce, focal, dice, asl, dice_ce); passing one to another loss raises
  ValueError.

With ``p = sigmoid(logits)``, ``y = target``, ``w = weight`` (1 when ``None``); "per sample" = summed over the
channel and spatial axes, then averaged over the batch:

- bce: ``w * BCE(p, y)``; mean over all voxels.
- focal: ``-w [a (1-p)^g y log p + (1-a) p^g (1-y) log(1-p)]``, g = 2, a = 0.75; mean over all voxels.
- wce: ``-[r y log p + (1-y) log(1-p)]``, ``r = (n - Σp) / Σp`` over the whole batch tensor (not detached);
  mean over all voxels.
- dice: ``1 - 2 Σ wpy / Σ w(p² + y²)``; per sample.
- asl: ``1 - (1+β²) Σ wpy / Σ w(β² y² + p²)`` (authors, default) or ``/ Σ w(β² y + p)`` (paper); per sample.
- gdl: channels ``[p, 1-p]`` vs ``[y, 1-y]``, ``c_k = 1 / (1 + (Σ y_k)²)``,
  ``1 - 2 Σ_k c_k Σ p_k y_k / Σ_k c_k Σ (p_k² + y_k²)``; per sample.

Numerics: ``log p`` and ``log(1 - p)`` are ``logsigmoid(±x)`` and ``(1 - p)^g = exp(g * logsigmoid(-x))``, never
``log(sigmoid(x))``; ``1 - p`` is ``sigmoid(-x)``. Two guards keep every loss and gradient finite at logits of
±100 and on patches without lesion, in float32 and float64:

- Ratio losses (dice, asl, gdl): the denominator is clamped from below at the smallest normal number of the dtype
  (``torch.finfo(dtype).tiny``). Binary targets make a denominator that small only when ``Σ w y = 0`` and the
  predictions underflow (``p² = 0`` in float32 below logits of about -52), where the numerator is exactly 0 too:
  the loss is then 1 with zero gradient, as the authors' unsmoothed Dice gives on an empty patch, instead of
  0/0 = NaN. Everywhere else the value is the unsmoothed formula, bit for bit.
- wce: the ratio ``(n - s) / s`` uses ``max(s, n * eps)`` with ``eps = torch.finfo(dtype).eps``: the mean
  predicted (or target) foreground is floored at machine epsilon, which bounds the positive weight by ``1/eps``
  (8.4e6 in float32, 4.5e15 in float64). Without it logits of -100 give ``s = 3.7e-44 n`` and an infinite
  weight (NaN loss on an empty patch, inf otherwise). It changes the authors' value only when the network
  predicts, on average, less than ``eps`` foreground per voxel (then ``r`` is capped and no gradient flows
  through it). For binary targets with ``pos_weight="target"`` it only changes empty batches, whose positive
  term is 0 anyway.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.registry import Registry

__all__ = [
    "LOSSES",
    "blob_loss",
    "cc_dice_ce_loss",
    "dice_ce_loss",
    "LOSS_NAMES",
    "LossParam",
    "LossRecord",
    "PAPER_CONFIGS",
    "asl_loss",
    "bce_loss",
    "dice_loss",
    "focal_loss",
    "gdl_loss",
    "get_loss",
    "loss_record",
    "register_loss",
    "number",
    "choice",
    "canonical_params",
    "loss_params",
    "supports_iw",
    "wce_loss",
]

LossFn = Callable[..., Tensor]

_WCE_POS_WEIGHTS = ("prediction", "target")
_ASL_FORMS = ("squared", "fbeta")


def _checked(name: str):
    """A loss function called directly (``focal_loss(..., alpha=...)``) checks the parameters it is given against
    its registry record. :func:`get_loss` checks them once and binds the function under the check
    (``__wrapped__``), so a training step does not check them again."""
    def wrap(fn: LossFn) -> LossFn:
        @functools.wraps(fn)
        def checked(logits: Tensor, target: Tensor, weight: Tensor | None = None, **params: Any) -> Tensor:
            record = loss_record(name)
            record.check({k: v for k, v in params.items() if k not in record.needs})
            return fn(logits, target, weight, **params)
        return checked
    return wrap


# --------------------------------------------------------------------------------------------------------------
# the losses


def bce_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Binary cross-entropy from logits, optionally weighted per voxel; mean over all ``B*1*spatial`` voxels.

    ``-w [y log p + (1-y) log(1-p)]`` (dpipe ``weighted_cross_entropy_with_logits``, alpha=1, adaptive=False).
    Shapes: see the module docstring. Returns a scalar ``>= 0``.
    """
    target, weight = _check_inputs("bce", logits, target, weight)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return _weighted_mean(loss, weight)


@_checked("focal")
def focal_loss(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, gamma: float = 2.0, alpha: float = 0.75
) -> Tensor:
    """Focal loss (Lin et al.) with the RetinaNet alpha, optionally weighted per voxel; mean over all voxels.

    ``-w [alpha (1-p)^gamma y log p + (1-alpha) p^gamma (1-y) log(1-p)]`` (paper Tab. 1; dpipe
    ``focal_loss_with_logits`` and MONAI ``FocalLoss(gamma, alpha)`` for binary targets).

    Args:
        gamma: focusing exponent, ``>= 0`` (0 gives alpha-balanced BCE). Paper: 2.
        alpha: weight of the positive class, in ``(0, 1)``; negatives get ``1 - alpha``. Paper: 0.75.
    """
    target, weight = _check_inputs("focal", logits, target, weight)
    log_p = F.logsigmoid(logits)  # log p
    log_not_p = F.logsigmoid(-logits)  # log(1 - p)
    positive = alpha * torch.exp(gamma * log_not_p) * target * log_p  # alpha (1-p)^g y log p
    negative = (1.0 - alpha) * torch.exp(gamma * log_p) * (1.0 - target) * log_not_p
    return _weighted_mean(-(positive + negative), weight)


@_checked("wce")
def wce_loss(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, pos_weight: str = "prediction"
) -> Tensor:
    """Weighted cross-entropy with an adaptive positive-class weight; mean over all voxels. No iw.

    ``-[r y log p + (1-y) log(1-p)]`` with ``r = (n - s) / s``, ``n`` = number of elements of the whole batch
    tensor and

    - ``pos_weight="prediction"`` (authors, default): ``s = Σ p`` over the batch, **not detached**: the gradient
      flows through ``r`` (dpipe ``weighted_cross_entropy_with_logits(adaptive=True)``; the paper's ``Σ p_i``).
    - ``pos_weight="target"``: ``s = Σ y`` (the textbook class-frequency weight).

    ``s`` is floored at ``n * eps`` (module docstring), so ``r <= 1/eps``.
    """
    target, weight = _check_inputs("wce", logits, target, weight)
    n = float(logits.numel())
    if pos_weight == "prediction":
        total = torch.sigmoid(logits).sum()
    else:
        total = target.sum()
    total = total.clamp_min(n * torch.finfo(logits.dtype).eps)
    ratio = (n - total) / total
    loss = -(ratio * target * F.logsigmoid(logits) + (1.0 - target) * F.logsigmoid(-logits))
    return loss.mean()


def dice_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Soft Dice loss with squared (V-Net) denominators, optionally weighted per voxel; per sample, batch mean.

    ``1 - 2 Σ w p y / Σ w (p² + y²)`` per sample (authors' ``iw.torch.dice_loss``; MONAI ``DiceLoss(sigmoid=True,
    squared_pred=True)`` without smoothing). No smoothing; the denominator guard of the module docstring only
    acts on a patch with no lesion and underflowing predictions (loss 1, zero gradient). Returns ``[0, 1]``.
    """
    target, weight = _check_inputs("dice", logits, target, weight)
    p = torch.sigmoid(logits)
    w = 1.0 if weight is None else weight
    numerator = 2.0 * _per_sample_sum(w * p * target)
    denominator = _per_sample_sum(w * (p * p + target * target))
    return (1.0 - _safe_ratio(numerator, denominator)).mean()


@_checked("asl")
def asl_loss(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    beta: float = 1.5,
    form: str = "squared",
) -> Tensor:
    """Asymmetric similarity loss, optionally weighted per voxel; per sample, batch mean.

    - ``form="squared"`` (authors' trained ``asymmetric_similarity_loss``, default):
      ``1 - (1+β²) Σ w p y / Σ w (β² y² + p²)``.
    - ``form="fbeta"`` (the paper's Tab. 1, Hashemi's F-β): ``1 - (1+β²) Σ w p y / Σ w (β² y + p)``; at ``w = 1``
      it is MONAI ``TverskyLoss(alpha=1/(1+β²), beta=β²/(1+β²))`` without smoothing.

    Args:
        beta: ``> 0``; weight of recall over precision. Paper: 1.5.
        form: ``"squared"`` or ``"fbeta"``.
    """
    target, weight = _check_inputs("asl", logits, target, weight)
    p = torch.sigmoid(logits)
    w = 1.0 if weight is None else weight
    beta2 = float(beta) ** 2
    numerator = (1.0 + beta2) * _per_sample_sum(w * p * target)
    if form == "squared":
        denominator = _per_sample_sum(w * (beta2 * target * target + p * p))
    else:
        denominator = _per_sample_sum(w * (beta2 * target + p))
    return (1.0 - _safe_ratio(numerator, denominator)).mean()


def gdl_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Generalised Dice loss over the two classes [lesion, background]; per sample, batch mean. No iw.

    Channels ``[p, 1-p]`` and ``[y, 1-y]``; per sample and class ``c_k = 1 / (1 + (Σ y_k)²)``;
    ``1 - 2 Σ_k c_k Σ p_k y_k / Σ_k c_k Σ (p_k² + y_k²)`` (authors' ``generalized_dice_loss``: squared
    denominators, ``1 +`` in the class weight so an absent class gets weight 1 rather than inf).
    """
    target, weight = _check_inputs("gdl", logits, target, weight)
    probs = torch.cat([torch.sigmoid(logits), torch.sigmoid(-logits)], dim=1)  # [p, 1 - p], 1-p stable
    targets = torch.cat([target, 1.0 - target], dim=1)
    spatial = tuple(range(2, logits.ndim))
    class_weight = 1.0 / (1.0 + targets.sum(dim=spatial) ** 2)  # (B, 2)
    intersection = (probs * targets).sum(dim=spatial)  # (B, 2)
    squares = (probs * probs + targets * targets).sum(dim=spatial)  # (B, 2)
    numerator = 2.0 * (class_weight * intersection).sum(dim=1)
    denominator = (class_weight * squares).sum(dim=1)
    return (1.0 - _safe_ratio(numerator, denominator)).mean()


@_checked("dice_ce")
def dice_ce_loss(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, smooth: float = 1e-5,
    lambda_ce: float = 1.0, lambda_dice: float = 1.0,
) -> Tensor:
    """Dice + cross-entropy, nnU-Net's default compound; optionally weighted per voxel (iw multiplies both).

    ``lambda_ce * mean(w BCE) + lambda_dice * mean_b [1 - (2 Σ w p y + s) / (Σ w (p + y) + s)]`` with
    ``s = smooth`` (nnU-Net ``DC_and_CE_loss``: weights 1 and 1, smooth 1e-5, linear denominators; at w = 1 MONAI
    ``DiceCELoss(sigmoid=True)``). The smoothing keeps an empty patch finite: its Dice term tends to 0 as the
    predictions go to 0.
    """
    target, weight = _check_inputs("dice_ce", logits, target, weight)
    ce = _weighted_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), weight)
    p = torch.sigmoid(logits)
    w = 1.0 if weight is None else weight
    numerator = 2.0 * _per_sample_sum(w * p * target) + smooth
    denominator = _per_sample_sum(w * (p + target)) + smooth
    return lambda_ce * ce + lambda_dice * (1.0 - numerator / denominator).mean()


@_checked("blob")
def blob_loss(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, *, labels: Tensor | None = None,
    lambda_main: float = 2.0, lambda_blob: float = 1.0,
) -> Tensor:
    """Blob loss (Kofler et al. 2022) with Dice as the loss: ``lambda_main * dice(p, y) + lambda_blob * blob``.

    ``blob`` = for each ground-truth component k of a sample (``labels == k``), the Dice loss of the region
    "background ∪ k" (every other component masked out of prediction and target), averaged over the sample's
    components, then over the samples that have any; 0 when the batch holds no lesion (the global term remains).
    Both Dice terms are this module's squared, unsmoothed :func:`dice_loss` (the same guard on empty regions).

    Args:
        labels: ``(B, 1, *spatial)`` integer instance labels of the patch, 0 = background (the cached
            26-connected labels cropped with the patch; the sampler yields them). ``target`` must be
            ``labels > 0``.
        lambda_main, lambda_blob: weights of the global and the per-lesion term, ``>= 0``; default 2 and 1 (the
            weighting of the blob loss paper's experiments, as we read it).
    """
    target, weight = _check_inputs("blob", logits, target, weight)
    labels = _check_instances("blob", "labels", labels, logits)
    main = dice_loss(logits, target, weight)
    p = torch.sigmoid(logits)
    w = torch.ones_like(p) if weight is None else weight
    sums, present, n_keys = _region_sums(labels, (w * p * target, w * p * p, w * target * target))
    inter, pred2, true2 = sums
    per_sample = n_keys  # keys are b * n_keys_per_sample + label
    k = torch.arange(inter.numel(), device=logits.device)
    background = (k // per_sample) * per_sample  # the key of the same sample's background
    lesion = present & (k % per_sample != 0)
    dice_k = 1.0 - _safe_ratio(2.0 * inter, pred2[background] + pred2 + true2)
    # per sample: the mean over its lesions; then the mean over samples with any (0 when none): no host sync
    sample = k // per_sample
    on = lesion.to(p.dtype)
    n_b = torch.zeros(logits.shape[0], dtype=p.dtype, device=p.device).index_add_(0, sample, on)
    sum_b = torch.zeros_like(n_b).index_add_(0, sample, dice_k * on)
    has = (n_b > 0).to(p.dtype)
    blob = (sum_b / n_b.clamp_min(1.0)).sum() / has.sum().clamp_min(1.0)
    return lambda_main * main + lambda_blob * blob


@_checked("cc_dice_ce")
def cc_dice_ce_loss(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, *, regions: Tensor | None = None,
    smooth: float = 1e-5,
) -> Tensor:
    """CC-DiceCE (CC-Metrics, Jaus et al.): Dice + CE inside each Voronoi region of the ground-truth components,
    averaged over the regions of the batch, so every lesion counts once whatever its size. No iw.

    Per region r: ``mean_r(BCE) + 1 - (2 Σ_r p y + s) / (Σ_r (p + y) + s)``, ``s = smooth``. A sample without a
    lesion is one region (the whole patch): the per-lesion terms vanish and the global Dice + CE remains.

    Args:
        regions: ``(B, 1, *spatial)`` integer region ids: the label of the nearest ground-truth component
            (:func:`trainables.weights.voronoi_regions` of the patch's labels; the sampler yields them), 0 where
            the patch has no component. Cost: one exact distance transform per patch in the sampler's workers
            (measured about 4.5 ms at 32³, 41 ms at 64³, 0.58 s at 128³ on one core): at the paper's patch size
            give ``training.sampler_workers`` enough workers to keep up with the step.
    """
    target, weight = _check_inputs("cc_dice_ce", logits, target, weight)
    regions = _check_instances("cc_dice_ce", "regions", regions, logits)
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    (ce, inter, pred, true, count), present, _ = _region_sums(
        regions, (bce, p * target, p, target, torch.ones_like(p)))
    dice = 1.0 - (2.0 * inter + smooth) / (pred + true + smooth)
    per_region = ce / count.clamp_min(1.0) + dice
    return per_region[present].mean()


# --------------------------------------------------------------------------------------------------------------
# helpers


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------------------------
# registry: one record per loss


@dataclass(frozen=True)
class LossParam:
    """One parameter of a loss: its name, the values it accepts, a one-line doc, and its default, which is the
    loss function's own (:func:`register_loss` reads it from the signature: written once).

    ``accepts(value)`` says whether a value is valid; ``expect`` completes "must be ..." in the error message.
    Build with :func:`number` or :func:`choice`.
    """

    name: str
    doc: str
    accepts: Callable[[Any], bool]
    expect: str
    kind: type = object
    default: Any = None

    def check(self, loss: str, value: Any) -> None:
        if not self.accepts(value):
            raise ValueError(f"{loss}: {self.name} must be {self.expect}, got {value!r}")

    def canonical(self, value: Any) -> Any:
        """Numbers as floats (``2`` and ``2.0`` are one value), everything else as given."""
        return float(value) if self.kind is float and _is_real(value) else value


def number(name: str, doc: str, *, ge: float | None = None, gt: float | None = None,
           lt: float | None = None) -> LossParam:
    """A finite real parameter with optional bounds (``ge`` / ``gt`` below, ``lt`` above)."""
    def accepts(v: Any) -> bool:
        return _is_real(v) and (ge is None or v >= ge) and (gt is None or v > gt) and (lt is None or v < lt)

    if gt is not None and lt is not None:
        expect = f"a number in ({gt:g}, {lt:g})"
    else:
        bounds = [f">= {ge:g}" if ge is not None else "", f"> {gt:g}" if gt is not None else "",
                  f"< {lt:g}" if lt is not None else ""]
        expect = " ".join(["a finite number", *filter(None, bounds)])
    return LossParam(name, doc, accepts, expect, kind=float)


def choice(name: str, doc: str, options: tuple[str, ...]) -> LossParam:
    """A parameter taking one of ``options``."""
    return LossParam(name, doc, lambda v: isinstance(v, str) and v in options, f"one of {options}", kind=str)


@dataclass(frozen=True)
class LossRecord:
    """Everything the study knows about a loss: config validation, trial labels, MLflow params, the CLI's
    ``study catalog`` and docs/catalog.md all read this record.

    ``fn(logits, target, weight=None, **params)``; ``iw``: whether it takes the inverse-weight map;
    ``params``: its parameters in their order; ``paper``: one of the paper's six (its named configurations
    in :data:`PAPER_CONFIGS` are made from these records); ``needs``: what else of the batch it takes, by
    keyword: ``"labels"`` (the patch's instance labels) or ``"regions"`` (their Voronoi regions); the sampler
    yields them and the trainer passes them.
    """

    name: str
    fn: LossFn
    iw: bool
    doc: str
    params: tuple[LossParam, ...] = ()
    paper: bool = False
    needs: tuple[str, ...] = ()
    source: str = ""  # where the definition comes from
    checked: str = ""  # what the tests check it against (a peer library or the authors' code)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def check(self, params: Mapping[str, Any]) -> None:
        """ValueError for a parameter the loss does not take (listing the accepted ones) or a bad value."""
        accepted = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            listed = ", ".join(f"{p.name}={p.default!r}" for p in self.params) or "none"
            raise ValueError(f"loss {self.name!r} got unknown parameter(s) {unknown}; "
                             f"accepted (with defaults): {listed}")
        for key, value in params.items():
            accepted[key].check(self.name, value)


#: name -> record, in registration order (the paper's six first). Add a loss with :func:`register_loss`.
LOSSES: Registry[LossRecord] = Registry("loss", known="known losses:")


def register_loss(record: LossRecord) -> LossRecord:
    """Add a loss to the registry (its name must be new); returns the record. Each parameter's default is read
    from the function's signature, and every keyword parameter of the function (but the batch extras of
    ``needs``) must be declared in ``params`` and the other way round; the defaults must be valid."""
    import inspect

    fn = getattr(record.fn, "__wrapped__", record.fn)
    sig = {k: v for k, v in list(inspect.signature(fn).parameters.items())[3:] if k not in record.needs}
    declared = [p.name for p in record.params]
    if sorted(sig) != sorted(declared):
        raise ValueError(f"loss {record.name!r}: the function's parameters {sorted(sig)} and the record's "
                         f"{sorted(declared)} differ")
    missing = [k for k, v in sig.items() if v.default is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"loss {record.name!r}: parameter(s) {missing} need a default in the function")
    params = tuple(dataclasses.replace(p, default=p.canonical(sig[p.name].default)) for p in record.params)
    record = dataclasses.replace(record, params=params)
    record.check(record.defaults())
    return LOSSES.register(record)


#: the record of loss ``name``; ValueError listing the known losses otherwise
loss_record = LOSSES.lookup


register_loss(LossRecord("bce", bce_loss, iw=True, paper=True, doc="binary cross-entropy, mean over voxels",
                         source="Shirokikh et al. 2020", checked="torch binary_cross_entropy"))
register_loss(LossRecord(
    "focal", focal_loss, iw=True, paper=True, doc="focal loss (Lin et al.) with the RetinaNet alpha",
    source="Lin et al. 2017; Shirokikh et al. 2020", checked="MONAI FocalLoss; the authors' dpipe form",
    params=(number("gamma", "focusing exponent (0: alpha-balanced BCE)", ge=0),
            number("alpha", "weight of the lesion class; background gets 1 - alpha", gt=0, lt=1)),
))
register_loss(LossRecord(
    "wce", wce_loss, iw=False, paper=True, doc="cross-entropy with the adaptive positive weight (n - s) / s",
    source="Shirokikh et al. 2020 (baseline)", checked="the authors' dpipe form (gradient through the weight)",
    params=(choice("pos_weight", "s = sum of p (authors) or of y", _WCE_POS_WEIGHTS),),
))
register_loss(LossRecord("dice", dice_loss, iw=True, paper=True, doc="soft Dice, squared denominators, per sample",
                         source="Milletari et al. 2016; Shirokikh et al. 2020",
                         checked="MONAI DiceLoss / MaskedDiceLoss"))
register_loss(LossRecord(
    "asl", asl_loss, iw=True, paper=True, doc="asymmetric similarity loss (recall over precision by beta)",
    source="Hashemi et al. 2018; Shirokikh et al. 2020", checked="MONAI TverskyLoss (form fbeta)",
    params=(number("beta", "weight of recall over precision", gt=0),
            choice("form", "denominator: squared (authors) or fbeta (paper text)", _ASL_FORMS)),
))
register_loss(LossRecord("gdl", gdl_loss, iw=False, paper=True,
                         doc="generalised Dice over [lesion, background], weights 1 / (1 + (sum y)^2)",
                         source="Sudre et al. 2017 (baseline)", checked="hand-derived values (authors' form)"))

register_loss(LossRecord(
    "dice_ce", dice_ce_loss, iw=True, doc="Dice + CE, nnU-Net's default (weights 1, 1; smooth 1e-5); iw multiplies both",
    source="nnU-Net DC_and_CE_loss (Isensee et al. 2021)", checked="MONAI DiceCELoss; hand-derived values",
    params=(number("smooth", "added to numerator and denominator of the Dice term", gt=0),
            number("lambda_ce", "weight of the CE term", ge=0),
            number("lambda_dice", "weight of the Dice term", ge=0)),
))
register_loss(LossRecord(
    "blob", blob_loss, iw=False, needs=("labels",),
    doc="global Dice + mean over lesions of the Dice on background ∪ that lesion",
    source="Kofler et al. 2022 (arXiv 2205.08209)", checked="hand-derived values",
    params=(number("lambda_main", "weight of the global Dice", ge=0),
            number("lambda_blob", "weight of the per-lesion term", ge=0)),
))
register_loss(LossRecord(
    "cc_dice_ce", cc_dice_ce_loss, iw=False, needs=("regions",),
    doc="Dice + CE inside each lesion's Voronoi region, averaged over regions",
    source="CC-Metrics, Jaus et al. (arXiv 2511.17146)", checked="ccmetrics (the regions); hand-derived values",
    params=(number("smooth", "added to numerator and denominator of each region's Dice", gt=0),),
))

#: The paper's six losses, in the paper's order.
LOSS_NAMES: tuple[str, ...] = tuple(name for name, rec in LOSSES.items() if rec.paper)

#: The ten configurations of the paper's grid (Tab. 2), made from the paper's records: each loss, and its
#: ``iw-`` variant where the loss takes iw; ``params`` = the paper's values (the defaults), written out.
PAPER_CONFIGS: dict[str, dict[str, Any]] = {
    ("iw-" if iw else "") + name: {"loss": name, "iw": iw, "params": LOSSES[name].defaults()}
    for name in LOSS_NAMES for iw in ((False, True) if LOSSES[name].iw else (False,))
}


def supports_iw(name: str) -> bool:
    """Whether loss ``name`` accepts a per-voxel weight map (its registry record says; bce, focal, dice, asl and
    dice_ce do)."""
    return loss_record(name).iw


def loss_params(name: str) -> dict[str, Any]:
    """The parameters loss ``name`` accepts, with their defaults (a fresh dict)."""
    return loss_record(name).defaults()


def canonical_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every parameter of loss ``name`` written out: the defaults, overridden by ``params``, numbers as floats.

    Two trials compute the same thing exactly when their canonical parameters are equal: ``focal: {}``,
    ``focal: {gamma: 2}`` and the paper's ``focal`` (gamma 2.0, alpha 0.75) all become
    ``{"alpha": 0.75, "gamma": 2.0}``. Raises ValueError like :func:`get_loss` for unknown or invalid values.
    """
    record = loss_record(name)
    params = dict(params or {})
    record.check(params)
    return {p.name: p.canonical(params.get(p.name, p.default)) for p in sorted(record.params, key=lambda p: p.name)}


def get_loss(name: str, **params: Any) -> Callable[..., Tensor]:
    """The loss ``name`` with ``params`` bound: ``loss(logits, target, weight=None) -> scalar tensor``.

    Raises:
        ValueError: unknown ``name`` (the message lists the registered losses), a parameter the loss does not
            take (the message lists the accepted ones), or a value out of range (the record's bounds: alpha in
            (0, 1), gamma >= 0, beta > 0, pos_weight in {"prediction", "target"}, form in {"squared", "fbeta"}).
    """
    record = loss_record(name)
    record.check(params)
    return partial(getattr(record.fn, "__wrapped__", record.fn), **params)


# --------------------------------------------------------------------------------------------------------------
# input checks and reductions


def _check_inputs(
    name: str, logits: Tensor, target: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Validate shapes/dtypes; return ``target`` and ``weight`` cast to the dtype/device of ``logits``."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError(f"{name}: logits must be a floating-point tensor, got {_describe(logits)}")
    if logits.ndim < 3 or logits.shape[1] != 1:
        raise ValueError(f"{name}: logits must have shape (B, 1, *spatial), got {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"{name}: logits must not be empty, got shape {tuple(logits.shape)}")
    if not isinstance(target, Tensor) or target.shape != logits.shape:
        raise ValueError(
            f"{name}: target must be a tensor of the logits' shape {tuple(logits.shape)}, got {_describe(target)}"
        )
    target = target.to(dtype=logits.dtype, device=logits.device)
    if weight is not None:
        if not loss_record(name).iw:
            iw_names = [key for key, rec in LOSSES.items() if rec.iw]
            raise ValueError(
                f"{name}: this loss takes no weight map (it reweights by class itself); "
                f"inverse weighting is supported by {', '.join(iw_names)}"
            )
        if not isinstance(weight, Tensor) or weight.shape != logits.shape:
            raise ValueError(
                f"{name}: weight must be a tensor of the logits' shape {tuple(logits.shape)}, "
                f"got {_describe(weight)}"
            )
        weight = weight.to(dtype=logits.dtype, device=logits.device)
    return target, weight


def _check_instances(name: str, key: str, value: Tensor | None, logits: Tensor) -> Tensor:
    """The integer instance map ``key`` of a per-lesion loss, of the logits' shape, as int64 on their device."""
    if value is None:
        raise ValueError(f"{name}: needs the patch's {key} ({key}=..., a (B, 1, *spatial) integer map); the "
                         f"sampler yields them when the loss's record asks for them (needs={key!r})")
    if not isinstance(value, Tensor) or value.shape != logits.shape or value.is_floating_point():
        raise ValueError(f"{name}: {key} must be an integer tensor of the logits' shape {tuple(logits.shape)}, "
                         f"got {_describe(value)}")
    return value.to(device=logits.device, dtype=torch.int64)  # ids >= 0: checked with the max, one sync


def _region_sums(ids: Tensor, values: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], Tensor, int]:
    """Per (sample, id) sums of each of ``values`` over the voxels with that id.

    Returns ``(sums, present, n)``: sums indexed by the key ``b * n + id`` (``n = max id + 1``), ``present``
    marks the keys that occur, ``n`` the keys per sample.
    """
    batch = ids.shape[0]
    lo, hi = (int(v) for v in torch.aminmax(ids))  # the step's one host sync of these losses
    if lo < 0:
        raise ValueError(f"instance ids must be >= 0 (0 = background), got {lo}")
    n = hi + 1
    keys = (ids.flatten(start_dim=1) + n * torch.arange(batch, device=ids.device)[:, None]).reshape(-1)
    dtype = values[0].dtype
    size = batch * n
    count = torch.zeros(size, dtype=dtype, device=ids.device).index_add_(0, keys, torch.ones_like(keys, dtype=dtype))
    sums = tuple(torch.zeros(size, dtype=dtype, device=ids.device).index_add_(0, keys, v.reshape(-1))
                 for v in values)
    return sums, count > 0, n


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _weighted_mean(loss: Tensor, weight: Tensor | None) -> Tensor:
    return loss.mean() if weight is None else (loss * weight).mean()


def _per_sample_sum(values: Tensor) -> Tensor:
    """Sum over all axes but the batch axis: ``(B, ...) -> (B,)``."""
    return values.flatten(start_dim=1).sum(dim=1)


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` with the denominator clamped at the smallest normal number (module doc)."""
    return numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)

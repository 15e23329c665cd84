"""Whole-volume prediction of cached cases and their per-object records.

Used by the trials (validation after each epoch) and by the hold-out stage (the last-epoch model of each
retrained configuration on the hold-out cases). Inference runs once per case; every summary is then
computed from the saved records.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from trainables.build import build_model, load_state
from trainables.config import InferenceConfig, StudyConfig
from trainables.data import Cache
from trainables.device import task_device
from trainables.inference import study_logits
from trainables.metrics import CaseRecords, save_records, volume_records_multi
from trainables.step import Precision, configure_backends


def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    inference: InferenceConfig,
    device: torch.device,
    precision: Precision | None = None,
    thresholds: Sequence[float] = (0.5,),
) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """Sliding-window logits of one volume and its binary masks at each probability threshold, both made on
    ``device`` (the GPU compares logit > log(t / (1 - t)) itself) and brought to the host once:
    ``(float32 logits, {threshold: bool mask})``."""
    logits = study_logits(model, np.asarray(image), inference, device=device,
                          dtype=None if precision is None else precision.dtype)
    masks = {t: (logits > math.log(t / (1.0 - t))).cpu().numpy() for t in thresholds}
    return logits.cpu().numpy(), masks


def predict_ensemble_volume(
    models: Sequence[torch.nn.Module],
    image: np.ndarray,
    *,
    inference: InferenceConfig,
    device: torch.device,
    precision: Precision | None = None,
    thresholds: Sequence[float] = (0.5,),
) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """The mean probability of several models (a cross-validated configuration's fold models) over one volume,
    averaged and binarised on ``device``: ``(float32 probability, {threshold: bool mask})``."""
    prob = None
    for model in models:
        p = torch.sigmoid(study_logits(model, np.asarray(image), inference, device=device,
                                       dtype=None if precision is None else precision.dtype))
        prob = p if prob is None else prob.add_(p)
    prob /= len(models)
    masks = {t: (prob > t).cpu().numpy() for t in thresholds}
    return prob.cpu().numpy(), masks


def case_records(values, masks, gt, spacing, rules, *, is_logit: bool = True) -> dict[float, dict[str, CaseRecords]]:
    """The records of one case from its logits (or an ensemble's probabilities: ``is_logit=False``) and its masks
    per threshold (:func:`predict_volume`): ``{threshold: {rule name: CaseRecords}}``. The lesions are labelled
    once for all thresholds."""
    from trainables.weights import label_components

    gt_labels = label_components(np.asarray(gt) > 0.5)
    return {t: volume_records_multi(values, gt, spacing, is_logit=is_logit, rules=rules, threshold=t,
                                    foreground=m, gt_labels=gt_labels)
            for t, m in masks.items()}


def predict_records(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    cache: Cache,
    case_ids: Sequence[str],
    *,
    inference: InferenceConfig,
    rules: Mapping[str, tuple[str, float | None]],
    device: torch.device,
    precision: Precision | None = None,
    thresholds: Sequence[float] = (0.5,),
    overlap: bool | None = None,
) -> dict[float, dict[str, dict[str, CaseRecords]]]:
    """Records of several cases: ``{threshold: {rule name: {case_id: CaseRecords}}}`` (inference once per case).
    ``model`` may be a list of models: their ensemble (mean probability; confidences are probabilities then).

    ``overlap`` (default: on a GPU): the records of case i (labelling and matching on the host) are built in a
    worker thread while the device predicts case i + 1, so a GPU does not wait for them; at most one case waits
    for its records. On a CPU the trial's threads are busy with the inference itself: the records are built in
    turn. The records are the same either way.
    """
    out: dict[float, dict[str, dict[str, CaseRecords]]] = {t: {name: {} for name in rules} for t in thresholds}

    def collect(case_id: str, per_t: dict[float, dict[str, CaseRecords]]) -> None:
        for t, per_rule in per_t.items():
            for name, recs in per_rule.items():
                out[t][name][case_id] = recs

    if overlap is None:
        overlap = torch.device(device).type == "cuda"
    ensemble = isinstance(model, Sequence) and len(model) > 1
    if isinstance(model, Sequence) and not ensemble:
        model = model[0]
    predict = predict_ensemble_volume if ensemble else predict_volume
    pending: tuple[str, Future] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="records") if overlap else nullcontext() as pool:
        for case_id in case_ids:
            case = cache.load(case_id)
            values, masks = predict(model, case.image, inference=inference, device=device, precision=precision,
                                    thresholds=thresholds)
            job = functools.partial(case_records, values, masks, np.asarray(case.mask), case.spacing, rules,
                                    is_logit=not ensemble)
            if pending is not None:
                collect(pending[0], pending[1].result())
                pending = None
            if pool is None:
                collect(case_id, job())
            else:
                pending = (case_id, pool.submit(job))
        if pending is not None:
            collect(pending[0], pending[1].result())
    return out


#: the probability thresholds a calibrated binarisation chooses from (the paper's 0.5 first)
CALIBRATION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def calibrate_threshold(records_by_threshold: Mapping[float, Mapping[str, CaseRecords]]) -> float:
    """The threshold whose records (``any`` rule) give the highest object Dice; the smallest on ties, and 0.5
    when no threshold detects a lesion (docs/definitions.md §9: chosen on the validation split, applied on the hold-out)."""
    from trainables.metrics import summarize

    best, best_dice = 0.5, -1.0
    for t in sorted(records_by_threshold):
        dice = summarize(records_by_threshold[t], protocol="luna16", n_boot=0)["obj_dice"]
        if dice is not None and dice > best_dice + 1e-12:
            best, best_dice = t, dice
    return best


def holdout_records(
    checkpoint_dir: str | Sequence[str],
    study: StudyConfig,
    out_dir: str,
    *,
    rules: Mapping[str, tuple[str, float | None]],
    calibrated: float | None = None,
) -> dict[str, str]:
    """Hold-out records of one retrained configuration (or, given several checkpoints, of the ensemble of its fold
    models: their mean probability), written to ``out_dir/records_<rule>.json`` (p > 0.5) and, with a
    ``calibrated`` threshold, ``out_dir/records_<rule>_calibrated.json`` (p > that threshold).

    ``study`` has ``data.cache_dir`` set (:meth:`StudyConfig.with_cache`). Skips the work when every file exists
    (the stage is resumable per configuration). Returns the paths:
    ``{rule}`` and ``{rule}_calibrated``.
    """
    out = Path(out_dir)
    thresholds = {"": 0.5} if calibrated is None else {"": 0.5, "_calibrated": float(calibrated)}
    paths = {f"{name}{suffix}": str(out / f"records_{name}{suffix}.json") for name in rules for suffix in thresholds}
    if study.inference.tta != "none":
        paths.update({f"{name}_notta": str(out / f"records_{name}_notta.json") for name in rules})
    if all(Path(p).is_file() for p in paths.values()):
        return paths
    torch.set_num_threads(study.resources.threads)
    device = task_device(study.resources.gpu)
    configure_backends(device)
    checkpoints = [checkpoint_dir] if isinstance(checkpoint_dir, str) else list(checkpoint_dir)
    models = []
    for ckpt in checkpoints:
        model = build_model(study.model, study.training.patch_size)
        model.load_state_dict(load_state(ckpt)["model"])
        models.append(model.to(device))
    cache = Cache(study.data.cache_dir)
    case_ids = cache.case_ids(study.data.holdout)
    records = predict_records(
        models, cache, case_ids, inference=study.inference, rules=rules, device=device,
        precision=Precision.for_device(device, study.training.amp),  # the dtype it was trained in
        thresholds=sorted(set(thresholds.values())),
    )
    out.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": checkpoints[0] if len(checkpoints) == 1 else checkpoints,
            "splits": list(study.data.holdout), "tta": study.inference.tta}
    for suffix, t in thresholds.items():
        for name, recordset in records[t].items():
            save_records(paths[f"{name}{suffix}"], recordset,
                         meta={**meta, "hit_rule": list(rules[name]), "threshold": t})
    if study.inference.tta != "none":  # the same models without test-time augmentation, for the comparison
        plain = predict_records(
            models, cache, case_ids, inference=study.inference.model_copy(update={"tta": "none"}), rules=rules,
            device=device, precision=Precision.for_device(device, study.training.amp), thresholds=[0.5])
        for name, recordset in plain[0.5].items():
            paths[f"{name}_notta"] = str(out / f"records_{name}_notta.json")
            save_records(paths[f"{name}_notta"], recordset,
                         meta={**meta, "tta": "none", "hit_rule": list(rules[name]), "threshold": 0.5})
    if study.testing.sleep_after_holdout_model:  # tests: a window to kill the study mid-hold-out
        import time

        time.sleep(study.testing.sleep_after_holdout_model)
    return paths

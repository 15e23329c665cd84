"""Whole-volume prediction of cached cases and their per-object records.

Used by the trials (validation after each epoch) and by the hold-out stage (the last-epoch model of each
retrained configuration on the hold-out cases). Inference runs once per case; every summary is then
computed from the saved records.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables.config import InferenceConfig, ModelConfig, StudyConfig
from trainables.data import Cache
from trainables.inference import sliding_window_inference
from trainables.metrics import CaseRecords, save_records, volume_records_multi
from trainables.step import Precision, configure_backends
from trainables.unet import UNet3D

STATE_FILE = "state.pt"


def build_model(model: ModelConfig) -> UNet3D:
    """The U-Net described by the study's ``model`` section."""
    return UNet3D(in_channels=model.in_channels, out_channels=1, width=model.width,
                  channels_last=model.channels_last)


def load_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a trial checkpoint (tensors and plain values only: ``weights_only=True``)."""
    path = Path(checkpoint_dir) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True)


def task_device() -> torch.device:
    """The GPU Ray assigned to this trial or task, else the CPU.

    Inside Ray never ``torch.cuda.is_available()`` alone: Ray no longer hides GPUs from 0-GPU tasks
    (ray#54868), so a CPU trial on a GPU node would silently take GPU 0. Outside Ray (a direct call): the GPU
    when there is one.
    """
    import ray

    if not ray.is_initialized():  # a direct call outside Ray (tests, scripts): never start a Ray for it
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
    return torch.device("cpu")


def predict_case_records(
    model: torch.nn.Module,
    cache: Cache,
    case_id: str,
    *,
    inference: InferenceConfig,
    rules: Mapping[str, tuple[str, float | None]],
    device: torch.device,
    precision: Precision | None = None,
    thresholds: Sequence[float] = (0.5,),
) -> dict[float, dict[str, CaseRecords]]:
    """Sliding-window logits of one case (computed once), turned into records under each named hit rule at
    each binarisation threshold (probability): ``{threshold: {rule name: CaseRecords}}``."""
    case = cache.load(case_id)
    logits = sliding_window_inference(
        model,
        np.asarray(case.image),
        window=inference.window,
        stride=inference.stride,
        blending=inference.blending,
        device=device,
        amp=None if precision is None else precision.dtype,
    )
    mask = np.asarray(case.mask)
    return {t: volume_records_multi(logits, mask, case.spacing, is_logit=True, rules=rules, threshold=t)
            for t in thresholds}


def predict_records(
    model: torch.nn.Module,
    cache: Cache,
    case_ids: Sequence[str],
    *,
    inference: InferenceConfig,
    rules: Mapping[str, tuple[str, float | None]],
    device: torch.device,
    precision: Precision | None = None,
    thresholds: Sequence[float] = (0.5,),
) -> dict[float, dict[str, dict[str, CaseRecords]]]:
    """Records of several cases: ``{threshold: {rule name: {case_id: CaseRecords}}}`` (inference once per case)."""
    out: dict[float, dict[str, dict[str, CaseRecords]]] = {t: {name: {} for name in rules} for t in thresholds}
    for case_id in case_ids:
        per_t = predict_case_records(model, cache, case_id, inference=inference, rules=rules, device=device,
                                     precision=precision, thresholds=thresholds)
        for t, per_rule in per_t.items():
            for name, recs in per_rule.items():
                out[t][name][case_id] = recs
    return out


#: the probability thresholds a calibrated binarisation chooses from (the paper's 0.5 first)
CALIBRATION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def calibrate_threshold(records_by_threshold: Mapping[float, Mapping[str, CaseRecords]]) -> float:
    """The threshold whose records (``any`` rule) give the highest object Dice; the smallest on ties, and 0.5
    when no threshold detects a lesion (SPEC §9: chosen on the validation split, applied on the hold-out)."""
    from trainables.metrics import summarize

    best, best_dice = 0.5, -1.0
    for t in sorted(records_by_threshold):
        dice = summarize(records_by_threshold[t], protocol="luna16", n_boot=0)["obj_dice"]
        if dice is not None and dice > best_dice + 1e-12:
            best, best_dice = t, dice
    return best


def holdout_records(
    checkpoint_dir: str,
    study: StudyConfig,
    out_dir: str,
    *,
    rules: Mapping[str, tuple[str, float | None]],
    calibrated: float | None = None,
) -> dict[str, str]:
    """Hold-out records of one retrained configuration, written to ``out_dir/records_<rule>.json`` (p > 0.5)
    and, with a ``calibrated`` threshold, ``out_dir/records_<rule>_calibrated.json`` (p > that threshold).

    ``study`` has ``data.cache_dir`` set (:meth:`StudyConfig.with_cache`). Skips the work when every file exists
    (the stage is resumable per configuration). Returns the paths:
    ``{rule}`` and ``{rule}_calibrated``.
    """
    out = Path(out_dir)
    thresholds = {"": 0.5} if calibrated is None else {"": 0.5, "_calibrated": float(calibrated)}
    paths = {f"{name}{suffix}": str(out / f"records_{name}{suffix}.json") for name in rules for suffix in thresholds}
    if all(Path(p).is_file() for p in paths.values()):
        return paths
    torch.set_num_threads(study.resources.threads)
    device = task_device()
    configure_backends(device)
    model = build_model(study.model)
    model.load_state_dict(load_state(checkpoint_dir)["model"])
    model.to(device)
    cache = Cache(study.data.cache_dir)
    case_ids = cache.case_ids(study.data.holdout)
    records = predict_records(
        model, cache, case_ids, inference=study.inference, rules=rules, device=device,
        precision=Precision.for_device(device, study.training.amp),  # the dtype it was trained in
        thresholds=sorted(set(thresholds.values())),
    )
    out.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(checkpoint_dir), "splits": list(study.data.holdout)}
    for suffix, t in thresholds.items():
        for name, recordset in records[t].items():
            save_records(paths[f"{name}{suffix}"], recordset,
                         meta={**meta, "hit_rule": list(rules[name]), "threshold": t})
    return paths

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

from trainables.data import Cache, open_cache
from trainables.inference import sliding_window_inference
from trainables.metrics import CaseRecords, save_records, volume_records_multi
from trainables.step import Precision, configure_backends
from trainables.unet import UNet3D

STATE_FILE = "state.pt"


def build_model(study: Mapping[str, Any]) -> UNet3D:
    """The U-Net described by the study's ``model`` section."""
    model_cfg = study["model"]
    return UNet3D(in_channels=int(model_cfg["in_channels"]), out_channels=1, width=float(model_cfg["width"]),
                  channels_last=model_cfg.get("channels_last"))


def load_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a trial checkpoint (tensors and plain values only: ``weights_only=True``)."""
    path = Path(checkpoint_dir) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True)


def task_device() -> torch.device:
    """The GPU Ray assigned to this trial or task, else the CPU.

    Never ``torch.cuda.is_available()`` alone: Ray no longer hides GPUs from 0-GPU tasks (ray#54868), so a
    CPU trial on a GPU node would silently take GPU 0.
    """
    import ray

    try:
        gpu_ids = ray.get_gpu_ids()
    except Exception:  # noqa: BLE001 - not inside Ray (a direct call)
        gpu_ids = []
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
    return torch.device("cpu")


def predict_case_records(
    model: torch.nn.Module,
    cache: Cache,
    case_id: str,
    *,
    inference: Mapping[str, Any],
    rules: Mapping[str, tuple[str, float | None]],
    device: torch.device,
    precision: Precision | None = None,
) -> dict[str, CaseRecords]:
    """Sliding-window logits of one case, turned into records under each named hit rule."""
    case = cache.load(case_id)
    logits = sliding_window_inference(
        model,
        np.asarray(case.image),
        window=tuple(inference["window"]),
        stride=tuple(inference["stride"]),
        blending=inference["blending"],
        device=device,
        amp=None if precision is None else precision.dtype,
    )
    return volume_records_multi(logits, np.asarray(case.mask), case.spacing, is_logit=True, rules=rules)


def predict_records(
    model: torch.nn.Module,
    cache: Cache,
    case_ids: Sequence[str],
    *,
    inference: Mapping[str, Any],
    rules: Mapping[str, tuple[str, float | None]],
    device: torch.device,
    precision: Precision | None = None,
) -> dict[str, dict[str, CaseRecords]]:
    """Records of several cases: ``{rule name: {case_id: CaseRecords}}``."""
    out: dict[str, dict[str, CaseRecords]] = {name: {} for name in rules}
    for case_id in case_ids:
        per_rule = predict_case_records(
            model, cache, case_id, inference=inference, rules=rules, device=device, precision=precision
        )
        for name, recs in per_rule.items():
            out[name][case_id] = recs
    return out


def holdout_records(
    checkpoint_dir: str,
    study: Mapping[str, Any],
    out_dir: str,
    *,
    rules: Mapping[str, tuple[str, float | None]],
) -> dict[str, str]:
    """Hold-out records of one retrained configuration, written to ``out_dir/records_<rule>.json``.

    Skips the work when every file exists (the stage is resumable per configuration). Returns the paths.
    """
    out = Path(out_dir)
    paths = {name: str(out / f"records_{name}.json") for name in rules}
    if all(Path(p).is_file() for p in paths.values()):
        return paths
    torch.set_num_threads(max(1, int(float(study["resources"]["cpu"]))))
    device = task_device()
    configure_backends(device)
    model = build_model(study)
    model.load_state_dict(load_state(checkpoint_dir)["model"])
    model.to(device)
    cache = open_cache(study["data"]["cache_dir"])
    case_ids = cache.case_ids(study["data"]["holdout"])
    records = predict_records(
        model, cache, case_ids, inference=study["inference"], rules=rules, device=device,
        precision=Precision.for_device(device, bool(study["training"]["amp"])),  # the dtype it was trained in
    )
    out.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(checkpoint_dir), "splits": list(study["data"]["holdout"])}
    for name, recordset in records.items():
        save_records(paths[name], recordset, meta={**meta, "hit_rule": list(rules[name])})
    return paths

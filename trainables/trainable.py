"""The Ray Tune function trainable: one trial = one (loss, iw, parameters, seed) trained by the protocol.

Config layout (built by ``study.space``; plain data so that Tune can store and restore it):

``trial``  ``{"loss", "iw", "params", "seed"}``
``study``  the frozen study config (``StudyConfig.to_dict()``) with ``data.cache_dir`` resolved
``run``    ``{"stage": "sweep" | "holdout", "splits": [...], "validate": bool, "epochs": int,
           "experiment_id", "parent_run_id", "study_id"}``

Each epoch: ``iterations`` SGD steps on patches from the sampler (with the iw map when ``iw``), then
(sweep) whole-volume validation -> records -> luna16 avg recall and object Dice, then ``tune.report`` with a
checkpoint holding model, optimiser, lr schedule, sampler position and epoch. At start the trial resumes
from ``tune.get_checkpoint()``.

The trial never talks to MLflow: the driver's Tune callback (``study.callbacks``) logs every reported result,
and the artifacts this trial writes into its last checkpoint, to the trial's MLflow run. So the tracking
server can stay bound to 127.0.0.1 on the head node and a single process writes the MLflow store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables.data import PatchSampler, open_cache
from trainables.evaluate import STATE_FILE, build_model, load_state, predict_records, task_device
from trainables.losses import get_loss
from trainables.metrics import save_records, summarize
from trainables.naming import config_name, trial_label

VAL_RECORDS_FILE = "val_records.json"
TRIAL_CONFIG_FILE = "trial_config.json"
VAL_FROC_FILE = "val_froc.png"


class TrialDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the trial ends as an error with this reason."""


def _lr_schedule(optimizer: torch.optim.Optimizer, schedule: Mapping[str, Any]):
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(schedule["milestones"]), gamma=float(schedule["gamma"])
    )


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast where supported (CPU, Ampere+ GPUs), else fp16 on older GPUs; a no-op when off."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable (see the module docstring for ``config``)."""
    from ray import tune

    for name in ("ray.tune", "ray.train"):  # keep the driver's console to the study's own progress lines
        logging.getLogger(name).setLevel(logging.WARNING)
    trial, study, run = config["trial"], config["study"], config["run"]
    training = study["training"]
    testing = study.get("testing") or {}
    n_threads = max(1, int(float(study["resources"]["cpu"])))
    torch.set_num_threads(n_threads)
    device = task_device()
    seed = int(trial["seed"])

    torch.manual_seed(seed)
    model = build_model(study).to(device)
    opt_cfg = training["optimizer"]
    optimizer = torch.optim.SGD(
        model.parameters(), lr=float(opt_cfg["lr"]), momentum=float(opt_cfg["momentum"]),
        nesterov=bool(opt_cfg["nesterov"]), weight_decay=float(opt_cfg["weight_decay"]),
    )
    scheduler = _lr_schedule(optimizer, training["lr_schedule"])
    loss_fn = get_loss(trial["loss"], **trial["params"])

    start_epoch, next_batch = 0, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_state(ckpt_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        next_batch = int(state["sampler"]["next_batch"])

    _train_epochs(
        model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, device=device,
        trial=trial, study=study, run=run, start_epoch=start_epoch, next_batch=next_batch,
        testing=testing, resumed=checkpoint is not None,
    )


def _train_epochs(
    *, model, optimizer, scheduler, loss_fn, device, trial, study, run, start_epoch, next_batch, testing, resumed,
) -> None:
    from ray import tune

    training = study["training"]
    epochs = int(run["epochs"])
    iterations = int(training["iterations"])
    cache = open_cache(study["data"]["cache_dir"])
    train_ids = cache.case_ids(run["splits"])
    val_ids = cache.case_ids(study["data"]["val"]) if run["validate"] else []
    clip = study["iw"]["clip"]
    nan_at = testing.get("nan_at_iteration")
    inject_nan = nan_at is not None and config_name(trial["loss"], trial["iw"]) in (testing.get("nan_configs") or [])
    sleep_s = float(testing.get("sleep_per_iteration") or 0.0)
    amp = bool(training["amp"])
    val_every = int(study["validation"]["every"])
    last_val: dict[str, float] = {}
    val_records = None

    sampler = PatchSampler(
        cache, train_ids, patch_size=tuple(training["patch_size"]), batch_size=int(training["batch_size"]),
        iw=bool(trial["iw"]), iw_clip=None if clip is None else tuple(clip),
        lesion_prob=float(training["lesion_prob"]), seed=int(trial["seed"]),
        num_workers=int(training["sampler_workers"]), start_batch=next_batch,
    )
    with sampler:
        batches = iter(sampler)
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            model.train()
            lr = optimizer.param_groups[0]["lr"]
            losses = []
            for it in range(iterations):
                batch = next(batches)
                image = torch.from_numpy(batch.image).to(device, non_blocking=True)
                target = torch.from_numpy(batch.target).to(device, non_blocking=True)
                weight = torch.from_numpy(batch.weight).to(device, non_blocking=True) if trial["iw"] else None
                with _autocast(device, amp):
                    logits = model(image)
                loss = loss_fn(logits.float(), target, weight)
                global_iter = epoch * iterations + it
                if inject_nan and global_iter >= nan_at:
                    loss = loss * float("nan")
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrialDivergedError(
                        f"non-finite training loss ({value}) at epoch {epoch}, iteration {it} "
                        f"(loss {trial['loss']}, iw {trial['iw']}, lr {lr:g}); "
                        "lower the learning rate or check the data"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(value)
                if sleep_s:
                    time.sleep(sleep_s)
            scheduler.step()
            train_seconds = time.perf_counter() - t0

            metrics: dict[str, Any] = {
                "epoch": epoch,
                "epochs": epochs,
                "train_loss": float(np.mean(losses)),
                "lr": lr,
                "training_done": epoch + 1 == epochs,
            }
            with tempfile.TemporaryDirectory() as ckpt_dir:
                if val_ids and ((epoch + 1) % val_every == 0 or epoch + 1 == epochs):
                    last_val, val_records = _validate(model, cache, val_ids, study, device, amp, ckpt_dir)
                metrics.update(last_val)
                if resumed and epoch == start_epoch:
                    metrics["resumed_from_epoch"] = start_epoch  # the driver tags the MLflow run with it
                metrics["epoch_seconds"] = time.perf_counter() - t0
                metrics["train_seconds"] = train_seconds
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "sampler": sampler.state_dict(),
                        "epoch": epoch,
                        "trial": json.dumps(trial),
                    },
                    os.path.join(ckpt_dir, STATE_FILE),
                )
                if epoch + 1 == epochs:
                    _write_final_artifacts(trial, study, run, ckpt_dir, val_records)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))


def _validate(model, cache, val_ids, study, device, amp, out_dir):
    """Whole-volume validation: records under the ``any`` rule (saved), luna16 summary -> (metrics, records)."""
    records = predict_records(
        model, cache, val_ids, inference=study["inference"], rules={"any": ("any", None)},
        device=device, amp=amp,
    )["any"]
    save_records(Path(out_dir) / VAL_RECORDS_FILE, records, meta={"splits": list(study["data"]["val"])})
    n_boot = int(study["validation"]["n_boot"])
    summary = summarize(records, protocol="luna16", n_boot=n_boot, seed=0)
    if summary["avg_recall"] is None:
        raise ValueError(f"the validation cases ({', '.join(val_ids)}) contain no lesion: nothing to validate on")
    out = {
        "val_avg_recall": float(summary["avg_recall"]),
        # no lesion detected: no object Dice; 0 keeps the metric comparable across epochs
        "val_obj_dice": float(summary["obj_dice"]) if summary["obj_dice"] is not None else 0.0,
        "val_fp_per_image": float(summary["fp_per_image"]),
    }
    if summary.get("pred_positive_fraction") is not None:
        out["val_pred_positive_fraction"] = float(summary["pred_positive_fraction"])
    return out, records


def _write_final_artifacts(trial, study, run, ckpt_dir, val_records) -> None:
    """Files for the trial's MLflow run, kept in the last checkpoint: the config and the validation FROC
    (with a bootstrap band: at least 100 replicates, once, whatever the per-epoch ``validation.n_boot``)."""
    Path(ckpt_dir, TRIAL_CONFIG_FILE).write_text(
        json.dumps({"trial": trial, "run": run, "study": study}, indent=2, default=str)
    )
    if val_records is not None:
        from trainables.metrics.plots import plot_froc

        summary = summarize(val_records, protocol="luna16", n_boot=max(int(study["validation"]["n_boot"]), 100),
                            seed=0)
        plot_froc({trial_label(trial): summary}, Path(ckpt_dir) / VAL_FROC_FILE,
                  title=f"validation FROC, {trial_label(trial)}")

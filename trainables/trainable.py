"""The Ray Tune function trainable: one trial = one (loss, iw, parameters, seed) trained by the protocol.

Config layout (built by ``study.space``; plain data so that Tune can store and restore it):

``trial``  ``{"loss", "iw", "params", "seed"}``
``study``  the frozen study config (``StudyConfig.to_dict()``) with ``data.cache_dir`` resolved
``run``    ``{"stage": "sweep" | "holdout", "splits": [...], "validate": bool, "epochs": int,
           "experiment_id", "parent_run_id", "study_id"}``

Each epoch: ``iterations`` SGD steps (:func:`trainables.step.train_step`) on patches from the sampler (with the
iw map when ``iw``), then (sweep, every ``validation.every`` epochs and at the last) whole-volume validation ->
records -> luna16 avg recall and object Dice, then ``tune.report`` with a checkpoint holding model, optimiser,
lr schedule, loss scaler, sampler position and epoch. At start the trial resumes from
``tune.get_checkpoint()``. :func:`run_trial` is the same loop without Ray (``report`` is a callable), which the
tests drive directly.

The trial never talks to MLflow: the driver's Tune callback (``study.callbacks``) logs every reported result,
and the artifacts this trial writes into its last checkpoint, to the trial's MLflow run. So the tracking
server can stay bound to 127.0.0.1 on the head node and a single process writes the MLflow store.
"""

from __future__ import annotations

import itertools
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
from trainables.evaluate import (
    CALIBRATION_THRESHOLDS,
    STATE_FILE,
    build_model,
    calibrate_threshold,
    load_state,
    predict_records,
    task_device,
)
from trainables.losses import get_loss
from trainables.metrics import save_records, summarize
from trainables.naming import config_name, trial_label
from trainables.step import Precision, configure_backends, train_step

VAL_RECORDS_FILE = "val_records.json"
TRIAL_CONFIG_FILE = "trial_config.json"
VAL_FROC_FILE = "val_froc.png"


class TrialDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the trial ends as an error with this reason."""


def build_optimizer(model: torch.nn.Module, optimizer: Mapping[str, Any]) -> torch.optim.SGD:
    """SGD with the study's settings (paper: Nesterov momentum 0.9, lr 1e-2, no weight decay)."""
    return torch.optim.SGD(
        model.parameters(), lr=float(optimizer["lr"]), momentum=float(optimizer["momentum"]),
        nesterov=bool(optimizer["nesterov"]), weight_decay=float(optimizer["weight_decay"]),
    )


def build_lr_schedule(optimizer: torch.optim.Optimizer, schedule: Mapping[str, Any]):
    """lr × ``gamma`` from each 0-based epoch in ``milestones`` on (stepped once per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(schedule["milestones"]), gamma=float(schedule["gamma"])
    )


def with_test_faults(loss_fn, testing: Mapping[str, Any], config: str, iterations_done: int):
    """``loss_fn`` wrapped with the test-only faults of ``testing`` (a NaN loss from a global iteration on,
    a sleep per iteration); ``loss_fn`` itself when there are none, so the training loop has no test branch."""
    nan_at = testing.get("nan_at_iteration")
    inject = nan_at is not None and config in (testing.get("nan_configs") or [])
    sleep_s = float(testing.get("sleep_per_iteration") or 0.0)
    if not inject and not sleep_s:
        return loss_fn
    counter = itertools.count(iterations_done)

    def faulty(logits, target, weight=None):
        i = next(counter)
        if sleep_s:
            time.sleep(sleep_s)
        loss = loss_fn(logits, target, weight)
        return loss * float("nan") if inject and i >= nan_at else loss

    return faulty


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable (see the module docstring for ``config``)."""
    from ray import tune

    for name in ("ray.tune", "ray.train"):  # keep the driver's console to the study's own progress lines
        logging.getLogger(name).setLevel(logging.WARNING)
    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_state(ckpt_dir)

    def report(metrics: dict[str, Any], ckpt_dir: str) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))

    run_trial(config, state=state, report=report)


def run_trial(config: Mapping[str, Any], *, state: Mapping[str, Any] | None, report) -> None:
    """Train one trial from ``state`` (a loaded checkpoint, or None to start) to its last epoch.

    ``report(metrics, checkpoint_dir)`` is called once per epoch; the folder holds the checkpoint and is
    deleted when ``report`` returns. Validation metrics (``val_*``) are in ``metrics`` only at the epochs
    where validation ran (every ``validation.every`` epochs and at the last one), never carried over.
    """
    trial, study, run = config["trial"], config["study"], config["run"]
    training = study["training"]
    torch.set_num_threads(max(1, int(float(study["resources"]["cpu"]))))
    device = task_device()
    configure_backends(device)

    torch.manual_seed(int(trial["seed"]))
    model = build_model(study).to(device)
    optimizer = build_optimizer(model, training["optimizer"])
    scheduler = build_lr_schedule(optimizer, training["lr_schedule"])
    precision = Precision.for_device(device, bool(training["amp"]))
    scaler = precision.scaler()
    start_epoch, next_batch = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        next_batch = int(state["sampler"]["next_batch"])

    epochs = int(run["epochs"])
    iterations = int(training["iterations"])
    loss_fn = with_test_faults(get_loss(trial["loss"], **trial["params"]), study.get("testing") or {},
                               config_name(trial["loss"], trial["iw"]), start_epoch * iterations)
    cache = open_cache(study["data"]["cache_dir"])
    val_ids = cache.case_ids(study["data"]["val"]) if run["validate"] else []
    val_every = int(study["validation"]["every"])
    clip = study["iw"]["clip"]
    use_iw = bool(trial["iw"])
    val_records = None

    sampler = PatchSampler(
        cache, cache.case_ids(run["splits"]), patch_size=tuple(training["patch_size"]),
        batch_size=int(training["batch_size"]), iw=use_iw, iw_clip=None if clip is None else tuple(clip),
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
                weight = torch.from_numpy(batch.weight).to(device, non_blocking=True) if use_iw else None
                value = train_step(model, optimizer, scaler, loss_fn, image, target, weight, precision)
                if not math.isfinite(value):
                    raise TrialDivergedError(
                        f"non-finite training loss ({value}) at epoch {epoch}, iteration {it} "
                        f"(loss {trial['loss']}, iw {trial['iw']}, lr {lr:g}); "
                        "lower the learning rate or check the data"
                    )
                losses.append(value)
            scheduler.step()
            train_seconds = time.perf_counter() - t0

            metrics: dict[str, Any] = {
                "epoch": epoch,
                "epochs": epochs,
                "train_loss": float(np.mean(losses)),
                "lr": lr,
                "training_done": epoch + 1 == epochs,
            }
            if state is not None and epoch == start_epoch:
                metrics["resumed_from_epoch"] = start_epoch  # the driver tags the MLflow run with it
            with tempfile.TemporaryDirectory() as ckpt_dir:
                if val_ids and ((epoch + 1) % val_every == 0 or epoch + 1 == epochs):
                    val_metrics, val_records = _validate(
                        model, cache, val_ids, study, device, precision, ckpt_dir,
                        calibrate=epoch + 1 == epochs and study["evaluation"].get("threshold") == "calibrated")
                    metrics.update(val_metrics)
                metrics["epoch_seconds"] = time.perf_counter() - t0
                metrics["train_seconds"] = train_seconds
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "sampler": sampler.state_dict(),
                        "epoch": epoch,
                        "trial": json.dumps(trial),
                    },
                    os.path.join(ckpt_dir, STATE_FILE),
                )
                if epoch + 1 == epochs:
                    _write_final_artifacts(trial, study, run, ckpt_dir, val_records)
                report(metrics, ckpt_dir)


def _validate(model, cache, val_ids, study, device, precision, out_dir, *, calibrate: bool):
    """Whole-volume validation: records under the ``any`` rule (saved), luna16 summary -> (metrics, records).

    ``calibrate``: also choose the binarisation threshold that maximises the validation object Dice
    (``val_threshold``; ``evaluation.threshold: calibrated``), from the same logits.
    """
    thresholds = CALIBRATION_THRESHOLDS if calibrate else (0.5,)
    by_t = predict_records(model, cache, val_ids, inference=study["inference"], rules={"any": ("any", None)},
                           device=device, precision=precision, thresholds=thresholds)
    records = by_t[0.5]["any"]
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
    if calibrate:
        out["val_threshold"] = calibrate_threshold({t: r["any"] for t, r in by_t.items()})
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

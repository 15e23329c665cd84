"""One trial's training: a small trainer with four hooks, wired up by the Tune function.

:class:`Trainer` builds everything a trial needs from its :class:`~trainables.config.TrialConfig` (model,
SGD, lr schedule, precision and loss scaler, the patch sampler with the iw map, the loss) and resumes from a
checkpoint's state. :meth:`Trainer.fit` runs the protocol (docs/definitions.md §4): each epoch ``iterations`` calls of the
``train_step`` hook, the lr schedule step, then, when due, the ``validate`` hook, the ``checkpoint`` hook and
the ``report`` hook::

    train_step(batch) -> tensor         one SGD step (trainables.step.train_step) on a DeviceBatch: its loss
    validate(out_dir, calibrate) -> {}  whole-volume validation -> records (saved in out_dir) -> val_* metrics
    checkpoint(epoch, out_dir)          the resumable state (and, at the last epoch, the trial's artifacts)
    report(metrics, out_dir)            hand both to the caller (Tune: tune.report with a checkpoint)

The hooks are plain methods: a test (or :func:`inject_faults`, from the study's ``testing`` section) replaces
one on an instance, so the loop itself has no test branch. A non-finite loss ends the trial with
:class:`TrialDivergedError`, naming the epoch and iteration where it first appeared: the losses stay on the
device and are checked every :data:`CHECK_EVERY` iterations and at the end of each epoch with one host sync,
always before the epoch's checkpoint (so a model updated from a NaN is never saved).
"""

from __future__ import annotations

import functools
import itertools
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables.build import STATE_FILE, build_lr_schedule, build_model, build_optimizer, compiled
from trainables.config import TestingConfig, TrialConfig
from trainables.data import Cache, PatchSampler
from trainables.data.folds import fold_splits
from trainables.device import start_trial, task_device
from trainables.evaluate import CALIBRATION_THRESHOLDS, calibrate_threshold, predict_records
from trainables.losses import get_loss, loss_record
from trainables.metrics import save_records, summarize
from trainables.naming import trial_label
from trainables.step import DeviceBatch, DevicePrefetcher, Precision, configure_backends, train_step

VAL_RECORDS_FILE = "val_records.json"
TRIAL_CONFIG_FILE = "trial_config.json"
VAL_FROC_FILE = "val_froc.png"

Report = Callable[[dict[str, Any], str], None]


class TrialDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the trial ends as an error with this reason."""


#: iterations between two checks of the losses for NaN/inf (one host sync each; also at every epoch's end)
CHECK_EVERY = 16


class Trainer:
    """The training loop of one trial (module docstring); ``report(metrics, checkpoint_dir)`` is called once
    per epoch, and the folder is deleted when it returns.

    Validation metrics (``val_*``) are in ``metrics`` only at the epochs where validation ran (every
    ``validation.every`` epochs and at the last one), never carried over.
    """

    def __init__(self, cfg: TrialConfig, *, state: dict[str, Any] | None = None, report: Report):
        t_init = time.perf_counter()
        self.cfg = cfg
        self._report = report
        trial = cfg.trial
        study = cfg.study.for_trial(trial)  # its iw.power / optimizer.lr when the search sets them
        self.device = task_device(study.resources.gpu)  # a GPU that cannot be used fails here, before any step
        start_trial(self.device, seed=trial.seed, threads=study.resources.threads)  # the process may be reused
        configure_backends(self.device)
        self.model = build_model(study.model, study.training.patch_size).to(self.device)
        self.forward = compiled(self.model, study.model.compile)  # the training step's (shares the weights)
        self.optimizer = build_optimizer(self.model, study.training.optimizer)
        self.scheduler = build_lr_schedule(self.optimizer, study.training.lr_schedule)
        self.precision = Precision.for_device(self.device, study.training.amp)
        self.scaler = self.precision.scaler()
        self.loss_fn = get_loss(trial.loss, **trial.loss_params)
        self.needs = loss_record(trial.loss).needs  # batch extras the loss takes (per-lesion losses)
        self.resumed = state is not None
        self.start_epoch, next_batch = 0, 0
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.start_epoch = int(state["epoch"]) + 1
            next_batch = int(state["sampler"]["next_batch"])
        self.cache = Cache(study.data.cache_dir)
        if trial.fold is not None:  # cross-validation: fold k validates on its cases, trains on the others'
            train_ids, val_ids = fold_splits(cfg.run.folds, trial.fold)
        else:
            train_ids, val_ids = self.cache.case_ids(cfg.run.splits), self.cache.case_ids(study.data.val)
        self.val_ids = val_ids if cfg.run.validates else []
        v = study.validation
        self.val_subset = (validation_subset(self.cache, self.val_ids, v.subset, v.seed)
                           if v.subset is not None and v.subset < len(self.val_ids) else self.val_ids)
        # the ASHA rung epochs (1-based) of a sweep trial: validated there, on the subset, whatever `every` says
        self.rungs = set(study.scheduler.milestones(cfg.run.epochs)) if cfg.run.stage == "sweep" else set()
        clip = study.iw.clip
        t = study.training
        self.sampler = PatchSampler(
            self.cache, train_ids, patch_size=t.patch_size, batch_size=t.batch_size,
            iw=trial.iw, iw_clip=clip, iw_power=study.iw.power, lesion_prob=t.lesion_prob, seed=trial.seed,
            num_workers=t.sampler_workers, start_batch=next_batch, extras=self.needs,
            pin_memory=self.device.type == "cuda",
        )
        self.val_records = None
        #: where this trial process's fixed cost went (seconds), reported with its first epoch as ``phase_*``
        #: (Tune's results only; ``python -m benchmarks.trial_cost`` reads them)
        self.phases: dict[str, float] = {"phase_setup_s": time.perf_counter() - t_init}

    # ------------------------------------------------------------------------------------------- hooks

    def train_step(self, batch: DeviceBatch) -> torch.Tensor:
        """One SGD step on ``batch`` (on the device: image, target and, for iw trials, the weight map); its loss
        as a 0-d device tensor (no host sync)."""
        loss_fn = self.loss_fn
        if batch.extras:  # the patch's instance labels / regions, cropped by the sampler
            loss_fn = functools.partial(loss_fn, **batch.extras)
        return train_step(self.forward, self.optimizer, self.scaler, loss_fn, batch.image, batch.target,
                          batch.weight, self.precision)

    def validate(self, out_dir: str, *, calibrate: bool, case_ids: list[str] | None = None) -> dict[str, float]:
        """Whole-volume validation of ``case_ids`` (default: the whole validation split): records under the
        ``any`` rule (saved in ``out_dir``), luna16 summary, ``val_n_cases``.

        ``calibrate``: also choose the binarisation threshold that maximises the validation object Dice
        (``val_threshold``; ``evaluation.threshold: calibrated``), from the same logits.
        """
        study = self.cfg.study
        case_ids = list(self.val_ids if case_ids is None else case_ids)
        thresholds = CALIBRATION_THRESHOLDS if calibrate else (0.5,)
        by_t = predict_records(self.model, self.cache, case_ids, inference=study.inference,
                               rules={"any": ("any", None)}, device=self.device, precision=self.precision,
                               thresholds=thresholds)
        records = self.val_records = by_t[0.5]["any"]
        save_records(Path(out_dir) / VAL_RECORDS_FILE, records, meta={"splits": list(study.data.val)})
        summary = summarize(records, protocol="luna16", n_boot=study.validation.n_boot, seed=0)
        if summary["avg_recall"] is None:
            raise ValueError(f"the validation cases ({', '.join(case_ids)}) contain no lesion: "
                             "nothing to validate on")
        out = {
            "val_n_cases": len(case_ids),
            "val_avg_recall": float(summary["avg_recall"]),
            # no lesion detected: no object Dice; 0 keeps the metric comparable across epochs
            "val_obj_dice": float(summary["obj_dice"]) if summary["obj_dice"] is not None else 0.0,
            "val_fp_per_image": float(summary["fp_per_image"]),
        }
        if summary.get("pred_positive_fraction") is not None:
            out["val_pred_positive_fraction"] = float(summary["pred_positive_fraction"])
        if calibrate:
            out["val_threshold"] = calibrate_threshold({t: r["any"] for t, r in by_t.items()})
        return out

    def checkpoint(self, epoch: int, out_dir: str) -> None:
        """The resumable state in ``out_dir``; at the last epoch also the trial's config and validation FROC."""
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "epoch": epoch,
                "trial": json.dumps(self.cfg.trial.as_dict()),
            },
            Path(out_dir) / STATE_FILE,
        )
        if epoch + 1 == self.cfg.run.epochs:
            self._write_final_artifacts(out_dir)

    def report(self, metrics: dict[str, Any], out_dir: str) -> None:
        """Hand the epoch's metrics and checkpoint folder to the caller."""
        self._report(metrics, out_dir)

    # ------------------------------------------------------------------------------------------- loop

    def fit(self) -> None:
        """Train from the start (or resumed) epoch to the run's last epoch."""
        cfg = self.cfg
        epochs, iterations = cfg.run.epochs, cfg.study.training.iterations
        every = cfg.study.validation.every
        calibrated = cfg.study.evaluation.threshold == "calibrated"
        t_fit = time.perf_counter()
        with self.sampler:
            self.phases["phase_sampler_start_s"] = time.perf_counter() - t_fit
            batches = DevicePrefetcher(iter(self.sampler), self.device, iw=cfg.trial.iw, extras=self.needs)
            for epoch in range(self.start_epoch, epochs):
                t0 = time.perf_counter()
                self.model.train()
                lr = self.optimizer.param_groups[0]["lr"]
                losses: list[torch.Tensor] = []
                for it in range(iterations):
                    losses.append(self.train_step(next(batches)))
                    if it == 0 and epoch == self.start_epoch:  # the first batch and step of this process
                        self.phases["phase_first_step_s"] = time.perf_counter() - t0
                    if (it + 1) % CHECK_EVERY == 0 or it + 1 == iterations:
                        self._check_losses(losses, epoch, lr)
                self.scheduler.step()
                train_seconds = time.perf_counter() - t0
                last = epoch + 1 == epochs
                train_loss = float(np.mean(torch.stack(losses).double().cpu().numpy()))
                metrics: dict[str, Any] = {"epoch": epoch, "epochs": epochs, "train_loss": train_loss,
                                           "lr": lr, "training_done": last}
                if self.resumed and epoch == self.start_epoch:
                    metrics["resumed_from_epoch"] = self.start_epoch  # the driver tags the MLflow run with it
                with tempfile.TemporaryDirectory() as ckpt_dir:
                    if self.val_ids and ((epoch + 1) % every == 0 or last or epoch + 1 in self.rungs):
                        # intermediate validations on the fixed subset (if any), the last on the whole split
                        metrics.update(self.validate(ckpt_dir, calibrate=last and calibrated,
                                                     case_ids=None if last else self.val_subset))
                    metrics["epoch_seconds"] = time.perf_counter() - t0
                    metrics["train_seconds"] = train_seconds
                    t_ckpt = time.perf_counter()
                    self.checkpoint(epoch, ckpt_dir)
                    metrics["phase_checkpoint_s"] = time.perf_counter() - t_ckpt
                    if epoch == self.start_epoch:
                        metrics.update(self.phases)
                    self.report(metrics, ckpt_dir)

    def _check_losses(self, losses: list[torch.Tensor], epoch: int, lr: float) -> None:
        """End the trial at the first non-finite loss of the epoch (one host sync for the losses so far)."""
        values = torch.stack(losses).float().cpu()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            it = int(bad[0, 0])
            raise TrialDivergedError(
                f"non-finite training loss ({float(values[it])}) at epoch {epoch}, iteration {it} "
                f"(loss {self.cfg.trial.loss}, iw {self.cfg.trial.iw}, lr {lr:g}); "
                "lower the learning rate or check the data"
            )

    def _write_final_artifacts(self, ckpt_dir: str) -> None:
        """Files for the trial's MLflow run, kept in the last checkpoint: the config and the validation FROC
        (with a bootstrap band: at least 100 replicates, once, whatever the per-epoch ``validation.n_boot``)."""
        Path(ckpt_dir, TRIAL_CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str))
        if self.val_records is not None:
            from trainables.metrics.plots import plot_froc

            label = trial_label(self.cfg.trial.as_dict())
            summary = summarize(self.val_records, protocol="luna16",
                                n_boot=max(self.cfg.study.validation.n_boot, 100), seed=0)
            plot_froc({label: summary}, Path(ckpt_dir) / VAL_FROC_FILE, title=f"validation FROC, {label}")


def validation_subset(cache: Cache, case_ids: list[str], n: int, seed: int) -> list[str]:
    """``n`` of the validation cases, the same for every trial of a study: drawn with ``seed`` from the sorted
    ids; when the draw holds no lesion, its last case is replaced by the first drawn-over case with one."""
    ids = sorted(case_ids)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    chosen = order[:n]
    if not any(cache.meta(c).get("n_lesions", 0) for c in chosen):
        with_lesion = next((c for c in order[n:] if cache.meta(c).get("n_lesions", 0)), None)
        if with_lesion is not None:
            chosen[-1] = with_lesion
    return sorted(chosen)


def inject_faults(trainer: Trainer, testing: TestingConfig) -> Trainer:
    """Wrap ``trainer.train_step`` with the test-only faults of ``testing``: a sleep per step, and a NaN loss
    from global iteration ``nan_at_iteration`` on for the listed configurations. No faults: unchanged."""
    inject = testing.nan_at_iteration is not None and trainer.cfg.trial.config_name in testing.nan_configs
    if not inject and not testing.sleep_per_iteration:
        return trainer
    step = trainer.train_step
    counter = itertools.count(trainer.start_epoch * trainer.cfg.study.training.iterations)

    def faulty(batch) -> torch.Tensor:
        i = next(counter)
        if testing.sleep_per_iteration:
            time.sleep(testing.sleep_per_iteration)
        value = step(batch)
        return torch.full_like(value, float("nan")) if inject and i >= testing.nan_at_iteration else value

    trainer.train_step = faulty
    return trainer

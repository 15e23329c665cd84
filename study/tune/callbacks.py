"""The driver's Tune callback: concise progress lines and all MLflow logging of the trials.

One line per trial epoch (instead of Tune's tables, which print the whole nested config), and for each
trial exactly one MLflow run, found or created by its Ray trial id (which survives ``Tuner.restore``):
params when the run is created, per-epoch metrics at step = epoch number as the console prints it (1-based),
the artifacts the trial left in its last checkpoint, FINISHED / FAILED with the error's reason.

Exactly one value per metric and step: after a resume Tune replays the results a trial reported after the
experiment's last snapshot (the trial re-runs those epochs from its checkpoint, deterministically). The steps
already in a run are read from MLflow when the run is first seen by this driver process, and a (metric, step)
that is there is never logged again. Tune pickles the callback with the experiment and restores it on resume;
nothing in it depends on state that a restore loses.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray import tune

from study import tracking
from trainables.config import TrialConfig

#: what the trainable reports that goes to MLflow (Tune's own bookkeeping keys are left out)
_LOGGED = tracking.LOGGED_RESULT_KEYS
_ARTIFACTS = ("trial_config.json", "val_records.json", "val_froc.png")


class StudyCallback(tune.Callback):
    """``asha_file``: the sweep's persisted rungs (:mod:`study.tune.asha`), read for the trials ASHA stopped: their
    runs are FINISHED with a ``stopped_at_epoch`` tag and never get metrics past that epoch."""

    def __init__(self, stage: str, asha_file: str | None = None):
        self.stage = stage
        self.asha_file = asha_file
        self._runs: dict[str, str] = {}
        self._steps: dict[str, dict[str, set[int]]] = {}  # run id -> metric -> steps already logged
        self._configs: dict[str, TrialConfig] = {}
        self._found: set[str] = set()  # runs that existed before this driver saw their trial (resumed trials)
        self._client = None
        self._failing: set[str] = set()  # kinds of MLflow calls failing now (warned once until they work)

    def __getstate__(self):  # pickled into the experiment: no client, no cache
        return {"stage": self.stage, "asha_file": self.asha_file}

    def __setstate__(self, state):
        self.__init__(state["stage"], state.get("asha_file"))

    def _asha(self):
        from study.tune.asha import AshaState

        return AshaState.read(Path(self.asha_file)) if self.asha_file else None

    # ------------------------------------------------------------------------------------------ helpers

    def _print(self, msg: str) -> None:
        print(f"[{self.stage} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def _mlc(self):
        if self._client is None:
            self._client = tracking.client()
        return self._client

    def _run_id(self, trial) -> str:
        if trial.trial_id not in self._runs:
            cfg = self._cfg(trial)
            run_id, created = tracking.trial_run(self._mlc(), trial.trial_id, cfg, str(trial))
            if created:
                self._safely("dataset logging", lambda: self._mlc().log_inputs(
                    run_id, datasets=tracking.dataset_inputs(cfg)))
            self._steps[run_id] = {} if created else tracking.logged_steps(self._mlc(), run_id)
            if not created:
                self._found.add(run_id)
            self._runs[trial.trial_id] = run_id
        return self._runs[trial.trial_id]

    def _cfg(self, trial) -> TrialConfig:
        """The trial's config, typed (rebuilt once per trial)."""
        cfg = self._configs.get(trial.trial_id)
        if cfg is None:
            cfg = self._configs[trial.trial_id] = TrialConfig.from_dict(trial.config)
        return cfg

    def _safely(self, what: str, fn) -> None:
        """MLflow trouble is reported (once per kind until it works again), never allowed to stop the sweep: the
        results are in Tune's state, and the stage logs what MLflow missed when it ends
        (:func:`study.tracking.backfill_runs`)."""
        try:
            fn()
            self._failing.discard(what)
        except Exception as exc:  # noqa: BLE001
            if what not in self._failing:
                self._failing.add(what)
                self._print(f"warning: MLflow {what} failed ({type(exc).__name__}: {str(exc)[:200]}); the values "
                            "stay in Tune's results and are logged when the stage ends")

    # ------------------------------------------------------------------------------------------ Tune hooks

    def on_trial_start(self, iteration, trials, trial, **info):
        done = sum(t.status == "TERMINATED" for t in trials)
        self._print(f"{self._cfg(trial).trial.label} started ({done}/{len(trials)} trials finished)")

        def start():
            run_id = self._run_id(trial)
            if run_id in self._found and "error" in self._mlc().get_run(run_id).data.tags:
                self._mlc().delete_tag(run_id, "error")  # an errored trial run again (after a GPU fix)

        self._safely("run creation", start)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", 0))
        parts = [f"{self._cfg(trial).trial.label} epoch {epoch + 1}/{result.get('epochs', '?')}",
                 f"loss {result.get('train_loss', float('nan')):.4f}"]
        if result.get("val_avg_recall") is not None:
            parts += [f"val recall {result['val_avg_recall']:.3f}", f"objDice {result.get('val_obj_dice', 0):.3f}",
                      f"FP/img {result.get('val_fp_per_image', 0):.1f}"]
        parts.append(f"{result.get('epoch_seconds', 0.0):.1f} s/epoch")
        asha = self._asha()
        stopped = asha.stopped_at(trial.trial_id) if asha is not None else None
        if stopped is not None and epoch + 1 > stopped:
            return  # restored past the rung where ASHA had stopped it: this epoch does not count
        if stopped is not None:
            parts.append(f"stopped by ASHA ({asha.describe(trial.trial_id)})")
        elif asha is not None and asha.decision(trial.trial_id, epoch + 1) == "continue":
            parts.append("ASHA: continues")
        self._print("  ".join(parts))

        def log():
            run_id = self._run_id(trial)
            step = epoch + 1  # the epoch number the console prints
            logged = self._steps[run_id]
            metrics = {k: v for k, v in result.items()
                       if (k in _LOGGED or k.startswith("val_")) and step not in logged.get(k, ())}
            for key in tracking.log_metrics(self._mlc(), run_id, metrics, step=step):
                logged.setdefault(key, set()).add(step)
            if "resumed_from_epoch" in result:  # a tag, not a metric: an uninterrupted run has none
                self._mlc().set_tag(run_id, "resumed_from_epoch", str(result["resumed_from_epoch"]))

        self._safely("metric logging", log)

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = sum(t.status == "TERMINATED" for t in trials) + 1
        asha = self._asha()
        stopped = asha.stopped_at(trial.trial_id) if asha is not None else None
        how = f"stopped by ASHA after epoch {stopped}" if stopped is not None else "finished"
        self._print(f"{self._cfg(trial).trial.label} {how} ({min(done, len(trials))}/{len(trials)})")

        def close():
            run_id = self._run_id(trial)
            if asha is not None and asha.trials.get(trial.trial_id, {}).get("decisions"):
                self._mlc().set_tag(run_id, "asha", asha.describe(trial.trial_id)[:5000])
            if stopped is not None:
                self._mlc().set_tag(run_id, "stopped_at_epoch", str(stopped))
            ckpt = trial.checkpoint
            if ckpt is not None:
                for name in _ARTIFACTS:
                    path = Path(ckpt.path) / name
                    if path.is_file():
                        self._mlc().log_artifact(run_id, str(path))
            self._mlc().set_terminated(run_id, "FINISHED")

        self._safely("closing the run", close)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._print(f"{self._cfg(trial).trial.label} failed ({error_reason(trial)}); retrying from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = error_reason(trial)
        self._print(f"{self._cfg(trial).trial.label} ended in error: {reason}; the study goes on")

        def fail():
            run_id = self._run_id(trial)
            self._mlc().set_tag(run_id, "error", reason)
            self._mlc().set_terminated(run_id, "FAILED")

        self._safely("recording the error", fail)


def error_reason(trial) -> str | None:
    """The most telling line of an errored trial's error (our TrialDivergedError / GpuUnavailableError message).

    The error file is read from the trial's folder in the experiment (``trial.error_file`` needs a running Ray,
    which ``study status`` does not start)."""
    if trial.status != "ERROR":
        return None
    text = ""
    for where in (lambda: trial.error_file,  # the driver's copy during the run (needs Ray)
                  lambda: Path(trial.storage.trial_fs_path, trial.run_metadata.error_filename)):  # in the storage
        try:
            path = where()
            if path and Path(path).is_file():
                text = Path(path).read_text()
                break
        except Exception:  # noqa: BLE001 - no Ray session, no error file: the next place, then get_error
            continue
    if not text:
        try:
            text = str(trial.get_error() or "")
        except Exception:  # noqa: BLE001 - a crash may leave no error at all; the reason is best effort
            pass
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "TrialDivergedError" in ln or "GpuUnavailableError" in ln:
            return ln[:1000]
    return (lines[-1] if lines else "trial errored (no error recorded)")[:1000]

"""The Ray Tune function trainable: one trial = one (loss, iw, parameters, seed) trained by the protocol.

Tune hands the trial a plain dict (built by ``study.tune.space``), rebuilt here in one call into a
:class:`~trainables.config.TrialConfig`:

``trial``  ``{"loss", "iw", "params", "seed"}``
``study``  the frozen study config (``StudyConfig.to_dict()``) with ``data.cache_dir`` resolved
``run``    ``{"stage": "sweep" | "retrain", "splits": [...], "validate": bool, "epochs": int,
           "experiment_id", "parent_run_id", "study_id"}``

The work is :class:`trainables.trainer.Trainer`; this module only wires it to Tune: the state of
``tune.get_checkpoint()`` in, ``tune.report(metrics, checkpoint=...)`` out, the study's test-only faults
injected into the trainer's ``train_step`` hook. :func:`run_trial` is the same without Ray (``report`` is a
callable), which the tests drive directly.

The trial never talks to MLflow: the driver's Tune callback (``study.tune.callbacks``) logs every reported result,
and the artifacts this trial writes into its last checkpoint, to the trial's MLflow run. So the tracking
server can stay bound to 127.0.0.1 on the head node and a single process writes the MLflow store.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from trainables.build import load_state
from trainables.config import TrialConfig
from trainables.trainer import Report, Trainer, TrialDivergedError, inject_faults

__all__ = ["TrialDivergedError", "run_trial", "train_trial"]


def _quiet_actor_exit(unraisable) -> None:
    """``sys.unraisablehook`` of a trial process: the ``SystemExit`` Ray raises to end a (reused) trial actor that
    finished normally can land in a weakref callback, which Python reports as "Exception ignored ... SystemExit"
    on stderr, forwarded to the study's console as a traceback. That one is dropped; every other unraisable
    exception is reported as before (a trial that fails raises its error the normal way, not through this hook)."""
    if isinstance(unraisable.exc_type, type) and issubclass(unraisable.exc_type, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable (see the module docstring for ``config``)."""
    from ray import tune

    sys.unraisablehook = _quiet_actor_exit

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


def run_trial(config: Mapping[str, Any], *, state: Mapping[str, Any] | None, report: Report) -> None:
    """Train one trial from ``state`` (a loaded checkpoint, or None to start) to its last epoch."""
    cfg = TrialConfig.from_dict(config)
    inject_faults(Trainer(cfg, state=state, report=report), cfg.study.testing).fit()

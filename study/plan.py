"""What a study will run and roughly how long it takes here: ``study launch --dry-run`` and the first lines of a
launch.

The estimate times a few training steps of the study's own step function on this machine (random data of the
patch size; a step's cost does not depend on the data) and one forward pass of an inference window, then
multiplies by the trial-epochs of the sweep and the retrain and divides by the trials that run at once. It
leaves out Ray's start (about 10 s), data preparation and the hold-out inference, and trials that share the
machine slow each other down: read it as the order of magnitude, measured, not as a promise.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from trainables.config import StudyConfig
from trainables.naming import config_group


def winners_per_seed(cfg: StudyConfig) -> int:
    """How many configurations the selection keeps (each retrained once per seed)."""
    if cfg.selection.mode == "top-k":
        if cfg.search.algorithm == "tpe":  # draws over every round (the trials hold the first)
            return min(cfg.selection.k, cfg.sweep_size // (len(cfg.search.seeds) * (cfg.data.folds or 1)))
        return min(cfg.selection.k, len({(t.loss, t.iw, str(t.params)) for t in cfg.trials}))
    return len({config_group(t.as_dict()) for t in cfg.trials})


def _windows_per_case(cfg: StudyConfig) -> int | None:
    if cfg.data.source != "phantom":
        return None
    shape, win, stride = cfg.data.phantom.shape, cfg.inference.window, cfg.inference.stride
    return math.prod(max(1, math.ceil((max(n, w) - w) / s) + 1) for n, w, s in zip(shape, win, stride))


def _forward_seconds(cfg: StudyConfig) -> float:
    import torch

    from trainables.build import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.resources.threads)
    try:
        model = build_model(cfg.model, cfg.training.patch_size).eval()
        x = torch.rand((1, 1, *cfg.inference.window))
        with torch.inference_mode():
            model(x)
            t0 = time.perf_counter()
            model(x)
            return time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def measured_step(cfg: StudyConfig) -> float | None:
    """Seconds of one training step of the study's first trial on this machine's CPU; None for GPU trials (a
    CPU timing says nothing about them, and the paper's 128³ width-1.0 step takes minutes on a CPU head)."""
    import sys

    from trainables.timing import estimate_step_seconds

    if cfg.resources.gpu > 0:
        return None
    t = cfg.training
    print(f"(timing one training step of {cfg.trials[0].label} on this CPU: batch {t.batch_size} × "
          f"{'×'.join(map(str, t.patch_size))}, U-Net width {cfg.model.width:g} ...)", file=sys.stderr, flush=True)
    return estimate_step_seconds(cfg, cfg.trials[0])


def plan(cfg: StudyConfig, *, num_cpus: int | None = None, measure: bool = True) -> dict[str, Any]:
    """Trials, trial-epochs and (``measure``, CPU trials) the measured step time and the wall-time estimate."""
    t, seeds = cfg.training, len(cfg.search.seeds)
    n_sweep = cfg.sweep_size
    n_retrain = 0 if cfg.holdout_models == "folds" else winners_per_seed(cfg) * seeds
    out: dict[str, Any] = {
        "trials": [s.label for s in cfg.trials],
        "sweep_trial_epochs": n_sweep * t.epochs,
        "retrain_trial_epochs": n_retrain * cfg.epochs_retrain,
        "retrain_trials": n_retrain,
        "iterations_per_epoch": t.iterations,
    }
    cpus = num_cpus or os.cpu_count() or 1
    per_trial = max(cfg.resources.cpu, 1e-9)
    parallel = max(1, min(n_sweep, int(cpus // per_trial) or 1, cfg.max_concurrent_trials or n_sweep))
    out["parallel_trials"] = parallel
    step = measured_step(cfg) if measure else None
    if step is None:
        return out
    out["step_seconds"] = step
    steps = (out["sweep_trial_epochs"] + out["retrain_trial_epochs"]) * t.iterations
    val_seconds = 0.0
    windows = _windows_per_case(cfg)
    if windows is not None:
        n_val_cases = max(1, round(cfg.data.phantom.cases / 4))
        validations = sum(1 for e in range(t.epochs) if (e + 1) % cfg.validation.every == 0 or e + 1 == t.epochs)
        passes = 8 if cfg.inference.tta == "mirror" else 1  # test-time mirroring: 8 flips per window
        val_seconds = n_sweep * validations * n_val_cases * windows * passes * _forward_seconds(cfg)
    out["validation_seconds"] = val_seconds
    out["estimate_seconds"] = (steps * step + val_seconds) / parallel
    return out


def step_line(cfg: StudyConfig, step: float | None, *, gpu_step: float | None = None) -> str:
    t = cfg.training
    if step is None:
        if gpu_step is not None:
            return (f"training step on a trial's GPU: {1000 * gpu_step:.0f} ms (batch {t.batch_size} × "
                    f"{'×'.join(map(str, t.patch_size))}, U-Net width {cfg.model.width:g}, AMP "
                    f"{'on' if t.amp else 'off'}; measured once per study)")
        return ("training step: GPU trials, not timed on this machine (`study gpu-check` on a GPU node measures "
                "the step; a launch times it there once)")
    return (f"training step on this machine: {1000 * step:.0f} ms (batch {t.batch_size} × "
            f"{'×'.join(map(str, t.patch_size))}, U-Net width {cfg.model.width:g}, "
            f"{int(cfg.resources.cpu)} thread(s) per trial)")


#: what the hold-out judges, by ``evaluation.holdout_models``
JUDGED = {"retrain": "the retrained winners", "folds": "the fold ensembles",
          "both": "the retrained winners and the fold ensembles"}


def describe_plan(cfg: StudyConfig, p: dict[str, Any]) -> str:
    search = cfg.search
    if search.algorithm == "tpe":
        lines = [f"{cfg.sweep_size} sweep trial(s) in {search.rounds} round(s); the first round's "
                 f"{len(p['trials'])} (TPE's random start-up; the later rounds adapt to the scores before them):"]
    else:
        lines = [f"{len(p['trials'])} sweep trial(s):"]
    lines += [f"  {label}" for label in p["trials"]]
    if search.algorithm == "tpe":
        configs = sorted({config_group(t.as_dict()) for t in cfg.trials})
        lines.append(f"TPE search: {search.num_samples} draw(s) per (loss, iw) configuration ({len(configs)}: "
                     f"{', '.join(configs)}; one with nothing to draw runs once), {search.draws_per_round} per "
                     f"round, search.seed {search.seed}; each draw with every seed ({len(search.seeds)})"
                     + (f" and fold ({cfg.data.folds})" if cfg.data.folds else "")
                     + f": {cfg.sweep_size} sweep trials in all")
    if cfg.search.algorithm == "random":
        configs = {t.config_name for t in cfg.trials}
        settings = {t.label.rsplit("/", 2 if cfg.data.folds else 1)[0] for t in cfg.trials}
        lines.append(f"random search: {cfg.search.num_samples} draw(s) per (loss, iw) configuration (search.seed "
                     f"{cfg.search.seed}), each with every seed: {len(settings)} hyperparameter settings of "
                     f"{len(configs)} configuration(s)")
    if cfg.data.folds:
        judged = JUDGED[cfg.holdout_models]
        lines.append(f"cross-validation: {cfg.data.folds} folds over the train and validation cases (folds.json, "
                     f"seed {cfg.data.fold_seed}); every configuration and seed on each fold; the hold-out judges "
                     f"{judged}")
    lines.append(f"trial-epochs: sweep {p['sweep_trial_epochs']}, retrain {p['retrain_trial_epochs']} "
                 f"({p['retrain_trials']} retrained winner trial(s)), {p['iterations_per_epoch']} iterations each")
    if cfg.scheduler.type == "asha":
        rungs = ", ".join(map(str, cfg.scheduler.milestones(cfg.training.epochs)))
        lines.append(f"ASHA stops sweep trials early at epochs {rungs}: the sweep figures are the FIFO maximum "
                     f"(python -m benchmarks.asha measures the saving on the phantom)")
    if "step_seconds" not in p:
        lines.append(step_line(cfg, None))
    else:
        lines.append(step_line(cfg, p["step_seconds"]))
        val = (f", of which validation ≈ {p['validation_seconds'] / 60 / p['parallel_trials']:.1f} min"
               if p["validation_seconds"] else " (validation not estimated: data outside the phantom)")
        lines.append(f"estimated wall time here: ≈ {p['estimate_seconds'] / 60:.1f} min with "
                     f"{p['parallel_trials']} trial(s) at once{val}; plus Ray start, data and hold-out "
                     "inference")
    return "\n".join(lines)

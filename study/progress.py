"""Concise progress of a Tune stage: one line per trial epoch, one per finished or failed trial.

Replaces Ray Tune's periodic tables (which print the whole nested trial config). Attached through
``RunConfig(callbacks=...)``; Tune restores it with the experiment on ``study resume``.
"""

from __future__ import annotations

import time

from ray import tune


def _label(config: dict) -> str:
    t = config.get("trial") or {}
    params = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(t.get("params", {}).items()))
    name = ("iw-" if t.get("iw") else "") + str(t.get("loss", "?"))
    return name + (f"[{params}]" if params else "") + f"/s{t.get('seed', '?')}"


class ProgressPrinter(tune.Callback):
    def __init__(self, stage: str):
        self.stage = stage

    def _print(self, msg: str) -> None:
        print(f"[{self.stage} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        done = sum(t.status == "TERMINATED" for t in trials)
        self._print(f"{_label(trial.config)} started ({done}/{len(trials)} trials finished)")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        parts = [f"{_label(trial.config)} epoch {int(result.get('epoch', -1)) + 1}/{result.get('epochs', '?')}",
                 f"loss {result.get('train_loss', float('nan')):.4f}"]
        if result.get("val_avg_recall") is not None:
            parts.append(f"val recall {result['val_avg_recall']:.3f}")
            parts.append(f"objDice {result.get('val_obj_dice', 0.0):.3f}")
            parts.append(f"FP/img {result.get('val_fp_per_image', 0.0):.1f}")
        parts.append(f"{result.get('epoch_seconds', 0.0):.1f} s/epoch")
        self._print("  ".join(parts))

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = sum(t.status == "TERMINATED" for t in trials) + 1
        self._print(f"{_label(trial.config)} finished ({min(done, len(trials))}/{len(trials)})")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(f"{_label(trial.config)} ended in error (see `study status`); the study goes on")

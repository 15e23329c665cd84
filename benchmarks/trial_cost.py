"""The fixed cost of a trial, side by side: ``python -m benchmarks.trial_cost [--trials N]``.

A sweep of 32 one-step trials (Focal α × γ × iw on the tiny phantom, 2×32³ patches, one validation on the
validation split at the end: well under a second of work each) runs twice in this process, each into a fresh
study folder with the data stage done beforehand: once with a new trial process per trial (Ray Tune's default,
``reuse_actors=False``: every trial imports torch, builds its sampler, opens MLflow) and once as the study runs
its sweeps (``reuse_actors=True``: a process is reused for the next trial of the same resources, every per-trial
state reset by the trainer). Printed per run:

* the sweep stage's wall time and the fixed cost per trial: ``slots × wall / trials − work``, where ``work`` is
  the trial's own reported seconds (its epoch: the step and the validation, and its checkpoint);
* where the trial-side seconds went, from the ``phase_*`` values its first result carries: the trainer's setup
  (model, optimiser, data handles), the sampler's start, the first step (first batch included), the checkpoint;
  what is left of the fixed cost is outside the trial function (process start and imports, Tune's bookkeeping,
  the study's callbacks: MLflow runs and metrics).

Target (issue 31): a fixed cost of at most 1 s per trial on this project's 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from trainables.environment import print_machine

TARGET_S = 1.0


def bench_space(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "data": {"source": "phantom", "phantom": {"cases": 8, "seed": 0, "shape": [32, 48, 48]}},
        "model": {"width": 0.125, "channels_last": False},
        "training": {"epochs": 1, "iterations": 1, "batch_size": 2, "patch_size": [32, 32, 32],
                     "lr_schedule": {"milestones": [], "gamma": 0.1}, "sampler_workers": 1},
        "inference": {"window": [32, 48, 48], "stride": [32, 48, 48]},
        "validation": {"n_boot": 0},
        "evaluation": {"n_boot": 100},
        "search": {"losses": {"focal": {"iw": [False, True], "alpha": [0.25, 0.5, 0.75, 0.9],
                                        "gamma": [0.0, 1.0, 2.0, 3.0]}}, "seeds": [0]},
        "resources": {"cpu": 1, "gpu": 0},
    }


def run(reuse: bool, storage: Path, num_cpus: int | None) -> dict[str, Any]:
    from benchmarks import new_study
    from study.layout import SWEEP
    from study.stages.data import stage_data
    from study.stages.training import stage_sweep
    from study.tune import tuner
    from study.tune.tuner import outcomes

    ctx = new_study(bench_space("reused" if reuse else "fresh"), storage, num_cpus=num_cpus, source="trial_cost")
    cfg, study_dir = ctx.cfg, ctx.dir
    before = tuner.REUSE_ACTORS
    tuner.REUSE_ACTORS = reuse
    try:
        stage_data(ctx)
        ctx.ensure_ray()  # Ray's start is not a trial's cost
        t0 = time.perf_counter()
        stage_sweep(ctx)
        wall = time.perf_counter() - t0
    finally:
        tuner.REUSE_ACTORS = before
        ctx.close()
    results = [r for r in outcomes(study_dir.ray_dir, SWEEP) if r.history]
    firsts = [r.history[0] for r in results]
    slots = min(len(cfg.trials), int((num_cpus or 2) // cfg.resources.cpu) or 1)
    work = statistics.mean(f.get("epoch_seconds", 0.0) + f.get("phase_checkpoint_s", 0.0) for f in firsts)
    phases = {k: statistics.mean(f.get(k, 0.0) for f in firsts)
              for k in ("phase_setup_s", "phase_sampler_start_s", "phase_first_step_s", "phase_checkpoint_s")}
    fixed = slots * wall / len(results) - work
    inside = phases["phase_setup_s"] + phases["phase_sampler_start_s"]
    return {"reuse": reuse, "trials": len(results), "slots": slots, "wall": wall, "work": work, "fixed": fixed,
            "phases": phases, "outside": fixed - inside}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: this machine's)")
    args = p.parse_args(argv)
    print_machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="trial-cost-") as tmp:
        for reuse in (False, True):
            rows.append(run(reuse, Path(tmp), args.num_cpus))
            r = rows[-1]
            print(f"reuse_actors={reuse}: {r['trials']} trials on {r['slots']} slots, sweep {r['wall']:.1f} s; "
                  f"work {r['work']:.2f} s/trial; fixed cost {r['fixed']:.2f} s/trial", flush=True)
    print()
    print("| | new process per trial | reused process |")
    print("|---|---|---|")
    fresh, reused = rows
    print(f"| sweep wall time (32 trials, {fresh['slots']} slots) | {fresh['wall']:.1f} s | {reused['wall']:.1f} s |")
    print(f"| trial work (epoch + checkpoint) | {fresh['work']:.2f} s | {reused['work']:.2f} s |")
    print(f"| **fixed cost per trial** | {fresh['fixed']:.2f} s | **{reused['fixed']:.2f} s** "
          f"(ratio {reused['fixed'] / fresh['fixed']:.2f}) |")
    for key, name in (("phase_setup_s", "trainer setup (model, optimiser, data)"),
                      ("phase_sampler_start_s", "sampler start"),
                      ("phase_first_step_s", "first step (first batch included; part of the work)"),
                      ("phase_checkpoint_s", "checkpoint (part of the work)")):
        print(f"| {name} | {fresh['phases'][key]:.3f} s | {reused['phases'][key]:.3f} s |")
    print(f"| outside the trial function (process, imports, Tune, MLflow callbacks) | {fresh['outside']:.2f} s | "
          f"{reused['outside']:.2f} s |")
    verdict = "met" if reused["fixed"] <= TARGET_S else "not met"
    print(f"\ntarget: fixed cost <= {TARGET_S:g} s per trial: {verdict} ({reused['fixed']:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""FIFO vs ASHA on one sweep, side by side in one process: ``python -m benchmarks.asha [--quick]``.

The same phantom study (an ASL β × iw sweep, 12 configurations, one seed; ``--loss focal``: Focal α × γ × iw,
12 configurations) runs its sweep twice, once with every trial to the end (FIFO) and once under ASHA
(:mod:`study.tune.asha`, rungs at epochs 1 and 3 of 9, η = 3, one set of rungs per (loss, iw)). Printed:

* the trial-epochs each used and their ratio (ASHA / FIFO; target <= 0.40);
* the rank agreement of the per-configuration scores: Kendall τ-b between the FIFO scores (validation metric
  at the last epoch) and the ASHA ranking (the epoch a configuration was judged at first, then its score there:
  what ASHA's selection sees), over all configurations and within each (loss, iw);
* whether the per-(loss, iw) winners are the same, and if not, by how much the ASHA winner's FIFO score trails
  the FIFO winner's and where ASHA stopped the FIFO winner (its value and the cutoff it fell below).

Both sweeps train identical trials (same seeds, the plain memory layout, validation at the same epochs apart from
the rungs, which change no weights), so a trial that ASHA lets finish has exactly its FIFO scores. About 15 min on
2 cores (``--quick``: 3 epochs per trial, a smoke run, no target).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from trainables.environment import one_line, print_machine
from trainables.naming import config_label, config_name

TARGET_RATIO = 0.40


def bench_space(loss: str, *, quick: bool, scheduler: str) -> dict[str, Any]:
    epochs = 3 if quick else 9
    losses = ({"asl": {"iw": [False, True], "beta": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0]}} if loss == "asl" else
              {"focal": {"iw": [False, True], "alpha": [0.25, 0.5, 0.75], "gamma": [0.0, 2.0]}})
    return {
        "name": f"bench-{scheduler}",
        "data": {"source": "phantom", "phantom": {"cases": 16, "seed": 0, "shape": [48, 64, 64],
                                                  "contrast": [0.30, 0.40]}},
        "model": {"width": 0.125, "channels_last": False},
        "training": {"epochs": epochs, "iterations": 10 if quick else 40, "batch_size": 2,
                     "patch_size": [32, 32, 32], "lr_schedule": {"milestones": [epochs - 1], "gamma": 0.1},
                     "sampler_workers": 1},
        "inference": {"window": [48, 64, 64], "stride": [48, 64, 64]},
        "validation": {"n_boot": 0, "every": 3, "subset": 2},
        "evaluation": {"n_boot": 100},
        "search": {"losses": losses, "seeds": [0]},
        "scheduler": ({"type": "asha", "grace_epochs": 1, "reduction_factor": 3} if scheduler == "asha"
                      else {"type": "fifo"}),
        "resources": {"cpu": 1, "gpu": 0},
    }


def run_sweep(space: dict[str, Any], storage: Path, *, num_cpus: int | None) -> dict[str, Any]:
    """The data, sweep and select stages of a study in ``storage``; its outcomes, selection and wall time."""
    from benchmarks import new_study
    from study.layout import SWEEP
    from study.stages.data import stage_data
    from study.stages.select import select_winners
    from study.stages.training import stage_sweep
    from study.tune.tuner import outcomes

    ctx = new_study(space, storage, num_cpus=num_cpus, source=space["name"])
    cfg, study_dir = ctx.cfg, ctx.dir
    try:
        stage_data(ctx)
        t0 = time.perf_counter()
        stage_sweep(ctx)
        seconds = time.perf_counter() - t0
    finally:
        ctx.close()
    results = outcomes(study_dir.ray_dir, SWEEP)
    return {"cfg": cfg, "results": results, "selection": select_winners(results, cfg), "seconds": seconds}


def point_scores(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Configuration (with its parameters) -> its (loss, iw), the epoch it was judged at (the highest any of its
    seeds reached) and the mean metric of those seeds there."""
    cfg = run["cfg"]
    metric, epochs = cfg.selection.metric, cfg.training.epochs
    by_point: dict[str, list] = defaultdict(list)
    for r in run["results"]:
        if r.status in ("TERMINATED", "STOPPED"):
            by_point[config_label(r.spec)].append(r)
    out = {}
    for name, rs in by_point.items():
        level = max(epochs if r.status == "TERMINATED" else r.stopped_at_epoch for r in rs)
        at = [r for r in rs if (epochs if r.status == "TERMINATED" else r.stopped_at_epoch) == level]
        values = [v for v in (r.measured(metric) for r in at) if v is not None]
        out[name] = {"group": config_name(rs[0].spec["loss"], rs[0].spec["iw"]), "epoch": level,
                     "score": sum(values) / len(values) if values else float("nan")}
    return out


def kendall(fifo: dict[str, dict], asha: dict[str, dict], names: list[str]) -> float | None:
    """τ-b between the FIFO scores and the ASHA ranking key (epoch judged at, then score)."""
    from scipy.stats import kendalltau

    if len(names) < 2:
        return None
    ranked = sorted(names, key=lambda n: (asha[n]["epoch"], asha[n]["score"]))
    keys = {}
    for i, n in enumerate(ranked):  # equal keys share a rank
        prev = ranked[i - 1] if i else None
        same = prev is not None and (asha[prev]["epoch"], asha[prev]["score"]) == (asha[n]["epoch"], asha[n]["score"])
        keys[n] = keys[prev] if same else i
    tau = kendalltau([fifo[n]["score"] for n in names], [keys[n] for n in names]).statistic
    return None if tau != tau else float(tau)  # NaN: one side constant


def compare(fifo: dict[str, Any], asha: dict[str, Any]) -> dict[str, Any]:
    from study.layout import SWEEP
    from study.stages.training import trial_epochs
    from study.tune.asha import AshaState, state_file

    f_scores, a_scores = point_scores(fifo), point_scores(asha)
    names = sorted(f_scores)
    groups = sorted({f_scores[n]["group"] for n in names})
    winners = {}
    state = AshaState.read(state_file(asha["dir"], SWEEP))
    point_tids = defaultdict(list)  # configuration (with parameters) -> its ASHA trial ids
    for r in asha["results"]:
        point_tids[config_label(r.spec)].append(r.trial_id)
    for w_f in fifo["selection"]["winners"]:
        group = config_name(w_f["loss"], w_f["iw"])
        w_a = next(w for w in asha["selection"]["winners"] if config_name(w["loss"], w["iw"]) == group)
        name_f = config_label({"loss": w_f["loss"], "iw": w_f["iw"], "params": w_f["params"], "seed": 0})
        name_a = config_label({"loss": w_a["loss"], "iw": w_a["iw"], "params": w_a["params"], "seed": 0})
        entry = {"fifo": name_f, "asha": name_a, "same": name_f == name_a}
        if not entry["same"]:
            entry["fifo_score_gap"] = f_scores[name_f]["score"] - f_scores[name_a]["score"]
            entry["why"] = "; ".join(f"ASHA stopped {name_f}: {state.describe(tid)}" for tid in point_tids[name_f]
                                     if state.stopped_at(tid) is not None)
        winners[group] = entry
    return {
        "trial_epochs": {"fifo": trial_epochs(fifo["results"]), "asha": trial_epochs(asha["results"])},
        "ratio": trial_epochs(asha["results"]) / trial_epochs(fifo["results"]),
        "seconds": {"fifo": fifo["seconds"], "asha": asha["seconds"]},
        "kendall_tau": {"all": kendall(f_scores, a_scores, names),
                        **{g: kendall(f_scores, a_scores, [n for n in names if f_scores[n]["group"] == g])
                           for g in groups}},
        "winners": winners,
        "scores": {n: {"fifo": f_scores[n]["score"], "asha_epoch": a_scores[n]["epoch"],
                       "asha_score": a_scores[n]["score"]} for n in names},
        "configurations": len(names),
    }


def report(res: dict[str, Any], metric: str, quick: bool) -> str:
    te = res["trial_epochs"]
    lines = [f"\n== FIFO vs ASHA: {res['configurations']} configurations, selection by {metric} ==",
             f"{'configuration':<34}{'FIFO score':>11}{'ASHA judged at':>16}{'ASHA score':>12}"]
    for n, s in res["scores"].items():
        lines.append(f"{n:<34}{s['fifo']:>11.3f}{'epoch ' + str(s['asha_epoch']):>16}{s['asha_score']:>12.3f}")
    lines.append(f"trial-epochs: FIFO {te['fifo']}, ASHA {te['asha']}, ratio ASHA/FIFO = {res['ratio']:.2f}"
                 + ("" if quick else f" (target <= {TARGET_RATIO:.2f}: "
                                     f"{'met' if res['ratio'] <= TARGET_RATIO else 'NOT met'})"))
    lines.append(f"sweep wall time: FIFO {res['seconds']['fifo']:.0f} s, ASHA {res['seconds']['asha']:.0f} s")
    taus = ", ".join(f"{g} {t:.2f}" if t is not None else f"{g} n/a" for g, t in res["kendall_tau"].items())
    lines.append(f"Kendall τ-b (FIFO scores vs ASHA ranking): {taus}")
    for group, w in res["winners"].items():
        if w["same"]:
            lines.append(f"winner {group}: {w['fifo']} under both")
        else:
            lines.append(f"winner {group}: FIFO {w['fifo']}, ASHA {w['asha']} (its FIFO score "
                         f"{w['fifo_score_gap']:.3f} lower); {w['why']}")
    same = all(w["same"] for w in res["winners"].values())
    lines.append(f"per-(loss, iw) winners: {'the same' if same else 'DIFFERENT'} under FIFO and ASHA")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.asha", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs of 10 steps per trial: a smoke run (~3 min)")
    parser.add_argument("--loss", choices=("asl", "focal"), default="asl", help="the swept loss (default asl)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    parser.add_argument("--keep", type=Path, default=None, help="keep both studies in this folder")
    args = parser.parse_args(argv)
    print_machine()
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.keep or Path(tmp)
        runs = {}
        for scheduler in ("fifo", "asha"):
            print(f"\n== {scheduler.upper()} sweep ==", flush=True)
            runs[scheduler] = run_sweep(bench_space(args.loss, quick=args.quick, scheduler=scheduler), storage,
                                        num_cpus=args.num_cpus)
            runs[scheduler]["dir"] = storage / f"bench-{scheduler}" / "ray"
        res = compare(runs["fifo"], runs["asha"])
    print(report(res, runs["fifo"]["cfg"].selection.metric, args.quick))
    if args.out:
        from trainables.environment import describe

        args.out.write_text(json.dumps({**res, "machine": one_line(describe())}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The study's stages: data -> sweep -> select -> retrain -> holdout -> report.

Each stage records its completion in ``state.json``; ``study resume`` skips finished stages and continues an
interrupted one (Tune restores its trials from their checkpoints, the hold-out stage skips configurations
whose records exist, the data stage skips prepared cases). Nothing already computed is recomputed.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from study import tracking
from study.layout import STAGES, StudyDir, StudyState, now
from study.tables import fmt, text_table
from trainables.config import StudyConfig, TrialSpec
from trainables.errors import UserError
from trainables.io_utils import json_default, write_text_atomic
from trainables.naming import config_name, trial_folder, trial_label, trial_slug

SWEEP, RETRAIN = "sweep", "retrain"


class StudyInterrupted(Exception):
    """A stage stopped before all its work was done (Ctrl+C, a killed driver): ``study resume`` continues."""


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class StudyContext:
    dir: StudyDir
    cfg: StudyConfig
    state: StudyState
    address: str | None = None
    wait_for_resources: bool = False
    num_cpus: int | None = None
    _ray_started: bool = False

    def cache_dir(self) -> str:
        if self.cfg.data.source == "cache":
            return str(self.cfg.data.path)
        return str(self.dir.data_dir / "cache")

    def ensure_ray(self) -> None:
        if not self._ray_started:
            from study.tuner import check_resources, init_ray

            init_ray(self.address, tracking_uri=self.state.tracking_uri, num_cpus=self.num_cpus)
            self._ray_started = True
            check_resources(self.cfg.resources.as_ray(), wait_for_resources=self.wait_for_resources)

    def close(self) -> None:
        if self._ray_started:
            from study.tuner import shutdown_ray

            shutdown_ray()
            self._ray_started = False


# ---------------------------------------------------------------------------------------------- data


def stage_data(ctx: StudyContext) -> None:
    from study.preflight import check_lesions
    from trainables.data import Cache, make_phantom, prepare_cache

    d = ctx.cfg.data
    if d.source == "phantom":
        ph = d.phantom
        phantom_dir = ctx.dir.data_dir / "phantom"
        manifest = phantom_dir / "manifest.csv"
        if not manifest.is_file():
            log(f"data: generating the {ph.kind} phantom dataset ({ph.cases} cases, seed {ph.seed})")
            if ph.kind == "lidc":
                from trainables.data.lidc_phantom import make_lidc_phantom, write_data_summary

                manifest = make_lidc_phantom(phantom_dir, n_cases=ph.cases, seed=ph.seed, shape=tuple(ph.shape),
                                             nodules_per_case=tuple(ph.nodules_per_case))
                for line in write_data_summary(phantom_dir):
                    log(f"data: {line.strip()}")
            else:
                manifest = make_phantom(phantom_dir, n_cases=ph.cases, seed=ph.seed, shape=tuple(ph.shape),
                                        contrast=tuple(ph.contrast), noise=ph.noise)
        cache = prepare_cache(manifest, ctx.cache_dir(), preset="luna16" if ph.kind == "lidc" else "none")
    elif d.source == "manifest":
        log(f"data: preparing {d.path} with preset {d.preset}")
        cache = prepare_cache(d.path, ctx.cache_dir(), preset=d.preset)
    else:
        cache = Cache(d.path)
    counts = check_lesions(cache, ctx.cfg, where=ctx.cache_dir())
    log(f"data: cache {ctx.cache_dir()}: {counts['train']} train, {counts['val']} val, "
        f"{counts['holdout']} hold-out cases")
    ctx.state.mark_done("data", cache_dir=ctx.cache_dir(), cases=counts)


# ---------------------------------------------------------------------------------------------- tune stages


def _run_tune_stage(ctx: StudyContext, *, name: str, stage_tag: str, trials: list[TrialSpec]) -> list:
    from study.space import param_space
    from study.tuner import outcomes, run_experiment, unfinished
    from trainables.trainable import train_trial

    ctx.ensure_ray()
    parent = tracking.stage_parent(ctx.state, stage_tag)
    ids = ctx.state.mlflow_ids()
    space = param_space(ctx.cfg, trials=trials, cache_dir=ctx.cache_dir(), stage=stage_tag,
                        experiment_id=ids["experiment_id"], parent_run_id=parent, study_id=ctx.state.study_id)
    log(f"{name}: {len(trials)} trial(s), resources per trial {ctx.cfg.resources.as_ray()}")
    scheduler = None
    if stage_tag == "sweep":
        from study.asha import make_scheduler, state_file

        scheduler = make_scheduler(ctx.cfg, state_file(ctx.dir.ray_dir, name))
        if scheduler is not None:
            sch = ctx.cfg.scheduler
            log(f"{name}: ASHA on {sch.metric}, rungs at epochs "
                f"{', '.join(map(str, sch.milestones(ctx.cfg.training.epochs)))} of {ctx.cfg.training.epochs}, "
                f"η = {sch.reduction_factor}, one set of rungs per "
                f"{'(loss, iw) configuration' if ctx.cfg.selection.mode == 'per-config' else 'study'}; "
                f"decisions kept in {state_file(ctx.dir.ray_dir, name)}")
    if not ctx.state.data.get("training_started"):  # from here on a failed launch keeps its folder (resume)
        ctx.state.data["training_started"] = now()
        ctx.state.save()
    gpu_failed = ctx.state.data.get("gpu_failed", {})
    if name in gpu_failed:
        log(f"{name}: the trials that could not use their GPU last time run again")
    run_experiment(
        storage=ctx.dir.ray_dir, name=name, trainable=train_trial, resources=ctx.cfg.resources.as_ray(),
        param_space=space, metric=None, max_concurrent=ctx.cfg.max_concurrent_trials,
        max_failures=ctx.cfg.failure.max_failures, scheduler=scheduler, resume_errored=name in gpu_failed,
    )
    results = outcomes(ctx.dir.ray_dir, name)
    left = unfinished(results, len(trials))
    if left:
        raise StudyInterrupted(f"{name}: {left} of {len(trials)} trial(s) did not finish")
    _stop_on_gpu_errors(ctx, name, results)
    tracking.finish_stage_runs(ctx.state, stage_tag, {r.trial_id: r.status for r in results})
    print(trial_table(results), flush=True)
    return results


def _stop_on_gpu_errors(ctx: StudyContext, name: str, results) -> None:
    """Trials that ended because their node's torch could not use the GPU Ray gave them: the stage is not done
    (exit 2 with the node's line); ``study resume`` runs those trials again, the finished ones stay finished."""
    from trainables.device import gpu_error_line, is_gpu_error

    failed = [r for r in results if r.status == "ERROR" and is_gpu_error(r.error or "")]
    marks = ctx.state.data.setdefault("gpu_failed", {})
    if not failed:
        if marks.pop(name, None) is not None:
            ctx.state.save()
        return
    marks[name] = now()
    ctx.state.save()
    raise UserError(f"{name}: {len(failed)} of {len(results)} trial(s) could not use the GPU they were given, "
                    f"none trained on the CPU instead: {gpu_error_line(failed[0].error)}\nNothing else is lost: "
                    f"after fixing the node(s), `study resume {ctx.dir.name} --storage {ctx.dir.root.parent}` runs "
                    "those trials again.")


def trial_summary(r) -> dict[str, Any]:
    """What `study status` and the end of a Tune stage show of one trial."""
    vals = [h["val_avg_recall"] for h in r.history if h.get("val_avg_recall") is not None]
    return {
        "trial_id": r.trial_id, "trial": r.spec, "state": r.status,
        "epochs_done": int(r.last.get("epoch", -1)) + 1 if r.last else 0,
        "epochs": r.last.get("epochs"), "epochs_reported": len(r.history),
        "best_val_avg_recall": max(vals) if vals else None,
        "last_val_avg_recall": r.measured("val_avg_recall"),  # the last *measured* values
        "last_val_obj_dice": r.measured("val_obj_dice"),
        "last_train_loss": r.last.get("train_loss"),
        "error": r.error,
    }


def trial_table(results, indent: str = "") -> str:
    """Label, state, epochs done, best and last validation recall, last object Dice and training loss (the
    validation columns only where a trial validates: retrain trials do not)."""
    summaries = list(map(trial_summary, results))
    validated = any(r["best_val_avg_recall"] is not None or r["last_val_obj_dice"] is not None for r in summaries)
    head = ("trial", "state", "epochs") + (("best val recall", "last val recall", "val objDice") if validated
                                           else ()) + ("train loss",)
    rows = [head]
    for r in summaries:
        vals = (fmt(r["best_val_avg_recall"]), fmt(r["last_val_avg_recall"]), fmt(r["last_val_obj_dice"]))
        rows.append((trial_label(r["trial"]) if r["trial"] else r["trial_id"], r["state"],
                     f"{r['epochs_done']}/{r['epochs'] or '?'}", *(vals if validated else ()),
                     fmt(r["last_train_loss"], 4)))
    return text_table(rows, indent=indent)


def trial_epochs(results) -> int:
    """Epochs the trials of a stage trained: a stopped trial's up to its rung (by its persisted decision: a
    driver killed right after the decision may not have written that epoch into Tune's result file), the
    others' as their results show."""
    return sum(r.stopped_at_epoch if r.status == "STOPPED" else len(r.history) for r in results)


def stage_sweep(ctx: StudyContext) -> None:
    results = _run_tune_stage(ctx, name=SWEEP, stage_tag="sweep", trials=list(ctx.cfg.trials))
    errors = [r for r in results if r.status == "ERROR"]
    for r in errors:
        log(f"sweep: trial {trial_label(r.spec)} ended in error: {r.error}")
    stopped = sum(r.status == "STOPPED" for r in results)
    used, full = trial_epochs(results), len(results) * ctx.cfg.training.epochs
    if ctx.cfg.scheduler.type == "asha":
        log(f"sweep: ASHA stopped {stopped} of {len(results)} trial(s) early; {used} of {full} trial-epochs "
            f"trained ({used / max(full, 1):.2f})")
    ctx.state.mark_done("sweep", trials=len(results), errors=len(errors), stopped=stopped, trial_epochs=used)


# ---------------------------------------------------------------------------------------------- select


def _score(outcome, metric: str, scope: str) -> float | None:
    if scope == "best":
        values = [h.get(metric) for h in outcome.history if h.get(metric) is not None]
        return max(values) if values else None
    return outcome.measured(metric)


def _reached(r, epochs: int) -> int:
    """The epochs a finished trial was judged at: all of them, or the rung where ASHA stopped it."""
    return epochs if r.status == "TERMINATED" else int(r.stopped_at_epoch)


def select_winners(results, cfg: StudyConfig) -> dict[str, Any]:
    """Best hyperparameters per (loss, iw) configuration (mean over seeds), or the top-k overall.

    Under ASHA the candidates of a configuration (of the study, for top-k) are its trials that reached the
    highest epoch any of them reached (the last epoch, unless every one was stopped or errored), scored there;
    the trials ASHA stopped below it are listed under ``stopped``."""
    sel = cfg.selection
    epochs = cfg.training.epochs
    done = [r for r in results if r.status in ("TERMINATED", "STOPPED")]
    excluded = [{"trial": r.spec, "status": r.status, "reason": r.error} for r in results
                if r.status not in ("TERMINATED", "STOPPED")]
    group = (lambda r: config_name(r.spec["loss"], r.spec["iw"])) if sel.mode == "per-config" else (lambda r: "all")
    top: dict[str, int] = {}
    for r in done:
        top[group(r)] = max(top.get(group(r), 0), _reached(r, epochs))
    finished = [r for r in done if _reached(r, epochs) == top[group(r)]]
    stopped = [{"trial": r.spec, "stopped_at_epoch": r.stopped_at_epoch} for r in done
               if _reached(r, epochs) < top[group(r)]]
    points: dict[str, dict[str, Any]] = {}
    for r in finished:
        spec = TrialSpec.from_dict(r.spec)
        key = json.dumps({"loss": spec.loss, "iw": spec.iw, "params": spec.params}, sort_keys=True)
        p = points.setdefault(key, {"loss": spec.loss, "iw": spec.iw, "params": spec.params, "scores": [],
                                    "obj_dice": [], "trial_ids": []})
        p["scores"].append(_score(r, sel.metric, sel.scope))
        p["obj_dice"].append(r.measured("val_obj_dice"))
        p["trial_ids"].append(r.trial_id)
        p["judged_at_epoch"] = _reached(r, epochs)
    ranked = []
    for order, p in enumerate(points.values()):
        scores = [s for s in p["scores"] if s is not None]
        dice = [d for d in p["obj_dice"] if d is not None]
        p["score"] = float(np.mean(scores)) if scores else float("-inf")
        p["val_obj_dice"] = float(np.mean(dice)) if dice else None
        p["order"] = order
        ranked.append(p)
    key_fn = lambda p: (-p["score"], -(p["val_obj_dice"] or 0.0), p["order"])  # noqa: E731
    ranked.sort(key=key_fn)
    if sel.mode == "top-k":
        winners = ranked[: sel.k]
    else:
        by_cfg: dict[tuple[str, bool], list] = defaultdict(list)
        for p in ranked:
            by_cfg[(p["loss"], p["iw"])].append(p)
        winners = [ps[0] for ps in by_cfg.values()]
        winners.sort(key=lambda p: p["order"])
    for p in winners:
        p.pop("order", None)
    out = {"metric": sel.metric, "scope": sel.scope, "mode": sel.mode, "winners": winners,
           "excluded": excluded, "candidates": len(ranked)}
    if cfg.scheduler.type == "asha":
        out["asha"] = {"max_epochs": epochs, "judged_at_epoch": top, "stopped": stopped}
    return out


def stage_select(ctx: StudyContext) -> None:
    from study.tuner import outcomes

    selection = select_winners(outcomes(ctx.dir.ray_dir, SWEEP), ctx.cfg)
    if not selection["winners"]:
        raise UserError("select: no sweep trial finished successfully; nothing to retrain "
                        f"(see `study status {ctx.dir.name}`)")
    write_text_atomic(ctx.dir.selection_file, json.dumps(selection, indent=2))
    for w in selection["winners"]:
        spec = TrialSpec(loss=w["loss"], iw=w["iw"], params=w["params"], seed=0)
        at = w.get("judged_at_epoch", ctx.cfg.training.epochs)
        where = "" if at == ctx.cfg.training.epochs else f" at epoch {at} (no trial of it reached the last epoch)"
        log(f"select: {spec.label.rsplit('/', 1)[0]}  {selection['metric']} = {w['score']:.3f}{where}")
    try:
        mlc = tracking.client(ctx.state.tracking_uri)
        mlc.log_artifact(ctx.state.mlflow_ids()["study_run_id"], str(ctx.dir.selection_file))
        tracking.tag_selection(ctx.state, selection, tracking.selection_rule(ctx.cfg))
    except Exception as exc:  # tracking is secondary to the result file
        log(f"select: could not record the selection in MLflow ({exc})")
    ctx.state.mark_done("select", winners=len(selection["winners"]))


def winner_trials(ctx: StudyContext) -> list[TrialSpec]:
    selection = ctx.dir.read_selection()
    return [TrialSpec(loss=w["loss"], iw=w["iw"], params=w["params"], seed=seed)
            for w in selection["winners"] for seed in ctx.cfg.search.seeds]


# ---------------------------------------------------------------------------------------------- retrain


def stage_retrain(ctx: StudyContext) -> None:
    results = _run_tune_stage(ctx, name=RETRAIN, stage_tag="retrain", trials=winner_trials(ctx))
    errors = sum(r.status == "ERROR" for r in results)
    ctx.state.mark_done("retrain", trials=len(results), errors=errors)


# ---------------------------------------------------------------------------------------------- holdout


def stage_holdout(ctx: StudyContext) -> None:
    import ray

    from study.tuner import outcomes
    from trainables.evaluate import holdout_records

    ctx.ensure_ray()
    results = [r for r in outcomes(ctx.dir.ray_dir, RETRAIN) if r.status == "TERMINATED"]
    if not results:
        raise UserError("holdout: no retrained configuration finished; nothing to evaluate")
    ev = ctx.cfg.evaluation
    rules = {"any": ("any", None), "strict": (ev.strict.rule, ev.strict.threshold)}
    study = ctx.cfg.with_cache(ctx.cache_dir())  # the typed config travels to the task as it is
    res = ctx.cfg.resources
    task = ray.remote(num_cpus=res.cpu, num_gpus=res.gpu, resources=res.custom or None,
                      max_retries=max(1, ctx.cfg.failure.max_failures))(holdout_records)
    thresholds = calibrated_thresholds(ctx) if ev.threshold == "calibrated" else {}
    pending = {}
    for r in results:
        label = trial_label(r.spec)
        out_dir = ctx.dir.holdout_dir / trial_folder(r.spec)
        pending[label] = task.remote(r.checkpoint_path, study, str(out_dir), rules=rules,
                                     calibrated=thresholds.get(label))
    log(f"holdout: whole-volume inference of {len(pending)} configuration(s) on the hold-out cases")
    paths = {}
    for label, ref in pending.items():
        paths[label] = ray.get(ref)
        log(f"holdout: records of {label} ready")
    summary = summarize_holdout(ctx, results, paths)
    write_text_atomic(ctx.dir.summary_file, json.dumps(summary, indent=2, default=json_default))
    run_ids = _holdout_runs(ctx, summary)
    _log_holdout_metrics(ctx, summary, run_ids)
    _log_models(ctx, results, summary, run_ids)
    tracking.finish_stage_runs(ctx.state, "holdout", {r.trial_id: "TERMINATED" for r in results})
    ctx.state.mark_done("holdout", configurations=len(results))


def calibrated_thresholds(ctx: StudyContext) -> dict[str, float]:
    """Trial label -> the threshold its sweep twin (same configuration and seed, trained on train only) chose
    on the validation split (``val_threshold``); the retrained model is judged on the hold-out with it."""
    from study.tuner import outcomes

    out = {}
    for r in outcomes(ctx.dir.ray_dir, SWEEP):
        t = r.measured("val_threshold")
        if r.status == "TERMINATED" and t is not None:
            out[trial_label(r.spec)] = t
    return out


def summarize_holdout(ctx: StudyContext, results, paths: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Every number of the report, computed from the saved records (cheap; no inference here)."""
    from study.report import strict_rule_name
    from study.verdict import build_verdict
    from trainables.data import Cache
    from trainables.metrics import load_records, size_groups, summarize
    from trainables.metrics.io import read_records

    ev = ctx.cfg.evaluation
    configs: dict[str, Any] = {}
    records_any: dict[str, Any] = {}
    for r in sorted(results, key=lambda r: (TrialSpec.from_dict(r.spec).label.rsplit("/", 1)[0], r.spec["seed"])):
        spec = TrialSpec.from_dict(r.spec)
        label = spec.label
        rec_any = load_records(paths[label]["any"])
        rec_strict = load_records(paths[label]["strict"])
        records_any[label] = rec_any
        configs[label] = {
            "trial_id": r.trial_id, "loss": spec.loss, "iw": spec.iw, "params": spec.params, "seed": spec.seed,
            "config": spec.config_name,
            "luna16": summarize(rec_any, protocol="luna16", n_boot=ev.n_boot, seed=ev.seed),
            "paper2020": summarize(rec_any, protocol="paper2020"),
            "strict": summarize(rec_strict, protocol="luna16", n_boot=0, seed=ev.seed),
            "records": paths[label],
        }
        if "any_calibrated" in paths[label]:
            cal_any, cal_meta = read_records(paths[label]["any_calibrated"])
            cal_strict = load_records(paths[label]["strict_calibrated"])
            configs[label]["calibrated"] = {
                "threshold": cal_meta.get("threshold"),
                "luna16": summarize(cal_any, protocol="luna16", n_boot=ev.n_boot, seed=ev.seed),
                "strict": summarize(cal_strict, protocol="luna16", n_boot=0, seed=ev.seed)}
    # size groups: the same cut-offs for every configuration (the study's cut-off, or the 1/3 and 2/3
    # quantiles of the hold-out lesion diameters: ties can make the groups unequal)
    any_set = next(iter(records_any.values()))
    diam = np.array([rec["diameter"] for cr in any_set.values() for rec in cr.records if rec["is_tum"]])
    if ev.size_cutoff_mm is not None:
        cutoffs = [float(ev.size_cutoff_mm)]
    elif len(diam) >= 3:  # quantiles, rounded to 0.1 mm for readable group names
        cutoffs = sorted({round(float(q), 1) for q in np.quantile(diam, [1 / 3, 2 / 3])})
    else:
        cutoffs = []
    for label, rs in records_any.items():
        configs[label]["size_groups"] = (
            size_groups(rs, cutoffs_mm=cutoffs, protocol="luna16", n_boot=0) if cutoffs else {}
        )
    # the verdict: iw vs plain of each loss, seeds then cases resampled (study.verdict)
    group_names = list(configs[next(iter(configs))]["size_groups"])
    verdict = build_verdict(configs, iw_pairs(configs), cutoffs_mm=cutoffs, group_names=group_names,
                            strict_name=strict_rule_name((ev.strict.rule, ev.strict.threshold)),
                            n_boot=ev.n_boot, seed=ev.seed)
    baseline = None
    if ev.baseline is not None:  # every configuration vs the baseline, the same bootstrap as the verdict
        baseline = build_verdict(configs, baseline_pairs(configs, ev.baseline), cutoffs_mm=cutoffs,
                                 group_names=group_names, n_boot=ev.n_boot, seed=ev.seed, kind="baseline",
                                 strict_name=strict_rule_name((ev.strict.rule, ev.strict.threshold)))
        baseline["baseline"] = ev.baseline
    cache = Cache(ctx.cache_dir())
    diameters, splits = {}, {}
    for split_name in ("train", "val", "holdout"):
        vals = []
        ids = cache.case_ids(list(getattr(ctx.cfg.data, split_name)))
        for cid in ids:
            vals.extend(cache.meta(cid).get("diameters_mm", []))
        diameters[split_name] = vals
        splits[split_name] = {"cases": len(ids), "lesions": len(vals)}
    from trainables.environment import describe

    cut_rule = ("the study's cut-off (evaluation.size_cutoff_mm)" if ev.size_cutoff_mm is not None
                else "the 1/3 and 2/3 quantiles of the hold-out lesion diameters" if cutoffs else None)
    return {"study": ctx.dir.name, "size_cutoffs_mm": cutoffs, "size_cut_rule": cut_rule, "splits": splits,
            "search": search_summary(ctx),
            "configs": configs, "verdict": verdict,
            "baseline_comparison": baseline,
            "diameters_mm": diameters, "strict_rule": [ev.strict.rule, ev.strict.threshold],
            "environment": describe()}


def search_summary(ctx: StudyContext) -> dict[str, Any]:
    """How the sweep spent its trial-epochs and validated (for the report): scheduler, trials stopped early,
    trial-epochs used of the FIFO total, the epoch each configuration's winner was judged at, the validation
    subset."""
    cfg, sweep = ctx.cfg, ctx.state.data["stages"].get("sweep", {})
    out: dict[str, Any] = {"scheduler": cfg.scheduler.type, "trials": sweep.get("trials"),
                           "trial_epochs": sweep.get("trial_epochs"),
                           "full_trial_epochs": len(cfg.trials) * cfg.training.epochs,
                           "validation_every": cfg.validation.every, "validation_subset": cfg.validation.subset,
                           "validation_seed": cfg.validation.seed}
    if cfg.scheduler.type == "asha":
        sch = cfg.scheduler
        out.update(metric=sch.metric, reduction_factor=sch.reduction_factor, stopped=sweep.get("stopped"),
                   rungs=list(sch.milestones(cfg.training.epochs)))
        if ctx.dir.selection_file.is_file():
            sel = ctx.dir.read_selection()
            out["judged_at_epoch"] = {config_name(w["loss"], w["iw"]): w.get("judged_at_epoch")
                                      for w in sel["winners"]}
    return out


def iw_pairs(configs: dict[str, dict[str, Any]]) -> list[tuple[str, int, str, str]]:
    """``(loss, seed, plain label, iw label)`` for every iw configuration that has a plain partner.

    The partner is the plain configuration of the same loss, parameters and seed; where per-config selection
    picked other parameters for the plain winner (e.g. focal α 0.5 plain, 0.75 with iw), the plain winner of
    the same loss and seed. ``configs``: label -> ``{"loss", "iw", "params", "seed"}``.
    """
    by_key = {(c["loss"], json.dumps(c["params"], sort_keys=True), c["seed"], c["iw"]): label
              for label, c in configs.items()}
    pairs = []
    for (loss, params, seed, iw), label_iw in by_key.items():
        if not iw:
            continue
        plain = by_key.get((loss, params, seed, False))
        if plain is None:
            plain = next((lb for (lo, _p, s, w), lb in by_key.items() if lo == loss and s == seed and not w), None)
        if plain is not None:
            pairs.append((loss, seed, plain, label_iw))
    return pairs


def baseline_pairs(configs: dict[str, dict[str, Any]], baseline: str) -> list[tuple[str, int, str, str]]:
    """``(configuration, seed, baseline label, its label)`` for every configuration other than ``baseline``
    (a configuration name such as ``dice_ce``) retrained with a seed the baseline has too."""
    setting = {label: label.rsplit("/", 1)[0] for label in configs}  # configuration and parameters, no seed
    refs = {setting[lb] for lb, c in configs.items() if config_name(c["loss"], c["iw"]) == baseline}
    if len(refs) != 1:
        log(f"report: baseline {baseline!r} was retrained with {len(refs)} parameter settings "
            f"({', '.join(sorted(refs)) or 'none'}); no comparison with it")
        return []
    (ref_setting,) = refs
    ref = {c["seed"]: lb for lb, c in configs.items() if setting[lb] == ref_setting}
    return [(setting[lb], c["seed"], ref[c["seed"]], lb) for lb, c in sorted(configs.items())
            if setting[lb] != ref_setting and c["seed"] in ref]


def _log_models(ctx: StudyContext, results, summary: dict[str, Any], run_ids: dict[str, str]) -> None:
    """Every retrained winner as an MLflow logged model, linked from its hold-out run (once: a run that has
    its model URI tag is skipped on resume), with what ``study predict --model`` needs as metadata."""
    from trainables.build import build_model, load_state
    from trainables.data import Cache

    mlc = tracking.client(ctx.state.tracking_uri)
    exp_id = ctx.state.mlflow_ids()["experiment_id"]
    preset = Cache(ctx.cache_dir()).preset
    for r in results:
        label = trial_label(r.spec)
        try:
            if r.trial_id not in run_ids:
                continue
            run = mlc.get_run(run_ids[r.trial_id])
            if run.data.tags.get(tracking.MODEL_URI_TAG):
                continue
            earlier = tracking.logged_model_of(mlc, exp_id, run.info.run_id)  # logged, tag not yet set (killed)
            if earlier is not None:
                mlc.set_tag(run.info.run_id, tracking.MODEL_URI_TAG, earlier)
                continue
            model = build_model(ctx.cfg.model)
            model.load_state_dict(load_state(r.checkpoint_path)["model"])
            c = summary["configs"].get(label, {})
            metadata = {"study": ctx.dir.name, "label": label, "preset": preset,
                        "inference": ctx.cfg.inference.model_dump(mode="json"),
                        "threshold": (c.get("calibrated") or {}).get("threshold", 0.5)}
            uri = tracking.log_model(ctx.state.tracking_uri, run.info.run_id, model, name=trial_slug(label),
                                     metadata=metadata, window=ctx.cfg.inference.window)
            log(f"holdout: {label} logged as MLflow model {uri}")
        except Exception as exc:  # noqa: BLE001 - a model not logged must not cost the hold-out results
            log(f"holdout: warning: {label} not logged as an MLflow model ({type(exc).__name__}: {exc}); "
                "`study predict` from the study folder still works")


def _holdout_runs(ctx: StudyContext, summary: dict[str, Any]) -> dict[str, str]:
    """One MLflow run per retrained winner under ``stage:holdout``: its retrain run's params plus the
    evaluation's, its records files and a FROC figure of its own (the metrics and the model follow).
    Returns retrain trial id -> hold-out run id."""
    from trainables.metrics.plots import plot_froc

    ev = ctx.cfg.evaluation
    parent = tracking.stage_parent(ctx.state, "holdout")
    mlc = tracking.client(ctx.state.tracking_uri)
    params = {"stage": "holdout", "splits.holdout": ",".join(ctx.cfg.data.holdout),
              "holdout.cases": str(summary["splits"]["holdout"]["cases"]),
              "holdout.lesions": str(summary["splits"]["holdout"]["lesions"]),
              "evaluation.n_boot": str(ev.n_boot), "evaluation.seed": str(ev.seed),
              "evaluation.threshold": ev.threshold,
              "evaluation.strict": f"{ev.strict.rule} {ev.strict.threshold}"}
    run_ids = {}
    for label, c in summary["configs"].items():
        run_id = run_ids[c["trial_id"]] = tracking.holdout_run(
            ctx.state, trial_id=c["trial_id"], label=label, config=c["config"], parent_run_id=parent, params=params)
        out_dir = ctx.dir.holdout_dir / trial_folder(c)
        froc = plot_froc({label: c["luna16"]}, out_dir / "froc.png", title=f"Hold-out FROC of {label}",
                         hit_rule="any overlap")
        for path in [*c["records"].values(), froc]:
            mlc.log_artifact(run_id, str(path))
    return run_ids


def _log_holdout_metrics(ctx: StudyContext, summary: dict[str, Any], run_ids: dict[str, str]) -> None:
    """Each hold-out run's summary metrics (step 0) and its size groups' names as tags."""
    mlc = tracking.client(ctx.state.tracking_uri)
    for c in summary["configs"].values():
        run_id = run_ids[c["trial_id"]]
        lu, st, pp = c["luna16"], c["strict"], c["paper2020"]
        metrics = {
            "holdout_avg_recall": lu["avg_recall"],
            "holdout_avg_recall_ci_low": lu.get("avg_recall_ci_low"),
            "holdout_avg_recall_ci_high": lu.get("avg_recall_ci_high"),
            "holdout_obj_dice": lu["obj_dice"],
            "holdout_obj_dice_std": lu["obj_dice_std"],
            "holdout_fp_per_image": lu["fp_per_image"],
            "holdout_pred_positive_fraction": lu.get("pred_positive_fraction"),
            "holdout_strict_avg_recall": st["avg_recall"],
            "holdout_paper2020_avg_recall": pp["avg_recall"],
            "holdout_paper2020_obj_dice": pp["obj_dice"],
            "holdout_n_cases": lu["n_images"],
            "holdout_n_lesions": lu["n_lesions"],
            **{f"holdout_recall_at_{float(r):g}_fp": v for r, v in (lu.get("recall_at") or {}).items()},
        }
        groups = c.get("size_groups") or {}
        for name, (group, g) in zip(size_group_names(len(groups)), groups.items()):
            metrics[f"holdout_avg_recall_{name}"] = g["avg_recall"]
            metrics[f"holdout_obj_dice_{name}"] = g["obj_dice"]
            mlc.set_tag(run_id, f"size_group_{name}", group)
        tracking.log_metrics(mlc, run_id, metrics, step=0)


def size_group_names(n: int) -> list[str]:
    """Metric-name suffixes of the size groups, smallest first."""
    return {2: ["small", "large"], 3: ["small", "medium", "large"]}.get(n, [f"size{i + 1}" for i in range(n)])


# ---------------------------------------------------------------------------------------------- report


def stage_report(ctx: StudyContext) -> None:
    from study.report import strict_rule_name, write_report
    from study.tuner import outcomes
    from study.verdict import sentence

    summary_file = ctx.dir.summary_file
    summary = ctx.dir.read_summary()
    strict = strict_rule_name(summary.get("strict_rule") or ("iou", 0.3))
    entries = (summary.get("verdict") or {}).get("entries") or []
    if any(e.get("sentence") != sentence(e, strict) for e in entries):  # written by an older version
        for e in entries:
            e["sentence"] = sentence(e, strict)
        write_text_atomic(summary_file, json.dumps(summary, indent=2, default=json_default))
    curves = {trial_label(r.spec): r.history for r in outcomes(ctx.dir.ray_dir, SWEEP) if r.history}
    files = write_report(summary, ctx.dir.report_dir, study_name=ctx.dir.name, cfg=ctx.cfg, curves=curves)
    mlc = tracking.client(ctx.state.tracking_uri)
    root = ctx.state.mlflow_ids()["study_run_id"]
    for f in files:
        mlc.log_artifact(root, str(f), artifact_path="report")
    tracking.log_verdict(ctx.state, summary)
    mlc.set_terminated(root, "FINISHED")
    ctx.state.mark_done("report", files=[str(f) for f in files])
    print("\n" + holdout_table(summary), flush=True)


def holdout_table(summary: dict[str, Any]) -> str:
    """The hold-out results in a few columns, for the console at the end of a study."""
    rows = [("configuration", "avg recall [95% CI]", "objDice", "FP/img", "strict recall")]
    for label, c in summary["configs"].items():
        lu = c["luna16"]
        ci = (f" [{lu['avg_recall_ci_low']:.3f}, {lu['avg_recall_ci_high']:.3f}]"
              if lu.get("avg_recall_ci_low") is not None else "")
        rows.append((label, f"{fmt(lu['avg_recall'])}{ci}", fmt(lu["obj_dice"]), fmt(lu["fp_per_image"], 2),
                     fmt(c["strict"]["avg_recall"])))
    rule = " ".join(map(str, summary["strict_rule"]))
    return f"Hold-out (luna16 protocol, 'any' hit rule; strict = {rule}):\n" + text_table(rows)


STAGE_FUNCS: dict[str, Callable[[StudyContext], None]] = {
    "data": stage_data,
    "sweep": stage_sweep,
    "select": stage_select,
    "retrain": stage_retrain,
    "holdout": stage_holdout,
    "report": stage_report,
}


def choose_step_setup(ctx: StudyContext) -> None:
    """``model.channels_last`` / ``model.compile`` null: how this study's trials run their step, chosen once from
    a measurement of the study's own step and kept in ``state.json`` (``layout``, ``compile``), so a resumed
    study, its retrain and its hold-out use the same numerics.

    CPU trials: both layouts timed side by side on the driver (:func:`trainables.timing.step_choices`);
    channels-last only when it is at least 5 % faster (within noise of each other on this project's 2-core
    machines at the CPU preset, so the plain layout stays); ``torch.compile`` off. GPU trials: the same
    measurement, and eager vs compiled, in a Ray task with one trial's resources, i.e. on a GPU node the first
    time a GPU study runs (a node whose torch cannot use its GPU fails here, before any trial: exit 2).
    """
    from trainables.timing import step_choices

    m, gpu = ctx.cfg.model, ctx.cfg.resources.gpu > 0
    need = {"layout": m.channels_last is None and "layout" not in ctx.state.data,
            "compile": m.compile is None and gpu and "compile" not in ctx.state.data}
    if any(need.values()):
        if gpu:
            measured = _measure_on_a_trial_node(ctx, need)
        else:
            measured = step_choices(ctx.cfg, ctx.cfg.trials[0], layout=True, compile=False, device="cpu")
        for key, wanted in need.items():
            if wanted:
                ctx.state.data[key] = measured[key]
        if gpu and measured.get("step_seconds"):
            ctx.state.data.setdefault("gpu_step_seconds", []).append(round(measured["step_seconds"], 4))
        ctx.state.save()
    update = {}
    if m.channels_last is None:
        choice = ctx.state.data["layout"]
        update["channels_last"] = bool(choice["channels_last"])
        log(f"memory layout: {'channels-last' if choice['channels_last'] else 'NCDHW'} ({choice['reason']}; "
            "set model.channels_last to fix it)")
    if m.compile is None:
        choice = ctx.state.data.get("compile") if gpu else None
        update["compile"] = bool(choice and choice["compile"])
        if choice:
            log(f"torch.compile: {'on' if choice['compile'] else 'off'} ({choice['reason']}; set model.compile to "
                "fix it)")
    ctx.cfg = ctx.cfg.model_copy(update={"model": ctx.cfg.model.model_copy(update=update)})


def _measure_on_a_trial_node(ctx: StudyContext, need: dict[str, bool]) -> dict:
    """:func:`trainables.timing.step_choices` in a Ray task with one trial's resources (a GPU node)."""
    import ray

    from trainables.device import gpu_error_line, is_gpu_error
    from trainables.timing import step_choices

    ctx.ensure_ray()
    res = ctx.cfg.resources
    what = " and ".join(k for k, v in (("memory layout", need["layout"]), ("torch.compile", need["compile"])) if v)
    log(f"{what}: timing the study's step on a node with the trials' resources {res.as_ray()} (once per study"
        f"{'; waiting for a GPU node' if ctx.wait_for_resources else ''})")
    task = ray.remote(num_cpus=res.cpu, num_gpus=res.gpu, resources=res.custom or None, max_retries=0)(step_choices)
    try:
        return ray.get(task.remote(ctx.cfg, ctx.cfg.trials[0], layout=need["layout"], compile=need["compile"]))
    except ray.exceptions.RayTaskError as exc:
        if is_gpu_error(exc):
            raise UserError(gpu_error_line(exc)) from None
        raise


def redo_missing_outputs(ctx: StudyContext) -> None:
    """A finished stage whose output file was removed (the remedy for a damaged one) runs again, with the stages
    that read it: ``selection.json`` (select), ``holdout/summary.json`` (hold-out, report), ``report.md``."""
    outputs = {"select": (ctx.dir.selection_file, ()), "holdout": (ctx.dir.summary_file, ("report",)),
               "report": (ctx.dir.report_dir / "report.md", ())}
    for stage, (path, after) in outputs.items():
        if ctx.state.done(stage) and not path.is_file():
            log(f"{stage}: {path} is missing: the {stage} stage runs again"
                + (f" (and {', '.join(after)})" if after else ""))
            for s in (stage, *after):
                ctx.state.data["stages"].pop(s, None)
            ctx.state.save()


def run_stages(ctx: StudyContext) -> None:
    """Run every stage not yet finished, in order; print where the report is at the end."""
    from study.plan import measured_step, step_line
    from trainables.environment import describe

    tracking.setup(ctx.state, ctx.dir, experiment_name=ctx.dir.name, cfg=ctx.cfg)
    ctx.state.record_environment(describe())
    choose_step_setup(ctx)
    step = measured_step(ctx.cfg)
    if step is not None:
        ctx.state.data.setdefault("step_seconds", []).append(round(step, 4))
    gpu_steps = ctx.state.data.get("gpu_step_seconds")
    log(step_line(ctx.cfg, step, gpu_step=gpu_steps[-1] if gpu_steps else None))
    redo_missing_outputs(ctx)
    t0 = time.perf_counter()
    try:
        for i, stage in enumerate(STAGES, 1):
            if ctx.state.done(stage):
                log(f"[{i}/{len(STAGES)}] {stage}: already done, skipped")
                continue
            log(f"[{i}/{len(STAGES)}] {stage}")
            ts = time.perf_counter()
            STAGE_FUNCS[stage](ctx)
            ctx.state.record_stage_seconds(stage, time.perf_counter() - ts)
            log(f"[{i}/{len(STAGES)}] {stage}: done in {time.perf_counter() - ts:.0f} s")
    finally:
        ctx.close()
    report = ctx.dir.report_dir / "report.md"
    log(f"study {ctx.dir.name} finished in {time.perf_counter() - t0:.0f} s")
    print(f"\nReport: {report}\nMLflow: study ui {ctx.dir.name} --storage {ctx.dir.root.parent}", flush=True)
    sys.stdout.flush()

"""The hold-out stage: the retrained winners' records on the hold-out cases (a Ray task each, on the trials'
resources), every summary number of the report computed from them (``holdout/summary.json``: FROC, strict rule,
size groups, calibrated thresholds, the verdict), one MLflow run per winner with its metrics, records, FROC and
logged model."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from study import tracking
from study.layout import RETRAIN, SWEEP
from study.stages.context import StudyContext, log
from trainables.config import TrialSpec
from trainables.errors import UserError
from trainables.io_utils import json_default, write_text_atomic
from trainables.naming import config_name, trial_folder, trial_label, trial_slug


def stage_holdout(ctx: StudyContext) -> None:
    import ray

    from study.tune.tuner import outcomes
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
    from study.tune.tuner import outcomes

    out = {}
    for r in outcomes(ctx.dir.ray_dir, SWEEP):
        t = r.measured("val_threshold")
        if r.status == "TERMINATED" and t is not None:
            out[trial_label(r.spec)] = t
    return out


def summarize_holdout(ctx: StudyContext, results, paths: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Every number of the report, computed from the saved records (cheap; no inference here)."""
    from study.report.tables import strict_rule_name
    from study.report.verdict import build_verdict
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
    # the verdict: iw vs plain of each loss, seeds then cases resampled (study.report.verdict)
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

"""The hold-out stage: the retrained winners' records on the hold-out cases (a Ray task each, on the trials'
resources), every summary number of the report computed from them (``holdout/summary.json``: FROC, strict rule,
size groups, calibrated thresholds, the verdict), one MLflow run per winner with its metrics, records, FROC and
logged model."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from study import tracking
from study.layout import RETRAIN, SWEEP
from study.stages.context import StudyContext, log
from trainables.config import TRAINING_HYPERPARAMETERS, TrialSpec
from trainables.errors import UserError
from trainables.io_utils import json_default, write_text_atomic
from trainables.naming import NETWORK_PARAM, config_group, config_label, config_name, trial_folder, trial_slug


@dataclass(frozen=True)
class Judged:
    """One model, or ensemble of fold models, judged on the hold-out: ``spec`` its configuration and seed,
    ``key`` its MLflow run's trial id (the retrain trial's, or ``folds:<label>``), ``checkpoints`` one retrained
    model's or the K fold models' (the sweep trials of that configuration and seed), ``folder`` its records."""

    kind: str  # "retrain" or "folds"
    spec: TrialSpec
    key: str
    checkpoints: tuple[str, ...]
    folder: str
    members: tuple[str, ...] = ()  # a fold ensemble's sweep trial ids, one per fold model

    @property
    def label(self) -> str:
        return self.spec.label


#: the summary key of each kind's results when both are judged (the first kind of a study is ``configs``)
GROUP_KEYS = {"retrain": "configs", "folds": "fold_ensembles"}


def judged_models(ctx: StudyContext) -> dict[str, list[Judged]]:
    """What the hold-out judges, by kind (``evaluation.holdout_models``): the retrained winners, and under
    ``data.folds`` each winner's fold models per seed (the sweep trials of every fold that completed)."""
    from study.tune.tuner import outcomes

    kinds = {"retrain": ("retrain",), "folds": ("folds",), "both": ("retrain", "folds")}[ctx.cfg.holdout_models]
    out: dict[str, list[Judged]] = {}
    if "retrain" in kinds:
        out["retrain"] = [Judged("retrain", TrialSpec.from_dict(r.spec), r.trial_id, (r.checkpoint_path,),
                                 trial_folder(r.spec))
                          for r in outcomes(ctx.dir.ray_dir, RETRAIN) if r.status == "TERMINATED"]
        if not out["retrain"]:
            raise UserError("holdout: no retrained configuration finished; nothing to evaluate")
    if "folds" in kinds:
        winners = {json.dumps([w["loss"], w["iw"], w["params"]], sort_keys=True)
                   for w in ctx.dir.read_selection()["winners"]}
        by_seed: dict[str, list] = {}
        for r in outcomes(ctx.dir.ray_dir, SWEEP):
            spec = TrialSpec.from_dict(r.spec)
            if r.status == "TERMINATED" and json.dumps([spec.loss, spec.iw, spec.params], sort_keys=True) in winners:
                by_seed.setdefault(spec.model_copy(update={"fold": None}).label, []).append((spec, r))
        out["folds"] = []
        for label, members in sorted(by_seed.items()):
            members.sort(key=lambda m: m[0].fold)
            spec = members[0][0].model_copy(update={"fold": None})
            if len(members) < ctx.cfg.data.folds:
                log(f"holdout: {label}: {len(members)} of {ctx.cfg.data.folds} fold models completed (the others "
                    "errored or were stopped); its ensemble averages those")
            out["folds"].append(Judged("folds", spec, f"folds:{label}", tuple(r.checkpoint_path for _, r in members),
                                       f"folds/{trial_folder(spec.as_dict())}", tuple(r.trial_id for _, r in members)))
        if not out["folds"]:
            raise UserError("holdout: no winner has a completed fold model; nothing to evaluate")
    return out


def stage_holdout(ctx: StudyContext) -> None:
    import ray

    from trainables.evaluate import holdout_records

    ctx.ensure_ray()
    groups = judged_models(ctx)
    ev = ctx.cfg.evaluation
    rules = {"any": ("any", None), "strict": (ev.strict.rule, ev.strict.threshold)}
    study = ctx.cfg.with_cache(ctx.cache_dir())  # the typed config travels to the task as it is
    res = ctx.cfg.resources
    task = ray.remote(num_cpus=res.cpu, num_gpus=res.gpu, resources=res.custom or None,
                      max_retries=max(1, ctx.cfg.failure.max_failures))(holdout_records)
    thresholds = calibrated_thresholds(ctx) if ev.threshold == "calibrated" else {}
    pending = {}
    for kind, judged in groups.items():
        for j in judged:
            ckpt = j.checkpoints[0] if kind == "retrain" else list(j.checkpoints)
            pending[(kind, j.label)] = task.remote(ckpt, study.for_trial(j.spec), str(ctx.dir.holdout_dir / j.folder),
                                                   rules=rules, calibrated=thresholds.get(j.label))
    what = " and ".join({"retrain": "retrained winner(s)", "folds": "fold ensemble(s)"}[k] + f" ({len(v)})"
                        for k, v in groups.items())
    log(f"holdout: whole-volume inference of the {what} on the hold-out cases")
    paths: dict[str, dict[str, dict[str, str]]] = {kind: {} for kind in groups}
    for (kind, label), ref in pending.items():
        paths[kind][label] = ray.get(ref)
        log(f"holdout: records of {label}{' (fold ensemble)' if kind == 'folds' else ''} ready")
    summary = summarize_holdout(ctx, groups, paths)
    write_text_atomic(ctx.dir.summary_file, json.dumps(summary, indent=2, default=json_default))
    for kind, judged in groups.items():
        configs = summary[_group_key(summary, kind)]
        run_ids = _holdout_runs(ctx, summary, configs, kind, {j.key: j.members for j in judged})
        _log_holdout_metrics(ctx, configs, run_ids)
        _log_models(ctx, judged, configs, run_ids)
    tracking.finish_stage_runs(ctx.state, "holdout", {j.key: "TERMINATED" for js in groups.values() for j in js})
    ctx.state.mark_done("holdout", configurations=sum(len(js) for js in groups.values()))


def _group_key(summary: dict[str, Any], kind: str) -> str:
    """Where a kind's results are in the summary: the study's main kind under ``configs``."""
    return "configs" if summary.get("holdout_models", "retrain") in ("retrain", kind) else GROUP_KEYS[kind]


def calibrated_thresholds(ctx: StudyContext) -> dict[str, float]:
    """Configuration-and-seed label -> the threshold chosen on validation (``val_threshold``) by its sweep twin
    (same configuration and seed, trained without the validation cases); under ``data.folds`` the median over
    its fold trials. The retrained model or fold ensemble is judged on the hold-out with it."""
    from study.tune.tuner import outcomes

    chosen: dict[str, list[float]] = {}
    for r in outcomes(ctx.dir.ray_dir, SWEEP):
        t = r.measured("val_threshold")
        if r.status == "TERMINATED" and t is not None:
            spec = TrialSpec.from_dict(r.spec).model_copy(update={"fold": None})
            chosen.setdefault(spec.label, []).append(t)
    return {label: float(np.median(ts)) for label, ts in chosen.items()}


def _summarize_group(ctx: StudyContext, judged: list[Judged], paths: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Each judged model's summaries from its saved records (luna16 with its bootstrap, paper2020, the strict
    rule, the calibrated threshold's)."""
    from trainables.metrics import load_records, summarize
    from trainables.metrics.io import read_records

    ev = ctx.cfg.evaluation
    configs: dict[str, Any] = {}
    for j in sorted(judged, key=lambda j: (j.label.rsplit("/", 1)[0], j.spec.seed)):
        spec, label = j.spec, j.label
        rec_any = load_records(paths[label]["any"])
        rec_strict = load_records(paths[label]["strict"])
        configs[label] = {
            "trial_id": j.key, "loss": spec.loss, "iw": spec.iw, "params": spec.params, "seed": spec.seed,
            "config": spec.config_name,
            "luna16": summarize(rec_any, protocol="luna16", n_boot=ev.n_boot, seed=ev.seed),
            "paper2020": summarize(rec_any, protocol="paper2020"),
            "strict": summarize(rec_strict, protocol="luna16", n_boot=0, seed=ev.seed),
            "records": paths[label],
        }
        if j.kind == "folds":
            configs[label]["fold_models"] = len(j.checkpoints)
        if "any_calibrated" in paths[label]:
            cal_any, cal_meta = read_records(paths[label]["any_calibrated"])
            cal_strict = load_records(paths[label]["strict_calibrated"])
            configs[label]["calibrated"] = {
                "threshold": cal_meta.get("threshold"),
                "luna16": summarize(cal_any, protocol="luna16", n_boot=ev.n_boot, seed=ev.seed),
                "strict": summarize(cal_strict, protocol="luna16", n_boot=0, seed=ev.seed)}
        if "any_notta" in paths[label]:  # inference.tta on: the same model without it
            configs[label]["without_tta"] = {
                "luna16": summarize(load_records(paths[label]["any_notta"]), protocol="luna16", n_boot=ev.n_boot,
                                    seed=ev.seed),
                "strict": summarize(load_records(paths[label]["strict_notta"]), protocol="luna16", n_boot=0,
                                    seed=ev.seed)}
    return configs


def summarize_holdout(ctx: StudyContext, groups: dict[str, list[Judged]],
                      paths: dict[str, dict[str, dict[str, str]]]) -> dict[str, Any]:
    """Every number of the report, computed from the saved records (cheap; no inference here). The study's
    main kind (the retrained winners, or the fold ensembles when only they are judged) is under ``configs`` with
    ``verdict``; with both, the fold ensembles are under ``fold_ensembles`` with their own ``verdict_folds``."""
    from study.report.tables import strict_rule_name
    from study.report.verdict import build_verdict
    from trainables.data import Cache
    from trainables.metrics import load_records, size_groups

    ev = ctx.cfg.evaluation
    kinds = list(groups)
    summaries = {kind: _summarize_group(ctx, groups[kind], paths[kind]) for kind in kinds}
    # size groups: the same cut-offs for every configuration (the study's cut-off, or the 1/3 and 2/3
    # quantiles of the hold-out lesion diameters: ties can make the groups unequal)
    first = summaries[kinds[0]]
    any_set = load_records(next(iter(first.values()))["records"]["any"])
    diam = np.array([rec["diameter"] for cr in any_set.values() for rec in cr.records if rec["is_tum"]])
    if ev.size_cutoff_mm is not None:
        cutoffs = [float(ev.size_cutoff_mm)]
    elif len(diam) >= 3:  # quantiles, rounded to 0.1 mm for readable group names
        cutoffs = sorted({round(float(q), 1) for q in np.quantile(diam, [1 / 3, 2 / 3])})
    else:
        cutoffs = []
    strict_name = strict_rule_name((ev.strict.rule, ev.strict.threshold))
    verdicts, baselines = {}, {}
    for kind, configs in summaries.items():
        for c in configs.values():
            rs = load_records(c["records"]["any"])
            c["size_groups"] = size_groups(rs, cutoffs_mm=cutoffs, protocol="luna16", n_boot=0) if cutoffs else {}
        # the verdict: iw vs plain of each loss, seeds then cases resampled (study.report.verdict)
        group_names = list(configs[next(iter(configs))]["size_groups"])
        verdicts[kind] = build_verdict(configs, iw_pairs(configs), cutoffs_mm=cutoffs, group_names=group_names,
                                       strict_name=strict_name, n_boot=ev.n_boot, seed=ev.seed)
        if ev.baseline is not None:  # every configuration vs the baseline, the same bootstrap as the verdict
            baselines[kind] = build_verdict(configs, baseline_pairs(configs, ev.baseline), cutoffs_mm=cutoffs,
                                            group_names=group_names, n_boot=ev.n_boot, seed=ev.seed,
                                            kind="baseline", strict_name=strict_name)
            baselines[kind]["baseline"] = ev.baseline
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
    out = {"study": ctx.dir.name, "size_cutoffs_mm": cutoffs, "size_cut_rule": cut_rule, "splits": splits,
           "search": search_summary(ctx),
           "configs": summaries[kinds[0]], "verdict": verdicts[kinds[0]],
           "baseline_comparison": baselines.get(kinds[0]),
           "diameters_mm": diameters, "strict_rule": [ev.strict.rule, ev.strict.threshold],
           "environment": describe()}
    if ctx.cfg.data.folds:
        out["holdout_models"] = ctx.cfg.holdout_models
        out["folds"] = ctx.cfg.data.folds
    if len(kinds) == 2:
        out["fold_ensembles"] = summaries["folds"]
        out["verdict_folds"] = verdicts["folds"]
        if "folds" in baselines:
            out["baseline_comparison_folds"] = baselines["folds"]
    return out


def search_summary(ctx: StudyContext) -> dict[str, Any]:
    """How the sweep spent its trial-epochs and validated (for the report): scheduler, trials stopped early,
    trial-epochs used of the FIFO total, the epoch each configuration's winner was judged at, the validation
    subset."""
    cfg, sweep = ctx.cfg, ctx.state.data["stages"].get("sweep", {})
    out: dict[str, Any] = {"scheduler": cfg.scheduler.type, "trials": sweep.get("trials"),
                           "trial_epochs": sweep.get("trial_epochs"),
                           "full_trial_epochs": cfg.sweep_size * cfg.training.epochs,
                           "validation_every": cfg.validation.every, "validation_subset": cfg.validation.subset,
                           "validation_seed": cfg.validation.seed}
    if cfg.data.folds and ctx.dir.selection_file.is_file():
        out["folds"] = {config_label(w): {
            k: w.get(k) for k in ("score", "fold_scores", "fold_spread", "lead", "lead_within_fold_spread")}
            for w in ctx.dir.read_selection()["winners"]}
    if ctx.dir.selection_file.is_file() and ctx.dir.read_selection().get("hyperparameters"):
        out["hyperparameters"] = ctx.dir.read_selection()["hyperparameters"]
    if cfg.scheduler.type == "asha":
        sch = cfg.scheduler
        out.update(metric=sch.metric, reduction_factor=sch.reduction_factor, stopped=sweep.get("stopped"),
                   rungs=list(sch.milestones(cfg.training.epochs)))
        if ctx.dir.selection_file.is_file():
            sel = ctx.dir.read_selection()
            out["judged_at_epoch"] = {config_group(w): w.get("judged_at_epoch")
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
    # one verdict per iw setting: the loss's name when it has one (per-config selection), else the setting's
    # label (top-k winners or an iw.power axis: iw-bce[iw.power=0.5] and iw-bce[iw.power=1] are two questions)
    settings: dict[str, set[str]] = defaultdict(set)
    for (loss, _params, _seed, iw), label in by_key.items():
        if iw:
            settings[loss].add(label.rsplit("/", 1)[0])
    pairs = []
    for (loss, params, seed, iw), label_iw in by_key.items():
        if not iw:
            continue
        plain = by_key.get((loss, params, seed, False))
        if plain is None:  # the plain winner of the loss and seed (on the same network)
            net = json.loads(params).get(NETWORK_PARAM)
            plain = next((lb for (lo, p, s, w), lb in by_key.items()
                          if lo == loss and s == seed and not w and json.loads(p).get(NETWORK_PARAM) == net), None)
        if plain is not None:
            group = loss if len(settings[loss]) == 1 else label_iw.rsplit("/", 1)[0]
            pairs.append((group, seed, plain, label_iw))
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


def _log_models(ctx: StudyContext, judged: list[Judged], configs: dict[str, Any], run_ids: dict[str, str]) -> None:
    """Every judged model as an MLflow logged model, linked from its hold-out run (once: a run that has its model
    URI tag is skipped on resume), with what ``study predict --model`` needs as metadata; a fold ensemble's run
    holds one logged model per fold."""
    from trainables.build import build_model, load_state
    from trainables.data import Cache

    mlc = tracking.client(ctx.state.tracking_uri)
    exp_id = ctx.state.mlflow_ids()["experiment_id"]
    preset = Cache(ctx.cache_dir()).preset
    for j in judged:
        label = j.label
        try:
            if j.key not in run_ids:
                continue
            run = mlc.get_run(run_ids[j.key])
            if run.data.tags.get(tracking.MODEL_URI_TAG):
                continue
            earlier = tracking.logged_model_of(mlc, exp_id, run.info.run_id)  # logged, tag not yet set (killed)
            if earlier is not None and len(j.checkpoints) == 1:
                mlc.set_tag(run.info.run_id, tracking.MODEL_URI_TAG, earlier)
                continue
            c = configs.get(label, {})
            uris = []
            for k, ckpt in enumerate(j.checkpoints):
                model = build_model(ctx.cfg.for_trial(j.spec).model, ctx.cfg.training.patch_size)
                model.load_state_dict(load_state(ckpt)["model"])
                metadata = {"study": ctx.dir.name, "label": label, "preset": preset,
                            "inference": ctx.cfg.inference.model_dump(mode="json"),
                            "threshold": (c.get("calibrated") or {}).get("threshold", 0.5),
                            **({"fold": k, "folds": len(j.checkpoints)} if j.kind == "folds" else {})}
                name = trial_slug(label) + (f"_f{k}" if j.kind == "folds" else "")
                uris.append(tracking.log_model(ctx.state.tracking_uri, run.info.run_id, model, name=name,
                                               metadata=metadata, window=ctx.cfg.inference.window))
            if len(uris) > 1:  # the tag names every fold's model; a resumed run with it set is skipped
                mlc.set_tag(run.info.run_id, tracking.MODEL_URI_TAG, ",".join(uris))
            log(f"holdout: {label} logged as MLflow model{'s' if len(uris) > 1 else ''} {', '.join(uris)}")
        except Exception as exc:  # noqa: BLE001 - a model not logged must not cost the hold-out results
            log(f"holdout: warning: {label} not logged as an MLflow model ({type(exc).__name__}: {exc}); "
                "`study predict` from the study folder still works")


def _holdout_runs(ctx: StudyContext, summary: dict[str, Any], configs: dict[str, Any], kind: str,
                  members: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """One MLflow run per judged model under ``stage:holdout``: a retrained winner's run takes its retrain run's
    params (and links it: ``retrain_run_id``), a fold ensemble's its configuration's and the number of folds (and
    links its fold models' sweep runs: ``fold_run_ids``); both the evaluation's, their records files and a FROC
    figure of their own (the metrics and the model follow). Returns its key -> run id."""
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
    for label, c in configs.items():
        extra = {}
        if kind == "folds":
            extra = {"holdout.models": "fold ensemble", "folds": str(c.get("fold_models")), "loss": c["loss"],
                     "iw": tracking.param_value(c["iw"]), "config": label.rsplit("/", 1)[0], "seed": str(c["seed"]),
                     **{(k if k in TRAINING_HYPERPARAMETERS or k == NETWORK_PARAM else f"{c['loss']}.{k}"):
                        tracking.param_value(v)
                        for k, v in sorted(c["params"].items())}}
        run_id = run_ids[c["trial_id"]] = tracking.holdout_run(
            ctx.state, trial_id=c["trial_id"], label=label + (" (folds)" if kind == "folds" else ""),
            config=c["config"], parent_run_id=parent, params={**params, **extra})
        if kind == "folds":
            exp = ctx.state.mlflow_ids()["experiment_id"]
            found = [tracking.find_run(mlc, exp, {tracking.TRIAL_ID_TAG: t, tracking.STAGE_TAG: "sweep"})
                     for t in members.get(c["trial_id"], ())]
            mlc.set_tag(run_id, "fold_run_ids", ",".join(r.info.run_id for r in found if r is not None))
        out_dir = Path(c["records"]["any"]).parent
        froc = plot_froc({label: c["luna16"]}, out_dir / "froc.png",
                         title=f"Hold-out FROC of {label}" + (" (fold ensemble)" if kind == "folds" else ""),
                         hit_rule="any overlap")
        for path in [*c["records"].values(), froc]:
            mlc.log_artifact(run_id, str(path))
    return run_ids


def _log_holdout_metrics(ctx: StudyContext, configs: dict[str, Any], run_ids: dict[str, str]) -> None:
    """Each hold-out run's summary metrics (step 0) and its size groups' names as tags."""
    mlc = tracking.client(ctx.state.tracking_uri)
    for c in configs.values():
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

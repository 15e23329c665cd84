"""The select stage: the winners of the sweep, per (loss, iw) configuration (mean over seeds) or the top k,
written to ``selection.json`` and tagged in MLflow."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np

from study import tracking
from study.layout import SWEEP
from study.stages.context import StudyContext, log
from trainables.config import StudyConfig, TrialSpec
from trainables.errors import UserError
from trainables.io_utils import write_text_atomic
from trainables.naming import config_group


def _score(outcome, metric: str, scope: str) -> float | None:
    from study.tune.tuner import trial_score

    if scope == "best" or outcome.history:
        return trial_score(outcome.history, metric, scope)
    return outcome.measured(metric)


def _reached(r, epochs: int) -> int:
    """The epochs a finished trial was judged at: all of them, or the rung where ASHA stopped it."""
    return epochs if r.status == "TERMINATED" else int(r.stopped_at_epoch)


def select_winners(results, cfg: StudyConfig) -> dict[str, Any]:
    """Best hyperparameters per (loss, iw) configuration (mean over seeds, and folds), or the top-k overall.

    Under ASHA the candidates of a configuration (of the study, for top-k) are its trials that reached the
    highest epoch any of them reached (the last epoch, unless every one was stopped or errored), scored there;
    the trials ASHA stopped below it are listed under ``stopped``.

    Under ``data.folds`` every candidate also carries its score per fold (mean over seeds), ``fold_spread`` (the
    standard deviation of those), and a winner its ``lead`` over the next candidate it was chosen against, with
    ``lead_within_fold_spread`` when the lead is smaller than its fold spread (the choice is then a coin toss
    between them as far as the folds can tell)."""
    sel = cfg.selection
    epochs = cfg.training.epochs
    done = [r for r in results if r.status in ("TERMINATED", "STOPPED")]
    excluded = [{"trial": r.spec, "status": r.status, "reason": r.error} for r in results
                if r.status not in ("TERMINATED", "STOPPED")]
    group = (lambda r: config_group(r.spec)) if sel.mode == "per-config" else (lambda r: "all")
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
        if spec.fold is not None:
            p.setdefault("by_fold", defaultdict(list))[spec.fold].append(p["scores"][-1])
    ranked = []
    for order, p in enumerate(points.values()):
        scores = [s for s in p["scores"] if s is not None]
        dice = [d for d in p["obj_dice"] if d is not None]
        p["score"] = float(np.mean(scores)) if scores else float("-inf")
        p["val_obj_dice"] = float(np.mean(dice)) if dice else None
        p["order"] = order
        by_fold = p.pop("by_fold", None)
        if by_fold is not None:
            means = {f: float(np.mean([v for v in vs if v is not None])) for f, vs in sorted(by_fold.items())
                     if any(v is not None for v in vs)}
            p["fold_scores"] = {str(f): v for f, v in means.items()}
            p["fold_spread"] = float(np.std(list(means.values()))) if len(means) > 1 else None
        ranked.append(p)
    key_fn = lambda p: (-p["score"], -(p["val_obj_dice"] or 0.0), p["order"])  # noqa: E731
    ranked.sort(key=key_fn)
    if sel.mode == "top-k":
        winners = ranked[: sel.k]
    else:
        by_cfg: dict[tuple[str, bool], list] = defaultdict(list)
        for p in ranked:
            by_cfg[config_group(p)].append(p)
        winners = [ps[0] for ps in by_cfg.values()]
        winners.sort(key=lambda p: p["order"])
    if cfg.data.folds:
        for w in winners:  # the candidate it won against: the next of its configuration (top-k: the next overall)
            rivals = [p for p in ranked if p is not w and p["score"] <= w["score"] and
                      (sel.mode == "top-k" or config_group(p) == config_group(w))
                      and p not in winners]
            if rivals:
                w["lead"] = w["score"] - rivals[0]["score"]
                w["lead_within_fold_spread"] = w.get("fold_spread") is not None and w["lead"] < w["fold_spread"]
    for p in ranked:
        p.pop("order", None)
    out = {"metric": sel.metric, "scope": sel.scope, "mode": sel.mode, "winners": winners,
           "excluded": excluded, "candidates": len(ranked)}
    if cfg.data.folds:  # every candidate's folds, best first (the winners' rivals included)
        out["fold_ranking"] = [{"loss": p["loss"], "iw": p["iw"], "params": p["params"], "score": p["score"],
                                "fold_scores": p.get("fold_scores", {}), "fold_spread": p.get("fold_spread")}
                               for p in ranked]
    if cfg.scheduler.type == "asha":
        out["asha"] = {"max_epochs": epochs, "judged_at_epoch": top, "stopped": stopped}
    from study.importance import hyperparameter_summary

    hyper = hyperparameter_summary(finished, sel.metric, lambda r: _score(r, sel.metric, sel.scope))
    if hyper:  # which hyperparameters mattered, per configuration (the report's section and figure)
        out["hyperparameters"] = hyper
    return out


def stage_select(ctx: StudyContext) -> None:
    from study.tune.tuner import outcomes

    selection = select_winners(outcomes(ctx.dir.ray_dir, SWEEP), ctx.cfg)
    if not selection["winners"]:
        raise UserError("select: no sweep trial finished successfully; nothing to retrain "
                        f"(see `study status {ctx.dir.name}`)")
    write_text_atomic(ctx.dir.selection_file, json.dumps(selection, indent=2))
    for w in selection["winners"]:
        spec = TrialSpec(loss=w["loss"], iw=w["iw"], params=w["params"], seed=0)
        at = w.get("judged_at_epoch", ctx.cfg.training.epochs)
        where = "" if at == ctx.cfg.training.epochs else f" at epoch {at} (no trial of it reached the last epoch)"
        folds = ""
        if w.get("fold_scores"):
            spread = "" if w.get("fold_spread") is None else f", spread {w['fold_spread']:.3f}"
            folds = f" (folds {', '.join(f'{v:.3f}' for v in w['fold_scores'].values())}{spread})"
            if w.get("lead_within_fold_spread"):
                folds += (f"; its lead over the next candidate ({w['lead']:.3f}) is smaller than its fold spread: "
                          "the folds do not tell them apart")
        log(f"select: {spec.label.rsplit('/', 1)[0]}  {selection['metric']} = {w['score']:.3f}{where}{folds}")
    try:
        mlc = tracking.client(ctx.state.tracking_uri)
        mlc.log_artifact(ctx.state.mlflow_ids()["study_run_id"], str(ctx.dir.selection_file))
        ctx.testing_pause("select")
        tracking.tag_selection(ctx.state, selection, tracking.selection_rule(ctx.cfg))
    except Exception as exc:  # tracking is secondary to the result file
        log(f"select: could not record the selection in MLflow ({exc})")
    ctx.state.mark_done("select", winners=len(selection["winners"]))


def winner_trials(ctx: StudyContext) -> list[TrialSpec]:
    selection = ctx.dir.read_selection()
    return [TrialSpec(loss=w["loss"], iw=w["iw"], params=w["params"], seed=seed)
            for w in selection["winners"] for seed in ctx.cfg.search.seeds]

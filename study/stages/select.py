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
from trainables.naming import config_name


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

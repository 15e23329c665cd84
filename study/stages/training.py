"""The two Tune stages: the sweep (every trial of the search space on train, validated) and the retrain (the
winners on train + validation, once per seed). Both run through :func:`study.tune.tuner.run_experiment`, resume
from their trials' checkpoints and never mark a stage done while a trial is unfinished."""

from __future__ import annotations

from study import tracking
from study.layout import RETRAIN, SWEEP, now
from study.report.tables import trial_table
from study.stages.context import StudyContext, StudyInterrupted, log
from study.stages.select import winner_trials
from trainables.config import TrialSpec
from trainables.errors import UserError
from trainables.naming import trial_label


def _run_tune_stage(ctx: StudyContext, *, name: str, stage_tag: str, trials: list[TrialSpec]) -> list:
    from study.tune.space import param_space
    from study.tune.tuner import outcomes, run_experiment, unfinished
    from trainables.trainable import train_trial

    ctx.ensure_ray()
    ctx.check_cache_on_workers()
    parent = tracking.stage_parent(ctx.state, stage_tag)
    ids = ctx.state.mlflow_ids()
    folds = ctx.dir.read_folds() if ctx.cfg.data.folds and stage_tag == "sweep" else None
    space = param_space(ctx.cfg, trials=trials, cache_dir=ctx.cache_dir(), stage=stage_tag,
                        experiment_id=ids["experiment_id"], parent_run_id=parent, study_id=ctx.state.study_id,
                        folds=folds)
    n_trials = ctx.cfg.sweep_size if stage_tag == "sweep" else len(trials)
    log(f"{name}: {n_trials} trial(s), resources per trial {ctx.cfg.resources.as_ray()}")
    scheduler = None
    if stage_tag == "sweep":
        from study.tune.asha import make_scheduler, state_file

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
    expected, searcher = len(trials), {}
    if stage_tag == "sweep" and ctx.cfg.search.algorithm == "tpe":
        from study.tune.searcher import RoundSearcher, points_file

        expected = ctx.cfg.sweep_size
        # the searcher ends the sweep (FINISHED) after its last round: the sample count only has to be enough
        searcher = {"search_alg": RoundSearcher(ctx.cfg, ctx.dir.ray_dir, name, folds=ctx.cfg.data.folds),
                    "num_samples": 2 * expected}
        s = ctx.cfg.search
        log(f"{name}: TPE, {s.num_samples} draw(s) per configuration in {s.rounds} round(s) of {s.draws_per_round}; "
            f"rounds kept in {points_file(ctx.dir.ray_dir, name)}")
    run_experiment(
        storage=ctx.dir.ray_dir, name=name, trainable=train_trial, resources=ctx.cfg.resources.as_ray(),
        param_space=space, metric=None, max_concurrent=ctx.cfg.max_concurrent_trials,
        max_failures=ctx.cfg.failure.max_failures, scheduler=scheduler, resume_errored=name in gpu_failed,
        **searcher,
    )
    results = outcomes(ctx.dir.ray_dir, name)
    left = unfinished(results, expected)
    if left:
        raise StudyInterrupted(f"{name}: {left} of {expected} trial(s) did not finish")
    _stop_on_gpu_errors(ctx, name, results)
    # every epoch of every trial in MLflow: what an outage of the tracking server kept out is logged now
    missed = tracking.backfill_runs(ctx.state, stage_tag, results, retry_s=ctx.cfg.failure.tracking_retry_s)
    if missed:
        log(f"{name}: {missed} metric value(s) the tracking server missed while the trials ran were logged now")
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


def stage_retrain(ctx: StudyContext) -> None:
    if ctx.cfg.holdout_models == "folds":
        log("retrain: evaluation.holdout_models is 'folds': the hold-out judges the winners' fold models, nothing "
            "is retrained")
        ctx.state.mark_done("retrain", trials=0, errors=0)
        return
    results = _run_tune_stage(ctx, name=RETRAIN, stage_tag="retrain", trials=winner_trials(ctx))
    errors = sum(r.status == "ERROR" for r in results)
    ctx.state.mark_done("retrain", trials=len(results), errors=errors)

"""The study's stages: data -> sweep -> select -> retrain -> holdout -> report, one module each
(:mod:`study.stages.data`, :mod:`study.stages.training` (sweep, retrain), :mod:`study.stages.select`,
:mod:`study.stages.holdout`, :mod:`study.stages.report`), run in order by :func:`run_stages`.

Each stage records its completion in ``state.json``; ``study resume`` skips finished stages and continues an
interrupted one (Tune restores its trials from their checkpoints, the hold-out stage skips configurations
whose records exist, the data stage skips prepared cases). Nothing already computed is recomputed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from study import tracking
from study.layout import STAGES
from study.stages.context import StudyContext, log
from study.stages.data import stage_data
from study.stages.holdout import stage_holdout
from study.stages.report import stage_report
from study.stages.select import stage_select
from study.stages.setup import choose_step_setup
from study.stages.training import stage_retrain, stage_sweep

STAGE_FUNCS: dict[str, Callable[[StudyContext], None]] = {
    "data": stage_data,
    "sweep": stage_sweep,
    "select": stage_select,
    "retrain": stage_retrain,
    "holdout": stage_holdout,
    "report": stage_report,
}


def redo_missing_outputs(ctx: StudyContext) -> None:
    """A finished stage whose output file was removed (the remedy for a damaged one) runs again, with the stages
    that read it: ``selection.json`` (select), ``holdout/summary.json`` (hold-out, report), ``report.md``."""
    outputs = {"select": (ctx.dir.selection_file, ()), "holdout": (ctx.dir.summary_file, ("report",)),
               "report": (ctx.dir.report_file, ())}
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
    report = ctx.dir.report_file
    log(f"study {ctx.dir.name} finished in {time.perf_counter() - t0:.0f} s")
    print(f"\nReport: {report}\nMLflow: study ui {ctx.dir.name} --storage {ctx.dir.root.parent}", flush=True)
    sys.stdout.flush()

"""The report stage: report.md / report.html and the figures from ``holdout/summary.json``, logged to MLflow."""

from __future__ import annotations

import json

from study import tracking
from study.layout import SWEEP
from study.stages.context import StudyContext
from trainables.io_utils import json_default, write_text_atomic
from trainables.naming import trial_label


def stage_report(ctx: StudyContext) -> None:
    from study.report.document import write_report
    from study.report.tables import holdout_text, strict_title
    from study.report.verdict import sentence
    from study.tune.tuner import outcomes

    summary_file = ctx.dir.summary_file
    summary = ctx.dir.read_summary()
    strict = strict_title(summary)
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
    ctx.testing_pause("report")
    tracking.log_verdict(ctx.state, summary)
    mlc.set_terminated(root, "FINISHED")
    ctx.state.mark_done("report", files=[str(f) for f in files])
    print("\n" + holdout_text(summary), flush=True)

"""``study status``: where a study stands, as plain data (``--json``) and as text."""

from __future__ import annotations


def study_status(study_dir, cfg, state, results: dict[str, list]) -> dict:
    """What `study status` shows, as plain data (``--json`` prints exactly this): the stages with their times,
    the selected winners with their hyperparameters and validation score, the trials of each Tune stage
    (``results``: Tune stage name -> ``study.tune.tuner.outcomes``), the hold-out table and the verdict, the report."""
    from study.layout import STAGES, SWEEP
    from study.report.tables import trial_summary
    from study.tracking import selection_rule, verdict_short
    from trainables.naming import config_label

    out: dict = {"study": study_dir.name, "folder": str(study_dir.root), "tracking_uri": state.tracking_uri,
                 "stages": {s: state.data["stages"].get(s, {"done": False}) for s in STAGES}}
    if study_dir.selection_file.is_file():
        sel = study_dir.read_selection()
        out["selection"] = {"rule": selection_rule(cfg), "metric": sel["metric"], "winners": [
            {"configuration": config_label(w),
             "loss": w["loss"], "iw": w["iw"], "params": w["params"], "score": w["score"],
             "val_obj_dice": w.get("val_obj_dice"), "seeds": len(w.get("trial_ids", [])),
             "judged_at_epoch": w.get("judged_at_epoch", cfg.training.epochs)}
            for w in sel["winners"]]}
    out["trials"] = {name: [trial_summary(r) for r in rs] for name, rs in results.items()}
    started = len(out["trials"][SWEEP])
    if started < cfg.sweep_size:
        out["not_started"] = {SWEEP: cfg.sweep_size - started}
    summary_file = study_dir.summary_file
    if summary_file.is_file():
        summary = study_dir.read_summary()
        out["holdout"] = {
            "strict_rule": summary.get("strict_rule"), "splits": summary.get("splits"),
            "configurations": [
                {"configuration": label, "avg_recall": c["luna16"]["avg_recall"],
                 "avg_recall_ci": [c["luna16"].get("avg_recall_ci_low"), c["luna16"].get("avg_recall_ci_high")],
                 "obj_dice": c["luna16"]["obj_dice"], "fp_per_image": c["luna16"]["fp_per_image"],
                 "strict_avg_recall": c["strict"]["avg_recall"]} for label, c in summary["configs"].items()],
            "verdict": [{"comparison": f"{e['iw']} vs {e['plain']}", "verdict": verdict_short(e),
                         "sentence": e["sentence"]} for e in (summary.get("verdict") or {}).get("entries") or []]}
    out["report"] = str(study_dir.report_file) if study_dir.report_file.is_file() else None
    return out


def status_text(status: dict, results: dict[str, list], summary: dict | None) -> str:
    """:func:`study_status` as text, with the trials' table of each Tune stage and, once the hold-out stage is
    done, the hold-out table of ``summary`` (:func:`study.report.tables.holdout_text`)."""
    from study.layout import RETRAIN
    from study.report.tables import fmt, holdout_text, text_table, trial_table

    lines = [f"study {status['study']}  ({status['folder']})", f"MLflow {status['tracking_uri']}", ""]
    rows = [("stage", "state", "finished", "wall time")]
    for stage, info in status["stages"].items():
        secs = info.get("seconds")
        rows.append((stage, "done" if info.get("done") else "pending", info.get("finished", "-"),
                     "-" if secs is None else f"{secs:.0f} s"))
    lines.append(text_table(rows, indent="  "))
    sel = status.get("selection")
    if sel:
        lines += ["", f"winners ({sel['rule']}):"]
        rows = [("configuration", sel["metric"], "val objDice", "seeds")]
        rows += [(w["configuration"], fmt(w["score"]), fmt(w["val_obj_dice"]), str(w["seeds"])) for w in sel["winners"]]
        lines.append(text_table(rows, indent="  "))
    for name, rs in results.items():
        if rs:
            lines += ["", f"{name} trials" + (" (train+validation, no validation)" if name == RETRAIN else "") + ":",
                      trial_table(rs, indent="  ")]
        lines += [f"  error in {r.trial_id}: {r.error}" for r in rs if r.error]
    lines += [f"\n{name}: {n} trial(s) not started yet" for name, n in status.get("not_started", {}).items()]
    ho = status.get("holdout")
    if ho and summary is not None:
        lines += ["", holdout_text(summary, indent="  ")]
        if ho["verdict"]:
            lines += ["", "verdict:"] + [f"  - {v['comparison']}: {v['verdict']}" for v in ho["verdict"]]
    lines += ["", f"report: {status['report']}" if status.get("report") else "report: not written yet"]
    return "\n".join(lines)

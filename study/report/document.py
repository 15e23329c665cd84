"""The study report: the Table 2 analogue, paired iw comparisons, size groups and the three figures.

Everything comes from ``holdout/summary.json`` (itself computed from the saved records), so the report can
be rewritten at any time with ``study report NAME``. The same content is rendered as Markdown and HTML.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from study.report.tables import fmt, holdout_rows, strict_title
from trainables.config import StudyConfig


def _f(v: Any, digits: int = 3) -> str:
    return "–" if v is None else fmt(v, digits)  # an en dash reads better than '-' in the report


def _ci(lo: Any, hi: Any) -> str:
    return "" if lo is None or hi is None else f" [{_f(lo)}, {_f(hi)}]"


def _diff(d: dict[str, Any]) -> str:
    """A difference with its CI; '–' when undefined (e.g. object Dice with no detected lesion)."""
    return "–" if d.get("delta") is None else f"{d['delta']:+.3f}{_ci(d.get('ci_low'), d.get('ci_high'))}"


def verdict_blocks(summary: dict[str, Any], key: str = "verdict", title: str = "Verdict") -> list[tuple]:
    """``## Verdict``: one generated sentence per loss trained with and without iw (study.report.verdict)."""
    v = summary.get(key) or {}
    blocks: list[tuple] = [("h2", title)]
    if not v.get("entries"):
        return blocks + [("p", "No loss was retrained both with and without iw: no verdict.")]
    blocks.append(("ul", [e["sentence"] for e in v["entries"]]))
    hw = v.get("ci_half_width_avg_recall")
    n_cases = next(iter(v["entries"]))["metrics"]["avg_recall"]["n_cases"]
    blocks.append(("p", (
        f"Differences iw − plain on {n_cases} hold-out cases, 95 % CIs from a hierarchical bootstrap "
        f"({v['n_boot']} replicates: seeds with replacement, then cases within each seed). A difference is "
        "resolved when its CI excludes 0; a gain counts only under the strict hit rule. "
        + (f"This design resolves avg-recall differences of about ±{hw:.2f} (mean CI half-width)." if hw else ""))))
    return blocks


def baseline_blocks(summary: dict[str, Any]) -> list[tuple]:
    """``## Against the baseline``: one sentence per configuration vs the study's ``evaluation.baseline``."""
    v = summary.get("baseline_comparison") or {}
    if not v.get("entries"):
        return []
    return [("h2", f"Against the baseline ({v['baseline']})"),
            ("ul", [e["sentence"] for e in v["entries"]]),
            ("p", f"Each configuration − {v['baseline']}, seed by seed on the same hold-out cases; 95 % CIs from "
                  f"the hierarchical bootstrap ({v['n_boot']} replicates), resolved when the CI excludes 0.")]


def verdict_detail_blocks(summary: dict[str, Any], key: str = "verdict") -> list[tuple]:
    """The verdict's numbers: every difference with its CI and per-seed values, overall and per size group
    (``key="baseline_comparison"``: the same for each configuration vs the baseline)."""
    v = summary.get(key) or {}
    if not v.get("entries"):
        return []
    strict = strict_title(summary)
    names = {"avg_recall": "avg recall (any)", "avg_recall_strict": f"avg recall ({strict})",
             "obj_dice": "object Dice", "fp_per_image": "FP/image"}
    iw = key.startswith("verdict")
    header = ["iw vs plain" if iw else "vs baseline", "group", "metric", "Δ [95% CI]", "per seed"]
    rows = []
    for e in v["entries"]:
        pair = f"{e['iw']} − {e['plain']}"
        for metric, d in e["metrics"].items():
            rows.append([pair, "all lesions", names[metric], _diff(d),
                         ", ".join("–" if x is None else f"{x:+.3f}" for x in d["per_seed"])])
        for group, g in e["size_groups"].items():
            for metric in ("avg_recall", "avg_recall_strict", "obj_dice"):
                rows.append([pair, group, names[metric], _diff(g[metric]),
                             ", ".join("–" if x is None else f"{x:+.3f}" for x in g[metric]["per_seed"])])
    title = ("Does iw help? Differences on the same hold-out cases" if iw
             else f"Differences from the baseline ({v.get('baseline')})")
    if key.endswith("_folds"):
        title += " (fold ensembles)"
    return [("h2", title),
            ("p", "Per seed: the difference of the two models trained with that seed, on all hold-out "
                  "cases. A size group keeps its lesions and the components of its size (the authors' rule)."),
            ("table", header, rows)]


def holdout_table_block(summary: dict[str, Any]) -> tuple:
    """The Table 2 analogue: one row per retrained configuration and seed (:func:`study.report.tables.holdout_rows`)."""
    return ("table", *holdout_rows(summary, blank="–"))


def calibrated_table_block(summary: dict[str, Any]) -> list[tuple]:
    """Paper threshold (p > 0.5) beside the calibrated one (chosen on validation by object Dice), if on."""
    configs = {k: c for k, c in summary["configs"].items() if c.get("calibrated")}
    if not configs:
        return []
    strict = strict_title(summary)
    header = ["configuration", "threshold", "avg recall", f"avg recall ({strict})", "obj Dice", "FP/image",
              "pred+ fraction"]
    rows = []
    for label, c in configs.items():
        for name, lu, st in (("p > 0.5", c["luna16"], c["strict"]),
                             (f"calibrated: p > {c['calibrated']['threshold']:g}", c["calibrated"]["luna16"],
                              c["calibrated"]["strict"])):
            rows.append([label, name, _f(lu["avg_recall"]), _f(st["avg_recall"]), _f(lu["obj_dice"]),
                         _f(lu["fp_per_image"], 2), _f(lu.get("pred_positive_fraction"), 4)])
    return [("h2", "Calibrated binarisation (beyond the paper)"),
            ("p", "Each configuration's probability threshold is chosen on the validation split by its sweep "
                  "twin (same configuration and seed, trained on the train split only) as the one of "
                  "0.5, 0.6, …, 0.99 that maximises validation object Dice, then applied unchanged to the "
                  "retrained model on the hold-out. The paper's p > 0.5 rows are the ones the verdict uses."),
            ("table", header, rows)]


def tta_table_blocks(summary: dict[str, Any]) -> list[tuple]:
    """With ``inference.tta: mirror``: every model's hold-out numbers with and without test-time mirroring."""
    configs = {k: c for k, c in summary["configs"].items() if c.get("without_tta")}
    if not configs:
        return []
    strict = strict_title(summary)
    header = ["configuration", "inference", "avg recall", f"avg recall ({strict})", "obj Dice", "FP/image"]
    rows = []
    for label, c in configs.items():
        for name, part in (("mirrored (8 flips)", c), ("single pass", c["without_tta"])):
            lu, st = part["luna16"], part["strict"]
            ci = _ci(lu.get("avg_recall_ci_low"), lu.get("avg_recall_ci_high"))
            rows.append([label, name, f"{_f(lu['avg_recall'])}{ci}", _f(st["avg_recall"]), _f(lu["obj_dice"]),
                         _f(lu["fp_per_image"], 2)])
    return [("h2", "Test-time mirroring (beyond the paper)"),
            ("p", "The study predicts with nnU-Net's test-time mirroring (every window also flipped along each "
                  "subset of the three axes, the 8 logits averaged); the same models in a single pass beside it, "
                  "p > 0.5. The tables and the verdict above use the mirrored predictions."),
            ("table", header, rows)]


def readme_block(summary: dict[str, Any], state: dict[str, Any], *, study_name: str) -> str:
    """What the README pastes of a finished study: where and how long it ran, and the hold-out table.

    Printed by ``study report NAME --markdown``; every figure comes from the study's own files.
    """
    from study.layout import STAGES
    from trainables.environment import one_line

    stages = {name: (state.get("stages") or {}).get(name, {}) for name in STAGES}
    seconds = [v.get("seconds") for v in stages.values()]
    total = sum(s for s in seconds if s is not None)
    envs = state.get("environments") or []
    machines = {one_line({k: v for k, v in e.items() if k != "since"}) for e in envs}
    env = summary.get("environment")
    lines = [f"Study `{study_name}`, hold-out stage on: {one_line(env) if env else 'unrecorded machine'}."]
    if len(machines) > 1:
        lines.append(f"The study ran on {len(machines)} different machines (resumed elsewhere): "
                     + " | ".join(sorted(machines)) + ".")
    if any(x is not None for x in seconds):
        per = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in stages.items() if v.get("seconds") is not None)
        lines.append(f"Wall time of the stages: {total / 60:.1f} min ({per}).")
    return "\n".join(lines) + "\n\n" + render_markdown([holdout_table_block(summary)])


def build_blocks(summary: dict[str, Any], figures: dict[str, str], *, study_name: str,
                 cfg: StudyConfig | None) -> list[tuple]:
    configs = summary["configs"]
    strict = strict_title(summary)
    blocks: list[tuple] = [("h1", f"Study {study_name}: inverse weighting on the hold-out set")]
    folds_only = summary.get("holdout_models") == "folds"
    blocks.extend(verdict_blocks(summary, title="Verdict (fold ensembles)" if folds_only else "Verdict"))
    if summary.get("fold_ensembles"):
        blocks.extend(verdict_blocks(summary, "verdict_folds", "Verdict of the fold ensembles (second evidence)"))
    blocks.extend(baseline_blocks(summary))
    if cfg is not None:
        t = cfg.training
        if cfg.description:
            blocks.append(("p", f"Study: {cfg.description}"))
        blocks.append(("p", (
            f"Data: {cfg.data.source}{'' if cfg.data.path is None else ' ' + str(cfg.data.path)}. "
            f"Protocol: {t.epochs} epochs × {t.iterations} iterations (retrain: {cfg.epochs_retrain} epochs), "
            f"batch {t.batch_size}, patches {'×'.join(map(str, t.patch_size))}, SGD lr {t.optimizer.lr:g}, "
            f"U-Net width {cfg.model.width:g}. Winners chosen by {cfg.selection.metric} "
            f"({cfg.selection.mode}) on validation, retrained on train+validation, last-epoch model evaluated.")))
        blocks.append(("p", search_line(summary.get("search"), cfg)))
    blocks.extend(fold_blocks(summary))
    blocks.extend(hyperparameter_blocks(summary))
    blocks.append(("p", splits_line(summary)))
    blocks.append(("h2", "Hold-out results (Table 2 analogue)"))
    blocks.append(("p", (
        "avg recall: mean object recall at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP per image (luna16 protocol, all "
        "hold-out images in the denominator, 95 % case-level bootstrap CI). A lesion counts as found when any "
        "predicted component overlaps it (the paper's rule). FP/image and the predicted-positive voxel "
        f"fraction (p > 0.5) are shown beside it, with the avg recall under a strict hit rule ({strict}): "
        "recall bought by over-segmentation shows up as many FPs, a large positive fraction and a strict "
        "recall far below the `any` recall. paper2020: the authors' protocol (80 % subsamples).")))
    blocks.append(holdout_table_block(summary))
    blocks.extend(calibrated_table_block(summary))
    blocks.extend(tta_table_blocks(summary))
    if summary.get("fold_ensembles"):
        folds = {**summary, "configs": summary["fold_ensembles"]}
        blocks.append(("h2", "Hold-out results of the fold ensembles (no retraining)"))
        blocks.append(("p", f"Each winner's {summary.get('folds')} fold models (the sweep trials of its "
                            "configuration and seed, one per fold, each trained without its fold's validation "
                            "cases) averaged as probabilities, judged on the same hold-out cases: a second, "
                            "independent piece of evidence per seed, without the retraining."))
        blocks.append(holdout_table_block(folds))
        blocks.extend(calibrated_table_block(folds)[2:])  # its table only: the explanation is above
    blocks.extend(verdict_detail_blocks(summary))
    blocks.extend(verdict_detail_blocks(summary, "verdict_folds"))
    blocks.extend(verdict_detail_blocks(summary, "baseline_comparison"))
    cut = summary.get("size_cutoffs_mm") or []
    if cut:
        blocks.append(("h2", "By lesion size"))
        groups = list(next(iter(configs.values()))["size_groups"].keys())
        first = next(iter(configs.values()))["size_groups"]
        counts = {g: first[g].get("n_lesions") for g in groups}
        rule = summary.get("size_cut_rule") or "the study's cut-offs"
        blocks.append(("p", "Lesions grouped by equivalent diameter at " + ", ".join(f"{c:.1f} mm" for c in cut)
                       + f" ({rule}; the same cut-offs for every configuration): "
                       + ", ".join(g if counts[g] is None else f"{g}: {counts[g]} lesions" for g in groups)
                       + ". Avg recall / object Dice per group; a group keeps its lesions and the predicted "
                         "components of its size."))
        header = ["configuration"] + [f"{g}{'' if counts[g] is None else f' (n = {counts[g]})'} recall / objDice"
                                      for g in groups]
        rows = []
        for label, c in configs.items():
            sg = c.get("size_groups") or {}
            rows.append([label] + [f"{_f(sg[g]['avg_recall'])} / {_f(sg[g]['obj_dice'])}" if g in sg else "–"
                                   for g in groups])
        blocks.append(("table", header, rows))
    blocks.append(("h2", "Figures"))
    captions = {"froc": "FROC curves of the hold-out set, one panel per loss (paper Fig. 4); the legend gives "
                        "each configuration's avg recall, the caption under the figure what is shaded",
                "size_groups": "Avg recall and object Dice by lesion size, mean over seeds with ± 1 std over "
                               "seeds on both panels (paper Fig. 3)",
                "diameters": "Lesion diameters by split, the size-group cut-offs dotted (paper Fig. 2)",
                "hyperparameters": "Sweep trials: validation score against each hyperparameter that varied "
                                   "(one point per trial; iw filled, plain open)",
                "curves": "Sweep trials per epoch: training loss, validation avg recall and object Dice "
                          "(validation every validation.every epochs): flat curves at the end = converged"}
    for key, path in figures.items():
        blocks.append(("img", Path(path).name, captions.get(key, key)))
    blocks.append(("h2", "Reproducibility"))
    blocks.append(("p", (
        "Every number above is recomputed from the saved per-object records in holdout/: `study metrics "
        "holdout/` prints the table rows (with the study's bootstrap settings, so the same CIs) and `study "
        "compare holdout/<plain> holdout/<iw>` a verdict line. On one machine a study reproduces exactly, resumed or not; "
        "another machine (other CPU, other thread count, a GPU) changes the last bits of every SGD step, and "
        "models near a decision boundary (short iw training) can then differ visibly.")))
    return blocks


def hyperparameter_blocks(summary: dict[str, Any]) -> list[tuple]:
    """Which hyperparameters mattered: per configuration whose hyperparameters varied in the sweep, the share of
    the validation score's variance each explains (fANOVA, :mod:`study.importance`), or why there is none."""
    hyper = (summary.get("search") or {}).get("hyperparameters")
    if not hyper:
        return []
    rows = []
    for config, h in hyper.items():
        if h.get("importance"):
            shares = ", ".join(f"{k} {v:.2f}" for k, v in h["importance"].items())
        else:
            shares = f"– ({h.get('why')})"
        rows.append([config, str(h.get("n")), ", ".join(h.get("varying") or []), shares])
    metric = next(iter(hyper.values())).get("metric", "the selection metric")
    return [("h2", "Which hyperparameters mattered"),
            ("p", f"Per configuration, the share of the variance of its sweep trials' {metric} that each "
                  "hyperparameter explains (fANOVA: Optuna's FanovaImportanceEvaluator over the finished trials, "
                  "seeds and folds as separate points; shares sum to 1). The figure hyperparameters.png shows "
                  "every trial's score against each hyperparameter."),
            ("table", ["configuration", "trials", "varied", "importance"], rows)]


def fold_blocks(summary: dict[str, Any]) -> list[tuple]:
    """Under ``data.folds``: each winner's validation score per fold, their spread, and where its lead over the
    next candidate is smaller than that spread."""
    folds = (summary.get("search") or {}).get("folds")
    if not folds:
        return []
    rows, close = [], []
    for name, f in folds.items():
        scores = f.get("fold_scores") or {}
        lead = f.get("lead")
        rows.append([name, _f(f.get("score")), ", ".join(_f(v) for v in scores.values()), _f(f.get("fold_spread")),
                     "–" if lead is None else f"{lead:+.3f}"])
        if f.get("lead_within_fold_spread"):
            close.append(name)
    text = (f"Cross-validation: {summary.get('folds')} folds over the train and validation cases; winners chosen "
            "on the mean over folds and seeds. Per fold: the mean over seeds; spread: their standard deviation; "
            "lead: the winner's margin over the next candidate of its configuration.")
    if close:
        text += (" The lead of " + ", ".join(close) + " is smaller than its fold spread: the folds do not tell it "
                 "from the next candidate.")
    return [("p", text), ("table", ["winner", "validation score", "per fold", "spread", "lead"], rows)]


def search_line(search: dict[str, Any] | None, cfg) -> str:
    """How the sweep searched and validated: FIFO or ASHA (rungs, trials stopped, trial-epochs used, the epoch
    the winners were judged at) and which validation cases the intermediate validations used."""
    t, v = cfg.training, cfg.validation
    search = search or {}
    if cfg.scheduler.type == "asha":
        used, full = search.get("trial_epochs"), search.get("full_trial_epochs") or cfg.sweep_size * t.epochs
        rungs = ", ".join(map(str, cfg.scheduler.milestones(t.epochs)))
        text = (f"Search: ASHA on {cfg.scheduler.metric} (rungs at epochs {rungs} of {t.epochs}, "
                f"η = {cfg.scheduler.reduction_factor}, one set of rungs per "
                f"{'(loss, iw) configuration' if cfg.selection.mode == 'per-config' else 'study'}, decisions in "
                f"grid order): {search.get('stopped', '?')} of {search.get('trials', cfg.sweep_size)} sweep "
                f"trials stopped early")
        if used is not None:
            text += f", {used} of {full} trial-epochs trained ({used / full:.2f} of FIFO)"
        early = {c: e for c, e in (search.get("judged_at_epoch") or {}).items() if e is not None and e < t.epochs}
        text += (". Winners chosen among the trials that reached the last epoch" if not early else
                 ". Winners chosen among the trials that reached the highest epoch of their configuration: "
                 + ", ".join(f"{c} at epoch {e} (no trial of it reached the last)" for c, e in sorted(early.items())))
        text += ". "
    else:
        text = f"Search: every sweep trial trained all {t.epochs} epochs (FIFO). "
    rungs = ", at the ASHA rungs" if cfg.scheduler.type == "asha" else ""
    text += f"Validation every {v.every} epoch(s){rungs} and at the last epoch"
    if v.subset is not None:
        text += (f"; the intermediate validations on a fixed subset of {v.subset} validation case(s) (seed "
                 f"{v.seed}, the same for every trial), the last one on the whole validation split.")
    else:
        text += ", each on the whole validation split."
    return text


def splits_line(summary: dict[str, Any]) -> str:
    """``Cases (lesions) per split: train 8 (43), val 4 (19), hold-out 4 (21).``"""
    splits = summary.get("splits")
    if not splits:  # a summary written before the split counts were kept: lesions only
        diam = summary.get("diameters_mm") or {}
        return "Lesions per split: " + ", ".join(f"{k} {len(v)}" for k, v in diam.items()) + "."
    names = {"train": "train", "val": "validation", "holdout": "hold-out"}
    return ("Cases (lesions) per split: " + ", ".join(f"{names.get(k, k)} {v['cases']} ({v['lesions']})"
                                                      for k, v in splits.items())
            + ". Every hold-out number below is measured on the hold-out cases only.")


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        if b[0] == "h1":
            out.append(f"# {b[1]}\n")
        elif b[0] == "h2":
            out.append(f"## {b[1]}\n")
        elif b[0] == "p":
            out.append(b[1] + "\n")
        elif b[0] == "ul":
            out.extend(f"- {item}" for item in b[1])
            out.append("")
        elif b[0] == "table":
            header, rows = b[1], b[2]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
            out.append("")
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})\n")
    return "\n".join(out) + "\n"


def _html_text(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code>."""
    import re

    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(blocks: list[tuple], title: str) -> str:
    e = _html_text
    body = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            body.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
        elif b[0] == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "ul":
            body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in b[1]) + "</ul>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "img":
            src, alt = html.escape(b[1], quote=True), html.escape(b[2], quote=True)
            body.append(f"<figure><img src='{src}' alt='{alt}'><figcaption>{e(b[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em}"
             "th{background:#f3f3f3}img{max-width:100%}"
             "code{background:#f3f3f3;padding:0 .2em;border-radius:3px;font-size:95%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def display_names(labels) -> dict[str, str]:
    """Shorter names for figures: ``dice_ce[lambda_ce=1,...]/s0`` -> ``dice_ce/s0`` when each configuration of
    the study has one parameter setting (the table keeps the full label)."""
    def split(label: str) -> tuple[str, str, str]:
        head, _, seed = label.rpartition("/")
        name, _, params = head.partition("[")
        return name, params, seed

    settings: dict[str, set[str]] = {}
    for lb in labels:
        name, params, _ = split(lb)
        settings.setdefault(name, set()).add(params)
    return {lb: f"{split(lb)[0]}/{split(lb)[2]}" if len(settings[split(lb)[0]]) == 1 else lb for lb in labels}


def write_figures(summary: dict[str, Any], out_dir: Path, curves: dict[str, list] | None = None) -> dict[str, str]:
    from trainables.metrics.plots import (
        plot_diameters,
        plot_froc,
        plot_hyperparameters,
        plot_size_groups,
        plot_training_curves,
    )

    configs = summary["configs"]
    short = display_names(list(configs))
    figures = {"froc": str(plot_froc({short[k]: c["luna16"] for k, c in configs.items()}, out_dir / "froc.png",
                                     title="Hold-out FROC", hit_rule="any overlap, the paper's"))}
    groups = {short[k]: c["size_groups"] for k, c in configs.items() if c.get("size_groups")}
    if groups:
        figures["size_groups"] = str(plot_size_groups(groups, out_dir / "size_groups.png",
                                                      title="Hold-out recall and object Dice by lesion size",
                                                      hit_rule="any rule"))
    diam = {k: v for k, v in (summary.get("diameters_mm") or {}).items() if v}
    if diam:
        figures["diameters"] = str(plot_diameters(diam, out_dir / "diameters.png",
                                                  cutoffs_mm=summary.get("size_cutoffs_mm") or ()))
    hyper = (summary.get("search") or {}).get("hyperparameters")
    if hyper:
        figures["hyperparameters"] = str(plot_hyperparameters({c: h["points"] for c, h in hyper.items()},
                                                              out_dir / "hyperparameters.png",
                                                              metric=next(iter(hyper.values()))["metric"]))
    if curves:
        short = display_names(list(curves))
        figures["curves"] = str(plot_training_curves({short[k]: v for k, v in curves.items()}, out_dir / "curves.png"))
    return figures


def write_report(summary: dict[str, Any], out_dir: Path, *, study_name: str,
                 cfg: StudyConfig | None = None, curves: dict[str, list] | None = None) -> list[Path]:
    """Write report.md, report.html and the PNG figures into ``out_dir``; return the files.

    ``curves``: sweep trial label -> its per-epoch results (training loss, validation metrics), drawn as the
    convergence figure."""
    from study.layout import REPORT_FILE
    from trainables.io_utils import write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    figures = write_figures(summary, out_dir, curves)
    blocks = build_blocks(summary, figures, study_name=study_name, cfg=cfg)
    md = out_dir / REPORT_FILE
    page = md.with_suffix(".html")
    write_text_atomic(md, render_markdown(blocks))
    write_text_atomic(page, render_html(blocks, f"Study {study_name}"))
    return [md, page] + [Path(p) for p in figures.values()]

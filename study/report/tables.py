"""Tables, rendered once: plain text for the console and ``study status``, rows for the report's Markdown/HTML.

The hold-out table in particular is built here only (:func:`holdout_rows`): the report's Table 2 analogue, the
end-of-study console and ``study status`` all take it from here, and name the strict hit rule the same way
(:func:`strict_title`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainables.naming import trial_label


def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; '-' for a missing value."""
    return "-" if value is None else f"{float(value):.{digits}f}"


def text_table(rows: Sequence[Sequence[Any]], *, right_from: int | None = None, indent: str = "") -> str:
    """``rows[0]`` is the header; a rule under it; columns from ``right_from`` on are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

    def line(r: list[str]) -> str:
        return indent + "  ".join(
            c.rjust(w) if right_from is not None and i >= right_from else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()

    out = [line(cells[0]), indent + "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- trials


def trial_summary(r) -> dict[str, Any]:
    """What `study status` and the end of a Tune stage show of one trial (a ``study.tune.tuner.TrialOutcome``)."""
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


# ---------------------------------------------------------------------------------------------- hold-out


def strict_rule_name(rule: Sequence[Any]) -> str:
    """``IoU ≥ 0.3`` for ``("iou", 0.3)``: the strict hit rule as every table and sentence names it."""
    from trainables.metrics import HIT_RULES

    name, thr = rule[0], rule[1]
    return HIT_RULES[name].title(thr) if name in HIT_RULES else str(name)


def strict_title(summary: dict[str, Any]) -> str:
    """The strict rule of a hold-out summary, named (a summary written before it recorded its rule: the
    default rule of :class:`trainables.config.StrictRuleConfig`)."""
    from trainables.config import StrictRuleConfig

    default = StrictRuleConfig()
    return strict_rule_name(summary.get("strict_rule") or (default.rule, default.threshold))


def holdout_rows(summary: dict[str, Any], *, compact: bool = False, blank: str = "-"
                 ) -> tuple[list[str], list[list[str]]]:
    """The hold-out table of a summary: one row per retrained configuration and seed. Full (the report's Table 2
    analogue): avg recall with its CI, object Dice ± std, FP/image, predicted-positive fraction, strict avg
    recall, paper2020 avg recall. ``compact`` (console, ``study status``): avg recall with CI, object Dice,
    FP/image, strict avg recall. ``blank``: what a missing number shows (the report's en dash)."""
    strict = strict_title(summary)

    def f(v: Any, digits: int = 3) -> str:
        return blank if v is None else fmt(v, digits)

    def ci(lo: Any, hi: Any) -> str:
        return "" if lo is None or hi is None else f" [{f(lo)}, {f(hi)}]"

    if compact:
        header = ["configuration", "avg recall [95% CI]", "objDice", "FP/img", "strict recall"]
    else:
        header = ["configuration", "avg recall [95% CI]", "obj Dice ± std", "FP/image", "pred+ fraction",
                  f"avg recall ({strict})", "avg recall (paper2020)"]
    rows = []
    for label, c in summary["configs"].items():
        lu, st = c["luna16"], c["strict"]
        recall = f(lu["avg_recall"]) + ci(lu.get("avg_recall_ci_low"), lu.get("avg_recall_ci_high"))
        if compact:
            rows.append([label, recall, f(lu["obj_dice"]), f(lu["fp_per_image"], 2), f(st["avg_recall"])])
        else:
            pp = c["paper2020"]
            rows.append([label, recall, f"{f(lu['obj_dice'])} ± {f(lu['obj_dice_std'])}",
                         f(lu["fp_per_image"], 2), f(lu.get("pred_positive_fraction"), 4),
                         f(st["avg_recall"]), f"{f(pp['avg_recall'])} ± {f(pp['avg_recall_std'])}"])
    return header, rows


def holdout_text(summary: dict[str, Any], indent: str = "") -> str:
    """The compact hold-out table under its title line, for the console and ``study status``."""
    n = (summary.get("splits") or {}).get("holdout")
    where = f"{n['cases']} cases, {n['lesions']} lesions; " if n else ""
    header, rows = holdout_rows(summary, compact=True)
    return (f"hold-out ({where}luna16 protocol, 'any' hit rule; strict = {strict_title(summary)}):\n"
            + text_table([header, *rows], indent=indent))

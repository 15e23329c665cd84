"""The verdict: does iw help, and at what cost? One entry per loss trained with and without iw.

The unit of evidence is a (configuration, seed) pair: iw and plain of the same loss trained with the same seed,
judged on the same hold-out cases. Each difference iw − plain (avg recall under the paper's `any` rule and under
the strict rule, object Dice, FP/image; overall and per size group) gets a 95 % interval from the hierarchical
bootstrap of :func:`trainables.metrics.bootstrap.hierarchical_bootstrap` (seeds, then cases). A difference is
*resolved* when its interval excludes 0 (docs/definitions.md §9).

The sentence of a loss never claims a gain from the `any` rule alone: a recall gain that the strict rule does not
confirm is reported as what it is (lenient rule only, over-segmentation when FPs rise or Dice falls). Size groups
whose strict-rule difference is resolved are named after the overall verdict (iw may help small lesions and
hurt large ones at once).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from trainables.metrics import load_records
from trainables.metrics.bootstrap import hierarchical_bootstrap

#: verdict metric -> (records of which rule, bootstrap metric)
METRICS = {
    "avg_recall": ("any", "avg_recall"),
    "avg_recall_strict": ("strict", "avg_recall"),
    "obj_dice": ("any", "obj_dice"),
    "fp_per_image": ("any", "fp_per_image"),
}
GROUP_METRICS = ("avg_recall", "avg_recall_strict", "obj_dice")


def resolved(d: dict[str, Any]) -> int:
    """+1 / −1 when the interval lies above / below 0, 0 when it spans 0, is undefined or has zero width."""
    lo, hi = d.get("ci_low"), d.get("ci_high")
    if lo is None or hi is None or lo == hi:  # a zero-width interval: one value resampled, not evidence
        return 0
    return 1 if lo > 0 else -1 if hi < 0 else 0


def _fmt(d: dict[str, Any], digits: int = 2) -> str:
    if d.get("delta") is None:
        return "undefined"
    ci = "" if d.get("ci_low") is None else f" [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]"
    return f"{d['delta']:+.{digits}f}{ci}"


def sentence(entry: dict[str, Any], strict_name: str) -> str:
    """One readable sentence from an entry's intervals (module docstring for the rules). ``entry["iw"]`` is
    the arm under test and ``entry["plain"]`` its reference (the same loss without iw, or the study's
    baseline configuration)."""
    m = entry["metrics"]
    subject = "iw" if entry.get("kind", "iw") == "iw" else entry["iw"]
    head = f"{entry['iw']} vs {entry['plain']} ({entry['n_seeds']} seed{'s' * (entry['n_seeds'] != 1)})"
    numbers = (f"strict ({strict_name}) avg recall {_fmt(m['avg_recall_strict'])}, any-rule avg recall "
               f"{_fmt(m['avg_recall'])}, object Dice {_fmt(m['obj_dice'])}, FP/image {_fmt(m['fp_per_image'], 1)}")
    strict, lenient = resolved(m["avg_recall_strict"]), resolved(m["avg_recall"])
    dice, fp = resolved(m["obj_dice"]), resolved(m["fp_per_image"])
    if strict > 0:
        cost = ("at a resolved delineation cost" if dice < 0 else "with better delineation" if dice > 0
                else "at no resolved delineation cost")
        fps = ", more false positives" if fp > 0 else ", fewer false positives" if fp < 0 else ""
        verdict = f"more lesions found under the strict rule, {cost}{fps}"
    elif strict < 0:
        verdict = f"fewer lesions found under the strict rule: {subject} does worse here"
    elif lenient > 0 and (fp > 0 or dice < 0):
        verdict = "recall under the lenient rule only: over-segmentation (more FPs or lower object Dice)"
    elif lenient > 0:
        verdict = "recall gain under the lenient rule only, not confirmed under the strict rule: not resolved"
    else:
        verdict = "not resolved (the strict-rule CI spans 0)"
    groups = [f"{name} lesions: strict avg recall {_fmt(g['avg_recall_strict'])}, object Dice {_fmt(g['obj_dice'])}"
              for name, g in (entry.get("size_groups") or {}).items() if resolved(g["avg_recall_strict"])]
    by_size = f" By size, resolved under the strict rule: {'; '.join(groups)}." if groups else ""
    note = "" if entry["n_seeds"] > 1 else " One seed: the interval covers the hold-out cases, not training luck."
    return f"{head}: {numbers}: {verdict}.{by_size}{note}"


def build_verdict(configs: dict[str, dict[str, Any]], pairs: list[tuple[str, int, str, str]], *,
                  cutoffs_mm: list[float], group_names: list[str], strict_name: str, n_boot: int,
                  seed: int, kind: str = "iw") -> dict[str, Any]:
    """``configs``: the summary's configurations (label -> loss, iw, params, seed, records paths);
    ``pairs``: ``(group, seed, reference label, tested label)``: :func:`study.stages.holdout.iw_pairs` (kind ``iw``:
    iw vs plain of each loss) or :func:`study.stages.holdout.baseline_pairs` (kind ``baseline``: each configuration
    vs the study's baseline)."""
    from trainables.metrics.summary import restrict_to_size

    by_loss: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for loss, _seed, plain, iw in pairs:
        by_loss[loss].append((plain, iw))
    cache: dict[tuple[str, str], Any] = {}

    def records(label: str, rule: str):
        if (label, rule) not in cache:
            cache[(label, rule)] = load_records(configs[label]["records"][rule])
        return cache[(label, rule)]

    bounds = [float("-inf"), *cutoffs_mm, float("inf")] if cutoffs_mm else []
    entries = []
    for loss, loss_pairs in by_loss.items():
        loss_pairs.sort(key=lambda p: configs[p[0]]["seed"])
        entry: dict[str, Any] = {
            "loss": loss, "kind": kind,
            "plain": loss_pairs[0][0].rsplit("/", 1)[0], "iw": loss_pairs[0][1].rsplit("/", 1)[0],
            "seeds": [configs[p]["seed"] for p, _ in loss_pairs], "n_seeds": len(loss_pairs),
            "pairs": [list(p) for p in loss_pairs],
            "metrics": {name: hierarchical_bootstrap([(records(p, rule), records(i, rule)) for p, i in loss_pairs],
                                                     metric=metric, n_boot=n_boot, seed=seed)
                        for name, (rule, metric) in METRICS.items()},
            "size_groups": {},
        }
        for g, name in enumerate(group_names):
            lo, hi = bounds[g], bounds[g + 1]
            entry["size_groups"][name] = {
                "bounds_mm": [None if lo == float("-inf") else lo, None if hi == float("inf") else hi],
                **{m: hierarchical_bootstrap(
                    [(restrict_to_size(records(p, METRICS[m][0]), lo, hi),
                      restrict_to_size(records(i, METRICS[m][0]), lo, hi)) for p, i in loss_pairs],
                    metric=METRICS[m][1], n_boot=n_boot, seed=seed) for m in GROUP_METRICS},
            }
        entry["resolved"] = {name: resolved(d) for name, d in entry["metrics"].items()}
        entry["sentence"] = sentence(entry, strict_name)
        entries.append(entry)
    widths = [(d["ci_high"] - d["ci_low"]) / 2 for e in entries for key in ("avg_recall", "avg_recall_strict")
              if (d := e["metrics"][key])["ci_low"] is not None]
    return {"entries": entries, "kind": kind, "n_boot": n_boot, "seed": seed, "ci": 0.95,
            "ci_half_width_avg_recall": sum(widths) / len(widths) if widths else None,
            "method": "hierarchical bootstrap: seeds with replacement, then hold-out cases with replacement "
                      "within each drawn seed, same cases for both arms; percentile 95 % CI"}

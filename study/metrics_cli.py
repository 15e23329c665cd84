"""``study metrics``: summaries of per-object records files (the authors' format or ours).

    study metrics PATH [--protocol luna16|paper2020] [--json] [--n-boot N] [--seed S]

PATH is a records ``.json`` or a folder searched recursively for ``*.json`` (one row per file, sorted by path).
A malformed file stops the command with ``error: <file>: <what is wrong>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from study.tables import fmt, text_table
from trainables.errors import RecordsError

_PROTOCOLS = ("luna16", "paper2020")
_JSON_KEYS = (
    "protocol",
    "n_images",
    "n_lesions",
    "avg_recall",
    "avg_recall_std",
    "avg_recall_ci_low",
    "avg_recall_ci_high",
    "obj_dice",
    "obj_dice_std",
    "fp_per_image",
    "pred_positive_fraction",
    "recall_at",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "metrics",
        help="detection summaries (avg recall, object Dice, FP/image) of records files",
        description="Summaries of per-object records: a records .json (the authors' prc_records.json or ours) "
        "or a folder of them (one row per file).",
    )
    p.add_argument("path", type=Path, metavar="PATH", help="records .json file, or a folder of *.json files")
    p.add_argument(
        "--protocol",
        choices=_PROTOCOLS,
        default="luna16",
        help="luna16 (default: 7 FP rates, all images, bootstrap CI) or paper2020 (Table 2 exactly)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line and file instead of a table")
    p.add_argument("--n-boot", type=int, default=1000, help="luna16 bootstrap replicates (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="luna16 bootstrap seed (default 0)")
    p.set_defaults(func=run_metrics)


def _files(path: Path) -> list[tuple[str, Path]]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.json") if p.is_file())
        if not files:
            raise RecordsError(f"{path}: no *.json records files in this folder")
        return [(str(p.relative_to(path)), p) for p in files]
    if not path.exists():
        raise RecordsError(f"{path}: no such file or folder")
    return [(path.name, path)]


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats -> null, float dict keys -> strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _table(rows: list[tuple[str, dict]], protocol: str) -> str:
    head = ["file", "images", "lesions", "avg recall", "± std"]
    if protocol == "luna16":
        head.append("95% CI")
    head += ["obj DSC", "± std", "FP/img", "pos frac"]
    lines = [head]
    for name, s in rows:
        row = [
            name,
            str(s["n_images"]),
            str(s["n_lesions"]),
            fmt(s["avg_recall"]),
            fmt(s["avg_recall_std"]),
        ]
        if protocol == "luna16":
            lo, hi = s.get("avg_recall_ci_low"), s.get("avg_recall_ci_high")
            row.append("-" if lo is None else f"[{lo:.3f}, {hi:.3f}]")
        row += [
            fmt(s["obj_dice"]),
            fmt(s["obj_dice_std"]),
            fmt(s["fp_per_image"], 2),
            "-" if s["pred_positive_fraction"] is None else f"{s['pred_positive_fraction']:.2e}",
        ]
        lines.append(row)
    return text_table(lines, right_from=1)


def run_metrics(args: argparse.Namespace) -> int:
    from trainables.metrics import load_records, summarize

    if args.n_boot < 0:
        raise RecordsError(f"--n-boot must be >= 0, got {args.n_boot}")
    rows = []
    for name, file in _files(args.path):
        recordset = load_records(file)
        if not recordset:
            raise RecordsError(f"{file}: no cases in this records file")
        summary = summarize(recordset, args.protocol, n_boot=args.n_boot, seed=args.seed)
        if args.json:
            print(json.dumps(_clean({"file": name, **{k: summary.get(k) for k in _JSON_KEYS}})), flush=True)
        rows.append((name, summary))
    if not args.json:
        print(
            f"protocol: {args.protocol}"
            + (
                f" (bootstrap n={args.n_boot}, seed={args.seed})"
                if args.protocol == "luna16"
                else " (50 subsamples of 80 %, seed 42)"
            )
        )
        print(_table(rows, args.protocol))
    return 0

"""``study metrics`` and ``study compare``: the command line of the metric layer.

    study metrics PATH [--protocol NAME] [--json] [--n-boot N] [--seed S]
    study compare A B [--rule any|strict] [--json] [--n-boot N] [--seed S]

``metrics``: summaries of per-object records files (the authors' format or ours). PATH is a records ``.json``
or a folder searched recursively for ``*.json`` (one row per file, sorted by path). The protocols, their help
lines, which of them take ``--n-boot`` / ``--seed`` and which report a CI come from the registry
:data:`trainables.metrics.summary.PROTOCOLS` (one record per protocol).
``compare``: B − A with hierarchical-bootstrap CIs (:func:`compare_records`), the study's verdict test.

A malformed file stops the command with ``error: <file>: <what is wrong>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from study.report.tables import fmt, text_table
from trainables.errors import RecordsError

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


def _takers(protocols: dict, option: str) -> str:
    """``luna16`` / ``a or b``: the protocols whose record takes ``option``."""
    return " or ".join(name for name, record in protocols.items() if option in record.options) or "no protocol"


def register(subparsers: argparse._SubParsersAction) -> None:
    from trainables.metrics.summary import DEFAULT_PROTOCOL, PROTOCOLS

    p = subparsers.add_parser(
        "metrics",
        help="detection summaries (avg recall, object Dice, FP/image) of records files",
        description="Summaries of per-object records: a records .json (the authors' prc_records.json or ours) "
        "or a folder of them (one row per file).",
    )
    p.add_argument("path", type=Path, metavar="PATH",
                   help="records .json file, or a folder of *.json files; in a study folder (e.g. "
                   "studies/NAME/holdout/) its records_<rule>.json files, named by configuration, with the "
                   "study's bootstrap settings")
    p.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default=DEFAULT_PROTOCOL,
        help="; ".join(
            f"{name}{' (default)' if name == DEFAULT_PROTOCOL else ''}: {record.doc}"
            for name, record in PROTOCOLS.items()
        ).replace("%", "%%"),
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line and file instead of a table")
    p.add_argument("--n-boot", type=int, default=None,
                   help=f"{_takers(PROTOCOLS, 'n_boot')} bootstrap replicates (default: the study's "
                   "evaluation.n_boot for a study's records, else 1000)")
    p.add_argument("--seed", type=int, default=None, help=f"{_takers(PROTOCOLS, 'seed')} bootstrap seed (default: "
                   "the study's evaluation.seed for a study's records, else 0)")
    p.set_defaults(func=run_metrics)

    p = subparsers.add_parser(
        "compare",
        help="B − A with hierarchical-bootstrap CIs (avg recall, object Dice, FP/image), the study's verdict test",
        description="Differences B − A of two configurations on the same cases: avg recall (luna16), object "
        "Dice and FP/image, each with a 95 % CI from a hierarchical bootstrap (seeds with replacement, then "
        "cases within each seed). A and B are records files, or folders holding one records file per seed "
        "(a study's holdout/<configuration>/, whose s<seed>/ subfolders are paired by name).",
    )
    p.add_argument("a", type=Path, metavar="A", help="records file or folder (the reference, e.g. plain)")
    p.add_argument("b", type=Path, metavar="B", help="records file or folder (e.g. iw)")
    p.add_argument("--rule", choices=("any", "strict"), default="any",
                   help="in folders, compare records_<rule>.json (default any; strict = the study's strict rule)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.add_argument("--n-boot", type=int, default=None,
                   help="bootstrap replicates (default: the study's evaluation.n_boot for a study's records, else 1000)")
    p.add_argument("--seed", type=int, default=None,
                   help="bootstrap seed (default: the study's evaluation.seed for a study's records, else 0)")
    p.set_defaults(func=run_compare)


class StudyRecords:
    """The study a records path lies in (a folder with ``study.yaml`` and ``state.json`` above it): its
    bootstrap settings (``evaluation.n_boot`` / ``seed``) and the configuration label of each records file
    (from ``holdout/summary.json``)."""

    def __init__(self, root: Path):
        from study.layout import StudyDir, read_frozen_config

        self.root = root
        study = StudyDir(root)
        frozen = read_frozen_config(study)
        ev = frozen.get("evaluation") or {}
        self.n_boot, self.seed = int(ev.get("n_boot", 1000)), int(ev.get("seed", 0))
        self.labels: dict[str, tuple[str, str]] = {}  # the file's last path parts -> (label, rule)
        if study.summary_file.is_file():
            summary = study.read_summary()
            for key, suffix in (("configs", ""), ("fold_ensembles", " fold ensemble")):
                for label, c in (summary.get(key) or {}).items():
                    for rule, path in (c.get("records") or {}).items():
                        self.labels["/".join(Path(path).parts[-4:])] = (label + suffix, rule)

    @classmethod
    def of(cls, path: Path) -> StudyRecords | None:
        for folder in [path.resolve(), *path.resolve().parents]:
            if (folder / "study.yaml").is_file() and (folder / "state.json").is_file():
                return cls(folder)
        return None

    def name(self, file: Path) -> str | None:
        """``iw-dice/s0 (any)``: the configuration and hit rule of a records file of the study."""
        hit = self.labels.get("/".join(file.resolve().parts[-4:]))
        return None if hit is None else f"{hit[0]} ({hit[1].replace('_', ', ')})"


def _files(path: Path, study: StudyRecords | None = None) -> list[tuple[str, Path]]:
    """(row name, file): a file, or a folder's records files. In a folder with ``records_<rule>.json``
    files below it (a study's hold-out layout) only those, so that a study's ``summary.json`` is not
    mistaken for records; a study's files are named by configuration and rule."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("records_*.json") if p.is_file())
        if not files:
            files = sorted(p for p in path.rglob("*.json") if p.is_file())
        if not files:
            raise RecordsError(f"{path}: no *.json records files in this folder")
        return [((study.name(p) if study else None) or str(p.relative_to(path)), p) for p in files]
    if not path.exists():
        raise RecordsError(f"{path}: no such file or folder")
    return [((study.name(path) if study else None) or path.name, path)]


def bootstrap_settings(args: argparse.Namespace, study: StudyRecords | None) -> tuple[int, int, str]:
    """``(n_boot, seed, where from)``: the options given, else the study's, else 1000 and 0."""
    n_boot = args.n_boot if args.n_boot is not None else study.n_boot if study else 1000
    seed = args.seed if args.seed is not None else study.seed if study else 0
    if study is not None and (args.n_boot is None or args.seed is None):
        source = f"the study's evaluation settings ({study.root / 'study.yaml'})"
    else:
        source = "as given" if args.n_boot is not None or args.seed is not None else "the defaults"
    return n_boot, seed, source


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats -> null, float dict keys -> strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _table(rows: list[tuple[str, dict]], with_ci: bool) -> str:
    head = ["records", "images", "lesions", "avg recall", "± std"]
    if with_ci:
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
        if with_ci:
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
    from trainables.metrics.summary import get_protocol

    record = get_protocol(args.protocol)
    study = StudyRecords.of(args.path) if args.path.exists() else None
    n_boot, seed, source = bootstrap_settings(args, study)
    if n_boot < 0:
        raise RecordsError(f"--n-boot must be >= 0, got {n_boot}")
    rows = []
    for name, file in _files(args.path, study):
        recordset = load_records(file)
        if not recordset:
            raise RecordsError(f"{file}: no cases in this records file")
        summary = summarize(recordset, args.protocol, n_boot=n_boot, seed=seed)
        if args.json:
            print(json.dumps(_clean({"file": name, "path": str(file), **{k: summary.get(k) for k in _JSON_KEYS}})),
                  flush=True)
        rows.append((name, summary))
    if not args.json:
        print(f"protocol: {record.name} ({record.describe_resampling(n_boot=n_boot, seed=seed)})")
        if study is not None:
            print(f"bootstrap settings: {source}")
        print(_table(rows, record.reports_ci))
    return 0


def _seed_files(path: Path, rule: str) -> dict[str, Path]:
    """Relative key -> records file: a file is one seed; a folder holds ``records_<rule>.json`` per seed."""
    if path.is_file():
        return {"": path}
    if not path.exists():
        raise RecordsError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob(f"records_{rule}.json") if p.is_file())
    if not files:
        raise RecordsError(f"{path}: no records_{rule}.json below this folder")
    return {str(p.parent.relative_to(path)): p for p in files}


def compare_records(a: Path, b: Path, *, rule: str = "any", n_boot: int = 1000, seed: int = 0) -> dict:
    """The hierarchical-bootstrap differences B − A (see ``study compare --help``); RecordsError names both
    paths when they cannot be compared (different cases, hit rules or seeds)."""
    from trainables.metrics.bootstrap import VERDICT_METRICS, hierarchical_bootstrap
    from trainables.metrics.io import read_records

    fa, fb = _seed_files(a, rule), _seed_files(b, rule)
    same = {Path(f).resolve() for f in fa.values()} & {Path(f).resolve() for f in fb.values()}
    if same:  # B − A of one set of records is 0 by construction: almost certainly a typo
        raise RecordsError(f"{a} and {b} are the same records ({', '.join(sorted(map(str, same)))}): give the "
                           "reference as A and the configuration to test as B")
    if len(fa) == len(fb) == 1:
        keys = [(next(iter(fa)), next(iter(fb)))]
    elif set(fa) == set(fb):
        keys = [(k, k) for k in sorted(fa)]
    else:
        raise RecordsError(f"{a} and {b} hold different seeds: {sorted(fa)} vs {sorted(fb)}")
    pairs = []
    for ka, kb in keys:
        (ra, ma), (rb, mb) = read_records(fa[ka]), read_records(fb[kb])
        if set(ra) != set(rb):
            raise RecordsError(f"{fa[ka]} and {fb[kb]} cover different cases ({len(set(ra) ^ set(rb))} differ): "
                               "compare records of the same hold-out set")
        if ma.get("hit_rule") != mb.get("hit_rule"):
            raise RecordsError(f"{fa[ka]} (hit rule {ma.get('hit_rule')}) and {fb[kb]} (hit rule "
                               f"{mb.get('hit_rule')}) were made under different hit rules")
        pairs.append((ra, rb))
    out = {"a": str(a), "b": str(b), "rule": rule, "n_seeds": len(pairs), "n_cases": len(pairs[0][0]),
           "n_boot": n_boot, "seed": seed}
    for metric in VERDICT_METRICS:
        r = hierarchical_bootstrap(pairs, metric=metric, n_boot=n_boot, seed=seed)
        out[metric] = {k: r[k] for k in ("delta", "ci_low", "ci_high", "per_seed")}
    return out


def run_compare(args: argparse.Namespace) -> int:
    study = StudyRecords.of(args.a) if args.a.exists() else None
    n_boot, seed, _source = bootstrap_settings(args, study)
    if n_boot < 10:
        raise RecordsError(f"--n-boot must be >= 10, got {n_boot}")
    res = compare_records(args.a, args.b, rule=args.rule, n_boot=n_boot, seed=seed)
    if args.json:
        print(json.dumps(_clean(res), indent=2))
        return 0
    print(f"B − A: {res['b']} − {res['a']}  (rule {res['rule']}, {res['n_seeds']} seed(s), {res['n_cases']} cases, "
          f"hierarchical bootstrap n={res['n_boot']}, seed {res['seed']})")
    rows = [("metric", "delta", "95% CI", "per seed")]
    for metric in ("avg_recall", "obj_dice", "fp_per_image"):
        d = res[metric]
        ci = "-" if d["ci_low"] is None else f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        rows.append((metric, "-" if d["delta"] is None else f"{d['delta']:+.3f}", ci,
                     ", ".join("-" if x is None else f"{x:+.3f}" for x in d["per_seed"])))
    print(text_table(rows))
    return 0

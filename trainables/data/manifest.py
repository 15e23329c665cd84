"""The dataset manifest: a CSV with one row per case.

Columns ``case_id,image,mask,split`` and an optional ``roi`` column (an organ / lung mask used by the presets);
paths are relative to the manifest's folder (absolute paths are kept). ``split`` is one of :data:`SPLITS`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trainables.errors import DataError
from trainables.io_utils import why_unreadable

SPLITS: tuple[str, ...] = ("train", "val", "holdout")
REQUIRED_COLUMNS = ("case_id", "image", "mask", "split")
OPTIONAL_COLUMNS = ("roi",)

# a case id becomes a folder name: letters, digits, dot, dash, underscore; not starting with a dot
_CASE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ManifestRow:
    """One case of a manifest, paths resolved to absolute paths."""

    case_id: str
    image: Path
    mask: Path
    split: str
    roi: Path | None = None


def check_case_id(case_id: str, *, where: str) -> str:
    """Raise unless ``case_id`` is usable as a folder name."""
    if not _CASE_ID.match(case_id):
        raise DataError(
            f"{where}: case id {case_id!r} is not a valid name (letters, digits, '.', '-', '_'; "
            "not starting with '.')"
        )
    return case_id


def check_splits(cases: Iterable[tuple[str, str]], *, where: str, required: Iterable[str] = SPLITS) -> None:
    """``cases``: (case_id, split) pairs. Raise on an unknown split or a required split without cases."""
    counts = dict.fromkeys(SPLITS, 0)
    for case_id, split in cases:
        if split not in counts:
            raise DataError(
                f"{where}: case {case_id} has split {split!r}; expected one of {', '.join(SPLITS)}"
            )
        counts[split] += 1
    empty = [s for s in required if counts[s] == 0]
    if empty:
        summary = ", ".join(f"{s} {n}" for s, n in counts.items())
        raise DataError(
            f"{where}: split {' and '.join(repr(s) for s in empty)} has no case ({summary}); "
            "every split must hold at least one case"
        )


def read_manifest(
    path: str | Path, *, require_roi: bool = False, required_splits: Iterable[str] = SPLITS
) -> list[ManifestRow]:
    """Read and validate a manifest CSV; rows keep the file's order.

    Raises :class:`DataError` naming the manifest (and the case) for: a missing file, missing columns, an empty
    or invalid case id, duplicate case ids, an unknown or empty split, a required split with no case, an empty
    path, and a missing ROI when ``require_roi``. File existence is checked later, when headers are read.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"manifest {why_unreadable(path)}: {path}")
    base = path.resolve().parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            raw_rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"manifest {path} cannot be read: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"manifest {path}: missing column(s) {', '.join(missing)}; expected columns "
            f"{','.join(REQUIRED_COLUMNS)} (+ optional roi), found {','.join(columns) or 'none'}"
        )
    if require_roi and "roi" not in columns:
        raise DataError(
            f"manifest {path}: this preset needs an ROI mask per case, but there is no 'roi' column"
        )
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    for line_no, raw in enumerate(raw_rows, start=2):
        rec = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(rec.values()):
            continue  # blank line
        where = f"manifest {path}, line {line_no}"
        case_id = rec.get("case_id", "")
        if not case_id:
            raise DataError(f"{where}: empty case_id")
        check_case_id(case_id, where=where)
        if case_id in seen:
            raise DataError(f"{where}: duplicate case id {case_id} (first on line {seen[case_id]})")
        seen[case_id] = line_no
        split = rec.get("split", "")
        if not split:
            raise DataError(
                f"{where}: case {case_id} has an empty split; expected one of {', '.join(SPLITS)}"
            )
        if split not in SPLITS:
            raise DataError(
                f"{where}: case {case_id} has split {split!r}; expected one of {', '.join(SPLITS)}"
            )
        paths = {}
        for col in ("image", "mask"):
            if not rec.get(col):
                raise DataError(f"{where}: case {case_id} has an empty {col} path")
            paths[col] = _resolve(base, rec[col])
        roi = rec.get("roi", "")
        if require_roi and not roi:
            raise DataError(f"{where}: case {case_id} has no ROI mask, which this preset needs (column roi)")
        rows.append(
            ManifestRow(
                case_id=case_id,
                image=paths["image"],
                mask=paths["mask"],
                split=split,
                roi=_resolve(base, roi) if roi else None,
            )
        )
    if not rows:
        raise DataError(f"manifest {path} has no case")
    check_splits(((r.case_id, r.split) for r in rows), where=f"manifest {path}", required=required_splits)
    return rows


def write_manifest(path: str | Path, rows: Iterable[ManifestRow]) -> Path:
    """Write a manifest with paths relative to its folder where possible (``roi`` column only if used)."""
    path = Path(path)
    rows = list(rows)
    base = path.resolve().parent
    with_roi = any(r.roi is not None for r in rows)
    columns = list(REQUIRED_COLUMNS) + (["roi"] if with_roi else [])
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            rec = [r.case_id, _relative(base, r.image), _relative(base, r.mask), r.split]
            if with_roi:
                rec.append(_relative(base, r.roi) if r.roi is not None else "")
            writer.writerow(rec)
    return path


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _relative(base: Path, p: Path) -> str:
    try:
        return Path(p).resolve().relative_to(base).as_posix()
    except ValueError:
        return str(Path(p).resolve())

"""Reading and writing per-object records (JSON).

Two formats are read:

* the authors' ``prc_records.json``: ``{case_id: [record, ...], ...}``;
* ours, a superset that also carries the diagnostics and free-form metadata::

      {"format": "iw-records", "version": 1,
       "meta": {...},
       "cases": {case_id: {"n_voxels": int | null, "n_pred_positive": int | null, "records": [record, ...]}}}

Both use JSON's non-standard ``Infinity`` / ``-Infinity`` (Python's ``json`` default) for the infinite
confidences. NaN is rejected in both directions. Writes are atomic (:func:`trainables.io_utils.write_text_atomic`).
"""

from __future__ import annotations

import json
import math
import os
from numbers import Real
from pathlib import Path
from typing import Any

from trainables.errors import RecordsError
from trainables.io_utils import json_default, write_text_atomic
from trainables.metrics.records import REQUIRED_FIELDS, CaseRecords, RecordSet

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "save_records",
    "load_records",
    "read_records",
    "validate_records",
]

FORMAT_NAME = "iw-records"
FORMAT_VERSION = 1
_NUMERIC_FIELDS = ("diameter", "hit_dice", "hit_logit", "self_logit")


def _check_record(rec: Any, where: str) -> None:
    if not isinstance(rec, dict):
        raise RecordsError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in rec]
    if missing:
        raise RecordsError(f"{where}: missing field(s) {', '.join(missing)}")
    if not isinstance(rec["is_tum"], bool):
        raise RecordsError(f"{where}: is_tum must be true or false, got {rec['is_tum']!r}")
    for name in _NUMERIC_FIELDS:
        value = rec[name]
        if isinstance(value, bool) or not isinstance(value, Real):
            raise RecordsError(f"{where}: {name} must be a number, got {value!r}")
        if math.isnan(value):
            raise RecordsError(f"{where}: {name} is NaN")
    if not 0.0 <= rec["hit_dice"] <= 1.0:
        raise RecordsError(f"{where}: hit_dice {rec['hit_dice']!r} is not a Dice score (must be in [0, 1])")
    if not 0.0 <= rec["diameter"] < math.inf:
        raise RecordsError(f"{where}: diameter {rec['diameter']!r} mm is not a size (must be finite and >= 0)")


def validate_records(recordset: RecordSet, source: str | os.PathLike = "<records>") -> None:
    """Raise :class:`RecordsError` (naming ``source``, the case and the record) if a record is malformed."""
    for case_id, case in recordset.items():
        if not isinstance(case, CaseRecords):
            raise RecordsError(f"{source}: case {case_id!r} is not a CaseRecords")
        for i, rec in enumerate(case.records):
            _check_record(rec, f"{source}: case {case_id!r}, record {i}")


def save_records(path: str | os.PathLike, recordset: RecordSet, meta: dict | None = None) -> None:
    """Write ``recordset`` in our format (atomically; parent folders are created).

    Args:
        path: destination ``.json``.
        recordset: case id -> :class:`CaseRecords`.
        meta: JSON-serialisable metadata kept under ``"meta"`` (e.g. the hit rule, the split, the run).
    """
    path = Path(path)
    validate_records(recordset, path)
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "meta": dict(meta or {}),
        "cases": {
            str(cid): {"n_voxels": c.n_voxels, "n_pred_positive": c.n_pred_positive, "records": c.records}
            for cid, c in recordset.items()
        },
    }
    write_text_atomic(path, json.dumps(doc, default=json_default, allow_nan=True))


def _optional_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecordsError(f"{where} must be a non-negative integer or null, got {value!r}")
    return value


def read_records(path: str | os.PathLike) -> tuple[RecordSet, dict]:
    """Read a records file in either format; returns ``(recordset, meta)`` (``meta`` is ``{}`` for the authors')."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise RecordsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RecordsError(f"{path}: is a folder, expected a records .json file") from None
    except json.JSONDecodeError as exc:
        raise RecordsError(
            f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise RecordsError(f"{path}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(doc, dict):
        raise RecordsError(
            f"{path}: expected a JSON object (case id -> list of records, or an {FORMAT_NAME} document), "
            f"got a {type(doc).__name__}"
        )
    recordset: RecordSet = {}
    meta: dict = {}
    if doc.get("format") == FORMAT_NAME:
        if doc.get("version") != FORMAT_VERSION:
            raise RecordsError(f"{path}: unsupported {FORMAT_NAME} version {doc.get('version')!r}")
        cases, meta = doc.get("cases"), doc.get("meta") or {}
        if not isinstance(cases, dict) or not isinstance(meta, dict):
            raise RecordsError(f"{path}: 'cases' and 'meta' must be JSON objects")
        for cid, case in cases.items():
            where = f"{path}: case {cid!r}"
            if not isinstance(case, dict) or not isinstance(case.get("records"), list):
                raise RecordsError(f"{where}: expected an object with a 'records' list")
            recordset[cid] = CaseRecords(
                records=case["records"],
                n_voxels=_optional_int(case.get("n_voxels"), f"{where}: n_voxels"),
                n_pred_positive=_optional_int(case.get("n_pred_positive"), f"{where}: n_pred_positive"),
            )
    else:
        for cid, recs in doc.items():
            if not isinstance(recs, list):
                raise RecordsError(
                    f"{path}: case {cid!r} must map to a list of records, got a {type(recs).__name__} "
                    f"(neither the authors' format nor {FORMAT_NAME})"
                )
            recordset[cid] = CaseRecords(records=recs)
    validate_records(recordset, path)
    return recordset, meta


def load_records(path: str | os.PathLike) -> RecordSet:
    """Records of a file in the authors' format or ours (see the module docstring).

    Raises:
        RecordsError: the file is missing, not JSON, not one of the two structures, a record lacks one of
            ``is_tum, diameter, hit_dice, hit_logit, self_logit``, or a number is NaN. The message names the file.
    """
    return read_records(path)[0]

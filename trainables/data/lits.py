"""LiTS: ``volume-N.nii`` / ``segmentation-N.nii`` (N = 0..130; also .nii.gz, anywhere below ``--raw``).

Segmentation labels: 0 background, 1 liver, 2 tumour. Liver ROI = label >= 1, tumour mask = label 2; then the
``lits`` preset (crop to the liver box + 5 voxels, clip [-300, 300] HU, -300 outside the liver, scale to [0, 1]).
Case ids are ``lits-NNN`` (zero-padded, so they sort by N).

Splits (docs/definitions.md §5): from a file (CSV with columns ``case_id,split`` or JSON ``{case_id: split}``; a case id may be
written ``lits-007``, ``volume-7`` or ``7``; volumes not listed are left out) or, by default, the authors' fixed
split (``config/assets/cross_val/lits_holdout.config``): Training Batch 1 = ids 0-27 holdout, ids 28-32 val (the
authors' 5 validation volumes), ids 33-130 train. The paper's "batch 1 / batch 2" split without validation is
``--splits`` with every id >= 28 as train.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.data.cache import Cache, LoadedCase, build_cache
from trainables.data.io import read_case_geometry, read_image, read_on_grid
from trainables.data.manifest import SPLITS
from trainables.errors import DataError

_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
_SEGMENTATION = "segmentation-{n}.nii"
LIVER_LABEL, TUMOUR_LABEL = 1, 2


def lits_case_id(n: int) -> str:
    return f"lits-{n:03d}"


def paper_split(n: int) -> str:
    """The authors' fixed split: 0-27 holdout, 28-32 val, 33-130 train."""
    if n <= 27:
        return "holdout"
    if n <= 32:
        return "val"
    return "train"


def _parse_id(key: str, *, where: str) -> int:
    m = re.fullmatch(r"(?:lits-|volume-)?0*(\d+)", str(key).strip())
    if not m:
        raise DataError(f"{where}: case id {key!r} is not a LiTS id (lits-NNN, volume-N or N)")
    return int(m.group(1))


def read_splits_file(path: str | Path) -> dict[int, str]:
    """LiTS id -> split from a CSV (case_id,split) or JSON ({case_id: split}) file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"splits file not found: {path}")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise DataError(f"splits file {path}: expected a JSON object {{case_id: split}}")
            items = list(raw.items())
        else:
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"case_id", "split"} <= {
                    c.strip() for c in reader.fieldnames
                }:
                    raise DataError(f"splits file {path}: expected columns case_id,split")
                items = [((r.get("case_id") or "").strip(), (r.get("split") or "").strip()) for r in reader]
    except (OSError, ValueError, csv.Error) as exc:
        raise DataError(f"splits file {path} cannot be read ({exc})") from None
    out: dict[int, str] = {}
    for key, split in items:
        n = _parse_id(key, where=f"splits file {path}")
        if split not in SPLITS:
            raise DataError(
                f"splits file {path}: case {key} has split {split!r}; expected one of {', '.join(SPLITS)}"
            )
        if n in out:
            raise DataError(f"splits file {path}: duplicate case id {key}")
        out[n] = split
    return out


@dataclass
class LitsCaseSource:
    """One LiTS volume and its segmentation."""

    case_id: str
    split: str
    image: Path
    segmentation: Path

    @property
    def sources(self) -> dict[str, str | None]:
        return {"image": str(self.image), "mask": str(self.segmentation), "roi": str(self.segmentation)}

    def preflight(self) -> None:
        read_case_geometry(self.image, {"segmentation": self.segmentation}, case_id=self.case_id)

    def load(self) -> LoadedCase:
        image, geom = read_image(self.image, case_id=self.case_id, role="image")
        seg = read_on_grid(
            self.segmentation, geom, case_id=self.case_id, ref_path=self.image, role="segmentation"
        )
        values = np.unique(seg)
        bad = values[~np.isin(values, (0, LIVER_LABEL, TUMOUR_LABEL))]
        if bad.size:
            raise DataError(
                f"case {self.case_id}: segmentation file {self.segmentation} has label(s) "
                f"{', '.join(f'{v:g}' for v in bad[:8])}; expected 0 (background), 1 (liver), 2 (tumour)"
            )
        roi = (seg >= LIVER_LABEL).astype(np.uint8)
        if not roi.any():
            raise DataError(
                f"case {self.case_id}: segmentation file {self.segmentation} has no liver (label >= 1)"
            )
        mask = (seg == TUMOUR_LABEL).astype(np.uint8)
        return LoadedCase(image=image, mask=mask, roi=roi, geometry=geom)


def find_lits_cases(raw: str | Path) -> dict[int, tuple[Path, Path]]:
    """LiTS id -> (volume, segmentation) for every ``volume-N.nii[.gz]`` below ``raw``."""
    raw = Path(raw).expanduser().resolve()
    if not raw.is_dir():
        raise DataError(f"LiTS folder not found: {raw}")
    volumes: dict[int, Path] = {}
    segs: dict[int, Path] = {}
    for p in sorted(raw.rglob("*.nii*")):
        m = _VOLUME.match(p.name)
        if m:
            n = int(m.group(1))
            if n in volumes:
                raise DataError(f"case {lits_case_id(n)}: two volume files, {volumes[n]} and {p}")
            volumes[n] = p
            continue
        m = re.match(r"^segmentation-(\d+)\.nii(\.gz)?$", p.name)
        if m:
            n = int(m.group(1))
            if n in segs:
                raise DataError(f"case {lits_case_id(n)}: two segmentation files, {segs[n]} and {p}")
            segs[n] = p
    if not volumes:
        raise DataError(f"no volume-N.nii file below {raw} (expected the LiTS layout)")
    out = {}
    for n, v in sorted(volumes.items()):
        if n not in segs:
            raise DataError(
                f"case {lits_case_id(n)}: segmentation file {v.parent / _SEGMENTATION.format(n=n)} not "
                f"found (volume {v})"
            )
        out[n] = (v, segs[n])
    return out


def prepare_lits(
    raw: str | Path,
    out: str | Path,
    *,
    splits: str | Path | None = None,
    progress: bool = True,
    required_splits: Sequence[str] | None = None,
    keep_partial: bool = False,
    workers: int = 1,
    image_dtype: str = "float32",
) -> Cache:
    """Prepare the LiTS layout ``raw`` into the cache ``out`` (module docstring); returns the cache; ``workers``:
    cases prepared at once, each in a process of its own.

    ``required_splits``: splits that must have a case (default: all three with a splits file, else those the
    paper's split gives to the volumes present).
    """
    cases = find_lits_cases(raw)
    if splits is not None:
        table = read_splits_file(splits)
        unknown = sorted(set(table) - set(cases))
        if unknown:
            raise DataError(
                f"splits file {splits}: case(s) {', '.join(lits_case_id(n) for n in unknown[:5])} have "
                f"no volume in {raw}"
            )
        left_out = sorted(set(cases) - set(table))
        if left_out and progress:
            import sys

            print(f"{len(left_out)} volume(s) not in {splits} are left out", file=sys.stderr)
        chosen = {n: table[n] for n in cases if n in table}
        required = SPLITS if required_splits is None else required_splits
    else:
        chosen = {n: paper_split(n) for n in cases}
        required = sorted(set(chosen.values())) if required_splits is None else required_splits
    sources = [
        LitsCaseSource(case_id=lits_case_id(n), split=split, image=cases[n][0], segmentation=cases[n][1])
        for n, split in sorted(chosen.items())
    ]
    return build_cache(
        sources,
        out,
        preset="lits",
        source=str(Path(raw).expanduser().resolve()),
        progress=progress,
        required_splits=required,
        keep_partial=keep_partial,
        workers=workers,
        image_dtype=image_dtype,
    )

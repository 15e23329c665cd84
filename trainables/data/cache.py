"""The preprocessed-data cache: writing it (``prepare``) and reading it at train time (:class:`Cache`).

Layout (one folder per case; arrays are ``[z, y, x]``)::

    CACHE/cache.json                  {"version": 2, "preset": ..., "source": ..., "image_dtype": "float32",
                                       "cases": [{"case_id", "split"}]}
    CACHE/cases/<case_id>/image.npy   float32 (or float16: ``image_dtype``) in [0, 1], memory-mapped at train time
    CACHE/cases/<case_id>/labels.npy  26-connected components of the whole (cropped) mask, 0 = background, in the
                                      smallest unsigned type that holds the case's count (uint8 / uint16 / uint32)
    CACHE/cases/<case_id>/meta.json   case_id, split, spacing (z, y, x) mm, shape, n_lesions, diameters_mm,
                                      lesion_sizes_vox, crop_box, preset, sources {image, mask, roi}, origin,
                                      direction, raw_range, image_min, mask_voxels_outside_roi, extra, image_dtype

The lesion mask is ``labels != 0``, derived when read (:meth:`Cache.array`), not stored twice. A version-1 cache
(written before: a ``mask.npy`` beside int32 labels, 9 bytes per voxel where version 2 takes 5, or 3 with a
float16 image) still loads; new cases are never prepared into it.

A case is written into ``cases/.tmp-<case_id>-<pid>`` and renamed when complete, so a crash never leaves a half
case; a rerun skips the finished cases and removes leftover ``.tmp-*`` folders. ``cache.json`` is rewritten
atomically at the end of a successful run. Bad input (a :class:`DataError`) removes the cases this run wrote, so
the cache is left as it was (unless ``keep_partial``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trainables.data.io import (
    Geometry,
    as_binary,
    read_case_geometry,
    read_image,
    read_on_grid,
    write_json_atomic,
)
from trainables.data.manifest import SPLITS, check_splits, read_manifest
from trainables.data.preprocess import apply_preset, get_preset, lesion_stats
from trainables.errors import DataError

CACHE_VERSION = 2
#: the files of a case, by cache version (version 1 stored the mask and int32 labels)
VERSION_FILES = {1: ("image.npy", "mask.npy", "labels.npy", "meta.json"), 2: ("image.npy", "labels.npy", "meta.json")}
CASE_FILES = VERSION_FILES[CACHE_VERSION]
#: ``workers`` value that prepares one case per Ray task on the connected Ray cluster (``--address``)
RAY_TASKS = -1
#: ``--image-dtype``: how the preprocessed image is stored
IMAGE_DTYPES = ("float32", "float16")


def label_dtype(n_labels: int) -> np.dtype:
    """The smallest unsigned integer type that holds the labels ``0..n_labels``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_labels <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise DataError(f"{n_labels} connected components in one case: more than a uint32 label holds")
_TMP_PREFIX = ".tmp-"


# ---------------------------------------------------------------------------------------------------------------
# reading


@dataclass
class Case:
    """One cached case. image: float32 (or float16) [z, y, x] in [0, 1] (memory-mapped by default); mask: uint8
    0/1; labels: unsigned 26-connected lesion labels 1..n_lesions (0 = background); meta: the case's meta.json."""

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    meta: dict = field(repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (z, y, x) in mm."""
        return tuple(float(s) for s in self.meta["spacing"])


class Cache:
    """Read access to a prepared cache folder (see the module docstring for the layout).

    Opening checks that ``cache.json`` exists and that every listed case folder is complete; errors name the path.
    Picklable (it pickles as its root), so process workers can reopen it.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        index_path = self.root / "cache.json"
        if not index_path.is_file():
            raise DataError(
                f"no data cache at {self.root}: {index_path} is missing (prepare one with "
                "`study data prepare`, `study data phantom` + prepare, `study data luna16` or "
                "`study data lits`)"
            )
        try:
            index = json.loads(index_path.read_text())
            version = index["version"]
            cases = index["cases"]
            self._splits: dict[str, str] = {c["case_id"]: c["split"] for c in cases}
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"data cache index {index_path} is malformed ({exc!r})") from None
        if version not in VERSION_FILES:
            raise DataError(
                f"data cache {index_path} has version {version}; this code reads versions "
                f"{', '.join(map(str, VERSION_FILES))} (prepare it again)"
            )
        self.version: int = int(version)
        self.preset: str = index.get("preset", "none")
        self.source: str | None = index.get("source")
        self.image_dtype: str = index.get("image_dtype", "float32")
        for case_id in self._splits:
            folder = self.case_dir(case_id)
            missing = [f for f in VERSION_FILES[self.version] if not (folder / f).is_file()]
            if missing:
                raise DataError(
                    f"data cache {self.root} is incomplete: case {case_id} lacks "
                    f"{', '.join(missing)} in {folder} (run the prepare command again)"
                )
        self._meta: dict[str, dict] = {}

    def __reduce__(self):
        return (Cache, (str(self.root),))

    def __repr__(self) -> str:
        counts = {s: sum(1 for v in self._splits.values() if v == s) for s in SPLITS}
        return f"Cache({str(self.root)!r}, preset={self.preset!r}, cases={counts})"

    def __len__(self) -> int:
        return len(self._splits)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._splits

    def case_dir(self, case_id: str) -> Path:
        return self.root / "cases" / case_id

    def case_ids(self, splits: str | Sequence[str] | None = None) -> list[str]:
        """Sorted case ids of the given split(s) (all cases when None); raise if a split is unknown or empty."""
        if splits is None:
            return sorted(self._splits)
        wanted = (splits,) if isinstance(splits, str) else tuple(splits)
        for s in wanted:
            if s not in SPLITS:
                raise DataError(f"unknown split {s!r}; expected one of {', '.join(SPLITS)}")
        ids = sorted(c for c, s in self._splits.items() if s in wanted)
        if not ids:
            raise DataError(f"data cache {self.root} has no case in split {' + '.join(wanted)}")
        return ids

    def meta(self, case_id: str) -> dict:
        """The case's meta.json (read once, then kept)."""
        self._check_id(case_id)
        m = self._meta.get(case_id)
        if m is None:
            path = self.case_dir(case_id) / "meta.json"
            try:
                m = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(
                    f"data cache {self.root}: case {case_id}: cannot read {path} ({exc})"
                ) from None
            m["split"] = self._splits[case_id]  # cache.json is authoritative
            self._meta[case_id] = m
        return m

    def load(self, case_id: str, mmap: bool = True) -> Case:
        """Load a case; with ``mmap`` the arrays are read-only memory maps (nothing read until used)."""
        meta = self.meta(case_id)
        arrays = {name: self.array(case_id, name, mmap=mmap) for name in ("image", "mask", "labels")}
        return Case(case_id=case_id, meta=meta, **arrays)

    def array(self, case_id: str, name: str, mmap: bool = True) -> np.ndarray:
        """One array of a case: ``name`` in image, mask, labels (read-only memory map by default; the mask of a
        version-2 cache is derived from the labels: a read-only uint8 array in memory)."""
        self._check_id(case_id)
        if name not in ("image", "mask", "labels"):
            raise ValueError(f"unknown cached array {name!r}; expected image, mask or labels")
        if name == "mask" and self.version >= 2:
            mask = np.not_equal(self.array(case_id, "labels", mmap=mmap), 0).view(np.uint8)
            mask.setflags(write=False)
            return mask
        path = self.case_dir(case_id) / f"{name}.npy"
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"data cache {self.root}: case {case_id}: cannot read {path} ({exc})") from None

    def _check_id(self, case_id: str) -> None:
        if case_id not in self._splits:
            raise DataError(f"case {case_id} is not in the data cache {self.root}")


def cache_check(root: str) -> tuple[str, str | None]:
    """Whether the cache at ``root`` opens here: ``(this host's name, None)`` or ``(host, why not)``. Run as a Ray
    task on a trial node, it tells whether the workers see the cache the driver prepared or was given."""
    import socket

    try:
        cache = Cache(root)
        cache.array(cache.case_ids()[0], "labels")  # a case's file, not just the index
    except (DataError, OSError) as exc:
        return socket.gethostname(), str(exc)
    return socket.gethostname(), None


# ---------------------------------------------------------------------------------------------------------------
# sources: where a case's raw arrays come from


@dataclass
class LoadedCase:
    """Raw arrays of one case on one voxel grid. image: any numeric dtype [z, y, x]; mask, roi: uint8 0/1."""

    image: np.ndarray
    mask: np.ndarray
    roi: np.ndarray | None
    geometry: Geometry
    extra: dict = field(default_factory=dict)


class CaseSource(Protocol):
    """A case to prepare: ``preflight`` reads headers only (cheap), ``load`` reads and checks the voxels."""

    case_id: str
    split: str

    @property
    def sources(self) -> dict[str, str | None]: ...

    def preflight(self) -> None: ...

    def load(self) -> LoadedCase: ...


@dataclass
class FileCaseSource:
    """A case given by image / mask / optional ROI files (a manifest row)."""

    case_id: str
    split: str
    image: Path
    mask: Path
    roi: Path | None = None
    roi_required: bool = False

    @property
    def sources(self) -> dict[str, str | None]:
        return {"image": str(self.image), "mask": str(self.mask), "roi": str(self.roi) if self.roi else None}

    def preflight(self) -> None:
        if self.roi_required and self.roi is None:
            raise DataError(f"case {self.case_id}: no ROI mask given, but the preset needs one")
        read_case_geometry(self.image, {"mask": self.mask, "roi": self.roi}, case_id=self.case_id)

    def load(self) -> LoadedCase:
        image, geom = read_image(self.image, case_id=self.case_id, role="image")
        if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
            raise DataError(
                f"case {self.case_id}: image file {self.image} has voxel type {image.dtype}; "
                "expected a real scalar image"
            )
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            raise DataError(f"case {self.case_id}: image file {self.image} contains NaN or infinite values")
        mask = self._binary(self.mask, "mask", geom)
        roi = self._binary(self.roi, "roi", geom) if self.roi is not None else None
        return LoadedCase(image=image, mask=mask, roi=roi, geometry=geom)

    def _binary(self, path: Path, role: str, ref: Geometry) -> np.ndarray:
        arr = read_on_grid(path, ref, case_id=self.case_id, ref_path=self.image, role=role)
        return as_binary(arr, case_id=self.case_id, role=role, path=path)


# ---------------------------------------------------------------------------------------------------------------
# writing


def prepare_cache(
    manifest: str | Path,
    out: str | Path,
    *,
    preset: str = "none",
    progress: bool = True,
    required_splits: Sequence[str] = SPLITS,
    keep_partial: bool = False,
    workers: int = 1,
    image_dtype: str = "float32",
) -> Cache:
    """Preprocess every case of a manifest CSV into the cache folder ``out`` and return the opened cache.

    ``preset``: ``none`` | ``luna16`` | ``lits`` (see :mod:`trainables.data.preprocess`); ``luna16`` and
    ``lits`` need the manifest's ``roi`` column. Idempotent and resumable (finished cases are skipped).
    ``workers``: cases prepared at once, each in a process of its own (the same files as one at a time);
    :data:`RAY_TASKS`: one Ray task per case on the connected Ray cluster (``out`` on a shared filesystem).
    ``image_dtype``: ``float32`` or ``float16`` (half the image's bytes).
    """
    return build_cache(
        manifest_sources(manifest, preset=preset, required_splits=required_splits),
        out,
        preset=preset,
        source=str(Path(manifest).expanduser().resolve()),
        progress=progress,
        required_splits=required_splits,
        keep_partial=keep_partial,
        workers=workers,
        image_dtype=image_dtype,
    )


def manifest_sources(
    manifest: str | Path, *, preset: str = "none", required_splits: Sequence[str] = SPLITS
) -> list[FileCaseSource]:
    """The cases of a manifest CSV (validated by :func:`read_manifest`) as sources for ``preset``; their
    ``preflight()`` reads the image headers only."""
    p = get_preset(preset)
    rows = read_manifest(manifest, require_roi=p.roi_required, required_splits=required_splits)
    return [FileCaseSource(case_id=r.case_id, split=r.split, image=r.image, mask=r.mask, roi=r.roi,
                           roi_required=p.roi_required) for r in rows]


def build_cache(
    sources: Sequence[CaseSource],
    out: str | Path,
    *,
    preset: str,
    source: str,
    progress: bool = True,
    required_splits: Sequence[str] = SPLITS,
    keep_partial: bool = False,
    log: Callable[[str], None] | None = None,
    workers: int = 1,
    image_dtype: str = "float32",
) -> Cache:
    """Write ``sources`` into the cache ``out`` (the engine behind every preparer).

    Order: validate ids and splits → find finished cases → read the headers of the others (cheap) → process them,
    one at a time or on ``workers`` processes, each into a temporary folder renamed when complete → rewrite
    cache.json. The files do not depend on ``workers`` (each case is prepared by the same function alone). Nothing
    is written before every header passed; a case that fails while processing is named (with ``workers`` > 1 the
    others finish first and every failure is listed), and this run's cases are removed again (unless
    ``keep_partial``).
    """
    p = get_preset(preset)
    out = Path(out).expanduser().resolve()
    log = log or (_stderr if progress else _quiet)
    if image_dtype not in IMAGE_DTYPES:
        raise DataError(f"--image-dtype {image_dtype!r}: one of {', '.join(IMAGE_DTYPES)}")
    seen: set[str] = set()
    for s in sources:
        if s.case_id in seen:
            raise DataError(f"{source}: duplicate case id {s.case_id}")
        seen.add(s.case_id)
    if not sources:
        raise DataError(f"{source}: no case to prepare")
    check_splits(((s.case_id, s.split) for s in sources), where=source, required=required_splits)
    _check_out(out, preset=p.name, image_dtype=image_dtype)

    t0 = time.perf_counter()
    done = {s.case_id for s in sources if _finished(out, s, preset=p.name, image_dtype=image_dtype)}
    for s in sources:
        if s.case_id not in done:  # finished cases need not keep their raw files
            s.preflight()

    created_dirs = [d for d in (out, out / "cases") if not d.exists()]
    (out / "cases").mkdir(parents=True, exist_ok=True)
    for leftover in (out / "cases").glob(_TMP_PREFIX + "*"):
        log(f"removing an unfinished case folder left by an interrupted run: {leftover}")
        shutil.rmtree(leftover, ignore_errors=True)

    written: list[Path] = []
    n = len(sources)
    n_lesions = 0
    split_lesions = dict.fromkeys(SPLITS, 0)
    width = len(str(n))
    position = {s.case_id: i for i, s in enumerate(sources, start=1)}
    for s in sources:
        if s.case_id in done:
            meta_path = out / "cases" / s.case_id / "meta.json"
            meta = json.loads(meta_path.read_text())
            if meta.get("split") != s.split:
                meta["split"] = s.split
                write_json_atomic(meta_path, meta)
            n_lesions += int(meta["n_lesions"])
            split_lesions[s.split] += int(meta["n_lesions"])
            log(f"[{position[s.case_id]:>{width}}/{n}] {s.case_id} ({s.split}): already prepared, skipped")
    todo = [s for s in sources if s.case_id not in done]
    failures: list[tuple[CaseSource, BaseException, str]] = []
    t_run, k = time.perf_counter(), 0
    parallel = workers > 1 or workers == RAY_TASKS
    for s, result, seconds, tmp in _run_cases(todo, out, p.name, workers, image_dtype):
        k += 1
        head = f"[{position[s.case_id]:>{width}}/{n}] {s.case_id} ({s.split})"
        if isinstance(result, BaseException):
            failures.append((s, result, tmp))
            if parallel:
                log(f"{head}: failed: {result}")
            else:  # one at a time: the first failure ends the run (as it always has) and is the message
                break
            continue
        meta = result
        written.append(out / "cases" / s.case_id)
        n_lesions += meta["n_lesions"]
        split_lesions[s.split] += int(meta["n_lesions"])
        shape = "x".join(str(v) for v in meta["shape"])
        rate = k / max(time.perf_counter() - t_run, 1e-9) * 60
        eta = (len(todo) - k) / rate if rate else 0.0
        log(f"{head}: {shape} voxels, {meta['n_lesions']} lesion(s), {seconds:.1f} s; {rate:.1f} cases/min, "
            f"about {eta:.1f} min left")
    def undo() -> str:
        """This run's cases removed (unless ``keep_partial``); what was kept, in words."""
        if keep_partial:
            return f"the {len(written)} case(s) finished in this run were kept; fix the input and rerun to resume"
        for d in written:
            shutil.rmtree(d, ignore_errors=True)
        for d in reversed(created_dirs):
            shutil.rmtree(d, ignore_errors=True)
        return f"nothing of this run was kept: the cache at {out} is as it was"

    if failures:
        kept = undo()
        s, exc, tmp = failures[0]
        if len(failures) == 1 and isinstance(exc, OSError):
            errno_, what = _disk_error(exc, out, s.case_id)
            raise OSError(errno_, f"{what} [{kept}]", exc.filename or tmp) from None
        if len(failures) == 1:
            raise DataError(f"{exc} [{kept}]") from None
        lines = "\n".join(f"  {f.case_id}: {e}" for f, e, _ in failures)
        raise DataError(f"{len(failures)} of {len(todo)} case(s) failed [{kept}]:\n{lines}") from None

    index = {
        "version": CACHE_VERSION,
        "preset": p.name,
        "source": source,
        "image_dtype": image_dtype,
        "cases": [{"case_id": s.case_id, "split": s.split} for s in sources],
    }
    try:
        write_json_atomic(out / "cache.json", index)
    except OSError as exc:  # the disk filled up (or refused) at the last file: the run did not happen
        kept = undo()
        raise OSError(exc.errno, f"{exc.strerror or exc} [{kept}]", exc.filename or str(out / "cache.json")) from None
    counts = ", ".join(f"{sp} {sum(1 for s in sources if s.split == sp)}" for sp in SPLITS)
    log(
        f"prepared {len(written)} case(s), skipped {len(done)} already prepared; {n} cases ({counts}), "
        f"{n_lesions} lesions, preset {p.name}, {time.perf_counter() - t0:.1f} s -> {out}"
    )
    for sp, k in split_lesions.items():
        n_split = sum(1 for s in sources if s.split == sp)
        if k == 0 and n_split:  # said whatever ``progress``: a study needs lesions to train, select and judge
            print(f"warning: split {sp!r} of {out} has no lesion in any of its {n_split} case(s): a study "
                  "cannot train, select or measure recall on it", file=sys.stderr, flush=True)
    return Cache(out)


def _prepare_case(s: CaseSource, out: Path, preset: str,
                  image_dtype: str = "float32") -> tuple[dict | BaseException, float, str]:
    """Prepare one case into a temporary folder and rename it into place: ``(meta, seconds, the temporary
    folder)``, or the bad input / OS error that stopped it in place of ``meta`` (its temporary folder removed)."""
    tmp = out / "cases" / f"{_TMP_PREFIX}{s.case_id}-{os.getpid()}"
    final = out / "cases" / s.case_id
    t0 = time.perf_counter()
    try:
        meta = _prepare_one(s, tmp, preset=preset, image_dtype=image_dtype)
        if final.exists():  # an incomplete folder (not written by us): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except (DataError, OSError) as exc:  # bad input, or the disk refused (full, permission)
        shutil.rmtree(tmp, ignore_errors=True)
        return exc, time.perf_counter() - t0, str(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta, time.perf_counter() - t0, str(tmp)


def _run_cases(todo: Sequence[CaseSource], out: Path, preset: str, workers: int, image_dtype: str = "float32"):
    """``(source, meta or error, seconds, temporary folder)`` of every case, in the order they finish: one after another in this
    process, or on ``workers`` processes (spawned: nothing of this process is shared with them; the sources are
    pickled to them)."""
    if workers == RAY_TASKS:  # one Ray task per case, on whichever node of the connected cluster has a CPU free
        import ray

        task = ray.remote(num_cpus=1, max_retries=1)(_prepare_case)
        pending = {task.remote(s, out, preset, image_dtype): s for s in todo}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    yield (pending.pop(ref), *ray.get(ref))
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            raise
        return
    if workers <= 1 or len(todo) <= 1:
        for s in todo:
            yield (s, *_prepare_case(s, out, preset, image_dtype))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_prepare_case, s, out, preset, image_dtype): s for s in todo}
        try:
            for fut in as_completed(futures):
                yield (futures[fut], *fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _prepare_one(s: CaseSource, tmp: Path, *, preset: str, image_dtype: str = "float32") -> dict:
    from trainables.weights import label_components

    raw = s.load()
    pre = apply_preset(raw.image, raw.mask, raw.roi, preset, case_id=s.case_id)
    labels, k = label_components(pre.mask)
    labels = np.ascontiguousarray(labels, dtype=label_dtype(int(k)))
    geom = raw.geometry
    start_xyz = np.array([pre.crop_box[2][0], pre.crop_box[1][0], pre.crop_box[0][0]], dtype=np.float64)
    d = np.asarray(geom.direction, dtype=np.float64).reshape(3, 3)
    origin = np.asarray(geom.origin) + d @ (start_xyz * np.asarray(geom.spacing[::-1]))
    meta: dict[str, Any] = {
        "case_id": s.case_id,
        "split": s.split,
        "spacing": list(geom.spacing),
        "shape": list(pre.image.shape),
        **lesion_stats(labels, int(k), geom.spacing),
        "crop_box": pre.crop_box,
        "preset": preset,
        "sources": s.sources,
        "source_shape": list(geom.shape),
        "origin": [float(v) for v in origin],
        "direction": list(geom.direction),
        "raw_range": list(pre.raw_range),
        "image_min": float(pre.image.min()),
        "mask_voxels_outside_roi": pre.mask_voxels_outside_roi,
        "extra": raw.extra,
        "image_dtype": image_dtype,
    }
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.save(tmp / "image.npy", pre.image.astype(image_dtype, copy=False))
    np.save(tmp / "labels.npy", labels)  # the mask is labels != 0
    write_json_atomic(tmp / "meta.json", meta)
    return meta


def _finished(out: Path, s: CaseSource, *, preset: str, image_dtype: str) -> bool:
    """True when ``out`` already holds this case, complete and made from the same files with the same preset, in
    this cache version and image dtype (an interrupted run has no cache.json yet to say them)."""
    folder = out / "cases" / s.case_id
    if not all((folder / f).is_file() for f in CASE_FILES):
        return False
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    names = {k: Path(v).name if v else None for k, v in s.sources.items()}
    old = {k: Path(v).name if v else None for k, v in (meta.get("sources") or {}).items()}
    if meta.get("preset") != preset or old != names:
        raise DataError(
            f"case {s.case_id} is already in the cache {out} but was prepared from other files or "
            f"another preset (preset {meta.get('preset')}, files {old}); use a new output folder or "
            f"delete {folder}"
        )
    if (folder / "mask.npy").is_file() or meta.get("image_dtype") != image_dtype:  # version 1: mask, no dtype
        made = "version 1" if (folder / "mask.npy").is_file() else f"image dtype {meta.get('image_dtype')}"
        raise DataError(
            f"case {s.case_id} is already in {out} as {made} (this run: version {CACHE_VERSION}, image dtype "
            f"{image_dtype}); use a new output folder or delete {folder}"
        )
    return True


def _check_out(out: Path, *, preset: str, image_dtype: str = "float32") -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"cache output {out} exists and is not a folder")
    index = out / "cache.json"
    if index.is_file():
        try:
            old = json.loads(index.read_text())
        except ValueError:
            raise DataError(
                f"cache index {index} is malformed; delete the folder or choose another output"
            ) from None
        if old.get("preset") != preset:
            raise DataError(
                f"the cache {out} was prepared with preset {old.get('preset')}, not {preset}; use a new "
                "output folder"
            )
        if old.get("version") != CACHE_VERSION:
            raise DataError(
                f"the cache {out} is a version-{old.get('version')} cache (written by an earlier version of this "
                f"tool); it still loads for training, but new cases go into a version-{CACHE_VERSION} cache: use "
                "a new output folder"
            )
        if old.get("image_dtype", "float32") != image_dtype:
            raise DataError(
                f"the cache {out} stores its images as {old.get('image_dtype', 'float32')}, not {image_dtype}; "
                "use a new output folder"
            )
    elif out.is_dir() and any(p for p in out.iterdir() if p.name != "cases"):
        raise DataError(
            f"cache output {out} is a non-empty folder that is not a data cache (no cache.json); "
            "choose a new or empty folder"
        )


def _disk_error(exc: OSError, out: Path, case_id: str) -> tuple[int | None, str]:
    """``(errno, words)`` of an OS error while writing a case: a full disk is named as such (numpy reports a short
    write as "16384 requested and 16352 written", without an errno), with the free space left."""
    import errno

    try:
        free = shutil.disk_usage(out).free
    except OSError:
        free = None
    short_write = "requested and" in str(exc) and "written" in str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or short_write or (free is not None and free < (1 << 20)):
        left = "" if free is None else f", {free / 1e6:.1f} MB free"
        return errno.ENOSPC, (f"{exc.strerror or exc}: the disk of {out} is full{left} (writing case {case_id}); "
                              "free space (or prepare into another --out), then run the command again")
    return exc.errno, exc.strerror or str(exc)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
    pass

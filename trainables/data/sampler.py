"""Training patches: the paper's sampling (docs/definitions.md §4, authors' ``tumor_sampling`` + ``with_cc``) with the iw map.

For every sample of batch ``k`` (rng = ``numpy.random.default_rng([seed, k])``, so batch ``k`` depends only on
``(seed, k)``, whatever the number of workers, and a run resumes exactly from ``state_dict()``):

1. a patient is drawn with probability proportional to its number of lesions (cases without lesions are never
   drawn);
2. with probability ``lesion_prob`` the patch is centred on a uniformly random voxel of a uniformly chosen lesion of
   that patient (the cached 26-connected labels); otherwise the centre is uniform over the positions where the
   patch fits in the image (on an axis where the image is smaller than the patch: the image centre);
3. the box is ``[centre - size // 2, centre - size // 2 + size)`` per axis (dpipe's ``get_centered_box``); the crop
   is padded outside the image: image with the image's minimum, target and labels with 0;
4. the weight map is :func:`trainables.weights.weights_from_labels` of the label crop (per sample), or ones
   when ``iw`` is off.

Batches hold numpy arrays ``(B, 1, *patch_size)``, axes ``[z, y, x]``: the image and the iw map in float32, the
target in uint8 (0/1: the smallest exact dtype; the losses cast it). They are made in background workers (threads
by default, or processes) with a bounded queue of ``prefetch`` batches; the order is kept. For a GPU trial
(``pin_memory``) the batches of thread workers are allocated in pinned (page-locked) host memory, from which the
copy to the GPU runs asynchronously (:class:`trainables.step.DevicePrefetcher`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from trainables.data.cache import Cache
from trainables.errors import DataError
from trainables.weights import DEFAULT_CLIP, voronoi_regions, weights_from_labels

MAX_OPEN_CASES = 256


class _Arrays(NamedTuple):
    """What the sampler keeps of an open case."""

    image: np.ndarray
    labels: np.ndarray
    pad: float
    n_lesions: int


class Batch(NamedTuple):
    """One training batch: arrays ``(B, 1, Z, Y, X)``, image and weight float32, target uint8 (0/1); weight is
    ones when iw is off (then a read-only broadcast view: copy it before writing to it)."""

    image: np.ndarray
    target: np.ndarray
    weight: np.ndarray


class LesionBatch(NamedTuple):
    """A :class:`Batch` with what the per-lesion losses take (the sampler's ``extras``): ``labels``, the int32
    instance labels of each patch (the cached labels cropped with it, 0 = background), and ``regions``, their
    Voronoi regions (:func:`trainables.weights.voronoi_regions`); the one not asked for is None."""

    image: np.ndarray
    target: np.ndarray
    weight: np.ndarray
    labels: np.ndarray | None
    regions: np.ndarray | None

    def extras(self, names) -> dict[str, np.ndarray]:
        """The named extras (``"labels"``, ``"regions"``) of the batch."""
        return {name: getattr(self, name) for name in names}


#: what a batch can carry besides image, target and weight
EXTRAS = ("labels", "regions")


def centered_box(center: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``[[start, stop], ...]`` per axis with ``start = center - size // 2``, ``stop = start + size``."""
    c = np.asarray(center, dtype=np.int64)
    s = np.asarray(size, dtype=np.int64)
    start = c - s // 2
    return np.stack([start, start + s], axis=1)


def crop_padded(
    array: np.ndarray, box: np.ndarray, pad_value: float | int, out: np.ndarray | None = None
) -> np.ndarray:
    """Crop ``array[box]``; the parts of the box outside the array are filled with ``pad_value``.

    box: ``[[start, stop], ...]`` per axis, may reach outside the array. ``out`` (shape = box sizes) is filled
    in place when given, else a new array of ``array``'s dtype is returned.
    """
    box = np.asarray(box)
    size = tuple(int(b - a) for a, b in box)
    if out is None:
        out = np.empty(size, dtype=array.dtype)
    lo = np.maximum(box[:, 0], 0)
    hi = np.minimum(box[:, 1], array.shape)
    if np.any(hi <= lo):  # entirely outside
        out.fill(pad_value)
        return out
    dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, box[:, 0]))
    if any(d.start > 0 or d.stop < n for d, n in zip(dst, size)):
        out.fill(pad_value)
    out[dst] = array[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    return out


class PatchSampler:
    """Infinite, reproducible stream of training batches from a :class:`Cache` (see the module docstring).

    Args:
        cache: the prepared cache.
        case_ids: the cases to draw from (order does not matter; they are sorted).
        patch_size: ``(Z, Y, X)`` voxels.
        batch_size: samples per batch.
        iw: yield the inverse-weight map (else weight = ones).
        iw_clip: ``(w_min, w_max)``; None = the paper's Eq. 1 (no clip).
        iw_power: ``p`` of ``iw.power`` (1: Eq. 1; :func:`trainables.weights.weights_from_labels`).
        lesion_prob: probability of a lesion-centred patch.
        seed: batch ``k`` is drawn from ``default_rng([seed, k])``.
        num_workers: background workers (0 = make each batch in the consumer's thread).
        prefetch: batches made ahead (the bounded queue), at least ``num_workers``.
        start_batch: index of the first batch yielded (resume from ``state_dict()["next_batch"]``).
        worker_type: ``"thread"`` (default) or ``"process"`` (spawned processes; batches are pickled back).
        extras: what the loss needs besides the weight map (:data:`EXTRAS`): ``"labels"`` and/or ``"regions"``.
        pin_memory: allocate the batches in pinned host memory (needs a CUDA build of torch; GPU trials).

    Raises DataError when no case of ``case_ids`` has a lesion, a case is unknown, or arguments are invalid.
    """

    def __init__(
        self,
        cache: Cache,
        case_ids: Sequence[str],
        *,
        patch_size: Sequence[int],
        batch_size: int,
        iw: bool,
        iw_clip: tuple[float, float] | None = DEFAULT_CLIP,
        iw_power: float = 1.0,
        lesion_prob: float = 0.5,
        seed: int = 0,
        num_workers: int = 1,
        prefetch: int = 4,
        start_batch: int = 0,
        worker_type: str = "thread",
        extras: Sequence[str] = (),
        pin_memory: bool = False,
    ):
        self.cache = cache
        self.pin_memory = bool(pin_memory)
        self.extras = tuple(extras)
        unknown = sorted(set(self.extras) - set(EXTRAS))
        if unknown:
            raise DataError(f"PatchSampler: unknown extras {unknown}; expected some of {', '.join(EXTRAS)}")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise DataError(f"patch_size must be 3 positive sizes (z, y, x), got {tuple(patch_size)}")
        if int(batch_size) < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= float(lesion_prob) <= 1.0:
            raise DataError(f"lesion_prob must be in [0, 1], got {lesion_prob}")
        if worker_type not in ("thread", "process"):
            raise DataError(f"worker_type must be 'thread' or 'process', got {worker_type!r}")
        if int(num_workers) < 0 or int(start_batch) < 0:
            raise DataError(f"num_workers and start_batch must be >= 0, got {num_workers}, {start_batch}")
        self.batch_size = int(batch_size)
        self.iw = bool(iw)
        self.iw_clip = None if iw_clip is None else (float(iw_clip[0]), float(iw_clip[1]))
        self.iw_power = float(iw_power)
        if not 0.0 <= self.iw_power <= 1.0:
            raise DataError(f"iw_power must be in [0, 1], got {iw_power}")
        self.lesion_prob = float(lesion_prob)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.prefetch = max(int(prefetch), self.num_workers, 1)
        self.worker_type = worker_type
        case_ids = list(case_ids)
        ids = sorted(set(case_ids))
        if len(ids) != len(case_ids):
            raise DataError("PatchSampler: case_ids contains duplicates")
        for c in ids:
            if c not in cache:
                raise DataError(f"PatchSampler: case {c} is not in the data cache {cache.root}")
        counts = np.array([int(cache.meta(c)["n_lesions"]) for c in ids], dtype=np.float64)
        if not ids or counts.sum() == 0:
            raise DataError(
                f"PatchSampler: none of the {len(ids)} case(s) has a lesion in the data cache "
                f"{cache.root}; patients are drawn in proportion to their lesion count"
            )
        self.case_ids = [c for c, n in zip(ids, counts) if n > 0]  # patients that can be drawn
        self.lesion_counts = counts[counts > 0].astype(np.int64)
        self.probabilities = counts[counts > 0] / counts.sum()
        self._cdf = np.cumsum(self.probabilities)
        self._cases: OrderedDict[str, _Arrays] = OrderedDict()  # LRU of open memory maps
        self._lesion_index: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._next = int(start_batch)  # index of the next batch handed to the consumer
        self._submitted = self._next
        self._pending: deque[Future] = deque()
        self._executor: Executor | None = None

    # ------------------------------------------------------------------ the deterministic core

    def batch(self, k: int) -> Batch | LesionBatch:
        """The ``k``-th batch, computed synchronously; depends only on ``(seed, k)`` and the constructor's args."""
        rng = np.random.default_rng([self.seed, int(k)])
        shape = (self.batch_size, 1, *self.patch_size)
        empty = _pinned_empty if self.pin_memory else np.empty
        image = empty(shape, dtype=np.float32)
        target = empty(shape, dtype=np.uint8)
        # iw off: a read-only broadcast of 1 (no memory, no work); iw on: maps written straight into the batch
        weight = empty(shape, dtype=np.float32) if self.iw else np.broadcast_to(np.float32(1.0), shape)
        keep = "labels" in self.extras or "regions" in self.extras
        all_labels = empty(shape, dtype=np.int32) if keep else None
        regions = empty(shape, dtype=np.int32) if "regions" in self.extras else None
        labels = np.empty(self.patch_size, dtype=np.int32)
        for b in range(self.batch_size):
            case_id, _, center = self._draw(rng)
            case = self._case(case_id)
            box = centered_box(center, self.patch_size)
            crop_padded(case.image, box, case.pad, out=image[b, 0])
            crop = all_labels[b, 0] if keep else labels
            crop_padded(case.labels, box, 0, out=crop)
            np.not_equal(crop, 0, out=target[b, 0])
            if self.iw:
                weights_from_labels(crop, clip=self.iw_clip, out=weight[b, 0], power=self.iw_power)
            if regions is not None:
                regions[b, 0] = voronoi_regions(crop)
        if not self.extras:
            return Batch(image, target, weight)
        return LesionBatch(image, target, weight, all_labels if "labels" in self.extras else None, regions)

    def sample_info(self, k: int) -> list[dict]:
        """What batch ``k`` draws, per sample: case_id, lesion_centred, center (z, y, x) (tests, debugging)."""
        rng = np.random.default_rng([self.seed, int(k)])
        info = []
        for _ in range(self.batch_size):
            case_id, lesion, center = self._draw(rng)
            info.append(
                {"case_id": case_id, "lesion_centred": lesion, "center": tuple(int(c) for c in center)}
            )
        return info

    def _draw(self, rng: np.random.Generator) -> tuple[str, bool, np.ndarray]:
        """One sample's patient, kind and patch centre; the only consumer of ``rng``."""
        i = min(
            int(np.searchsorted(self._cdf, rng.random() * self._cdf[-1], side="right")),
            len(self.case_ids) - 1,
        )
        case_id = self.case_ids[i]
        case = self._case(case_id)
        if rng.random() < self.lesion_prob:
            return case_id, True, self._lesion_center(case_id, case, rng)
        return case_id, False, self._uniform_center(case.image.shape, rng)

    def _case(self, case_id: str) -> _Arrays:
        """The case's image and labels, memory-mapped; at most ``MAX_OPEN_CASES`` stay open (each map holds a file
        descriptor, and a LUNA16 training split has more cases than the usual limit of 1024 descriptors)."""
        with self._lock:
            case = self._cases.get(case_id)
            if case is not None:
                self._cases.move_to_end(case_id)
                return case
        meta = self.cache.meta(case_id)
        pad = meta.get("image_min")
        image = self.cache.array(case_id, "image")
        if pad is None:
            pad = float(np.min(image))
        case = _Arrays(
            image=image,
            labels=self.cache.array(case_id, "labels"),
            pad=float(pad),
            n_lesions=int(meta["n_lesions"]),
        )
        with self._lock:
            self._cases[case_id] = case
            while len(self._cases) > MAX_OPEN_CASES:
                self._cases.popitem(last=False)
        return case

    def _lesion_center(self, case_id: str, case, rng: np.random.Generator) -> np.ndarray:
        voxels, offsets = self._lesion_voxels(case_id, case)
        j = int(rng.integers(len(offsets) - 1))
        flat = voxels[int(rng.integers(offsets[j], offsets[j + 1]))]
        return np.array(np.unravel_index(int(flat), case.labels.shape))

    def _lesion_voxels(self, case_id: str, case) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices of every lesion voxel grouped by label, and the group offsets (computed once per case)."""
        hit = self._lesion_index.get(case_id)
        if hit is not None:
            return hit
        with self._lock:
            hit = self._lesion_index.get(case_id)
            if hit is None:
                flat = np.asarray(case.labels).reshape(-1)
                idx = np.flatnonzero(flat)
                lab = flat[idx]
                order = np.argsort(lab, kind="stable")
                n = case.n_lesions
                counts = np.bincount(lab, minlength=n + 1)[1:]
                if counts.size != n or np.any(counts == 0):
                    raise DataError(
                        f"data cache {self.cache.root}: case {case_id}: labels.npy does not hold the "
                        f"{n} lesions of meta.json (prepare the cache again)"
                    )
                offsets = np.concatenate([[0], np.cumsum(counts)])
                hit = (idx[order], offsets)
                self._lesion_index[case_id] = hit
        return hit

    def _uniform_center(self, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        center = np.empty(3, dtype=np.int64)
        for a in range(3):
            n, p = int(shape[a]), self.patch_size[a]
            if n < p:
                center[a] = n // 2
            else:
                center[a] = int(rng.integers(0, n - p + 1)) + p // 2
        return center

    # ------------------------------------------------------------------ the stream

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.num_workers == 0:
            b = self.batch(self._next)
            self._next += 1
            return b
        if self._executor is None:
            self._start()
        while len(self._pending) < self.prefetch:
            self._submit()
        b = self._pending.popleft().result()
        self._next += 1
        self._submit()
        return b

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "next_batch"}``; ``next_batch`` = index of the next batch the consumer will get."""
        return {"seed": self.seed, "next_batch": self._next}

    def close(self) -> None:
        """Stop the workers and drop the batches made ahead (idempotent)."""
        ex, self._executor = self._executor, None
        pending, self._pending = self._pending, deque()
        for f in pending:
            f.cancel()
        self._submitted = self._next
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PatchSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _start(self) -> None:
        self._submitted = self._next
        if self.worker_type == "thread":
            self._executor = ThreadPoolExecutor(
                max_workers=self.num_workers, thread_name_prefix="patch-sampler"
            )
        else:
            import multiprocessing as mp

            self._executor = ProcessPoolExecutor(
                max_workers=self.num_workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_process_worker,
                initargs=(self._config(),),
            )

    def _submit(self) -> None:
        k = self._submitted
        if self.worker_type == "thread":
            fut = self._executor.submit(self.batch, k)
        else:
            fut = self._executor.submit(_process_batch, k)
        self._pending.append(fut)
        self._submitted += 1

    def _config(self) -> dict[str, Any]:
        return {
            "root": str(self.cache.root),
            "case_ids": list(self.case_ids),
            "patch_size": self.patch_size,
            "batch_size": self.batch_size,
            "iw": self.iw,
            "iw_clip": self.iw_clip,
            "iw_power": self.iw_power,
            "lesion_prob": self.lesion_prob,
            "seed": self.seed,
        }

    def __getstate__(self):
        raise TypeError("PatchSampler is not picklable; pass its arguments (or a Cache root) to the worker")


def _pinned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised numpy array in pinned host memory (torch's caching pinned allocator; the array keeps the
    tensor alive)."""
    import torch

    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype, pin_memory=True).numpy()


_WORKER_SAMPLER: PatchSampler | None = None


def _init_process_worker(config: dict[str, Any]) -> None:
    global _WORKER_SAMPLER
    cfg = dict(config)
    cache = Cache(cfg.pop("root"))
    _WORKER_SAMPLER = PatchSampler(cache, cfg.pop("case_ids"), num_workers=0, **cfg)


def _process_batch(k: int) -> Batch:
    assert _WORKER_SAMPLER is not None
    return _WORKER_SAMPLER.batch(k)

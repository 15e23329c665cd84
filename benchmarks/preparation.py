"""Benchmark: data preparation at the size of the real datasets, and what the cache costs on disk.

``python -m benchmarks.preparation [--cases 8] [--shape 256 512 512] [--study studies/demo]``

1. The LIDC chest phantom (real LIDC-IDRI nodule shapes, lungs, vessels; ``study data phantom --kind lidc``) at
   LUNA16's size: ``--cases`` volumes of ``--shape`` voxels (default 8 × 256 × 512 × 512, a LUNA16 scan is about
   512 × 512 × 250), generated once.
2. ``study data prepare --preset luna16`` of those cases with ``--workers 1`` and ``--workers 2``, each a process of
   its own, side by side: cases per minute, the ratio, the peak resident memory of the largest process (the
   preparer, or one of its workers) and the two caches compared byte for byte.
3. Cache bytes per case: this version's cache (float32 image, labels in the smallest unsigned type, no stored
   mask), the same with ``--image-dtype float16``, and the version-1 layout it replaces (a uint8 mask beside
   int32 labels), written from the same arrays.
4. The sampler's patch rate from each cache: batches of 2 × 128³ with the iw map, one core.
5. With ``--study``, a finished study on the (small) phantom: its retrained models' voxel Dice on the hold-out
   cases from the float32 image and from the image rounded to float16 (what a float16 cache gives them).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trainables.environment import print_machine


def _prepare(manifest: Path, out: Path, workers: int, dtype: str = "float32") -> tuple[float, float]:
    """``study data prepare`` in a process of its own: (seconds, peak RSS in MiB of its largest process)."""
    cmd = [sys.executable, "-m", "study.cli", "data", "prepare", "--manifest", str(manifest), "--out", str(out), "--preset",
           "luna16", "--workers", str(workers), "--image-dtype", dtype, "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # its own usage and that of the workers it waited for (largest)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"preparation failed: {' '.join(cmd)}\n{err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def _bytes(root: Path) -> dict[str, int]:
    """Bytes of each case's arrays (the .npy files) and metadata."""
    return {c.name: sum(f.stat().st_size for f in c.iterdir()) for c in sorted((root / "cases").iterdir())}


def _identical(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "cache.json")
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "cache.json") and \
        all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def _float16_dice(study: Path) -> None:
    """Section 5 of the module docstring."""
    import torch

    from study.layout import RETRAIN, open_study
    from study.stages.context import StudyContext
    from study.tune.tuner import outcomes
    from trainables.build import build_model, load_state
    from trainables.config import TrialSpec
    from trainables.data import Cache
    from trainables.inference import study_logits

    sd, cfg, state = open_study(study.parent, study.name, writes=False)
    cache = Cache(StudyContext(sd, cfg, state).cache_dir())
    ids = cache.case_ids("holdout")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"float16 images, study {study} ({len(ids)} hold-out cases, threshold 0.5, voxel Dice with the "
          "reference mask):")
    dice = lambda a, b: 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)  # noqa: E731
    worst = 0.0
    for r in outcomes(sd.ray_dir, RETRAIN):
        if r.status != "TERMINATED":
            continue
        spec = TrialSpec.from_dict(r.spec)
        model = build_model(cfg.for_trial(spec).model, cfg.training.patch_size)
        model.load_state_dict(load_state(r.checkpoint_path)["model"])
        model.eval()
        d32, d16, agree = [], [], []
        for c in ids:
            case = cache.load(c, mmap=False)
            truth = np.asarray(case.mask) > 0
            with torch.no_grad():
                p32 = study_logits(model, case.image.astype(np.float32), cfg.inference, device="cpu").numpy() > 0
                half = case.image.astype(np.float16).astype(np.float32)
                p16 = study_logits(model, half, cfg.inference, device="cpu").numpy() > 0
            d32.append(dice(p32, truth))
            d16.append(dice(p16, truth))
            agree.append(dice(p32, p16) if p32.any() or p16.any() else 1.0)
        worst = max(worst, abs(np.mean(d32) - np.mean(d16)))
        print(f"  {spec.label:<28} Dice float32 {np.mean(d32):.4f}  float16 {np.mean(d16):.4f}  "
              f"(difference {np.mean(d16) - np.mean(d32):+.4f}; the two predictions agree at Dice "
              f"{np.mean(agree):.4f})", flush=True)
    print(f"  largest change of a model's mean Dice: {worst:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preparation", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--seconds", type=float, default=8.0, help="time per sampler measurement")
    parser.add_argument("--study", type=Path, help="a finished phantom study for section 5 (e.g. studies/demo)")
    parser.add_argument("--keep", type=Path, help="keep the phantom and caches in this folder")
    args = parser.parse_args(argv)
    print_machine()
    from benchmarks.data import _sampler_throughput
    from tests.helpers import rewrite_as_version_1
    from trainables.data import Cache
    from trainables.data.lidc_phantom import make_lidc_phantom

    tmp = Path(tempfile.mkdtemp(prefix="prep-bench.", dir=args.keep)) if args.keep else \
        Path(tempfile.mkdtemp(prefix="prep-bench."))
    try:
        shape = tuple(args.shape)
        t0 = time.perf_counter()
        manifest = make_lidc_phantom(tmp / "phantom", n_cases=args.cases, seed=0, shape=shape)
        voxels = math.prod(shape)
        print(f"LIDC phantom: {args.cases} cases of {'x'.join(map(str, shape))} ({voxels / 1e6:.0f} M voxels each, "
              f"int16 NIfTI), generated in {time.perf_counter() - t0:.0f} s", flush=True)

        print("\npreparation (preset luna16: clip, lung mask, crop; labels; a process of its own per run):")
        runs = {}
        for workers in (1, 2):
            seconds, rss = _prepare(manifest, tmp / f"cache-w{workers}", workers)
            runs[workers] = seconds
            print(f"  --workers {workers}: {seconds:6.1f} s = {args.cases / seconds * 60:5.2f} cases/min, peak RSS "
                  f"of the largest process {rss:6.0f} MiB", flush=True)
        same = _identical(tmp / "cache-w1", tmp / "cache-w2")
        print(f"  ratio 2 workers / 1: {runs[1] / runs[2]:.2f}x (target >= 1.7x on 2 cores); the two caches are "
              f"{'identical byte for byte' if same else 'DIFFERENT'}")
        _prepare(manifest, tmp / "cache-f16", 2, "float16")
        shutil.copytree(tmp / "cache-w1", tmp / "cache-v1")
        rewrite_as_version_1(tmp / "cache-v1")

        print("\ncache bytes per case (mean; per voxel of the cropped volume; against version 1):")
        caches = {"version 1 (float32 image, uint8 mask, int32 labels)": tmp / "cache-v1",
                  "this version (float32 image, uint8 labels, no mask)": tmp / "cache-w1",
                  "this version, --image-dtype float16": tmp / "cache-f16"}
        cropped = np.mean([math.prod(Cache(tmp / "cache-w1").meta(c)["shape"]) for c in Cache(tmp / "cache-w1").case_ids()])
        base = None
        for what, root in caches.items():
            mean = float(np.mean(list(_bytes(root).values())))
            base = base or mean
            print(f"  {what:<55} {mean / 2**20:8.1f} MiB ({mean / cropped:.2f} bytes per voxel; "
                  f"{mean / base:.2f} of version 1)")
        print(f"  (cropped to the lungs: {cropped / 1e6:.1f} M voxels per case of {voxels / 1e6:.0f} M)")

        print("\nsampler from each cache: batches of 2 x 128^3 with the iw map, one core:")
        for what, root in caches.items():
            cache = Cache(root)
            ids = cache.case_ids("train")
            rate = _sampler_throughput(cache, ids, (128, 128, 128), 2, True, args.seconds) / 2
            print(f"  {what:<55} {rate:6.2f} batches/s", flush=True)
        if args.study is not None:
            print()
            _float16_dice(args.study.expanduser().resolve())
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: does the training step wait for data?

``python -m benchmarks.data [--quick] [--patch Z Y X] [--batch B] [--workers N] [--worker-type ...]``

1. Sampler alone: patches per second made synchronously (one core), with and without the iw map.
2. Training step (UNet3D at ``CPU_PRESET_WIDTH``, iw-BCE, forward + backward + SGD/Nesterov step) measured side by
   side in one run, interleaved in rounds so that load from other processes hits every mode alike:

   - ``fixed``: one pre-built batch reused (the data cost is zero);
   - ``sampler/<kind>``: each step takes the next batch of a :class:`PatchSampler` with background workers.

   The ratio ``median step time with the sampler / median step time with the fixed batch`` is the cost of the data
   pipeline seen by training; the target is <= 1.05.

3. Host pipeline for a GPU trial (``--pipeline``, also part of the default run): the batches per second the
   sampler's workers deliver through the trainer's prefetcher at the paper's 2 × 128³ with iw, with 1 and 2
   workers, against the 6.7 batches/s a 150 ms GPU step consumes (target: at least 3x), on phantom volumes of
   176 × 208 × 208 (cropped to the organ: larger than the patch on every axis, as LUNA16's are).

The data is the phantom (generated and prepared into a temporary folder) unless ``--cache`` names a prepared cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from trainables.environment import print_machine


def _sampler_throughput(cache, ids, patch, batch, iw: bool, seconds: float) -> float:
    from trainables.data.sampler import PatchSampler

    s = PatchSampler(cache, ids, patch_size=patch, batch_size=batch, iw=iw, num_workers=0, seed=1)
    s.batch(0)  # lesion index, page cache
    n, k, t0 = 0, 1, time.perf_counter()
    while time.perf_counter() - t0 < seconds or k < 5:
        s.batch(k)
        k += 1
        n += batch
    return n / (time.perf_counter() - t0)


#: the GPU step time the host pipeline is compared with (the paper's step on a current GPU, order of magnitude)
GPU_STEP_SECONDS = 0.150


def pipeline_rate(cache, ids, *, patch, batch: int, workers: int, seconds: float) -> float:
    """Batches per second through a trial's input path (thread workers -> the trainer's prefetcher), measured
    after the workers' queue has filled once."""
    import torch

    from trainables.data.sampler import PatchSampler
    from trainables.step import DevicePrefetcher

    sampler = PatchSampler(cache, ids, patch_size=patch, batch_size=batch, iw=True, seed=3, num_workers=workers)
    with sampler:
        stream = DevicePrefetcher(iter(sampler), torch.device("cpu"), iw=True)
        for _ in range(sampler.prefetch + 2):  # the queue filled, the cases opened
            next(stream)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 5:
            next(stream)
            n += 1
        return n / (time.perf_counter() - t0)


def host_pipeline(args, tmp: Path) -> None:
    """Section 3 of the module docstring."""
    from trainables.data import Cache, make_phantom, prepare_cache

    if args.cache is not None:
        cache = Cache(args.cache)
    else:
        manifest = make_phantom(tmp / "big", n_cases=4 if args.quick else 6, seed=0, shape=(176, 208, 208))
        cache = prepare_cache(manifest, tmp / "big-cache", progress=False)
    ids = cache.case_ids("train")
    need = 1.0 / GPU_STEP_SECONDS
    print(f"host pipeline for a GPU trial: 2 x {args.pipeline_patch}^3 patches with iw, thread workers -> prefetcher; "
          f"{len(ids)} training cases of {'x'.join(map(str, cache.meta(ids[0])['shape']))}; a "
          f"{1000 * GPU_STEP_SECONDS:.0f} ms GPU step takes {need:.1f} batches/s")
    for workers in (1, 2):
        rate = pipeline_rate(cache, ids, patch=(args.pipeline_patch,) * 3, batch=2, workers=workers,
                             seconds=args.seconds or (2.0 if args.quick else 6.0))
        verdict = "OK" if rate >= 3 * need else "BELOW TARGET"
        print(f"  {workers} worker(s): {rate:6.1f} batches/s = {rate / need:5.1f}x what the GPU step needs "
              f"(target >= 3x: {verdict})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer cases, steps and rounds (about a minute)")
    parser.add_argument("--patch", type=int, nargs=3, default=(32, 32, 32), metavar=("Z", "Y", "X"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="sampler workers (default 1)")
    parser.add_argument("--worker-type", choices=("thread", "process", "both"), default="both")
    parser.add_argument("--steps", type=int, default=None, help="steps per mode = steps x rounds")
    parser.add_argument("--rounds", type=int, default=None, help="(see --steps)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, as a trial with resources.cpu = 1)"
    )
    parser.add_argument("--cache", type=Path, help="a prepared cache (default: a fresh phantom)")
    parser.add_argument("--seconds", type=float, default=None, help="time per sampler-alone measurement")
    parser.add_argument("--pipeline", action="store_true",
                        help="only the host pipeline at 2 x 128^3 (section 3 of the docstring)")
    parser.add_argument("--pipeline-patch", type=int, default=128, help="patch side of section 3 (default 128)")
    args = parser.parse_args(argv)
    print_machine()
    if args.pipeline:
        with tempfile.TemporaryDirectory(prefix="iw-bench-") as tmp:
            host_pipeline(args, Path(tmp))
        return 0

    import numpy as np
    import torch

    from trainables.data import Cache, PatchSampler, make_phantom, prepare_cache
    from trainables.losses import get_loss
    from trainables.unet import CPU_PRESET_WIDTH, UNet3D

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (10 if args.quick else 20)
    rounds = args.rounds or (2 if args.quick else 5)
    patch = tuple(args.patch)
    kinds = ("thread", "process") if args.worker_type == "both" else (args.worker_type,)

    with tempfile.TemporaryDirectory(prefix="iw-bench-") as tmp:
        if args.cache is not None:
            cache = Cache(args.cache)
        else:
            manifest = make_phantom(Path(tmp) / "phantom", n_cases=8 if args.quick else 12, seed=0)
            cache = prepare_cache(manifest, Path(tmp) / "cache", progress=False)
        ids = cache.case_ids("train")
        print(
            f"data: {cache.root if args.cache else 'phantom'}, {len(ids)} training cases; patch "
            f"{'x'.join(map(str, patch))}, batch {args.batch}; torch threads {torch.get_num_threads()}"
        )

        secs = args.seconds or (1.0 if args.quick else 3.0)
        for iw in (False, True):
            rate = _sampler_throughput(cache, ids, patch, args.batch, iw, secs)
            print(f"sampler alone (1 core, synchronous), iw {'on ' if iw else 'off'}: {rate:8.1f} patches/s")

        torch.manual_seed(0)
        model = UNet3D(1, 1, width=CPU_PRESET_WIDTH)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True)
        loss_fn = get_loss("bce")

        def step(batch) -> None:
            image = torch.from_numpy(batch.image)
            target = torch.from_numpy(batch.target)
            weight = torch.from_numpy(batch.weight)
            loss = loss_fn(model(image), target, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        samplers = {
            kind: PatchSampler(
                cache,
                ids,
                patch_size=patch,
                batch_size=args.batch,
                iw=True,
                seed=0,
                num_workers=args.workers,
                worker_type=kind,
            )
            for kind in kinds
        }
        streams = {kind: iter(s) for kind, s in samplers.items()}
        fixed = samplers[kinds[0]].batch(10**6)
        try:
            for kind in kinds:  # start the workers (process start-up is not a step cost)
                next(streams[kind])
            for _ in range(3):
                step(fixed)
            times: dict[str, list[float]] = {"fixed": [], **{f"sampler/{k}": [] for k in kinds}}
            modes = list(times)
            for i in range(
                rounds * steps
            ):  # modes alternate step by step: load changes hit all of them alike
                for j in range(len(modes)):
                    mode = modes[(i + j) % len(modes)]
                    t0 = time.perf_counter()
                    step(fixed if mode == "fixed" else next(streams[mode.split("/")[1]]))
                    times[mode].append(time.perf_counter() - t0)
        finally:
            for s in samplers.values():
                s.close()

    base = statistics.median(times["fixed"])
    print(
        f"training step, UNet3D width {CPU_PRESET_WIDTH}, iw-bce, {rounds * steps} steps per mode, alternating:"
    )
    print(f"  {'mode':<18}{'median ms':>10}{'mean ms':>10}{'ratio':>8}")
    worst = 0.0
    for mode, ts in times.items():
        med = statistics.median(ts)
        ratio = med / base
        if mode != "fixed":
            worst = max(worst, ratio)
        print(f"  {mode:<18}{1000 * med:>10.1f}{1000 * float(np.mean(ts)):>10.1f}{ratio:>8.3f}")
    verdict = "OK" if worst <= 1.05 else "ABOVE TARGET"
    print(f"ratio sampler / fixed batch (worst worker type): {worst:.3f} (target <= 1.05: {verdict})")
    with tempfile.TemporaryDirectory(prefix="iw-bench-") as tmp:
        host_pipeline(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the numerical core, measured side by side in one run: ``python -m benchmarks.weights [--quick]``.

1. Inverse-weight map of a 128³ patch: from a crop of the cached whole-image labels
   (:func:`trainables.weights.weights_from_labels`, the training path; also with ``out=`` a preallocated buffer)
   vs labelling the patch (:func:`trainables.weights.inverse_weights`). Targets: <= 2 ms per patch and >= 8×
   faster than labelling (the ratio and the verdict use the allocating call).
   Two patches: a typical lesion-centred one (a few small and mid-sized lesions) and a dense one (a large lesion
   fills ~40 % of the patch, the worst case of the fast path).
2. One training iteration (forward + backward + SGD step, Dice loss) of :class:`trainables.unet.UNet3D` at width
   1.0 and at :data:`trainables.unet.CPU_PRESET_WIDTH` on a 2×1×64³ batch, and at the preset width on 2×1×32³
   (the demo's batch) in both memory layouts, alternating (NCDHW vs channels-last, their ratio), with the torch
   thread count printed.

Timings are medians over repeats after one warm-up; other processes on the machine inflate them. Default runtime
is about a minute on 2 cores (``--quick``: ~20 s).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from trainables.environment import print_machine
from trainables.losses import dice_loss
from trainables.unet import CPU_PRESET_WIDTH, UNet3D, count_parameters
from trainables.weights import inverse_weights, label_components, weights_from_labels

PATCH = 128
TARGET_MS = 2.0
TARGET_RATIO = 8.0


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _phantom_labels(seed: int = 0) -> np.ndarray:
    """Whole-image labels of a 224³ volume with ~60 ball-shaped lesions of radius 1-12 voxels (cached once)."""
    rng = np.random.default_rng(seed)
    shape = (224, 224, 224)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(60):
        radius = rng.choice([1, 2, 3, 5, 8, 12])
        centre = rng.integers(radius, np.array(shape) - radius)
        box = tuple(slice(c - radius, c + radius + 1) for c in centre)
        coords = np.ogrid[box]
        mask[box] |= sum((g - c) ** 2 for g, c in zip(coords, centre)) <= radius**2
    labels, _ = label_components(mask)
    return labels


def _crop(labels: np.ndarray, centre: tuple[int, ...]) -> np.ndarray:
    starts = [min(max(c - PATCH // 2, 0), s - PATCH) for c, s in zip(centre, labels.shape)]
    return np.ascontiguousarray(labels[tuple(slice(s, s + PATCH) for s in starts)])


def bench_weights(repeats: int) -> None:
    print(f"== inverse weights, one {PATCH}³ patch (single process, numpy) ==")
    labels = _phantom_labels()
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    # typical: centred on a mid-sized lesion
    target_id = ids[np.argsort(counts)[len(counts) // 2]]
    centre = tuple(int(np.mean(a)) for a in np.nonzero(labels == target_id))
    typical = _crop(labels, centre)
    dense = typical.copy()
    dense[:100, :100, :84] = labels.max() + 1  # one large lesion filling 40 % of the patch
    from trainables import weights as weights_mod

    labeller = "cc3d" if weights_mod._cc3d is not None else "scipy"
    print(
        f"{'patch':<34}{'K':>4}{'fg %':>8}{'cached':>10}{'(out=)':>10}{'labelling':>12}{'ratio':>8}   targets"
    )
    print(f"{'':<34}(labelling = the direct path inverse_weights(mask), labeller: {labeller})")
    for name, crop in (("typical (lesion-centred)", typical), ("dense (large lesion, worst case)", dense)):
        mask = crop > 0
        fast = _median_ms(lambda crop=crop: weights_from_labels(crop), repeats * 5)
        buffer = np.empty(crop.shape, np.float32)
        fast_out = _median_ms(
            lambda crop=crop, buffer=buffer: weights_from_labels(crop, out=buffer), repeats * 5
        )
        slow = _median_ms(lambda mask=mask: inverse_weights(mask), repeats)
        n_lesions = len(np.unique(crop)) - 1
        verdict = (
            f"{'OK' if fast <= TARGET_MS else 'MISS'} <= {TARGET_MS:g} ms, "
            f"{'OK' if slow / fast >= TARGET_RATIO else 'MISS'} >= {TARGET_RATIO:g}x"
        )
        print(
            f"{name:<34}{n_lesions:>4}{100 * mask.mean():>8.2f}{fast:>8.2f}ms{fast_out:>8.2f}ms{slow:>10.2f}ms"
            f"{slow / fast:>7.1f}x   "
            f"{verdict}"
        )
        structure = np.ones((3, 3, 3), bool)
        ms = _median_ms(lambda mask=mask, s=structure: ndimage.label(mask, structure=s), repeats)
        print(f"{'':<34}(labelling alone with scipy.ndimage.label: {ms:.2f} ms, ratio {ms / fast:.1f}x)")


def _step_fn(width: float, side: int, channels_last: bool | None) -> Callable[[], None]:
    torch.manual_seed(0)
    model = UNet3D(width=width, channels_last=channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True)
    x = torch.randn(2, 1, side, side, side)
    y = (torch.rand(2, 1, side, side, side) < 0.05).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = dice_loss(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def bench_unet(repeats: int, quick: bool, threads: int) -> None:
    torch.set_num_threads(threads)
    print(
        f"\n== UNet3D training iteration (forward + backward + SGD), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s) =="
    )
    print(f"{'width':>6}{'params':>12}{'batch':>12}  {'layout':<18}{'ms / iter':>10}")
    runs = [
        (1.0, 64, 1 if quick else 2),
        (CPU_PRESET_WIDTH, 64, repeats),
    ]
    for width, side, n in runs:
        ms = _median_ms(_step_fn(width, side, False), n)
        params = count_parameters(UNet3D(width=width))
        print(f"{width:>6g}{params:>12,}{f'2x1x{side}³':>12}  {'NCDHW':<18}{ms:>10.1f}")
    # the memory layout, side by side: the two models step in alternation, so a load change hits both
    steps = {"NCDHW": _step_fn(CPU_PRESET_WIDTH, 32, False), "channels-last": _step_fn(CPU_PRESET_WIDTH, 32, True)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeats * 4 + 1):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t0 = time.perf_counter()
            steps[name]()
            if r:
                times[name].append(time.perf_counter() - t0)
    params = count_parameters(UNet3D(width=CPU_PRESET_WIDTH))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    for name, value in ms.items():
        print(f"{CPU_PRESET_WIDTH:>6g}{params:>12,}{'2x1x32³':>12}  {name:<18}{value:>10.1f}")
    ratio = ms["channels-last"] / ms["NCDHW"]
    print(f"channels-last / NCDHW = {ratio:.2f} (alternating A/B, {repeats * 4} steps each); a study with "
          f"model.channels_last: null takes channels-last only when its own step measures >= 5 % faster")
    print(
        f"(CPU_PRESET_WIDTH = {CPU_PRESET_WIDTH:g}; its 2x1x32³ step is meant to be ~100-150 ms on 1 thread)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weights", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 20 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the U-Net runs (default 1)")
    parser.add_argument("--skip-unet", action="store_true", help="only the weight-map benchmark")
    args = parser.parse_args(argv)
    print_machine()
    repeats = 3 if args.quick else 7
    bench_weights(repeats)
    if not args.skip_unet:
        bench_unet(repeats, args.quick, args.threads)


if __name__ == "__main__":
    main()

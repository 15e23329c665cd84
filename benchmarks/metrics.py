"""Benchmark of the metric layer: numbers measured side by side in one run (no timed tests).

    python -m benchmarks.metrics [--quick] [--shared DIR] [--threads N] [--only SECTION ...]

Sections (``--only``; all by default), after the machine (:func:`trainables.environment.print_machine`):

1. ``records``: records of a 512x512x300 volume with ~20 lesions (target <= 5 s), labelling back ends side by
   side;
2. ``luna16``: luna16 summary with 1000 bootstrap replicates over 200 cases (target <= 1 s);
3. ``paper2020``: paper2020 on the largest fixture, vectorised vs a plain per-threshold loop over the records
   (ratio);
4. ``interp``: ``froc.interp_rows`` before/after: the previous offset-trick implementation
   (:func:`_interp_rows_offset_trick_previous`, kept here only as the reference) vs the current per-row one on
   the bootstrap curves of section 2 and on random curves with ties, repeated and out-of-range targets (ratio;
   the outputs must be bit-identical, else the run stops), plus a per-row ``np.interp`` for scale (it rounds
   differently: how many entries differ and by how much);
5. ``sliding``: sliding-window inference vs MONAI's at the same settings, same model and volume (ratio, target
   <= 1.0).

The fixtures are read from ``--shared`` / ``$IW_SHARED_DIR`` (default: ``../shared`` beside the project root).
Times are the best of a few repeats. The module also holds the reference implementations the benchmark compares
against (:func:`paper2020_loop`, :func:`_interp_rows_offset_trick_previous`) and the synthetic inputs.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.helpers import paper2020_loop
from trainables.environment import print_machine
from trainables.metrics.froc import LUNA_FP_RATES, interp_at_counts, interp_rows
from trainables.metrics.records import CaseRecords, RecordSet

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: the sections of the benchmark, in the order they run
_SECTIONS = ("records", "luna16", "paper2020", "interp", "sliding")


def _best(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def synthetic_volume(shape: tuple[int, int, int], n_lesions: int, seed: int = 0):
    """Ground truth with ``n_lesions`` balls (radius 1.5-12 voxels) and logits that find most of them, shifted
    and resized, plus a few false-positive blobs; float32 logits, background around -6."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, dtype=bool)
    logits = np.full(shape, -6.0, dtype=np.float32)

    def ball(centre, radius, out, value=None):
        r = int(np.ceil(radius)) + 1
        sl = tuple(slice(max(0, c - r), min(n, c + r + 1)) for c, n in zip(centre, shape))
        grid = np.ogrid[sl]
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
        if value is None:
            out[sl] |= inside
        else:
            out[sl] = np.where(inside, np.maximum(out[sl], value), out[sl])

    for _ in range(n_lesions):
        c = [int(rng.integers(15, n - 15)) for n in shape]
        radius = float(rng.uniform(1.5, 12))
        ball(c, radius, gt)
        if rng.random() < 0.8:  # detected, slightly off
            shift = [ci + int(rng.integers(-1, 2)) for ci in c]
            ball(shift, radius * rng.uniform(0.7, 1.2), logits, float(rng.uniform(0.5, 8)))
    for _ in range(n_lesions // 2):  # false positives
        c = [int(rng.integers(15, n - 15)) for n in shape]
        ball(c, float(rng.uniform(1, 4)), logits, float(rng.uniform(0.1, 4)))
    return logits, gt


def synthetic_recordset(n_cases: int = 200, seed: int = 0) -> RecordSet:
    """Random records with ~1.5 lesions and ~10 components per case."""
    rng = np.random.default_rng(seed)
    out: RecordSet = {}
    for i in range(n_cases):
        recs = []
        for _ in range(int(rng.poisson(1.5))):
            hit = rng.random() < 0.7
            recs.append(
                {
                    "is_tum": True,
                    "diameter": float(rng.uniform(3, 30)),
                    "hit_dice": float(rng.uniform(0.1, 0.95)) if hit else 0.0,
                    "hit_logit": float(rng.normal(4, 2)) if hit else -np.inf,
                    "self_logit": np.inf,
                }
            )
        for _ in range(int(rng.poisson(10))):
            recs.append(
                {
                    "is_tum": False,
                    "diameter": float(rng.uniform(1, 10)),
                    "hit_dice": 0.0,
                    "hit_logit": -np.inf,
                    "self_logit": float(rng.exponential(2)),
                }
            )
        out[f"case{i:04d}"] = CaseRecords(recs, n_voxels=10**7, n_pred_positive=int(rng.integers(0, 10**4)))
    return out


def bench_records(shape: tuple[int, int, int], repeats: int) -> None:
    from scipy import ndimage

    from trainables import weights as weights_mod
    from trainables.metrics import records as rec_mod

    logits, gt = synthetic_volume(shape, 20)
    t, r = _best(lambda: rec_mod.volume_records(logits, gt, (0.7, 0.7, 1.25)), repeats)
    n_les = sum(x["is_tum"] for x in r.records)
    print(
        f"records   {shape[2]}x{shape[1]}x{shape[0]} ({logits.size / 1e6:.0f} M voxels, {n_les} lesions, "
        f"{len(r.records) - n_les} components): {t:.2f} s  (target <= 5 s)"
    )
    t2, _ = _best(
        lambda: rec_mod.volume_records_multi(
            logits, gt, (0.7, 0.7, 1.25), rules={"any": ("any", None), "strict": ("iou", 0.3)}
        ),
        repeats,
    )
    print(f"          two hit rules from one labelling: {t2:.2f} s")
    mask = logits > 0
    t_cc, _ = _best(lambda: weights_mod.label_components(mask), repeats)
    t_nd, _ = _best(lambda: ndimage.label(mask, structure=np.ones((3, 3, 3), bool)), repeats)
    backend = "cc3d" if weights_mod._cc3d is not None else "scipy (cc3d not installed)"
    print(
        f"          labelling one mask: {backend} {t_cc:.3f} s vs scipy.ndimage.label {t_nd:.3f} s "
        f"(ratio {t_cc / t_nd:.2f})"
    )


def bench_luna16(repeats: int, shared: Path | None) -> None:
    from trainables.metrics import load_records, summarize

    rs = synthetic_recordset(200)
    n_obj = sum(len(c.records) for c in rs.values())
    t, s = _best(lambda: summarize(rs, "luna16", n_boot=1000, seed=0), repeats)
    print(
        f"luna16    200 cases, {n_obj} records, 1000 bootstrap replicates: {t:.3f} s  (target <= 1 s); "
        f"avg recall {s['avg_recall']:.3f} [{s['avg_recall_ci_low']:.3f}, {s['avg_recall_ci_high']:.3f}]"
    )
    largest = _largest_fixture(shared)
    if largest is not None:
        rs = load_records(largest)
        n_obj = sum(len(c.records) for c in rs.values())
        t, s = _best(lambda: summarize(rs, "luna16", n_boot=1000, seed=0), repeats)
        print(f"          {largest.parent.name}/{largest.name} ({len(rs)} cases, {n_obj} records): {t:.3f} s")


def _largest_fixture(shared: Path | None) -> Path | None:
    if shared is None:
        return None
    files = list((shared / "fixtures" / "paper-records").glob("*/*.json"))
    return max(files, key=lambda p: p.stat().st_size) if files else None


def bench_paper2020(shared: Path | None, repeats: int) -> None:
    from trainables.metrics import load_records, summarize

    largest = _largest_fixture(shared)
    if largest is None:
        print(f"paper2020 skipped: no fixtures under {shared}")
        return
    rs = load_records(largest)
    n_obj = sum(len(c.records) for c in rs.values())
    t_vec, s = _best(lambda: summarize(rs, "paper2020"), repeats)
    t_loop, (m, sd) = _best(lambda: paper2020_loop(rs), 1)
    print(
        f"paper2020 {largest.parent.name}/{largest.name} ({n_obj} records): vectorised {t_vec:.3f} s, "
        f"per-threshold loop {t_loop:.2f} s, ratio {t_vec / t_loop:.4f} "
        f"(avg recall {s['avg_recall']:.4f}±{s['avg_recall_std']:.4f} vs loop {m:.4f}±{sd:.4f})"
    )


def _interp_rows_offset_trick_previous(x: np.ndarray, y: np.ndarray, targets) -> np.ndarray:
    """The PREVIOUS ``froc.interp_rows`` (replaced by a per-row ``searchsorted``), kept only as the
    benchmark's reference: one ``searchsorted`` on the flattened rows shifted by ``r * span`` so that rows never
    interleave, then a loop correcting the counts where the rounding of the shift moved them. The two differ
    only in how the counts are found; both end in :func:`trainables.metrics.froc.interp_at_counts`."""
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    n_rows, n_pts = x.shape
    if n_rows == 0:
        return np.zeros((0, t.size))
    # one searchsorted on the flattened rows: shift row r by r * span so rows never interleave
    lo_all = min(float(x.min()), float(t.min()))
    span = max(float(x.max()), float(t.max())) - lo_all + 1.0
    off = (np.arange(n_rows, dtype=np.float64) * span)[:, None]
    flat = ((x - lo_all) + off).ravel()
    q = (t[None, :] - lo_all) + off
    j = np.searchsorted(flat, q.ravel(), side="right").reshape(n_rows, t.size)
    # points with x <= t per row, up to the rounding of the shift
    j = np.clip(j - np.arange(n_rows)[:, None] * n_pts, 0, n_pts)
    rows = np.arange(n_rows)[:, None]
    tt = np.broadcast_to(t[None, :], j.shape)
    while True:  # rounding of the shift may let a point x > t through, or keep out a point x == t
        dec = (j > 0) & (x[rows, np.maximum(j - 1, 0)] > tt)
        inc = (j < n_pts) & (x[rows, np.minimum(j, n_pts - 1)] <= tt)
        if not (dec.any() or inc.any()):
            break
        j = j - dec + inc
    return interp_at_counts(x, y, t, j)


def _bootstrap_curves(n_cases: int, n_boot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The luna16 curves of ``n_boot`` bootstrap replicates of :func:`synthetic_recordset` and the targets
    the summary reads them at (the 7 FP rates and the band grid)."""
    from trainables.metrics.bootstrap import case_weights
    from trainables.metrics.froc import luna_curves, luna_events, object_arrays
    from trainables.metrics.summary import BAND_FPS_GRID

    objs = object_arrays(synthetic_recordset(n_cases))
    w = case_weights(objs.n_cases, n_boot, np.random.default_rng(0))
    fps, recall = luna_curves(luna_events(objs), w, w @ objs.lesions_per_case(), w.sum(axis=1))
    return fps, recall, np.concatenate([LUNA_FP_RATES, BAND_FPS_GRID])


def _random_curves(n_rows: int, n_pts: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-decreasing rows with many ties (repeated x), and targets that repeat, hit points exactly, fall
    below the first point and beyond the last."""
    rng = np.random.default_rng(seed)
    steps = rng.choice([0.0, 0.0, 0.25, 1.0 / 3.0, 0.1], size=(n_rows, n_pts - 1)) * rng.integers(
        1, 4, (n_rows, 1)
    )
    x = np.concatenate([np.zeros((n_rows, 1)), np.cumsum(steps, axis=1)], axis=1)
    y = np.concatenate([np.zeros((n_rows, 1)), np.cumsum(rng.random((n_rows, n_pts - 1)), axis=1)], axis=1)
    exact = rng.choice(x.ravel(), 20)
    targets = np.concatenate(
        [[-0.5, -1e-3], exact, exact[:5], rng.uniform(0, 1.5 * x.max(), 30), [x.max() + 1]]
    )
    return x, y, targets


def bench_interp(repeats: int) -> None:
    n_boot = 1000
    cases = {
        f"bootstrap curves (200 cases, {n_boot} replicates)": _bootstrap_curves(200, n_boot),
        "random curves (ties, repeated / out-of-range targets)": _random_curves(2000, 300),
    }
    for name, (x, y, t) in cases.items():
        ok = np.isfinite(y).all(axis=1)
        x, y = x[ok], y[ok]
        t_old, old = _best(lambda x=x, y=y, t=t: _interp_rows_offset_trick_previous(x, y, t), repeats)
        t_new, new = _best(lambda x=x, y=y, t=t: interp_rows(x, y, t), repeats)
        if old.shape != new.shape or old.tobytes() != new.tobytes():
            raise AssertionError(f"interp_rows differs from the previous implementation on {name}")
        t_np, ref = _best(
            lambda x=x, y=y, t=t: np.stack([np.interp(t, xr, yr) for xr, yr in zip(x, y)]), repeats
        )
        inside = (
            t >= x[:, :1]
        )  # np.interp is flat below the first point, interp_rows extends the first segment
        differ = (ref != new) & inside
        print(
            f"interp    {name}: {x.shape[0]}x{x.shape[1]} points, {t.size} targets: previous offset trick "
            f"{t_old * 1e3:.2f} ms, per-row searchsorted {t_new * 1e3:.2f} ms, ratio new/previous "
            f"{t_new / t_old:.2f}, outputs bit-identical ({new.size} values)"
        )
        print(
            f"          np.interp per row {t_np * 1e3:.2f} ms: differs in {int(differ.sum())} of "
            f"{int(inside.sum())} in-range values, max |diff| {np.abs(ref - new)[inside].max():.1e} (rounding)"
        )


def bench_sliding_window(shape: tuple[int, int, int], repeats: int) -> None:
    import torch
    from monai.inferers import sliding_window_inference as monai_swi

    from trainables.inference import sliding_window_inference

    torch.manual_seed(0)
    models = {
        "pointwise": torch.nn.Sequential(torch.nn.Conv3d(1, 8, 1), torch.nn.ReLU(), torch.nn.Conv3d(8, 1, 1)),
        "conv3x3x3": torch.nn.Sequential(
            torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 1, 3, padding=1)
        ),
    }
    image = torch.rand(shape)
    window, stride = (64, 64, 64), (48, 48, 48)  # overlap 0.25 in MONAI's terms
    for name, model in models.items():
        model.eval()
        for ours, theirs in (("uniform", "constant"), ("gaussian", "gaussian")):

            def run_ours(model=model, ours=ours):
                return sliding_window_inference(model, image, window=window, stride=stride, blending=ours)

            def run_monai(model=model, theirs=theirs):
                with torch.inference_mode():
                    return monai_swi(image[None, None], window, 1, model, overlap=0.25, mode=theirs)[
                        0, 0
                    ].numpy()

            run_ours(), run_monai()  # warm-up
            t_ours, t_monai, a, b = float("inf"), float("inf"), None, None
            for _ in range(repeats):  # interleaved, best of each
                t, a = _best(run_ours, 1)
                t_ours = min(t_ours, t)
                t, b = _best(run_monai, 1)
                t_monai = min(t_monai, t)
            print(
                f"sliding   {name:9s} {ours:8s} {shape}: ours {t_ours:.3f} s, MONAI {t_monai:.3f} s, "
                f"ratio {t_ours / t_monai:.2f} (target <= 1.0), max |diff| {np.abs(a - b).max():.1e}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.metrics", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller volumes, fewer repeats")
    parser.add_argument(
        "--shared",
        type=Path,
        default=None,
        help="the shared folder with fixtures/paper-records (default: $IW_SHARED_DIR or ../shared)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=_SECTIONS,
        default=list(_SECTIONS),
        metavar="SECTION",
        help=f"run only these sections ({', '.join(_SECTIONS)}; default all)",
    )
    args = parser.parse_args(argv)
    print_machine()
    shared = args.shared or Path(os.environ.get("IW_SHARED_DIR", _PROJECT_ROOT.parent / "shared"))
    shared = shared if (shared / "fixtures" / "paper-records").is_dir() else None

    import torch

    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else 3
    sections = {
        "records": lambda: bench_records((150, 256, 256) if args.quick else (300, 512, 512), repeats),
        "luna16": lambda: bench_luna16(repeats, shared),
        "paper2020": lambda: bench_paper2020(shared, repeats),
        "interp": lambda: bench_interp(repeats),
        "sliding": lambda: bench_sliding_window((64, 112, 112) if args.quick else (96, 160, 160), repeats),
    }
    for name in _SECTIONS:
        if name in args.only:
            sections[name]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

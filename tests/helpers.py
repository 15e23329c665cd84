"""Small helpers shared by several test modules."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from trainables.metrics.froc import LUNA_FP_RATES
from trainables.metrics.records import RecordSet


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative path -> sha1); {} if the folder does not exist.

    Two equal snapshots mean a failed command left the folder exactly as it was.
    """
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _xy(coords):
    return np.array([[int(v) for v in line.split(",")] for line in coords.strip().splitlines()])


def reference_consensus(info, min_readers=2) -> np.ndarray:
    """Independent rasterisation: matplotlib point-in-polygon at pixel centres; outline vertices are nodule."""
    shape, zpos = info["shape"], info["z"]
    yy, xx = np.mgrid[0 : shape[1], 0 : shape[2]]
    centres = np.c_[xx.ravel(), yy.ravel()]
    per_ann: dict[int, np.ndarray] = {}
    holes: dict[int, np.ndarray] = {}
    for ann, inclusion, z, coords in info["contours"]:
        xy = _xy(coords)
        k = int(np.argmin(np.abs(zpos - z)))
        assert abs(zpos[k] - z) < 1e-3
        inside = _mpl_path(xy).contains_points(centres).reshape(shape[1:])
        vertices = np.zeros(shape[1:], bool)
        vertices[xy[:, 1], xy[:, 0]] = True
        if inclusion:
            vol = per_ann.setdefault(ann, np.zeros(shape, bool))
            vol[k] |= inside | vertices
        else:
            vol = holes.setdefault(ann, np.zeros(shape, bool))
            vol[k] |= inside & ~vertices
    count = np.zeros(shape, np.int32)
    for ann, vol in per_ann.items():
        count += vol & ~holes.get(ann, np.zeros(shape, bool))
    return (count >= min_readers).astype(np.uint8)


def _mpl_path(xy):
    from matplotlib.path import Path as MplPath

    return MplPath(xy)


def reference_sliding_window(model, image, *, window, stride, blending="uniform", sigma_scale=0.125, device="cpu",
                             amp=None, pad_value=None) -> np.ndarray:
    """The sliding window as it was before the GPU path (issue 32): one window per forward pass, each window's
    logits copied to the host and added into a host float32 sum, normalised there. The device-side stitching
    must reproduce it bit for bit on the CPU (tests), and the inference benchmark times it as "before"."""
    import contextlib
    import itertools

    import torch

    from trainables.inference import importance_map, window_starts

    x = torch.as_tensor(np.array(image, dtype=np.float32))
    shape = tuple(x.shape)
    pads = [max(w - s, 0) for w, s in zip(window, shape)]
    before = [p // 2 for p in pads]
    if any(pads):
        fill = float(x.min()) if pad_value is None else float(pad_value)
        padded = torch.full(tuple(s + p for s, p in zip(shape, pads)), fill, dtype=torch.float32)
        padded[tuple(slice(b, b + s) for b, s in zip(before, shape))] = x
        x = padded
    full = tuple(x.shape)
    starts = [window_starts(n, w, s) for n, w, s in zip(full, window, stride)]
    weight = importance_map(window, blending, sigma_scale)
    total = torch.zeros(full)
    norm = torch.zeros(full)
    autocast = contextlib.nullcontext() if amp is None else torch.autocast(torch.device(device).type, dtype=amp)
    model.eval()
    with torch.inference_mode():
        for corner in itertools.product(*starts):
            sl = tuple(slice(c, c + w) for c, w in zip(corner, window))
            with autocast:
                out = model(x[sl][None, None].to(device))
            out = out.reshape(*window).float().cpu()
            if blending == "uniform":
                total[sl] += out
            else:
                total[sl].addcmul_(out, weight)
                norm[sl] += weight
    if blending == "uniform":
        counts = []
        for n, w, axis_starts in zip(full, window, starts):
            c = torch.zeros(n)
            for a in axis_starts:
                c[a : a + w] += 1.0
            counts.append(c)
        plane = counts[1][:, None] * counts[2][None, :]
        for i, c in enumerate(counts[0].tolist()):
            total[i] /= plane * c
    else:
        total /= norm
    return total[tuple(slice(b, b + s) for b, s in zip(before, shape))].numpy()


def paper2020_loop(recordset: RecordSet) -> tuple[float, float]:
    """The paper2020 avg recall (mean, std) as a plain loop: for every subsample and every threshold, filter
    the subsample's records again (the shape of the authors' notebook code). Reference for the test of paper2020 and for ``benchmarks.metrics``."""
    ids = sorted(cid for cid, c in recordset.items() if c.records)
    n_ids = len(ids)
    comp_logits = [r["self_logit"] for c in recordset.values() for r in c.records if not r["is_tum"]]
    m = max(v for v in comp_logits if np.isfinite(v))
    thresholds = np.concatenate([np.linspace(-0.1, 10, 101), np.linspace(10, m + 1, 100)])
    rs = np.random.RandomState(42)
    order = list(ids)
    values = []
    for _ in range(50):
        rs.shuffle(order)
        recs = [r for cid in order[: int(0.8 * n_ids)] for r in recordset[cid].records]
        recall, fps = [], []
        for t in thresholds:
            kept = [r for r in recs if r["self_logit"] >= t]
            tp = sum(1 for r in kept if r["is_tum"] and r["hit_dice"] > 0 and r["hit_logit"] >= t)
            fn = sum(1 for r in kept if r["is_tum"] and (r["hit_dice"] <= 0 or r["hit_logit"] < t))
            fp = sum(1 for r in kept if not r["is_tum"] and r["hit_dice"] <= 0 and r["self_logit"] > t)
            recall.append(tp / (tp + fn))
            fps.append(fp / n_ids)
        fps.append(0.0)
        recall.append(0.0)
        values.append(float(np.mean(np.interp(LUNA_FP_RATES, fps[::-1], recall[::-1]))))
    return float(np.mean(values)), float(np.std(values))


def rewrite_as_version_1(root: Path) -> None:
    """Rewrite a prepared cache in place the way cache version 1 wrote it (a uint8 mask.npy beside int32 labels,
    version 1 in cache.json): the reference for "an old cache still loads" (tests, ``benchmarks.preparation``)."""
    import json

    index = json.loads((root / "cache.json").read_text())
    for c in index["cases"]:
        folder = root / "cases" / c["case_id"]
        labels = np.load(folder / "labels.npy")
        np.save(folder / "mask.npy", (labels != 0).astype(np.uint8))
        np.save(folder / "labels.npy", labels.astype(np.int32))
    index["version"] = 1
    index.pop("image_dtype", None)
    (root / "cache.json").write_text(json.dumps(index))

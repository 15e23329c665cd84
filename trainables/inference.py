"""Whole-volume sliding-window prediction (docs/definitions.md §6).

The authors predict 160³ windows with stride 144 and average the overlaps uniformly; Gaussian blending (MONAI /
nnU-Net importance map, sigma = ``sigma_scale`` x window) is an option. Windows lie on a regular grid whose last
window along each axis is aligned to the far edge; a volume smaller than the window is padded (symmetrically, as
MONAI) and cropped back. The output is accumulated in place into one float32 sum volume (and, for Gaussian
blending, one float32 weight volume), so memory stays at about two volumes whatever the number of windows. On a
GPU the volume, the windows and the sums all stay on the device: only the final logits leave it.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["BLENDINGS", "auto_batch_size", "importance_map", "sliding_window_inference", "sliding_window_logits",
           "window_starts"]

BLENDINGS = ("uniform", "gaussian")


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: ``0, stride, 2 stride, ...`` while the window fits, the last one moved back
    to ``size - window`` (the far edge). ``size >= window`` is required (pad first)."""
    if size < window:
        raise ValueError(f"axis of size {size} is smaller than the window {window}; pad it first")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def importance_map(
    window: Sequence[int], blending: str = "uniform", sigma_scale: float = 0.125
) -> torch.Tensor:
    """Weight of every voxel of a window: ones (``uniform``), or a separable Gaussian centred on the window with
    sigma = ``sigma_scale`` x side, non-normalised, floored at max(its minimum, 1e-3) (MONAI's
    ``compute_importance_map``). Returns a float32 tensor of shape ``window``."""
    if blending not in BLENDINGS:
        raise ValueError(f"blending must be one of {', '.join(BLENDINGS)}, got {blending!r}")
    if blending == "uniform":
        return torch.ones(tuple(window), dtype=torch.float32)
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    weight = torch.ones((), dtype=torch.float32)
    for side in window:
        x = torch.arange(side, dtype=torch.float32) - (side - 1) / 2.0
        g = torch.exp(x**2 / (-2.0 * (side * sigma_scale) ** 2))
        weight = weight.unsqueeze(-1) * g
    return weight.clamp_(min=max(float(weight.min()), 1e-3))


def _as_volume(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(image, np.ndarray) and not image.flags.writeable:
        image = np.array(image, dtype=np.float32)  # read-only memory map (the cache): torch needs writable memory
    x = torch.as_tensor(image)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"image must be (D, H, W) or (1, D, H, W), got shape {tuple(x.shape)}")
    return x.to(torch.float32)


def study_logits(model: torch.nn.Module, image, inference, *, device, dtype: torch.dtype | None = None
                 ) -> torch.Tensor:
    """:func:`sliding_window_logits` with a study's ``inference`` section (window, stride, blending, batch size,
    test-time augmentation) and the autocast ``dtype`` the model was trained in (None: float32)."""
    return sliding_window_logits(model, image, window=inference.window, stride=inference.stride,
                                 blending=inference.blending, device=device, batch_size=inference.batch_size,
                                 amp=dtype, tta=inference.tta)


def sliding_window_inference(model: torch.nn.Module, image: np.ndarray | torch.Tensor, **kwargs) -> np.ndarray:
    """Logits of a whole volume from a model applied to overlapping windows, as a float32 numpy array (D, H, W):
    :func:`sliding_window_logits` (same arguments) brought to the host."""
    return sliding_window_logits(model, image, **kwargs).cpu().numpy()


def sliding_window_logits(
    model: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    *,
    window: Sequence[int] = (160, 160, 160),
    stride: Sequence[int] = (144, 144, 144),
    blending: str = "uniform",
    sigma_scale: float = 0.125,
    device: str | torch.device = "cpu",
    batch_size: int | None = 1,
    amp: torch.dtype | None = None,
    pad_value: float | None = None,
    divisible: int | Sequence[int] | None = None,
    tta: str = "none",
    progress: bool = False,
) -> torch.Tensor:
    """Logits of a whole volume from a model applied to overlapping windows, left on ``device``.

    The volume is copied to ``device`` once; windows are cut, batched, predicted, summed and normalised there,
    so a GPU never waits for the host between windows. Should the sum volumes not fit on the GPU, they are kept
    on the host instead (nnU-Net's fallback), with a note on stderr.

    Args:
        model: maps (B, 1, *window) float32 to (B, 1, *window) logits; put in eval mode here.
        image: (D, H, W) or (1, D, H, W), any real dtype (cast to float32).
        window: window side per axis; each a positive multiple of ``divisible``.
        stride: step per axis, in [1, window].
        blending: ``"uniform"`` (average of the overlapping windows, the authors') or ``"gaussian"``.
        sigma_scale: Gaussian sigma as a fraction of the window side.
        device: where the model runs and the windows are stitched.
        batch_size: windows per forward pass; ``None`` = chosen for the device (:func:`auto_batch_size`: 1 on
            a CPU; on a GPU from the memory the first window took). A batch that runs out of GPU memory is
            split in two and retried.
        amp: the autocast dtype of the forward pass (``torch.bfloat16`` or ``torch.float16``; the trials pass
            their :attr:`trainables.step.Precision.dtype`, so inference runs in the dtype the model was trained
            in), or ``None`` for float32. The output stays float32.
        pad_value: value of the padding for volumes smaller than the window (default: the image minimum).
        divisible: required divisor of the window sides, one or per axis; None = the model's ``divisor`` (the
            networks of :mod:`trainables.networks` have one; 8 otherwise, the U-Net's three poolings).
        tta: ``"none"`` or ``"mirror"``: every window is also predicted flipped along each subset of the three
            axes and the 8 logits (flipped back) are averaged (nnU-Net's test-time mirroring).
        progress: print a window counter to stderr.

    Returns:
        float32 logits tensor (D, H, W) on ``device`` (on the host after the out-of-memory fallback).
        On the CPU with ``batch_size`` 1 the values are bit for bit those of a plain loop over the windows that
        adds each window's logits into a float32 sum and divides by the window count.
    """
    x = _as_volume(image)
    window = tuple(int(w) for w in window)
    stride = tuple(int(s) for s in stride)
    if len(window) != 3 or len(stride) != 3:
        raise ValueError(f"window and stride need 3 values each, got {window} and {stride}")
    if divisible is None:
        divisible = getattr(model, "divisor", 8)
    div = (int(divisible),) * 3 if isinstance(divisible, int) else tuple(int(d) for d in divisible)
    if any(w <= 0 or w % d for w, d in zip(window, div)):
        raise ValueError(f"window sides must be positive multiples of {div if len(set(div)) > 1 else div[0]}, "
                         f"got {window}")
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    if any(not 1 <= s <= w for s, w in zip(stride, window)):
        raise ValueError(f"stride must be in [1, window] per axis, got stride {stride} for window {window}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (chosen for the device), got {batch_size}")
    device = torch.device(device)

    shape = tuple(x.shape)
    pads = [max(w - s, 0) for w, s in zip(window, shape)]
    if any(pads):
        fill = float(x.min()) if pad_value is None else float(pad_value)
        before = [p // 2 for p in pads]
        padded = torch.full(tuple(s + p for s, p in zip(shape, pads)), fill, dtype=torch.float32)
        padded[tuple(slice(b, b + s) for b, s in zip(before, shape))] = x
        x = padded
    else:
        before = [0, 0, 0]
    full = tuple(x.shape)
    uniform = blending == "uniform"
    weight_win = importance_map(window, blending, sigma_scale)
    starts = [window_starts(n, w, s) for n, w, s in zip(full, window, stride)]
    corners = list(itertools.product(*starts))

    stitch = _Stitch.allocate(full, uniform, device)
    x = x.to(stitch.device)  # one copy of the volume; the windows are cut where they are stitched
    weight_win = weight_win.to(stitch.device)
    autocast = contextlib.nullcontext() if amp is None else torch.autocast(device.type, dtype=amp)
    if batch_size is None and device.type != "cuda":
        batch_size = 1
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            b = 0
            while b < len(corners):
                n = 1 if batch_size is None else min(batch_size, len(corners) - b)
                slices = [tuple(slice(c, c + w) for c, w in zip(corner, window)) for corner in corners[b : b + n]]
                out = _forward_windows(model, x, slices, window, device, autocast, tta == "mirror")
                if out is None:  # a batch ran out of GPU memory: half of it, same windows
                    batch_size = max(1, n // 2)
                    continue
                if batch_size is None:  # the first window measured what one costs: batch the rest
                    batch_size = auto_batch_size(device)
                out = out.to(stitch.device)
                for k, sl in enumerate(slices):
                    if uniform:
                        stitch.total[sl] += out[k]
                    else:
                        stitch.total[sl].addcmul_(out[k], weight_win)
                        stitch.norm[sl] += weight_win
                b += n
                if progress:
                    print(f"\rwindow {b}/{len(corners)}", end="", file=sys.stderr, flush=True)
    finally:
        model.train(was_training)
    if progress:
        print(file=sys.stderr)
    total = stitch.total
    if uniform:  # the count of windows per voxel is separable: a product of per-axis counts, no volume
        counts = []
        for n, w, axis_starts in zip(full, window, starts):
            c = torch.zeros(n, dtype=torch.float32)
            for a in axis_starts:
                c[a : a + w] += 1.0
            counts.append(c)
        plane = (counts[1][:, None] * counts[2][None, :]).to(total.device)
        for i, c in enumerate(counts[0].tolist()):  # slice by slice: no count volume
            total[i] /= plane * c
    else:
        total /= stitch.norm
    crop = tuple(slice(b, b + s) for b, s in zip(before, shape))
    return total[crop].contiguous() if any(pads) else total


class _Stitch:
    """The float32 sum volume (and, for Gaussian blending, the weight-sum volume) windows are added into."""

    def __init__(self, total: torch.Tensor, norm: torch.Tensor | None):
        self.total, self.norm = total, norm
        self.device = total.device

    @classmethod
    def allocate(cls, shape: tuple[int, ...], uniform: bool, device: torch.device) -> _Stitch:
        try:
            return cls(torch.zeros(shape, dtype=torch.float32, device=device),
                       None if uniform else torch.zeros(shape, dtype=torch.float32, device=device))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"note: the sums of a {'x'.join(map(str, shape))} volume do not fit on {device}: the windows are "
                  "stitched on the host", file=sys.stderr, flush=True)
            return cls.allocate(shape, uniform, torch.device("cpu"))


def _forward_windows(model, x, slices, window, device, autocast, mirror: bool = False) -> torch.Tensor | None:
    """Logits ``(n, *window)`` float32 of the windows ``slices`` of ``x``, on ``device``; None when a batch of
    several windows ran out of GPU memory (the caller splits it)."""
    if len(slices) == 1:  # a view, no copy
        inp = x[slices[0]][None, None].to(device, non_blocking=True)
    else:
        inp = torch.stack([x[sl] for sl in slices])[:, None].to(device, non_blocking=True)
    measure = device.type == "cuda" and len(slices) == 1
    if measure:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        with autocast:
            out = mirrored(model, inp) if mirror else model(inp)
    except torch.cuda.OutOfMemoryError:
        if len(slices) == 1:
            raise
        del inp
        torch.cuda.empty_cache()
        return None
    if measure:
        _WINDOW_BYTES[str(device)] = max(1, torch.cuda.max_memory_allocated(device) - base)
    if tuple(out.shape) not in ((len(slices), 1, *window), (len(slices), *window)):
        raise ValueError(f"model output must be (B, 1, *window) = {(len(slices), 1, *window)}, got {tuple(out.shape)}")
    return out.reshape(len(slices), *window).float()


#: test-time augmentation of the inference (``inference.tta``)
TTA_MODES = ("none", "mirror")
#: the flips of test-time mirroring: every subset of the three spatial axes of a (B, C, D, H, W) batch
MIRROR_AXES = tuple(tuple(a for a, on in zip((2, 3, 4), bits) if on) for bits in itertools.product((0, 1), repeat=3))


def mirrored(model, x: torch.Tensor) -> torch.Tensor:
    """nnU-Net's test-time mirroring: the mean of the 8 predictions of ``x`` flipped along each subset of its
    spatial axes, each flipped back (float32 logits)."""
    total = None
    for axes in MIRROR_AXES:
        out = model(torch.flip(x, axes) if axes else x).float()
        out = torch.flip(out, axes) if axes else out
        total = out if total is None else total.add_(out)
    return total / len(MIRROR_AXES)


#: GPU memory one window's forward pass took (measured on the first window of a volume)
_WINDOW_BYTES: dict[str, int] = {}

#: at most this many windows per forward pass: beyond it a GPU is already saturated
MAX_AUTO_BATCH = 8


def auto_batch_size(device: torch.device) -> int:
    """Windows per forward pass on ``device``: 1 on a CPU (no gain, more memory); on a GPU as many as half its
    free memory holds by what one window took (measured), at most :data:`MAX_AUTO_BATCH`."""
    device = torch.device(device)
    if device.type != "cuda" or str(device) not in _WINDOW_BYTES:
        return 1
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(MAX_AUTO_BATCH, int(0.5 * free // _WINDOW_BYTES[str(device)])))

"""One SGD iteration of a trial, the numeric precision it runs in, and its batches on the device.

The trainer (:mod:`trainables.trainer`), the timings (:mod:`trainables.timing`) and ``study gpu-check`` call the
same :func:`train_step`, so what is measured is exactly what the trials run.

Precision (``training.amp``):

- off: float32 everywhere (on Ampere and newer GPUs cuDNN's convolutions use TF32, PyTorch's default).
- on, on a GPU: bfloat16 autocast where the GPU computes bf16 natively (Ampere and newer), no loss scaling (bf16
  has float32's exponent range); otherwise (V100, T4, ...) float16 autocast with a ``GradScaler``, whose state is
  saved in the trial's checkpoint. ``torch.cuda.is_bf16_supported()`` alone also counts emulated bf16, which
  is slower than fp16 there: native support is asked for. Inference uses the training dtype
  (:attr:`Precision.dtype`). The network's output block always runs in float32 (:class:`trainables.unet.UNet3D`),
  so the logits, their confidences and calibration keep float32 resolution.
- on, on a CPU: float32. Measured on this project's machine (AMD EPYC with avx512_bf16, torch 2.13.0 CPU,
  U-Net width 0.25, 2×1×16³, Dice, 8 SGD steps, three identical repetitions in one process): bf16 autocast
  training gave three different loss curves, one stalled at 0.825 and one NaN from the second step, where
  float32 gives the same decreasing curve every time. A CPU trial never runs the bf16 training step.
- The loss is always computed in float32 on the float32 cast of the logits.

The step never waits for the GPU: the loss stays a device tensor, and the trainer checks a window of losses for
NaN/inf with one host sync (``trainables.trainer.CHECK_EVERY``); the batch of the next step is copied to the GPU
while the current one runs (:class:`DevicePrefetcher`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of a device (``None`` = float32) and whether gradients need loss scaling."""

    device_type: str
    dtype: torch.dtype | None

    @classmethod
    def for_device(cls, device: torch.device | str, amp: bool) -> Precision:
        device = torch.device(device)
        if not amp or device.type != "cuda":
            return cls(device.type, None)
        if not native_bf16():
            return cls(device.type, torch.float16)
        return cls(device.type, torch.bfloat16)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        """The autocast context of the forward pass (a no-op in float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is enabled only for float16 (a disabled one passes gradients through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


def native_bf16() -> bool:
    """Whether the current GPU computes bfloat16 natively (compute capability 8.0+), not by emulation."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning: every training patch and inference window of a study has one fixed shape."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def supervised_loss(loss_fn, logits: torch.Tensor, target, weight) -> torch.Tensor:
    """The loss of a network's output: ``loss_fn(logits, target, weight)``, or for a deep-supervised network's
    stacked heads ``(B, heads, C, D, H, W)`` (full resolution first, every head at the target's size) the sum of
    each head's loss times nnU-Net's weights (:func:`trainables.networks.deep_supervision_weights`); the iw map
    weighs every head alike."""
    if logits.ndim != 6:
        return loss_fn(logits, target, weight)
    from trainables.networks import deep_supervision_weights

    weights = deep_supervision_weights(logits.shape[1])
    return sum(w * loss_fn(logits[:, i], target, weight) for i, w in enumerate(weights) if w > 0)


def train_step(model, optimizer, scaler, loss_fn, image, target, weight, precision: Precision) -> torch.Tensor:
    """Forward, loss, backward and SGD update on one batch; returns the loss as a detached 0-d device tensor.

    No host sync: the caller checks the losses for NaN/inf in windows (a non-finite loss ends the trial before
    the epoch's checkpoint, so an update made from it is never kept). Under fp16 the GradScaler skips the update
    of a step whose gradients overflow, as always. ``weight`` is the batch's iw map or ``None``.
    """
    with precision.autocast():
        logits = model(image)
    loss = supervised_loss(loss_fn, logits.float(), target, weight)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


@dataclass(frozen=True)
class DeviceBatch:
    """A training batch on the trial's device: image float32, target uint8 (0/1), the iw map (float32) or None,
    and the per-lesion extras the loss takes (``labels`` / ``regions``, int32)."""

    image: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None
    extras: dict[str, torch.Tensor]


class DevicePrefetcher:
    """The sampler's batches as :class:`DeviceBatch` es, each copied to the GPU one step ahead.

    On a GPU the copy of batch k + 1 is issued on a side stream from pinned host memory (the sampler allocates
    its batches pinned; batches from process workers are pinned here) as soon as batch k is handed out, so it
    overlaps step k; the consumer's stream waits for it only when it takes the batch. On a CPU the arrays are
    wrapped without a copy.
    """

    def __init__(self, batches: Iterator, device: torch.device, *, iw: bool, extras: Sequence[str] = ()):
        self.batches, self.device, self.iw, self.extras = batches, torch.device(device), iw, tuple(extras)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._next: DeviceBatch | None = None

    def _to_device(self, batch) -> DeviceBatch:
        arrays = {"image": batch.image, "target": batch.target}
        if self.iw:
            arrays["weight"] = batch.weight
        if self.extras:
            arrays.update(batch.extras(self.extras))
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
        if self.cuda:
            with torch.cuda.stream(self.stream):
                tensors = {k: (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)
                           for k, t in tensors.items()}
        return DeviceBatch(tensors.pop("image"), tensors.pop("target"), tensors.pop("weight", None), tensors)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> DeviceBatch:
        if not self.cuda:
            return self._to_device(next(self.batches))
        if self._next is None:
            self._next = self._to_device(next(self.batches))
        batch, self._next = self._next, None
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for t in (batch.image, batch.target, batch.weight, *batch.extras.values()):
            if t is not None:
                t.record_stream(current)  # the side stream's memory is in use on the compute stream now
        self._next = self._to_device(next(self.batches))  # the next copy overlaps this step
        return batch

"""One SGD iteration of a trial and the numeric precision it runs in.

The trainable (:mod:`trainables.trainable`) and the GPU benchmark (:mod:`trainables.gpu_bench`) call the same
:func:`train_step`, so the benchmark times exactly what the trials run.

Precision (``training.amp``):

- off: float32 everywhere.
- on, on a GPU: bfloat16 autocast where the GPU supports it (Ampere and newer), no loss scaling (bf16 has
  float32's exponent range); otherwise (older GPUs) float16 autocast with a ``GradScaler``, whose state is
  saved in the trial's checkpoint. Inference uses the same dtype as training (:attr:`Precision.dtype`).
- on, on a CPU: float32. Measured on this project's machine (AMD EPYC with avx512_bf16, torch 2.13.0 CPU,
  U-Net width 0.25, 2×1×16³, Dice, 8 SGD steps, three identical repetitions in one process): bf16 autocast
  training gave three different loss curves, one stalled at 0.825 and one NaN from the second step, where
  float32 gives the same decreasing curve every time. A CPU trial never runs the bf16 training step.
- The loss is always computed in float32 on the float32 cast of the logits.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainables.config import StudyConfig, TrialSpec


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
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
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


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning: every training patch and inference window of a study has one fixed shape."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def train_step(model, optimizer, scaler, loss_fn, image, target, weight, precision: Precision) -> float:
    """Forward, loss, backward and SGD update on one batch; returns the loss value.

    A non-finite loss is returned without any update (the caller ends the trial with its reason).
    ``weight`` is the batch's iw map or ``None``; it is passed to the loss as given.
    """
    with precision.autocast():
        logits = model(image)
    loss = loss_fn(logits.float(), target, weight)
    value = float(loss.detach())  # the one host sync per iteration: the divergence check needs it
    if not math.isfinite(value):
        return value
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return value


def time_steps(model, optimizer, loss_fn, image, target, weight, precision: Precision, *,
               iters: int, warmup: int) -> tuple[list[float], float]:
    """Seconds of each of ``iters`` calls of :func:`train_step` after ``warmup`` untimed ones (GPU synced),
    and the loss of the last step."""
    import time

    scaler = precision.scaler()

    def sync() -> None:
        if image.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        train_step(model, optimizer, scaler, loss_fn, image, target, weight, precision)
    sync()
    times, loss = [], float("nan")
    for _ in range(iters):
        t0 = time.perf_counter()
        loss = train_step(model, optimizer, scaler, loss_fn, image, target, weight, precision)
        sync()
        times.append(time.perf_counter() - t0)
    return times, loss


def step_seconds(study: StudyConfig, trial: TrialSpec, *, iters: int = 3, warmup: int = 1) -> float:
    """Median seconds of one training step of ``trial`` under the ``study`` config on this machine's CPU, with
    the threads a trial gets (random data of the patch size: the step's cost does not depend on it)."""
    import statistics

    from trainables.evaluate import build_model
    from trainables.losses import get_loss
    from trainables.trainer import build_optimizer

    t = study.training
    threads = torch.get_num_threads()
    torch.set_num_threads(study.resources.threads)
    try:
        torch.manual_seed(0)
        model = build_model(study.model)
        opt = build_optimizer(model, t.optimizer)
        shape = (t.batch_size, 1, *t.patch_size)
        image = torch.rand(shape)
        target = (torch.rand(shape) > 0.97).float()
        weight = torch.ones(shape) if trial.iw else None
        times, _ = time_steps(model, opt, get_loss(trial.loss, **trial.params), image, target, weight,
                              Precision.for_device("cpu", False), iters=iters, warmup=warmup)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def layout_seconds(study: StudyConfig, trial: TrialSpec, *, rounds: int = 6, device: str = "cpu") -> dict[str, float]:
    """Median seconds of one training step of ``trial`` in the plain NCDHW layout and in channels-last, measured
    side by side: the two models (same weights) step in alternation, ``rounds`` times each after one warm-up
    step, so a load change on the machine hits both. Returns ``{"ncdhw": s, "channels_last": s}``."""
    import statistics

    from trainables.evaluate import build_model
    from trainables.losses import get_loss
    from trainables.trainer import build_optimizer

    t = study.training
    threads = torch.get_num_threads()
    torch.set_num_threads(study.resources.threads)
    try:
        shape = (t.batch_size, 1, *t.patch_size)
        image = torch.rand(shape, device=device)
        target = (torch.rand(shape, device=device) > 0.97).float()
        weight = torch.ones(shape, device=device) if trial.iw else None
        loss_fn = get_loss(trial.loss, **trial.params)
        precision = Precision.for_device(device, t.amp)
        runs = {}
        for name, cl in (("ncdhw", False), ("channels_last", True)):
            torch.manual_seed(0)
            model = build_model(study.model.model_copy(update={"channels_last": cl})).to(device)
            runs[name] = (model, build_optimizer(model, t.optimizer))
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(rounds + 1):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for name in order:
                model, opt = runs[name]
                step, _ = time_steps(model, opt, loss_fn, image, target, weight, precision, iters=1, warmup=0)
                if r:  # round 0 warms both up
                    times[name].extend(step)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(v) for name, v in times.items()}

"""Timings of the trials' own training step: the estimate of ``study launch --dry-run``, the per-study choice of
memory layout and ``torch.compile`` (``study.stages.setup.choose_step_setup``) and ``study gpu-check``.

Every timing calls :func:`trainables.step.train_step` on a model, optimiser and precision built by
:mod:`trainables.build` exactly as a trial builds them, on random data of the patch size (a step's cost does not
depend on the data), with the threads a trial gets.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from trainables.build import build_model, build_optimizer, compiled
from trainables.config import StudyConfig, TrialSpec
from trainables.losses import get_loss
from trainables.step import Precision, train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, optimizer, loss_fn, image, target, weight, precision: Precision, *,
               iters: int, warmup: int) -> tuple[list[float], float]:
    """Seconds of each of ``iters`` calls of :func:`train_step` after ``warmup`` untimed ones (GPU synced after
    each), and the loss of the last step."""
    scaler = precision.scaler()
    for _ in range(warmup):
        train_step(model, optimizer, scaler, loss_fn, image, target, weight, precision)
    _sync(image.device)
    times, loss = [], torch.tensor(float("nan"))
    for _ in range(iters):
        t0 = time.perf_counter()
        loss = train_step(model, optimizer, scaler, loss_fn, image, target, weight, precision)
        _sync(image.device)
        times.append(time.perf_counter() - t0)
    return times, float(loss)


class StepBench:
    """The study's step of one trial, ready to time on ``device``: random batch of the patch size (target
    uint8, iw map when the trial has iw), the loss, the precision of ``training.amp`` on that device."""

    def __init__(self, study: StudyConfig, trial: TrialSpec, device: str | torch.device = "cpu"):
        t = study.training
        self.study, self.device = study, torch.device(device)
        shape = (t.batch_size, 1, *t.patch_size)
        g = torch.Generator().manual_seed(0)
        self.image = torch.rand(shape, generator=g).to(self.device)
        self.target = (torch.rand(shape, generator=g) > 0.97).to(torch.uint8).to(self.device)
        self.weight = torch.ones(shape, device=self.device) if trial.iw else None
        self.loss_fn = get_loss(trial.loss, **trial.loss_params)
        self.precision = Precision.for_device(self.device, t.amp)

    def runner(self, *, channels_last: bool | None = None, compile: bool | None = None
               ) -> Callable[[int, int], list[float]]:
        """``run(iters, warmup) -> seconds per step`` of a fresh model (seed 0) in the given layout and mode."""
        model_cfg = self.study.model if channels_last is None else \
            self.study.model.model_copy(update={"channels_last": channels_last})
        torch.manual_seed(0)
        model = build_model(model_cfg, self.study.training.patch_size).to(self.device)
        opt = build_optimizer(model, self.study.training.optimizer)
        forward = compiled(model, compile)

        def run(iters: int, warmup: int) -> list[float]:
            times, _ = time_steps(forward, opt, self.loss_fn, self.image, self.target, self.weight,
                                  self.precision, iters=iters, warmup=warmup)
            return times

        return run


class _Threads:
    """``torch.set_num_threads(n)`` for the block (the threads a trial gets), restored after."""

    def __init__(self, n: int):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def step_seconds(study: StudyConfig, trial: TrialSpec, *, iters: int = 3, warmup: int = 1,
                 device: str | torch.device = "cpu") -> float:
    """Median seconds of one training step of ``trial`` under the ``study`` config on ``device``."""
    with _Threads(study.resources.threads):
        return statistics.median(StepBench(study, trial, device).runner()(iters, warmup))


def estimate_step_seconds(study: StudyConfig, trial: TrialSpec, *, slow_s: float = 2.0,
                          device: str | torch.device = "cpu") -> float:
    """Seconds of one training step for a plan: the first step when it is slower than ``slow_s`` (a paper-sized
    patch on a CPU takes minutes; its one-off costs are small beside it), else the median of three more."""
    with _Threads(study.resources.threads):
        run = StepBench(study, trial, device).runner()
        first = run(1, 0)[0]
        return first if first > slow_s else statistics.median(run(3, 0))


def alternating_seconds(runs: dict[str, Callable[[int, int], list[float]]], rounds: int) -> dict[str, float]:
    """Median seconds per step of each runner, measured side by side: one step each in alternating order,
    ``rounds`` times after one warm-up round, so a load change on the machine hits all of them."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            step = runs[name](1, 0)
            if r:  # round 0 warms them up
                times[name].extend(step)
    return {name: statistics.median(v) for name, v in times.items()}


def layout_seconds(study: StudyConfig, trial: TrialSpec, *, rounds: int = 6,
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """Median seconds of one training step of ``trial`` in the plain NCDHW layout and in channels-last, measured
    side by side (:func:`alternating_seconds`; same weights). Returns ``{"ncdhw": s, "channels_last": s}``."""
    with _Threads(study.resources.threads):
        bench = StepBench(study, trial, device)
        runs = {"ncdhw": bench.runner(channels_last=False), "channels_last": bench.runner(channels_last=True)}
        return alternating_seconds(runs, rounds)


def compile_seconds(study: StudyConfig, trial: TrialSpec, *, rounds: int = 6,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """The eager and the ``torch.compile`` d step side by side (the layout of ``study.model``), and the seconds
    the compilation itself took: ``{"eager": s, "compiled": s, "compile_time": s}``."""
    with _Threads(study.resources.threads):
        bench = StepBench(study, trial, device)
        runs = {"eager": bench.runner(compile=False), "compiled": bench.runner(compile=True)}
        t0 = time.perf_counter()
        runs["compiled"](1, 1)  # the compilation (and its first step)
        compile_time = time.perf_counter() - t0
        return {**alternating_seconds(runs, rounds), "compile_time": compile_time}


#: a faster variant (channels-last, compiled) must beat the plain one by this fraction of its step time
MARGIN = 0.05


def step_choices(study: StudyConfig, trial: TrialSpec, *, layout: bool, compile: bool, rounds: int = 6,
                 device: str | torch.device | None = None) -> dict:
    """What the trials of a study should run, measured on this process's device (the GPU Ray gave the task, or
    the CPU; ``device`` overrides it): ``layout``: NCDHW vs channels-last side by side; ``compile``: eager vs ``torch.compile`` in the
    chosen layout (a compilation that fails is reported and eager kept). Each choice is
    ``{"<name>": bool, "measured": {...}, "reason": str}``; ``device`` names where it was measured and
    ``step_seconds`` is the chosen step's median."""
    from trainables.device import task_device
    from trainables.step import configure_backends

    device = task_device(study.resources.gpu) if device is None else torch.device(device)
    configure_backends(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    kind = "GPU" if device.type == "cuda" else "CPU"
    out: dict = {"device": where}
    channels_last = study.model.channels_last
    if layout:
        ms = layout_seconds(study, trial, rounds=rounds, device=device)
        channels_last = ms["channels_last"] < (1 - MARGIN) * ms["ncdhw"]
        out["layout"] = {"channels_last": channels_last, "measured": {k: round(v, 4) for k, v in ms.items()},
                         "reason": f"{kind} step {1000 * ms['ncdhw']:.0f} ms NCDHW vs {1000 * ms['channels_last']:.0f} "
                                   f"ms channels-last on {where}, measured side by side "
                                   f"({'channels-last' if channels_last else 'NCDHW'}: channels-last must be "
                                   f"{100 * MARGIN:.0f} % faster)"}
        out["step_seconds"] = ms["channels_last" if channels_last else "ncdhw"]
    chosen = study.model_copy(update={"model": study.model.model_copy(update={"channels_last": bool(channels_last)})})
    if compile:
        try:
            ms = compile_seconds(chosen, trial, rounds=rounds, device=device)
        except Exception as exc:  # noqa: BLE001 - no compiler toolchain, an unsupported op: eager it is, said so
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            out["compile"] = {"compile": False, "measured": None,
                              "reason": f"torch.compile failed on {where} ({type(exc).__name__}: {first}): eager"}
        else:
            on = ms["compiled"] < (1 - MARGIN) * ms["eager"]
            out["compile"] = {"compile": on, "measured": {k: round(v, 4) for k, v in ms.items()},
                              "reason": f"{kind} step {1000 * ms['eager']:.0f} ms eager vs {1000 * ms['compiled']:.0f} ms "
                                        f"compiled on {where} (compilation {ms['compile_time']:.0f} s; compiled must "
                                        f"be {100 * MARGIN:.0f} % faster)"}
            out["step_seconds"] = ms["compiled" if on else "eager"]
    return out

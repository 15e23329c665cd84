"""The measurements of ``study gpu-check``: what a GPU does with this project's trials, measured once.

Each section is a function that returns plain data (JSON) and times the code the trials run: the step of
:mod:`trainables.step` on models and optimisers from :mod:`trainables.build`, the patch sampler with its pinned
batches and the device prefetcher, the sliding window of :mod:`trainables.inference` with the records of
:mod:`trainables.evaluate`, Ray's fractional GPUs with the memory cap of :mod:`trainables.device`.

=============  =============================================================================================
section        what it measures
=============  =============================================================================================
env            GPU, compute capability, memory, CUDA build, cuDNN, native bf16, TF32 flags; that a Ray task with
               ``num_gpus=1`` gets CUDA
step           the paper's step (2 x 1 x 128³, width 1.0) per paper configuration, fp32 (TF32 convolutions, PyTorch's
               default) and AMP: ms/iteration, peak memory, the 10,000-iteration projection
layout         NCDHW vs channels-last (AMP off and on) and eager vs ``torch.compile`` (with compilation time)
loop           the real sampler -> pinned -> prefetch -> step loop vs the same step on a device-resident batch
window         one 300 x 320 x 380 case by 160³ windows, stride 144: GPU time vs host time (masks, records)
shared         two Ray tasks at 0.5 GPU each stepping side by side: combined it/s, each one's peak memory
checkpoint     one trial checkpoint (model, SGD state) written with ``torch.save``
=============  =============================================================================================

A section's iterations adapt to its share of the time budget (``--minutes``); a section that fails records its
error and the others still run. ``smoke=True`` runs every section at toy sizes on any device (the command's own
test on a CPU); its figures are never GPU figures.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: the paper's protocol: 100 epochs x 100 iterations per configuration
PROTOCOL_ITERATIONS = 10_000

#: each section's share of the time budget
SHARES = {"env": 0.04, "step": 0.34, "layout": 0.2, "loop": 0.14, "window": 0.1, "shared": 0.14, "checkpoint": 0.04}
SECTIONS = tuple(SHARES)


@dataclass(frozen=True)
class Sizes:
    """The sizes measured: the paper's, or toy ones for a smoke run."""

    patch: int = 128
    width: float = 1.0
    batch: int = 2
    volume: tuple[int, int, int] = (300, 320, 380)
    window: int = 160
    stride: int = 144
    phantom: tuple[int, int, int] = (144, 160, 160)
    phantom_cases: int = 6
    configs: tuple[str, ...] | None = None  # None: the ten paper configurations

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(patch=16, width=0.125, volume=(40, 48, 56), window=32, stride=24, phantom=(24, 32, 32),
                   phantom_cases=4, configs=("iw-bce", "dice"))


class Budget:
    """Seconds left for a section: its share of the total, at least a floor, never past the end."""

    def __init__(self, minutes: float):
        self.total = 60.0 * minutes
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)

    def share(self, section: str) -> float:
        return max(1.0, min(SHARES[section] * self.total, self.left()))


def _study(sizes: Sizes, *, amp: bool, loss: str = "dice", threads: int = 4):
    from trainables.config import ModelConfig, ResourcesConfig, StudyConfig, TrainingConfig

    return StudyConfig(model=ModelConfig(width=sizes.width, channels_last=False, compile=False),
                       training=TrainingConfig(batch_size=sizes.batch, patch_size=(sizes.patch,) * 3, amp=amp),
                       resources=ResourcesConfig(cpu=threads))


def _paper_trial(name: str):
    from trainables.config import TrialSpec
    from trainables.losses import PAPER_CONFIGS

    c = PAPER_CONFIGS[name]
    return TrialSpec(loss=c["loss"], iw=c["iw"], params=c["params"], seed=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _iters_for(seconds_per_step: float, seconds: float, *, low: int = 3, high: int = 50) -> int:
    return int(max(low, min(high, seconds / max(seconds_per_step, 1e-6))))


# ---------------------------------------------------------------------------------------------- sections


def section_env(device: torch.device, sizes: Sizes, seconds: float) -> dict[str, Any]:
    """The GPU and the software; and what a Ray task that asks for ``num_gpus=1`` finds."""
    from trainables.device import nvidia_gpus, torch_build
    from trainables.step import native_bf16

    out: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version(), "torch_build": torch_build(),
                           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                           "tf32_cudnn": torch.backends.cudnn.allow_tf32, "nvidia_smi": nvidia_gpus()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count, native_bf16=native_bf16(),
                   gpus=torch.cuda.device_count())
    else:
        out.update(gpu=None, native_bf16=False, gpus=0)
    import ray

    gpus = 1 if device.type == "cuda" else 0
    out["ray_task"] = ray.get(ray.remote(num_gpus=gpus, num_cpus=1)(_ray_task_view).remote())
    return out


def _ray_task_view() -> dict[str, Any]:
    import os

    import ray

    from trainables.device import cuda_problem

    return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "cuda_visible_devices": os.environ.get(
        "CUDA_VISIBLE_DEVICES"), "cuda_problem": cuda_problem() if ray.get_gpu_ids() else "no GPU asked for",
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def section_step(device: torch.device, sizes: Sizes, seconds: float) -> dict[str, Any]:
    """The paper's step per configuration, float32 and AMP: ms/iteration, peak memory, 10,000 iterations."""
    from trainables.losses import PAPER_CONFIGS
    from trainables.timing import StepBench

    names = list(sizes.configs or PAPER_CONFIGS)
    per_run = seconds / (2 * len(names))
    rows = []
    for name in names:
        for amp in (False, True):
            _reset_peak(device)
            bench = StepBench(_study(sizes, amp=amp), _paper_trial(name), device)
            run = bench.runner()
            first = statistics.median(run(2, 1))  # cuDNN's autotuning happens in the warm-up
            times = run(_iters_for(first, per_run * 0.8), 0)
            ms = 1000 * statistics.median(times)
            rows.append({"config": name, "amp": amp, "precision": bench.precision.name, "ms_per_iter": ms,
                         "peak_gib": _peak_gib(device), "iterations": len(times),
                         "projected_hours": ms * PROTOCOL_ITERATIONS / 3.6e6})
    return {"rows": rows, "patch": sizes.patch, "width": sizes.width, "batch": sizes.batch}


def section_layout(device: torch.device, sizes: Sizes, seconds: float, *, compile: bool = True) -> dict[str, Any]:
    """NCDHW vs channels-last (AMP off and on), eager vs compiled (AMP on): side-by-side medians."""
    from trainables.timing import compile_seconds, layout_seconds

    out: dict[str, Any] = {}
    trial = _paper_trial("dice")
    for amp in (False, True):
        ms = layout_seconds(_study(sizes, amp=amp), trial, rounds=max(3, min(12, int(seconds / 20))), device=device)
        out[f"layout_amp_{'on' if amp else 'off'}"] = {**ms, "ratio": ms["channels_last"] / ms["ncdhw"]}
    if not compile:
        out["compile_amp_on"] = {"skipped": "not in a smoke run (compiling takes minutes on a CPU)"}
        return out
    try:
        ms = compile_seconds(_study(sizes, amp=True), trial, rounds=6, device=device)
        out["compile_amp_on"] = {**ms, "ratio": ms["compiled"] / ms["eager"]}
    except Exception as exc:  # noqa: BLE001 - no compiler toolchain: recorded, not fatal
        out["compile_amp_on"] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
    return out


def _phantom_cache(root: Path, sizes: Sizes):
    from trainables.data import make_phantom, prepare_cache

    manifest = make_phantom(root / "phantom", n_cases=sizes.phantom_cases, seed=0, shape=sizes.phantom)
    return prepare_cache(manifest, root / "cache", progress=False)


def section_loop(device: torch.device, sizes: Sizes, seconds: float, *, cache_root: Path) -> dict[str, Any]:
    """The trial's real input path (sampler workers -> pinned batch -> copy one step ahead -> step) against the
    same step on one batch kept on the device, in alternating chunks: the ratio is what data costs the GPU."""
    from trainables.build import build_model, build_optimizer
    from trainables.data import PatchSampler
    from trainables.losses import get_loss
    from trainables.step import DevicePrefetcher, Precision, train_step

    cache = _phantom_cache(cache_root, sizes)
    study = _study(sizes, amp=True)
    t = study.training
    torch.manual_seed(0)
    model = build_model(study.model, study.training.patch_size).to(device)
    opt = build_optimizer(model, t.optimizer)
    precision = Precision.for_device(device, t.amp)
    scaler = precision.scaler()
    loss_fn = get_loss("bce")
    out: dict[str, Any] = {"workers": {}}
    for workers in (1, 2):
        sampler = PatchSampler(cache, cache.case_ids("train"), patch_size=t.patch_size, batch_size=t.batch_size,
                               iw=True, seed=0, num_workers=workers, pin_memory=device.type == "cuda")
        with sampler:
            stream = DevicePrefetcher(iter(sampler), device, iw=True)
            fixed = next(stream)
            for _ in range(3):
                train_step(model, opt, scaler, loss_fn, fixed.image, fixed.target, fixed.weight, precision)
            _sync(device)
            times: dict[str, list[float]] = {"loop": [], "resident": []}
            chunk, deadline = 5, time.perf_counter() + seconds / 2
            while time.perf_counter() < deadline or len(times["loop"]) < 2 * chunk:
                for mode in ("loop", "resident"):
                    t0 = time.perf_counter()
                    for _ in range(chunk):
                        b = next(stream) if mode == "loop" else fixed
                        train_step(model, opt, scaler, loss_fn, b.image, b.target, b.weight, precision)
                    _sync(device)
                    times[mode].append((time.perf_counter() - t0) / chunk)
        loop, resident = statistics.median(times["loop"]), statistics.median(times["resident"])
        out["workers"][str(workers)] = {"loop_ms": 1000 * loop, "resident_ms": 1000 * resident,
                                        "ratio": loop / resident, "steps": chunk * len(times["loop"])}
    return out


def section_window(device: torch.device, sizes: Sizes, seconds: float) -> dict[str, Any]:
    """One whole case: the sliding window on the device (GPU time), then what the host does with it (the masks
    brought back, the records at the calibration thresholds): host time, and both overlapped over two cases."""
    import numpy as np

    from trainables.build import build_model
    from trainables.config import InferenceConfig, ModelConfig
    from trainables.evaluate import CALIBRATION_THRESHOLDS, case_records, predict_volume
    from trainables.inference import window_starts
    from trainables.step import Precision

    rng = np.random.default_rng(0)
    image = rng.random(sizes.volume, dtype=np.float32)
    gt = np.zeros(sizes.volume, dtype=np.uint8)
    for _ in range(20):  # lesions of several sizes
        c = [int(rng.integers(r, n - r)) for n, r in zip(sizes.volume, (6, 6, 6))]
        r = int(rng.integers(2, 6))
        gt[tuple(slice(a - r, a + r) for a in c)] = 1
    model = build_model(ModelConfig(width=sizes.width)).to(device).eval()
    inference = InferenceConfig(window=(sizes.window,) * 3, stride=(sizes.stride,) * 3)
    precision = Precision.for_device(device, True)
    rules = {"any": ("any", None), "strict": ("iou", 0.3)}
    predict_volume(model, image[: sizes.window, : sizes.window, : sizes.window], inference=inference, device=device,
                   precision=precision)  # warm-up (cuDNN autotuning)
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    logits, masks = predict_volume(model, image, inference=inference, device=device, precision=precision,
                                   thresholds=CALIBRATION_THRESHOLDS)
    device_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    case_records(logits, masks, gt, (1.0, 0.7, 0.7), rules)
    host_seconds = time.perf_counter() - t0
    n = math.prod(len(window_starts(v, sizes.window, sizes.stride)) for v in sizes.volume)
    return {"volume": list(sizes.volume), "window": sizes.window, "stride": sizes.stride, "windows": n,
            "precision": precision.name, "device_seconds": device_seconds, "host_records_seconds": host_seconds,
            "thresholds": len(CALIBRATION_THRESHOLDS), "peak_gib": _peak_gib(device),
            "serial_seconds_per_case": device_seconds + host_seconds,
            "overlapped_seconds_per_case": max(device_seconds, host_seconds)}


def _stepping_task(sizes: Sizes, seconds: float, fraction: float) -> dict[str, Any]:
    """In a Ray task with a GPU share: step the paper's step (dice, AMP) for ``seconds``; it/s and peak memory."""
    from trainables.device import task_device
    from trainables.step import configure_backends
    from trainables.timing import StepBench

    device = task_device(fraction)
    configure_backends(device)
    _reset_peak(device)
    run = StepBench(_study(sizes, amp=True), _paper_trial("dice"), device).runner()
    run(2, 2)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(1, 0)
        n += 1
    return {"iterations": n, "seconds": time.perf_counter() - t0, "it_per_s": n / (time.perf_counter() - t0),
            "peak_gib": _peak_gib(device)}


def section_shared(device: torch.device, sizes: Sizes, seconds: float) -> dict[str, Any]:
    """One task on a whole GPU, then two at 0.5 GPU each side by side (Ray's fractional GPUs, each capped at half
    the memory): the combined iterations per second against the single task's."""
    import ray

    gpu = device.type == "cuda"
    stint = max(2.0, seconds / 3)
    one = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)(_stepping_task)
    single = ray.get(one.remote(sizes, stint, 1.0))
    half = ray.remote(num_gpus=0.5 if gpu else 0, num_cpus=1)(_stepping_task)
    pair = ray.get([half.remote(sizes, stint, 0.5) for _ in range(2)])
    combined = sum(p["it_per_s"] for p in pair)
    return {"single": single, "pair": pair, "combined_it_per_s": combined,
            "ratio": combined / single["it_per_s"] if single["it_per_s"] else None}


def section_checkpoint(device: torch.device, sizes: Sizes, seconds: float, *, where: Path) -> dict[str, Any]:
    """One trial checkpoint (model and SGD state, as the trainer writes it) saved to ``where``."""
    from trainables.build import STATE_FILE, build_model, build_optimizer
    from trainables.config import ModelConfig, OptimizerConfig

    model = build_model(ModelConfig(width=sizes.width)).to(device)
    opt = build_optimizer(model, OptimizerConfig())
    model(torch.zeros(2, 1, 16, 16, 16, device=device)).sum().backward()
    opt.step()  # the momentum buffers exist, as in a real checkpoint
    with tempfile.TemporaryDirectory(dir=where, prefix=".gpu-check-") as tmp:
        path = Path(tmp) / STATE_FILE
        _sync(device)
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        secs = time.perf_counter() - t0
        size = path.stat().st_size
    return {"seconds": secs, "megabytes": size / 2**20, "folder": str(where)}


# ---------------------------------------------------------------------------------------------- driver


def run_check(device: torch.device, *, minutes: float = 10.0, smoke: bool = False,
              sections: tuple[str, ...] = SECTIONS, where: Path | None = None,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every requested section in turn, each within its share of ``minutes``; a failing section records its
    error. Ray is started here (local, this machine's GPUs) for the sections that need it and stopped after."""
    import ray

    from trainables.environment import describe
    from trainables.step import configure_backends

    sizes = Sizes.smoke() if smoke else Sizes()
    budget = Budget(minutes)
    configure_backends(device)
    out: dict[str, Any] = {"version": 1, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": smoke,
                           "device": str(device), "minutes": minutes, "machine": describe(), "sections": {}}
    needs_ray = {"env", "shared"} & set(sections)
    started = False
    if needs_ray and not ray.is_initialized():
        ray.init(num_cpus=max(2, min(4, os.cpu_count() or 2)), include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False,
                 num_gpus=torch.cuda.device_count() if device.type == "cuda" else 0)
        started = True
    try:
        with tempfile.TemporaryDirectory(prefix="iw-gpu-check-") as tmp:
            calls = {"env": lambda s: section_env(device, sizes, s),
                     "step": lambda s: section_step(device, sizes, s),
                     "layout": lambda s: section_layout(device, sizes, s, compile=not smoke),
                     "loop": lambda s: section_loop(device, sizes, s, cache_root=Path(tmp)),
                     "window": lambda s: section_window(device, sizes, s),
                     "shared": lambda s: section_shared(device, sizes, s),
                     "checkpoint": lambda s: section_checkpoint(device, sizes, s, where=where or Path(tmp))}
            for name in sections:
                if budget.left() <= 0 and name != "checkpoint":
                    out["sections"][name] = {"skipped": "time budget spent"}
                    progress(f"{name}: skipped (time budget spent)")
                    continue
                progress(f"{name}: measuring (about {budget.share(name):.0f} s)")
                t0 = time.perf_counter()
                try:
                    result = calls[name](budget.share(name))
                except Exception as exc:  # noqa: BLE001 - one failed section must not cost the others
                    result = {"error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:500]}"}
                result["wall_seconds"] = round(time.perf_counter() - t0, 2)
                out["sections"][name] = result
                progress(f"{name}: done in {result['wall_seconds']:.0f} s"
                         + (f" ({result['error']})" if "error" in result else ""))
    finally:
        if started:
            ray.shutdown()
    out["seconds"] = round(time.perf_counter() - budget.start, 1)
    return out

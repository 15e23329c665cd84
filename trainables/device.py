"""Where a trial, a hold-out task or a prediction runs, checked before anything is built there.

Ray tells a trial which GPUs it was given (``ray.get_gpu_ids()``; it also sets ``CUDA_VISIBLE_DEVICES``), but it
cannot tell whether the torch installed on that node can use them: a ``+cpu`` wheel, or a CUDA build newer than
the node's driver, gives ``torch.cuda.is_available() == False`` on a node that Ray counts as a GPU node. A trial
that then trained on the CPU would run for days and report success. So a trial that was given a GPU and cannot
use it fails before its first step with :class:`GpuUnavailableError`, whose one line names the node, the torch
build and the fix; the driver turns it into exit 2 (``study.stages``).

Inside Ray a trial never looks at ``torch.cuda.is_available()`` alone: Ray no longer hides GPUs from 0-GPU tasks
(ray#54868), so a CPU trial on a GPU node would silently take GPU 0.

A trial that asks for a fraction of a GPU (``resources.gpu: 0.5``: two trials share it) gets that fraction of
the GPU's memory as its cap (``torch.cuda.set_per_process_memory_fraction``), so one trial cannot starve the
other of memory.
"""

from __future__ import annotations

import os
import socket

import torch

#: how the fix is spelled wherever a CUDA problem is reported
CUDA_FIX = ("install a CUDA build of torch that matches the node's NVIDIA driver (e.g. `pip install torch "
            "--index-url https://download.pytorch.org/whl/cu126`; `nvidia-smi` shows the driver's CUDA version)")


class GpuUnavailableError(RuntimeError):
    """A GPU was assigned but torch cannot use it; the message is one line meant for the user."""


def torch_build() -> str:
    """``torch 2.13.0+cpu (CUDA build: none)`` / ``torch 2.13.0+cu126 (CUDA build: 12.6)``."""
    return f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"


def node_name() -> str:
    """This machine as a user finds it in ``ray status``: host name and, inside Ray, the node's IP."""
    host = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            return f"{host} ({ray.util.get_node_ip_address()})"
    except Exception:  # noqa: BLE001 - the name is best effort, the check is not
        pass
    return host


def cuda_problem() -> str | None:
    """Why torch cannot use CUDA here (None: it can). Beyond ``is_available()`` a one-element tensor is made on
    the device, which catches a driver that loads but cannot run kernels."""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    try:
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - any CUDA failure is the same problem for the user
        return f"a CUDA kernel fails: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def nvidia_gpus() -> list[str]:
    """The GPUs the NVIDIA driver lists on this machine (``nvidia-smi -L``; what Ray counts), [] without it."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.startswith("GPU ")]


def gpu_message(problem: str, *, given: str) -> str:
    """The one line of a GPU that cannot be used: the node, what it was given (``Ray gave this trial GPU 0``),
    the torch build, why, and the fix."""
    return (f"CUDA unusable on node {node_name()}: {given}, but {torch_build()} cannot use it ({problem}); "
            f"{CUDA_FIX}")


def require_cuda(*, given: str) -> None:
    """Raise :class:`GpuUnavailableError` unless torch can run on the GPU(s) of this process."""
    problem = cuda_problem()
    if problem is not None:
        raise GpuUnavailableError(gpu_message(problem, given=given))


def task_device(gpu_fraction: float = 1.0) -> torch.device:
    """The GPU Ray assigned to this trial or task (checked: :class:`GpuUnavailableError` when it cannot be
    used), else the CPU. ``gpu_fraction`` < 1 (``resources.gpu``) caps this process's share of the GPU's memory.

    Outside Ray (a direct call: ``study predict``, tests, scripts): the GPU when torch sees one, else the CPU.
    """
    import ray

    if not ray.is_initialized():  # a direct call outside Ray: never start a Ray for it
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    ids = ray.get_gpu_ids()
    if not ids:
        return torch.device("cpu")
    require_cuda(given=f"Ray gave this trial GPU {','.join(map(str, ids))} "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')})")
    device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU
    if 0 < gpu_fraction < 1:
        torch.cuda.set_per_process_memory_fraction(float(gpu_fraction), device)
    return device


def start_trial(device: torch.device, *, seed: int, threads: int) -> None:
    """The per-trial state of this process, set afresh: a Tune actor runs one trial after another (``reuse_actors``),
    so nothing of the previous trial may leak into the next: torch's threads, the global random generators (torch
    with its CUDA generators, numpy's and Python's legacy ones) and, on a GPU, the memory the previous trial left
    in torch's cache and its peak statistics."""
    import random

    import numpy as np

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_gpu_error(text: object) -> bool:
    """Whether an error (an exception, or a trial's error text) is a :class:`GpuUnavailableError`."""
    if isinstance(text, BaseException):
        cause = getattr(text, "cause", None)  # ray.exceptions.RayTaskError keeps the task's exception
        return isinstance(text, GpuUnavailableError) or isinstance(cause, GpuUnavailableError) or \
            GpuUnavailableError.__name__ in str(text)
    return GpuUnavailableError.__name__ in str(text) or "CUDA unusable on node" in str(text)


def gpu_error_line(text: object) -> str:
    """The user's line of a :class:`GpuUnavailableError` inside an error text (a traceback, a Ray task error)."""
    if isinstance(text, BaseException) and isinstance(getattr(text, "cause", None), GpuUnavailableError):
        return str(text.cause)
    for line in reversed(str(text).splitlines()):
        if "CUDA unusable on node" in line:
            return line.split("GpuUnavailableError: ", 1)[-1].strip()
    return str(text).strip().splitlines()[-1] if str(text).strip() else "CUDA unusable"

"""The machine and the versions a study ran on, recorded in the study so that its numbers can be placed.

Figures differ between machines: thread scheduling, the CPU's vector units and library builds change the last
bits of every SGD step, and after hundreds of steps a model can cross a decision threshold differently (a lesion
found or not). A study therefore records where each of its runs happened (``state.json``: ``environments``) and
its summary carries the machine of the hold-out stage, so that ``study report --markdown`` can say it.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

_PACKAGES = ("torch", "ray", "mlflow", "numpy", "scipy", "SimpleITK")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe() -> dict[str, Any]:
    """This machine: CPU model, cores, memory, GPU (if torch sees one), OS, Python and package versions."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
    }


def one_line(env: dict[str, Any]) -> str:
    """``2 cores (Intel Xeon ...), 23.4 GiB, no GPU; Python 3.11.9, torch 2.13.0+cpu, ray 2.60.0, ...``."""
    pk = env.get("packages") or {}
    versions = ", ".join(f"{k} {v}" for k, v in pk.items() if v)
    mem = f", {env['memory_gib']:g} GiB" if env.get("memory_gib") else ""
    gpu = env.get("gpu") or "no GPU"
    return f"{env.get('cores')} cores ({env.get('cpu')}){mem}, {gpu}; {env.get('os')}; Python {env.get('python')}, {versions}"


def print_machine() -> None:
    """The first line of every benchmark: which machine and versions its figures were measured on."""
    print(f"# machine: {one_line(describe())}", flush=True)

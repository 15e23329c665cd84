"""Peer libraries whose pins conflict with the product's dependencies run in a virtual environment of their own.

panoptica 2.1.7 (every release) pins numpy < 2.3 and connected-components-3d < 4, which the product does not: its
checks run in ``.peer-venvs/panoptica-<hash>/``, built once from ``requirements-panoptica.txt`` (about 30 s; the
hash of the file names the folder, so a changed pin builds a new one). The tests hand it arrays and read back its
results through files (``panoptica_matching.py``), so the suite itself runs the versions users get.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENVS = HERE.parents[1] / ".peer-venvs"

_builds: dict[str, threading.Thread] = {}
_results: dict[str, tuple[Path | None, str]] = {}


def start_build(name: str) -> None:
    """Build the peer venv ``name`` in a background thread (mostly downloads), so the tests that need it find it
    ready; :func:`peer_python` waits for it."""
    if name not in _builds:
        _builds[name] = threading.Thread(target=lambda: _results.setdefault(name, _build(name)), daemon=True)
        _builds[name].start()


def peer_python(name: str) -> tuple[Path | None, str]:
    """The Python of the peer venv ``name`` (built if missing), or ``(None, why)`` when it cannot be built here
    (no network, no venv module): the caller skips with that reason."""
    start_build(name)
    _builds[name].join()
    return _results[name]


def _build(name: str) -> tuple[Path | None, str]:
    """One build at a time across processes (pytest-xdist workers each ask for it): a file lock."""
    import fcntl

    VENVS.mkdir(exist_ok=True)
    with open(VENVS / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(name)


def _build_locked(name: str) -> tuple[Path | None, str]:
    requirements = HERE / f"requirements-{name}.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    root = VENVS / f"{name}-{digest}"
    python = root / "bin" / "python"
    if (root / ".complete").is_file():
        return python, ""
    VENVS.mkdir(exist_ok=True)
    build = root.with_name(root.name + ".building")
    subprocess.run(["rm", "-rf", str(build)], check=False)
    steps = [[sys.executable, "-m", "venv", str(build)],
             [str(build / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
              str(requirements)]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            return None, f"the {name} peer venv could not be built ({' '.join(cmd[2:5])}...): {res.stderr[-500:]}"
    build.rename(root)  # the venv's scripts use its path: built elsewhere, only the interpreter call is used
    (root / ".complete").write_text(digest)
    return python, ""

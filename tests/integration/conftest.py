"""Integration fixtures: run `study` in subprocesses and leave no Ray or MLflow process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

_MARKERS = ("gcs_server", "raylet", "ray::", "default_worker.py", "dashboard/agent.py", "runtime_env/agent",
            "log_monitor.py", "monitor.py", "mlflow.server", "mlflow ui", "mlflow server", "study.cli")


def _service_pids(tag: str | None = None) -> dict[int, str]:
    """Ray / MLflow / study processes started by this test process (they carry its ``IW_TEST_PROCESS`` tag,
    tests/conftest.py), not those of another pytest worker or of a study running beside the suite; with ``tag``
    (``NAME=value``), those whose environment holds that instead."""
    tag = (tag or f"IW_TEST_PROCESS={os.environ['IW_TEST_PROCESS']}").encode()
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if not (cmd and any(m in cmd for m in _MARKERS)):
                continue
            if tag not in (entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        out[int(entry.name)] = cmd
    return out


def leftover_processes(before: set[int], timeout: float = 20.0) -> dict[int, str]:
    """This test process's Ray / MLflow / study processes not in ``before`` that are still there after up to
    ``timeout`` seconds (a stopped node's workers take a moment to notice and exit)."""
    deadline = time.time() + timeout
    while True:
        left = {p: c for p, c in _service_pids().items() if p not in before and p != os.getpid()}
        if not left or time.time() >= deadline:
            return left
        time.sleep(1)


@pytest.fixture
def no_leftover_processes():
    """Fail the test if it leaves Ray / MLflow / study processes running (and kill them)."""
    before = set(_service_pids())
    yield
    left = leftover_processes(before)
    if not left:
        return
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pytest.fail("processes left behind: " + "; ".join(f"{p}: {c[:120]}" for p, c in left.items()))


def study_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "study.cli", *args]


def run_study(*args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(study_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def start_study(*args: str, cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `study` in its own process group (so the test can SIGKILL the driver and its local Ray)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    fh = open(log, "w")  # noqa: SIM115 - closed by the caller through proc.stdout
    return subprocess.Popen(study_cmd(*args), cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for(predicate, *, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            text = log.read_text() if log else ""
            pytest.fail(f"study exited early with {proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.5)
    text = log.read_text()[-4000:] if log else ""
    pytest.fail(f"timed out waiting for the study:\n{text}")

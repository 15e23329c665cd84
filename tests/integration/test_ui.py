"""`study ui` never leaves its MLflow server behind (issue 30): SIGTERM to its process group ends the server, its
workers and its job consumers (SIGKILL of the command alone, which no handler sees, is checked at the end of the
integration study, tests/integration/test_study.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from .conftest import _service_pids
from .ui_check import start_ui

pytestmark = pytest.mark.integration


def _study(storage: Path, name: str) -> None:
    from search_spaces import builtin_path
    from study.layout import StudyDir, StudyState, write_frozen_config
    from study.loader import load_config

    sd = StudyDir.of(storage, name)
    sd.root.mkdir(parents=True)
    write_frozen_config(sd, load_config(Path(str(builtin_path("demo")))).to_dict())
    StudyState.create(sd.state_file, name=name, tracking_uri=sd.default_tracking_uri())


def _left(before: set[int]) -> dict[int, str]:
    return {p: c for p, c in _service_pids().items()
            if p not in before and any(k in c for k in ("mlflow", "huey", "uvicorn", "study.watchdog"))}


def _nothing_left(before: set[int], timeout: float = 40) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _left(before):
            return
        time.sleep(0.5)
    pytest.fail("left behind: " + "; ".join(c[:120] for c in _left(before).values()))


def test_the_mlflow_server_of_study_ui_dies_with_a_sigterm_to_its_group(tmp_path):
    storage = tmp_path / "studies"
    _study(storage, "ui")
    before = set(_service_pids())
    proc, url = start_ui(storage, "ui", tmp_path, tmp_path / "ui.log")
    try:
        assert url.startswith("http://") and _left(before)  # the server runs
        os.killpg(proc.pid, signal.SIGTERM)  # study ui, its watchdog and the server all get it
        proc.wait(timeout=60)
        _nothing_left(before)
    finally:
        for pid in _left(before):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

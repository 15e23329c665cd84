"""Shared test fixtures.

``shared_dir``: the read-only ``../shared`` folder beside the project root (override with IW_SHARED_DIR).
The authors' per-lesion records are read from there, never copied into the project.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    return Path(os.environ.get("IW_SHARED_DIR", PROJECT_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = _shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared folder not found at {path} (set IW_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def paper_records_dir(shared_dir: Path) -> Path:
    path = shared_dir / "fixtures" / "paper-records"
    if not path.is_dir():
        pytest.skip(f"paper records not found at {path}")
    return path

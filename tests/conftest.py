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


@pytest.fixture(scope="session")
def fake_gpu_ray():
    """One local Ray for the unit tests that need one (started once): 2 CPUs and a GPU this machine does not
    have, which torch here cannot use (the GPU path's checks). Tests using it never shut it down."""
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def pytest_collection_finish(session) -> None:
    """When the panoptica cross-checks are collected, their peer venv starts building now, beside the tests
    that run first (tests/peers)."""
    if any("test_peers.py" in item.nodeid for item in session.items):
        from tests.peers import start_build

        start_build("panoptica")

"""Shared test fixtures.

``shared_dir``: the read-only ``../shared`` folder beside the project root (override with IW_SHARED_DIR).
The authors' per-lesion records are read from there, never copied into the project.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# every process a test starts (studies, Ray, MLflow servers) inherits this tag: the leftover-process checks look
# at this test process's own children only, whatever other pytest-xdist workers run beside it
os.environ["IW_TEST_PROCESS"] = f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{os.getpid()}"


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
def _ray_at_exit():
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def fake_gpu_ray(_ray_at_exit):
    """A local Ray for the unit tests that need one (started once per test process, again if a test shut it
    down): 2 CPUs and a GPU this machine does not have, which torch here cannot use (the GPU path's checks)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)


#: the modules that must stay slow (whole studies through real Ray, MLflow, SLURM), longest first: pytest-xdist
#: hands them out before anything else, one per worker, and queues nothing behind them (SlowFirstScheduling)
SLOW_FIRST = ("tests/integration/test_study.py", "tests/integration/test_cluster.py", "tests/integration/test_slurm.py",
              "tests/integration/test_tpe_search.py", "tests/integration/test_asha_scheduler.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` (one module per worker at a time), with the slow modules first."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SlowFirstScheduling(LoadScopeScheduling):
        """Plain loadscope sorts modules by their number of tests, so the few-test studies came last, and it
        queues a worker's next module once it has two tests or fewer pending: a study module waited behind
        another while other workers sat idle (the suite's last 5 minutes ran at half the machine). Here the slow
        modules go first, one per worker, and what queues behind one is the smallest module left (a worker
        starts its last test only once it has more work or is told to stop, so something must queue)."""

        def _assign_work_unit(self, node) -> None:
            running = self.assigned_work.get(node, {})
            behind_slow = any(scope in SLOW_FIRST and not all(done.values()) for scope, done in running.items())
            slow = [scope for scope in self.workqueue if scope in SLOW_FIRST]
            quick = [scope for scope in self.workqueue if scope not in SLOW_FIRST]
            if behind_slow and quick:
                first = min(quick, key=lambda scope: len(self.workqueue[scope]))
            elif slow:
                first = min(slow, key=SLOW_FIRST.index)
            else:
                first = next(iter(self.workqueue))
            self.workqueue.move_to_end(first, last=False)
            super()._assign_work_unit(node)

    return SlowFirstScheduling(config, log)


def pytest_collection_finish(session) -> None:
    """When the panoptica cross-checks are collected, their peer venv starts building now, beside the tests
    that run first (tests/peers)."""
    if any("test_peers.py" in item.nodeid for item in session.items):
        from tests.peers import start_build

        start_build("panoptica")

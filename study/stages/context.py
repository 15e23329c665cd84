"""What every stage gets: the study folder, its typed config and state, and the Ray the stages share."""

from __future__ import annotations

import time
from dataclasses import dataclass

from study.layout import StudyDir, StudyState
from trainables.config import StudyConfig


class StudyInterrupted(Exception):
    """A stage stopped before all its work was done (Ctrl+C, a killed driver): ``study resume`` continues."""


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class StudyContext:
    dir: StudyDir
    cfg: StudyConfig
    state: StudyState
    address: str | None = None
    wait_for_resources: bool = False
    num_cpus: int | None = None
    _ray_started: bool = False
    _cache_checked: bool = False

    def cache_dir(self) -> str:
        if self.cfg.data.source == "cache":
            return str(self.cfg.data.path)
        return str(self.dir.data_dir / "cache")

    def ensure_ray(self) -> None:
        if not self._ray_started:
            from study.tune.tuner import check_resources, init_ray

            init_ray(self.address, tracking_uri=self.state.tracking_uri, num_cpus=self.num_cpus)
            self._ray_started = True
            check_resources(self.cfg.resources.as_ray(), wait_for_resources=self.wait_for_resources)

    def check_cache_on_workers(self) -> None:
        """On a Ray cluster, a trial node must read the cache the driver sees (a shared filesystem at the same
        path, or a copy on each node): checked once per driver by a Ray task with one trial's resources, before
        any trial starts; exit 2 naming the node and what to do."""
        import os

        if self._cache_checked or not (self.address or os.environ.get("RAY_ADDRESS")):
            return
        import ray

        from trainables.data.cache import cache_check

        self.ensure_ray()
        res = self.cfg.resources
        task = ray.remote(num_cpus=res.cpu, num_gpus=res.gpu, resources=res.custom or None, max_retries=0)(cache_check)
        host, why = ray.get(task.remote(self.cache_dir()))
        if why is not None:
            from trainables.errors import UserError

            raise UserError(
                f"the data cache {self.cache_dir()} opens on this driver but not on the trial node {host}: {why}. "
                "Every node must read it at the same path: put it (and --storage) on a filesystem shared by all "
                "nodes, or copy it to the same path on each node (e.g. `rsync -a CACHE/ NODE:CACHE/`); see "
                "docs/cluster.md. Nothing was trained; `study resume` continues once it is readable.")
        log(f"data: the trial node {host} reads the cache {self.cache_dir()}")
        self._cache_checked = True

    def testing_pause(self, stage: str) -> None:
        """``testing.sleep_in_stage``: hold ``stage`` at its midpoint (a test kills the driver there)."""
        seconds = self.cfg.testing.sleep_in_stage.get(stage, 0.0)
        if seconds:
            log(f"{stage}: (testing.sleep_in_stage) holding {seconds:g} s")
            time.sleep(seconds)

    def close(self) -> None:
        if self._ray_started:
            from study.tune.tuner import shutdown_ray

            shutdown_ray()
            self._ray_started = False

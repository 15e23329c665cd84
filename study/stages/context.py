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

    def close(self) -> None:
        if self._ray_started:
            from study.tune.tuner import shutdown_ray

            shutdown_ray()
            self._ray_started = False

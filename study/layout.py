"""The study folder ``<storage>/<name>/`` and its small state file.

::

    study.yaml      the frozen, fully resolved config (what ``study resume`` runs)
    state.json      study id, tracking URI, MLflow experiment and parent-run ids, finished stages
    mlflow.db       the MLflow store (default; ``--tracking-uri`` can point elsewhere)
    mlartifacts/    MLflow artifacts beside it
    data/           phantom / prepared cache when the study makes its own
    ray/sweep/      Ray Tune state of the sweep (trials, checkpoints)
    ray/retrain/    Ray Tune state of the retrain of the winners
    selection.json  the winners of the sweep
    holdout/        hold-out records per retrained configuration + summary.json
    report/         report.md, report.html and the figures

Every file is written to a temporary name and renamed, so an interrupted write never leaves half a file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trainables.errors import UserError
from trainables.io_utils import write_text_atomic

STAGES = ("data", "sweep", "select", "retrain", "holdout", "report")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UserError(f"study name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)")
    return name


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class StudyDir:
    root: Path

    @classmethod
    def of(cls, storage: str | os.PathLike, name: str) -> StudyDir:
        if str(storage).startswith(("s3://", "gs://", "abfs://")):
            raise UserError(
                f"--storage {storage}: cloud URIs are not supported for the study folder; use a shared "
                "filesystem path (NFS/EFS/Lustre) mounted at the same place on every node"
            )
        return cls(Path(storage).expanduser().resolve() / check_name(name))

    @property
    def name(self) -> str:
        return self.root.name

    config_file = property(lambda self: self.root / "study.yaml")
    state_file = property(lambda self: self.root / "state.json")
    ray_dir = property(lambda self: self.root / "ray")
    data_dir = property(lambda self: self.root / "data")
    holdout_dir = property(lambda self: self.root / "holdout")
    report_dir = property(lambda self: self.root / "report")
    selection_file = property(lambda self: self.root / "selection.json")
    mlflow_db = property(lambda self: self.root / "mlflow.db")
    artifacts_dir = property(lambda self: self.root / "mlartifacts")

    def default_tracking_uri(self) -> str:
        return "sqlite:///" + str(self.mlflow_db)  # absolute path: sqlite:////abs/path/mlflow.db

    def exists(self) -> bool:
        return self.config_file.is_file() and self.state_file.is_file()

    def require(self) -> StudyDir:
        if not self.exists():
            raise UserError(f"no study at {self.root} (missing study.yaml/state.json); check NAME and --storage")
        return self


class StudyState:
    """``state.json``: ids and finished stages. Saved after every change."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def create(cls, path: Path, *, name: str, tracking_uri: str) -> StudyState:
        state = cls(path, {"study_id": uuid.uuid4().hex, "name": name, "tracking_uri": tracking_uri,
                           "created": now(), "mlflow": {}, "stages": {}})
        state.save()
        return state

    @classmethod
    def load(cls, path: Path) -> StudyState:
        try:
            return cls(path, json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: cannot read the study state ({exc})") from None

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True))

    @property
    def study_id(self) -> str:
        return self.data["study_id"]

    @property
    def tracking_uri(self) -> str:
        return self.data["tracking_uri"]

    def done(self, stage: str) -> bool:
        return bool(self.data["stages"].get(stage, {}).get("done"))

    def mark_done(self, stage: str, **info: Any) -> None:
        self.data["stages"][stage] = {"done": True, "finished": now(), **info}
        self.save()

    def mlflow_ids(self) -> dict[str, str]:
        return self.data.setdefault("mlflow", {})

    def record_stage_seconds(self, stage: str, seconds: float) -> None:
        """Wall time of a stage (the last attempt's, when a stage was interrupted and resumed)."""
        self.data["stages"].setdefault(stage, {})["seconds"] = round(seconds, 1)
        self.save()

    def record_environment(self, env: dict[str, Any]) -> None:
        """Append the machine of this run of the study (launch or resume) when it differs from the last."""
        envs = self.data.setdefault("environments", [])
        if not envs or {k: v for k, v in envs[-1].items() if k != "since"} != env:
            envs.append({**env, "since": now()})
            self.save()


def write_frozen_config(study_dir: StudyDir, config_dict: dict[str, Any]) -> None:
    text = "# Frozen config of this study (written by `study launch`; `study resume` runs exactly this).\n"
    text += yaml.safe_dump(config_dict, sort_keys=False)
    write_text_atomic(study_dir.config_file, text)


def read_frozen_config(study_dir: StudyDir) -> dict[str, Any]:
    try:
        return yaml.safe_load(study_dir.config_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{study_dir.config_file}: cannot read the frozen config ({exc})") from None

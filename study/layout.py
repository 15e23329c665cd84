"""The study folder ``<storage>/<name>/`` and its small state file.

::

    study.yaml      the frozen, fully resolved config (what ``study resume`` runs)
    state.json      study id, tracking URI, MLflow experiment and parent-run ids, finished stages
    mlflow.db       the MLflow store (default; ``--tracking-uri`` can point elsewhere)
    mlartifacts/    MLflow artifacts beside it
    data/           phantom / prepared cache when the study makes its own
    ray/sweep/      Ray Tune state of the sweep (trials, checkpoints)
    ray/retrain/    Ray Tune state of the retrain of the winners
    folds.json      under data.folds: every fold's training and validation cases (made once)
    selection.json  the winners of the sweep
    holdout/        hold-out records per retrained configuration + summary.json
    report/         report.md, report.html and the figures (report_file: report.md)

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
#: the report's Markdown file in ``report/`` (report.html beside it)
REPORT_FILE = "report.md"
#: the two Tune experiments of a study (their folders under ``ray/``)
SWEEP, RETRAIN = "sweep", "retrain"
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
    report_file = property(lambda self: self.root / "report" / REPORT_FILE)
    selection_file = property(lambda self: self.root / "selection.json")
    folds_file = property(lambda self: self.root / "folds.json")
    summary_file = property(lambda self: self.root / "holdout" / "summary.json")
    mlflow_db = property(lambda self: self.root / "mlflow.db")
    artifacts_dir = property(lambda self: self.root / "mlartifacts")

    def default_tracking_uri(self) -> str:
        return "sqlite:///" + str(self.mlflow_db)  # absolute path: sqlite:////abs/path/mlflow.db

    def exists(self) -> bool:
        return self.config_file.is_file() and self.state_file.is_file()


    def read_summary(self) -> dict[str, Any]:
        """``holdout/summary.json``, checked: a damaged file is a UserError naming it and the remedy (removed, the
        hold-out stage runs again on ``study resume``)."""
        return self._read_output(self.summary_file, "the hold-out summary", "configs", dict,
                                 "runs the hold-out stage (inference with the retrained models) and the report again")

    def read_selection(self) -> dict[str, Any]:
        """``selection.json`` (the sweep's winners), checked like :meth:`read_summary`."""
        return self._read_output(self.selection_file, "the selection of winners", "winners", list,
                                 "selects the winners again from the sweep's results")

    def read_folds(self) -> list[list[str]]:
        """The validation cases of every fold (``folds.json``, written once by the data stage under
        ``data.folds``). A damaged file is a UserError: it must not be made again (the sweep's trials were run
        on it)."""
        from trainables.io_utils import read_json

        remedy = ("it holds the folds the study's sweep trials were run on: restore it from a backup, or launch the "
                  "study again under another --name")
        data = read_json(self.folds_file, what="the study's cross-validation folds", remedy=remedy)
        folds = data.get("folds") if isinstance(data, dict) else None
        if not isinstance(folds, list) or not all(isinstance(f, dict) and isinstance(f.get("val"), list)
                                                  for f in folds):
            raise UserError(f"{self.folds_file}: not a list of folds with 'val' case lists (damaged or hand-edited); "
                            f"{remedy}")
        return [list(f["val"]) for f in folds]

    def _read_output(self, path: Path, what: str, key: str, kind: type, redo: str) -> dict[str, Any]:
        from trainables.io_utils import read_json

        remedy = f"remove it and run `study resume {self.name} --storage {self.root.parent}`, which {redo}"
        data = read_json(path, what=what, remedy=remedy)
        if not isinstance(data, dict) or not isinstance(data.get(key), kind):
            raise UserError(f"{path}: {what} has no {key!r} {'mapping' if kind is dict else 'list'} (damaged or "
                            f"hand-edited); {remedy}")
        return data

    def require(self) -> StudyDir:
        if not self.exists():
            raise UserError(f"no study at {self.root} (missing study.yaml/state.json); check NAME and --storage")
        return self


#: the keys ``state.json`` must have and their JSON types
_STATE_SCHEMA = {"study_id": str, "tracking_uri": str, "mlflow": dict, "stages": dict}
_KIND_NAMES = {str: "string", dict: "JSON object"}


class StudyState:
    """``state.json``: ids and finished stages. Saved after every change."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def create(cls, path: Path, *, name: str, tracking_uri: str) -> StudyState:
        state = cls(path, {"study_id": uuid.uuid4().hex, "name": name, "tracking_uri": tracking_uri,
                           "created": now(), "mlflow": {}, "stages": {}, "folder": str(path.parent)})
        state.save()
        return state

    @classmethod
    def load(cls, path: Path) -> StudyState:
        """Read and check ``state.json``; a damaged one (truncated, hand-edited, not UTF-8) is a UserError that
        names the file, what is wrong and what the user can do."""
        from trainables.io_utils import read_json

        remedy = ("it is the study's state (ids and finished stages): restore it from a backup, or launch the "
                  "study again under another --name")
        data = read_json(path, what="the study state", remedy=remedy)
        if not isinstance(data, dict):
            raise UserError(f"{path}: the study state must be a JSON object, got a {type(data).__name__}; {remedy}")
        for key, kind in _STATE_SCHEMA.items():
            if key not in data:
                raise UserError(f"{path}: the study state lacks {key!r}; {remedy}")
            if not isinstance(data[key], kind):
                raise UserError(f"{path}: the study state's {key!r} must be a {_KIND_NAMES[kind]}, got "
                                f"{type(data[key]).__name__}; {remedy}")
        for stage, info in data["stages"].items():
            if stage not in STAGES or not isinstance(info, dict):
                raise UserError(f"{path}: the study state's stages.{stage} is not a stage record "
                                f"(stages are {', '.join(STAGES)}); {remedy}")
        return cls(path, data)

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


def open_study(storage: str | os.PathLike, name: str, *, writes: bool = True):
    """``(StudyDir, StudyConfig, StudyState)`` of an existing study: its frozen config validated, its state
    checked, and a moved or copied folder made its own again (:func:`relocate`; ``writes=False`` for the commands
    that only read: a copy that shares a tracking server is then not refused). A note of the relocation goes to
    stderr."""
    import sys

    from study.loader import frozen_config_from_dict

    study_dir = StudyDir.of(storage, name).require()
    cfg = frozen_config_from_dict(read_frozen_config(study_dir), path=study_dir.config_file)
    state = StudyState.load(study_dir.state_file)
    note = relocate(study_dir, state, writes=writes)
    if note:
        print(note, file=sys.stderr, flush=True)
    return study_dir, cfg, state


def write_frozen_config(study_dir: StudyDir, config_dict: dict[str, Any]) -> None:
    text = "# Frozen config of this study (written by `study launch`; `study resume` runs exactly this).\n"
    text += yaml.safe_dump(config_dict, sort_keys=False)
    write_text_atomic(study_dir.config_file, text)


def read_frozen_config(study_dir: StudyDir) -> dict[str, Any]:
    """The frozen config as data; an empty or non-mapping file is refused naming it and the remedy."""
    from trainables.io_utils import read_yaml

    remedy = ("it is the study's frozen config: restore it from a backup, or launch the study again under "
              "another --name")
    data = read_yaml(study_dir.config_file, what="the study's frozen config", remedy=remedy)
    if not isinstance(data, dict) or not data:
        what = "empty" if data is None or data == {} else f"a {type(data).__name__}, not a mapping of sections"
        raise UserError(f"{study_dir.config_file}: the study's frozen config is {what}; {remedy}")
    return data


def recorded_folder(state: StudyState) -> Path | None:
    """The folder the study was launched in: ``state.json``'s ``folder``, or (older studies) the folder of its
    default sqlite store."""
    if state.data.get("folder"):
        return Path(state.data["folder"])
    uri = state.tracking_uri
    if uri.startswith("sqlite:////") and uri.endswith("/mlflow.db"):
        return Path(uri[len("sqlite:///"):]).parent
    return None


def relocate(study_dir: StudyDir, state: StudyState, *, writes: bool = True) -> str | None:
    """Make a moved or copied study folder its own again; returns what was done (None: nothing to do).

    A study keeps absolute paths (its sqlite store, the store's artifact locations). When the folder is not
    where it was launched: a study with its own store (sqlite in the folder) gets the paths in ``state.json``
    and in the store rewritten to the new folder, so a copy logs into its copy of the store and never into the
    original's. A study that logs to a tracking server shares that server's experiment with the original: a
    copy (the original folder still holds the same study) is refused by the commands that write (``writes``),
    a move is accepted.
    """
    old = recorded_folder(state)
    new = study_dir.root
    if old is None or old == new:
        return None
    original = old / "state.json"
    is_copy = False
    if original.is_file():
        try:
            is_copy = json.loads(original.read_text()).get("study_id") == state.study_id
        except (OSError, ValueError, AttributeError):
            is_copy = False
    own_store = state.tracking_uri == "sqlite:///" + str(old / "mlflow.db")
    if not own_store:
        if not writes:  # status, ui: they read, and write nothing into the shared experiment
            return None
        if is_copy:
            raise UserError(f"{study_dir.root} is a copy of the study at {old}, which logs to {state.tracking_uri}: "
                            "both would write into the same MLflow experiment; run the study from its original "
                            f"folder, or move (not copy) it")
        state.data["folder"] = str(new)
        state.save()
        return f"study {study_dir.name} was moved from {old} to {new}"
    if study_dir.mlflow_db.is_file():
        _rewrite_store_paths(study_dir.mlflow_db, old, new)
    state.data["tracking_uri"] = study_dir.default_tracking_uri()
    state.data["folder"] = str(new)
    stages = state.data["stages"]
    if isinstance(stages.get("data"), dict) and str(stages["data"].get("cache_dir", "")).startswith(str(old)):
        stages["data"]["cache_dir"] = str(new) + stages["data"]["cache_dir"][len(str(old)):]
    state.save()
    return (f"study {study_dir.name} was {'copied' if is_copy else 'moved'} from {old}: its MLflow store "
            f"{study_dir.mlflow_db} now points at this folder")


def _rewrite_store_paths(db: Path, old: Path, new: Path) -> None:
    """Replace the old folder by the new one in the artifact locations an MLflow sqlite store keeps."""
    import sqlite3

    pairs = [(Path(old).as_uri(), Path(new).as_uri()), (str(old), str(new))]
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cols = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]
            for col in cols:
                if col in ("artifact_location", "artifact_uri", "source", "storage_location"):
                    for a, b in pairs:
                        con.execute(f'UPDATE "{table}" SET "{col}" = ? || substr("{col}", ?) '
                                    f'WHERE substr("{col}", 1, ?) = ?', (b, len(a) + 1, len(a), a))

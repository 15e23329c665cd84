"""Driver-side MLflow: one experiment per study, a root run for the study, a parent run per stage.

The experiment, its artifact location and the parent runs are created here, once, before any trial
starts (trials run in other processes and other working directories). Runs are found by tags, so a
resumed study reuses them instead of creating duplicates.
"""

from __future__ import annotations

from pathlib import Path

from trainables import tracking
from trainables.errors import UserError

STAGE_RUNS = {"sweep": "sweep", "holdout": "holdout"}


def check_tracking_uri(uri: str) -> str:
    if uri.startswith("file:") or (not uri.startswith(("sqlite:", "http:", "https:", "postgresql", "mysql"))
                                   and "://" not in uri):
        raise UserError(
            f"--tracking-uri {uri}: the MLflow file store is deprecated and refused by MLflow >= 3.13; "
            "use sqlite:////absolute/path/mlflow.db or an http(s):// tracking server"
        )
    if uri.startswith("sqlite:") and not uri.startswith("sqlite:////"):
        raise UserError(f"--tracking-uri {uri}: use an absolute sqlite path (sqlite:////abs/path/mlflow.db)")
    return uri


def setup(state, study_dir, *, experiment_name: str) -> dict[str, str]:
    """Create or find the experiment and the study's root run; store their ids in the state."""
    mlc = tracking.client(state.tracking_uri)
    ids = state.mlflow_ids()
    exp = None
    if ids.get("experiment_id"):
        exp = mlc.get_experiment(ids["experiment_id"])
    if exp is None:
        exp = mlc.get_experiment_by_name(experiment_name)
        if exp is not None and exp.tags.get(tracking.STUDY_TAG) not in (None, state.study_id):
            raise UserError(
                f"MLflow experiment {experiment_name!r} already belongs to another study at "
                f"{state.tracking_uri}; choose another --name"
            )
    if exp is None:
        local = state.tracking_uri.startswith("sqlite:")
        artifact_location = Path(study_dir.artifacts_dir).as_uri() if local else None
        exp_id = mlc.create_experiment(experiment_name, artifact_location=artifact_location,
                                       tags={tracking.STUDY_TAG: state.study_id})
        exp = mlc.get_experiment(exp_id)
    ids["experiment_id"] = exp.experiment_id
    root_id, _ = tracking.find_or_create_run(
        mlc, exp.experiment_id,
        tags={tracking.STUDY_TAG: state.study_id, tracking.KIND_TAG: "study"},
        run_name=f"study:{state.data['name']}",
        extra_tags={"study_folder": str(study_dir.root)},
    )
    ids["study_run_id"] = root_id
    state.save()
    return ids


def stage_parent(state, stage: str) -> str:
    """The parent run of a stage (``sweep`` or ``holdout``), nested under the study run."""
    mlc = tracking.client(state.tracking_uri)
    ids = state.mlflow_ids()
    key = f"{stage}_run_id"
    run_id, _ = tracking.find_or_create_run(
        mlc, ids["experiment_id"],
        tags={tracking.STUDY_TAG: state.study_id, tracking.KIND_TAG: "stage", tracking.STAGE_TAG: stage},
        run_name=f"stage:{stage}",
        parent_run_id=ids["study_run_id"],
    )
    ids[key] = run_id
    state.save()
    return run_id


def finish_stage_runs(state, stage: str, trial_status: dict[str, str]) -> None:
    """Close the stage's runs: no run is left RUNNING once its stage has ended.

    ``trial_status`` maps a Ray trial id to its final Ray status (TERMINATED / ERROR).
    """
    mlc = tracking.client(state.tracking_uri)
    ids = state.mlflow_ids()
    runs = mlc.search_runs(
        [ids["experiment_id"]],
        filter_string=f"tags.{tracking.STUDY_TAG} = '{state.study_id}' and tags.{tracking.STAGE_TAG} = '{stage}'",
        max_results=5000,
    )
    for run in runs:
        if run.info.status != "RUNNING":
            continue
        tid = run.data.tags.get(tracking.TRIAL_ID_TAG)
        if tid is None:  # the stage parent
            mlc.set_terminated(run.info.run_id, "FINISHED")
        elif tid in trial_status:
            mlc.set_terminated(run.info.run_id, "FAILED" if trial_status[tid] == "ERROR" else "FINISHED")

"""MLflow helpers shared by the driver and the trials (resume-safe, no global active-run state).

Ray Tune's built-in MLflow integrations create a second run for a resumed trial and leave the first one
RUNNING; here every run is found-or-created by tags instead, so a trial keeps exactly one run after any
number of resumes. All calls go through an explicit :class:`mlflow.tracking.MlflowClient` with an explicit
tracking URI (a trial's working directory and environment are not the driver's).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

TRIAL_ID_TAG = "trial_id"
STAGE_TAG = "stage"
STUDY_TAG = "study_id"
KIND_TAG = "kind"
PARENT_TAG = "mlflow.parentRunId"

# keys that never go into MLflow params (could hold credentials or machine-specific paths)
_SECRET_HINTS = ("password", "token", "secret", "credential", "tracking_uri", "access_key")


def client(tracking_uri: str | None = None):
    """An MlflowClient for ``tracking_uri`` (default: ``$MLFLOW_TRACKING_URI``, which the driver sets)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RuntimeError("no MLflow tracking URI: the driver must pass MLFLOW_TRACKING_URI to the trials")
    return MlflowClient(tracking_uri=uri)


def find_run(mlflow_client, experiment_id: str, tags: Mapping[str, str]):
    """The single run of the experiment carrying all ``tags`` (or None)."""
    filt = " and ".join(f"tags.{_quote_key(k)} = '{v}'" for k, v in tags.items())
    runs = mlflow_client.search_runs([experiment_id], filter_string=filt, max_results=2)
    return runs[0] if runs else None


def _quote_key(key: str) -> str:
    return f"`{key}`" if "." in key or "-" in key else key


def find_or_create_run(
    mlflow_client,
    experiment_id: str,
    *,
    tags: Mapping[str, str],
    run_name: str,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> tuple[str, bool]:
    """Return ``(run_id, created)``; the run is identified by ``tags`` (e.g. the Ray trial id).

    A found run that was left RUNNING, KILLED or FINISHED by an interrupted attempt is set back to RUNNING.
    """
    found = find_run(mlflow_client, experiment_id, tags)
    if found is not None:
        if found.info.status != "RUNNING":
            mlflow_client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, False
    all_tags = dict(tags)
    all_tags.update(extra_tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id, True


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params (``training.optimizer.lr``), skipping secret-like keys."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if any(h in name.lower() for h in _SECRET_HINTS):
            continue
        if isinstance(value, Mapping):
            out.update(flat_params(value, name + "."))
        elif isinstance(value, list | tuple):
            out[name] = ",".join(str(v) for v in value) if value else "[]"
        else:
            out[name] = "null" if value is None else str(value)
    return out


def log_params(mlflow_client, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches (MLflow limits a batch to 100 params)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(mlflow_client, run_id: str, metrics: Mapping[str, float | None], step: int) -> None:
    """Log finite numeric metrics at ``step`` in one batch."""
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if v is not None and isinstance(v, int | float) and math.isfinite(float(v))
    ]
    if items:
        mlflow_client.log_batch(run_id, metrics=items)

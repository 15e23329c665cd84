"""MLflow, driver side only: one experiment per study, a root run, a parent run per stage, a run per trial.

Trials never talk to MLflow: :class:`study.tune.callbacks.StudyCallback` logs their results from the driver. So
the tracking store has a single writer (no sqlite locking between trial processes) and on a cluster the
tracking server can stay bound to 127.0.0.1 on the head node, where the driver runs.

Ray Tune's built-in MLflow integrations create a second run for a resumed trial and leave the first one
RUNNING (docs/definitions.md §10); here every run is found-or-created by tags, so a trial keeps
exactly one run after any number of resumes. All calls go through an explicit ``MlflowClient`` with an
explicit tracking URI (no global active-run state, no dependence on the working directory).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainables.config import TrialConfig
from trainables.errors import UserError
from trainables.naming import config_label, trial_slug

TRIAL_ID_TAG = "trial_id"
STAGE_TAG = "stage"
STUDY_TAG = "study_id"
KIND_TAG = "kind"
PARENT_TAG = "mlflow.parentRunId"

# keys that never go into MLflow params (could hold credentials or machine-specific secrets)
_SECRET_HINTS = ("password", "token", "secret", "credential", "tracking_uri", "access_key")


#: MLflow 3 backends a study can log to (the file store is deprecated and refused)
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")


def check_tracking_uri(uri: str) -> str:
    """``--tracking-uri``: a backend MLflow 3 serves studies from; an sqlite store by absolute path, in a folder
    that exists. Returns the URI."""
    if uri.startswith("file:") or "://" not in uri:
        raise UserError(
            f"--tracking-uri {uri}: the MLflow file store is deprecated and refused by MLflow >= 3.13; "
            "use sqlite:////absolute/path/mlflow.db or an http(s):// tracking server"
        )
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in TRACKING_SCHEMES:
        raise UserError(f"--tracking-uri {uri}: unsupported scheme {scheme!r}; use sqlite:////absolute/path/"
                        f"mlflow.db, an http(s):// tracking server or a database URI ({', '.join(TRACKING_SCHEMES)})")
    if scheme == "sqlite":
        if not uri.startswith("sqlite:////"):
            raise UserError(f"--tracking-uri {uri}: use an absolute sqlite path (sqlite:////abs/path/mlflow.db)")
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise UserError(f"--tracking-uri {uri}: the folder {db.parent} does not exist; create it or point "
                            "the store elsewhere")
        if db.exists() and not db.is_file():
            raise UserError(f"--tracking-uri {uri}: {db} is not a file")
    return uri


def client(tracking_uri: str | None = None):
    """An MlflowClient for ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI``, set by the driver)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RuntimeError("no MLflow tracking URI (the study driver sets MLFLOW_TRACKING_URI)")
    return MlflowClient(tracking_uri=uri)


def _quote_key(key: str) -> str:
    return f"`{key}`" if "." in key or "-" in key else key


def find_run(mlflow_client, experiment_id: str, tags: Mapping[str, str]):
    """The run of the experiment carrying all ``tags`` (or None)."""
    filt = " and ".join(f"tags.{_quote_key(k)} = '{v}'" for k, v in tags.items())
    runs = mlflow_client.search_runs([experiment_id], filter_string=filt, max_results=2)
    return runs[0] if runs else None


def find_or_create_run(
    mlflow_client,
    experiment_id: str,
    *,
    tags: Mapping[str, str],
    run_name: str,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    reopen: bool = True,
) -> tuple[str, bool]:
    """Return ``(run_id, created)``; the run is identified by ``tags`` (e.g. the Ray trial id).

    A found run that an interrupted attempt left RUNNING, KILLED or FINISHED is set back to RUNNING (unless
    ``reopen`` is False: a run looked up to complete it is left as it is).
    """
    found = find_run(mlflow_client, experiment_id, tags)
    if found is not None:
        if reopen and found.info.status != "RUNNING":
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
            out[name] = ",".join(param_value(v) for v in value) if value else "[]"
        else:
            out[name] = param_value(value)
    return out


def param_value(value: Any) -> str:
    """One spelling per value kind: booleans ``true``/``false`` (so ``params.iw = 'true'`` and
    ``params.`training.amp` = 'false'`` both work), ``null`` for None."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def log_params(mlflow_client, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches (MLflow limits a batch to 100 params)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(mlflow_client, run_id: str, metrics: Mapping[str, Any], step: int) -> list[str]:
    """Log the finite numeric values of ``metrics`` at ``step`` in one batch; return the keys logged."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
    if items:
        mlflow_client.log_batch(run_id, metrics=items)
    return [m.key for m in items]


#: the values of a trial's results its MLflow run holds, besides every ``val_*``: step = the epoch + 1
LOGGED_RESULT_KEYS = ("train_loss", "lr", "epoch_seconds", "train_seconds")


class TrackingUnavailable(UserError):
    """The tracking server stayed unreachable past ``failure.tracking_retry_s`` (exit 2; the study resumes)."""


def backfill_runs(state, stage: str, results, *, retry_s: float) -> int:
    """Log into each trial's MLflow run the (metric, step) values of its Tune history that the run lacks (the
    tracking server was down while it trained; Tune's results hold every epoch); return how many were logged.

    A server that does not answer is retried with a doubling pause for up to ``retry_s`` seconds, then
    :class:`TrackingUnavailable` stops the study cleanly: its stage is not marked done, and `study resume` logs
    what was missed."""
    deadline, pause = time.monotonic() + retry_s, 1.0
    while True:
        try:
            return _backfill(state, stage, results)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the server (requests, MlflowException)
            if not _unreachable(exc):
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # the last try was at the end of the window
                raise TrackingUnavailable(
                    f"the MLflow tracking server {state.tracking_uri} has not answered for {retry_s:g} s "
                    f"(failure.tracking_retry_s; {type(exc).__name__}); the study stopped cleanly with every "
                    f"result kept: start the server again, then `study resume` logs what it missed") from None
            wait = min(pause, remaining)
            print(f"MLflow {state.tracking_uri} unreachable ({type(exc).__name__}); retrying in {wait:.3g} s",
                  file=sys.stderr, flush=True)
            time.sleep(wait)
            pause = min(2 * pause, 30.0)


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking server could not be reached (not a request it refused)."""
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("ConnectionError", "Connection refused", "Max retries exceeded", "Timeout",
                                   "RemoteDisconnected", "API request to", "503", "502", "504"))


def _backfill(state, stage: str, results) -> int:
    mlc = client(state.tracking_uri)
    n = 0
    for r in results:
        if r.config is None:
            continue
        run_id, created = trial_run(mlc, r.trial_id, TrialConfig.from_dict(r.config), r.name or r.trial_id,
                                    reopen=False)
        have = {} if created else logged_steps(mlc, run_id)  # created: the server was down when it started
        tags = {} if created else mlc.get_run(run_id).data.tags
        if r.status == "ERROR" and r.error and "error" not in tags:
            mlc.set_tag(run_id, "error", r.error)
        resumed = [row["resumed_from_epoch"] for row in r.history if row.get("resumed_from_epoch") is not None]
        if resumed and "resumed_from_epoch" not in tags:  # a trial retried from its checkpoint during the outage
            mlc.set_tag(run_id, "resumed_from_epoch", str(int(resumed[-1])))
        for row in r.history:
            step = int(row["epoch"]) + 1
            missing = {k: v for k, v in row.items()
                       if (k in LOGGED_RESULT_KEYS or k.startswith("val_")) and step not in have.get(k, ())}
            n += len(log_metrics(mlc, run_id, missing, step))
    return n


def trial_run(mlflow_client, trial_id: str, cfg: TrialConfig, trial_name: str, *,
              reopen: bool = True) -> tuple[str, bool]:
    """``(run_id, created)`` of a trial's MLflow run, found by its Ray trial id and stage (set RUNNING again when
    ``reopen``: the trial runs again) or made, with its params, under its stage's parent run."""
    run = cfg.run
    run_id, created = find_or_create_run(
        mlflow_client, run.experiment_id, reopen=reopen,
        tags={TRIAL_ID_TAG: trial_id, STAGE_TAG: run.stage, STUDY_TAG: run.study_id},
        run_name=f"{run.stage}:{cfg.trial.label}",
        parent_run_id=run.parent_run_id,
        extra_tags={"config": cfg.trial.config_name, "trial_name": trial_name, KIND_TAG: "trial",
                    **({"fold": str(cfg.trial.fold)} if cfg.trial.fold is not None else {})},
    )
    if created:
        log_params(mlflow_client, run_id, trial_params(cfg))
    return run_id, created


def logged_steps(mlflow_client, run_id: str) -> dict[str, set[int]]:
    """The steps at which each metric of the run has a value (to log each (metric, step) exactly once)."""
    keys = mlflow_client.get_run(run_id).data.metrics
    return {key: {m.step for m in mlflow_client.get_metric_history(run_id, key)} for key in keys}


def trial_params(cfg: TrialConfig) -> dict[str, str]:
    """What a researcher compares runs by: loss, iw, the loss's own parameters (named by their loss:
    ``focal.alpha``), ``config`` (the configuration and its hyperparameters, ``iw-focal[alpha=0.25,gamma=2]``),
    seed, data and protocol."""
    trial, run = cfg.trial, cfg.run
    study = cfg.study.for_trial(trial)  # the lr and iw strength it trained with
    params: dict[str, str] = {
        "loss": trial.loss,
        "iw": param_value(trial.iw),
        "config": config_label(trial.as_dict()),
        "seed": str(trial.seed),
        "stage": run.stage,
    }
    if trial.fold is not None:
        params["fold"] = str(trial.fold)
    params.update({f"{trial.loss}.{k}": param_value(v) for k, v in sorted(trial.loss_params.items())})
    data = study.data
    params["dataset"] = data.source if data.source == "phantom" else str(data.path)
    params["dataset.preset"] = data.preset
    params["splits.train"] = ",".join(run.splits)
    plain = study.to_dict()
    params.update(flat_params({key: plain[key] for key in ("training", "model", "inference")}))
    if run.validates:  # how the sweep validated and stopped trials (subset: the intermediate validations')
        params.update(flat_params({key: plain[key] for key in ("validation", "scheduler")}))
    params["training.epochs"] = str(run.epochs)
    if trial.iw:
        clip = study.iw.clip
        params["iw.clip"] = "null" if clip is None else ",".join(str(c) for c in clip)
        params["iw.power"] = param_value(study.iw.power)
    return params


#: run tag holding the ``models:/<id>`` URI of the model logged from a retrained winner
MODEL_URI_TAG = "model_uri"


def dataset_inputs(cfg: TrialConfig) -> list:
    """The data a trial run used, as MLflow datasets (the prepared cache; digest: of its index ``cache.json``,
    i.e. case ids, splits and preset, not of the voxels; the splits as context):
    ``training`` (the run's splits) and, for sweep trials, ``validation``."""
    import hashlib
    import json as _json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from trainables.data import Cache

    cache = Cache(cfg.study.data.cache_dir)
    index = (cache.root / "cache.json").read_text()
    digest = hashlib.sha256(index.encode()).hexdigest()[:16]
    name = cfg.study.data.source if cfg.study.data.source == "phantom" else Path(str(cfg.study.data.path)).name
    out = []
    contexts = [("training", tuple(cfg.run.splits))]
    if cfg.run.validates:
        contexts.append(("validation", tuple(cfg.study.data.val)))
    for context, splits in contexts:
        ids = cache.case_ids(list(splits))
        profile = {"cases": len(ids), "splits": list(splits), "preset": cache.preset,
                   "lesions": sum(int(cache.meta(c)["n_lesions"]) for c in ids)}
        schema = {"image": "float32 [z, y, x] in [0, 1]", "mask": "uint8 0/1", "labels": "int32 components"}
        ds = Dataset(name=f"{name}:{','.join(splits)}", digest=digest, source_type="local", source=str(cache.root),
                     schema=_json.dumps(schema), profile=_json.dumps(profile))
        out.append(DatasetInput(dataset=ds, tags=[InputTag(key="mlflow.data.context", value=context)]))
    return out


def logged_model_of(mlflow_client, experiment_id: str, run_id: str) -> str | None:
    """``models:/<id>`` of a model already logged from ``run_id`` (None if there is none)."""
    models = mlflow_client.search_logged_models(experiment_ids=[experiment_id],
                                                filter_string=f"source_run_id = '{run_id}'", max_results=1)
    return f"models:/{models[0].model_id}" if models else None


def log_model(tracking_uri: str, run_id: str, model, *, name: str, metadata: dict, window) -> str:
    """Log a retrained winner as an MLflow 3 logged model linked to its hold-out run (input example: a patch
    of the window's shape, each side capped at 16 voxels; signature inferred from it; the ``trainables`` package shipped as code, so the model
    loads without the study folder). ``metadata`` (preset, inference settings, threshold) is what
    ``study predict --model`` needs. Returns the ``models:/<id>`` URI, also set as the run's tag."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch

    import trainables

    example = np.zeros((1, 1, *[min(int(w), 16) for w in window]), dtype=np.float32)
    model = model.cpu().eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, output)
    import logging

    mlflow.set_tracking_uri(tracking_uri)
    # pickle (not pt2: MLflow 3.17's default fixes the input shape) draws a warning per model; said once, here
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model, name=name, input_example=example, signature=signature, metadata=metadata,
            code_paths=[str(Path(trainables.__file__).parent)], serialization_format="pickle",  # pt2 fixes the shape
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "scipy", "SimpleITK"],
        )
    uri = f"models:/{info.model_id}"
    client(tracking_uri).set_tag(run_id, MODEL_URI_TAG, uri)
    return uri


# ---------------------------------------------------------------------------------------------- study level


def setup(state, study_dir, *, experiment_name: str, cfg=None) -> dict[str, str]:
    """Create or find the experiment and the study's root run; store their ids in the state. With ``cfg``
    (the study's config) the experiment and the study run are described for the MLflow UI
    (:func:`describe_study`)."""
    if state.tracking_uri.startswith(("http://", "https://")):
        check_server(state.tracking_uri)
    try:
        ids = _setup(state, study_dir, experiment_name=experiment_name)
        if cfg is not None:
            describe_study(state, study_dir, cfg)
        return ids
    except UserError:
        raise
    except Exception as exc:  # an unreachable server, a locked or foreign database...
        raise UserError(f"MLflow at {state.tracking_uri}: {type(exc).__name__}: {str(exc)[:500]} "
                        "(is the tracking server running? `study resume` continues once it is)") from None


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when the tracking server is not there."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"MLflow tracking server {uri} does not answer ({exc}); start it (on a cluster: "
                        "`ray up cluster.yaml` starts it on the head) and run the command again") from None


def _setup(state, study_dir, *, experiment_name: str) -> dict[str, str]:
    mlc = client(state.tracking_uri)
    ids = state.mlflow_ids()
    exp = mlc.get_experiment(ids["experiment_id"]) if ids.get("experiment_id") else None
    if exp is None:
        exp = mlc.get_experiment_by_name(experiment_name)
        if exp is not None and exp.tags.get(STUDY_TAG) not in (None, state.study_id):
            raise UserError(
                f"MLflow experiment {experiment_name!r} already belongs to another study at "
                f"{state.tracking_uri}; choose another --name"
            )
    if exp is None:
        local = state.tracking_uri.startswith("sqlite:")
        artifact_location = Path(study_dir.artifacts_dir).as_uri() if local else None
        exp_id = mlc.create_experiment(experiment_name, artifact_location=artifact_location,
                                       tags={STUDY_TAG: state.study_id})
        exp = mlc.get_experiment(exp_id)
    ids["experiment_id"] = exp.experiment_id
    root_id, _ = find_or_create_run(
        mlc, exp.experiment_id, tags={STUDY_TAG: state.study_id, KIND_TAG: "study"},
        run_name=f"study:{state.data['name']}", extra_tags={"study_folder": str(study_dir.root)},
    )
    ids["study_run_id"] = root_id
    state.save()
    return ids


#: the runs table columns the study's shared view shows (``study ui`` opens it)
VIEW_COLUMNS = ("params.`config`", "params.`loss`", "params.`iw`", "params.`seed`", "tags.`stage`",
                "tags.`selected`", "metrics.`val_avg_recall`", "metrics.`val_obj_dice`",
                "metrics.`val_fp_per_image`", "metrics.`train_loss`", "metrics.`holdout_avg_recall`",
                "metrics.`holdout_strict_avg_recall`", "metrics.`holdout_obj_dice`",
                "metrics.`holdout_fp_per_image`", "attributes.`Duration`")
#: the key of that view: ``#/experiments/<id>/runs?viewStateShareKey=study``
VIEW_KEY = "study"
#: MLflow 3 opens an experiment of this kind on its runs (not on the GenAI overview)
EXPERIMENT_KIND = "custom_model_development"


def experiment_url(base: str, experiment_id: str) -> str:
    """The study's runs in the MLflow UI at ``base``: the model-training view, with the study's columns."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")


def study_description(study_dir, cfg) -> str:
    """What the experiment and the study run say about the study (Markdown, shown by the MLflow UI)."""
    data = cfg.data.source if cfg.data.path is None else f"{cfg.data.source} {cfg.data.path}"
    losses = ", ".join(sorted({tr.config_name for tr in cfg.trials}))
    lines = [cfg.description or f"Study {study_dir.name}.", "",
             f"- data: {data} (splits train {','.join(cfg.data.train)}, validation {','.join(cfg.data.val)}, "
             f"hold-out {','.join(cfg.data.holdout)})",
             f"- protocol: {protocol_line(cfg)}",
             f"- configurations: {losses}; seeds {', '.join(map(str, cfg.search.seeds))}; "
             f"{cfg.sweep_size} sweep trials",
             f"- selection: {selection_rule(cfg)}",
             f"- study folder: `{study_dir.root}` (report: `{study_dir.report_file.relative_to(study_dir.root)}`)",
             "- runs: `stage:sweep` (one run per trial, tagged `selected=true` for the winners), "
             "`stage:retrain` (the winners on train+validation), `stage:holdout` (their hold-out records, "
             "FROC and metrics, and the logged model)"]
    return "\n".join(lines)


def protocol_line(cfg) -> str:
    t = cfg.training
    return (f"{t.epochs} epochs x {t.iterations} iterations (retrain {cfg.epochs_retrain}), batch {t.batch_size}, "
            f"patches {'x'.join(map(str, t.patch_size))}, SGD lr {t.optimizer.lr:g}, U-Net width {cfg.model.width:g}")


def selection_rule(cfg) -> str:
    sel = cfg.selection
    scope = "last validation" if sel.scope == "last" else "best validation over the epochs"
    who = "best per (loss, iw)" if sel.mode == "per-config" else f"top {sel.k} overall"
    among = (", among the trials that reached the highest epoch of their "
             f"{'configuration' if sel.mode == 'per-config' else 'study'} (ASHA)" if cfg.scheduler.type == "asha"
             else "")
    return f"{who} by {sel.metric} ({scope}), mean over seeds{among}"


def describe_study(state, study_dir, cfg) -> None:
    """Experiment tags (kind, description, dataset, protocol, folder, the runs view) and the study run's
    description, params and frozen ``study.yaml``. Idempotent: run at every launch and resume."""
    import json

    mlc = client(state.tracking_uri)
    ids = state.mlflow_ids()
    exp_id, root = ids["experiment_id"], ids["study_run_id"]
    text = study_description(study_dir, cfg)
    dataset = cfg.data.source if cfg.data.path is None else f"{cfg.data.source}:{cfg.data.path}"
    view = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
            "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
            "selectedColumns": list(VIEW_COLUMNS)}
    tags = {"mlflow.experimentKind": EXPERIMENT_KIND, "mlflow.note.content": text, "dataset": dataset,
            "protocol": protocol_line(cfg), "study_folder": str(study_dir.root),
            f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(view)}
    for key, value in tags.items():
        mlc.set_experiment_tag(exp_id, key, value)
    for key, value in {"mlflow.note.content": text, "dataset": dataset, "protocol": protocol_line(cfg),
                       "selection": selection_rule(cfg)}.items():
        mlc.set_tag(root, key, value)
    if not mlc.get_run(root).data.params:  # written once; a resume finds them
        plain = cfg.to_dict()
        plain.pop("trials", None)
        log_params(mlc, root, {**flat_params(plain), "trials": str(cfg.sweep_size)})
    if study_dir.config_file.is_file():
        mlc.log_artifact(root, str(study_dir.config_file))


def stage_parent(state, stage: str) -> str:
    """The parent run of a stage (``sweep``, ``retrain`` or ``holdout``), nested under the study run."""
    mlc = client(state.tracking_uri)
    ids = state.mlflow_ids()
    run_id, _ = find_or_create_run(
        mlc, ids["experiment_id"],
        tags={STUDY_TAG: state.study_id, KIND_TAG: "stage", STAGE_TAG: stage},
        run_name=f"stage:{stage}", parent_run_id=ids["study_run_id"],
    )
    ids[f"{stage}_run_id"] = run_id
    state.save()
    return run_id


def finish_stage_runs(state, stage: str, trial_status: dict[str, str]) -> None:
    """Close the stage's runs: no run is left RUNNING once its stage has ended.

    ``trial_status`` maps a Ray trial id to its final status (TERMINATED / ERROR).
    """
    mlc = client(state.tracking_uri)
    for run in stage_runs(state, stage, kind=None):
        if run.info.status != "RUNNING":
            continue
        tid = run.data.tags.get(TRIAL_ID_TAG)
        if tid is None:  # the stage's parent run
            mlc.set_terminated(run.info.run_id, "FINISHED")
        elif tid in trial_status:
            mlc.set_terminated(run.info.run_id, "FAILED" if trial_status[tid] == "ERROR" else "FINISHED")


def stage_runs(state, stage: str, kind: str | None = "trial") -> list:
    """The runs of a stage of this study (``kind``: ``trial``, ``evaluation``, ``stage``; None: all)."""
    mlc = client(state.tracking_uri)
    filt = f"tags.{STUDY_TAG} = '{state.study_id}' and tags.{STAGE_TAG} = '{stage}'"
    if kind is not None:
        filt += f" and tags.{KIND_TAG} = '{kind}'"
    return mlc.search_runs([state.mlflow_ids()["experiment_id"]], filter_string=filt, max_results=5000)


def tag_selection(state, selection: dict[str, Any], rule: str) -> None:
    """Tag every sweep run ``selected=true|false`` and ``selection=<rule>``; a winner's runs also carry the
    score it was chosen by (``selection_score``, the mean over its seeds)."""
    mlc = client(state.tracking_uri)
    score = {tid: w["score"] for w in selection["winners"] for tid in w["trial_ids"]}
    for run in stage_runs(state, "sweep"):
        tid = run.data.tags.get(TRIAL_ID_TAG)
        mlc.set_tag(run.info.run_id, "selected", "true" if tid in score else "false")
        mlc.set_tag(run.info.run_id, "selection", rule)
        if tid in score:
            mlc.set_tag(run.info.run_id, "selection_score", f"{score[tid]:.4f}")


def holdout_run(state, *, trial_id: str, label: str, config: str, parent_run_id: str,
                params: Mapping[str, str]) -> str:
    """The hold-out run of a retrained winner (found or created by its retrain trial's id): params of its
    retrain run plus the evaluation's, linked to that run by the ``retrain_run_id`` tag."""
    mlc = client(state.tracking_uri)
    exp_id = state.mlflow_ids()["experiment_id"]
    retrain = find_run(mlc, exp_id, {TRIAL_ID_TAG: trial_id, STAGE_TAG: "retrain"})
    run_id, created = find_or_create_run(
        mlc, exp_id, tags={TRIAL_ID_TAG: trial_id, STAGE_TAG: "holdout", STUDY_TAG: state.study_id},
        run_name=f"holdout:{label}", parent_run_id=parent_run_id,
        extra_tags={KIND_TAG: "evaluation", "config": config,
                    **({"retrain_run_id": retrain.info.run_id} if retrain is not None else {})})
    if created:
        merged = dict(retrain.data.params) if retrain is not None else {}
        merged.update(params)
        log_params(mlc, run_id, merged)
    return run_id


def verdict_short(entry: Mapping[str, Any]) -> str:
    """A verdict entry in a few words, from the strict-rule interval (the sentence has the rest)."""
    r = (entry.get("resolved") or {}).get("avg_recall_strict", 0)
    who = "iw" if entry.get("kind", "iw") == "iw" else entry.get("iw", "it")
    return {1: f"{who} finds more lesions (strict rule)", -1: f"{who} finds fewer lesions (strict rule)"}.get(
        r, "not resolved")


def log_verdict(state, summary: Mapping[str, Any]) -> None:
    """The verdict on the study run: per loss a tag (``verdict.<loss>``: a few words; ``.sentence``: the
    report's sentence) and metrics ``verdict.<loss>.<metric>`` / ``_ci_low`` / ``_ci_high``."""
    mlc = client(state.tracking_uri)
    root = state.mlflow_ids()["study_run_id"]
    metrics: dict[str, Any] = {}
    for entry in (summary.get("verdict") or {}).get("entries") or []:
        key = f"verdict.{trial_slug(entry['loss'])}"  # a loss, or an iw setting (iw-bce_iw.power-0.5)
        mlc.set_tag(root, key, verdict_short(entry))
        mlc.set_tag(root, f"{key}.sentence", entry["sentence"][:4900])
        for metric, d in entry["metrics"].items():
            metrics[f"{key}.{metric}"] = d.get("delta")
            metrics[f"{key}.{metric}_ci_low"] = d.get("ci_low")
            metrics[f"{key}.{metric}_ci_high"] = d.get("ci_high")
    log_metrics(mlc, root, metrics, step=0)

"""Ray: start/connect, build or restore a Tuner, and check that a Tune experiment really finished.

Pitfalls handled here (docs/definitions.md §10):

* ``Tuner.restore`` needs the *same wrapped* trainable: resources come from the frozen config, so the
  restored trials get the same ``with_resources`` request (a bare function would silently give 1 CPU/0 GPU).
* Tune does not persist a scheduler's state on restore (ray#30838): FIFO by default; ``scheduler: asha`` uses
  :class:`study.tune.asha.AshaScheduler`, whose rungs live in a file beside the experiment and are read back.
* After Ctrl+C ``fit()`` returns normally and reports unfinished trials as TERMINATED; completion is
  decided here from what each trial last reported (``training_done``), never from Ray's status alone.
* A GPU (or custom-resource) request that no node can satisfy fails fast instead of waiting forever.
* Trials get absolute paths only (their working directory is a Ray temp folder); MLflow is logged by the
  driver's callback, so trials need neither the tracking URI nor access to the tracking server.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainables.errors import UserError


def init_ray(address: str | None, *, tracking_uri: str, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``) or start a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    # the driver logs to MLflow (study.tune.callbacks); trials never need the tracking URI
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except ConnectionError as exc:
            raise UserError(f"--address {address}: cannot connect to a Ray cluster ({exc})") from None
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env=runtime_env,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
    )


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def check_resources(resources: Mapping[str, float], *, wait_for_resources: bool) -> None:
    """Fail fast when no node of the cluster can ever run one trial (Tune would wait forever)."""
    import ray

    if wait_for_resources:
        return
    per_node = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    ray_names = {"cpu": "CPU", "gpu": "GPU"}
    needed = {ray_names.get(k, k): float(v) for k, v in resources.items() if float(v) > 0}
    if any(all(node.get(k, 0.0) >= v for k, v in needed.items()) for node in per_node):
        return
    totals = {k: max((node.get(k, 0.0) for node in per_node), default=0.0) for k in needed}
    missing = ", ".join(f"{k}: {v:g} per trial but at most {totals[k]:g} on any node"
                        for k, v in needed.items() if totals[k] < v)
    hint = ""
    if needed.get("GPU"):
        hint = (" This machine (or cluster) has no GPU: set `resources: {cpu: N, gpu: 0}` in the search space,"
                " or pass --wait-for-resources on an autoscaling cluster whose GPU nodes are not up yet.")
    raise UserError(f"no Ray node can run a trial: {missing}.{hint}")


def _dirname(trial) -> str:
    return trial.trial_id


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    spec: dict[str, Any]
    status: str  # TERMINATED (really finished), STOPPED (by ASHA at a rung), ERROR, or UNFINISHED
    last: dict[str, Any]
    checkpoint_path: str | None
    error: str | None
    history: list[dict[str, Any]]
    stopped_at_epoch: int | None = None  # the rung epoch (1-based) where ASHA stopped it
    config: dict[str, Any] | None = None  # the trial's whole config (study, run, trial), as Tune keeps it
    name: str | None = None  # Tune's name of the trial (train_trial_<id>)

    def measured(self, metric: str) -> float | None:
        """``metric`` at the last epoch that measured it (the last result when no history was read)."""
        if self.history:
            return last_measured(self.history, metric)
        value = self.last.get(metric)
        return None if value is None else float(value)


#: reuse a trial's process for the next trial of the same resources (``benchmarks.trial_cost`` compares both)
REUSE_ACTORS = True


def run_experiment(
    *,
    storage: Path,
    name: str,
    trainable,
    resources: Mapping[str, float],
    param_space: dict[str, Any],
    metric: str | None,
    max_concurrent: int | None,
    max_failures: int,
    scheduler=None,
    verbose: int = 0,
    resume_errored: bool = False,
    search_alg=None,
    num_samples: int = 1,
) -> None:
    """Run (or resume) the Tune experiment ``storage/name`` until Tune returns. ``resume_errored``: a restored
    experiment runs its errored trials again (after trials failed on a node whose torch could not use its GPU).
    ``search_alg``/``num_samples``: a searcher that suggests the trials (TPE, :mod:`study.tune.searcher`) instead
    of the param space's grid."""
    from ray import tune

    from study.tune.asha import state_file as asha_state_file
    from study.tune.callbacks import StudyCallback

    # frequent experiment-state snapshots are what makes a SIGKILL lose at most one epoch: don't warn about them
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    wrapped = tune.with_resources(trainable, dict(resources))
    path = storage / name
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=wrapped, resume_unfinished=True,
                                   resume_errored=resume_errored)
    else:
        tuner = tune.Tuner(
            wrapped,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric, mode="max" if metric else None, num_samples=num_samples, search_alg=search_alg,
                max_concurrent_trials=max_concurrent, trial_dirname_creator=_dirname, scheduler=scheduler,
                # a trial's process is reused for the next trial of the same resources: no new Python, no torch
                # import, no CUDA context per trial; the trainer resets every per-trial state itself
                reuse_actors=REUSE_ACTORS,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[StudyCallback(name, asha_file=str(asha_state_file(storage, name)))],
                verbose=verbose,
            ),
        )
    tuner.fit()


def outcomes(storage: Path, name: str) -> list[TrialOutcome]:
    """Read the experiment's trials from disk (no running Ray needed), in grid order (trial id), or the order a
    searcher gave them (TPE: round and position)."""
    from ray import tune

    from study.tune.asha import AshaState
    from study.tune.asha import state_file as asha_state_file
    from study.tune.callbacks import error_reason

    path = storage / name
    if not (path.is_dir() and any(path.glob("experiment_state-*.json"))):
        return []
    try:
        analysis = tune.ExperimentAnalysis(str(path))
        histories = analysis.trial_dataframes  # trial id -> every reported result (progress.csv)
    except Exception as exc:  # a truncated or hand-edited experiment_state-*.json, a damaged result file
        files = ", ".join(p.name for p in sorted(path.glob("experiment_state-*.json")))
        raise UserError(f"{path}: the Ray Tune state of the {name} stage ({files}) cannot be read "
                        f"({type(exc).__name__}: {exc}); restore the folder from a backup (its trials and "
                        "checkpoints are recorded there), or launch the study again under another --name") from None
    asha = AshaState.read(asha_state_file(storage, name))
    for trial in analysis.trials:  # a trial whose results file exists but could not be read: name it
        results = path / trial.trial_id / "result.json"
        df = histories.get(trial.trial_id)
        if (df is None or df.empty) and results.is_file() and results.stat().st_size:
            from trainables.naming import trial_label

            label = trial_label(trial.config["trial"]) if "trial" in trial.config else trial.trial_id
            raise UserError(f"{results}: the per-epoch results of trial {label} cannot be read (damaged or "
                            f"hand-edited); restore the file from a backup (the same metrics are in the trial's "
                            f"MLflow run, {name}:{label}), or remove it: the study then goes on without that trial's "
                            "per-epoch history (its curves, and selection.scope best, lose it)")
    out = []
    for trial in analysis.trials:
        last = dict(trial.last_result or {})
        history = epoch_history(histories.get(trial.trial_id))
        stopped = asha.stopped_at(trial.trial_id) if asha is not None else None
        if trial.status == "ERROR":
            status = "ERROR"
        elif last.get("training_done"):
            status = "TERMINATED"
        elif stopped is not None:
            # stopped by ASHA: TERMINATED, or still PAUSED/PENDING in Tune's file when the stop came while it
            # had no live process (Ray 2.60's stop_trial does not mark such a trial for the experiment snapshot;
            # a resume stops it again before it runs)
            status = "STOPPED"
            # a trial restored past its rung after a kill may have reported one more epoch before it was stopped
            # again: what counts is what it had at the rung
            history = [h for h in history if int(h["epoch"]) < stopped]
            last = {**last, **history[-1]} if history else last
        else:
            status = "UNFINISHED"
        ckpt = trial.checkpoint.path if trial.checkpoint is not None else None
        out.append(TrialOutcome(trial.trial_id, dict(trial.config.get("trial", {})), status, last, ckpt,
                                error_reason(trial), history, stopped if status == "STOPPED" else None,
                                config=dict(trial.config), name=str(trial)))
    out.sort(key=lambda o: (o.config or {}).get("order") or o.trial_id)  # grid order, or a search's own
    return out


def epoch_history(df) -> list[dict[str, Any]]:
    """One result per epoch, in epoch order, from a trial's reported results (Tune's ``result.json``).

    A resumed trial re-reports the epochs after its checkpoint, so an epoch may appear more than once; the
    last report of an epoch is the one the final model continued from. A metric a result did not report
    (validation runs every ``validation.every`` epochs) is absent from that epoch, not NaN.
    """
    if df is None:
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for row in df.to_dict("records"):
        clean = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
        if "epoch" in clean:
            by_epoch[int(clean["epoch"])] = clean
    return [by_epoch[e] for e in sorted(by_epoch)]


def last_measured(history: list[dict[str, Any]], metric: str) -> float | None:
    """The value of ``metric`` at the last epoch that measured it (None if none did)."""
    for row in reversed(history):
        if row.get(metric) is not None:
            return float(row[metric])
    return None


def trial_score(history: list[dict[str, Any]], metric: str, scope: str) -> float | None:
    """A trial's score for selection: ``metric`` at the last epoch that measured it (``scope: last``, the paper's)
    or its best value over the epochs (``scope: best``); None when no epoch measured it."""
    if scope == "best":
        values = [float(h[metric]) for h in history if h.get(metric) is not None]
        return max(values) if values else None
    return last_measured(history, metric)


def unfinished(results: list[TrialOutcome], expected: int) -> int:
    """Trials that still have to run (missing from the state or not finished)."""
    return max(0, expected - len(results)) + sum(r.status == "UNFINISHED" for r in results)

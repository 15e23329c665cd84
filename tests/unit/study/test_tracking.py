"""study.tracking against a real sqlite MLflow store: which URIs a study accepts, the params' one spelling, one run
per trial found again after a restart, metrics logged once per step, the stage runs closed, the selection tags and
the verdict on the study run."""

from __future__ import annotations

import pytest

from study import tracking
from study.layout import StudyDir, StudyState
from study.loader import config_from_dict
from trainables.errors import UserError


@pytest.fixture
def study(tmp_path):
    """A study folder with its own sqlite store, its experiment and study run set up."""
    d = StudyDir(tmp_path / "s")
    d.root.mkdir()
    state = StudyState.create(d.state_file, name="s", tracking_uri=d.default_tracking_uri())
    tracking.setup(state, d, experiment_name="s")
    return d, state


def test_tracking_uris(tmp_path):
    ok = f"sqlite:///{tmp_path}/m.db"
    assert tracking.check_tracking_uri(ok) == ok
    assert tracking.check_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    for bad, needle in ((f"file://{tmp_path}", "file store is deprecated"), ("/abs/mlruns", "file store"),
                        ("ftp://host/x", "unsupported scheme 'ftp'"), ("sqlite:///rel.db", "absolute sqlite"),
                        (f"sqlite:///{tmp_path}/missing/m.db", "does not exist")):
        with pytest.raises(UserError, match=needle):
            tracking.check_tracking_uri(bad)


def test_params_have_one_spelling_and_no_secrets():
    flat = tracking.flat_params({"training": {"amp": False, "optimizer": {"lr": 0.01}, "patch_size": [8, 16, 8]},
                                 "data": {"path": None, "splits": []}, "tracking_uri": "http://x", "api": {"token": "t"}})
    assert flat == {"training.amp": "false", "training.optimizer.lr": "0.01", "training.patch_size": "8,16,8",
                    "data.path": "null", "data.splits": "[]"}
    assert tracking.param_value(True) == "true" and tracking.param_value(None) == "null"


def test_one_run_per_trial_found_again_and_metrics_once_per_step(study):
    d, state = study
    mlc = tracking.client(state.tracking_uri)
    exp = state.mlflow_ids()["experiment_id"]
    tags = {tracking.TRIAL_ID_TAG: "t1", tracking.STAGE_TAG: "sweep", tracking.STUDY_TAG: state.study_id}
    run_id, created = tracking.find_or_create_run(mlc, exp, tags=tags, run_name="sweep:bce/s0",
                                                  extra_tags={tracking.KIND_TAG: "trial"})
    assert created
    mlc.set_terminated(run_id, "KILLED")  # an interrupted attempt
    again, created = tracking.find_or_create_run(mlc, exp, tags=tags, run_name="other")
    assert (again, created) == (run_id, False) and mlc.get_run(run_id).info.status == "RUNNING"
    logged = tracking.log_metrics(mlc, run_id, {"a": 1.0, "b": float("nan"), "c": True, "d": "x", "e": 2}, step=1)
    assert logged == ["a", "e"]  # finite numbers only; a bool is not a metric
    tracking.log_metrics(mlc, run_id, {"a": 0.5}, step=2)
    assert tracking.logged_steps(mlc, run_id) == {"a": {1, 2}, "e": {1}}
    tracking.log_params(mlc, run_id, {f"p{i}": str(i) for i in range(250)})  # batches of 100
    assert len(mlc.get_run(run_id).data.params) == 250


def test_stage_runs_are_closed_and_the_selection_tagged(study):
    d, state = study
    mlc = tracking.client(state.tracking_uri)
    exp = state.mlflow_ids()["experiment_id"]
    parent = tracking.stage_parent(state, "sweep")
    assert tracking.stage_parent(state, "sweep") == parent  # found, not made twice
    ids = {}
    for tid in ("t1", "t2", "t3"):
        ids[tid], _ = tracking.find_or_create_run(
            mlc, exp, tags={tracking.TRIAL_ID_TAG: tid, tracking.STAGE_TAG: "sweep",
                            tracking.STUDY_TAG: state.study_id},
            run_name=f"sweep:{tid}", parent_run_id=parent, extra_tags={tracking.KIND_TAG: "trial"})
    tracking.finish_stage_runs(state, "sweep", {"t1": "TERMINATED", "t2": "ERROR"})
    status = {tid: mlc.get_run(r).info.status for tid, r in ids.items()}
    assert status == {"t1": "FINISHED", "t2": "FAILED", "t3": "RUNNING"}  # t3 has not ended
    assert mlc.get_run(parent).info.status == "FINISHED"
    tracking.tag_selection(state, {"winners": [{"score": 0.61234, "trial_ids": ["t1"]}]}, "per-config")
    tags = {tid: mlc.get_run(r).data.tags for tid, r in ids.items()}
    assert tags["t1"]["selected"] == "true" and tags["t1"]["selection_score"] == "0.6123"
    assert tags["t2"]["selected"] == "false" and "selection_score" not in tags["t2"]
    assert {t["selection"] for t in tags.values()} == {"per-config"}


def test_the_verdict_on_the_study_run(study):
    d, state = study
    entry = {"loss": "dice", "iw": "iw-dice", "plain": "dice", "sentence": "iw-dice vs dice: not resolved.",
             "resolved": {"avg_recall_strict": -1},
             "metrics": {"avg_recall_strict": {"delta": -0.2, "ci_low": -0.3, "ci_high": -0.1},
                         "obj_dice": {"delta": None, "ci_low": None, "ci_high": None}}}
    tracking.log_verdict(state, {"verdict": {"entries": [entry]}})
    run = tracking.client(state.tracking_uri).get_run(state.mlflow_ids()["study_run_id"])
    assert run.data.tags["verdict.dice"] == "iw finds fewer lesions (strict rule)"
    assert run.data.tags["verdict.dice.sentence"] == entry["sentence"]
    assert run.data.metrics["verdict.dice.avg_recall_strict_ci_high"] == -0.1
    assert "verdict.dice.obj_dice" not in run.data.metrics  # an undefined difference is not logged as a number
    assert tracking.verdict_short({"resolved": {"avg_recall_strict": 0}}) == "not resolved"


def test_the_selection_rule_and_experiment_url():
    cfg = config_from_dict({"search": {"losses": {"focal": {"iw": [False, True], "alpha": [0.25, 0.75]}}}})
    assert tracking.selection_rule(cfg) == "best per (loss, iw) by val_avg_recall (last validation), mean over seeds"
    top = config_from_dict({"search": {"configs": ["bce"]}, "selection": {"mode": "top-k", "k": 2, "scope": "best"},
                            "scheduler": {"type": "asha"}, "training": {"epochs": 4}})
    assert tracking.selection_rule(top) == ("top 2 overall by val_avg_recall (best validation over the epochs), mean "
                                            "over seeds, among the trials that reached the highest epoch of their "
                                            "study (ASHA)")
    assert tracking.experiment_url("http://h:5000/", "3") == \
        "http://h:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=study"


def _outcome(state, cfg, spec, status, history, error=None):
    from study.tune.space import study_payload
    from study.tune.tuner import TrialOutcome

    ids = state.mlflow_ids()
    config = {"trial": spec.as_dict(), "study": study_payload(cfg, "/tmp/cache"),
              "run": {"stage": "sweep", "splits": ["train"], "validate": True, "epochs": 3,
                      "experiment_id": ids["experiment_id"], "parent_run_id": ids["study_run_id"],
                      "study_id": state.study_id}}
    return TrialOutcome(f"t-{spec.label}", spec.as_dict(), status, history[-1] if history else {}, None, error,
                        history, config=config, name=f"train_trial_{spec.label}")


def test_what_an_outage_kept_out_of_mlflow_is_logged_at_the_stage_end(study):
    """Issue 30: the values Tune holds and MLflow lacks (a run that missed epochs, a run never created, an error
    never tagged) are logged once, each (metric, step) once; a second pass logs nothing."""
    d, state = study
    cfg = config_from_dict({"search": {"losses": {"bce": {"iw": [False, True]}, "dice": {}}, "seeds": [0]}})
    plain, iw, dice = cfg.trials
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "lr": 0.01, "epoch_seconds": 1.5, "train_seconds": 1.0,
                "phase_setup_s": 0.1, **({"val_avg_recall": 0.5, "val_obj_dice": 0.4} if e == 2 else {})}
               for e in range(3)]
    mlc = tracking.client(state.tracking_uri)
    partial = _outcome(state, cfg, plain, "TERMINATED", history)
    run_id, created = tracking.trial_run(mlc, partial.trial_id, tracking.TrialConfig.from_dict(partial.config),
                                         partial.name)
    tracking.log_metrics(mlc, run_id, {"train_loss": 1.0, "lr": 0.01}, step=1)  # the server went down after it
    missing = _outcome(state, cfg, iw, "TERMINATED", history)  # started while the server was down: no run
    failed = _outcome(state, cfg, dice, "ERROR", [], error="TrialDivergedError: non-finite training loss")
    n = tracking.backfill_runs(state, "sweep", [partial, missing, failed], retry_s=0)
    assert n == (4 * 3 + 2 - 2) + (4 * 3 + 2)  # every (metric, step) of both histories but the two already logged
    for o in (partial, missing):
        rid = tracking.find_run(mlc, state.mlflow_ids()["experiment_id"], {tracking.TRIAL_ID_TAG: o.trial_id}).info.run_id
        steps = tracking.logged_steps(mlc, rid)
        assert steps == {"train_loss": {1, 2, 3}, "lr": {1, 2, 3}, "epoch_seconds": {1, 2, 3},
                         "train_seconds": {1, 2, 3}, "val_avg_recall": {3}, "val_obj_dice": {3}}
        assert [m.value for m in mlc.get_metric_history(rid, "train_loss")] == [1.0, 0.5, 1 / 3]
    made = tracking.find_run(mlc, state.mlflow_ids()["experiment_id"], {tracking.TRIAL_ID_TAG: missing.trial_id})
    assert made.data.params["loss"] == "bce" and made.data.params["iw"] == "true"
    err = tracking.find_run(mlc, state.mlflow_ids()["experiment_id"], {tracking.TRIAL_ID_TAG: failed.trial_id})
    assert err.data.tags["error"].startswith("TrialDivergedError")
    assert tracking.backfill_runs(state, "sweep", [partial, missing, failed], retry_s=0) == 0


def test_a_tracking_server_down_past_the_window_stops_the_stage_cleanly(study, monkeypatch):
    import socket

    d, state = study
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state.data["tracking_uri"] = f"http://127.0.0.1:{port}"
    cfg = config_from_dict({"search": {"losses": {"bce": {}}, "seeds": [0]}})
    o = _outcome(state, cfg, cfg.trials[0], "TERMINATED", [{"epoch": 0, "train_loss": 1.0}])
    import time

    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match=rf"127.0.0.1:{port} has not answered for 2 s .*"
                                                           r"`study resume` logs what it missed"):
        tracking.backfill_runs(state, "sweep", [o], retry_s=2)
    assert time.monotonic() - t0 >= 2.0  # the whole window is tried (its last try at its end), not cut short

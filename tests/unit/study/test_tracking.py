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

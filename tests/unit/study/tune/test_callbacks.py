"""The driver's MLflow logging (``study.tune.callbacks.StudyCallback``) against a real sqlite MLflow store: one value
per metric and step after a driver restart that replays results, steps = the 1-based epochs of the console."""

from __future__ import annotations

import pytest

from study.loader import config_from_dict
from study.tune.callbacks import StudyCallback
from study.tune.space import study_payload


class _Trial:
    """What the callback reads of a Tune trial: its id, its config and its name."""

    status = "RUNNING"

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config = trial_id, config

    def __str__(self):
        return f"train_trial_{self.trial_id}"


@pytest.fixture
def store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    return client, exp


def _trial(exp: str) -> _Trial:
    cfg = config_from_dict({"search": {"losses": {"bce": {"iw": True}}}})
    config = {"trial": cfg.trials[0].as_dict(), "study": study_payload(cfg, "/nowhere"),
              "run": {"stage": "sweep", "splits": ["train"], "validate": True, "epochs": 4,
                      "experiment_id": exp, "parent_run_id": None, "study_id": "s1"}}
    return _Trial("abc_00000", config)


def _result(epoch: int, loss: float, validated: bool) -> dict:
    r = {"epoch": epoch, "epochs": 4, "train_loss": loss, "lr": 0.01, "epoch_seconds": 1.0 + epoch}
    if validated:
        r.update(val_avg_recall=0.1 * epoch, val_obj_dice=0.5, val_fp_per_image=1.0)
    return r


def test_replayed_results_after_a_restart_are_logged_once(store):
    client, exp = store
    trial = _trial(exp)
    first = StudyCallback("sweep")
    for epoch in range(3):  # validation at epochs 2 and 4 (every 2)
        first.on_trial_result(0, [trial], trial, _result(epoch, 1.0 - 0.1 * epoch, epoch % 2 == 1))
    # the driver dies; Tune restores a snapshot taken after epoch 1 and the trial re-runs epochs 2..4,
    # reporting epoch 2 (index 1) and 3 (index 2) again; a fresh callback (unpickled) has no memory of the run
    second = StudyCallback("sweep")
    for epoch in range(1, 4):
        result = _result(epoch, 1.0 - 0.1 * epoch, epoch % 2 == 1)
        result["epoch_seconds"] = 99.0  # a replayed epoch takes another time: the first value stays
        second.on_trial_result(0, [trial], trial, result)
    run = client.search_runs([exp])[0]
    steps = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                     key=lambda m: m.step)]
             for key in run.data.metrics}
    assert steps["train_loss"] == [(1, 1.0), (2, 0.9), (3, pytest.approx(0.8)), (4, pytest.approx(0.7))]
    assert [s for s, _ in steps["val_avg_recall"]] == [2, 4]  # only where validation ran
    assert steps["epoch_seconds"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 99.0)]
    for key, points in steps.items():
        assert len({s for s, _ in points}) == len(points), key
    assert len(client.search_runs([exp])) == 1  # one run for the trial across the restart

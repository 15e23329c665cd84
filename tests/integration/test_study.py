"""A tiny study through real Ray and MLflow: SIGKILL mid-sweep / mid-retrain, resume, exactly-once runs.

Each test runs `study` in a subprocess in its own process group and kills the whole group (driver and local
Ray) with SIGKILL, the harshest interruption, then resumes. The phantom data and the network are tiny, so a
whole study takes about a minute on two cores.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import threading
from pathlib import Path

import pytest
import yaml

from .conftest import kill_group, run_study, start_study, wait_for

pytestmark = pytest.mark.integration

TINY = {
    "name": "tiny",
    "data": {"source": "phantom", "phantom": {"cases": 8, "seed": 0, "shape": [32, 48, 48]}},
    "model": {"width": 0.125, "channels_last": False},  # runs compared with each other: one layout
    "training": {"epochs": 4, "iterations": 4, "patch_size": [16, 32, 32],
                 "lr_schedule": {"milestones": [3], "gamma": 0.1}},
    "inference": {"window": [32, 48, 48], "stride": [32, 48, 48]},
    "validation": {"n_boot": 0},
    "evaluation": {"n_boot": 50},
    "search": {"losses": {"bce": {"iw": [False, True]}, "dice": {"iw": False}}, "seeds": [0]},
    "resources": {"cpu": 1, "gpu": 0},
    "failure": {"max_failures": 1},
}


def _space(tmp_path: Path, **changes) -> Path:
    data = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / f"tiny-{len(list(tmp_path.glob('tiny*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _state(study: Path) -> dict:
    p = study / "state.json"
    return json.loads(p.read_text()) if p.is_file() else {"stages": {}}


def _checkpoints(study: Path, stage: str, min_index: int) -> bool:
    return any(int(p.name.split("_")[-1]) >= min_index for p in (study / "ray" / stage).glob("*/checkpoint_*"))


def _snapshotted(study: Path, stage: str, min_index: int) -> bool:
    """Tune's experiment state on disk already knows a trial checkpoint >= ``min_index`` (what a restore resumes
    from; a checkpoint folder alone is not enough: the driver may die before its next snapshot)."""
    import re

    for state in (study / "ray" / stage).glob("experiment_state-*.json"):
        if any(int(i) >= min_index for i in re.findall(r"checkpoint_(\d{6})", state.read_text())):
            return True
    return False


def _runs(study: Path, stage: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study.name)
    kind = "evaluation" if stage == "holdout" else "trial"  # hold-out runs evaluate the retrain trials
    return client.search_runs([exp.experiment_id], filter_string=f"tags.stage = '{stage}' and tags.kind = '{kind}'",
                               max_results=1000)


def _all_runs(study: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study.name)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _histories(study: Path) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """(stage, run name) -> metric -> [(step, value)] of every trial run, in step order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    out = {}
    for stage in ("sweep", "retrain", "holdout"):
        for run in _runs(study, stage):
            out[(stage, run.info.run_name)] = {
                key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                for key in run.data.metrics}
    return out


def _assert_unique_steps(histories) -> None:
    for run, metrics in histories.items():
        for key, points in metrics.items():
            steps = [s for s, _ in points]
            assert len(steps) == len(set(steps)), (run, key, steps)


def _numbers(obj, path=""):
    """Every number of a summary.json by its path (paths, trial ids and the machine left out)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k not in ("records", "trial_id", "environment"):
                out.update(_numbers(v, f"{path}.{k}"))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{path}[{i}]"))
        return out
    return {path: obj} if isinstance(obj, int | float) and not isinstance(obj, bool) else {}


def _check_predict(storage: Path, study: Path, tmp_path: Path) -> None:
    """`study predict` on the study's own hold-out images with one retrained model: the records computed from
    the written probability maps equal the hold-out stage's records of that model, the written images keep the
    inputs' grid; an output folder holding other files and an unknown label are refused with exit 2."""
    import shutil

    import numpy as np

    from trainables.data.io import read_image
    from trainables.metrics import load_records, volume_records

    manifest = study / "data" / "phantom" / "manifest.csv"
    rows = [ln.split(",") for ln in manifest.read_text().splitlines()[1:]]
    holdout = [r for r in rows if r[3] == "holdout"]
    inputs, rois = tmp_path / "predict_in", tmp_path / "predict_roi"
    inputs.mkdir()
    rois.mkdir()
    for r in holdout:  # the phantom's cases were cropped to their ROI (preset none): predict gets the ROIs too
        shutil.copy(manifest.parent / r[1], inputs / Path(r[1]).name)
        shutil.copy(manifest.parent / r[4], rois / Path(r[1]).name)
    out = tmp_path / "predict_out"
    res = run_study("predict", study.name, "--storage", str(storage), "--input", str(inputs), "--roi", str(rois),
                    "--output", str(out), "--config", "dice/s0", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"[{len(holdout)}/{len(holdout)}]" in res.stderr
    expected = load_records(study / "holdout" / "dice" / "s0" / "records_any.json")
    keys = ("obj", "is_tum", "volume_vox", "diameter", "hit_dice", "hit_obj")
    for r in holdout:
        case = r[0]
        image, geom = read_image(manifest.parent / r[1])
        prob, pgeom = read_image(out / f"{case}_prob.nii.gz")
        mask, mgeom = read_image(out / f"{case}_mask.nii.gz")
        assert pgeom == geom and mgeom == geom and prob.dtype == np.float32 and mask.dtype == np.uint8
        gt, _ = read_image(manifest.parent / r[2])
        got = volume_records(prob, gt > 0, geom.spacing, is_logit=False)
        assert [{k: x[k] for k in keys} for x in got.records] == \
            [{k: x[k] for k in keys} for x in expected[case].records], case
        for a, b in zip(got.records, expected[case].records):
            assert a["hit_max"] == pytest.approx(b["hit_max"], rel=1e-6, abs=1e-7)
        n_rows = len((out / f"{case}_lesions.csv").read_text().splitlines()) - 1
        assert n_rows == sum(not x["is_tum"] for x in got.records)  # one row per predicted component
    # the same model, logged to MLflow by the hold-out stage, predicts the same in a fresh process, no study folder
    run = next(r for r in _runs(study, "holdout") if r.info.run_name == "holdout:dice/s0")
    uri = run.data.tags["model_uri"]
    assert uri.startswith("models:/")
    out2 = tmp_path / "predict_mlflow"
    res = run_study("predict", "--model", uri, "--tracking-uri", f"sqlite:///{study / 'mlflow.db'}", "--input",
                    str(inputs), "--roi", str(rois), "--output", str(out2), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for r in holdout:
        a, _ = read_image(out / f"{r[0]}_prob.nii.gz")
        b, _ = read_image(out2 / f"{r[0]}_prob.nii.gz")
        np.testing.assert_allclose(a, b, atol=1e-6)
    # every trial run says what it was trained (and validated) on
    for stage, contexts in (("sweep", {"training", "validation"}), ("retrain", {"training"})):
        for r in _runs(study, stage):
            tags = {t.key: t.value for d in r.inputs.dataset_inputs for t in d.tags}
            got = {t.value for d in r.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"}
            assert got == contexts, (stage, r.info.run_name, tags)
    (out / "notes.txt").write_text("mine")
    res = run_study("predict", study.name, "--storage", str(storage), "--input", str(inputs), "--output", str(out),
                    cwd=tmp_path)
    assert res.returncode == 2 and "holds other files" in res.stderr and "notes.txt" in res.stderr
    res = run_study("predict", study.name, "--storage", str(storage), "--input", str(inputs), "--output",
                    str(tmp_path / "o2"), "--config", "focal", cwd=tmp_path)
    assert res.returncode == 2 and "--config focal: not a configuration" in res.stderr


def _store_paths(db: Path) -> list[str]:
    """Every artifact location an MLflow sqlite store keeps for the study (its experiment, runs and logged
    models; not MLflow's own Default experiment, which points at the working folder)."""
    import sqlite3

    with sqlite3.connect(db) as con:
        return sorted([r[0] for r in con.execute("SELECT artifact_location FROM experiments WHERE name != 'Default'")]
                      + [r[0] for r in con.execute("SELECT artifact_uri FROM runs")]
                      + [r[0] for r in con.execute("SELECT artifact_location FROM logged_models")])


def _check_relocated(study: Path, tmp_path: Path) -> None:
    """Issue 19: a copied study folder is a study of its own: its state and its MLflow store are rewritten to
    point at the copy (the original's store is untouched), `study report` logs into the copy's store, and with
    the original folder gone (a move) the copy still predicts what the original predicted."""
    import shutil

    import numpy as np

    from trainables.data.io import read_image

    elsewhere = tmp_path / "elsewhere"
    copy = elsewhere / study.name
    shutil.copytree(study, copy)
    original_paths = _store_paths(study / "mlflow.db")
    assert all(str(study) in p for p in original_paths)
    res = run_study("report", study.name, "--storage", str(elsewhere), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"was copied from {study}" in res.stderr
    state = json.loads((copy / "state.json").read_text())
    assert state["tracking_uri"] == f"sqlite:///{copy / 'mlflow.db'}" and state["folder"] == str(copy)
    paths = _store_paths(copy / "mlflow.db")
    assert len(paths) == len(original_paths) and all(p.startswith(copy.as_uri()) for p in paths), paths[:3]
    assert _store_paths(study / "mlflow.db") == original_paths
    report_artifacts = copy / "mlartifacts"
    assert any(p.name == "report.md" for p in report_artifacts.rglob("report.md"))
    aside = study.with_name(study.name + "-aside")  # a move: nothing of the original is left to read
    study.rename(aside)
    try:
        out = tmp_path / "predict_copy"
        res = run_study("predict", study.name, "--storage", str(elsewhere), "--input", str(tmp_path / "predict_in"),
                        "--roi", str(tmp_path / "predict_roi"), "--output", str(out), "--config", "dice/s0",
                        cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        for f in sorted((tmp_path / "predict_out").glob("*_prob.nii.gz")):
            np.testing.assert_array_equal(read_image(out / f.name)[0], read_image(f)[0])
    finally:
        aside.rename(study)


def _logged_models(study: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study.name)
    models = client.search_logged_models(experiment_ids=[exp.experiment_id], max_results=1000)
    runs = {r.info.run_id: r.info.run_name for r in _all_runs(study)}
    return sorted(f"{runs.get(m.source_run_id)}:{m.name}" for m in models)


def _asha_log(study: Path) -> list[dict]:
    p = study / "ray" / "sweep-asha.json"
    return json.loads(p.read_text())["log"] if p.is_file() else []


def _completed_fold_models(outcome: dict[str, tuple]) -> dict[str, int]:
    """Configuration/seed label -> how many of its fold trials ASHA let finish (from :func:`_asha_outcome`)."""
    counts = collections.Counter(label.rsplit("/", 1)[0] for label, (end, _, _) in outcome.items()
                                 if end == "completed")
    return dict(counts)


def _holder_pid(study: Path) -> int | None:
    try:
        return json.loads((study / "driver.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _asha_outcome(study: Path) -> dict[str, tuple]:
    """Trial label -> (how it ended, the epoch ASHA stopped it at, its decisions)."""
    trials = json.loads((study / "ray" / "sweep-asha.json").read_text())["trials"]
    return {t["label"]: (t["end"], t["stopped_at_epoch"], t["decisions"]) for t in trials.values()}


def test_a_study_killed_mid_sweep_and_mid_retrain_ends_as_an_uninterrupted_run(tmp_path, no_leftover_processes):
    """Issues 5, 6, 10, 16, 26, 30: one cross-validated ASHA study (plain and iw Dice, 2 seeds, 2 folds; a BCE
    configuration whose loss turns NaN) killed with SIGKILL in every stage (data: the phantom written, the cache
    not; the sweep after its first rung decision; select: selection.json written, MLflow not tagged; the retrain;
    the hold-out after some models' records; the report: its files logged, the verdict not) and resumed each time
    (a second resume beside one exits 2), ends with the same folds, stopped, completed and errored trials, winners with
    their per-fold scores and MLflow statuses, exactly the MLflow history (one value per metric and step, equal
    values) and the summary.json numbers (retrained winners and fold ensembles) of an uninterrupted run of the
    same seeds on this machine; a checkpointed trial continues from its epoch, the diverged one errors with its
    reason and is not retrained. The uninterrupted study, once finished, serves `study predict` (a retrained model,
    and the fold models as an ensemble), a copy of its folder, `study metrics`, `study status` and the MLflow UI
    (checked while the other is killed and resumed)."""
    changes = dict(search={"losses": {"dice": {"iw": [False, True]}, "bce": {"iw": False}}, "seeds": [0, 1]},
                   data={**TINY["data"], "folds": 2},
                   training={**TINY["training"], "optimizer": {"lr": 0.05}},
                   scheduler={"type": "asha", "metric": "val_obj_dice", "grace_epochs": 1, "reduction_factor": 2},
                   validation={"n_boot": 0, "every": 2, "subset": 1},
                   failure={"max_failures": 0})  # a diverged trial fails again when retried: not retried here
    nan = {"nan_at_iteration": 2, "nan_configs": ["bce"]}  # in the first epoch (4 iterations)
    storage = tmp_path / "studies"
    # the reference, beside the killed study (its own local Ray; the killed one mostly sleeps): no sleep (the
    # testing section is not part of the numerics, MLflow params or results)
    ref_log = tmp_path / "straight.log"
    reference = start_study("launch", str(_space(tmp_path, **changes, testing=nan)), "--storage", str(storage),
                            "--name", "straight", cwd=tmp_path, log=ref_log)
    # once it has finished, the uninterrupted study serves predict, a copy, metrics, status and the UI, checked
    # in a thread while this one kills and resumes the other study (it mostly waits)
    beside = _Beside(_check_the_finished_reference, reference, storage, tmp_path)
    beside.start()

    space = _space(tmp_path, **changes, testing={**nan, "sleep_per_iteration": 0.15, "sleep_after_holdout_model": 2,
                                                 "sleep_in_stage": {"data": 4, "select": 4, "report": 4}})
    study = storage / "killed"
    hold = lambda stage, path: f"{stage}: (testing.sleep_in_stage)" in path.read_text()  # noqa: E731
    log = tmp_path / "launch.log"
    proc = start_study("launch", str(space), "--storage", str(storage), "--name", "killed", cwd=tmp_path, log=log)
    wait_for(lambda: hold("data", log), timeout=120, proc=proc, log=log)  # the phantom written, no cache yet
    kill_group(proc)  # 0: in the data stage
    assert not (study / "data" / "cache" / "cache.json").is_file()

    log = tmp_path / "resume0.log"
    proc = start_study("resume", "killed", "--storage", str(storage), cwd=tmp_path, log=log)
    # the first rung decision is made and Tune's snapshot knows a checkpoint (what a restore resumes from)
    wait_for(lambda: len(_asha_log(study)) >= 1 and _snapshotted(study, "sweep", 0), timeout=300, proc=proc,
             log=log)
    assert not _state(study)["stages"].get("sweep", {}).get("done")
    folds = (study / "folds.json").read_bytes()
    kill_group(proc)  # 1: mid-sweep

    status = json.loads(run_study("status", "killed", "--storage", str(storage), "--json", cwd=tmp_path).stdout)
    assert not status["stages"]["sweep"].get("done")
    log2 = tmp_path / "resume.log"
    proc = start_study("resume", "killed", "--storage", str(storage), cwd=tmp_path, log=log2)
    # one driver per study (issue 30): a second resume started while this one drives exits 2 naming it
    # (the killed launch left its driver.json behind, never its lock: wait for this resume's own)
    wait_for(lambda: _holder_pid(study) == proc.pid, timeout=60, proc=proc, log=log2)
    second = run_study("resume", "killed", "--storage", str(storage), cwd=tmp_path)
    assert second.returncode == 2 and f"is being driven by `study resume` (PID {proc.pid}" in second.stderr, \
        second.stderr
    wait_for(lambda: hold("select", log2), timeout=400, proc=proc, log=log2)  # selection.json written, not tagged
    assert (study / "selection.json").is_file() and not _state(study)["stages"].get("select", {}).get("done")
    kill_group(proc)  # in the select stage

    log2 = tmp_path / "resume1b.log"
    proc = start_study("resume", "killed", "--storage", str(storage), cwd=tmp_path, log=log2)
    wait_for(lambda: _checkpoints(study, "retrain", 1), timeout=400, proc=proc, log=log2)
    assert _state(study)["stages"].get("select", {}).get("done")
    assert not _state(study)["stages"].get("retrain", {}).get("done")
    kill_group(proc)  # 2: mid-retrain

    log3 = tmp_path / "resume2.log"
    proc = start_study("resume", "killed", "--storage", str(storage), cwd=tmp_path, log=log3)
    wait_for(lambda: any((study / "holdout").rglob("records_any.json")), timeout=400, proc=proc, log=log3)
    assert not _state(study)["stages"].get("holdout", {}).get("done")
    kill_group(proc)  # 3: mid-hold-out, some models' records written, others not

    assert reference.wait(timeout=900) == 0, ref_log.read_text()[-4000:]
    # a clean console (issue 30): the diverged trial shows its error, no trial actor that ended normally shows
    # Ray's SystemExit noise
    console = ref_log.read_text()
    assert "SystemExit" not in console and "Exception ignored" not in console, console[-4000:]
    assert "non-finite training loss" in console
    straight_asha = _asha_outcome(storage / "straight")
    assert {end for end, _, _ in straight_asha.values()} == {"completed", "stopped", "error"}, straight_asha

    log4 = tmp_path / "resume3.log"
    proc = start_study("resume", "killed", "--storage", str(storage), cwd=tmp_path, log=log4)
    wait_for(lambda: hold("report", log4), timeout=400, proc=proc, log=log4)  # report files logged, no verdict yet
    assert (study / "report" / "report.md").is_file() and not _state(study)["stages"].get("report", {}).get("done")
    kill_group(proc)  # 4: in the report stage

    res = run_study("resume", "killed", "--storage", str(storage), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "sweep: already done, skipped" in res.stdout and "Report:" in res.stdout
    skipped = beside.result(timeout=600)  # before reading the uninterrupted study's files: its copy check moves it
    # the folds: made once, unchanged by the resumes, the same as the uninterrupted run's (one seed)
    assert (study / "folds.json").read_bytes() == folds == (storage / "straight" / "folds.json").read_bytes()
    report = study / "report" / "report.md"
    text = report.read_text()
    assert "Table 2 analogue" in text and text.index("## Verdict") < text.index("## Hold-out results")
    assert "- iw-dice vs dice (2 seeds): strict (IoU ≥ 0.3) avg recall" in text
    # ASHA: the same trials stopped at the same rungs by the same decisions, the same winners, same run statuses
    assert _asha_outcome(study) == straight_asha
    winners = lambda st: [{k: v for k, v in w.items() if k != "trial_ids"}  # noqa: E731 (ids differ per study)
                          for w in json.loads((st / "selection.json").read_text())["winners"]]
    assert winners(study) == winners(storage / "straight")
    assert sorted(w["loss"] for w in winners(study)) == ["dice", "dice"]  # the diverged configuration is out
    assert all(len(w["fold_scores"]) >= 1 and "fold_spread" in w for w in winners(study))
    statuses = lambda st: {(r.info.run_name, r.info.status, r.data.tags.get("stopped_at_epoch"))  # noqa: E731
                           for r in _all_runs(st) if r.info.run_name != "study:" + st.name}
    assert statuses(study) == statuses(storage / "straight")
    stopped = {n: e for n, (_, e, _) in straight_asha.items() if e is not None}
    runs = _runs(study, "sweep")
    assert len(runs) == 12 and len({r.data.tags["trial_id"] for r in runs}) == 12  # one run per trial
    assert sorted(r.data.params["fold"] for r in runs) == ["0"] * 6 + ["1"] * 6
    assert all(r.data.tags["fold"] == r.data.params["fold"] and r.info.run_name.endswith(f"/f{r.data.params['fold']}")
               for r in runs)
    for r in runs:
        label = r.info.run_name.removeprefix("sweep:")
        if r.data.tags["config"] == "bce":  # diverged: its reason in MLflow, no epoch logged
            assert r.info.status == "FAILED" and "non-finite training loss" in r.data.tags["error"]
            continue
        assert r.info.status == "FINISHED"
        assert r.data.tags.get("stopped_at_epoch") == (str(stopped[label]) if label in stopped else None)
    # a trial that had a checkpoint when the driver died continued from it: its epoch count did not restart
    assert any(int(r.data.tags.get("resumed_from_epoch", 0)) >= 1 for r in runs), "no sweep trial resumed"
    for png in ("froc.png", "size_groups.png", "diameters.png", "curves.png"):
        assert (study / "report" / png).stat().st_size > 1000
    sweep = json.loads(run_study("status", "killed", "--storage", str(storage), "--json", cwd=tmp_path).stdout)
    states = {trial_label_of(t["trial"]): t["state"] for t in sweep["trials"]["sweep"]}
    assert {states[k] for k in states if k.startswith("bce")} == {"ERROR"}
    assert {states[k] for k in states if k in stopped} <= {"STOPPED"}

    summary = json.loads((study / "holdout" / "summary.json").read_text())
    assert sorted(summary["configs"]) == ["dice/s0", "dice/s1", "iw-dice/s0", "iw-dice/s1"]
    # a fold ensemble averages the fold models of its configuration and seed that completed (ASHA stops some)
    completed = _completed_fold_models(straight_asha)
    assert {lb: c["fold_models"] for lb, c in summary["fold_ensembles"].items()} == completed
    assert summary["holdout_models"] == "both" and summary["verdict_folds"]["entries"]
    holdout = _runs(study, "holdout")  # the retrained winners' runs and the fold ensembles'
    assert len({r.data.tags["trial_id"] for r in holdout}) == len(holdout) == 4 + len(completed)
    assert "## Hold-out results of the fold ensembles (no retraining)" in text and "Cross-validation: 2 folds" in text
    assert all("holdout_avg_recall" in r.data.metrics for r in holdout)
    assert not [r for r in _all_runs(study) if r.info.status == "RUNNING"]
    # the same logged models (one per retrained winner, its run's name), none twice
    assert _logged_models(study) == _logged_models(storage / "straight")

    # MLflow: the same runs, each metric with one value per step, equal to the uninterrupted run's
    straight, killed = _histories(storage / "straight"), _histories(study)
    _assert_unique_steps(killed)
    assert sorted(killed) == sorted(straight)
    for run, metrics in straight.items():
        for key, points in metrics.items():
            if key in ("train_loss", "lr") or key.startswith(("val_", "holdout_")):
                assert killed[run][key] == points, (run, key)
    for (stage, name), m in straight.items():
        if stage == "sweep" and "val_avg_recall" in m:  # rung validations (1, 2: one case), every 2, the last: all
            label = name.removeprefix("sweep:")
            rungs = [1, 2][: stopped.get(label, 2)]
            last = [] if label in stopped else [4]
            assert [s for s, _ in m["val_avg_recall"]] == rungs + last, name
            assert [v for _, v in m["val_n_cases"]] == [1] * len(rungs) + [3] * len(last), name  # a fold's 3
            assert [s for s, _ in m["train_loss"]] == list(range(1, len(m["train_loss"]) + 1)), name

    # summary.json: every number identical (the same study twice on one machine, one run interrupted twice)
    a = _numbers(json.loads((storage / "straight" / "holdout" / "summary.json").read_text()))
    b = _numbers(json.loads((study / "holdout" / "summary.json").read_text()))
    assert len(a) > 50 and a == b
    if skipped is not None:  # the browser check, where no browser is installed
        raise skipped


class _Beside(threading.Thread):
    """``fn(*args)`` in a thread; :meth:`result` joins it and raises what it raised (a failed assertion), or
    returns its skip for the test to raise once its own checks have passed."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.error = fn, args, None

    def run(self) -> None:
        try:
            self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            self.error = exc

    def result(self, timeout: float) -> BaseException | None:
        self.join(timeout)
        if self.is_alive():
            pytest.fail(f"the checks of the finished study took more than {timeout:g} s")
        if isinstance(self.error, pytest.skip.Exception):
            return self.error
        if self.error is not None:
            raise self.error
        return None


def _check_the_finished_reference(reference, storage: Path, tmp_path: Path) -> None:
    """The uninterrupted study, once finished, serves `study predict` (a retrained model, and the fold models as
    an ensemble), a copy of its folder, `study metrics`, `study status` and the MLflow UI."""
    if reference.wait(timeout=900) != 0:
        return  # the test's thread reports it, with the study's console
    study = storage / "straight"
    _check_predict(storage, study, tmp_path)
    completed = _completed_fold_models(_asha_outcome(study))
    out = tmp_path / "predict_folds"
    res = run_study("predict", study.name, "--storage", str(storage), "--input", str(tmp_path / "predict_in"),
                    "--roi", str(tmp_path / "predict_roi"), "--output", str(out), "--config", "dice", "--ensemble",
                    cwd=tmp_path)
    n_dice = completed.get("dice/s0", 0) + completed.get("dice/s1", 0)
    assert res.returncode == 0 and f"dice/s0 + dice/s1 ({n_dice} fold models)" in res.stdout + res.stderr, \
        res.stderr[-3000:]
    assert len(list(out.glob("*_prob.nii.gz"))) == 2
    _check_relocated(study, tmp_path)  # after _check_predict: it reuses its inputs and outputs
    _check_finished_study(storage, study, tmp_path)  # last: its browser part may skip


def trial_label_of(spec: dict) -> str:
    from trainables.naming import trial_label

    return trial_label(spec)


def _check_finished_study(storage: Path, study: Path, tmp_path: Path) -> None:
    """Issue 15 on a finished study: `study metrics` on its hold-out folder reproduces the report's numbers,
    `study status --json` has the winners, hold-out table, verdict and report, the MLflow layout (stage parents,
    selected winners, hold-out runs with records, the study run's verdict), and the UI in a real browser;
    SIGKILL to `study ui` leaves nothing behind (its watchdog)."""
    from mlflow.tracking import MlflowClient

    from . import ui_check

    summary = json.loads((study / "holdout" / "summary.json").read_text())
    res = run_study("metrics", str(study / "holdout"), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {d["file"]: d for d in map(json.loads, res.stdout.splitlines())}
    report = (study / "report" / "report.md").read_text()
    for label, c in summary["configs"].items():
        got, want = rows[f"{label} (any)"], c["luna16"]
        for key in ("avg_recall", "avg_recall_ci_low", "avg_recall_ci_high", "obj_dice", "fp_per_image"):
            assert got[key] == want[key], (label, key)
        assert f"| {label} | {got['avg_recall']:.3f} [{got['avg_recall_ci_low']:.3f}, " in report
        assert rows[f"{label} (strict)"]["avg_recall"] == c["strict"]["avg_recall"]
    status = run_study("status", study.name, "--storage", str(storage), "--json", cwd=tmp_path)
    assert status.stdout.startswith("{\n")  # pretty-printed
    st = json.loads(status.stdout)
    assert sorted(w["configuration"] for w in st["selection"]["winners"]) == ["dice", "iw-dice"]
    assert len(st["holdout"]["configurations"]) == 4 and st["holdout"]["verdict"][0]["comparison"] == "iw-dice vs dice"
    assert st["report"].endswith("report.md") and all(s["seconds"] >= 0 for s in st["stages"].values())

    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study.name)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["mlflow.note.content"]
    runs = _all_runs(study)
    names = {r.info.run_name: r for r in runs}
    assert {"stage:sweep", "stage:retrain", "stage:holdout", f"study:{study.name}"} <= set(names)
    # the winners' trials that reached the last epoch are selected; a trial ASHA stopped or one that failed is not
    for r in _runs(study, "sweep"):
        out = r.data.tags.get("stopped_at_epoch") or r.info.status == "FAILED"
        assert r.data.tags["selected"] == ("false" if out else "true"), r.info.run_name
    for r in _runs(study, "holdout"):  # linked to the run(s) of the model(s) it judges
        if r.data.tags["trial_id"].startswith("folds:"):
            assert set(r.data.tags["fold_run_ids"].split(",")) <= {x.info.run_id for x in _runs(study, "sweep")}
        else:
            assert r.data.tags["retrain_run_id"] in {x.info.run_id for x in _runs(study, "retrain")}
        assert {"holdout_avg_recall", "holdout_recall_at_0.125_fp"} <= set(r.data.metrics)
        files = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"records_any.json", "records_strict.json", "froc.png"} <= files
    root = names[f"study:{study.name}"]
    assert root.data.tags["verdict.dice"] and "verdict.dice.avg_recall_strict" in root.data.metrics
    assert root.data.params["training.optimizer.nesterov"] in ("true", "false")
    assert "study.yaml" in {a.path for a in client.list_artifacts(root.info.run_id)}

    ui_check.chromium()  # skips (after every other check) where no browser is installed
    proc, url = ui_check.start_ui(storage, study.name, tmp_path, tmp_path / "ui.log")
    try:
        ui_check.check_ui(url, Path(os.environ.get("STUDY_UI_SHOTS", tmp_path / "shots")),
                          plain="dice/s0/f0", iw="iw-dice/s0/f0")
    finally:
        ui_check.kill_leaves_nothing(proc, signal.SIGKILL)  # no handler runs: study ui's watchdog acts


def test_gpu_request_without_gpu_fails_fast(tmp_path, no_leftover_processes):
    """Issue 5: a GPU request on a machine without GPUs fails with a clear message instead of hanging."""
    space = _space(tmp_path, resources={"cpu": 1, "gpu": 1})
    res = run_study("launch", str(space), "--storage", str(tmp_path / "studies"), cwd=tmp_path, timeout=180)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "resources.gpu" in res.stderr and "0 GPU(s)" in res.stderr
    assert not (tmp_path / "studies" / "tiny").exists()  # checked before the study folder is made

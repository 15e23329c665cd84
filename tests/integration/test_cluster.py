"""A real two-node Ray cluster on this machine plus a real MLflow tracking server (issue 7).

``ray start --head`` and ``ray start --address`` (the worker carries a custom resource ``worker_node``) with
Ray 2.60's token authentication, ``mlflow server`` on 127.0.0.1 with a sqlite backend, and a tiny study
launched with ``--address`` and ``--tracking-uri`` whose trials are pinned to the worker by that resource.
The worker node is killed mid-trial: Tune's FailureConfig retries the trial from its checkpoint on a new
worker node. The tracking server is stopped for 20 s mid-sweep (what it missed is logged at the sweep's end), then
again during the retrain past ``failure.tracking_retry_s``: the launch stops cleanly (exit 2), and `study resume`
logs what was missed and completes every run. Everything started here is stopped here (never ``ray stop``, which
would stop every Ray on the machine).

The same head advertises a GPU this machine does not have (``ray start --num-gpus 1``) to workers whose torch is
a CPU build: the GPU path on a machine without one (issue 32). A GPU study launched against it never trains on
the CPU: with the step setup given in the search space, its trials fail before their first step with the node's
CUDA line and the launch exits 2 (resumable); without it, the launch's own measurement on a trial node fails
first and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .conftest import run_study, start_study, wait_for
from .ray_cluster import Cluster

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def cluster():
    """A head (1 CPU, a fake GPU), a worker with the custom resource ``worker_node`` and an MLflow server,
    shared by this module's tests; nothing of it is left running afterwards."""
    from .conftest import _service_pids, leftover_processes

    before = set(_service_pids())
    root = Path(tempfile.mkdtemp(prefix="iw2n.", dir="/tmp"))  # unix sockets live under --temp-dir: keep it short
    c = Cluster(root)
    try:
        c.start_head(num_gpus=1)
        c.start_worker()
        c.start_mlflow()
        yield c
    finally:
        c.stop()
        left = leftover_processes(before)
        assert not left, f"processes left behind: {left}"


def test_two_node_study_with_mlflow_server_survives_a_lost_worker(cluster, tmp_path):
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump({
        "name": "cluster-tiny",
        "data": {"source": "phantom", "phantom": {"cases": 8, "seed": 0, "shape": [32, 48, 48]}},
        "model": {"width": 0.125},
        "training": {"epochs": 4, "iterations": 4, "patch_size": [16, 32, 32]},
        "inference": {"window": [32, 48, 48], "stride": [32, 48, 48]},
        "validation": {"n_boot": 0},
        "evaluation": {"n_boot": 50},
        "search": {"losses": {"dice": {"iw": [False, True]}}, "seeds": [0]},
        # pinned to the worker node by its custom resource; the head has none
        "resources": {"cpu": 1, "gpu": 0, "custom": {"worker_node": 1}},
        "failure": {"max_failures": 2, "tracking_retry_s": 30},  # > the first outage (20 s)
        "testing": {"sleep_per_iteration": 0.25},
    }))
    storage = tmp_path / "studies"
    study = storage / "cluster-tiny"
    log = tmp_path / "launch.log"
    driver_env = {k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}  # the cluster's token
    # the MLflow client gives up at once (no HTTP retries): what the outages keep out is the study's to catch up
    driver_env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    proc = start_study("launch", str(space), "--storage", str(storage), "--address", cluster.address,
                       "--tracking-uri", cluster.tracking_uri, cwd=tmp_path, log=log, env=driver_env)
    try:
        # a sweep trial has checkpointed its first epoch: kill the node it runs on
        wait_for(lambda: any((study / "ray" / "sweep").glob("*/checkpoint_000000")), timeout=300, proc=proc, log=log)
        cluster.kill_worker_raylet(cluster.workers[0])
        cluster.start_worker()  # a replacement node with the resource, as an autoscaler would bring
        # the tracking server goes away for 20 s while the trials train, and comes back (issue 30)
        wait_for(lambda: "retrying from its last checkpoint" in log.read_text(), timeout=300, proc=proc, log=log)
        cluster.stop_mlflow()
        time.sleep(20)
        cluster.start_mlflow()
        # then it goes away during the retrain and stays away past failure.tracking_retry_s (30 s): a clean stop
        wait_for(lambda: "retrain: 2 trial(s)" in log.read_text(), timeout=600, proc=proc, log=log)
        cluster.stop_mlflow()
        assert proc.wait(timeout=600) == 2, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    out = log.read_text()
    outage = out[out.index("retrain: 2 trial(s)"):]  # (the lost node's trial printed Ray's traceback before)
    assert "has not answered for 30 s (failure.tracking_retry_s" in outage and "Traceback" not in outage, outage
    cluster.start_mlflow()
    res = run_study("resume", "cluster-tiny", "--storage", str(storage), "--address", cluster.address, cwd=tmp_path,
                    env=driver_env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "the tracking server missed while the trials ran were logged now" in res.stdout, res.stdout[-3000:]
    assert "the trial node" in out and "reads the cache" in out  # the workers' cache check (issue 29)
    # the lost node held the trial: it could only run where `worker_node` is (the head has none)
    assert "retrying from its last checkpoint" in out
    assert (study / "report" / "report.md").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cluster.tracking_uri)
    exp = client.get_experiment_by_name("cluster-tiny")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'")
    sweep = [r for r in runs if r.data.tags["stage"] == "sweep"]
    holdout = [r for r in runs if r.data.tags["stage"] == "retrain"]
    assert sorted(r.data.tags["config"] for r in sweep) == ["dice", "iw-dice"]
    assert sorted(r.data.tags["config"] for r in holdout) == ["dice", "iw-dice"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in sweep + holdout:  # every epoch of every trial, once, the outage notwithstanding
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, 5)), (r.info.run_name, steps)
    retried = [r for r in sweep if "resumed_from_epoch" in r.data.tags]
    assert retried and all(int(r.data.tags["resumed_from_epoch"]) >= 1 for r in retried)
    state = json.loads((study / "state.json").read_text())
    assert state["tracking_uri"] == cluster.tracking_uri


GPU_SPACE = {
    "name": "gpu-tiny",
    "data": {"source": "phantom", "phantom": {"cases": 6, "seed": 0, "shape": [24, 32, 32]}},
    "model": {"width": 0.125},
    "training": {"epochs": 2, "iterations": 2, "patch_size": [16, 16, 16], "lr_schedule": {"milestones": [1]}},
    "inference": {"window": [24, 32, 32], "stride": [24, 32, 32]},
    "validation": {"n_boot": 0},
    "evaluation": {"n_boot": 20},
    "search": {"losses": {"bce": {"iw": [False, True]}}, "seeds": [0]},
    "resources": {"cpu": 1, "gpu": 1},
    "failure": {"max_failures": 0},
}


def _launch(cluster: Cluster, tmp_path: Path, space: dict, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**space, "name": name}))
    env = {k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}  # the cluster's token
    return run_study("launch", str(path), "--storage", str(tmp_path / "studies"), "--address", cluster.address,
                     cwd=tmp_path, timeout=600, env=env)


def test_a_gpu_study_on_workers_without_cuda_fails_fast_and_trains_nothing(cluster, tmp_path):
    import torch

    build = f"torch {torch.__version__} (CUDA build: none)"
    # 1. the step setup is given: the trials start, and each fails before its first step
    space = {**GPU_SPACE, "model": {**GPU_SPACE["model"], "channels_last": False, "compile": False}}
    res = _launch(cluster, tmp_path, space, "gpu-trials")
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    err = res.stderr
    assert "sweep: 2 of 2 trial(s) could not use the GPU they were given, none trained on the CPU instead" in err
    assert "CUDA unusable on node" in err and "Ray gave this trial GPU 0" in err and build in err
    assert "install a CUDA build of torch" in err and "study resume gpu-trials" in err
    assert "epoch 1/2" not in res.stdout  # no epoch was trained anywhere
    study = tmp_path / "studies" / "gpu-trials"
    state = json.loads((study / "state.json").read_text())
    assert "sweep" in state["gpu_failed"] and not state["stages"].get("sweep", {}).get("done")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gpu-trials")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'")
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FAILED" and "CUDA unusable on node" in run.data.tags["error"]
        assert "train_loss" not in run.data.metrics  # not one step
    status = run_study("status", "gpu-trials", "--storage", str(tmp_path / "studies"), cwd=tmp_path)
    assert status.returncode == 0 and "ERROR" in status.stdout and "CUDA unusable on node" in status.stdout

    # 2. the step setup is left to the measurement: it runs on a trial's node and fails there, before any trial
    res = _launch(cluster, tmp_path, GPU_SPACE, "gpu-measure")
    assert res.returncode == 2
    assert "CUDA unusable on node" in res.stderr and build in res.stderr
    assert "nothing was trained: the study folder" in res.stderr
    assert not (tmp_path / "studies" / "gpu-measure").exists()

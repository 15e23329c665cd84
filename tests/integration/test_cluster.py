"""A real two-node Ray cluster on this machine plus a real MLflow tracking server (issue 7).

``ray start --head`` and ``ray start --address`` (the worker carries a custom resource ``worker_node``) with
Ray 2.60's token authentication, ``mlflow server`` on 127.0.0.1 with a sqlite backend, and a tiny study
launched with ``--address`` and ``--tracking-uri`` whose trials are pinned to the worker by that resource.
The worker node is killed mid-trial: Tune's FailureConfig retries the trial from its checkpoint on a new
worker node and the study completes. Everything started here is stopped here (never ``ray stop``, which
would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
import yaml

from .conftest import start_study, wait_for
from .ray_cluster import Cluster

pytestmark = pytest.mark.integration

@pytest.fixture
def cluster(no_leftover_processes):
    # unix sockets live under --temp-dir: keep the path short
    root = Path(tempfile.mkdtemp(prefix="iw2n.", dir="/tmp"))
    c = Cluster(root)
    try:
        c.start_head()
        c.start_worker()
        c.start_mlflow()
        yield c
    finally:
        c.stop()


def test_two_node_study_with_mlflow_server_survives_a_lost_worker(cluster, tmp_path):
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump({
        "name": "cluster-tiny",
        "data": {"source": "phantom", "phantom": {"cases": 8, "seed": 0, "shape": [32, 48, 48]}},
        "model": {"width": 0.125},
        "training": {"epochs": 4, "iterations": 4, "patch_size": [32, 32, 32]},
        "inference": {"window": [32, 48, 48], "stride": [32, 48, 48]},
        "validation": {"n_boot": 0},
        "evaluation": {"n_boot": 50},
        "search": {"losses": {"dice": {"iw": [False, True]}}, "seeds": [0]},
        # pinned to the worker node by its custom resource; the head has none
        "resources": {"cpu": 1, "gpu": 0, "custom": {"worker_node": 1}},
        "failure": {"max_failures": 2},
        "testing": {"sleep_per_iteration": 0.4},
    }))
    storage = tmp_path / "studies"
    study = storage / "cluster-tiny"
    log = tmp_path / "launch.log"
    driver_env = {k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}  # the cluster's token
    proc = start_study("launch", str(space), "--storage", str(storage), "--address", cluster.address,
                       "--tracking-uri", cluster.tracking_uri, cwd=tmp_path, log=log, env=driver_env)
    try:
        # a sweep trial has checkpointed its first epoch: kill the node it runs on
        wait_for(lambda: any((study / "ray" / "sweep").glob("*/checkpoint_000000")), timeout=300, proc=proc, log=log)
        cluster.kill_worker_raylet(cluster.workers[0])
        cluster.start_worker()  # a replacement node with the resource, as an autoscaler would bring
        assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    out = log.read_text()
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
    retried = [r for r in sweep if "resumed_from_epoch" in r.data.tags]
    assert retried and all(int(r.data.tags["resumed_from_epoch"]) >= 1 for r in retried)
    state = json.loads((study / "state.json").read_text())
    assert state["tracking_uri"] == cluster.tracking_uri

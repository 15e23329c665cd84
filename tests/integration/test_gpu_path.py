"""The GPU path on a machine without one: a Ray head that advertises a GPU (``ray start --num-gpus 1``) to workers
whose torch is a CPU build. A GPU study launched against it never trains on the CPU: with the step setup given
in the search space, its trials fail before their first step with the node's CUDA line and the launch exits 2
(resumable); without it, the launch's own measurement on a trial node fails first and nothing is left behind."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml

from .conftest import run_study
from .ray_cluster import Cluster

pytestmark = pytest.mark.integration

SPACE = {
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


@pytest.fixture
def fake_gpu_cluster(no_leftover_processes):
    root = Path(tempfile.mkdtemp(prefix="iwgpu.", dir="/tmp"))  # short: Ray's socket paths live under it
    c = Cluster(root)
    try:
        c.start_head(num_cpus=2, num_gpus=1)
        yield c
    finally:
        c.stop()


def _launch(cluster: Cluster, tmp_path: Path, space: dict, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**space, "name": name}))
    env = {k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    import os

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return run_study("launch", str(path), "--storage", str(tmp_path / "studies"), "--address", cluster.address,
                         cwd=tmp_path, timeout=600)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_gpu_study_on_workers_without_cuda_fails_fast_and_trains_nothing(fake_gpu_cluster, tmp_path):
    import torch

    build = f"torch {torch.__version__} (CUDA build: none)"
    # 1. the step setup is given: the trials start, and each fails before its first step
    space = {**SPACE, "model": {**SPACE["model"], "channels_last": False, "compile": False}}
    res = _launch(fake_gpu_cluster, tmp_path, space, "gpu-trials")
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
    res = _launch(fake_gpu_cluster, tmp_path, SPACE, "gpu-measure")
    assert res.returncode == 2
    assert "CUDA unusable on node" in res.stderr and build in res.stderr
    assert "nothing was trained: the study folder" in res.stderr
    assert not (tmp_path / "studies" / "gpu-measure").exists()

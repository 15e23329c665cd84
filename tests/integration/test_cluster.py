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
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import start_study, wait_for

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A head, worker nodes and an MLflow server, each a process group of its own."""

    def __init__(self, root: Path):
        self.root = root
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "PYTHONUNBUFFERED": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.env.pop("RAY_ADDRESS", None)
        self.gcs_port = _free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.mlflow_port = _free_port()
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        fh = open(self.root / log, "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _wait_log(self, log: str, text: str, proc: subprocess.Popen, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in (self.root / log).read_text():
                return
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        pytest.fail(f"{log}: no {text!r}:\n{(self.root / log).read_text()[-3000:]}")

    def start_head(self) -> None:
        proc = self._spawn([str(BIN / "ray"), "start", "--head", f"--port={self.gcs_port}", "--num-cpus=1",
                            "--include-dashboard=false", f"--ray-client-server-port={_free_port()}",
                            f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={self.root / 'head'}",
                            "--object-store-memory=100000000", "--disable-usage-stats", "--block"], "head.log")
        self._wait_log("head.log", "Ray runtime started", proc)

    def start_worker(self) -> subprocess.Popen:
        n = len(self.workers)
        log = f"worker{n}.log"
        proc = self._spawn([str(BIN / "ray"), "start", f"--address={self.address}", "--num-cpus=1",
                            '--resources={"worker_node": 1}', f"--dashboard-agent-listen-port={_free_port()}",
                            f"--temp-dir={self.root / f'worker{n}'}", "--object-store-memory=100000000",
                            "--disable-usage-stats", "--block"], log)
        self._wait_log(log, "Ray runtime started", proc)
        self.workers.append(proc)
        return proc

    def kill_worker_raylet(self, proc: subprocess.Popen) -> None:
        """Stop a worker node the hard way: SIGKILL its raylet (the node dies with the trial on it)."""
        out = subprocess.run(["pgrep", "-P", str(proc.pid), "-x", "raylet"], capture_output=True, text=True).stdout
        pids = [int(p) for p in out.split()]
        assert pids, "worker raylet not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)

    def start_mlflow(self) -> None:
        proc = self._spawn([str(BIN / "mlflow"), "server", "--backend-store-uri",
                            f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
                            str(self.root / "mlartifacts"), "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                            "--workers", "1"], "mlflow.log")
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2)
                return
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(1)
        pytest.fail("mlflow server did not start:\n" + (self.root / "mlflow.log").read_text()[-3000:])

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)


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

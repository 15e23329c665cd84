"""A Ray cluster of real processes on this machine (head, workers) and a real MLflow tracking server, with Ray
2.60's token authentication; every process is a process group of its own, stopped by :meth:`Cluster.stop` (never
``ray stop``, which would stop every Ray on the machine)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
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
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.mlflow_port = free_port()
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

    def start_head(self, *, num_cpus: int = 1, num_gpus: int = 0) -> None:
        """The head node; ``num_gpus`` > 0 makes it advertise GPUs this machine does not have (a fake GPU)."""
        proc = self._spawn([str(BIN / "ray"), "start", "--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}",
                            f"--num-gpus={num_gpus}",
                            "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                            f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={self.root / 'head'}",
                            "--object-store-memory=100000000", "--disable-usage-stats", "--block"], "head.log")
        self._wait_log("head.log", "Ray runtime started", proc)

    def start_worker(self) -> subprocess.Popen:
        n = len(self.workers)
        log = f"worker{n}.log"
        proc = self._spawn([str(BIN / "ray"), "start", f"--address={self.address}", "--num-cpus=1",
                            '--resources={"worker_node": 1}', f"--dashboard-agent-listen-port={free_port()}",
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

    def stop_mlflow(self) -> None:
        """Stop the MLflow server's process group (an outage); :meth:`start_mlflow` brings it back on its port."""
        proc = self.mlflow
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def start_mlflow(self) -> None:
        """The MLflow server on its port and sqlite store (again after :meth:`stop_mlflow`: the same store)."""
        self.mlflow_starts = getattr(self, "mlflow_starts", 0) + 1
        log = "mlflow.log" if self.mlflow_starts == 1 else f"mlflow{self.mlflow_starts}.log"
        proc = self.mlflow = self._spawn([str(BIN / "mlflow"), "server", "--backend-store-uri",
                                          f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
                                          str(self.root / "mlartifacts"), "--host", "127.0.0.1", "--port",
                                          str(self.mlflow_port), "--workers", "1"], log)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2)
                return
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(1)
        pytest.fail("mlflow server did not start:\n" + (self.root / log).read_text()[-3000:])

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM to every process group, SIGKILL to what is left after ``grace`` seconds (a `ray start --block`
        head takes half a minute to stop on its own; nothing of a test cluster needs saving), then the processes
        whose command line names this cluster's folders (Ray daemons that left the group)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.time() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(self.root) in cmd:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

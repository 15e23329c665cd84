"""cluster.yaml: Ray's own config validation (offline), secure defaults, token auth on every node, on-prem variant.

Validation path: ``ray up`` reads the file with ``yaml.safe_load`` and calls
``ray.autoscaler._private.commands._bootstrap_config``, which runs ``prepare_config`` (merge with
``ray/autoscaler/aws/defaults.yaml``, merge setup commands, check the docker section, fill per-type min/max workers:
local files only), then ``provider.fillout_available_node_types_resources`` (AWS API), ``validate_config``
(jsonschema ``ray-schema.json`` + cross-field checks) and ``provider.bootstrap_config`` (AWS API: IAM, key pair,
subnets, security group). The two cloud calls are skipped here; ``prepare_config`` + ``validate_config`` are exactly
Ray's offline part, run with every outgoing socket connection blocked.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

ROOT = PROJECT_ROOT
CLUSTER_YAML = ROOT / "cluster.yaml"
IMAGE = "rayproject/ray:2.60.0-py311-gpu"
TOKEN_PATH = "/home/ray/.iw-study/cluster-auth/auth_token"
SHARED = "/mnt/shared"
ANY_ADDRESS = re.compile(r"(?<![\d.])0\.0\.0\.0(?![\d/])")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may contact a cloud: any outgoing socket connection fails the test."""

    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _text() -> str:
    return CLUSTER_YAML.read_text()


def _config() -> dict:
    return yaml.safe_load(_text())


def _onprem_config() -> dict:
    """The commented on-prem variant between the BEGIN/END ONPREM markers, uncommented."""
    text = _text()
    assert text.count("# BEGIN ONPREM\n") == 1 and text.count("# END ONPREM") == 1
    block = text.split("# BEGIN ONPREM\n", 1)[1].split("# END ONPREM", 1)[0]
    lines = []
    for line in block.splitlines():
        assert line.startswith("#"), f"uncommented line inside the on-prem block: {line!r}"
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return yaml.safe_load("\n".join(lines))


def _ray_validate(config: dict) -> dict:
    """Ray 2.60's offline validation, the same calls and order as `ray up`."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _ray_start(commands: list[str], head: bool) -> str:
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 1, starts
    assert ("--head" in starts[0]) is head
    return " ".join(starts[0].split())


def _mlflow_command(commands: list[str]) -> str:
    cmds = [c for c in commands if "mlflow server" in c]
    assert len(cmds) == 1, cmds
    return cmds[0]


# --- Ray's validator ------------------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_validator():
    prepared = _ray_validate(_config())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"]
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and set(types) == {"head", "gpu_worker"}
    assert types["head"]["max_workers"] == 0
    assert (
        types["gpu_worker"]["min_workers"]
        == 0
        < types["gpu_worker"]["max_workers"]
        <= prepared["max_workers"]
    )
    # prepare_config merges setup_commands into the per-role lists, as `ray up` runs them
    assert prepared["head_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]
    assert prepared["worker_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]


def test_aws_defaults_fill_only_what_the_file_leaves_out():
    # fillout_defaults is a shallow dict.update over ray/autoscaler/aws/defaults.yaml: any command list the file
    # omitted would come from there (a nightly-wheel install, `--dashboard-host=0.0.0.0`).
    prepared = _ray_validate(_config())
    dumped = json.dumps(prepared)
    assert "ray-wheels" not in dumped and not ANY_ADDRESS.search(dumped)
    assert prepared["cluster_synced_files"] == []  # filled from the defaults: validate_config requires it


def test_the_validator_is_live():
    from ray.autoscaler._private.util import prepare_config, validate_config

    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(_config())  # raw file: Ray validates only after prepare_config, as `ray up` does
    bad = _config()
    bad["not_a_ray_field"] = 1
    with pytest.raises(Exception, match="not_a_ray_field"):
        validate_config(prepare_config(bad))
    bad = _config()
    bad["available_node_types"]["gpu_worker"]["min_workers"] = bad["max_workers"] + 1
    with pytest.raises(ValueError, match="min_workers"):
        _ray_validate(bad)


# --- layout: CPU head, GPU workers, image, code, shared storage ---------------------------------------------


def test_head_takes_no_trials_and_workers_have_gpus():
    types = _config()["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    worker = types["gpu_worker"]
    assert worker["resources"].get("GPU", 0) >= 1 and worker["resources"].get("CPU", 0) >= 4
    assert worker["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p3.", "p4", "p5."))
    assert worker["min_workers"] == 0  # GPU nodes autoscale from zero (`study launch --wait-for-resources`)


def test_image_is_the_ray_version_of_the_project():
    import ray

    docker = _config()["docker"]
    assert docker["image"] == IMAGE
    assert docker["container_name"]
    assert IMAGE.split(":")[1].split("-")[0] == ray.__version__
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(p.replace(" ", "").endswith(f"=={ray.__version__}") for p in pins if p.startswith("ray"))


def test_setup_installs_cuda_torch_then_the_project_from_the_mounted_checkout():
    cfg = _config()
    assert cfg["file_mounts"]["/home/ray/iw-study"] == "."
    setup = cfg["setup_commands"]
    torch_i = next(i for i, c in enumerate(setup) if re.search(r"pip install .*\btorch==", c))
    proj_i = next(i for i, c in enumerate(setup) if "-e /home/ray/iw-study" in c)
    assert torch_i < proj_i
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    mlflow_pin = next(d for d in deps if d.startswith("mlflow"))
    assert f'"{mlflow_pin}"' in setup[proj_i]  # same MLflow range as pyproject.toml
    assert ".gitignore" in cfg["rsync_filter"]  # studies/, data/, venvs are not shipped to the nodes


def test_shared_filesystem_is_mounted_on_every_node_at_one_path():
    cfg = _config()
    assert f"-v {SHARED}:{SHARED}" in cfg["docker"]["run_options"]  # host mount -> same path in the container
    mounts = [
        c for c in cfg["initialization_commands"] if "mount -t nfs4" in c and not c.lstrip().startswith("#")
    ]
    assert len(mounts) == 1 and " ".join(mounts[0].split()).endswith(f" {SHARED}")
    mlflow = _mlflow_command(cfg["head_start_ray_commands"])
    assert (
        f"sqlite:///{SHARED}/mlflow/mlflow.db" in mlflow
        and f"--artifacts-destination {SHARED}/mlflow/" in mlflow
    )


# --- secure defaults -------------------------------------------------------------------------------------------


def test_mlflow_server_binds_127_0_0_1():
    cmd = " ".join(_mlflow_command(_config()["head_start_ray_commands"]).split())
    # trials never contact MLflow (the driver on the head logs for them), so loopback is enough
    assert "--host 127.0.0.1 --port 5000" in cmd
    assert cmd.count("--host") == 1
    assert not ANY_ADDRESS.search(_text())  # nothing listens on every interface


def test_dashboard_binds_127_0_0_1():
    head = _ray_start(_config()["head_start_ray_commands"], head=True)
    assert "--dashboard-host=127.0.0.1" in head


def test_token_auth_reaches_every_node():
    cfg = _config()
    # the token: one folder, outside the repository, copied to every node by file_mounts (cluster-wide)
    remote = next(r for r in cfg["file_mounts"] if r.endswith("/cluster-auth"))
    local = cfg["file_mounts"][remote]
    assert f"{remote}/auth_token" == TOKEN_PATH
    assert local.startswith("~/") and not (ROOT / local).exists()
    # every process in every container, and explicitly on both `ray start` lines
    opts = cfg["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in opts and f"-e RAY_AUTH_TOKEN_PATH={TOKEN_PATH}" in opts
    for commands, head in ((cfg["head_start_ray_commands"], True), (cfg["worker_start_ray_commands"], False)):
        start = _ray_start(commands, head)
        assert f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={TOKEN_PATH} ray start" in start
    worker = _ray_start(cfg["worker_start_ray_commands"], head=False)
    assert "--address=$RAY_HEAD_IP:6379" in worker and "--port=6379" in _ray_start(
        cfg["head_start_ray_commands"], True
    )


def test_no_credentials_in_the_file():
    text = _text()
    low = text.lower()
    for word in ("aws_access_key", "aws_secret", "secret", "password", "passwd"):
        assert word not in low, word
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # AWS access key id
    assert "PRIVATE KEY" not in text
    assert not re.search(r"\b[0-9a-f]{32,}\b", text)  # no pasted Ray token
    ssh = _config().get("auth", {}).get("ssh_private_key")
    assert ssh is None or ssh.startswith(("~/", "/"))  # a path, never key material


def test_cluster_yaml_is_plain_safe_yaml():
    assert "!!python" not in _text()
    assert isinstance(_config(), dict)


# --- the MLflow start command, executed with a stand-in `mlflow` -------------------------------------------------

_FAKE_MLFLOW = """#!{python}
import http.server, json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_MLFLOW_ARGS"], "a") as f:
    f.write(json.dumps(args) + "\\n")
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers(); self.wfile.write(b"OK")
    def log_message(self, *a):
        pass
http.server.HTTPServer((host, port), H).serve_forever()
"""


def _free_port() -> int:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def _kill_group(pid_file: Path) -> None:
    try:
        os.killpg(int(pid_file.read_text().strip()), signal.SIGKILL)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass


@pytest.mark.skipif(
    shutil.which("setsid") is None or shutil.which("bash") is None, reason="needs bash + setsid"
)
def test_mlflow_start_command_runs_restarts_and_binds_loopback(tmp_path):
    port = _free_port()
    home, shared, bindir = tmp_path / "home", tmp_path / "shared", tmp_path / "bin"
    for d in (home, bindir):
        d.mkdir()
    fake = bindir / "mlflow"
    fake.write_text(_FAKE_MLFLOW.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (bindir / "python3").symlink_to(sys.executable)
    cmd = (
        _mlflow_command(_config()["head_start_ray_commands"])
        .replace(SHARED, str(shared))
        .replace("5000", str(port))
    )
    env = dict(
        os.environ,
        HOME=str(home),
        PATH=f"{bindir}:{os.environ['PATH']}",
        FAKE_MLFLOW_ARGS=str(tmp_path / "args.jsonl"),
    )
    pid_file = home / "mlflow-server.pid"
    try:
        subprocess.run(["bash", "-c", cmd], env=env, check=True, timeout=120)
        first = int(pid_file.read_text())
        assert os.getpgid(first) == first  # group leader: `kill -- -PID` reaches every child
        assert (home / "mlflow-server.url").read_text().strip() == f"http://127.0.0.1:{port}"
        assert (shared / "mlflow" / "artifacts").is_dir()
        args = json.loads((tmp_path / "args.jsonl").read_text().splitlines()[0])
        assert args[:1] == ["server"] and args[args.index("--host") + 1] == "127.0.0.1"
        assert args[args.index("--backend-store-uri") + 1] == f"sqlite:///{shared}/mlflow/mlflow.db"
        # `ray up` again: the old server goes, a new one answers
        subprocess.run(["bash", "-c", cmd], env=env, check=True, timeout=120)
        second = int(pid_file.read_text())
        assert second != first
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                os.killpg(first, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the first server's process group is still alive after the restart")
    finally:
        _kill_group(pid_file)


# --- on-prem variant -------------------------------------------------------------------------------------------


def test_onprem_variant_passes_rays_validator_as_provider_local():
    onprem = _onprem_config()
    assert "available_node_types" not in onprem  # provider local synthesises its single node type
    prepared = _ray_validate(onprem)
    assert prepared["provider"]["type"] == "local"
    node = prepared["available_node_types"]["local.cluster.node"]
    n = len(onprem["provider"]["worker_ips"])
    assert node["min_workers"] == node["max_workers"] == n


def test_onprem_variant_keeps_the_same_secure_setup():
    onprem, aws = _onprem_config(), _config()
    head = _ray_start(onprem["head_start_ray_commands"], head=True)
    assert "--num-cpus=0" in head and "--dashboard-host=127.0.0.1" in head
    token = "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.iw-study/cluster-auth/auth_token ray start"
    assert token in head and token in _ray_start(onprem["worker_start_ray_commands"], head=False)
    assert onprem["file_mounts"]["~/.iw-study/cluster-auth"] == "~/.iw-study/cluster-auth"
    # the MLflow start command is the AWS one, byte for byte
    assert _mlflow_command(onprem["head_start_ray_commands"]) == _mlflow_command(
        aws["head_start_ray_commands"]
    )
    assert onprem["auth"]["ssh_private_key"].startswith("~/")


def test_onprem_with_node_types_is_refused_by_ray():
    import click

    onprem = _onprem_config()
    onprem["available_node_types"] = {"gpu": {"resources": {}, "node_config": {}}}
    with pytest.raises(click.ClickException, match="not supported for on-premise"):
        _ray_validate(onprem)

"""`study slurm --submit` on a real SLURM: Debian's slurm-wlm and munge, one node (this machine), a slurm.conf in a
temporary folder, munged + slurmctld + slurmd started here and stopped at the end (skipped, saying why, where the
packages are missing: `apt-get install slurm-wlm munge`; .ci/run installs them as root)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import run_study, wait_for
from .test_study import TINY, _runs, _snapshotted, _state

pytestmark = pytest.mark.integration

DAEMONS = ("munged", "slurmctld", "slurmd")


def _conf(d: Path, host: str, cpus: int) -> str:
    return f"""ClusterName=iwtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [b for b in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM not installed here (missing {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test SLURM runs its daemons as root")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "munge"):
        (d / sub).mkdir(mode=0o700)
    host = socket.gethostname().split(".")[0]
    (d / "slurm.conf").write_text(_conf(d, host, os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    subprocess.run(["mungekey", "-c", "-f", "-k", str(d / "munge" / "munge.key")], check=True, capture_output=True)
    subprocess.run(["munged", f"--key-file={d}/munge/munge.key", f"--socket={d}/munge/munge.socket",
                    f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
                    f"--seed-file={d}/munge/seed", "-f"], check=True, capture_output=True)
    subprocess.run(["slurmctld", "-f", str(d / "slurm.conf")], check=True, env=env, capture_output=True)
    subprocess.run(["slurmd", "-f", str(d / "slurm.conf")], check=True, env=env, capture_output=True)
    pids = {"munged": d / "munge" / "munged.pid", "slurmctld": d / "slurmctld.pid", "slurmd": d / "slurmd.pid"}
    try:
        wait_for(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                                  text=True).stdout, timeout=60)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        for name in ("slurmd", "slurmctld", "munged"):  # every daemon stopped, workers first
            try:
                os.kill(int(pids[name].read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in pids.values()):
            time.sleep(0.5)


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().split()[0]), 0)
        return True
    except (OSError, ValueError):
        return False


def _queue(env) -> str:
    return subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True).stdout.strip()


def _space(tmp_path: Path, **changes) -> Path:
    data = {**json.loads(json.dumps(TINY)), **changes}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _submit(tmp_path: Path, env, name: str, **changes) -> tuple[Path, str]:
    storage = tmp_path / "studies"
    res = subprocess.run([sys.executable, "-m", "study.cli", "slurm", str(_space(tmp_path, **changes)), "--storage", str(storage), "--name",
                          name, "--time", "00:20:00", "--submit"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    job = res.stdout.split("submitted job ")[1].split(";")[0]
    return storage, job


def _check_complete(storage: Path, name: str) -> None:
    study = storage / name
    assert all(_state(study)["stages"][s].get("done") for s in ("data", "sweep", "select", "retrain", "holdout",
                                                                  "report"))
    for stage in ("sweep", "retrain"):
        runs = _runs(study, stage)
        assert len(runs) == 3 and len({r.data.tags["trial_id"] for r in runs}) == 3, stage  # one run per trial
        assert {r.info.status for r in runs} == {"FINISHED"}


def test_cancelled_job_requeues_and_resumes(slurm, tmp_path, no_leftover_processes):
    """A submitted study, sent scancel --signal=TERM mid-sweep: the script stops the driver and requeues the
    job; the next run resumes the study, which completes (driver exit 0) with every trial once. The study trains
    MONAI's DynUNet with deep supervision and predicts with test-time mirroring (issue 28): its hold-out has the
    mirrored and the single-pass records of every model, and `study predict` with a winner writes masks."""
    storage, job = _submit(tmp_path, slurm, "requeued", testing={"sleep_per_iteration": 0.25},
                           model={"network": "dynunet", "deep_supervision": True, "width": 0.125},
                           inference={**TINY["inference"], "tta": "mirror"})
    study = storage / "requeued"
    wait_for(lambda: _snapshotted(study, "sweep", 1), timeout=300)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=slurm, check=True)
    # requeued: SLURM starts it again once the old job credential has expired (cred_expire, 10 s in this test's
    # slurm.conf, 120 s by default); starting it sooner gets it killed as "Job credential revoked"
    wait_for(lambda: "PENDING" in _queue(slurm), timeout=120)
    assert not _state(study)["stages"].get("sweep", {}).get("done")
    wait_for(lambda: job not in _queue(slurm), timeout=600)
    log = (storage / f"requeued.slurm-{job}.out").read_text()
    assert "requeueing job" in log and log.count("[slurm] study driver exited with 0") == 1, log[-3000:]
    assert "data: already done, skipped" in log.split("requeueing job")[1]  # the second run resumed the study
    _check_complete(storage, "requeued")
    res = run_study("status", "requeued", "--storage", str(storage), "--json", cwd=tmp_path)
    sweep = json.loads(res.stdout)["trials"]["sweep"]
    assert [t["epochs_done"] for t in sweep] == [4, 4, 4]
    summary = json.loads((study / "holdout" / "summary.json").read_text())
    for label, c in summary["configs"].items():
        assert c["without_tta"]["luna16"]["avg_recall"] is not None, label
        meta = json.loads(Path(c["records"]["any"]).read_text())["meta"]
        assert meta["tta"] == "mirror" and json.loads(Path(c["records"]["any_notta"]).read_text())["meta"]["tta"] == "none"
    assert "## Test-time mirroring (beyond the paper)" in (study / "report" / "report.md").read_text()
    manifest = study / "data" / "phantom" / "manifest.csv"
    rows = [ln.split(",") for ln in manifest.read_text().splitlines()[1:]]
    inputs, rois = tmp_path / "in", tmp_path / "roi"
    inputs.mkdir()
    rois.mkdir()
    for r in [r for r in rows if r[3] == "holdout"]:
        shutil.copy(manifest.parent / r[1], inputs / Path(r[1]).name)
        shutil.copy(manifest.parent / r[4], rois / Path(r[1]).name)
    res = run_study("predict", "requeued", "--storage", str(storage), "--input", str(inputs), "--roi", str(rois),
                    "--output", str(tmp_path / "out"), "--config", "iw-bce/s0", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("*_mask.nii.gz"))) == len(list(inputs.iterdir())) > 0

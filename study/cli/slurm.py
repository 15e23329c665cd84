"""``study slurm SPACE.yaml``: a SLURM batch script that runs a study on an HPC allocation (and submits it).

The script (``slurm_script``) starts Ray across the allocation, runs the study driver on the first node and makes
a preempted or timed-out job resumable:

* Ray's head on the first node (in the batch script itself), one worker per other node through ``srun``; each
  with ``--num-cpus`` / ``--num-gpus`` of its allocation, never what the node has;
* ports from a per-job range (``20000 + (job id mod 400) × 100``) and a short per-job temp dir
  (``/tmp/iw-<job id>``; Ray's socket paths must stay under ~107 bytes), so jobs of several users share a node;
* Ray token authentication as on ``cluster.yaml``: a token file under the storage folder, created once (0600);
* the MLflow store and the study folder on the shared storage (``--storage``, the same path on every node);
* ``study launch`` the first time, ``study resume`` when the job runs again; ``--requeue`` and
  ``--signal=B:USR1@<s>``: before the time limit (or on ``scancel --signal=TERM``) the script stops the driver
  with SIGINT (the study saves its state and exits 130), stops Ray and requeues the job, which resumes.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from study.cli.args import DEFAULT_STORAGE
from trainables.errors import UserError

_TIME_RE = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$")


def register(sub) -> None:
    p = sub.add_parser(
        "slurm",
        help="write (and --submit) a SLURM batch script that runs the study across an allocation",
        description=__doc__.splitlines()[0] + " Ray is started on every node of the allocation, the driver on "
        "the first; a requeued job resumes the study.",
    )
    p.add_argument("space", type=Path, help="search-space YAML of the study")
    p.add_argument("--data", type=Path, default=None,
                   help="a prepared cache folder or manifest CSV replacing data.path (as `study launch --data`)")
    p.add_argument("--nodes", type=int, default=1, help="nodes to allocate (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node (default 0; needs resources.gpu > 0 in the search space)")
    p.add_argument("--cpus-per-node", type=int, default=None,
                   help="CPUs per node (default: all of the node, --exclusive)")
    p.add_argument("--time", default="24:00:00", help="time limit, [D-]HH:MM:SS (default 24:00:00)")
    p.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    p.add_argument("--storage", type=Path, default=Path(DEFAULT_STORAGE),
                   help="shared folder for the study and its MLflow store, the same path on every node "
                        f"(default ./{DEFAULT_STORAGE})")
    p.add_argument("--name", default=None, help="study name (default: the search space's name)")
    p.add_argument("--stop-before", type=int, default=120, metavar="S",
                   help="seconds before the time limit at which the driver is stopped and the job requeued "
                        "(default 120)")
    p.add_argument("--script", type=Path, default=None,
                   help="where to write the batch script (default <storage>/<name>.slurm.sh)")
    p.add_argument("--submit", action="store_true", help="also submit it with sbatch (prints the job id)")
    p.set_defaults(func=cmd_slurm)


def _check(args, cfg) -> None:
    if args.nodes < 1:
        raise UserError(f"--nodes {args.nodes}: a job needs at least one node")
    if args.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node {args.gpus_per_node}: must be >= 0")
    if args.gpus_per_node > 0 and cfg.resources.gpu <= 0:
        raise UserError(f"--gpus-per-node {args.gpus_per_node}: the trials of {args.space} ask for no GPU "
                        "(resources.gpu: 0), so the GPUs would sit idle; set resources.gpu (e.g. 1) in the "
                        "search space or drop --gpus-per-node")
    if cfg.resources.gpu > 0 and args.gpus_per_node == 0:
        raise UserError(f"{args.space}: resources.gpu is {cfg.resources.gpu:g} per trial but --gpus-per-node is "
                        "0; allocate GPUs with --gpus-per-node")
    if args.cpus_per_node is not None and args.cpus_per_node < cfg.resources.cpu:
        raise UserError(f"--cpus-per-node {args.cpus_per_node}: a trial needs {cfg.resources.cpu:g} CPU(s)")
    if not _TIME_RE.match(args.time):
        raise UserError(f"--time {args.time!r}: expected [D-]HH:MM:SS, e.g. 12:00:00 or 2-00:00:00")
    if args.stop_before < 10:
        raise UserError(f"--stop-before {args.stop_before}: leave the driver at least 10 s to stop")


def _writable(folder: Path) -> Path:
    """``--storage`` as a folder this process can write (made if missing): the study, its MLflow store and the Ray
    token live there."""
    from study.preflight import check_output_folder

    check_output_folder("--storage", folder, purpose="the studies, their MLflow stores and the Ray token")
    folder = folder.expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ensure_token(storage: Path) -> Path:
    """The Ray token of the studies in ``storage`` (64 hex digits, 0600), created once."""
    path = storage / ".ray-auth" / "auth_token"
    if not path.is_file():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    return path


def slurm_script(*, space: Path, name: str, storage: Path, nodes: int, gpus_per_node: int,
                 cpus_per_node: int | None, time_limit: str, partition: str | None, stop_before: int,
                 python: str, token: Path, workdir: Path, data: Path | None = None) -> str:
    """The batch script's text (see the module docstring)."""
    q = shlex.quote
    sbatch = [f"--job-name=iw-{name}", f"--nodes={nodes}", "--ntasks-per-node=1", f"--time={time_limit}",
              "--requeue", f"--signal=B:USR1@{stop_before}", "--open-mode=append",
              f"--output={storage}/{name}.slurm-%j.out"]
    sbatch.append(f"--cpus-per-task={cpus_per_node}" if cpus_per_node else "--exclusive")
    if gpus_per_node:
        sbatch.append(f"--gpus-per-node={gpus_per_node}")
    if partition:
        sbatch.append(f"--partition={partition}")
    header = "\n".join(f"#SBATCH {s}" for s in sbatch)
    return f"""#!/bin/bash
# iw-study on SLURM: study {name}, written by `study slurm {space.name}` on {time.strftime('%Y-%m-%d %H:%M')}.
# Submit with `sbatch {'{'}this file{'}'}`; edit freely (every step below is commented).
{header}

set -uo pipefail

PY={q(python)}                  # the Python that has iw-study installed (same path on every node)
RAY="$(dirname "$PY")/ray"
SPACE={q(str(space))}
NAME={q(name)}
STORAGE={q(str(storage))}       # shared by every node: study folder, MLflow store, Ray token
cd {q(str(workdir))}

# Per-job Ray ports and temp dir: jobs of several users may share a node, and Ray's socket paths must stay short.
BASE=$(( 20000 + (SLURM_JOB_ID % 400) * 100 ))
PORTS=(--node-manager-port=$((BASE + 1)) --object-manager-port=$((BASE + 2)) --dashboard-agent-grpc-port=$((BASE + 3))
       --dashboard-agent-listen-port=$((BASE + 4)) --metrics-export-port=$((BASE + 5)) --runtime-env-agent-port=$((BASE + 6))
       --min-worker-port=$((BASE + 10)) --max-worker-port=$((BASE + 99)))
export RAY_TMPDIR=/tmp/iw-$SLURM_JOB_ID
mkdir -p "$RAY_TMPDIR"

# Token authentication, as on cluster.yaml: every node, the driver and Ray itself read the same token file.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={q(str(token))}

# This allocation's CPUs and GPUs per node (never what the node has).
CPUS=${{SLURM_CPUS_PER_TASK:-${{SLURM_CPUS_ON_NODE:-1}}}}
GPUS={gpus_per_node}

# Ray: the head here (the first node of the allocation), one worker on every other node.
NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
HEAD=${{NODES[0]}}
HEAD_IP=$(hostname --ip-address | awk '{{print $1}}')
# The head runs in the foreground of a background job (--block): its daemons stay this script's descendants, and
# stopping it stops this job's Ray only (`ray stop` would stop every Ray on the node, other jobs' on a shared one).
rm -f "$RAY_TMPDIR/ray_current_cluster"  # a requeued job on this node: the last run's head wrote it, never cleared
"$RAY" start --head --node-ip-address="$HEAD_IP" --port=$BASE --ray-client-server-port=$((BASE + 7)) \\
    --num-cpus="$CPUS" --num-gpus="$GPUS" --temp-dir="$RAY_TMPDIR" --include-dashboard=false \\
    --disable-usage-stats "${{PORTS[@]}}" --block &
RAY_HEAD=$!
for _ in $(seq 180); do  # up when it has written its address
    [ -s "$RAY_TMPDIR/ray_current_cluster" ] && break
    kill -0 "$RAY_HEAD" 2>/dev/null || {{ echo "[slurm] the Ray head did not start"; exit 1; }}
    sleep 1
done
[ -s "$RAY_TMPDIR/ray_current_cluster" ] || {{ echo "[slurm] the Ray head did not start in 180 s"; exit 1; }}
stop_ray() {{
    kill -TERM "$RAY_HEAD" 2>/dev/null
    wait "$RAY_HEAD" 2>/dev/null
}}
if [ "${{#NODES[@]}}" -gt 1 ]; then
    srun --nodes=$(( ${{#NODES[@]}} - 1 )) --ntasks-per-node=1 --exclude="$HEAD" --overlap \\
        "$RAY" start --block --address="$HEAD_IP:$BASE" --num-cpus="$CPUS" --num-gpus="$GPUS" \\
        --disable-usage-stats "${{PORTS[@]}}" &
    sleep 15  # let the workers join; trials wait for resources anyway
fi

# The study: launched the first time, resumed when SLURM runs the job again (requeued after preemption or the limit).
if [ -f "$STORAGE/$NAME/state.json" ]; then
    ARGS=(resume "$NAME")
else
    ARGS=(launch "$SPACE" --name "$NAME"{'' if data is None else ' --data ' + q(str(data))})
fi
# Before the time limit (--signal=B:USR1) or on `scancel --signal=TERM`: stop the driver like Ctrl+C (it saves the
# sweep and exits 130), stop Ray, and put the job back in the queue; the next run resumes the study.
DRIVER=""
stop_and_requeue() {{
    echo "[slurm] signal: stopping the study driver and requeueing job $SLURM_JOB_ID"
    if [ -n "$DRIVER" ]; then
        kill -INT "$DRIVER" 2>/dev/null
        wait "$DRIVER"
    fi
    stop_ray
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}}
trap stop_and_requeue USR1 TERM  # set before the driver starts: no signal can slip between the two

"$PY" -m study.cli "${{ARGS[@]}}" --storage "$STORAGE" --address "$HEAD_IP:$BASE" &
DRIVER=$!

wait "$DRIVER"
RC=$?
stop_ray
rm -rf "$RAY_TMPDIR"
echo "[slurm] study driver exited with $RC"
exit $RC
"""


def cmd_slurm(args) -> int:
    from study.loader import load_config

    cfg = load_config(args.space, data_path=args.data)
    _check(args, cfg)
    from study.layout import check_name
    from study.preflight import check_output_folder

    name = args.name if args.name is not None else cfg.name
    check_name(name)
    if args.script is not None:  # before the storage folder and its token are made
        if args.script.expanduser().is_dir():
            raise UserError(f"--script {args.script}: is a folder; give the batch script's file name")
        check_output_folder("--script", args.script.expanduser().absolute().parent, purpose="the batch script")
    storage = _writable(args.storage)
    script = (args.script or storage / f"{name}.slurm.sh").expanduser().resolve()
    token = ensure_token(storage)
    text = slurm_script(space=args.space.expanduser().resolve(), name=name, storage=storage, nodes=args.nodes,
                        gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node, time_limit=args.time,
                        partition=args.partition, stop_before=args.stop_before, python=sys.executable,
                        token=token, workdir=Path.cwd(),
                        data=args.data.expanduser().resolve() if args.data else None)
    try:
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(text)
        script.chmod(0o755)
    except OSError as exc:
        raise UserError(f"--script {script}: cannot write ({exc.strerror or exc})") from None
    print(f"batch script: {script}")
    if not args.submit:
        print(f"submit it with: sbatch {script}")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError(f"--submit: sbatch is not on PATH (no SLURM client here); the script is at {script}")
    res = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"sbatch {script} failed: {res.stderr.strip() or res.stdout.strip()}")
    job = res.stdout.strip().split(";")[0]
    print(f"submitted job {job}; watch it with `squeue -j {job}` and `study status {name} --storage {storage}`; "
          f"log {storage}/{name}.slurm-{job}.out")
    return 0

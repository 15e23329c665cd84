"""``study status / ui``: watch a study (read-only: they work while another process drives it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from study.cli.args import add_storage, port, positive_seconds
from study.layout import open_study
from trainables.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("status", help="a study's stages, winners, trials, hold-out results, verdict and report",
                       description="Where a study stands: stages with their times, the selected winners with "
                       "their hyperparameters and validation score, every trial, the hold-out table with the "
                       "verdict, and the report's path.")
    p.add_argument("name")
    add_storage(p)
    p.add_argument("--json", action="store_true", help="the same content as one pretty-printed JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ui", help="serve the MLflow UI of a study's store on 127.0.0.1 (Ctrl+C stops it)",
                       description="Start the MLflow UI on a study's tracking store and print the address of the "
                       "study's runs once the server answers. Ctrl+C, SIGTERM or SIGHUP stop the server and every "
                       "process it started. A study that logs to a tracking server: its address is printed.")
    p.add_argument("name", help="the study (a folder under --storage)")
    add_storage(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; only change it "
                   "behind a firewall)")
    p.add_argument("--port", type=port, default=5000, help="port to serve on (default 5000)")
    p.add_argument("--timeout", type=positive_seconds, default=180.0,
                   help="seconds to wait for the server to answer before giving up (default 180)")
    p.set_defaults(func=cmd_ui)


def cmd_status(args) -> int:
    from study.layout import RETRAIN, SWEEP
    from study.report.status import status_text, study_status
    from study.tune.tuner import outcomes

    study_dir, cfg, state = open_study(args.storage, args.name, writes=False)
    results = {name: outcomes(study_dir.ray_dir, name) for name in (SWEEP, RETRAIN)}
    status = study_status(study_dir, cfg, state, results)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    summary = study_dir.read_summary() if "holdout" in status else None
    print(status_text(status, results, summary))
    return 0


def cmd_ui(args) -> int:
    import signal
    import socket
    import time
    import urllib.request

    from study.tracking import experiment_url

    study_dir, _cfg, state = open_study(args.storage, args.name, writes=False)
    uri = state.tracking_uri
    exp_id = state.mlflow_ids().get("experiment_id", "0")
    if uri.startswith(("http://", "https://")):
        print(f"study {study_dir.name} logs to the tracking server {uri}: open {experiment_url(uri, exp_id)} "
              "(through an SSH tunnel on a cluster).")
        return 0
    with socket.socket() as sock:  # a clear message instead of MLflow's traceback when the port is taken
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as exc:
            raise UserError(f"--port {args.port}: cannot serve on {args.host}:{args.port} ({exc.strerror}); "
                            "pick another --port") from None
    exe = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [exe, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port), "--workers", "1"]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", study_dir.artifacts_dir.as_uri()]
    log_path = study_dir.root / "mlflow-ui.log"
    base = f"http://{args.host}:{args.port}"

    class _Stop(Exception):
        pass

    def _raise(signum, _frame):
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, _raise) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    # its own process group, stopped as one; under a watchdog that stops the group when this process is gone,
    # SIGKILL included (study.watchdog)
    cmd = [sys.executable, "-m", "study.watchdog", str(os.getpid()), "--", *cmd]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        print(f"starting the MLflow UI for study {study_dir.name} (its log: {log_path})", flush=True)
        deadline = time.monotonic() + args.timeout
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-15:]
                raise UserError(f"the MLflow UI exited with code {proc.returncode} before serving; the end of "
                                f"{log_path}:\n" + "\n".join(tail))
            try:
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise UserError(f"the MLflow UI did not answer on {base} within {args.timeout:g} s "
                                    f"(see {log_path})") from None
                time.sleep(0.5)
        print(f"MLflow UI for study {study_dir.name}: {experiment_url(base, exp_id)}  (Ctrl+C to stop)", flush=True)
        proc.wait()
        return proc.returncode
    except _Stop as stop:
        print(f"{stop}: stopping the MLflow UI", flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group of ``proc`` (the watchdog, started with ``start_new_session``; it stops its
    group, the server, its workers and its job consumers), SIGKILL to the group if it is still there after
    ``grace`` seconds. Only while ``proc`` is unreaped: its pid, the group's id, cannot be reused by another
    process until then (once reaped, the watchdog has already stopped its group itself)."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

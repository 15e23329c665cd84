"""``study launch / resume / status / ui / report``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from trainables.errors import UserError

DEFAULT_STORAGE = "studies"


def register(sub) -> None:
    p = sub.add_parser("launch", help="start a study: sweep -> select -> retrain -> hold-out -> report",
                       description="Start a study from a search-space YAML (default: the embedded demo).")
    p.add_argument("space", nargs="?", help="search-space YAML (default: the embedded demo, search_spaces/demo.yaml)")
    p.add_argument("--name", help="study name (default: the YAML's `name`)")
    p.add_argument("--data", help="prepared cache folder or manifest CSV (replaces the YAML's data.path)")
    _common(p)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite store in the study folder); "
                   "on a cluster an http:// tracking server")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the search space, print every trial, the trial-epochs and a wall-time estimate "
                   "from a short timing of one training step here; start and write nothing")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("resume", help="continue an interrupted study (finished stages are skipped)")
    p.add_argument("name")
    _common(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="a study's stages, winners, trials, hold-out results, verdict and report",
                       description="Where a study stands: stages with their times, the selected winners with "
                       "their hyperparameters and validation score, every trial, the hold-out table with the "
                       "verdict, and the report's path.")
    p.add_argument("name")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="folder holding the studies (default ./studies)")
    p.add_argument("--json", action="store_true", help="the same content as one pretty-printed JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ui", help="serve the MLflow UI of a study's store on 127.0.0.1 (Ctrl+C stops it)",
                       description="Start the MLflow UI on a study's tracking store and print the address of the "
                       "study's runs once the server answers. Ctrl+C, SIGTERM or SIGHUP stop the server and every "
                       "process it started. A study that logs to a tracking server: its address is printed.")
    p.add_argument("name", help="the study (a folder under --storage)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="folder holding the studies (default ./studies)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; only change it "
                   "behind a firewall)")
    p.add_argument("--port", type=_port, default=5000, help="port to serve on (default 5000)")
    p.add_argument("--timeout", type=_positive_float, default=180.0,
                   help="seconds to wait for the server to answer before giving up (default 180)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("report", help="(re)write the report of a study whose hold-out stage is done")
    p.add_argument("name")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--markdown", action="store_true",
                   help="print the hold-out table with the machine, versions and wall time it was measured "
                   "with (what the README pastes), and write nothing")
    p.set_defaults(func=cmd_report)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="folder holding the studies (default ./studies; shared storage on a cluster)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--wait-for-resources", action="store_true",
                   help="do not fail when no node has the requested GPUs/resources yet (autoscaling clusters)")
    p.add_argument("--num-cpus", type=_positive_int, help="CPUs of the local Ray (default: all)")


def _number(kind: type, what: str, low: float, high: float = float("inf")):
    """An argparse type: a ``kind`` number in [low, high], refused with ``what`` it must be."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    return parse


_positive_int = _number(int, "a positive integer", 1)
_positive_float = _number(float, "a positive number of seconds", 1e-9)
_port = _number(int, "a TCP port (1-65535)", 1, 65535)


def _run(ctx) -> int:
    from study.stages import StudyInterrupted, run_stages

    try:
        run_stages(ctx)
    except StudyInterrupted as exc:
        print(f"\nstudy {ctx.dir.name} interrupted: {exc}.\nNothing is lost: continue with\n"
              f"  study resume {ctx.dir.name} --storage {ctx.dir.root.parent}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\nstudy {ctx.dir.name} interrupted. Continue with\n"
              f"  study resume {ctx.dir.name} --storage {ctx.dir.root.parent}", file=sys.stderr)
        return 130
    return 0


def cmd_launch(args) -> int:
    from search_spaces import builtin_path
    from study.config import load_config
    from study.layout import StudyDir, StudyState, check_name, write_frozen_config
    from study.preflight import check_data, check_storage, preflight
    from study.stages import StudyContext
    from study.tracking import check_server, check_tracking_uri

    space = Path(args.space) if args.space else Path(str(builtin_path("demo")))
    cfg = load_config(space, data_path=args.data)
    checks = dict(address=args.address, num_cpus=args.num_cpus, wait_for_resources=args.wait_for_resources)
    name = args.name if args.name is not None else cfg.name  # --name "" is refused, not replaced
    if args.dry_run:
        from study.plan import describe_plan, plan

        check_name(name)
        check_data(cfg)  # the machine is not checked: a dry run plans a study for another one too
        _warn(cfg)
        print(f"study {name} from {space} (dry run: nothing is started or written)")
        print(describe_plan(cfg, plan(cfg, num_cpus=args.num_cpus)))
        return 0
    study_dir = StudyDir.of(args.storage, name)
    check_storage(args.storage)
    if study_dir.root.exists() and (not study_dir.root.is_dir() or any(study_dir.root.iterdir())):
        if study_dir.exists():
            raise UserError(f"study {study_dir.name!r} already exists at {study_dir.root}; continue it with "
                            f"`study resume {study_dir.name} --storage {args.storage}` or pick another --name")
        raise UserError(f"{study_dir.root} exists and is not an empty folder; pick another --name or --storage")
    uri = check_tracking_uri(args.tracking_uri) if args.tracking_uri else study_dir.default_tracking_uri()
    preflight(cfg, **checks)
    if uri.startswith(("http://", "https://")):
        check_server(uri)  # before the study folder exists: fix the server, launch again
    _warn(cfg)
    made = [p for p in (study_dir.root, *study_dir.root.parents) if not p.exists()]
    study_dir.root.mkdir(parents=True, exist_ok=True)
    try:
        write_frozen_config(study_dir, cfg.to_dict())
        state = StudyState.create(study_dir.state_file, name=study_dir.name, tracking_uri=uri)
        print(f"study {study_dir.name}: {len(cfg.trials)} sweep trial(s) from {space}\n"
              f"  folder  {study_dir.root}\n  MLflow  {uri}", flush=True)
        ctx = StudyContext(study_dir, cfg, state, address=args.address, wait_for_resources=args.wait_for_resources,
                           num_cpus=args.num_cpus)
        return _run(ctx)
    except Exception as exc:
        note = _undo_launch(study_dir, made, cfg.data.source)
        if note is None:
            raise
        if isinstance(exc, UserError):
            raise type(exc)(f"{exc}\n{note}") from None
        print(note, file=sys.stderr)
        raise


def _warn(cfg) -> None:
    from study.preflight import warnings

    for line in warnings(cfg):
        print(f"warning: {line}", file=sys.stderr, flush=True)


def _undo_launch(study_dir, made: list[Path], source: str) -> str | None:
    """After a launch failed: when no trial was started, remove what the launch made (the study folder, the
    storage folders it created, its MLflow experiment on a tracking server) so that the corrected command runs
    as if it were the first, and say so; None (nothing removed) once training has begun: the study resumes."""
    from study.layout import StudyState

    state = None
    if study_dir.state_file.is_file():
        try:
            state = StudyState.load(study_dir.state_file)
        except UserError:
            state = None
    if state is not None and state.data.get("training_started"):
        return None
    kept = ""
    prepared = study_dir.data_dir / "cache"
    if source == "manifest" and state is not None and state.done("data") and prepared.is_dir():
        target = study_dir.root.parent / f"{study_dir.name}.prepared-cache"  # hours of preprocessing: kept
        if not target.exists():
            shutil.move(str(prepared), target)
            kept = f"; the prepared cache is kept at {target} (launch again with --data {target})"
    if state is not None and not state.tracking_uri.startswith("sqlite:"):
        _forget_experiment(state)
    shutil.rmtree(study_dir.root, ignore_errors=True)
    if not made:  # the launch was given an empty folder that already existed: it stays, empty
        study_dir.root.mkdir(exist_ok=True)
    for p in made[1:]:  # storage folders this launch created, innermost first (made[0] is the study folder)
        try:
            p.rmdir()
        except OSError:
            break
    return (f"(nothing was trained: the study folder {study_dir.root} was removed{kept}, so the corrected "
            "command can run as is)")


def _forget_experiment(state) -> None:
    """Rename and delete the MLflow experiment this failed launch made on a tracking server (a deleted
    experiment keeps its name reserved, so it is renamed first)."""
    exp_id = state.mlflow_ids().get("experiment_id")
    if not exp_id:
        return
    try:
        from study.tracking import client

        mlc = client(state.tracking_uri)
        mlc.rename_experiment(exp_id, f"{state.data.get('name', 'study')}-failed-launch-{state.study_id[:8]}")
        mlc.delete_experiment(exp_id)
    except Exception as exc:  # the server went away: say what is left
        print(f"warning: could not remove MLflow experiment {exp_id} at {state.tracking_uri} ({exc}); delete it "
              "in the MLflow UI before launching under the same name", file=sys.stderr)


def _load(args, *, writes: bool = True):
    from study.config import frozen_config_from_dict
    from study.layout import StudyDir, StudyState, read_frozen_config, relocate

    study_dir = StudyDir.of(args.storage, args.name).require()
    cfg = frozen_config_from_dict(read_frozen_config(study_dir), path=study_dir.config_file)
    state = StudyState.load(study_dir.state_file)
    note = relocate(study_dir, state, writes=writes)
    if note:
        print(note, file=sys.stderr, flush=True)
    return study_dir, cfg, state


def cmd_resume(args) -> int:
    from study.layout import STAGES
    from study.stages import StudyContext, redo_missing_outputs

    study_dir, cfg, state = _load(args)
    ctx = StudyContext(study_dir, cfg, state, address=args.address, wait_for_resources=args.wait_for_resources,
                       num_cpus=args.num_cpus)
    redo_missing_outputs(ctx)
    if all(state.done(s) for s in STAGES):
        print(f"study {study_dir.name} is complete; report: {study_dir.report_dir / 'report.md'}")
        return 0
    return _run(ctx)


def study_status(study_dir, cfg, state, results: dict[str, list]) -> dict:
    """What `study status` shows, as plain data (``--json`` prints exactly this): the stages with their times,
    the selected winners with their hyperparameters and validation score, the trials of each Tune stage
    (``results``: Tune stage name -> ``study.tuner.outcomes``), the hold-out table and the verdict, the report."""
    from study.layout import STAGES
    from study.stages import SWEEP, trial_summary
    from study.tracking import selection_rule, verdict_short
    from trainables.naming import config_label

    out: dict = {"study": study_dir.name, "folder": str(study_dir.root), "tracking_uri": state.tracking_uri,
                 "stages": {s: state.data["stages"].get(s, {"done": False}) for s in STAGES}}
    if study_dir.selection_file.is_file():
        sel = study_dir.read_selection()
        out["selection"] = {"rule": selection_rule(cfg), "metric": sel["metric"], "winners": [
            {"configuration": config_label(w),
             "loss": w["loss"], "iw": w["iw"], "params": w["params"], "score": w["score"],
             "val_obj_dice": w.get("val_obj_dice"), "seeds": len(w.get("trial_ids", [])),
             "judged_at_epoch": w.get("judged_at_epoch", cfg.training.epochs)}
            for w in sel["winners"]]}
    out["trials"] = {name: [trial_summary(r) for r in rs] for name, rs in results.items()}
    started = len(out["trials"][SWEEP])
    if started < len(cfg.trials):
        out["not_started"] = {SWEEP: len(cfg.trials) - started}
    summary_file = study_dir.summary_file
    if summary_file.is_file():
        summary = study_dir.read_summary()
        out["holdout"] = {
            "strict_rule": summary.get("strict_rule"), "splits": summary.get("splits"),
            "configurations": [
                {"configuration": label, "avg_recall": c["luna16"]["avg_recall"],
                 "avg_recall_ci": [c["luna16"].get("avg_recall_ci_low"), c["luna16"].get("avg_recall_ci_high")],
                 "obj_dice": c["luna16"]["obj_dice"], "fp_per_image": c["luna16"]["fp_per_image"],
                 "strict_avg_recall": c["strict"]["avg_recall"]} for label, c in summary["configs"].items()],
            "verdict": [{"comparison": f"{e['iw']} vs {e['plain']}", "verdict": verdict_short(e),
                         "sentence": e["sentence"]} for e in (summary.get("verdict") or {}).get("entries") or []]}
    report = study_dir.report_dir / "report.md"
    out["report"] = str(report) if report.is_file() else None
    return out


def _status_text(status: dict, results: dict[str, list]) -> str:
    from study.stages import RETRAIN, trial_table
    from study.tables import fmt, text_table

    lines = [f"study {status['study']}  ({status['folder']})", f"MLflow {status['tracking_uri']}", ""]
    rows = [("stage", "state", "finished", "wall time")]
    for stage, info in status["stages"].items():
        secs = info.get("seconds")
        rows.append((stage, "done" if info.get("done") else "pending", info.get("finished", "-"),
                     "-" if secs is None else f"{secs:.0f} s"))
    lines.append(text_table(rows, indent="  "))
    sel = status.get("selection")
    if sel:
        lines += ["", f"winners ({sel['rule']}):"]
        rows = [("configuration", sel["metric"], "val objDice", "seeds")]
        rows += [(w["configuration"], fmt(w["score"]), fmt(w["val_obj_dice"]), str(w["seeds"])) for w in sel["winners"]]
        lines.append(text_table(rows, indent="  "))
    for name, rs in results.items():
        if rs:
            lines += ["", f"{name} trials" + (" (train+validation, no validation)" if name == RETRAIN else "") + ":",
                      trial_table(rs, indent="  ")]
        lines += [f"  error in {r.trial_id}: {r.error}" for r in rs if r.error]
    lines += [f"\n{name}: {n} trial(s) not started yet" for name, n in status.get("not_started", {}).items()]
    ho = status.get("holdout")
    if ho:
        from study.report import strict_rule_name

        rule = strict_rule_name(ho.get("strict_rule") or ("iou", 0.3))
        n = (ho.get("splits") or {}).get("holdout")
        where = f"{n['cases']} cases, {n['lesions']} lesions; " if n else ""
        lines += ["", f"hold-out ({where}luna16 protocol, 'any' hit rule; strict = {rule}):"]
        rows = [("configuration", "avg recall [95% CI]", "objDice", "FP/img", "strict recall")]
        for c in ho["configurations"]:
            lo, hi = c["avg_recall_ci"]
            ci = "" if lo is None else f" [{lo:.3f}, {hi:.3f}]"
            rows.append((c["configuration"], fmt(c["avg_recall"]) + ci, fmt(c["obj_dice"]), fmt(c["fp_per_image"], 2),
                         fmt(c["strict_avg_recall"])))
        lines.append(text_table(rows, indent="  "))
        if ho["verdict"]:
            lines += ["", "verdict:"] + [f"  - {v['comparison']}: {v['verdict']}" for v in ho["verdict"]]
    lines += ["", f"report: {status['report']}" if status.get("report") else "report: not written yet"]
    return "\n".join(lines)


def cmd_status(args) -> int:
    from study.stages import RETRAIN, SWEEP
    from study.tuner import outcomes

    study_dir, cfg, state = _load(args, writes=False)
    results = {name: outcomes(study_dir.ray_dir, name) for name in (SWEEP, RETRAIN)}
    status = study_status(study_dir, cfg, state, results)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print(_status_text(status, results))
    return 0


def cmd_ui(args) -> int:
    import signal
    import socket
    import time
    import urllib.request

    from study.tracking import experiment_url

    study_dir, _cfg, state = _load(args, writes=False)
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
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group: stopped as one
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
    """SIGTERM to the process group of ``proc`` (started with ``start_new_session``), SIGKILL to what is left
    after ``grace`` seconds: the server, its workers and its job consumers all end."""
    import signal
    import time

    def alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not alive():
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def cmd_report(args) -> int:
    from study.stages import StudyContext, stage_report

    study_dir, cfg, state = _load(args)
    if not (study_dir.summary_file).is_file():
        raise UserError(f"study {study_dir.name}: the hold-out stage has not finished; run `study resume "
                        f"{study_dir.name}` first")
    if args.markdown:
        from study.report import readme_block

        summary = study_dir.read_summary()
        print(readme_block(summary, state.data, study_name=study_dir.name), end="")
        return 0
    stage_report(StudyContext(study_dir, cfg, state))
    print(f"Report: {study_dir.report_dir / 'report.md'}")
    return 0

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

    p = sub.add_parser("status", help="stages and trials of a study")
    p.add_argument("name")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="folder holding the studies (default ./studies)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for a study's store")
    p.add_argument("name")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; only change it "
                   "behind a firewall)")
    p.add_argument("--port", type=int, default=5000)
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
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")


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
    from study.layout import StudyDir, StudyState, write_frozen_config
    from study.stages import StudyContext
    from study.tracking import check_server, check_tracking_uri

    space = Path(args.space) if args.space else Path(str(builtin_path("demo")))
    cfg = load_config(space, data_path=args.data)
    if args.dry_run:
        from study.plan import describe_plan, plan

        print(f"study {args.name or cfg.name} from {space} (dry run: nothing is started or written)")
        print(describe_plan(cfg, plan(cfg, num_cpus=args.num_cpus)))
        return 0
    study_dir = StudyDir.of(args.storage, args.name or cfg.name)
    if study_dir.root.exists() and any(study_dir.root.iterdir()):
        if study_dir.exists():
            raise UserError(f"study {study_dir.name!r} already exists at {study_dir.root}; continue it with "
                            f"`study resume {study_dir.name} --storage {args.storage}` or pick another --name")
        raise UserError(f"{study_dir.root} exists and is not empty; pick another --name or --storage")
    uri = check_tracking_uri(args.tracking_uri) if args.tracking_uri else study_dir.default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        check_server(uri)  # before the study folder exists: fix the server, launch again
    study_dir.root.mkdir(parents=True, exist_ok=True)
    write_frozen_config(study_dir, cfg.to_dict())
    state = StudyState.create(study_dir.state_file, name=study_dir.name, tracking_uri=uri)
    print(f"study {study_dir.name}: {len(cfg.trials)} sweep trial(s) from {space}\n"
          f"  folder  {study_dir.root}\n  MLflow  {uri}", flush=True)
    ctx = StudyContext(study_dir, cfg, state, address=args.address, wait_for_resources=args.wait_for_resources,
                       num_cpus=args.num_cpus)
    return _run(ctx)


def _load(args):
    from study.config import frozen_config_from_dict
    from study.layout import StudyDir, StudyState, read_frozen_config

    study_dir = StudyDir.of(args.storage, args.name).require()
    cfg = frozen_config_from_dict(read_frozen_config(study_dir))
    state = StudyState.load(study_dir.state_file)
    return study_dir, cfg, state


def cmd_resume(args) -> int:
    from study.layout import STAGES
    from study.stages import StudyContext

    study_dir, cfg, state = _load(args)
    if all(state.done(s) for s in STAGES):
        print(f"study {study_dir.name} is complete; report: {study_dir.report_dir / 'report.md'}")
        return 0
    ctx = StudyContext(study_dir, cfg, state, address=args.address, wait_for_resources=args.wait_for_resources,
                       num_cpus=args.num_cpus)
    return _run(ctx)


def study_status(study_dir, cfg, state, results: dict[str, list]) -> dict:
    """Stages and trials (``results``: Tune stage name -> ``study.tuner.outcomes``) as plain data."""
    from study.layout import STAGES
    from study.stages import SWEEP, trial_summary

    out = {"study": study_dir.name, "folder": str(study_dir.root), "tracking_uri": state.tracking_uri,
           "stages": {s: state.data["stages"].get(s, {"done": False}) for s in STAGES},
           "trials": {name: [trial_summary(r) for r in rs] for name, rs in results.items()}}
    started = len(out["trials"][SWEEP])
    if started < len(cfg.trials):
        out["not_started"] = {SWEEP: len(cfg.trials) - started}
    return out


def cmd_status(args) -> int:
    from study.stages import RETRAIN, SWEEP, trial_table
    from study.tuner import outcomes

    study_dir, cfg, state = _load(args)
    results = {name: outcomes(study_dir.ray_dir, name) for name in (SWEEP, RETRAIN)}
    status = study_status(study_dir, cfg, state, results)
    if args.json:
        print(json.dumps(status, default=str))
        return 0
    print(f"study {status['study']}  ({status['folder']})\nMLflow {status['tracking_uri']}\n")
    for stage, info in status["stages"].items():
        print(f"  {stage:8s} {'done ' + info.get('finished', '') if info.get('done') else 'pending'}")
    for name, rs in results.items():
        if rs:
            print(f"\n{name} trials:\n" + trial_table(rs, indent="  "))
        for r in rs:
            if r.error:
                print(f"  error in {r.trial_id}: {r.error}")
    for name, n in status.get("not_started", {}).items():
        print(f"\n{name}: {n} trial(s) not started yet")
    return 0


def cmd_ui(args) -> int:
    study_dir, _cfg, state = _load(args)
    uri = state.tracking_uri
    if uri.startswith(("http://", "https://")):
        print(f"study {study_dir.name} logs to the tracking server {uri}: open it in a browser "
              "(through an SSH tunnel on a cluster).")
        return 0
    exe = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [exe, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", study_dir.artifacts_dir.as_uri()]
    print(f"MLflow UI for study {study_dir.name}: http://{args.host}:{args.port}  (Ctrl+C to stop)", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def cmd_report(args) -> int:
    from study.stages import StudyContext, stage_report

    study_dir, cfg, state = _load(args)
    if not (study_dir.holdout_dir / "summary.json").is_file():
        raise UserError(f"study {study_dir.name}: the hold-out stage has not finished; run `study resume "
                        f"{study_dir.name}` first")
    if args.markdown:
        from study.report import readme_block

        summary = json.loads((study_dir.holdout_dir / "summary.json").read_text())
        print(readme_block(summary, state.data, study_name=study_dir.name), end="")
        return 0
    stage_report(StudyContext(study_dir, cfg, state))
    print(f"Report: {study_dir.report_dir / 'report.md'}")
    return 0

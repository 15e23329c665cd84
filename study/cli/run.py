"""``study launch / resume / report``: the commands that drive a study's stages."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from study.cli.args import add_cluster_options, add_storage
from study.layout import StudyDir, open_study
from study.lock import StudyBusy, driver_lock
from trainables.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("launch", help="start a study: sweep -> select -> retrain -> hold-out -> report",
                       description="Start a study from a search-space YAML (default: the embedded demo).")
    p.add_argument("space", nargs="?", help="search-space YAML (default: the embedded demo, search_spaces/demo.yaml)")
    p.add_argument("--name", help="study name (default: the YAML's `name`)")
    p.add_argument("--data", help="prepared cache folder or manifest CSV (replaces the YAML's data.path)")
    add_cluster_options(p)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite store in the study folder); "
                   "on a cluster an http:// tracking server")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the search space, print every trial, the trial-epochs and a wall-time estimate "
                   "from a short timing of one training step here; start and write nothing")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("resume", help="continue an interrupted study (finished stages are skipped)")
    p.add_argument("name")
    add_cluster_options(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("report", help="(re)write the report of a study whose hold-out stage is done")
    p.add_argument("name")
    add_storage(p)
    p.add_argument("--markdown", action="store_true",
                   help="print the hold-out table with the machine, versions and wall time it was measured "
                   "with (what the README pastes), and write nothing")
    p.set_defaults(func=cmd_report)


def _run(ctx) -> int:
    from study.stages import run_stages
    from study.stages.context import StudyInterrupted

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
    from study.layout import StudyDir, check_name
    from study.loader import load_config
    from study.preflight import check_data, check_storage, preflight
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
        with driver_lock(study_dir, "launch"):
            return _launch(study_dir, cfg, uri, space, args)
    except StudyBusy:  # another launch of this name is driving the folder: it is not this launch's to undo
        raise
    except Exception as exc:
        note = _undo_launch(study_dir, made, cfg.data.source)
        if note is None:
            raise
        if isinstance(exc, UserError):
            raise type(exc)(f"{exc}\n{note}") from None
        print(note, file=sys.stderr)
        raise


def _launch(study_dir, cfg, uri: str, space: Path, args) -> int:
    from study.layout import StudyState, write_frozen_config
    from study.stages.context import StudyContext

    if study_dir.config_file.exists():  # another launch of the same name won the race to the empty folder
        raise StudyBusy(f"study {study_dir.name!r} was just created by another launch at {study_dir.root}; "
                        f"follow it with `study status {study_dir.name} --storage {study_dir.root.parent}`")
    write_frozen_config(study_dir, cfg.to_dict())
    state = StudyState.create(study_dir.state_file, name=study_dir.name, tracking_uri=uri)
    print(f"study {study_dir.name}: {cfg.sweep_size} sweep trial(s) from {space}\n"
          f"  folder  {study_dir.root}\n  MLflow  {uri}", flush=True)
    ctx = StudyContext(study_dir, cfg, state, address=args.address, wait_for_resources=args.wait_for_resources,
                       num_cpus=args.num_cpus)
    return _run(ctx)


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


def cmd_resume(args) -> int:
    from study.layout import STAGES
    from study.stages import redo_missing_outputs
    from study.stages.context import StudyContext

    with driver_lock(StudyDir.of(args.storage, args.name).require(), "resume"):
        study_dir, cfg, state = open_study(args.storage, args.name)
        ctx = StudyContext(study_dir, cfg, state, address=args.address, wait_for_resources=args.wait_for_resources,
                           num_cpus=args.num_cpus)
        redo_missing_outputs(ctx)
        if all(state.done(s) for s in STAGES):
            print(f"study {study_dir.name} is complete; report: {study_dir.report_file}")
            return 0
        return _run(ctx)


def cmd_report(args) -> int:

    if args.markdown:  # reads only
        return _report(args)
    with driver_lock(StudyDir.of(args.storage, args.name).require(), "report"):
        return _report(args)


def _report(args) -> int:
    from study.stages.context import StudyContext
    from study.stages.report import stage_report

    study_dir, cfg, state = open_study(args.storage, args.name, writes=not args.markdown)
    if not (study_dir.summary_file).is_file():
        raise UserError(f"study {study_dir.name}: the hold-out stage has not finished; run `study resume "
                        f"{study_dir.name}` first")
    if args.markdown:
        from study.report.document import readme_block

        summary = study_dir.read_summary()
        print(readme_block(summary, state.data, study_name=study_dir.name), end="")
        return 0
    stage_report(StudyContext(study_dir, cfg, state))
    print(f"Report: {study_dir.report_file}")
    return 0

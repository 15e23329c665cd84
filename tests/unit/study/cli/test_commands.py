"""Command-line errors that must be clear, exit 2, and leave nothing half-made (no Ray needed)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from search_spaces import builtin_path
from study.cli import main
from study.layout import StudyDir, StudyState, write_frozen_config
from study.loader import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_study(tmp_path: Path):
    """A launched-but-not-run demo study folder (frozen config + state), as `study launch` leaves it."""
    cfg = load_config(Path(str(builtin_path("demo"))))
    study = StudyDir.of(tmp_path, "demo")
    study.root.mkdir()
    write_frozen_config(study, cfg.to_dict())
    StudyState.create(study.state_file, name="demo", tracking_uri=study.default_tracking_uri())
    return cfg, study


def _dry_run(tmp_path: Path, capsys, **sections) -> tuple[str, dict, Path]:
    """`study launch SPACE --dry-run` of the demo (its small network and patch) with ``sections`` replaced: what
    it printed, the space as a dict, and its file."""
    demo = yaml.safe_load(Path(str(builtin_path("demo"))).read_text())
    demo.update(sections)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(demo))
    assert main(["launch", str(space), "--dry-run", "--storage", str(tmp_path / "studies")]) == 0
    return capsys.readouterr().out, demo, space


def test_unreachable_tracking_server_fails_before_creating_the_study(tmp_path, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"
    assert main(["launch", "--storage", str(tmp_path / "s"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert uri in err and "does not answer" in err
    assert not (tmp_path / "s").exists()


def test_file_store_and_relative_sqlite_uris_are_refused(tmp_path, capsys):
    for uri in ("file:///tmp/mlruns", "./mlruns", "sqlite:///mlflow.db"):
        assert main(["launch", "--storage", str(tmp_path / "s"), "--tracking-uri", uri]) == 2
        assert uri in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_launch_refuses_an_existing_study_and_points_to_resume(tmp_path, capsys):
    cfg, study = _demo_study(tmp_path)
    before = sorted(p.name for p in study.root.iterdir())
    assert main(["launch", "--storage", str(tmp_path)]) == 2
    assert "study resume demo" in capsys.readouterr().err
    assert sorted(p.name for p in study.root.iterdir()) == before


def test_resume_status_report_of_a_missing_study(tmp_path, capsys):
    for cmd in ("resume", "status", "report", "ui"):
        assert main([cmd, "nope", "--storage", str(tmp_path)]) == 2
        assert "no study at" in capsys.readouterr().err


def test_bad_study_name(tmp_path, capsys):
    assert main(["launch", "--storage", str(tmp_path), "--name", "../escape"]) == 2
    assert "study name" in capsys.readouterr().err


def test_status_json_of_a_fresh_study(tmp_path, capsys):
    cfg, study = _demo_study(tmp_path)
    assert main(["status", "demo", "--storage", str(tmp_path), "--json"]) == 0
    status = yaml.safe_load(capsys.readouterr().out)
    assert status["not_started"]["sweep"] == len(cfg.trials)
    assert not any(v["done"] for v in status["stages"].values())


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path, capsys):
    storage = tmp_path / "studies"
    assert main(["launch", "--dry-run", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    cfg = load_config(Path(str(builtin_path("demo"))))
    assert f"{len(cfg.trials)} sweep trial(s):" in out and all(f"  {t.label}\n" in out for t in cfg.trials)
    sweep = len(cfg.trials) * cfg.training.epochs
    assert f"trial-epochs: sweep {sweep}, retrain {sweep} " in out  # 4 configurations x 2 seeds, retrained
    assert "training step on this machine:" in out and "estimated wall time here:" in out
    assert not storage.exists()


def test_dry_run_of_a_three_fold_space_counts_every_fold(tmp_path, capsys):
    data = yaml.safe_load(Path(str(builtin_path("demo"))).read_text()).get("data", {})
    out, demo, _ = _dry_run(tmp_path, capsys, data={**data, "folds": 3},
                            search={"losses": {"dice": {"iw": [False, True]}}, "seeds": [0, 1]})
    assert "12 sweep trial(s):" in out  # 2 configurations x 2 seeds x 3 folds
    assert all(f"  {c}/s{s}/f{f}\n" in out for c in ("dice", "iw-dice") for s in (0, 1) for f in (0, 1, 2))
    assert "cross-validation: 3 folds" in out and "the retrained winners and the fold ensembles" in out
    e = demo["training"]["epochs"]
    assert f"trial-epochs: sweep {12 * e}, retrain {4 * e} (4 retrained winner trial(s))" in out
    assert "training step on this machine:" in out


def test_dry_run_of_a_random_search_lists_its_draws(tmp_path, capsys):
    out, _, space = _dry_run(tmp_path, capsys, search={
        "algorithm": "random", "num_samples": 3, "seed": 5, "seeds": [0, 1],
        "losses": {"focal": {"iw": [False, True], "alpha": {"low": 0.25, "high": 0.9}}}})
    cfg = load_config(space)
    assert "12 sweep trial(s):" in out and all(f"  {t.label}\n" in out for t in cfg.trials)
    assert "random search: 3 draw(s) per (loss, iw) configuration (search.seed 5), each with every seed: 6 " \
           "hyperparameter settings of 2 configuration(s)" in out


def test_dry_run_of_a_search_over_two_networks_names_both(tmp_path, capsys):
    pytest.importorskip("monai")
    inference = yaml.safe_load(Path(str(builtin_path("demo"))).read_text()).get("inference", {})
    out, _, _ = _dry_run(tmp_path, capsys, inference={**inference, "tta": "mirror"},
                         search={"losses": {"bce": {"iw": [False, True]}}, "models": ["unet2020", "dynunet"],
                                 "seeds": [0]})
    assert "4 sweep trial(s):" in out
    for net in ("unet2020", "dynunet"):
        assert f"  bce[model.network={net}]/s0\n" in out and f"  iw-bce[model.network={net}]/s0\n" in out
    assert "(4 retrained winner trial(s))" in out  # one winner per network x loss x iw


def test_gpu_trials_are_not_timed_on_the_cpu():
    """A CPU timing says nothing about GPU trials (and the paper's step takes minutes on a CPU head)."""
    from study.loader import config_from_dict
    from study.plan import describe_plan, plan

    cfg = config_from_dict({"search": {"losses": {"bce": {}}}, "resources": {"cpu": 4, "gpu": 1}})
    p = plan(cfg)
    assert "step_seconds" not in p and p["sweep_trial_epochs"] == 100
    assert "GPU trials, not timed on this machine" in describe_plan(cfg, p)


def _slurm_space(tmp_path, gpu=0):
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "search": {"configs": ["bce"]}, "resources": {"cpu": 1, "gpu": gpu}}))
    return path


def test_slurm_help_documents_every_option(capsys):
    import pytest

    from study.cli import main

    with pytest.raises(SystemExit):
        main(["slurm", "--help"])
    out = capsys.readouterr().out
    for option in ("--data", "--nodes", "--gpus-per-node", "--cpus-per-node", "--time", "--partition", "--storage", "--name",
                   "--stop-before", "--script", "--submit"):
        assert option in out, option


def test_slurm_writes_the_script_without_sbatch(tmp_path, monkeypatch, capsys):
    import subprocess

    from study.cli import main

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch (nor anything else) on PATH
    storage = tmp_path / "st"
    assert main(["slurm", str(_slurm_space(tmp_path)), "--storage", str(storage), "--nodes", "2"]) == 0
    script = storage / "s.slurm.sh"
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@120" in text
    assert "srun --nodes=$(( ${#NODES[@]} - 1 ))" in text and "scontrol requeue" in text
    # this job's Ray only: a head under the script, stopped by its pid; `ray stop` would stop every Ray on the node
    assert "--block &\nRAY_HEAD=$!" in text and '"$RAY" stop' not in text and "stop --force" not in text
    # a requeued run on the same node waits for its own head, not the address file the last run left, and stops
    # when its head never writes one
    address = '"$RAY_TMPDIR/ray_current_cluster"'
    assert text.index(f"rm -f {address}") < text.index('"$RAY" start --head') < text.index(f"[ -s {address} ] ||")
    assert subprocess.run(["/bin/bash", "-n", str(script)]).returncode == 0  # valid bash
    token = storage / ".ray-auth" / "auth_token"
    assert oct(token.stat().st_mode & 0o777) == "0o600" and len(token.read_text().strip()) == 64
    assert main(["slurm", str(_slurm_space(tmp_path)), "--storage", str(storage), "--submit"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err and script.is_file()


def test_slurm_bad_input_exits_2(tmp_path, capsys):
    from study.cli import main

    space = _slurm_space(tmp_path)
    cases = [
        (["--nodes", "0"], "--nodes 0: a job needs at least one node"),
        (["--gpus-per-node", "2"], "ask for no GPU (resources.gpu: 0)"),
        (["--time", "90 minutes"], "expected [D-]HH:MM:SS"),
    ]
    for extra, needle in cases:
        assert main(["slurm", str(space), "--storage", str(tmp_path / "st"), *extra]) == 2, extra
        assert needle in capsys.readouterr().err, extra
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.geteuid() == 0:  # root writes anywhere: a path below a file stands in for an unwritable folder
            (tmp_path / "file").write_text("")
            target, needle = tmp_path / "file" / "studies", "which is a file, not a folder"
        else:
            target, needle = ro / "studies", "cannot write in"
        assert main(["slurm", str(space), "--storage", str(target)]) == 2
        assert f"--storage {target}: " in (err := capsys.readouterr().err) and needle in err
    finally:
        ro.chmod(0o700)
    assert main(["slurm", str(_slurm_space(tmp_path, gpu=1)), "--storage", str(tmp_path / "st")]) == 2
    assert "--gpus-per-node is 0" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    """Bad input is one line and exit 2; anything else is a bug in study: the traceback, a please-report line
    naming the command, exit 1."""
    import study.cli.catalog
    from study.cli import main

    def broken(args):
        raise KeyError("an internal key")

    monkeypatch.setattr(study.cli.catalog, "cmd_catalog", broken)  # the parser is built inside main: it takes this
    assert main(["catalog"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'an internal key'" in err
    assert "This is a bug in study" in err and "(study catalog)" in err


def test_dry_run_of_a_tpe_search_lists_its_first_round_and_the_budget(tmp_path, capsys):
    out, demo, space = _dry_run(tmp_path, capsys, search={
        "algorithm": "tpe", "num_samples": 5, "batch": 2, "seed": 3, "seeds": [0, 1],
        "losses": {"bce": {"iw": [False, True], "iw.power": {"low": 0.2, "high": 1.0}}}})
    cfg = load_config(space)
    # plain bce has nothing to draw (iw.power is iw's): one point; iw-bce 5 draws in rounds of 2 (2, 2, 1)
    assert cfg.sweep_size == (1 + 5) * 2 and len(cfg.trials) == (1 + 2) * 2
    assert "12 sweep trial(s) in 3 round(s); the first round's 6" in out
    assert all(f"  {t.label}\n" in out for t in cfg.trials)
    assert "TPE search: 5 draw(s) per (loss, iw) configuration (2: bce, iw-bce; one with nothing to draw runs " \
           "once), 2 per round, search.seed 3; each draw with every seed (2): 12 sweep trials in all" in out
    e = demo["training"]["epochs"]
    assert f"trial-epochs: sweep {12 * e}," in out

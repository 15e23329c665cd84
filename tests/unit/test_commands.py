"""Command-line errors that must be clear, exit 2, and leave nothing half-made (no Ray needed)."""

from __future__ import annotations

import socket
from pathlib import Path

import yaml

from search_spaces import builtin_path
from study.cli import main
from study.config import load_config
from study.layout import StudyDir, StudyState, write_frozen_config


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


def test_gpu_trials_are_not_timed_on_the_cpu():
    """A CPU timing says nothing about GPU trials (and the paper's step takes minutes on a CPU head)."""
    from study.config import config_from_dict
    from study.plan import describe_plan, plan

    cfg = config_from_dict({"search": {"losses": {"bce": {}}}, "resources": {"cpu": 4, "gpu": 1}})
    p = plan(cfg)
    assert "step_seconds" not in p and p["sweep_trial_epochs"] == 100
    assert "GPU trials, not timed on this machine" in describe_plan(cfg, p)

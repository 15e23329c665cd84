"""Issue 27: a TPE sweep killed (SIGKILL of the driver's process group, its local Ray with it) mid-search and
restored runs exactly num_samples draws per configuration, each with every seed, with the same hyperparameters as
an uninterrupted run; trials ASHA stops are scored at their rung (the suggestions after them would differ
otherwise). The trainable is synthetic (tests/integration/tpe_driver.py): the real trainable's resume is the
kill test's (test_study.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import kill_group, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SPACE = {
    "name": "tpe",
    "training": {"epochs": 4},
    "search": {"algorithm": "tpe", "num_samples": 3, "batch": 1, "seed": 7, "seeds": [0, 1],
               "losses": {"bce": {"iw": [False, True], "iw.power": {"low": 0.1, "high": 1.0},
                                  "optimizer.lr": {"low": 1e-3, "high": 1e-1, "log": True}}}},
    "scheduler": {"type": "asha", "metric": "val_avg_recall", "grace_epochs": 1, "reduction_factor": 2},
}


def _start(space: Path, storage: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.integration.tpe_driver", str(space), str(storage)],
                            cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)


def _trials(storage: Path) -> list[dict]:
    from study.tune.tuner import outcomes

    return [{"trial": r.spec, "status": r.status, "epochs": len(r.history)} for r in outcomes(storage, "sweep")]


def test_a_tpe_sweep_killed_mid_search_resumes_to_the_uninterrupted_trials(tmp_path, no_leftover_processes):
    from study.loader import load_config
    from study.tune.searcher import points_file

    space = tmp_path / "tpe.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    cfg = load_config(space)
    assert cfg.sweep_size == 2 * 3 * 2  # (bce, iw-bce) x 3 draws x 2 seeds

    straight = tmp_path / "straight"
    log = tmp_path / "straight.log"
    proc = _start(space, straight, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]

    killed = tmp_path / "killed"
    log = tmp_path / "killed.log"
    proc = _start(space, killed, log)
    rounds = lambda: json.loads(points_file(killed, "sweep").read_text())["rounds"]  # noqa: E731
    # the second round has been suggested (from the first round's scores) and some of its trials exist
    # (the first round: 2 configurations x 1 draw x 2 seeds = 4 trials, about 2 s each; the second round is asked
    # when they have ended, and its trials exist in Tune's next snapshot, or only after the resume)
    wait_for(lambda: points_file(killed, "sweep").is_file() and len(rounds()) >= 2, timeout=300, proc=proc, log=log)
    kill_group(proc)
    before = _trials(killed)
    assert sum(t["status"] in ("TERMINATED", "STOPPED") for t in before) < cfg.sweep_size  # killed mid-search
    proc = _start(space, killed, tmp_path / "resumed.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-4000:]

    a, b = _trials(straight), _trials(killed)
    key = lambda ts: sorted(json.dumps(t["trial"], sort_keys=True) for t in ts)  # noqa: E731
    assert len(b) == len(a) == cfg.sweep_size and key(b) == key(a)  # no trial lost, none twice, the same draws
    per_config: dict[str, set[str]] = {}
    for t in b:
        per_config.setdefault(("iw-" if t["trial"]["iw"] else "") + "bce", set()).add(
            json.dumps(t["trial"]["params"], sort_keys=True))
    assert {c: len(p) for c, p in per_config.items()} == {"bce": 3, "iw-bce": 3}
    assert points_file(killed, "sweep").read_text() == points_file(straight, "sweep").read_text()
    assert {t["status"] for t in b} <= {"TERMINATED", "STOPPED"}
    assert any(t["status"] == "STOPPED" for t in a), "ASHA stopped no trial: the stopped-trial path is untested"

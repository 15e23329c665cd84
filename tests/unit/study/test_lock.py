"""One driver per study (issue 30): a second driver exits 2 at once naming the holder; the lock dies with its
process (SIGKILL included) and is not inherited by the processes a driver starts; read-only commands still work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from study.cli import main
from study.layout import StudyDir
from study.lock import HOLDER_FILE, StudyBusy, driver_lock

HOLD = textwrap.dedent("""
    import sys, time, subprocess
    from study.layout import StudyDir
    from study.lock import driver_lock
    with driver_lock(StudyDir(__import__("pathlib").Path(sys.argv[1])), "resume"):
        # a child started by the driver (as Ray's daemons are): it must not keep the lock
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)
""")


def _holder(root: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[3])
    child = int(proc.stdout.readline())
    return proc, child


def test_a_second_driver_is_refused_naming_the_holder_until_the_holder_dies(tmp_path, capsys):
    root = tmp_path / "studies" / "busy"
    root.mkdir(parents=True)
    (root / "study.yaml").write_text("name: busy\n")
    (root / "state.json").write_text("{}")  # what StudyDir.require looks for; the lock comes before reading them
    proc, child = _holder(root)
    try:
        held = json.loads((root / HOLDER_FILE).read_text())
        assert held["pid"] == proc.pid and held["command"] == "resume"
        with pytest.raises(StudyBusy, match=rf"study busy is being driven by `study resume` \(PID {proc.pid} on "):
            with driver_lock(StudyDir(root), "report"):
                pass
        # the CLI: exit 2 with one line naming the holder and what to do
        assert main(["resume", "busy", "--storage", str(root.parent)]) == 2
        err = capsys.readouterr().err
        assert f"PID {proc.pid}" in err and "one driver per study" in err and "Traceback" not in err
        os.kill(proc.pid, signal.SIGKILL)  # a killed driver leaves no stale lock; its child still runs
        proc.wait()
        os.kill(child, 0)
        with driver_lock(StudyDir(root), "resume"):
            assert json.loads((root / HOLDER_FILE).read_text())["pid"] == os.getpid()
        assert not (root / HOLDER_FILE).exists()  # released and cleared at the end of the block
    finally:
        for pid in (proc.pid, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        time.sleep(0.1)


def test_read_only_commands_work_while_a_study_is_driven(tmp_path, capsys):
    storage = tmp_path / "studies"
    assert main(["launch", "--dry-run", "--storage", str(storage)]) == 0  # nothing made
    capsys.readouterr()
    from search_spaces import builtin_path
    from study.layout import StudyState, write_frozen_config
    from study.loader import load_config

    sd = StudyDir.of(storage, "demo")
    sd.root.mkdir(parents=True)
    write_frozen_config(sd, load_config(Path(str(builtin_path("demo")))).to_dict())
    StudyState.create(sd.state_file, name="demo", tracking_uri=sd.default_tracking_uri())
    with driver_lock(sd, "resume"):
        assert main(["status", "demo", "--storage", str(storage), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["stages"] is not None
        assert main(["report", "demo", "--storage", str(storage)]) == 2  # writes: refused while driven
        assert "being driven by `study resume`" in capsys.readouterr().err

"""One driver per study: ``launch``, ``resume``, ``report`` and ``predict --overwrite`` hold an exclusive lock on the
study folder while they run.

Two drivers of one study (a double click, a SLURM requeue racing a manual ``resume``) would drive the same Ray
experiment and log the same MLflow steps twice. The lock is an OS file lock (``flock`` on ``<study>/.driver.lock``),
which the kernel releases when its process ends however it ends, so a killed driver never leaves a stale lock;
the descriptor is not inherited by the processes the driver starts (Ray's daemons), so they never hold it after
the driver is gone. Who holds it (command, PID, host, start time) is written beside it in ``driver.json``; a
second driver exits 2 at once naming the holder and what to do. Read-only commands (``status``, ``ui``,
``metrics``, ``predict`` into a new folder) take no lock and work while a study runs. On a shared filesystem the
lock is as good as the filesystem's ``flock`` (NFSv4 and Lustre with ``flock`` mounts honour it across hosts).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from trainables.errors import UserError
from trainables.io_utils import write_text_atomic

LOCK_FILE = ".driver.lock"


class StudyBusy(UserError):
    """Another process drives the study (exit 2)."""

HOLDER_FILE = "driver.json"


def holder(root) -> dict | None:
    """Who holds (or last held) the lock of the study folder ``root``: ``{"command", "pid", "host", "started"}``."""
    try:
        return json.loads((root / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def driver_lock(study_dir, command: str) -> Iterator[None]:
    """Hold the study's driver lock for the block; :class:`StudyBusy` naming the holder when another process
    has it."""
    root = study_dir.root
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)  # not inheritable (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        h = holder(root) or {}
        who = (f"`study {h.get('command', '?')}` (PID {h.get('pid', '?')} on {h.get('host', '?')}, since "
               f"{h.get('started', '?')})") if h else "another process"
        raise StudyBusy(f"study {study_dir.name} is being driven by {who}; one driver per study: wait for it to "
                        f"finish (`study status {study_dir.name} --storage {root.parent}` follows it), or stop it "
                        f"and run `study resume {study_dir.name} --storage {root.parent}`") from None
    try:
        write_text_atomic(root / HOLDER_FILE, json.dumps({
            "command": command, "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, indent=1))
        yield
    finally:
        with contextlib.suppress(OSError):
            (root / HOLDER_FILE).unlink()
        os.close(fd)  # releases the lock

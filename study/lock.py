"""One driver per study: ``launch``, ``resume``, ``report`` and ``predict --overwrite`` hold an exclusive lock on the
study folder while they run.

Two drivers of one study (a double click, a SLURM requeue racing a manual ``resume``) would drive the same Ray
experiment and log the same MLflow steps twice. The lock is an OS file lock (``flock`` on ``<study>/.driver.lock``),
which the kernel releases when its process ends however it ends, so a killed driver never leaves a stale lock;
the descriptor is not inherited by the processes the driver starts (Ray's daemons), so they never hold it after
the driver is gone; both files are removed when the driver ends normally, so a study folder nobody drives holds
neither. Who holds it (command, PID, host, start time) is written beside it in ``driver.json``; a
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
    has it. The lock file and ``driver.json`` are removed when the block ends (a killed driver leaves them behind,
    locked by nobody), so a study folder that nobody drives holds neither."""
    root = study_dir.root
    path = root / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inheritable (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = holder(root) or {}
            who = (f"`study {h.get('command', '?')}` (PID {h.get('pid', '?')} on {h.get('host', '?')}, since "
                   f"{h.get('started', '?')})") if h else "another process"
            raise StudyBusy(f"study {study_dir.name} is being driven by {who}; one driver per study: wait for it "
                            f"to finish (`study status {study_dir.name} --storage {root.parent}` follows it), or "
                            f"stop it and run `study resume {study_dir.name} --storage {root.parent}`") from None
        try:  # the file may have been removed by the holder that just released it: lock the one on disk
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # who holds it is information, never a reason to fail (a full disk)
            write_text_atomic(root / HOLDER_FILE, json.dumps({
                "command": command, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, indent=1))
        yield
    finally:
        for name in (HOLDER_FILE, LOCK_FILE):  # removed while still locked, then released
            with contextlib.suppress(OSError):
                (root / name).unlink()
        os.close(fd)

"""A server that dies with the command that started it, however that command ends.

``python -m study.watchdog PARENT_PID -- CMD...`` runs ``CMD`` as its child in its own process group (the caller
starts the watchdog with ``start_new_session``) and watches ``PARENT_PID``: when that process is gone (SIGKILLed
included, which no signal handler sees), the watchdog stops its whole group: SIGTERM, then SIGKILL after a
grace period, so the server, its workers and its job consumers all end. When ``CMD`` exits by itself, the
watchdog exits with its code. ``study ui`` starts MLflow this way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

#: seconds between two looks at the parent
POLL_S = 0.5
#: seconds the group gets after SIGTERM before SIGKILL
GRACE_S = 10.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_group(grace: float = GRACE_S) -> None:
    group = os.getpgrp()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the watchdog outlives its own SIGTERM to finish the job
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:  # reap what has ended, so that only live members keep the group
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        members = [p for p in _group_members(group) if p != os.getpid()]
        if not members:
            return
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)


def _group_members(group: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == group and fields[0] != "Z":
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m study.watchdog PARENT_PID -- CMD...", file=sys.stderr)
        return 2
    parent = int(argv[0])
    child = subprocess.Popen(argv[2:])
    signal.signal(signal.SIGTERM, lambda *_: (_stop_group(), sys.exit(0)))
    while True:
        code = child.poll()
        if code is not None:  # the server ended by itself: what it left in the group (workers) ends with it
            _stop_group()
            return code
        if not _alive(parent) or os.getppid() != parent:
            _stop_group()
            return 0
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

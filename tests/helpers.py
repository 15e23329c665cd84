"""Small helpers shared by several test modules."""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative path -> sha1); {} if the folder does not exist.

    Two equal snapshots mean a failed command left the folder exactly as it was.
    """
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }

"""Small file helpers shared by the data layer, the metrics and the driver: atomic writes and JSON encoding.

Standard library only at import time (the command line imports this through ``study.layout``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

__all__ = ["json_default", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` so that no reader ever sees half a file; returns the path.

    The text goes to a temporary file in the same folder, named after ``path``, this process id and a random
    suffix (so concurrent writers never share one), is flushed to disk and renamed over ``path``. Missing parent
    folders are created. On any failure the temporary file is removed and ``path`` is left as it was. The new
    file gets the usual permissions (``0o666`` less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def json_default(obj: Any) -> Any:
    """``default=`` for :func:`json.dump`: numpy scalars and arrays as Python numbers and lists, paths as str."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

"""Small file helpers shared by the data layer, the metrics and the driver: atomic writes and JSON encoding.

Standard library (and :mod:`trainables.errors`) only at import time (the command line imports this through
``study.layout``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from trainables.errors import ConfigError, UserError

__all__ = ["json_default", "read_json", "read_text", "read_yaml", "write_text_atomic"]


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
    except OSError as exc:  # disk full at flush/fsync carries no file name: name the file being written
        tmp.unlink(missing_ok=True)
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
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


def read_text(path: str | os.PathLike, *, what: str, remedy: str = "") -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 is a :class:`~trainables.errors.UserError` naming it
    (``what``: the kind of file, ``remedy``: what the user can do). OS errors (missing, permission) propagate:
    the command line turns them into one line naming the path."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: {what} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})"
                        + (f"; {remedy}" if remedy else "")) from None


def read_json(path: str | os.PathLike, *, what: str, remedy: str = "") -> Any:
    """Parsed JSON of ``path``; not UTF-8 or not JSON (a truncated write, a hand edit) is a UserError naming
    the file, where it broke and ``remedy``."""
    text = read_text(path, what=what, remedy=remedy)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: {what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
                        + (f"; {remedy}" if remedy else "")) from None


def read_yaml(path: str | os.PathLike, *, what: str, remedy: str = "") -> Any:
    """Parsed YAML of ``path`` (safe loader) that refuses a key given twice in one mapping, which PyYAML
    silently resolves to the last value; errors are :class:`~trainables.errors.ConfigError` naming the file,
    the key and its line."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:  # a list or mapping as a key: PyYAML's own error names it below
                break
            if key in seen:
                raise ConfigError(f"{path}: duplicate key {key!r} at line {line} (first at line {seen[key]}); "
                                  "YAML keeps only the last one, so remove one of them")
            seen[key] = line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    text = read_text(path, what=what, remedy=remedy)
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}" + (f"; {remedy}" if remedy else "")) from None


def why_unreadable(path: str | os.PathLike, *, folder: bool = False) -> str:
    """Why ``path`` cannot be used as an input, in words: ``not found``, ``exists but cannot be read
    (permission denied)``, ``cannot be reached (no permission on a folder of its path)``, ``is a folder`` ... (an
    input that exists is never reported as missing)."""
    import errno

    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "cannot be reached (no permission on a folder of its path)"
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        if exc.errno == errno.ENOTDIR:
            return "not found (a part of its path is a file, not a folder)"
        return "not found"
    import stat

    if folder and not stat.S_ISDIR(st.st_mode):
        return "is a file, not a folder"
    if not folder and stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    if not os.access(p, os.R_OK | (os.X_OK if folder else 0)):
        return "exists but cannot be read by this user (permission denied; fix its mode or owner)"
    return "cannot be read"

"""The one atomic writer and the one JSON ``default=`` (trainables.io_utils)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from trainables import io_utils
from trainables.io_utils import json_default, write_text_atomic


def test_write_text_atomic_creates_parents_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b" / "state.json"
    write_text_atomic(path, "one")
    write_text_atomic(path, "twö")
    assert path.read_text(encoding="utf-8") == "twö"
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_text_atomic_failure_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch):
    path = tmp_path / "x.txt"
    path.write_text("old")
    seen = []

    def fail(src, dst):
        seen.append(Path(src).name)
        raise OSError("disk full")

    monkeypatch.setattr(io_utils.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]
    assert seen[0].startswith(f".x.txt.{os.getpid()}.") and seen[0].endswith(".tmp")


def test_json_default():
    doc = {"i": np.int64(3), "f": np.float32(0.5), "a": np.arange(3), "p": Path("/d/x")}
    want = {"i": 3, "f": 0.5, "a": [0, 1, 2], "p": "/d/x"}
    assert json.loads(json.dumps(doc, default=json_default)) == want
    with pytest.raises(TypeError, match="set is not JSON serialisable"):
        json.dumps({"s": {1}}, default=json_default)

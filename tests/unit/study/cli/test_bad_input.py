"""The bad-input battery: every sub-command fed what a careful new user gets wrong.

One table, one row per bad input. Each row builds its input in a fresh folder, runs ``study ...`` in-process,
and asserts the exit code (2 for bad input), that every expected piece of the message is on stderr (the file,
key or case at fault), that no traceback was printed, and that the folder is exactly as it was (nothing half
made, nothing that blocks the corrected command). Rows marked ``warn`` are inputs that must be accepted with a
warning instead.

``python -m tests.unit.study.cli.test_bad_input`` runs the same table outside pytest and prints a tally per outcome (clean,
poor message, traceback, accepted, wrote files): the before/after measurement of the battery. Rows that a broken
build accepts can start a whole study; the tally stops each row after 40 s (such a row then shows as "accepted").
Rows with a ``patch`` run with the filesystem made to fail (a full disk, a refused permission) while the command
runs, since this suite runs as root, where permissions do not bind.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.helpers import snapshot

DEMO = """\
name: demo
data:
  source: phantom
  phantom: {cases: 16, seed: 0, shape: [48, 64, 64]}
model: {width: 0.125}
training:
  epochs: 4
  iterations: 2
  batch_size: 2
  patch_size: [32, 32, 32]
  lr_schedule: {milestones: [3], gamma: 0.1}
  sampler_workers: 1
inference: {window: [48, 64, 64], stride: [48, 64, 64]}
search:
  losses:
    dice: {iw: [false, true]}
  seeds: [0]
resources: {cpu: 1, gpu: 0}
"""


def _demo(**changes) -> dict:
    """The demo YAML as data, with dotted-key ``changes`` (``{"training.epochs": 0}``)."""
    data = yaml.safe_load(DEMO)
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = data
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return data


def _write(p: Path, text: str | bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _space(tmp: Path, text: str | dict | bytes, name: str = "space.yaml") -> str:
    if isinstance(text, dict):
        text = yaml.safe_dump(text, sort_keys=False)
    return str(_write(tmp / "in" / name, text))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ built inputs


def _image(path: Path, shape=(8, 16, 16), value=None, dtype="float32", spacing=(2.0, 1.0, 1.0)) -> Path:
    import numpy as np
    import SimpleITK as sitk

    arr = np.zeros(shape, dtype=dtype) if value is None else np.full(shape, value, dtype=dtype)
    if value is None and dtype == "uint8":
        arr[2:5, 4:9, 4:9] = 1
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing[::-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _manifest(tmp: Path, rows: list[dict] | None = None, *, header="case_id,image,mask,split", name="cases.csv",
              images: bool = True) -> str:
    """A manifest CSV with one case per split (images written unless ``images`` is False)."""
    d = tmp / "in" / "raw"
    if rows is None:
        rows = [{"case_id": f"c{i}", "image": f"c{i}.nii.gz", "mask": f"c{i}-mask.nii.gz", "split": s}
                for i, s in enumerate(("train", "val", "holdout"))]
    if images:
        for r in rows:
            for col in ("image", "mask"):
                f = d / r.get(col, "")
                if r.get(col) and not f.exists() and not r.get(f"_skip_{col}"):
                    _image(f, dtype="uint8" if col == "mask" else "float32")
    cols = header.split(",")
    lines = [header] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    return str(_write(d / name, "\n".join(lines) + "\n"))


def _tiny_cache(tmp: Path, *, lesions_in_train: bool = True) -> str:
    """A prepared cache of three cases (one per split), made by `study data prepare` itself."""
    from trainables.data import prepare_cache

    rows = [{"case_id": f"c{i}", "image": f"c{i}.nii.gz", "mask": f"c{i}-mask.nii.gz", "split": s}
            for i, s in enumerate(("train", "val", "holdout"))]
    man = Path(_manifest(tmp, rows))
    if not lesions_in_train:
        _image(man.parent / "c0-mask.nii.gz", dtype="uint8", value=0)
    out = tmp / "in" / "cache"
    prepare_cache(man, out, preset="none", progress=False)
    return str(out)


def _study(tmp: Path, name: str = "s", *, holdout: bool = False) -> Path:
    """A study folder as `study launch` leaves it before any stage ran (frozen config + state)."""
    from study.layout import StudyDir, StudyState, write_frozen_config
    from study.loader import config_from_dict

    cfg = config_from_dict(_demo(), source="demo.yaml")
    study = StudyDir.of(tmp / "studies", name)
    study.root.mkdir(parents=True)
    write_frozen_config(study, cfg.to_dict())
    state = StudyState.create(study.state_file, name=name, tracking_uri=study.default_tracking_uri())
    if holdout:
        for stage in ("data", "sweep", "select", "retrain", "holdout"):
            state.mark_done(stage)
    return study.root


def _copied_server_study(tmp: Path) -> None:
    """A study launched under ``tmp/orig`` that logs to a tracking server, copied into ``tmp/studies``."""
    import shutil

    root = _study(tmp / "orig")
    data = json.loads((root / "state.json").read_text())
    data["tracking_uri"] = "http://127.0.0.1:9"
    (root / "state.json").write_text(json.dumps(data))
    shutil.copytree(root, tmp / "studies" / "s")


def _edit_state(tmp: Path) -> None:
    root = _study(tmp)
    data = json.loads((root / "state.json").read_text())
    data["stages"] = ["data"]
    (root / "state.json").write_text(json.dumps(data))


def _edit_frozen(tmp: Path) -> None:
    root = _study(tmp)
    (root / "study.yaml").write_text((root / "study.yaml").read_text().replace("epochs: 4", "epochs: 0"))


def _damage(relpath: str, content: str | bytes, **study_kw) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        root = _study(tmp, **study_kw)
        _write(root / relpath, content)
    return setup


def _records(tmp: Path, *, mutate: Callable[[dict], None] | None = None, raw: bytes | None = None) -> str:
    """A records file written by the project's own writer, optionally edited afterwards."""
    import numpy as np

    from trainables.metrics import save_records, volume_records

    gt = np.zeros((8, 16, 16), dtype=bool)
    gt[2:5, 4:9, 4:9] = True
    pred = np.where(gt, 3.0, -3.0).astype("float32")
    path = tmp / "in" / "records.json"
    save_records(path, {"a": volume_records(pred, gt, (1, 1, 1))})
    if mutate is not None:
        data = json.loads(path.read_text())
        mutate(data)
        path.write_text(json.dumps(data))
    if raw is not None:
        path.write_bytes(raw)
    return str(path)


def _set_first_record(key, value):
    def mutate(data):
        cases = data["cases"] if "cases" in data else data
        first = next(iter(cases.values()))
        recs = first["records"] if isinstance(first, dict) else first
        recs[0][key] = value
    return mutate


def _readonly_dir() -> Path | None:
    """A folder nobody may write in, root included (sysfs), or None where this machine lets root write there."""
    p = Path("/sys/kernel")
    try:
        (p / "iw-study-probe").mkdir()
    except OSError:
        return p
    (p / "iw-study-probe").rmdir()
    return None


# ------------------------------------------------------------------------------------------ the table


@dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]]
    expect: tuple[str, ...] = ()  # every piece must be on stderr
    code: int = 2
    warn: bool = False  # accepted (exit 0) with a warning that carries ``expect``
    needs: Callable[[], bool] | None = None  # skip when False
    patch: Callable[[], contextlib.AbstractContextManager] | None = None  # active while the command runs
    tags: tuple[str, ...] = field(default_factory=tuple)


def L(yaml_text: str | dict | bytes, *extra: str) -> Callable[[Path], list[str]]:  # noqa: N802
    """``study launch SPACE`` with the given YAML (dry-run-free: the checks must run before anything is made)."""
    return lambda tmp: ["launch", _space(tmp, yaml_text), "--storage", str(tmp / "studies"), *extra]


def C(*argv, **builders) -> Callable[[Path], list[str]]:  # noqa: N802
    """A command whose ``{name}`` placeholders are filled by ``builders[name](tmp)``; ``{tmp}`` is the folder."""
    def make(tmp: Path) -> list[str]:
        values = {"tmp": str(tmp), "studies": str(tmp / "studies")}
        for k, b in builders.items():
            values[k] = b(tmp)
        return [a.format(**values) for a in argv]
    return make


def _symlink_loop(tmp: Path) -> str:
    """``tmp/loop`` -> ``tmp/loop2`` -> ``tmp/loop``."""
    (tmp / "loop").symlink_to(tmp / "loop2")
    (tmp / "loop2").symlink_to(tmp / "loop")
    return str(tmp / "loop")


_RO = _readonly_dir()
_has_ro = lambda: _RO is not None  # noqa: E731

CASES: list[Case] = [
    # --- the search-space file itself
    Case("space missing", C("launch", "{tmp}/nope.yaml"), ("nope.yaml", "not found")),
    Case("space is a folder", C("launch", "{tmp}"), ("not found",)),
    Case("space not UTF-8", L(b"name: demo\ndescription: caf\xe9\n"), ("space.yaml", "UTF-8")),
    Case("space malformed YAML", L("name: [demo\n"), ("space.yaml", "not valid YAML")),
    Case("space empty", L(""), ("space.yaml", "empty")),
    Case("space is a list", L("- a\n- b\n"), ("space.yaml",)),
    Case("space with a list as a key", L("name: demo\n[a, b]: 1\n"), ("space.yaml", "unhashable")),
    Case("space duplicate top key", L(DEMO + "name: other\n"), ("space.yaml", "duplicate key 'name'")),
    Case("space duplicate nested key", L(DEMO.replace("  epochs: 4\n", "  epochs: 4\n  epochs: 5\n")),
         ("space.yaml", "duplicate key 'epochs'", "line")),
    Case("training: null", L(_demo(training=None)), ("space.yaml", "training", "null")),
    Case("data: null", L(_demo(data=None)), ("space.yaml", "data", "null")),
    Case("search: null", L(_demo(search=None)), ("space.yaml", "search", "null")),
    Case("model: null", L(_demo(model=None)), ("space.yaml", "model", "null")),
    Case("unknown top key", L(_demo(trainin={"epochs": 3})), ("space.yaml", "trainin")),
    Case("unknown nested key", L(_demo(**{"training.epoch": 3})), ("space.yaml", "training.epoch")),
    Case("epochs 0", L(_demo(**{"training.epochs": 0})), ("space.yaml", "training.epochs")),
    Case("epochs negative", L(_demo(**{"training.epochs": -3})), ("space.yaml", "training.epochs")),
    Case("epochs text", L(_demo(**{"training.epochs": "ten"})), ("space.yaml", "training.epochs")),
    Case("epochs 1e12", L(DEMO.replace("epochs: 4", "epochs: 1e12")), ("space.yaml", "training.epochs")),
    Case("epochs 1.0e12 float", L(_demo(**{"training.epochs": 1.0e12})), ("space.yaml", "training.epochs")),
    Case("epochs fractional", L(_demo(**{"training.epochs": 2.5})), ("space.yaml", "training.epochs")),
    Case("iterations 0", L(_demo(**{"training.iterations": 0})), ("space.yaml", "training.iterations")),
    Case("iterations absurd", L(_demo(**{"training.iterations": 10**9})), ("space.yaml", "training.iterations")),
    Case("batch_size 0", L(_demo(**{"training.batch_size": 0})), ("space.yaml", "training.batch_size")),
    Case("patch 2 values", L(_demo(**{"training.patch_size": [32, 32]})), ("space.yaml", "training.patch_size")),
    Case("patch zero", L(_demo(**{"training.patch_size": [0, 32, 32]})), ("space.yaml", "training.patch_size")),
    Case("lr negative", L(_demo(**{"training.optimizer": {"lr": -0.1}})), ("space.yaml", "training.optimizer.lr")),
    Case("lr milestones past the last epoch", L(_demo(**{"training.lr_schedule": {"milestones": [10]}})),
         ("space.yaml", "training.lr_schedule.milestones", "10")),
    Case("lr milestones unsorted", L(_demo(**{"training.epochs": 8, "training.lr_schedule": {"milestones": [6, 3]}})),
         ("space.yaml", "training.lr_schedule.milestones")),
    Case("lr gamma 0", L(_demo(**{"training.lr_schedule": {"milestones": [3], "gamma": 0}})),
         ("space.yaml", "training.lr_schedule.gamma")),
    Case("sampler_workers 1000", L(_demo(**{"training.sampler_workers": 1000})),
         ("space.yaml", "training.sampler_workers")),
    Case("sampler_workers negative", L(_demo(**{"training.sampler_workers": -1})),
         ("space.yaml", "training.sampler_workers")),
    Case("lesion_prob 2", L(_demo(**{"training.lesion_prob": 2})), ("space.yaml", "training.lesion_prob")),
    Case("model width 0", L(_demo(**{"model.width": 0})), ("space.yaml", "model.width")),
    Case("iw clip reversed", L(_demo(iw={"clip": [10, 1]})), ("space.yaml", "iw.clip")),
    Case("unknown loss", L(_demo(**{"search.losses": {"dicee": {}}})), ("space.yaml", "search.losses.dicee")),
    Case("unknown loss parameter", L(_demo(**{"search.losses": {"focal": {"gama": 2}}})),
         ("space.yaml", "search.losses.focal.gama")),
    Case("focal gamma negative", L(_demo(**{"search.losses": {"focal": {"gamma": -1}}})),
         ("space.yaml", "search.losses.focal.gamma")),
    Case("iw on a baseline", L(_demo(**{"search.losses": {"wce": {"iw": [True]}}})),
         ("space.yaml", "search.losses.wce.iw")),
    Case("iw not a bool", L(_demo(**{"search.losses": {"dice": {"iw": ["yes please"]}}})),
         ("space.yaml", "search.losses.dice.iw")),
    Case("no seeds", L(_demo(**{"search.seeds": []})), ("space.yaml", "search.seeds")),
    Case("duplicate seeds", L(_demo(**{"search.seeds": [0, 0]})), ("space.yaml", "search.seeds")),
    Case("no trial", L(_demo(search={"seeds": [0]})), ("space.yaml", "search")),
    Case("unknown paper config", L(_demo(**{"search.configs": ["iw-nope"]})), ("space.yaml", "search.configs")),
    Case("unknown split name", L(_demo(**{"data.train": ["training"]})), ("space.yaml", "data.train", "training")),
    Case("empty split list", L(_demo(**{"data.val": []})), ("space.yaml", "data.val")),
    Case("split used twice", L(_demo(**{"data.val": ["train"]})), ("space.yaml", "data.val", "train")),
    Case("data.source unknown", L(_demo(**{"data.source": "s3"})), ("space.yaml", "data.source")),
    Case("data.path missing", L(_demo(data={"source": "manifest", "path": "nope.csv"})),
         ("space.yaml", "data.path", "nope.csv")),
    Case("data.path not a cache", C("launch", "{space}", "--storage", "{studies}",
                                    space=lambda t: _space(t, _demo(data={"source": "cache", "path": str(t)}))),
         ("space.yaml", "data.path", "cache.json")),
    Case("phantom cases 0", L(_demo(**{"data.phantom.cases": 0})), ("space.yaml", "data.phantom.cases")),
    Case("phantom cases too few for the splits", L(_demo(**{"data.phantom.cases": 2})),
         ("space.yaml", "data.phantom.cases")),
    Case("phantom shape 2 values", L(_demo(**{"data.phantom.shape": [48, 64]})), ("space.yaml", "data.phantom.shape")),
    Case("phantom kind unknown", L(_demo(**{"data.phantom.kind": "brain"})), ("space.yaml", "data.phantom.kind")),
    Case("GPU asked on a machine without one", L(_demo(resources={"cpu": 1, "gpu": 1})),
         ("resources.gpu", "GPU"), needs=lambda: not _has_gpu()),
    Case("more CPUs per trial than the machine", L(_demo(resources={"cpu": 4096, "gpu": 0})),
         ("resources.cpu", "4096")),
    Case("custom resource nobody has", L(_demo(resources={"cpu": 1, "gpu": 0, "custom": {"tpu_v9": 1}})),
         ("resources.custom", "tpu_v9")),
    Case("resources cpu 0", L(_demo(resources={"cpu": 0, "gpu": 0})), ("space.yaml", "resources.cpu")),
    Case("evaluation.baseline unknown", L(_demo(evaluation={"baseline": "gdl"})), ("space.yaml", "evaluation.baseline")),
    Case("strict rule unknown", L(_demo(evaluation={"strict": {"rule": "overlap"}})),
         ("space.yaml", "evaluation.strict.rule")),
    Case("strict threshold 1.5", L(_demo(evaluation={"strict": {"rule": "iou", "threshold": 1.5}})),
         ("space.yaml", "evaluation.strict.threshold")),
    Case("selection metric unknown", L(_demo(selection={"metric": "accuracy"})), ("space.yaml", "selection.metric")),
    Case("scheduler type unknown", L(_demo(scheduler={"type": "hyperband"})), ("space.yaml", "scheduler.type")),
    Case("asha reduction factor 1", L(_demo(scheduler={"type": "asha", "reduction_factor": 1})),
         ("space.yaml", "scheduler.reduction_factor")),
    Case("validation every 0", L(_demo(validation={"every": 0})), ("space.yaml", "validation.every")),
    Case("max_failures negative", L(_demo(failure={"max_failures": -2})), ("space.yaml", "failure.max_failures")),
    # --- launch flags
    Case("--name with a slash", L(DEMO, "--name", "a/b"), ("study name", "a/b")),
    Case("--name empty", L(DEMO, "--name", ""), ("study name",)),
    Case("--data missing", L(DEMO, "--data", "/nonexistent/cache"), ("--data", "/nonexistent/cache")),
    Case("--data folder without cache.json", C("launch", "{space}", "--storage", "{studies}", "--data", "{tmp}",
                                               space=lambda t: _space(t, DEMO)), ("cache.json",)),
    Case("--data manifest missing a column", C("launch", "{space}", "--storage", "{studies}", "--data", "{man}",
                                               space=lambda t: _space(t, DEMO),
                                               man=lambda t: _manifest(t, header="case_id,image,split")),
         ("cases.csv", "mask")),
    Case("--data manifest with a missing image", C(
        "launch", "{space}", "--storage", "{studies}", "--data", "{man}", space=lambda t: _space(t, DEMO),
        man=lambda t: _missing_image_manifest(t)),
         ("c0", "gone.nii.gz")),
    Case("--data manifest with an unknown split", C(
        "launch", "{space}", "--storage", "{studies}", "--data", "{man}", space=lambda t: _space(t, DEMO),
        man=lambda t: _manifest(t, [{"case_id": "c0", "image": "c0.nii.gz", "mask": "c0m.nii.gz", "split": "test"}])),
         ("cases.csv", "test")),
    Case("--data manifest mask does not match image", C(
        "launch", "{space}", "--storage", "{studies}", "--data", "{man}", space=lambda t: _space(t, DEMO),
        man=lambda t: _mismatched_manifest(t)), ("c0", "mask")),
    # passes every check made before the folder exists (headers read) and fails preparing c0 inside the study:
    # the launch removes the folder it made, so the corrected command is not blocked by it
    Case("--data manifest with a non-binary mask", C(
        "launch", "{space}", "--storage", "{studies}", "--data", "{man}", space=lambda t: _space(t, DEMO),
        man=lambda t: _nonbinary_manifest(t)), ("c0", "binary", "was removed")),
    Case("--data manifest with a non-binary mask, new nested --storage", C(
        "launch", "{space}", "--storage", "{tmp}/new/nested/studies", "--data", "{man}",
        space=lambda t: _space(t, DEMO), man=lambda t: _nonbinary_manifest(t)), ("c0", "binary", "was removed")),
    Case("--data manifest not UTF-8", C("launch", "{space}", "--storage", "{studies}", "--data", "{man}",
                                        space=lambda t: _space(t, DEMO),
                                        man=lambda t: str(_write(t / "in" / "m.csv", b"case_id,image\n\xff\xfe\n"))),
         ("m.csv",)),
    Case("--data cache whose train split has no lesion", C(
        "launch", "{space}", "--storage", "{studies}", "--data", "{cache}", space=lambda t: _space(t, DEMO),
        cache=lambda t: _tiny_cache(t, lesions_in_train=False)), ("train", "no lesion")),
    Case("--tracking-uri ftp", L(DEMO, "--tracking-uri", "ftp://host/mlflow"), ("--tracking-uri", "ftp://host/mlflow")),
    Case("--tracking-uri file store", L(DEMO, "--tracking-uri", "file:///tmp/mlruns"), ("--tracking-uri", "file:")),
    Case("--tracking-uri relative sqlite", L(DEMO, "--tracking-uri", "sqlite:///mlflow.db"), ("absolute sqlite",)),
    Case("--tracking-uri a bare path", L(DEMO, "--tracking-uri", "mlflow.db"), ("--tracking-uri", "mlflow.db")),
    Case("--tracking-uri server down", lambda t: L(DEMO, "--tracking-uri", f"http://127.0.0.1:{_free_port()}")(t),
         ("does not answer",)),
    Case("--tracking-uri sqlite in a missing folder", L(DEMO, "--tracking-uri", "sqlite:////nonexistent/dir/m.db"),
         ("--tracking-uri", "/nonexistent/dir")),
    Case("--num-cpus -1", L(DEMO, "--num-cpus", "-1"), ("--num-cpus",)),
    Case("--num-cpus 0", L(DEMO, "--num-cpus", "0"), ("--num-cpus",)),
    Case("--num-cpus text", L(DEMO, "--num-cpus", "many"), ("--num-cpus",)),
    Case("--num-cpus below one trial", L(_demo(resources={"cpu": 2, "gpu": 0}), "--num-cpus", "1"),
         ("resources.cpu", "--num-cpus")),
    Case("--storage is a file", C("launch", "{space}", "--storage", "{f}", space=lambda t: _space(t, DEMO),
                                  f=lambda t: str(_write(t / "in" / "afile", "x"))), ("--storage", "afile")),
    Case("--storage below a file", C("launch", "{space}", "--storage", "{f}/sub", space=lambda t: _space(t, DEMO),
                                     f=lambda t: str(_write(t / "in" / "afile", "x"))), ("--storage", "afile")),
    Case("--storage read-only", C("launch", "{space}", "--storage", str(_RO or "/") + "/studies",
                                  space=lambda t: _space(t, DEMO)), ("--storage",), needs=_has_ro),
    Case("--address with no cluster", lambda t: L(DEMO, "--address", f"127.0.0.1:{_free_port()}")(t),
         ("--address",)),
    Case("study exists", lambda t: (_study(t, "demo"), L(DEMO)(t))[1], ("already exists", "study resume demo")),
    Case("dry run of a bad space", L(_demo(**{"training.epochs": 0}), "--dry-run"), ("training.epochs",)),
    # --- damaged or hand-edited study files
    Case("resume: no such study", C("resume", "nope", "--storage", "{studies}"), ("no study at",)),
    Case("status: no such study", C("status", "nope", "--storage", "{studies}"), ("no study at",)),
    Case("report: no such study", C("report", "nope", "--storage", "{studies}"), ("no study at",)),
    Case("ui: no such study", C("ui", "nope", "--storage", "{studies}"), ("no study at",)),
    *[Case(f"{cmd}: state.json {what}", C(cmd, "s", "--storage", "{studies}", s=_damage("state.json", content)),
           ("state.json", hint))
      for cmd in ("status", "resume", "report")
      for what, content, hint in (("{}", "{}", "study_id"), ("[]", "[]", "object"),
                                  ("truncated", '{"study_id": "ab', "JSON"),
                                  ("not UTF-8", b'{"name": "\xff"}', "UTF-8"))],
    Case("status: state.json stages a list", C("status", "s", "--storage", "{studies}", s=lambda t: _edit_state(t)),
         ("state.json", "stages")),
    *[Case(f"{cmd}: study.yaml {what}", C(cmd, "s", "--storage", "{studies}", s=_damage("study.yaml", content)),
           ("study.yaml", hint))
      for cmd in ("status", "resume")
      for what, content, hint in (("empty", "", "empty"), ("malformed", "name: [x\n", "YAML"),
                                  ("a list", "- 1\n", "study.yaml"))],
    *[Case(f"{cmd}: study.yaml edited to epochs 0", C(cmd, "s", "--storage", "{studies}", s=_edit_frozen),
           ("study.yaml", "training.epochs")) for cmd in ("status", "resume")],
    Case("status: truncated Ray state", C("status", "s", "--storage", "{studies}",
                                          s=_damage("ray/sweep/experiment_state-2026-01-01_00-00-00.json", '{"tri')),
         ("ray/sweep", "experiment_state")),
    Case("status: truncated summary.json", C("status", "s", "--storage", "{studies}",
                                             s=_damage("holdout/summary.json", '{"configs": {', holdout=True)),
         ("summary.json",)),
    Case("report: truncated summary.json", C("report", "s", "--storage", "{studies}",
                                             s=_damage("holdout/summary.json", '{"configs": {', holdout=True)),
         ("summary.json", "study resume")),
    Case("report: wrong-schema summary.json", C("report", "s", "--storage", "{studies}",
                                                s=_damage("holdout/summary.json", '{"configs": 3}', holdout=True)),
         ("summary.json", "configs")),
    Case("status: wrong-schema summary.json", C("status", "s", "--storage", "{studies}",
                                                s=_damage("holdout/summary.json", '[1, 2]', holdout=True)),
         ("summary.json",)),
    Case("report --markdown: truncated summary.json", C("report", "s", "--storage", "{studies}", "--markdown",
                                                        s=_damage("holdout/summary.json", "{", holdout=True)),
         ("summary.json",)),
    Case("status: truncated selection.json", C("status", "s", "--storage", "{studies}",
                                               s=_damage("selection.json", '{"winners": [')),
         ("selection.json",)),
    Case("report before the hold-out", C("report", "s", "--storage", "{studies}", s=_study), ("hold-out",)),
    Case("status: --storage is a file", C("status", "s", "--storage", "{f}",
                                          f=lambda t: str(_write(t / "in" / "afile", "x"))), ("afile",)),
    Case("resume: a copy of a study that logs to a tracking server", C("resume", "s", "--storage", "{studies}",
                                                                        s=lambda t: _copied_server_study(t)),
         ("is a copy of the study at", "same MLflow experiment")),
    # --- study ui
    Case("ui: port 70000", C("ui", "s", "--storage", "{studies}", "--port", "70000", s=_study), ("--port", "70000")),
    Case("ui: port -1", C("ui", "s", "--storage", "{studies}", "--port", "-1", s=_study), ("--port",)),
    Case("ui: port in use", lambda t: _busy_port_argv(t), ("--port",)),
    Case("ui: timeout 0", C("ui", "s", "--storage", "{studies}", "--timeout", "0", s=_study), ("--timeout",)),
    # --- study data phantom / prepare / luna16 / lits
    Case("phantom --out is a file", C("data", "phantom", "--out", "{f}", f=lambda t: str(_write(t / "in" / "f", "x"))),
         ("--out", "/in/f")),
    Case("phantom --out read-only", C("data", "phantom", "--out", str(_RO or "/") + "/ph", "--cases", "3",
                                      "--shape", "16", "16", "16"), ("ph",), needs=_has_ro),
    Case("phantom --cases 0", C("data", "phantom", "--out", "{tmp}/ph", "--cases", "0"), ("--cases",)),
    Case("phantom --cases -4", C("data", "phantom", "--out", "{tmp}/ph", "--cases", "-4"), ("--cases",)),
    Case("phantom --shape two values", C("data", "phantom", "--out", "{tmp}/ph", "--shape", "16", "16"), ("--shape",)),
    Case("phantom --shape zero", C("data", "phantom", "--out", "{tmp}/ph", "--shape", "0", "16", "16"), ("--shape",)),
    Case("phantom --kind unknown", C("data", "phantom", "--out", "{tmp}/ph", "--kind", "brain"), ("--kind",)),
    Case("phantom lidc --lidc-db missing", C("data", "phantom", "--out", "{tmp}/ph", "--kind", "lidc",
                                             "--lidc-db", "{tmp}/no.sqlite"), ("no.sqlite",)),
    Case("prepare: manifest missing", C("data", "prepare", "--manifest", "{tmp}/no.csv", "--out", "{tmp}/c"),
         ("no.csv",)),
    Case("prepare: manifest is a folder", C("data", "prepare", "--manifest", "{tmp}", "--out", "{tmp}/c"),
         ("manifest",)),
    Case("prepare: manifest not UTF-8", C("data", "prepare", "--manifest", "{m}", "--out", "{tmp}/c",
                                          m=lambda t: str(_write(t / "in" / "m.csv", b"case_id\xff\n"))), ("m.csv",)),
    Case("prepare: missing column", C("data", "prepare", "--manifest", "{m}", "--out", "{tmp}/c",
                                      m=lambda t: _manifest(t, header="case_id,image,split")), ("mask",)),
    Case("prepare: duplicate case id", C("data", "prepare", "--manifest", "{m}", "--out", "{tmp}/c",
                                         m=lambda t: _manifest(t, [
                                             {"case_id": "c0", "image": "a.nii.gz", "mask": "am.nii.gz", "split": "train"},
                                             {"case_id": "c0", "image": "b.nii.gz", "mask": "bm.nii.gz", "split": "val"}])),
         ("c0", "duplicate")),
    Case("prepare: image missing", C("data", "prepare", "--manifest", "{m}", "--out", "{tmp}/c",
                                     m=lambda t: _missing_image_manifest(t)), ("c0", "gone.nii.gz")),
    Case("prepare: image unreadable", C("data", "prepare", "--manifest", "{m}", "--out", "{tmp}/c",
                                        m=lambda t: _garbage_image_manifest(t)), ("c0", "cannot be read")),
    Case("prepare: mask does not match image", C("data", "prepare", "--manifest", "{m}", "--out", "{tmp}/c",
                                                 m=lambda t: _mismatched_manifest(t)), ("c0", "mask")),
    Case("prepare: non-binary mask", C("data", "prepare", "--manifest", "{m}", "--out", "{tmp}/c",
                                       m=lambda t: _nonbinary_manifest(t)), ("c0", "binary")),
    Case("prepare: unknown preset", C("data", "prepare", "--manifest", "{m}", "--out", "{tmp}/c", "--preset", "ct",
                                      m=lambda t: _manifest(t)), ("--preset",)),
    Case("prepare: luna16 preset without roi", C("data", "prepare", "--manifest", "{m}", "--out", "{tmp}/c",
                                                 "--preset", "luna16", m=lambda t: _manifest(t)), ("roi",)),
    Case("prepare: --out is a file", C("data", "prepare", "--manifest", "{m}", "--out", "{f}",
                                       m=lambda t: _manifest(t), f=lambda t: str(_write(t / "in" / "f", "x"))),
         ("/in/f",)),
    Case("prepare: --out read-only", C("data", "prepare", "--manifest", "{m}", "--out", str(_RO or "/") + "/c",
                                       m=lambda t: _manifest(t)), ("/c",), needs=_has_ro),
    Case("luna16: --raw missing", C("data", "luna16", "--raw", "{tmp}/nope", "--out", "{tmp}/c"), ("nope",)),
    Case("luna16: --raw is a file", C("data", "luna16", "--raw", "{f}", "--out", "{tmp}/c",
                                      f=lambda t: str(_write(t / "in" / "f", "x"))), ("/in/f",)),
    Case("lits: --raw missing", C("data", "lits", "--raw", "{tmp}/nope", "--out", "{tmp}/c"), ("nope",)),
    Case("lits: --raw has no volume", C("data", "lits", "--raw", "{d}", "--out", "{tmp}/c",
                                        d=lambda t: str(_write(t / "in" / "raw" / "readme.txt", "x").parent)),
         ("volume",)),
    # --- study metrics / compare
    Case("metrics: path missing", C("metrics", "{tmp}/nope.json"), ("nope.json",)),
    Case("metrics: truncated records", C("metrics", "{r}", r=lambda t: _records(t, raw=b'{"cases": {')),
         ("records.json",)),
    Case("metrics: records not UTF-8", C("metrics", "{r}", r=lambda t: _records(t, raw=b'{"\xff": 1}')),
         ("records.json",)),
    Case("metrics: hit_dice 7.5", C("metrics", "{r}", r=lambda t: _records(t, mutate=_set_first_record("hit_dice", 7.5))),
         ("records.json", "hit_dice", "7.5")),
    Case("metrics: hit_dice negative", C("metrics", "{r}",
                                         r=lambda t: _records(t, mutate=_set_first_record("hit_dice", -0.2))),
         ("records.json", "hit_dice")),
    Case("metrics: diameter negative", C("metrics", "{r}",
                                         r=lambda t: _records(t, mutate=_set_first_record("diameter", -3.0))),
         ("records.json", "diameter")),
    Case("metrics: is_tum not a bool", C("metrics", "{r}",
                                         r=lambda t: _records(t, mutate=_set_first_record("is_tum", "maybe"))),
         ("records.json", "is_tum")),
    Case("metrics: a field missing", C("metrics", "{r}",
                                       r=lambda t: _records(t, mutate=_del_first_record("hit_logit"))),
         ("records.json", "hit_logit")),
    Case("metrics: --n-boot negative", C("metrics", "{r}", "--n-boot", "-5", r=lambda t: _records(t)), ("--n-boot",)),
    Case("metrics: --protocol unknown", C("metrics", "{r}", "--protocol", "nope", r=lambda t: _records(t)),
         ("--protocol",)),
    Case("compare: b missing", C("compare", "{r}", "{tmp}/nope.json", r=lambda t: _records(t)), ("nope.json",)),
    Case("compare: a folder without records", C("compare", "{tmp}", "{r}", r=lambda t: _records(t)), ("records",)),
    Case("compare: the same records twice", C("compare", "{r}", "{r}", r=lambda t: _records(t)),
         ("are the same records",)),
    Case("launch: --data a symlink loop", C("launch", "--data", "{loop}", "--storage", "{studies}",
                                            loop=lambda t: _symlink_loop(t)), ("--data", "loop")),
    # --- study predict
    Case("predict: no such study", C("predict", "nope", "--storage", "{studies}", "--input", "{tmp}",
                                     "--output", "{tmp}/out"), ("nope",)),
    Case("predict: input missing", C("predict", "s", "--storage", "{studies}", "--input", "{tmp}/no.nii.gz",
                                     "--output", "{tmp}/out", s=_study), ("no.nii.gz",)),
    Case("predict: study without hold-out", C("predict", "s", "--storage", "{studies}", "--input", "{img}",
                                              "--output", "{tmp}/out", s=_study,
                                              img=lambda t: str(_image(t / "in" / "x.nii.gz"))), ("hold-out",)),
    # --- study slurm
    Case("slurm: space missing", C("slurm", "{tmp}/nope.yaml", "--script", "{tmp}/job.sh"), ("nope.yaml",)),
    Case("slurm: --nodes 0", C("slurm", "{sp}", "--nodes", "0", "--script", "{tmp}/job.sh",
                               sp=lambda t: _space(t, DEMO)), ("--nodes",)),
    Case("slurm: --gpus-per-node -1", C("slurm", "{sp}", "--gpus-per-node", "-1", "--script", "{tmp}/job.sh",
                                        sp=lambda t: _space(t, DEMO)), ("--gpus-per-node",)),
    Case("slurm: --time nonsense", C("slurm", "{sp}", "--time", "soon", "--script", "{tmp}/job.sh",
                                     sp=lambda t: _space(t, DEMO)), ("--time",)),
    Case("slurm: --script in a missing folder", C("slurm", "{sp}", "--script", "{f}/job.sh",
                                                  sp=lambda t: _space(t, DEMO),
                                                  f=lambda t: str(_write(t / "in" / "afile", "x"))), ("afile",)),
    Case("slurm: bad space", C("slurm", "{sp}", "--script", "{tmp}/job.sh",
                               sp=lambda t: _space(t, _demo(**{"training.epochs": 0}))), ("training.epochs",)),
    # --- the filesystem says no
    Case("launch: disk full writing the study", L(DEMO), ("No space left on device", "study.yaml", "was removed"),
         patch=lambda: _failing("os.fsync", errno.ENOSPC)),
    Case("prepare: disk full writing the cache", C("data", "prepare", "--manifest", "{m}", "--out", "{tmp}/c",
                                                   m=lambda t: _manifest(t)),
         ("No space left on device", "/c/"), patch=lambda: _failing("os.fsync", errno.ENOSPC)),
    Case("status: permission denied reading the study", C("status", "s", "--storage", "{studies}", s=_study),
         ("Permission denied", "study.yaml"), patch=lambda: _failing("pathlib.Path.read_text", errno.EACCES)),
    Case("metrics: permission denied reading records", C("metrics", "{r}", r=lambda t: _records(t)),
         ("Permission denied", "records.json"),
         patch=lambda: _failing("trainables.metrics.io.open", errno.EACCES, create=True)),
    # --- accepted with a warning
    Case("prepare: a split without lesions", C("data", "prepare", "--manifest", "{m}", "--out", "{tmp}/c", "--quiet",
                                               m=lambda t: _lesionless_val_manifest(t)),
         ("split 'val'", "has no lesion"), code=0, warn=True),
    Case("patch larger than the volume", L(_demo(**{"data.phantom.shape": [24, 64, 64]}), "--dry-run"),
         ("training.patch_size", "larger than"), code=0, warn=True),
]


@contextlib.contextmanager
def _failing(target: str, err: int, create: bool = False):
    """``target`` (a dotted function) raises the OS error ``err`` while the command runs, as the kernel would."""
    from unittest import mock

    def fail(*args, **kwargs):
        path = next((a for a in args if isinstance(a, (str, os.PathLike))), None)
        raise OSError(err, os.strerror(err), None if path is None else str(path))

    with mock.patch(target, fail, create=create):
        yield


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _del_first_record(key):
    def mutate(data):
        cases = data["cases"] if "cases" in data else data
        first = next(iter(cases.values()))
        recs = first["records"] if isinstance(first, dict) else first
        recs[0].pop(key)
    return mutate


def _missing_image_manifest(tmp: Path) -> str:
    """One case per split; case c0's image is not on disk."""
    man = Path(_manifest(tmp))
    text = man.read_text().replace("c0.nii.gz", "gone.nii.gz")
    man.write_text(text)
    return str(man)


def _lesionless_val_manifest(tmp: Path) -> str:
    man = Path(_manifest(tmp))
    _image(man.parent / "c1-mask.nii.gz", dtype="uint8", value=0)  # c1 is the val case
    return str(man)


def _mismatched_manifest(tmp: Path) -> str:
    man = Path(_manifest(tmp))
    _image(man.parent / "c0-mask.nii.gz", shape=(8, 16, 12), dtype="uint8")
    return str(man)


def _nonbinary_manifest(tmp: Path) -> str:
    man = Path(_manifest(tmp))
    _image(man.parent / "c0-mask.nii.gz", dtype="uint8", value=3)
    return str(man)


def _garbage_image_manifest(tmp: Path) -> str:
    man = Path(_manifest(tmp))
    (man.parent / "c0.nii.gz").write_bytes(b"this is not an image" * 10)
    return str(man)


def _busy_port_argv(tmp: Path) -> list[str]:
    _study(tmp)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    _BUSY.append(sock)  # closed after the row ran
    return ["ui", "s", "--storage", str(tmp / "studies"), "--port", str(sock.getsockname()[1])]


_BUSY: list[socket.socket] = []




# ------------------------------------------------------------------------------------------ running a row


@dataclass
class Outcome:
    code: int | None
    err: str
    traceback: bool
    changed: list[str]


def run_case(case: Case, tmp: Path) -> Outcome:
    """Build the row's input in ``tmp``, run it in-process, and compare ``tmp`` before and after."""
    from study.cli import main

    argv = case.argv(tmp)
    before = snapshot(tmp)
    before_dirs = {str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_dir()}
    err, out = io.StringIO(), io.StringIO()
    code, tb = None, False
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                with case.patch() if case.patch else contextlib.nullcontext():
                    code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
            except Exception as exc:  # an escaped exception is a traceback for the user
                if type(exc).__name__ == "_Hung":
                    raise
                import traceback

                traceback.print_exc(file=err)
                tb = True
                code = 1
    finally:
        os.chdir(cwd)
        while _BUSY:
            _BUSY.pop().close()
    text = err.getvalue()
    tb = tb or "Traceback (most recent call last)" in text
    after = snapshot(tmp)
    after_dirs = {str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_dir()}
    changed = sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
                     | (after_dirs - before_dirs))
    return Outcome(code, text, tb, changed)


def verdict(case: Case, o: Outcome) -> str:
    """clean | traceback | accepted | wrote files | poor message (the battery's categories)."""
    if o.traceback:
        return "traceback"
    if case.warn:
        ok = o.code == 0 and all(e in o.err for e in case.expect)
        return "clean" if ok else "poor message"
    if o.code == 0:
        return "accepted"
    if o.changed:
        return "wrote files"
    if o.code != case.code or not all(e in o.err for e in case.expect):
        return "poor message"
    return "clean"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    if case.needs is not None and not case.needs():
        pytest.skip("not applicable on this machine")
    o = run_case(case, tmp_path)
    assert not o.traceback, o.err
    assert o.code == case.code, f"exit {o.code}; stderr:\n{o.err}"
    for piece in case.expect:
        assert piece in o.err, f"{piece!r} not in stderr:\n{o.err}"
    if not case.warn:
        assert not o.changed, f"the failed command changed {o.changed}"


class _Hung(Exception):
    pass


def _alarm(signum, frame):  # pragma: no cover
    raise _Hung()


def main() -> int:  # pragma: no cover - the battery's tally, for before/after measurements
    import signal

    signal.signal(signal.SIGALRM, _alarm)
    tally: dict[str, list[str]] = {}
    for case in CASES:
        if case.needs is not None and not case.needs():
            tally.setdefault("skipped", []).append(case.id)
            continue
        with tempfile.TemporaryDirectory() as d:
            signal.alarm(40)  # a bad input that is accepted may start a whole study: stop it
            try:
                o = run_case(case, Path(d))
            except _Hung:
                o = Outcome(0, "(still running after 40 s: accepted)", False, ["?"])
            finally:
                signal.alarm(0)
                try:
                    import ray

                    ray.shutdown()
                except Exception:
                    pass
        v = verdict(case, o)
        tally.setdefault(v, []).append(case.id)
        if v != "clean":
            first = o.err.strip().splitlines()[-1:] if o.err.strip() else ["(nothing on stderr)"]
            print(f"{v:13s} {case.id}: exit {o.code}; {first[0][:160]}"
                  + (f"; changed {o.changed[:3]}" if o.changed else ""), file=sys.stderr)
    print(f"\n{len(CASES)} bad inputs: " + ", ".join(f"{k} {len(v)}" for k, v in sorted(tally.items())))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

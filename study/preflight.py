"""Checks a launch makes before the study folder exists.

``study launch`` runs :func:`preflight` after the search space is validated and before it writes anything: the
storage folder can be written, the tracking URI is one MLflow 3 accepts, the data is there (a cache opens and
its training and validation splits hold lesions; a manifest's rows and image headers read), and one trial fits
the machine it will run on (a local Ray: this machine's CPUs and GPUs; a cluster: its address answers). Each
failure is a :class:`~trainables.errors.UserError` naming the flag, file or key, so a wrong launch leaves
nothing behind and the corrected command runs as if it were the first. :func:`warnings` lists what is allowed
but probably not meant (a patch larger than the volumes).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from trainables.config import StudyConfig
from trainables.errors import DataError, UserError


def preflight(cfg: StudyConfig, *, address: str | None, num_cpus: int | None, wait_for_resources: bool) -> None:
    """The data and machine checks of a launch: they need no running Ray and write nothing (``--storage`` and
    ``--tracking-uri`` are checked before, by :func:`check_storage` and ``study.tracking.check_tracking_uri``)."""
    check_data(cfg)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
    elif not wait_for_resources:
        check_local_resources(cfg, num_cpus=num_cpus)


def check_storage(storage: str | os.PathLike) -> None:
    """``--storage`` is (or can become) a folder this process can write."""
    check_output_folder("--storage", storage, purpose="the studies")


def check_output_folder(flag: str, folder: str | os.PathLike, *, purpose: str = "the output") -> None:
    """``folder`` (given by ``flag``) is, or can become, a folder this process can write: its first existing
    ancestor is a folder and a probe folder can be made and removed there. Writes nothing that stays."""
    path = Path(folder).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == path else f"lies below {probe}, which is a file"
        raise UserError(f"{flag} {folder}: {what}, not a folder; pick a folder for {purpose}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".study-write-probe-", dir=probe))
    except OSError as exc:
        raise UserError(f"{flag} {folder}: cannot write in {probe} ({exc.strerror}); pick a folder you can "
                        "write") from None


def check_data(cfg: StudyConfig) -> None:
    """A cache opens and its train/val splits have lesions; a manifest's rows and image headers read."""
    d = cfg.data
    if d.source == "cache":
        from trainables.data import Cache
        from trainables.data.folds import make_folds

        cache = Cache(d.path)
        check_lesions(cache, cfg, where=str(d.path))
        if d.folds:  # K folds possible on these cases (the same split the data stage makes)
            ids = cache.case_ids(list(d.train) + list(d.val))
            make_folds({c: cache.meta(c).get("diameters_mm", []) for c in ids}, d.folds, d.fold_seed)
    elif d.source == "manifest":
        from trainables.data.cache import manifest_sources

        for source in manifest_sources(d.path, preset=d.preset):
            source.preflight()


def check_lesions(cache, cfg: StudyConfig, *, where: str) -> dict[str, int]:
    """The case count of each stage's splits; the train and val splits must hold lesions."""
    d = cfg.data
    counts = {}
    for key in ("train", "val", "holdout"):
        ids = cache.case_ids(list(getattr(d, key)))
        counts[key] = len(ids)
        if key != "holdout" and not any(cache.meta(cid).get("n_lesions", 0) for cid in ids):
            raise DataError(f"data: the {key} split ({', '.join(getattr(d, key))}) of {where} has no lesion: "
                            "training samples lesion-centred patches and validation measures recall")
    return counts


def check_address(address: str, timeout: float = 5.0) -> None:
    """A Ray cluster answers at ``address`` (``host:port`` or ``ray://host:port``; ``auto`` is left to Ray)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected host:port (the Ray head's GCS address, e.g. "
                        "10.0.0.1:6379) or ray://host:10001")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); start it "
                        "(`ray up cluster.yaml`, or `ray start --head` on the head node) or fix the address") from None


def check_local_resources(cfg: StudyConfig, *, num_cpus: int | None) -> None:
    """One trial must fit the local Ray this launch starts (Tune would otherwise wait forever)."""
    res = cfg.resources
    cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
    where = f"--num-cpus {num_cpus}" if num_cpus is not None else f"this machine's {cpus} CPUs"
    if res.cpu > cpus:
        raise UserError(f"resources.cpu: {res.cpu:g} CPUs per trial, but the local Ray has {where}; lower "
                        "resources.cpu, raise --num-cpus, or run on a cluster (--address)")
    if res.gpu > 0:
        from trainables.device import cuda_problem, gpu_message, nvidia_gpus

        problem = cuda_problem()
        if problem is not None:
            listed = nvidia_gpus()
            if listed:  # the driver lists GPUs (Ray counts them) but this torch cannot use them
                raise UserError(f"resources.gpu: {res.gpu:g} GPU per trial: " + gpu_message(
                    problem, given=f"the trials need one of the {len(listed)} NVIDIA GPU(s) its driver lists"))
            raise UserError(f"resources.gpu: {res.gpu:g} GPU(s) per trial, but this machine has 0 GPU(s) torch can "
                            f"use ({problem}); set `resources: {{cpu: N, gpu: 0}}` to train on the CPU, run on a "
                            "cluster with GPU nodes (--address), or pass --wait-for-resources on an autoscaling one")
    if res.custom:
        names = ", ".join(sorted(res.custom))
        raise UserError(f"resources.custom: {names}: a local Ray has no custom resources, so no trial could "
                        "start; remove them, or run on a cluster whose nodes declare them (--address)")


def warnings(cfg: StudyConfig) -> list[str]:
    """Allowed but probably not meant: a training patch larger than the volumes (patches get padded)."""
    out = []
    shapes = _volume_shapes(cfg)
    if shapes:
        patch = cfg.training.patch_size
        larger = sum(any(p > s for p, s in zip(patch, shape)) for shape in shapes)
        if larger * 2 > len(shapes):
            example = next(shape for shape in shapes if any(p > s for p, s in zip(patch, shape)))
            out.append(f"training.patch_size {list(patch)} is larger than {larger} of {len(shapes)} volumes "
                       f"(e.g. {' x '.join(map(str, example))} voxels): those patches are mostly padding; a "
                       "patch at most the volume size trains on more tissue")
    return out


def _volume_shapes(cfg: StudyConfig) -> list[tuple[int, ...]]:
    d = cfg.data
    if d.source == "phantom":  # a lidc chest is resampled by its preset: its prepared shape is not known here
        return [tuple(d.phantom.shape)] * d.phantom.cases if d.phantom.kind == "ellipsoid" else []
    if d.source == "cache":
        from trainables.data import Cache

        cache = Cache(d.path)
        ids = cache.case_ids(list(d.train))
        return [tuple(cache.meta(c)["shape"]) for c in ids]
    return []

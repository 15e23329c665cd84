"""The patch sampler: reproducibility, the paper's sampling rules, padding, the iw map, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainables.data import Batch, Cache, PatchSampler, prepare_cache
from trainables.data.io import write_image
from trainables.data.sampler import centered_box, crop_padded
from trainables.errors import DataError
from trainables.weights import DEFAULT_CLIP, inverse_weights

PATCH = (8, 8, 8)
IMAGE_MIN = 0.25  # the cached images are shifted to [0.25, 1.25] below, to see the image padding value


def _cases():
    two = np.zeros((20, 24, 28), np.uint8)
    two[4:7, 5:8, 6:9] = 1  # lesion of 27 voxels
    two[15, 18, 20] = 1  # lesion of 1 voxel
    one = np.zeros((6, 30, 30), np.uint8)  # thinner than the patch along z
    one[2:4, 10:13, 10:13] = 1
    none = np.zeros((10, 10, 10), np.uint8)
    return {"two": two, "one": one, "none": none}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler")
    lines = ["case_id,image,mask,split"]
    rng = np.random.default_rng(0)
    for case_id, mask in _cases().items():
        image = rng.random(mask.shape).astype(np.float32) + mask
        write_image(image, root / f"{case_id}_img.nii", spacing=(2.0, 1.0, 1.0))
        write_image(mask, root / f"{case_id}_msk.nii", spacing=(2.0, 1.0, 1.0))
        lines.append(f"{case_id},{case_id}_img.nii,{case_id}_msk.nii,train")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    prepare_cache(root / "m.csv", root / "cache", progress=False, required_splits=("train",))
    for case_id in _cases():  # shift to [0.25, 1.25]; the sampler pads with meta's image_min
        folder = root / "cache" / "cases" / case_id
        np.save(folder / "image.npy", np.load(folder / "image.npy") + np.float32(IMAGE_MIN))
        meta = json.loads((folder / "meta.json").read_text())
        meta["image_min"] = IMAGE_MIN
        (folder / "meta.json").write_text(json.dumps(meta))
    return Cache(root / "cache")


def _sampler(cache, **kw) -> PatchSampler:
    args = dict(patch_size=PATCH, batch_size=4, iw=True, seed=3, num_workers=0)
    args.update(kw)
    return PatchSampler(cache, cache.case_ids("train"), **args)


def _same(a: Batch, b: Batch) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_batch_layout(cache):
    s = _sampler(cache, iw=False)
    b = s.batch(0)
    for arr in b:
        assert arr.shape == (4, 1, *PATCH)
    # image and iw map float32; the target in its smallest exact dtype (the losses cast it)
    assert (b.image.dtype, b.target.dtype, b.weight.dtype) == (np.float32, np.uint8, np.float32)
    assert set(np.unique(b.target)) <= {0, 1}
    assert np.all(b.weight == 1.0)
    assert b.image.min() >= IMAGE_MIN


def test_batch_k_depends_only_on_seed_and_k(cache):
    s = _sampler(cache)
    assert _same(s.batch(5), _sampler(cache).batch(5))
    assert not _same(s.batch(5), s.batch(6))
    assert not _same(s.batch(5), _sampler(cache, seed=4).batch(5))


@pytest.mark.parametrize(("workers", "kind"), [(1, "thread"), (3, "thread"), (2, "process")])
def test_stream_is_independent_of_workers(cache, workers, kind):
    ref = _sampler(cache)
    with _sampler(cache, num_workers=workers, worker_type=kind, prefetch=3) as s:
        got = [next(s) for _ in range(7)]
        assert s.state_dict() == {"seed": 3, "next_batch": 7}
    for k, b in enumerate(got):
        assert _same(b, ref.batch(k)), k


def test_patients_in_proportion_to_lesion_count(cache):
    s = _sampler(cache)
    cases = [i["case_id"] for k in range(1500) for i in s.sample_info(k)]
    n = len(cases)
    assert "none" not in cases  # no lesion: never drawn
    frac_two = cases.count("two") / n
    sd = np.sqrt(2 / 3 * 1 / 3 / n)
    assert abs(frac_two - 2 / 3) < 4 * sd, frac_two


@pytest.mark.parametrize("lesion_prob", [0.0, 0.3, 0.5, 1.0])
def test_lesion_centred_fraction_and_uniform_lesion_choice(cache, lesion_prob):
    s = _sampler(cache, lesion_prob=lesion_prob)
    info = [i for k in range(1000) for i in s.sample_info(k)]
    frac = np.mean([i["lesion_centred"] for i in info])
    sd = np.sqrt(max(lesion_prob * (1 - lesion_prob), 1e-9) / len(info))
    assert abs(frac - lesion_prob) <= 4 * sd + 1e-12, frac
    labels = cache.load("two").labels
    centred = [i for i in info if i["lesion_centred"] and i["case_id"] == "two"]
    for i in centred:
        assert labels[i["center"]] > 0
    if centred:  # a lesion is chosen uniformly, not in proportion to its size: the 1-voxel lesion gets ~half
        small = np.mean([labels[i["center"]] == labels[15, 18, 20] for i in centred])
        assert abs(small - 0.5) < 4 * np.sqrt(0.25 / len(centred)), small


def test_lesion_centred_patch_has_lesion_at_its_centre(cache):
    s = _sampler(cache, lesion_prob=1.0)
    for k in range(5):
        b = s.batch(k)
        centre = tuple(p // 2 for p in PATCH)
        assert np.all(b.target[(slice(None), 0, *centre)] == 1)


def test_uniform_centres_fit_or_sit_at_the_image_centre(cache):
    s = _sampler(cache, lesion_prob=0.0)
    seen = set()
    for k in range(300):
        for i in s.sample_info(k):
            shape = cache.load(i["case_id"]).image.shape
            box = centered_box(i["center"], PATCH)
            for a in range(3):
                if shape[a] >= PATCH[a]:
                    assert 0 <= box[a, 0] and box[a, 1] <= shape[a]
                else:
                    assert i["center"][a] == shape[a] // 2
            seen.add((i["case_id"], i["center"]))
    # uniform over every fitting position: "two" has 13 x 17 x 21 of them; many distinct ones are drawn
    assert len({c for c in seen if c[0] == "two"}) > 300


def test_padding_values(cache):
    s = _sampler(cache, lesion_prob=0.0)
    sample = next(
        (k, b, i) for k in range(200) for b, i in enumerate(s.sample_info(k)) if i["case_id"] == "one"
    )
    k, b, _ = sample
    batch = s.batch(k)
    # image z size 6 < 8: centre 3, box [-1, 7): the first and the last patch rows are padding
    for row in (0, 7):
        assert np.all(batch.image[b, 0, row] == IMAGE_MIN)
        assert np.all(batch.target[b, 0, row] == 0)
    assert batch.image[b, 0, 1:7].min() >= IMAGE_MIN


def test_crop_padded():
    a = np.arange(27, dtype=np.int32).reshape(3, 3, 3)
    out = crop_padded(a, np.array([[-1, 2], [1, 4], [2, 3]]), -7)
    assert out.shape == (3, 3, 1)
    assert np.all(out[0] == -7) and np.all(out[:, 2] == -7)
    np.testing.assert_array_equal(out[1:, :2, 0], a[0:2, 1:3, 2])
    assert np.all(crop_padded(a, np.array([[5, 7], [0, 1], [0, 1]]), 9) == 9)


@pytest.mark.parametrize("clip", [DEFAULT_CLIP, None])
def test_weights_equal_inverse_weights_when_no_lesion_crosses_the_border(cache, clip):
    s = _sampler(cache, iw_clip=clip)
    checked = 0
    for k in range(40):
        batch = s.batch(k)
        for b, i in enumerate(s.sample_info(k)):
            labels = cache.load(i["case_id"]).labels
            crop = crop_padded(labels, centered_box(i["center"], PATCH), 0)
            ids = np.unique(crop[crop > 0])
            if all((crop == j).sum() == (labels == j).sum() for j in ids):
                np.testing.assert_allclose(
                    batch.weight[b, 0], inverse_weights(batch.target[b, 0], clip=clip), rtol=1e-6
                )
                checked += 1
                if ids.size:
                    assert batch.weight[b, 0][batch.target[b, 0] > 0].min() > 1.0
    assert checked > 20


def test_state_dict_resume_gives_the_same_continuation(cache):
    with _sampler(cache, num_workers=2) as s:
        it = iter(s)
        for _ in range(5):
            next(it)
        state = s.state_dict()
        assert state == {"seed": 3, "next_batch": 5}
        following = [next(it) for _ in range(3)]
    with _sampler(cache, num_workers=1, seed=state["seed"], start_batch=state["next_batch"]) as resumed:
        again = [next(resumed) for _ in range(3)]
    assert all(_same(a, b) for a, b in zip(following, again))
    s.close()  # idempotent


def test_errors(cache, tmp_path):
    with pytest.raises(DataError, match="none of the 1 case"):
        PatchSampler(cache, ["none"], patch_size=PATCH, batch_size=2, iw=False)
    with pytest.raises(DataError, match="case zz is not in the data cache"):
        PatchSampler(cache, ["two", "zz"], patch_size=PATCH, batch_size=2, iw=False)
    with pytest.raises(DataError, match="patch_size"):
        PatchSampler(cache, ["two"], patch_size=(8, 8), batch_size=2, iw=False)
    with pytest.raises(DataError, match="lesion_prob"):
        PatchSampler(cache, ["two"], patch_size=PATCH, batch_size=2, iw=False, lesion_prob=1.5)


def test_worker_errors_reach_the_consumer(cache, tmp_path):
    def boom(case_id):
        raise RuntimeError(f"boom {case_id}")

    s = _sampler(cache, num_workers=1)
    s._case = boom
    with pytest.raises(RuntimeError, match="boom"), s:
        next(s)


def test_labels_are_reused_from_the_cache_not_recomputed(cache):
    s = _sampler(cache, lesion_prob=1.0)
    s.batch(0)
    voxels, offsets = s._lesion_voxels("two", cache.load("two"))
    assert list(np.diff(offsets)) == [27, 1]
    assert Path(cache.root, "cases", "two", "labels.npy").is_file()


def test_open_cases_are_bounded_and_reopened_transparently(cache, monkeypatch):
    import trainables.data.sampler as sampler_module

    ref = [_sampler(cache).batch(k) for k in range(6)]
    monkeypatch.setattr(sampler_module, "MAX_OPEN_CASES", 1)
    s = _sampler(cache)
    assert all(_same(s.batch(k), b) for k, b in enumerate(ref))
    assert len(s._cases) == 1

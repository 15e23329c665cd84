"""K folds over train ∪ validation: a partition, the same for a seed, lesions of every size in every validation
fold where the data allows, balanced, and bad K refused naming the key and the numbers."""

from __future__ import annotations

import numpy as np
import pytest

from trainables.data.folds import fold_splits, make_folds, size_groups
from trainables.errors import DataError


def _cases(n: int, seed: int = 0, empty: int = 3) -> dict[str, list[float]]:
    """n cases, ``empty`` of them without lesions, the others with 1-6 lesions of 2-30 mm."""
    rng = np.random.default_rng(seed)
    out = {f"c{i:03d}": [] for i in range(empty)}
    for i in range(empty, n):
        out[f"c{i:03d}"] = [float(d) for d in rng.uniform(2, 30, int(rng.integers(1, 7)))]
    return out


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_partition_the_cases_and_are_the_same_for_a_seed(k):
    cases = _cases(40)
    folds = make_folds(cases, k, seed=7)
    flat = [c for f in folds for c in f]
    assert sorted(flat) == sorted(cases) and len(flat) == len(set(flat))  # every case in exactly one fold
    assert make_folds(cases, k, seed=7) == folds
    assert make_folds(dict(reversed(list(cases.items()))), k, seed=7) == folds  # the order of the cases is not used
    assert make_folds(cases, k, seed=8) != folds  # the seed draws
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 2
    for f in range(k):
        train, val = fold_splits(folds, f)
        assert val == folds[f] and sorted(train + val) == sorted(cases) and not set(train) & set(val)


def test_every_validation_fold_holds_lesions_of_every_size_where_the_data_allows():
    cases = _cases(30, seed=3)
    cuts = size_groups([d for ds in cases.values() for d in ds])
    assert len(cuts) == 2
    for k in (2, 3, 4, 5):
        folds = make_folds(cases, k, seed=1)
        for f in folds:
            diam = [d for c in f for d in cases[c]]
            groups = set(np.searchsorted(cuts, diam, side="right").tolist())
            assert groups == {0, 1, 2}, (k, f)
        lesions = [sum(len(cases[c]) for c in f) for f in folds]
        assert max(lesions) - min(lesions) <= max(3, 0.25 * np.mean(lesions)), lesions  # balanced by count
    # a size group with a single case can only be in one fold: the others still get the groups they can
    rare = {"a": [40.0], "b": [3.0], "c": [3.1], "d": [10.0], "e": [10.5], "f": [3.2], "g": [9.0]}
    folds = make_folds(rare, 3, seed=0)
    assert sum("a" in f for f in folds) == 1 and all(sum(len(rare[c]) for c in f) for f in folds)


def test_bad_k_is_refused_naming_the_key_and_the_numbers():
    cases = {"a": [5.0], "b": [], "c": [7.0], "d": []}
    with pytest.raises(DataError, match=r"^data\.folds: 5 folds but train and validation hold 4 case\(s\)"):
        make_folds(cases, 5, seed=0)
    with pytest.raises(DataError, match=r"data\.folds: 3 folds but only 2 of the 4 .* hold lesions: a fold's "
                                        r"validation part would hold no lesion; use at most 2 folds"):
        make_folds(cases, 3, seed=0)
    with pytest.raises(DataError, match="at least 2"):
        make_folds(cases, 1, seed=0)
    assert [len(f) for f in make_folds(cases, 2, seed=0)] == [2, 2]


def test_the_study_folds_file_is_made_once_and_survives_a_resume(tmp_path):
    """The data stage writes folds.json from the cache's lesions; a resumed study (here: run again with another
    fold seed in its config) keeps the file byte for byte; a damaged one is refused, never made again."""
    import json
    from types import SimpleNamespace

    from study.layout import StudyDir
    from study.loader import config_from_dict
    from study.stages.data import write_folds
    from trainables.data import make_phantom, prepare_cache
    from trainables.errors import UserError

    cache = prepare_cache(make_phantom(tmp_path / "p", n_cases=8, seed=0, shape=(16, 24, 24)), tmp_path / "c",
                          preset="none")
    ids = cache.case_ids(["train", "val"])
    space = {"search": {"configs": ["bce"]}}
    folder = StudyDir(tmp_path / "study")
    folder.root.mkdir()
    ctx = SimpleNamespace(cfg=config_from_dict({**space, "data": {"folds": 2, "fold_seed": 3}}), dir=folder)
    write_folds(ctx, cache)
    data = json.loads(folder.folds_file.read_text())
    assert data["seed"] == 3 and data["k"] == 2
    val = [f["val"] for f in data["folds"]]
    assert val == make_folds({c: cache.meta(c).get("diameters_mm", []) for c in ids}, 2, 3)
    assert [sorted(f["train"] + f["val"]) for f in data["folds"]] == [sorted(ids)] * 2
    before = folder.folds_file.read_bytes()
    write_folds(SimpleNamespace(cfg=config_from_dict({**space, "data": {"folds": 2, "fold_seed": 4}}), dir=folder), cache)
    assert folder.folds_file.read_bytes() == before and folder.read_folds() == val
    folder.folds_file.write_text('{"seed": 3, "folds": [')
    with pytest.raises(UserError, match="folds.json.*restore it from a backup"):
        write_folds(ctx, cache)

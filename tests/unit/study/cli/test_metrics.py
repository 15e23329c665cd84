"""``study metrics``: table on a folder, --json fields, bad files -> exit 2 naming the file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from study.cli import main
from trainables.metrics import CaseRecords, load_records, save_records, summarize, volume_records


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["metrics", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_table_on_a_folder_one_row_per_file_sorted(capsys, paper_records_dir):
    rc, out, err = run(capsys, paper_records_dir / "lits", "--protocol", "paper2020")
    assert rc == 0 and err == ""
    rows = [ln.split()[0] for ln in out.splitlines() if ln.endswith(".json") or ".json " in ln]
    names = sorted(p.name for p in (paper_records_dir / "lits").glob("*.json"))
    assert rows == names
    dl = next(ln for ln in out.splitlines() if ln.startswith("dl.json"))
    expected = summarize(load_records(paper_records_dir / "lits" / "dl.json"), "paper2020")
    assert f"{expected['avg_recall']:.3f}" in dl and f"{expected['obj_dice']:.3f}" in dl


def test_json_lines_with_ci_under_luna16(capsys, paper_records_dir):
    rc, out, _ = run(capsys, paper_records_dir / "lits", "--json", "--n-boot", "50", "--seed", "3")
    assert rc == 0
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert len(lines) == 10 and [d["file"] for d in lines] == sorted(d["file"] for d in lines)
    for d in lines:
        for key in (
            "avg_recall",
            "avg_recall_std",
            "obj_dice",
            "obj_dice_std",
            "avg_recall_ci_low",
            "avg_recall_ci_high",
            "fp_per_image",
            "n_images",
            "recall_at",
        ):
            assert d[key] is not None, key
        assert d["protocol"] == "luna16"
        assert d["avg_recall_ci_low"] <= d["avg_recall"] <= d["avg_recall_ci_high"]
    rc, again, _ = run(capsys, paper_records_dir / "lits", "--json", "--n-boot", "50", "--seed", "3")
    assert again == out  # seeded


def test_our_format_with_diagnostics(capsys, tmp_path):
    gt = np.zeros((8, 16, 16), bool)
    gt[2:5, 2:5, 2:5] = True
    pred = np.full(gt.shape, -3.0, np.float32)
    pred[2:5, 2:6, 2:5] = 2.0
    pred[6:8, 10:12, 10:12] = 1.0
    rs = {"a": volume_records(pred, gt, (1, 1, 1)), "b": CaseRecords([], n_voxels=gt.size, n_pred_positive=0)}
    path = tmp_path / "ours.json"
    save_records(path, rs, meta={"rule": "any"})
    rc, out, _ = run(capsys, path, "--json", "--n-boot", "20")
    d = json.loads(out)
    assert rc == 0 and d["file"] == "ours.json"
    assert d["pred_positive_fraction"] == pytest.approx((36 + 8) / (2 * gt.size))
    assert d["fp_per_image"] == 0.5 and d["n_images"] == 2
    assert all(v is None or math.isfinite(v) for v in d["recall_at"].values())


BAD = {
    "not_json.json": "{oops",
    "missing_field.json": '{"c": [{"is_tum": true, "diameter": 1.0, "hit_dice": 0.0, "self_logit": 1.0}]}',
    "nan_confidence.json": '{"c": [{"is_tum": false, "diameter": 1.0, "hit_dice": 0.0, "hit_logit": -Infinity,'
    ' "self_logit": NaN}]}',
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_exit_2_naming_the_file(capsys, tmp_path, name):
    path = tmp_path / name
    path.write_text(BAD[name])
    rc, out, err = run(capsys, path)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and str(path) in err


def test_bad_file_in_a_folder_and_missing_paths(capsys, tmp_path, paper_records_dir):
    (tmp_path / "a_good.json").write_text((paper_records_dir / "lits" / "dl.json").read_text())
    (tmp_path / "b_bad.json").write_text(BAD["nan_confidence.json"])
    rc, _, err = run(capsys, tmp_path, "--n-boot", "10")
    assert rc == 2 and str(tmp_path / "b_bad.json") in err
    rc, _, err = run(capsys, tmp_path / "nothing.json")
    assert rc == 2 and "nothing.json" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(capsys, empty)
    assert rc == 2 and "no *.json" in err


# ------------------------------------------------------------------------------------------------ compare

INF = math.inf


def _rs(found: list[list[bool]], fps: list[int]) -> dict:
    recs = {}
    for c, (hits, k) in enumerate(zip(found, fps)):
        lesions = [{"is_tum": True, "diameter": 5.0, "hit_dice": 0.8 if h else 0.0, "hit_logit": 2.0 if h else -INF,
                    "self_logit": INF} for h in hits]
        comps = [{"is_tum": False, "diameter": 3.0, "hit_dice": 0.0, "hit_logit": -INF, "self_logit": 1.0,
                  "hit_obj": None} for _ in range(k)]
        recs[f"c{c}"] = CaseRecords(lesions + comps)
    return recs


def _study_folders(tmp_path):
    """holdout/<config>/s<seed>/records_{any,strict}.json for plain and iw, two seeds, four cases."""
    plain = {0: _rs([[True, False], [False, False], [True, True], [False, True]], [0, 1, 0, 0]),
             1: _rs([[True, False], [False, False], [True, False], [False, True]], [0, 0, 0, 1])}
    iw = {0: _rs([[True, True], [True, False], [True, True], [True, True]], [2, 3, 1, 2]),
          1: _rs([[True, True], [False, False], [True, True], [True, True]], [1, 2, 3, 2])}
    for name, sets in (("dice", plain), ("iw-dice", iw)):
        for seed, rs in sets.items():
            for rule in ("any", "strict"):
                save_records(tmp_path / name / f"s{seed}" / f"records_{rule}.json", rs,
                             meta={"hit_rule": ["any", None] if rule == "any" else ["iou", 0.3]})
    return plain, iw


def test_compare_folders_of_seeds_json(tmp_path, capsys):
    plain, iw = _study_folders(tmp_path)
    rc = main(["compare", str(tmp_path / "dice"), str(tmp_path / "iw-dice"), "--json", "--n-boot", "200"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["n_seeds"] == 2 and out["n_cases"] == 4
    # no FP has a confidence above a hit: avg recall = fraction found; plain 4/8 and 3/8, iw 7/8 and 6/8
    assert out["avg_recall"]["per_seed"] == pytest.approx([3 / 8, 3 / 8])
    assert out["avg_recall"]["delta"] == pytest.approx(3 / 8)
    assert out["fp_per_image"]["per_seed"] == pytest.approx([8 / 4 - 1 / 4, 8 / 4 - 1 / 4])
    for metric in ("avg_recall", "obj_dice", "fp_per_image"):
        assert set(out[metric]) == {"delta", "ci_low", "ci_high", "per_seed"}
        assert out[metric]["ci_low"] <= out[metric]["delta"] <= out[metric]["ci_high"]
    rc = main(["compare", str(tmp_path / "dice" / "s0" / "records_strict.json"),
               str(tmp_path / "iw-dice" / "s0" / "records_strict.json")])
    text = capsys.readouterr().out
    assert rc == 0 and "1 seed(s), 4 cases" in text and "avg_recall" in text and "+0.375" in text


def test_compare_refuses_other_cases_and_other_rules(tmp_path, capsys):
    _study_folders(tmp_path)
    a = tmp_path / "dice" / "s0" / "records_any.json"
    other = tmp_path / "other.json"
    save_records(other, _rs([[True]], [0]), meta={"hit_rule": ["any", None]})
    assert main(["compare", str(a), str(other)]) == 2
    err = capsys.readouterr().err
    assert str(a) in err and str(other) in err and "different cases" in err
    strict = tmp_path / "iw-dice" / "s0" / "records_strict.json"
    assert main(["compare", str(a), str(strict)]) == 2
    err = capsys.readouterr().err
    assert str(a) in err and str(strict) in err and "different hit rules" in err
    for same in ((a, a), (tmp_path / "dice", tmp_path / "dice")):  # X vs X: refused, not "+0.000 everywhere"
        assert main(["compare", *map(str, same)]) == 2
        assert "are the same records" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ protocols


def test_a_registered_protocol_reaches_summaries_and_the_cli(capsys, tmp_path):
    from trainables.metrics import PROTOCOLS, Protocol, register_protocol, size_groups

    def toy(objs, *, n_boot=1000, whole_cases=None):
        return {"protocol": "toy", "n_images": objs.n_cases, "n_lesions": int(objs.les_case.size), "n_boot": n_boot,
                "whole_cases": whole_cases, **dict.fromkeys(("avg_recall", "avg_recall_std", "obj_dice",
                                                           "obj_dice_std", "fp_per_image", "pred_positive_fraction"))}

    register_protocol(Protocol("toy", toy, doc="counts only", options=("n_boot",), resampling="none ({n_boot})",
                               group_kwargs=lambda whole: {"whole_cases": whole.n_cases}))
    try:
        rs = _rs([[True], [False, True]], [1, 0])
        assert summarize(rs, "toy", n_boot=7, seed=3)["n_boot"] == 7  # seed: not one of its options
        groups = size_groups(rs, cutoffs_mm=4.0, protocol="toy", n_boot=0)
        assert [g["whole_cases"] for g in groups.values()] == [2, 2] and groups["<4 mm"]["n_lesions"] == 0
        with pytest.raises(TypeError, match="unknown summary options"):
            size_groups(rs, cutoffs_mm=4.0, protocol="toy", boot=0)
        path = tmp_path / "r.json"
        save_records(path, rs)
        rc, out, _ = run(capsys, path, "--protocol", "toy", "--n-boot", "5")
        assert rc == 0 and out.startswith("protocol: toy (none (5))") and "95% CI" not in out
        with pytest.raises(SystemExit):
            main(["metrics", "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "{luna16,paper2020,toy}" in help_text and "toy: counts only" in help_text
    finally:
        PROTOCOLS.pop("toy")

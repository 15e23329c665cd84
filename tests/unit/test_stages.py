"""Driver logic without Ray: winner selection, the report's tables and files."""

from __future__ import annotations

import pytest

from study.config import config_from_dict
from study.report import build_blocks, render_html, render_markdown, write_report
from study.stages import holdout_table, select_winners, size_group_names, trial_summary, trial_table
from study.tuner import TrialOutcome
from trainables.naming import config_name, trial_slug


def _outcome(tid, loss, iw, params, seed, recall, dice=0.5, status="TERMINATED", history=None):
    return TrialOutcome(tid, {"loss": loss, "iw": iw, "params": params, "seed": seed}, status,
                        {"val_avg_recall": recall, "val_obj_dice": dice}, None, None, history or [])


def _cfg(**selection):
    return config_from_dict({"search": {"losses": {"focal": {"iw": [False, True], "alpha": [0.25, 0.75]}},
                                        "seeds": [0, 1]}, "selection": selection})


def test_per_config_selection_averages_seeds_and_skips_errors():
    a25, a75 = {"alpha": 0.25, "gamma": 2.0}, {"alpha": 0.75, "gamma": 2.0}
    results = [
        _outcome("t1", "focal", False, a25, 0, 0.9), _outcome("t2", "focal", False, a25, 1, 0.1),  # mean 0.5
        _outcome("t3", "focal", False, a75, 0, 0.6), _outcome("t4", "focal", False, a75, 1, 0.6),  # mean 0.6
        _outcome("t5", "focal", True, a25, 0, 0.7), _outcome("t6", "focal", True, a25, 1, 0.7),
        _outcome("t7", "focal", True, a75, 0, 0.99, status="ERROR"), _outcome("t8", "focal", True, a75, 1, 0.8),
    ]
    sel = select_winners(results, _cfg(mode="per-config"))
    winners = {(w["loss"], w["iw"]): w for w in sel["winners"]}
    assert winners[("focal", False)]["params"] == a75 and winners[("focal", False)]["score"] == pytest.approx(0.6)
    # the errored seed of alpha 0.75 is excluded: 0.8 on one seed beats 0.7 averaged
    assert winners[("focal", True)]["params"] == a75 and winners[("focal", True)]["score"] == pytest.approx(0.8)
    assert [e["trial"]["seed"] for e in sel["excluded"]] == [0]


def test_top_k_and_best_scope():
    a25, a75 = {"alpha": 0.25, "gamma": 2.0}, {"alpha": 0.75, "gamma": 2.0}
    hist = [{"val_avg_recall": 0.95}, {"val_avg_recall": 0.2}]
    results = [_outcome("t1", "focal", False, a25, 0, 0.2, history=hist), _outcome("t2", "focal", True, a75, 0, 0.5)]
    last = select_winners(results, _cfg(mode="top-k", k=1))
    assert [w["iw"] for w in last["winners"]] == [True]
    best = select_winners(results, _cfg(mode="top-k", k=1, scope="best"))
    assert [w["iw"] for w in best["winners"]] == [False]  # 0.95 at an earlier epoch


def test_ties_break_by_object_dice_then_grid_order():
    p = {"alpha": 0.25, "gamma": 2.0}
    q = {"alpha": 0.75, "gamma": 2.0}
    results = [_outcome("t1", "focal", False, p, 0, 0.5, dice=0.3), _outcome("t2", "focal", False, q, 0, 0.5, dice=0.6)]
    assert select_winners(results, _cfg())["winners"][0]["params"] == q


def _summary():
    def s(recall, dice, lo=None, hi=None):
        return {"avg_recall": recall, "avg_recall_std": 0.01, "avg_recall_ci_low": lo, "avg_recall_ci_high": hi,
                "obj_dice": dice, "obj_dice_std": None if dice is None else 0.1, "fp_per_image": 1.5,
                "pred_positive_fraction": 0.02, "froc": {"fps": [0, 1, 2], "recall": [0, 0.5, 0.6]},
                "froc_band": None}
    configs = {}
    for label, iw, recall, dice in (("dice/s0", False, 0.4, 0.7), ("iw-dice/s0", True, 0.6, None)):
        configs[label] = {"trial_id": label, "loss": "dice", "iw": iw, "params": {}, "seed": 0,
                          "config": config_name("dice", iw), "luna16": s(recall, dice, recall - 0.1, recall + 0.1),
                          "paper2020": s(recall, dice), "strict": s(recall / 2, dice),
                          "size_groups": {"<5.0 mm": s(0.1, None), ">=5.0 mm": s(0.9, 0.7)}}
    paired = [{"loss": "dice", "seed": 0, "plain": "dice/s0", "iw": "iw-dice/s0",
               "avg_recall": {"diff": 0.2, "ci_low": 0.05, "ci_high": 0.35, "p_value": 0.01},
               "obj_dice": {"diff": None, "ci_low": None, "ci_high": None, "p_value": None}}]
    return {"study": "x", "size_cutoffs_mm": [5.0], "configs": configs, "paired": paired,
            "diameters_mm": {"train": [3.0, 8.0], "holdout": [4.0, 9.0]}, "strict_rule": ["iou", 0.3]}


def test_report_tables_carry_every_number_and_missing_values():
    blocks = build_blocks(_summary(), {"froc": "froc.png"}, study_name="x", cfg=None)
    md = render_markdown(blocks)
    assert "| dice/s0 | 0.400 [0.300, 0.500] | 0.700 ± 0.100 | 1.50 | 0.0200 | 0.200 | 0.400 ± 0.010 |" in md
    assert "| iw-dice/s0 | 0.600 [0.500, 0.700] | – ± – |" in md
    assert "| dice | dice/s0 | iw-dice/s0 | +0.200 [0.050, 0.350] | 0.010 | – | – |" in md
    assert "IoU ≥ 0.3" in md and "![" in md
    page = render_html(blocks, "x")
    assert page.count("<table>") == 3 and "<img src='froc.png'" in page


def test_write_report_files(tmp_path):
    files = write_report(_summary(), tmp_path, study_name="x")
    names = sorted(f.name for f in files)
    assert names == ["diameters.png", "froc.png", "report.html", "report.md", "size_groups.png"]
    assert all(f.stat().st_size > 0 for f in files)
    assert "Hold-out results" in (tmp_path / "report.md").read_text()


def test_console_table_and_names():
    text = holdout_table(_summary())
    assert "iw-dice/s0" in text and "0.600 [0.500, 0.700]" in text and "strict = iou 0.3" in text
    assert size_group_names(2) == ["small", "large"] and size_group_names(3)[1] == "medium"
    assert trial_slug("iw-focal[alpha=0.75,gamma=2]/s0") == "iw-focal_alpha-0.75_gamma-2_s0"


def test_trial_summary_reads_best_and_last_from_the_history():
    hist = [{"val_avg_recall": 0.2}, {"val_avg_recall": 0.7}, {"val_avg_recall": 0.4}]
    r = TrialOutcome("t1", {"loss": "dice", "iw": True, "params": {}, "seed": 0}, "TERMINATED",
                     {"epoch": 2, "epochs": 3, "val_avg_recall": 0.4, "val_obj_dice": 0.5, "train_loss": 0.1},
                     None, None, hist)
    s = trial_summary(r)
    assert (s["best_val_avg_recall"], s["last_val_avg_recall"], s["epochs_done"], s["epochs_reported"]) == (
        0.7, 0.4, 3, 3)
    table = trial_table([r])
    assert "iw-dice/s0" in table and "3/3" in table and "0.700" in table and "0.400" in table


def test_iw_pairs_prefer_the_same_parameters_then_fall_back_to_the_plain_winner():
    from study.stages import iw_pairs

    def c(loss, iw, seed, **params):
        return {"loss": loss, "iw": iw, "seed": seed, "params": params}

    configs = {
        "focal[a=0.5]/s0": c("focal", False, 0, alpha=0.5),   # the plain winner picked alpha 0.5
        "iw-focal[a=0.75]/s0": c("focal", True, 0, alpha=0.75),  # the iw winner 0.75: fallback pairing
        "bce/s0": c("bce", False, 0), "bce/s1": c("bce", False, 1),
        "iw-bce/s0": c("bce", True, 0), "iw-bce/s1": c("bce", True, 1),  # exact pairs, seed by seed
        "dice[x=1]/s0": c("dice", False, 0, x=1), "dice[x=2]/s0": c("dice", False, 0, x=2),
        "iw-dice[x=2]/s0": c("dice", True, 0, x=2),  # exact match preferred over the other plain dice
        "iw-asl/s0": c("asl", True, 0),  # no plain asl: no pair
        "iw-bce/s2": c("bce", True, 2),  # no plain bce of seed 2: never paired across seeds
    }
    pairs = sorted(iw_pairs(configs))
    assert pairs == [("bce", 0, "bce/s0", "iw-bce/s0"), ("bce", 1, "bce/s1", "iw-bce/s1"),
                     ("dice", 0, "dice[x=2]/s0", "iw-dice[x=2]/s0"),
                     ("focal", 0, "focal[a=0.5]/s0", "iw-focal[a=0.75]/s0")]


def test_epoch_history_keeps_one_result_per_epoch_and_the_last_measured_value():
    import pandas as pd

    from study.tuner import epoch_history, last_measured

    nan = float("nan")
    # epochs 0..2, validation every 2 epochs; the driver died after epoch 2 and the trial re-ran epoch 2
    df = pd.DataFrame([
        {"epoch": 0, "train_loss": 0.9, "val_avg_recall": nan},
        {"epoch": 1, "train_loss": 0.8, "val_avg_recall": 0.4},
        {"epoch": 2, "train_loss": 0.71, "val_avg_recall": nan},
        {"epoch": 2, "train_loss": 0.7, "val_avg_recall": nan},
    ])
    hist = epoch_history(df)
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    assert hist[2]["train_loss"] == 0.7 and "val_avg_recall" not in hist[2]
    assert last_measured(hist, "val_avg_recall") == 0.4  # not NaN, not a stale copy at epoch 2
    assert last_measured(hist, "val_obj_dice") is None
    outcome = TrialOutcome("t", {}, "TERMINATED", hist[-1], None, None, hist)
    assert outcome.measured("val_avg_recall") == 0.4 and trial_summary(outcome)["last_val_avg_recall"] == 0.4

"""Driver logic without Ray: winner selection, the report's tables and files."""

from __future__ import annotations

import pytest
import torch

from study.loader import config_from_dict
from study.report.document import build_blocks, render_html, render_markdown, write_report
from study.report.tables import holdout_rows, holdout_text, trial_summary, trial_table
from study.report.verdict import sentence
from study.stages.holdout import size_group_names
from study.stages.select import select_winners
from study.tune.tuner import TrialOutcome
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


def _cv_results(scores):
    """(alpha, seed, fold) -> val_avg_recall, as focal trials of a 2-fold sweep."""
    out = []
    for i, ((alpha, seed, fold), v) in enumerate(sorted(scores.items())):
        spec = {"loss": "focal", "iw": False, "params": {"alpha": alpha, "gamma": 2.0}, "seed": seed, "fold": fold}
        out.append(TrialOutcome(f"t{i:02d}", spec, "TERMINATED", {"val_avg_recall": v, "val_obj_dice": 0.5}, None,
                                None, []))
    return out


def test_cross_validated_selection_averages_folds_and_seeds_and_says_when_the_lead_is_within_the_spread():
    cfg = config_from_dict({"search": {"losses": {"focal": {"iw": False, "alpha": [0.25, 0.75]}}, "seeds": [0, 1]},
                            "data": {"folds": 2}})
    a = {(0.25, 0, 0): 0.50, (0.25, 1, 0): 0.70, (0.25, 0, 1): 0.30, (0.25, 1, 1): 0.10}  # folds 0.6, 0.2
    b = {(0.75, 0, 0): 0.45, (0.75, 1, 0): 0.35, (0.75, 0, 1): 0.40, (0.75, 1, 1): 0.30}  # folds 0.4, 0.35
    (w,) = select_winners(_cv_results({**a, **b}), cfg)["winners"]
    assert w["params"]["alpha"] == 0.25 and w["score"] == pytest.approx(0.4)  # mean over folds and seeds
    assert w["fold_scores"] == pytest.approx({"0": 0.6, "1": 0.2})
    assert w["fold_spread"] == pytest.approx(0.2)  # population std of the fold means
    assert w["lead"] == pytest.approx(0.4 - 0.375) and w["lead_within_fold_spread"] is True
    ranking = select_winners(_cv_results({**a, **b}), cfg)["fold_ranking"]
    assert [(r["params"]["alpha"], r["fold_spread"]) for r in ranking] == [(0.25, pytest.approx(0.2)),
                                                                           (0.75, pytest.approx(0.025))]
    low = {k: v - 0.3 for k, v in b.items()}  # the runner-up 0.3 lower: a lead of 0.325 beats the spread
    (w,) = select_winners(_cv_results({**a, **low}), cfg)["winners"]
    assert w["lead"] == pytest.approx(0.325) and w["lead_within_fold_spread"] is False


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
    entry = {"loss": "dice", "plain": "dice", "iw": "iw-dice", "seeds": [0], "n_seeds": 1,
             "metrics": {"avg_recall": _d(0.2, 0.05, 0.35), "avg_recall_strict": _d(0.1, -0.05, 0.2),
                         "obj_dice": _d(None, None, None), "fp_per_image": _d(3.0, 1.0, 5.0)},
             "size_groups": {"<5.0 mm": {"avg_recall": _d(0.3, 0.1, 0.5), "avg_recall_strict": _d(0.0, 0.0, 0.0),
                                         "obj_dice": _d(None, None, None)}}}
    entry["sentence"] = sentence(entry, "IoU ≥ 0.3")
    verdict = {"entries": [entry], "n_boot": 500, "seed": 0, "ci_half_width_avg_recall": 0.14}
    return {"study": "x", "size_cutoffs_mm": [5.0], "configs": configs, "verdict": verdict,
            "diameters_mm": {"train": [3.0, 8.0], "holdout": [4.0, 9.0]}, "strict_rule": ["iou", 0.3]}


def _d(delta, lo, hi, n_cases=4):
    return {"delta": delta, "ci_low": lo, "ci_high": hi, "per_seed": [delta], "n_cases": n_cases}


def test_report_tables_carry_every_number_and_missing_values():
    blocks = build_blocks(_summary(), {"froc": "froc.png"}, study_name="x", cfg=None)
    md = render_markdown(blocks)
    assert "| dice/s0 | 0.400 [0.300, 0.500] | 0.700 ± 0.100 | 1.50 | 0.0200 | 0.200 | 0.400 ± 0.010 |" in md
    assert "| iw-dice/s0 | 0.600 [0.500, 0.700] | – ± – |" in md
    # the report opens with the verdict, generated from the intervals
    assert md.index("## Verdict") < md.index("## Hold-out results")
    assert ("- iw-dice vs dice (1 seed): strict (IoU ≥ 0.3) avg recall +0.10 [-0.05, +0.20], any-rule avg recall "
            "+0.20 [+0.05, +0.35], object Dice undefined, FP/image +3.0 [+1.0, +5.0]: recall under the lenient rule "
            "only: over-segmentation (more FPs or lower object Dice).") in md
    assert "about ±0.14" in md and "4 hold-out cases" in md
    assert "| iw-dice − dice | all lesions | avg recall (any) | +0.200 [0.050, 0.350] | +0.200 |" in md
    assert "| iw-dice − dice | <5.0 mm | object Dice | – | – |" in md
    assert "IoU ≥ 0.3" in md and "![" in md and "p = 0.000" not in md
    page = render_html(blocks, "x")
    assert page.count("<table>") == 3 and "<img src='froc.png'" in page and "<li>iw-dice vs dice" in page


def test_no_placeholder_text_in_a_report_with_or_without_a_baseline():
    """Issue 30: no "(None)" or another placeholder in a report, with no baseline or with one."""
    plain = render_markdown(build_blocks(_summary(), {"froc": "froc.png"}, study_name="x", cfg=None))
    with_baseline = _summary()
    with_baseline["baseline_comparison"] = {**with_baseline["verdict"], "baseline": "dice"}
    md = render_markdown(build_blocks(with_baseline, {"froc": "froc.png"}, study_name="x", cfg=None))
    assert "## Differences from the baseline (dice)" in md and "Differences from the baseline" not in plain
    for text in (plain, md):
        assert not any(bad in text for bad in ("(None)", "None ", " nan", "{", "}")), text


def test_write_report_files(tmp_path):
    files = write_report(_summary(), tmp_path, study_name="x")
    names = sorted(f.name for f in files)
    assert names == ["diameters.png", "froc.png", "report.html", "report.md", "size_groups.png"]
    assert all(f.stat().st_size > 0 for f in files)
    assert "Hold-out results" in (tmp_path / "report.md").read_text()


def test_one_holdout_table_for_the_console_the_status_and_the_report():
    """The console and `study status` print the compact rows, the report the full ones, built by one function
    that names the strict rule one way (the console used to say `iou 0.3` where the status said `IoU ≥ 0.3`)."""
    summary = _summary()
    text = holdout_text(summary)
    assert "iw-dice/s0" in text and "0.600 [0.500, 0.700]" in text and "strict = IoU ≥ 0.3" in text
    full_head, full = holdout_rows(summary)
    head, compact = holdout_rows(summary, compact=True)
    assert full_head[5] == "avg recall (IoU ≥ 0.3)" and len(head) == 5
    for f, c in zip(full, compact):  # the same numbers, fewer columns
        assert (c[0], c[1], c[3], c[4]) == (f[0], f[1], f[3], f[5]) and f[2].startswith(c[2])
    old = {k: v for k, v in summary.items() if k != "strict_rule"}  # a summary from before the rule was kept
    assert "strict = IoU ≥ 0.3" in holdout_text(old)


def test_names():
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
    from study.stages.holdout import iw_pairs

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
    # two iw settings of one loss (an iw.power axis under top-k): a verdict each, both against the plain winner
    strength = {"bce/s0": c("bce", False, 0), "bce/s1": c("bce", False, 1),
                **{f"iw-bce[iw.power={p}]/s{s}": {**c("bce", True, s), "params": {"iw.power": p}}
                   for p in (0.5, 1) for s in (0, 1)}}
    assert sorted(iw_pairs(strength)) == [
        (f"iw-bce[iw.power={p}]", s, f"bce/s{s}", f"iw-bce[iw.power={p}]/s{s}") for p in (0.5, 1) for s in (0, 1)]


def test_epoch_history_keeps_one_result_per_epoch_and_the_last_measured_value():
    import pandas as pd

    from study.tune.tuner import epoch_history, last_measured

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


@pytest.mark.parametrize(("strict", "lenient", "dice", "fp", "seeds", "says"), [
    ((0.1, 0.02, 0.2), (0.2, 0.1, 0.3), (-0.01, -0.05, 0.03), (0.4, -0.1, 0.9), 3,
     "more lesions found under the strict rule, at no resolved delineation cost."),
    ((0.1, 0.02, 0.2), (0.2, 0.1, 0.3), (-0.1, -0.15, -0.05), (2.0, 1.0, 3.0), 3,
     "more lesions found under the strict rule, at a resolved delineation cost, more false positives."),
    ((-0.1, -0.2, -0.05), (0.2, 0.1, 0.3), (-0.1, -0.2, -0.05), (2.0, 1.0, 3.0), 3,
     "fewer lesions found under the strict rule"),
    ((0.0, -0.1, 0.1), (0.4, 0.3, 0.5), (-0.3, -0.4, -0.2), (20.0, 15.0, 25.0), 2,
     "recall under the lenient rule only: over-segmentation"),
    ((0.0, -0.1, 0.1), (0.1, 0.05, 0.15), (0.0, -0.1, 0.1), (0.0, -1.0, 1.0), 2,
     "recall gain under the lenient rule only, not confirmed under the strict rule: not resolved"),
    ((0.05, -0.1, 0.2), (0.05, -0.1, 0.2), (0.0, -0.1, 0.1), (0.0, -1.0, 1.0), 1,
     "not resolved (the strict-rule CI spans 0). One seed: the interval covers the hold-out cases"),
])
def test_verdict_sentences_follow_the_intervals(strict, lenient, dice, fp, seeds, says):
    """The sentence is generated from the intervals alone (a gain only under the strict rule)."""
    entry = {"plain": "bce", "iw": "iw-bce", "n_seeds": seeds,
             "metrics": {"avg_recall_strict": _d(*strict), "avg_recall": _d(*lenient), "obj_dice": _d(*dice),
                         "fp_per_image": _d(*fp)}}
    text = sentence(entry, "IoU ≥ 0.3")
    assert text.startswith(f"iw-bce vs bce ({seeds} seed{'s' * (seeds != 1)}): strict (IoU ≥ 0.3) avg recall")
    assert says in text, text


def test_verdict_sentence_names_resolved_size_groups():
    entry = {"plain": "bce", "iw": "iw-bce", "n_seeds": 3,
             "metrics": {"avg_recall_strict": _d(-0.11, -0.22, -0.01), "avg_recall": _d(0.2, 0.06, 0.36),
                         "obj_dice": _d(-0.24, -0.42, -0.09), "fp_per_image": _d(37.8, 32.0, 44.0)},
             "size_groups": {"<6.0 mm": {"avg_recall_strict": _d(0.15, 0.03, 0.26), "obj_dice": _d(-0.01, -0.2, 0.2)},
                             ">=6.0 mm": {"avg_recall_strict": _d(-0.05, -0.1, 0.02), "obj_dice": _d(0, -0.1, 0.1)}}}
    text = sentence(entry, "IoU ≥ 0.3")
    assert "fewer lesions found under the strict rule" in text
    assert ("By size, resolved under the strict rule: <6.0 mm lesions: strict avg recall +0.15 [+0.03, +0.26], "
            "object Dice -0.01 [-0.20, +0.20].") in text
    assert ">=6.0 mm" not in text  # its strict interval spans 0


@pytest.mark.parametrize("measured,chosen", [
    ({"ncdhw": 0.100, "channels_last": 0.090}, True),  # 10 % faster: channels-last
    ({"ncdhw": 0.100, "channels_last": 0.097}, False),  # within the 5 % margin: the plain layout
    ({"ncdhw": 0.100, "channels_last": 0.120}, False),
])
def test_cpu_layout_is_measured_once_and_kept(tmp_path, monkeypatch, measured, chosen):
    import trainables.timing
    from study.layout import StudyDir, StudyState
    from study.stages.context import StudyContext
    from study.stages.setup import choose_step_setup

    calls = []

    def fake(cfg, trial, **kw):
        calls.append((trial.label, str(kw.get("device"))))
        return measured

    monkeypatch.setattr(trainables.timing, "layout_seconds", fake)
    cfg = config_from_dict({"search": {"configs": ["bce"]}, "resources": {"cpu": 1, "gpu": 0}})
    state = StudyState.create(tmp_path / "state.json", name="s", tracking_uri="sqlite:///x.db")
    ctx = StudyContext(StudyDir(tmp_path), cfg, state)
    choose_step_setup(ctx)
    assert ctx.cfg.model.channels_last is chosen and calls == [("bce/s0", "cpu")]
    assert ctx.cfg.model.compile is False  # torch.compile is off for CPU trials, nothing measured
    again = StudyContext(StudyDir(tmp_path), cfg, StudyState.load(tmp_path / "state.json"))
    choose_step_setup(again)  # a resumed study reads the choice back: no second measurement
    assert again.cfg.model.channels_last is chosen and len(calls) == 1
    fixed = StudyContext(StudyDir(tmp_path), cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"channels_last": True})}), state)
    choose_step_setup(fixed)  # set in the search space: left as it is
    assert fixed.cfg.model.channels_last is True and len(calls) == 1


def test_gpu_layout_and_compile_are_measured_on_a_trial_node_once(tmp_path, monkeypatch):
    """GPU trials: both choices come from one measurement with the trials' resources, are kept in state.json with
    the measured step time, and a resumed study reads them back."""
    import study.stages.setup
    from study.layout import StudyDir, StudyState
    from study.stages.context import StudyContext
    from study.stages.setup import choose_step_setup

    calls = []

    def fake(ctx, need):
        calls.append(dict(need))
        return {"device": "NVIDIA H200", "step_seconds": 0.151,
                "layout": {"channels_last": True, "measured": {"ncdhw": 0.2, "channels_last": 0.15}, "reason": "r"},
                "compile": {"compile": True, "measured": {"eager": 0.15, "compiled": 0.12}, "reason": "r"}}

    monkeypatch.setattr(study.stages.setup, "_measure_on_a_trial_node", fake)
    cfg = config_from_dict({"search": {"configs": ["bce"]}, "resources": {"cpu": 1, "gpu": 1}})
    state = StudyState.create(tmp_path / "state.json", name="s", tracking_uri="sqlite:///x.db")
    ctx = StudyContext(StudyDir(tmp_path), cfg, state)
    choose_step_setup(ctx)
    assert calls == [{"layout": True, "compile": True}]
    assert ctx.cfg.model.channels_last is True and ctx.cfg.model.compile is True
    saved = StudyState.load(tmp_path / "state.json")
    assert saved.data["gpu_step_seconds"] == [0.151] and saved.data["compile"]["compile"] is True
    again = StudyContext(StudyDir(tmp_path), cfg, saved)
    choose_step_setup(again)
    assert len(calls) == 1 and again.cfg.model.compile is True


def test_a_gpu_study_on_a_node_whose_torch_has_no_cuda_stops_before_any_trial(tmp_path, fake_gpu_ray):
    """The launch's check: Ray advertises a GPU (faked: ``ray.init(num_gpus=1)`` on this CPU machine), the
    measurement task gets it, and torch (a CPU build) cannot use it: a UserError (exit 2) naming the node, the
    torch build and the fix, before any trial exists."""

    from study.layout import StudyDir, StudyState
    from study.stages.context import StudyContext
    from study.stages.setup import choose_step_setup
    from trainables.errors import UserError

    cfg = config_from_dict({"search": {"configs": ["bce"]}, "model": {"width": 0.125},
                            "training": {"patch_size": [16, 16, 16]}, "resources": {"cpu": 1, "gpu": 1}})
    state = StudyState.create(tmp_path / "state.json", name="s", tracking_uri="sqlite:///x.db")
    ctx = StudyContext(StudyDir(tmp_path), cfg, state)  # its Ray: the shared one, already up (not closed here)
    with pytest.raises(UserError) as err:
        choose_step_setup(ctx)
    text = str(err.value)
    assert text.startswith("CUDA unusable on node ") and "Ray gave this trial GPU 0" in text
    assert f"torch {torch.__version__} (CUDA build: none)" in text and "install a CUDA build of torch" in text
    assert "layout" not in StudyState.load(tmp_path / "state.json").data  # nothing was chosen


def test_a_finished_stage_whose_output_was_removed_runs_again(tmp_path):
    """The remedy for a damaged selection.json / summary.json is to remove it: `study resume` then runs the stage
    that writes it again (and the stages that read it), and only those."""
    from study.layout import STAGES, StudyDir, StudyState
    from study.stages import redo_missing_outputs
    from study.stages.context import StudyContext

    cfg = config_from_dict({"search": {"configs": ["bce"]}})
    state = StudyState.create(tmp_path / "state.json", name="s", tracking_uri="sqlite:///x.db")
    for stage in STAGES:
        state.mark_done(stage)
    d = StudyDir(tmp_path)
    d.selection_file.write_text("{}")
    (d.report_dir).mkdir()
    (d.report_dir / "report.md").write_text("#")
    redo_missing_outputs(StudyContext(d, cfg, state))  # summary.json is missing: hold-out and report again
    assert [s for s in STAGES if not state.done(s)] == ["holdout", "report"]
    assert [s for s in STAGES if not StudyState.load(tmp_path / "state.json").done(s)] == ["holdout", "report"]
    d.selection_file.unlink()
    redo_missing_outputs(StudyContext(d, cfg, state))
    assert [s for s in STAGES if not state.done(s)] == ["select", "holdout", "report"]


def test_gpu_errors_stop_the_stage_and_mark_it_for_a_rerun(tmp_path):
    """Trials that could not use their GPU: the stage is not done (UserError, exit 2, naming the node's line and
    `study resume`), and state.json remembers it, so the resumed stage runs those trials again; once a run of
    the stage has none, the mark goes."""
    from study.layout import StudyDir, StudyState
    from study.stages.context import StudyContext
    from study.stages.training import _stop_on_gpu_errors
    from study.tune.tuner import TrialOutcome
    from trainables.errors import UserError

    line = "CUDA unusable on node n1: Ray gave this trial GPU 0, but torch 2.13.0+cpu (CUDA build: none) cannot"
    bad = TrialOutcome("t0", {}, "ERROR", {}, None, f"trainables.device.GpuUnavailableError: {line}", [])
    good = TrialOutcome("t1", {}, "TERMINATED", {}, None, None, [])
    nan = TrialOutcome("t2", {}, "ERROR", {}, None, "TrialDivergedError: non-finite training loss", [])
    cfg = config_from_dict({"search": {"configs": ["bce"]}})
    state = StudyState.create(tmp_path / "state.json", name="s", tracking_uri="sqlite:///x.db")
    ctx = StudyContext(StudyDir(tmp_path / "s"), cfg, state)
    with pytest.raises(UserError) as err:
        _stop_on_gpu_errors(ctx, "sweep", [bad, good, nan])
    assert str(err.value).startswith(f"sweep: 1 of 3 trial(s) could not use the GPU they were given, none trained "
                                     f"on the CPU instead: {line}")
    assert "study resume s" in str(err.value)
    assert "sweep" in StudyState.load(tmp_path / "state.json").data["gpu_failed"]
    _stop_on_gpu_errors(ctx, "sweep", [good, nan])  # a diverged trial is the study's result, not a stop
    assert StudyState.load(tmp_path / "state.json").data["gpu_failed"] == {}


def test_a_restored_experiment_reruns_errored_trials_only_when_asked(tmp_path, fake_gpu_ray):
    """What `study resume` relies on after a GPU fix: Tune's restore with resume_errored runs the trials that
    errored before their first result again (from the start), and without it leaves them errored."""
    from ray import tune

    broken = tmp_path / "broken"
    broken.write_text("")

    def trainable(config):
        if broken.exists():
            raise RuntimeError("CUDA unusable on node n1")
        tune.report({"x": config["x"], "training_done": True})

    path = tmp_path / "exp"
    tune.Tuner(trainable, param_space={"x": tune.grid_search([1, 2])},
               run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0,
                                         failure_config=tune.FailureConfig(max_failures=0))).fit()
    broken.unlink()
    tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False).fit()
    states = sorted(t.status for t in tune.ExperimentAnalysis(str(path)).trials)
    assert states == ["ERROR", "ERROR"]
    tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True).fit()
    trials = tune.ExperimentAnalysis(str(path)).trials
    assert sorted(t.status for t in trials) == ["TERMINATED", "TERMINATED"]
    assert sorted(t.last_result["x"] for t in trials) == [1, 2]


def test_a_cache_the_trial_nodes_cannot_read_stops_the_study_before_any_trial(tmp_path, fake_gpu_ray):
    """On a Ray cluster (an address given) a Ray task with one trial's resources opens the cache first: a cache
    the nodes do not see is a UserError (exit 2) naming the node, the cache and the remedy; one they see passes."""
    import socket

    from study.layout import StudyDir, StudyState
    from study.stages.context import StudyContext
    from tests.unit.trainables.data.test_cache import make_dataset
    from trainables.data import prepare_cache
    from trainables.errors import UserError

    cfg = config_from_dict({"search": {"configs": ["bce"]}, "resources": {"cpu": 1, "gpu": 0}})
    state = StudyState.create(tmp_path / "state.json", name="s", tracking_uri="sqlite:///x.db")
    ctx = StudyContext(StudyDir(tmp_path), cfg, state, address="ray://head:10001")  # its Ray: the shared one
    with pytest.raises(UserError) as err:
        ctx.check_cache_on_workers()
    text = str(err.value)
    assert f"the data cache {tmp_path / 'data' / 'cache'} opens on this driver but not on the trial node " \
           f"{socket.gethostname()}: no data cache at" in text
    assert "filesystem shared by all nodes" in text and "rsync" in text and "docs/cluster.md" in text
    prepare_cache(make_dataset(tmp_path / "ds"), tmp_path / "data" / "cache", progress=False)
    ctx.check_cache_on_workers()  # the node reads it now
    local = StudyContext(StudyDir(tmp_path / "other"), cfg, state)  # a local Ray: the driver's node, no check
    local.check_cache_on_workers()

"""Figures: FROC with bands (Fig. 4), size groups (Fig. 3), diameters (Fig. 2) as non-blank PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from trainables.metrics import CLINICAL_CUTOFFS_MM, load_records, size_groups, summarize
from trainables.metrics.plots import plot_diameters, plot_froc, plot_size_groups


def _check_png(path):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something is drawn


def test_plots_from_fixture_summaries(tmp_path, paper_records_dir):
    lits = paper_records_dir / "lits"
    rs = {name: load_records(lits / f"{name}.json") for name in ("dl", "iwdl")}
    curves = {
        "dl": summarize(rs["dl"], n_boot=50),
        "iw-dl": summarize(rs["iwdl"], n_boot=50),
        "paper": summarize(rs["dl"], "paper2020"),
    }
    _check_png(plot_froc(curves, tmp_path / "froc.png", title="LiTS"))
    groups = {
        "dl": size_groups(rs["dl"], terciles=True, n_boot=0),
        "iw-dl": size_groups(rs["iwdl"], terciles=True, n_boot=0),
    }
    _check_png(plot_size_groups(groups, tmp_path / "figs" / "groups.png"))
    diam = [r["diameter"] for c in rs["dl"].values() for r in c.records if r["is_tum"]]
    _check_png(
        plot_diameters(
            {"LiTS": diam, "other": np.array(diam) / 2},
            tmp_path / "d1.png",
            cutoff_mm=CLINICAL_CUTOFFS_MM["lits"],
        )
    )
    _check_png(plot_diameters(diam, tmp_path / "d2.png"))


def test_training_curves_figure(tmp_path):
    from trainables.metrics.plots import plot_training_curves

    rows = [{"epoch": e, "train_loss": 1.0 / (e + 1), **({"val_avg_recall": 0.1 * e, "val_obj_dice": 0.5}
                                                        if e % 2 else {})} for e in range(6)]
    path = plot_training_curves({"dice/s0": rows, "iw-dice/s0": rows, "dice/s1": rows}, tmp_path / "c.png")
    _check_png(path)


def test_figure_names_and_seed_means():
    from study.report import display_names
    from trainables.metrics.plots import seed_aggregate

    labels = ["dice_ce[lambda_ce=1,smooth=1e-05]/s0", "dice_ce[lambda_ce=1,smooth=1e-05]/s1",
              "focal[alpha=0.25,gamma=2]/s0", "focal[alpha=0.75,gamma=2]/s0", "bce/s0"]
    assert display_names(labels) == {labels[0]: "dice_ce/s0", labels[1]: "dice_ce/s1", labels[2]: labels[2],
                                      labels[3]: labels[3], "bce/s0": "bce/s0"}  # two focal settings stay apart
    groups = {"a/s0": {"small": {"avg_recall": 0.2, "obj_dice": 0.5}},
              "a/s1": {"small": {"avg_recall": 0.4, "obj_dice": None}},
              "b/s0": {"small": {"avg_recall": 0.9, "obj_dice": 0.7}}}
    means = seed_aggregate(groups)
    assert means["a"]["small"]["avg_recall"] == pytest.approx(0.3)
    assert means["a"]["small"]["avg_recall_std"] == pytest.approx(0.1)
    assert means["a"]["small"]["obj_dice"] == 0.5 and means["a"]["small"]["obj_dice_std"] is None
    assert means["b"]["small"] == {"avg_recall": 0.9, "avg_recall_std": None, "obj_dice": 0.7, "obj_dice_std": None,
                                   "n_seeds": 1, "n_lesions": None}
    assert means["a"]["small"]["n_seeds"] == 2

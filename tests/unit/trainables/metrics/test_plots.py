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
    from study.report.document import display_names
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


def test_froc_line_reads_the_curve_as_the_metric_does_and_stops_where_the_model_stops(paper_records_dir):
    from trainables.metrics.froc import LUNA_FP_RATES
    from trainables.metrics.plots import froc_line

    s = summarize(load_records(paper_records_dir / "lits" / "dl.json"), n_boot=0)
    x, y = froc_line(s)
    reach = max(s["froc"]["fps"])
    assert x[0] == LUNA_FP_RATES[0] and x[-1] == pytest.approx(min(reach, 8.0))
    for rate in LUNA_FP_RATES:  # on the FP rates the model reaches, the line is the metric's recall_at
        if rate <= reach:
            assert y[np.argmin(abs(x - rate))] == pytest.approx(s["recall_at"][rate])
    # a curve ending before 1 FP/image stops there; one that never reaches 1/8 is a single point at 1/8
    x, y = froc_line({"froc": {"fps": [0.0, 0.5, 0.75], "recall": [0.0, 0.5, 0.8]}})
    assert x[-1] == 0.75 and y[-1] == pytest.approx(0.8) and x.max() == 0.75
    assert y[np.argmin(abs(x - 0.25))] == pytest.approx(0.25)  # linear from the (0, 0) anchor
    x, y = froc_line({"froc": {"fps": [0.0, 0.05], "recall": [0.0, 0.4]}})
    assert list(x) == [0.125] and list(y) == [pytest.approx(0.4)]
    assert [a.size for a in froc_line({"froc": {"fps": [], "recall": []}})] == [0, 0]


def test_froc_figure_one_panel_per_loss_legends_outside_the_data_and_counts_in_the_title(paper_records_dir):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from trainables.metrics.plots import froc_figure

    rs = load_records(paper_records_dir / "lits" / "dl.json")
    s = summarize(rs, n_boot=20)
    fig = froc_figure({"dl/s0": s, "iw-dl/s0": s, "iw-dl/s1": s, "focal/s0": s}, title="t", hit_rule="any")
    FigureCanvasAgg(fig).draw()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["dl", "focal"]
    for ax in panels:  # the legend sits below the axes, not on the curves
        assert ax.get_legend().get_window_extent().y1 < ax.get_window_extent().y0
    assert f"{s['n_images']} cases, {s['n_lesions']} lesions; hit rule: any" in fig._suptitle.get_text()
    labels = [t.get_text() for t in panels[0].get_legend().get_texts()]
    assert labels == [f"dl: {s['avg_recall']:.3f}", f"iw-dl: {s['avg_recall']:.3f} ({s['avg_recall']:.3f}, "
                      f"{s['avg_recall']:.3f})"]


def test_size_group_figure_names_n_per_group_and_draws_zeros():
    from trainables.metrics.plots import size_groups_figure

    g = {"<5 mm": {"avg_recall": 0.0, "obj_dice": None, "n_lesions": 4},
         ">=5 mm": {"avg_recall": 0.5, "obj_dice": 0.7, "n_lesions": 9}}
    fig = size_groups_figure({"dice/s0": g, "iw-dice/s0": g, "iw-dice/s1": {**g, ">=5 mm": {**g[">=5 mm"],
                                                                                         "avg_recall": 0.7}}})
    recall, dice = fig.axes[:2]
    assert [t.get_text() for t in recall.get_xticklabels()] == ["<5 mm\nn = 4", ">=5 mm\nn = 9"]
    assert recall.get_ylabel() and recall.get_xlabel() and dice.get_ylabel()
    assert sum(t.get_text() == "0" for t in recall.texts) == 2  # each zero bar is labelled
    assert sum(t.get_text() == "n/a" for t in dice.texts) == 2  # a missing value is said, not left blank
    # the error bar of iw-dice on >=5 mm recall is the std over its two seeds (0.5 and 0.7): ± 0.1
    segs = [c for c in recall.collections if c.get_segments()]
    lengths = sorted(round(abs(s[1][1] - s[0][1]), 6) for c in segs for s in c.get_segments())
    assert 0.2 in lengths

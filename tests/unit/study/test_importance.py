"""Which hyperparameters mattered: fANOVA shares on scores with a known dependence, the reasons when there is
none, the selection's points, and the report's section and figure."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from study.importance import MIN_POINTS, hyperparameter_points, importance, varying
from study.loader import config_from_dict
from study.report.document import hyperparameter_blocks, render_markdown
from study.stages.select import select_winners
from study.tune.tuner import TrialOutcome


def _points(fn, alphas, gammas, seeds=(0, 1)):
    return [{"params": {"alpha": a, "gamma": g}, "seed": s, "fold": None, "score": fn(a, g, s)}
            for a, g, s in itertools.product(alphas, gammas, seeds)]


def test_the_hyperparameter_the_score_depends_on_gets_the_share():
    alphas, gammas = [0.25, 0.5, 0.75, 0.83], [1.0, 2.0, 3.0]
    out = importance(_points(lambda a, g, s: 3 * a + 0.05 * g + 0.01 * s, alphas, gammas))
    assert out["varying"] == ["alpha", "gamma"] and out["n"] == 24
    assert list(out["importance"]) == ["alpha", "gamma"] and sum(out["importance"].values()) == pytest.approx(1)
    assert out["importance"]["alpha"] > 0.9
    flipped = importance(_points(lambda a, g, s: 0.1 * a + g, alphas, gammas))  # now gamma drives the score
    assert flipped["importance"]["gamma"] > 0.9
    again = importance(_points(lambda a, g, s: 3 * a + 0.05 * g + 0.01 * s, alphas, gammas))
    assert again == out  # seeded: the same shares every time


def test_no_estimate_with_one_varying_hyperparameter_or_too_few_trials():
    one = importance(_points(lambda a, g, s: a, [0.25, 0.5, 0.75], [2.0]))
    assert one["importance"] is None and "one hyperparameter varied" in one["why"]
    few = _points(lambda a, g, s: a + g, [0.25, 0.5], [1.0, 2.0], seeds=(0,))[: MIN_POINTS - 1]
    assert len(few) < MIN_POINTS and f"needs at least {MIN_POINTS}" in importance(few)["why"]
    assert varying(_points(lambda a, g, s: 0.0, [0.5], [2.0])) == []


def test_the_selection_keeps_each_configurations_points_and_the_report_shows_them(tmp_path):
    cfg = config_from_dict({"search": {"losses": {"focal": {"iw": [False, True], "alpha": [0.25, 0.5, 0.75],
                                                            "gamma": [1.0, 2.0]}}, "seeds": [0, 1]}})
    rng = np.random.default_rng(0)
    results = [TrialOutcome(f"t{i:02d}", t.as_dict(), "TERMINATED",
                            {"val_avg_recall": t.params["alpha"] + 0.01 * rng.random(), "val_obj_dice": 0.5},
                            None, None, []) for i, t in enumerate(cfg.trials)]
    sel = select_winners(results, cfg)
    hyper = sel["hyperparameters"]
    assert set(hyper) == {"focal", "iw-focal"} and all(h["n"] == 12 for h in hyper.values())
    assert hyper["focal"]["importance"]["alpha"] > 0.9 and hyper["focal"]["metric"] == "val_avg_recall"
    assert hyperparameter_points(results, "val_avg_recall", lambda r: None) == {}
    summary = {"configs": {}, "search": {"hyperparameters": hyper}}
    text = render_markdown(hyperparameter_blocks(summary))
    assert "## Which hyperparameters mattered" in text
    assert f"| focal | 12 | alpha, gamma | alpha {hyper['focal']['importance']['alpha']:.2f}, gamma " in text
    from trainables.metrics.plots import plot_hyperparameters

    png = plot_hyperparameters({c: h["points"] for c, h in hyper.items()}, tmp_path / "h.png")
    assert png.stat().st_size > 5000

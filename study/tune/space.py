"""Search-space config -> Ray Tune ``param_space``.

The grid is enumerated explicitly (``study.loader.enumerate_trials``): one ``grid_search`` entry per trial,
each holding only the parameters its loss has (γ/α for focal, β for asl), so no trial is duplicated
and Tune's variant-generator state restores exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainables.config import StudyConfig, TrialSpec


def study_payload(cfg: StudyConfig, cache_dir: str) -> dict[str, Any]:
    """The frozen study config as the trials see it (plain data, absolute cache path in ``data.cache_dir``)."""
    payload = cfg.with_cache(cache_dir).to_dict()
    payload.pop("trials", None)
    return payload


def param_space(
    cfg: StudyConfig,
    *,
    trials: Sequence[TrialSpec],
    cache_dir: str,
    stage: str,
    experiment_id: str,
    parent_run_id: str,
    study_id: str,
    folds: list[list[str]] | None = None,
) -> dict[str, Any]:
    """Tune's param space of a stage: one grid entry per trial, the study as the trials see it, and the run
    (stage, splits, epochs, MLflow ids; under ``data.folds`` the sweep's folds, each trial picking its own)."""
    from ray import tune

    if stage == "sweep":
        splits, validate, epochs = list(cfg.data.train), True, cfg.training.epochs
    elif stage == "retrain":
        splits, validate, epochs = list(cfg.data.train) + list(cfg.data.val), False, cfg.epochs_retrain
    else:  # pragma: no cover - programming error
        raise ValueError(f"unknown stage {stage!r}")
    return {
        # under TPE the sweep's trials come from its searcher (study.tune.searcher), round by round
        **({} if stage == "sweep" and cfg.search.algorithm == "tpe"
           else {"trial": tune.grid_search([t.as_dict() for t in trials])}),
        "study": study_payload(cfg, cache_dir),
        "run": {
            "stage": stage,
            "splits": splits,
            "validate": validate,
            "epochs": epochs,
            "experiment_id": experiment_id,
            "parent_run_id": parent_run_id,
            "study_id": study_id,
            **({"folds": [list(f) for f in folds]} if folds is not None and stage == "sweep" else {}),
        },
    }

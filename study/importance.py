"""Which hyperparameters mattered: each configuration's sweep trials as (hyperparameters, validation score) points,
and the importance of every hyperparameter that varied, by Optuna's fANOVA (``optuna.importance``).

Whatever the search algorithm (a grid, random draws), the finished sweep trials of a (loss, iw) configuration are
replayed into an in-memory Optuna study (``create_trial`` with the observed range of every hyperparameter as its
distribution, the selection metric as the value, one trial per seed and fold) and
``get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))`` gives each varying hyperparameter's
share of the score's variance (they sum to 1). fANOVA needs two varying hyperparameters to say anything (with one
its share is 1 by definition) and enough points to fit its forest: a configuration with fewer than
:data:`MIN_POINTS` trials or one varying hyperparameter gets its points only (for the figure), with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: fewest finished trials of a configuration for an importance estimate
MIN_POINTS = 6


def hyperparameter_points(results: Iterable[Any], metric: str, score) -> dict[str, list[dict[str, Any]]]:
    """Configuration name -> one point per finished trial: ``{"params", "seed", "fold", "score"}``.
    ``score(outcome)``: the trial's selection score (None: left out)."""
    from trainables.naming import config_group

    out: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        value = score(r)
        if value is None:
            continue
        spec = r.spec
        out.setdefault(config_group(spec), []).append(
            {"params": dict(spec.get("params") or {}), "seed": spec["seed"], "fold": spec.get("fold"),
             "score": float(value)})
    return out


def varying(points: list[dict[str, Any]]) -> list[str]:
    """The hyperparameters that take more than one value over ``points`` (sorted)."""
    values: dict[str, set] = {}
    for p in points:
        for k, v in p["params"].items():
            values.setdefault(k, set()).add(v if not isinstance(v, float) else round(v, 12))
    return sorted(k for k, vs in values.items() if len(vs) > 1)


def importance(points: list[dict[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """``{"varying": [...], "importance": {name: share} | None, "why": reason | None, "n": points}`` for one
    configuration (module docstring)."""
    names = varying(points)
    out: dict[str, Any] = {"varying": names, "importance": None, "why": None, "n": len(points)}
    if len(names) < 2:
        out["why"] = ("one hyperparameter varied: its share is 1 by definition" if names else
                      "no hyperparameter varied")
        return out
    if len(points) < MIN_POINTS:
        out["why"] = f"{len(points)} finished trials; fANOVA needs at least {MIN_POINTS}"
        return out
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {}
    for name in names:
        values = [p["params"][name] for p in points]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            dists[name] = FloatDistribution(float(min(values)), float(max(values)))
        else:
            dists[name] = CategoricalDistribution(sorted({str(v) for v in values}))
    study = optuna.create_study(direction="maximize")
    for p in points:
        params = {n: (float(p["params"][n]) if isinstance(dists[n], FloatDistribution) else str(p["params"][n]))
                  for n in names}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=p["score"]))
    shares = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed), normalize=True)
    out["importance"] = {k: float(v) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}
    return out


def hyperparameter_summary(results: Iterable[Any], metric: str, score) -> dict[str, dict[str, Any]]:
    """Per configuration whose hyperparameters varied: its points and :func:`importance` (``selection.json``'s
    ``hyperparameters``)."""
    out = {}
    for config, points in hyperparameter_points(results, metric, score).items():
        if varying(points):
            out[config] = {**importance(points), "metric": metric, "points": points}
    return out

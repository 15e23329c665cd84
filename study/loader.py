"""Study configuration, driver side: a search-space YAML read, validated and enumerated into trials.

The types and their rules live on the worker side (:mod:`trainables.config`, pydantic models shared with the
trials); this module reads the YAML, resolves data paths against the YAML's folder, expands the search grid
into explicit trials (:func:`enumerate_trials`, reading the loss registry) and rebuilds the frozen copy a
study folder keeps. Every error names the file and the dotted key (``demo.yaml: training.epochs: ...``) and is
a :class:`~trainables.errors.ConfigError`, which the command line turns into exit code 2.
"""

from __future__ import annotations

import itertools
import json
import os
import zlib
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from pydantic import BaseModel

from trainables.config import (  # noqa: F401  (re-exported: the driver's names for the shared types)
    INTERNAL_KEYS,
    TRAINING_HYPERPARAMETERS,
    DataConfig,
    EvaluationConfig,
    SearchConfig,
    StudyConfig,
    TrialConfig,
    TrialSpec,
    validate,
)
from trainables.errors import ConfigError
from trainables.io_utils import read_yaml, why_unreadable
from trainables.losses import LOSSES, PAPER_CONFIGS, canonical_params, loss_record
from trainables.naming import NETWORK_PARAM, config_name, trial_folder


class _Errors:
    """Collects the file name and key path for messages."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, message: str) -> NoReturn:
        where = f"{self.source}: " if self.source else ""
        raise ConfigError(f"{where}{key}: {message}")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _training_value(key: str, value: Any, errors: _Errors) -> float:
    """A training hyperparameter of a search space (``iw.power``, ``optimizer.lr``) checked, as a float."""
    name = key.rsplit(".", 2)[-2] + "." + key.rsplit(".", 1)[-1]
    low, high, low_ok = TRAINING_HYPERPARAMETERS[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        errors.fail(key, f"must be a number or a list of numbers, got {value!r}")
    if not (low <= value if low_ok else low < value) or value > high:
        errors.fail(key, f"{value!r} is outside [{low:g}, {high:g}]" if low_ok else f"{value!r}: must be > {low:g}")
    return float(value)


#: significant digits of a drawn value (the trial trains with the rounded value; labels stay readable)
DRAW_DIGITS = 4


class _Draw:
    """A range of a search space, ``{low, high[, log]}``: drawn uniformly (log-uniformly with ``log: true``)."""

    def __init__(self, low: float, high: float, log: bool):
        self.low, self.high, self.log = low, high, log

    def draw(self, rng: np.random.Generator) -> float:
        if self.log:
            value = float(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))
        else:
            value = float(rng.uniform(self.low, self.high))
        return float(f"{value:.{DRAW_DIGITS}g}")


def _axis(key: str, value: Any, algorithm: str, errors: _Errors) -> list[Any] | _Draw:
    """One axis of a loss entry: a list of choices (a single value is a list of one) or a range (a mapping)."""
    if isinstance(value, dict):
        extra = sorted(set(value) - {"low", "high", "log"})
        if extra or not {"low", "high"} <= set(value):
            errors.fail(key, f"a range is {{low: a, high: b}} or {{low: a, high: b, log: true}}, got {value!r}")
        low, high, log = value["low"], value["high"], value.get("log", False)
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (low, high)):
            errors.fail(key, f"low and high must be numbers, got {value!r}")
        if not isinstance(log, bool):
            errors.fail(f"{key}.log", f"must be true or false, got {log!r}")
        if low >= high:
            errors.fail(key, f"low ({low}) must be below high ({high})")
        if log and low <= 0:
            errors.fail(key, f"a log range needs low > 0, got {low}")
        if algorithm == "grid":
            errors.fail(key, "a range needs a search algorithm that draws (search.algorithm: random or tpe); a grid "
                             "takes a value or a list of values")
        return _Draw(float(low), float(high), log)
    values = _as_list(value)
    if not values:
        errors.fail(key, "is an empty list")
    return values


def _draws(choices: dict[str, list[Any] | _Draw], n: int, seed: int, config: str) -> list[dict[str, Any]]:
    """``n`` points of one configuration: every range drawn, every list sampled uniformly, from a generator
    seeded by ``seed`` and the configuration's name (another entry in the space does not change them)."""
    rng = np.random.default_rng([seed, zlib.crc32(config.encode())])
    out = []
    for _ in range(n):
        point = {}
        for name in sorted(choices):
            axis = choices[name]
            point[name] = axis.draw(rng) if isinstance(axis, _Draw) else axis[int(rng.integers(len(axis)))]
        out.append(point)
    return out


class DrawnConfig:
    """One (loss, iw[, network]) configuration of a search: its axes as the YAML gives them (``axes``), parsed
    (``choices``: a list or a :class:`_Draw` per hyperparameter) and where it comes from (``key``)."""

    def __init__(self, loss: str, iw: bool, axes: dict[str, Any], choices: dict[str, list[Any] | _Draw], key: str,
                 network: str | None = None):
        self.loss, self.iw, self.axes, self.key, self.network = loss, iw, axes, key, network
        self.all_choices = choices  # what random draws from (a plain configuration's iw.power draw is dropped)
        # a plain configuration has no iw strength: its iw.power axis is dropped
        self.choices = {n: c for n, c in choices.items() if iw or n != "iw.power"}

    @property
    def name(self) -> str:
        return config_name(self.loss, self.iw) + (f"@{self.network}" if self.network else "")

    @property
    def fixed(self) -> bool:
        """Nothing to draw: one point (every list of one value, no range)."""
        return all(not isinstance(c, _Draw) and len(c) == 1 for c in self.choices.values())


def _cell(conf: DrawnConfig, given: dict[str, Any], errors: _Errors) -> tuple[str, bool, dict[str, Any], str]:
    """A point of a configuration -> (loss, iw, canonical params + training hyperparameters, where)."""
    loss, key, names, given = conf.loss, conf.key, sorted(conf.axes), dict(given)
    if not conf.iw:
        given.pop("iw.power", None)  # a plain configuration has no iw strength
    training = {n: _training_value(f"{key}.{n}", v, errors) for n, v in given.items()
                if n in TRAINING_HYPERPARAMETERS}
    try:
        params = canonical_params(loss, {n: v for n, v in given.items() if n not in training})
    except ValueError as exc:
        accepted = loss_record(loss).defaults()
        unknown = [n for n in names if n not in accepted and n not in TRAINING_HYPERPARAMETERS]
        bad = unknown[0] if unknown else next((n for n in names if f"{loss}: {n} must" in str(exc)), None)
        message = str(exc) + (f"; besides its own parameters a loss takes {', '.join(TRAINING_HYPERPARAMETERS)}"
                              if unknown else "")
        if not unknown and isinstance(conf.choices.get(bad), _Draw):
            message += f" (a draw of the range {conf.axes[bad]}: narrow it)"
        errors.fail(f"{key}.{bad}" if bad else key, message)
    if conf.network:
        params = {**params, NETWORK_PARAM: conf.network}
    where = f"{key}" + (f" ({', '.join(f'{n}={v!r}' for n, v in given.items())})" if given else "")
    return loss, conf.iw, {**params, **training}, where


def search_configs(search: SearchConfig, errors: _Errors) -> list[DrawnConfig]:
    """Every (loss, iw) configuration of ``search.losses`` with its axes, checked (TPE: once per network)."""
    out = []
    for loss, axes in search.losses.items():
        key = f"search.losses.{loss}"
        if loss not in LOSSES:
            errors.fail(key, f"unknown loss {loss!r}; known losses: {', '.join(LOSSES)}")
        axes = dict(axes or {})
        iw_values = _as_list(axes.pop("iw", [False]))
        for v in iw_values:
            if not isinstance(v, bool):
                errors.fail(f"{key}.iw", f"must be true/false or a list of them, got {v!r}")
            if v and not loss_record(loss).iw:
                errors.fail(f"{key}.iw", f"{loss} is a baseline without inverse weighting (iw: false only)")
        names = sorted(axes)
        choices = {name: _axis(f"{key}.{name}", axes[name], search.algorithm, errors) for name in names}
        if len(set(iw_values)) != len(iw_values):
            errors.fail(f"{key}.iw", f"has duplicate values {iw_values!r}")
        if "iw.power" in names and True not in iw_values:
            errors.fail(f"{key}.iw.power", "sets the strength of inverse weighting: it needs iw: true")
        if search.algorithm == "tpe" and not any(isinstance(c, _Draw) for c in choices.values()):
            errors.fail(key, "search.algorithm tpe models continuous hyperparameters: give at least one range "
                             "{low: a, high: b} (lists alone are a grid or random draws)")
        networks = (search.models or (None,)) if search.algorithm == "tpe" else (None,)
        confs = [DrawnConfig(loss, iw, axes, choices, key, network) for iw in iw_values for network in networks]
        for conf in confs:  # lists alone (a plain configuration beside an iw.power range) hold few points
            lists = [len(c) for c in conf.choices.values() if not isinstance(c, _Draw)]
            if search.algorithm == "tpe" and not conf.fixed and len(lists) == len(conf.choices) \
                    and int(np.prod(lists)) < (search.num_samples or 1):
                errors.fail(key, f"{conf.name} has {int(np.prod(lists))} distinct points (lists only), fewer than "
                                 f"num_samples {search.num_samples}: give it a range or fewer samples")
        out += confs
    return out


def _point_key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


def tpe_points(search: SearchConfig, conf: DrawnConfig, round_: int,
               history: list[tuple[dict[str, Any], float | None]], errors: _Errors | None = None) -> list[dict[str, Any]]:
    """The draws of round ``round_`` of a configuration: Optuna's TPE sampler, seeded by ``search.seed``, the
    configuration's name and the round, rebuilt from ``history`` (every earlier draw with its mean validation
    score, None for a draw whose trials all failed). The same history gives the same draws, whether the study
    ran through or was resumed; a draw that repeats an earlier one is asked again."""
    import warnings

    import optuna

    errors = errors or _Errors("")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {name: (optuna.distributions.FloatDistribution(c.low, c.high, log=c.log) if isinstance(c, _Draw)
                    else optuna.distributions.CategoricalDistribution(c))
             for name, c in sorted(conf.choices.items())}
    seed = int(np.random.SeedSequence([search.seed, zlib.crc32(conf.name.encode()), round_]).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.draws_per_round, multivariate=True,
                                             constant_liar=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for point, value in history:
        state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
        study.add_trial(optuna.trial.create_trial(params=point, distributions=dists, value=value, state=state))
    wanted = min(search.draws_per_round, (search.num_samples or 1) - round_ * search.draws_per_round)
    seen = {_point_key(p) for p, _ in history}
    out: list[dict[str, Any]] = []
    for _ in range(100 * wanted):
        if len(out) == wanted:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            trial = study.ask(dists)
        point = {}
        for name, c in sorted(conf.choices.items()):
            v = trial.params[name]
            point[name] = min(max(float(f"{v:.{DRAW_DIGITS}g}"), c.low), c.high) if isinstance(c, _Draw) else v
        if _point_key(point) in seen:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # asked again (a repeat is never run twice)
            continue
        seen.add(_point_key(point))
        out.append(point)
    if len(out) < wanted:
        errors.fail(conf.key, f"TPE found only {len(seen)} distinct draws of {conf.name} for num_samples "
                              f"{search.num_samples}: widen its ranges or lower num_samples")
    return out


def tpe_round_cells(search: SearchConfig, confs: list[DrawnConfig], round_: int,
                    history: dict[str, list[tuple[dict[str, Any], float | None]]],
                    errors: _Errors | None = None) -> dict[str, list[dict[str, Any]]]:
    """The draws of every configuration in round ``round_`` (a fixed configuration has one draw, in round 0)."""
    out = {}
    for conf in confs:
        if conf.fixed:
            out[conf.name] = [{n: c[0] for n, c in conf.choices.items()}] if round_ == 0 else []
        else:
            out[conf.name] = tpe_points(search, conf, round_, history.get(conf.name, []), errors)
    return out


def specs_of(conf: DrawnConfig, point: dict[str, Any], seeds, folds: int | None) -> list[TrialSpec]:
    """The trials of one draw: every seed (and fold)."""
    loss, iw, params, _ = _cell(conf, point, _Errors(""))
    return [TrialSpec(loss=loss, iw=iw, params=params, seed=seed, fold=fold)
            for seed in seeds for fold in (range(folds) if folds else (None,))]


def enumerate_trials(search: SearchConfig, errors: _Errors, folds: int | None = None) -> tuple[TrialSpec, ...]:
    """Expand the grid into explicit trials, validating every loss and parameter combination; with ``folds``,
    every (configuration, seed) once per fold. Under TPE these are the first round's trials (the later rounds
    are suggested while the sweep runs, :mod:`study.tune.searcher`)."""
    # (loss, iw, canonical params, where in the YAML it comes from)
    cells: list[tuple[str, bool, dict[str, Any], str]] = []
    confs = search_configs(search, errors)
    if search.algorithm == "grid":  # every combination, each with every iw value (the grid's order)
        by_entry: dict[str, list[DrawnConfig]] = {}
        for conf in confs:
            by_entry.setdefault(conf.key, []).append(conf)
        for entry in by_entry.values():
            names = sorted(entry[0].axes)
            choices = {n: _as_list(entry[0].axes[n]) for n in names}
            for combo in itertools.product(*(choices[n] for n in names)):
                for conf in entry:
                    cell = _cell(conf, dict(zip(names, combo)), errors)
                    # the plain configuration once (not once per iw strength)
                    if conf.iw or "iw.power" not in names or cell[:3] not in [c[:3] for c in cells]:
                        cells.append(cell)
    elif search.algorithm == "random":  # num_samples draws per configuration, seeded by the seed and its name
        for conf in confs:
            for given in _draws(conf.all_choices, search.num_samples, search.seed, config_name(conf.loss, conf.iw)):
                cell = _cell(conf, given, errors)
                if cell[:3] not in [c[:3] for c in cells]:  # a draw that repeats one is not run twice
                    cells.append(cell)
    else:  # tpe: the first round (TPE's random start-up); a fixed configuration's one point
        round0 = tpe_round_cells(search, confs, 0, {}, errors)
        for conf in confs:
            cells += [_cell(conf, point, errors) for point in round0[conf.name]]
    for i, name in enumerate(search.configs):
        if name not in PAPER_CONFIGS:
            errors.fail("search.configs", f"unknown configuration {name!r}; known: {', '.join(PAPER_CONFIGS)}")
        paper = PAPER_CONFIGS[name]
        cells.append((paper["loss"], bool(paper["iw"]), canonical_params(paper["loss"], paper.get("params")),
                      f"search.configs[{i}] ({name!r})"))
    if not cells:
        errors.fail("search", "defines no trial: give search.losses and/or search.configs")
    if search.models and search.algorithm != "tpe":  # networks: an axis over every configuration (selected and
        # judged per network; TPE draws per network)
        cells = [(loss, iw, {**params, NETWORK_PARAM: network}, f"{where} on {network}")
                 for network in search.models for loss, iw, params, where in cells]
    if not search.seeds:
        errors.fail("search.seeds", "needs at least one seed")
    if len(set(search.seeds)) != len(search.seeds):
        errors.fail("search.seeds", f"has duplicate values {list(search.seeds)!r}")

    # the same computation listed twice (2 == 2.0, omitted defaults) is refused, naming both places
    first: dict[str, str] = {}
    for loss, iw, params, where in cells:
        ident = json.dumps({"loss": loss, "iw": iw, "params": params}, sort_keys=True)
        if ident in first:
            name = TrialSpec(loss=loss, iw=iw, params=params, seed=0).label.rsplit("/", 1)[0]
            errors.fail("search", f"{name} is defined twice, by {first[ident]} and by {where} "
                                  "(the same loss, iw and parameters, defaults included); remove one")
        first[ident] = where
    trials = tuple(TrialSpec(loss=loss, iw=iw, params=params, seed=seed, fold=fold)
                   for loss, iw, params, _where in cells for seed in search.seeds
                   for fold in (range(folds) if folds else (None,)))
    folders: dict[str, str] = {}
    for spec in (t for t in trials if not t.fold):  # every per-(configuration, seed) folder and key must be unique
        other = folders.setdefault(trial_folder(spec.as_dict()), spec.label)
        if other != spec.label:
            errors.fail("search", f"trials {other} and {spec.label} would share the folder "
                                  f"{trial_folder(spec.as_dict())!r}; change a parameter value")
    return trials


def load_config(path: str | Path, *, data_path: str | Path | None = None) -> StudyConfig:
    """Read and validate a search-space YAML; relative data paths resolve against the YAML's folder.

    ``data_path`` (the ``--data`` flag) replaces ``data.path``: a prepared cache folder or a manifest CSV.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a search-space file (not found as a YAML file)")
    if not path.is_file():
        raise ConfigError(f"{path}: search-space file {why_unreadable(path)}")
    data = read_yaml(path, what="the search space")
    if data_path is not None and isinstance(data, dict):
        try:
            p = Path(data_path).expanduser().resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
            raise ConfigError(f"--data {data_path}: cannot be resolved ({exc})") from None
        if not os.access(p, os.F_OK):
            raise ConfigError(f"--data {data_path}: {p} {why_unreadable(p)}")
        section = dict(data.get("data") or {})
        section["source"] = "manifest" if p.suffix.lower() == ".csv" else "cache"
        section["path"] = str(p)
        section.pop("phantom", None)
        data = {**data, "data": section}
    return config_from_dict(data, source=str(path), base_dir=path.resolve().parent)


def _check_milestones(data: dict, cfg: StudyConfig, errors: _Errors) -> None:
    """Milestones the YAML gives (not the default ``[80]``, which simply never fires in a short run) must fall
    before the last epoch, where they lower the lr."""
    given = ((data.get("training") or {}).get("lr_schedule") or {}).get("milestones")
    epochs = cfg.training.epochs
    late = [m for m in cfg.training.lr_schedule.milestones if m >= epochs] if given is not None else []
    if late:
        errors.fail("training.lr_schedule.milestones", f"{late} at or beyond the last epoch (training.epochs "
                                                       f"{epochs}: epochs 0..{epochs - 1}) would never lower the lr")


def config_from_dict(data: Any, *, source: str = "", base_dir: Path | None = None,
                     frozen: bool = False) -> StudyConfig:
    """Validate plain data (a parsed YAML) into the study config with its trials enumerated."""
    errors = _Errors(source)
    if data is None:
        errors.fail("<top level>", "the file is empty")
    if not isinstance(data, dict):
        errors.fail("<top level>", f"must be a mapping of sections (name, data, training, search, ...), "
                                   f"got a {type(data).__name__}")
    for key, value in data.items():
        field = StudyConfig.model_fields.get(key) if isinstance(key, str) else None
        if value is None and field is not None and isinstance(field.default, BaseModel):
            errors.fail(key, "is null (an empty section); remove the line for the defaults or give its keys")
    for key in INTERNAL_KEYS:
        if key in data:
            known = ", ".join(k for k in StudyConfig.model_fields if k not in INTERNAL_KEYS)
            errors.fail(key, f"unknown key; known keys here: {known}")
    if isinstance(data.get("data"), dict) and "cache_dir" in data["data"]:
        errors.fail("data.cache_dir", "is set by the study (the cache it prepares); use data.path")
    cfg = validate(StudyConfig, data, source=source)
    if not frozen:
        _check_milestones(data, cfg, errors)
    trials = enumerate_trials(cfg.search, errors, cfg.data.folds)
    data_cfg = cfg.data
    if data_cfg.path is not None:
        p = Path(data_cfg.path).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        p = p.resolve()
        if not p.exists():
            errors.fail("data.path", f"{p} does not exist")
        if data_cfg.source == "cache" and not (p / "cache.json").is_file():
            errors.fail("data.path", f"{p} is not a prepared cache (no cache.json); run `study data prepare`")
        data_cfg = data_cfg.model_copy(update={"path": str(p)})
    known = {t.config_name for t in trials}
    if cfg.evaluation.baseline is not None and cfg.evaluation.baseline not in known:
        errors.fail("evaluation.baseline", f"{cfg.evaluation.baseline!r} is not a configuration of this study; "
                                           f"known: {', '.join(sorted(known))}")
    for name in cfg.testing.nan_configs:
        if name not in known:
            errors.fail("testing.nan_configs", f"{name!r} is not a configuration of this study")
    total = None
    if cfg.search.algorithm == "tpe":  # every round's draws, each with every seed and fold
        draws = sum(1 if conf.fixed else cfg.search.num_samples for conf in search_configs(cfg.search, errors))
        total = draws * len(cfg.search.seeds) * (cfg.data.folds or 1)
    return cfg.model_copy(update={"data": data_cfg, "trials": trials, "source_file": source, "sweep_trials": total})


def frozen_config_from_dict(data: dict[str, Any], *, path: str | Path | None = None) -> StudyConfig:
    """Rebuild a config written by :meth:`StudyConfig.to_dict` (the study folder's frozen copy at ``path``;
    errors name that file, and the search space it was frozen from)."""
    data = dict(data)
    trials = data.pop("trials", [])
    source = data.pop("source_file", "")
    data.pop("sweep_trials", None)
    label = str(path or "study.yaml") + (f" (frozen from {source}; was it edited?)" if source else "")
    try:
        cfg = config_from_dict(data, source=label, frozen=True)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; `study resume` runs the frozen config as launched: undo the edit, or launch "
                          "a corrected search space under another --name") from None
    frozen = tuple(TrialSpec.from_dict(t) for t in trials)
    key = lambda t: json.dumps(t.as_dict(), sort_keys=True)  # noqa: E731
    if sorted(map(key, frozen)) != sorted(map(key, cfg.trials)):
        raise ConfigError(f"{label}: the frozen trial list does not match its search space")
    return cfg.model_copy(update={"trials": frozen, "source_file": source})  # the frozen order is the order Tune was given

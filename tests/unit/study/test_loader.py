"""Search-space YAML -> typed config: validation messages, grid enumeration, frozen round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from search_spaces import builtin_path
from study.cli import main
from study.loader import config_from_dict, frozen_config_from_dict, load_config
from trainables.errors import ConfigError


def _write(tmp_path: Path, data, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cache.json").write_text(json.dumps({"version": 1, "cases": []}))
    return cache


def test_builtin_spaces_validate(tmp_path):
    demo = load_config(Path(str(builtin_path("demo"))))
    assert demo.data.source == "phantom" and demo.trials
    cache = _cache(tmp_path)
    paper = load_config(Path(str(builtin_path("paper"))), data_path=cache)
    assert [t.config_name for t in paper.trials] == [
        "bce", "iw-bce", "focal", "iw-focal", "wce", "dice", "iw-dice", "asl", "iw-asl", "gdl"]
    assert paper.training.patch_size == (128, 128, 128) and paper.model.width == 1.0
    alpha = load_config(Path(str(builtin_path("focal_alpha"))), data_path=cache)
    assert sorted({t.params["alpha"] for t in alpha.trials}) == [0.25, 0.5, 0.75, 0.83]
    assert len(alpha.trials) == 8  # 4 alphas x iw on/off
    tpe = load_config(Path(str(builtin_path("focal_tpe"))), data_path=cache)
    assert tpe.sweep_size == 2 * 16 * 2 and len(tpe.trials) == 2 * 4 * 2  # the first round: 4 draws x 2 seeds
    assert {t.config_name for t in tpe.trials} == {"focal", "iw-focal"}
    assert all("iw.power" in t.params for t in tpe.trials if t.iw) and all(
        "iw.power" not in t.params for t in tpe.trials if not t.iw)


def test_grid_is_enumerated_with_conditional_parameters():
    cfg = config_from_dict({"search": {
        "losses": {"dice": {"iw": [False, True]},
                   "focal": {"iw": True, "gamma": [1.0, 2.0], "alpha": [0.25, 0.75]},
                   "asl": {"beta": [1.0, 1.5]},
                   "wce": {}},
        "seeds": [0, 1]}})
    labels = [t.label for t in cfg.trials]
    assert len(labels) == len(set(labels)) == (2 + 4 + 2 + 1) * 2
    for t in cfg.trials:  # every parameter of the loss written out (defaults included), none of another loss
        expected = {"focal": {"gamma", "alpha"}, "asl": {"beta", "form"}, "wce": {"pos_weight"}}.get(t.loss, set())
        assert set(t.params) == expected, t.label
    assert {t.seed for t in cfg.trials} == {0, 1}


def test_a_cross_validated_grid_runs_every_configuration_and_seed_on_each_fold():
    cfg = config_from_dict({"search": {"losses": {"dice": {"iw": [False, True]}}, "seeds": [0, 1]},
                            "data": {"folds": 3}})
    labels = [t.label for t in cfg.trials]
    assert len(labels) == len(set(labels)) == 2 * 2 * 3
    assert {lb.rsplit("/", 1)[1] for lb in labels} == {"f0", "f1", "f2"}
    assert "iw-dice/s1/f2" in labels and cfg.holdout_models == "both"
    assert all(t.as_dict()["fold"] == int(t.label[-1]) for t in cfg.trials)
    plain = config_from_dict({"search": {"losses": {"dice": {"iw": [False, True]}}, "seeds": [0, 1]}})
    assert [t.label for t in plain.trials] == ["dice/s0", "dice/s1", "iw-dice/s0", "iw-dice/s1"]
    assert "fold" not in plain.trials[0].as_dict() and plain.holdout_models == "retrain"


def test_iw_power_and_lr_are_swept_per_configuration_and_applied_to_the_trial():
    cfg = config_from_dict({"search": {"losses": {"bce": {"iw": [False, True], "iw.power": [0, 0.5, 1]},
                                                  "focal": {"optimizer.lr": [0.001, 0.1]}}, "seeds": [0]}})
    labels = [t.label for t in cfg.trials]  # the plain configuration once (it has no iw strength)
    assert labels == ["bce/s0", "iw-bce[iw.power=0]/s0", "iw-bce[iw.power=0.5]/s0", "iw-bce[iw.power=1]/s0",
                      "focal[alpha=0.75,gamma=2,optimizer.lr=0.001]/s0", "focal[alpha=0.75,gamma=2,optimizer.lr=0.1]/s0"]
    by = {t.label: t for t in cfg.trials}
    half = by["iw-bce[iw.power=0.5]/s0"]
    assert half.loss_params == {} and half.training_params == {"iw.power": 0.5}
    assert cfg.for_trial(half).iw.power == 0.5 and cfg.for_trial(half).iw.clip == cfg.iw.clip
    assert cfg.for_trial(by["bce/s0"]) is cfg and cfg.iw.power == 1.0
    fast = by["focal[alpha=0.75,gamma=2,optimizer.lr=0.1]/s0"]
    assert fast.loss_params == {"alpha": 0.75, "gamma": 2.0}
    trained = cfg.for_trial(fast).training
    assert trained.optimizer.lr == 0.1 and trained.optimizer.momentum == cfg.training.optimizer.momentum


def _random_space(seed=1, n=3, **losses):
    return {"search": {"algorithm": "random", "num_samples": n, "seed": seed, "seeds": [0, 1],
                       "losses": losses or {"focal": {"iw": [False, True], "alpha": {"low": 0.2, "high": 0.9},
                                                      "gamma": [1.0, 2.0, 3.0],
                                                      "optimizer.lr": {"low": 1e-3, "high": 1e-1, "log": True}}}}}


def test_random_search_draws_n_points_per_configuration_reproducibly_with_seeds_as_an_axis():
    cfg = config_from_dict(_random_space())
    by_config: dict[str, set[str]] = {}
    for t in cfg.trials:
        by_config.setdefault(t.config_name, set()).add(t.label.rsplit("/", 1)[0])
        p = t.params
        assert 0.2 <= p["alpha"] <= 0.9 and p["gamma"] in (1.0, 2.0, 3.0) and 1e-3 <= p["optimizer.lr"] <= 1e-1
        assert float(f"{p['alpha']:.4g}") == p["alpha"]  # drawn values are rounded to 4 significant digits
    assert {c: len(v) for c, v in by_config.items()} == {"focal": 3, "iw-focal": 3}
    assert len(cfg.trials) == 3 * 2 * 2  # draws x configurations x seeds: every draw with every seed
    labels = [t.label for t in cfg.trials]
    assert labels == [t.label for t in config_from_dict(_random_space()).trials]  # the same seed: the same draws
    assert labels != [t.label for t in config_from_dict(_random_space(seed=2)).trials]
    # another entry in the space does not change a configuration's draws
    more = config_from_dict(_random_space(**_random_space()["search"]["losses"], bce={"iw": [False, True]}))
    assert [t.label for t in more.trials if t.loss == "focal"] == labels
    # log ranges are drawn log-uniformly: over many draws about half fall below the geometric mean
    lrs = [t.params["optimizer.lr"] for t in config_from_dict(_random_space(n=400)).trials if t.seed == 0]
    assert 0.4 < np.mean(np.array(lrs) < 1e-2) < 0.6


def _tpe_space(seed=0, n=5, batch=2):
    return {"search": {"algorithm": "tpe", "num_samples": n, "batch": batch, "seed": seed, "seeds": [0, 1],
                       "losses": {"focal": {"iw": [False, True], "gamma": [1.0, 2.0],
                                            "alpha": {"low": 0.2, "high": 0.9},
                                            "optimizer.lr": {"low": 1e-3, "high": 1e-1, "log": True}},
                                  "bce": {"iw": [False, True], "iw.power": {"low": 0.1, "high": 1.0}}}}}


def test_tpe_enumerates_its_first_round_and_counts_every_round():
    from study.loader import _Errors, search_configs, tpe_points

    cfg = config_from_dict(_tpe_space())
    assert cfg.search.rounds == 3 and cfg.search.draws_per_round == 2
    # focal, iw-focal, iw-bce: 5 draws each; plain bce has nothing to draw (iw.power is iw's): one; x 2 seeds
    assert cfg.sweep_size == (5 + 5 + 5 + 1) * 2
    first = {}
    for t in cfg.trials:
        first.setdefault(t.config_name, set()).add(t.label.rsplit("/", 1)[0])
    assert {c: len(v) for c, v in first.items()} == {"focal": 2, "iw-focal": 2, "bce": 1, "iw-bce": 2}
    for t in cfg.trials:
        if t.loss == "focal":
            assert 0.2 <= t.params["alpha"] <= 0.9 and t.params["gamma"] in (1.0, 2.0)
            assert float(f"{t.params['alpha']:.4g}") == t.params["alpha"]  # 4 significant digits, as random
    assert [t.label for t in config_from_dict(_tpe_space()).trials] == [t.label for t in cfg.trials]
    assert [t.label for t in config_from_dict(_tpe_space(seed=1)).trials] != [t.label for t in cfg.trials]
    # a later round: the same history gives the same draws; another history other draws; none repeats a point
    conf = next(c for c in search_configs(cfg.search, _Errors("")) if c.name == "iw-focal")
    round0 = tpe_points(cfg.search, conf, 0, [])
    history = [(p, float(p["alpha"])) for p in round0]  # a score that grows with alpha
    again = tpe_points(cfg.search, conf, 1, history)
    assert again == tpe_points(cfg.search, conf, 1, history) and len(again) == 2
    assert again != tpe_points(cfg.search, conf, 1, [(p, -float(p["alpha"])) for p in round0])
    assert not {json.dumps(p, sort_keys=True) for p in again} & {json.dumps(p, sort_keys=True) for p in round0}
    assert len(tpe_points(cfg.search, conf, 2, history + [(p, None) for p in again])) == 1  # 5 = 2 + 2 + 1


def test_tpe_moves_towards_the_better_scores():
    """With TPE's start-up behind it, a round's draws of a one-dimensional problem concentrate where the finished
    draws scored well (a known optimum at alpha = 0.8)."""
    from study.loader import _Errors, search_configs, tpe_points

    space = {"search": {"algorithm": "tpe", "num_samples": 40, "batch": 10, "seed": 0,
                        "losses": {"focal": {"alpha": {"low": 0.0, "high": 1.0}}}}}
    cfg = config_from_dict(space)
    conf = search_configs(cfg.search, _Errors(""))[0]
    history = []
    for r in range(3):
        history += [(p, -abs(p["alpha"] - 0.8)) for p in tpe_points(cfg.search, conf, r, history)]
    first, last = history[:10], tpe_points(cfg.search, conf, 3, history)
    err = lambda pts: np.mean([abs(p[0]["alpha"] - 0.8) if isinstance(p, tuple) else abs(p["alpha"] - 0.8)  # noqa: E731
                               for p in pts])
    assert err(last) < 0.5 * err(first)


def test_numbers_are_normalised_before_identity():
    """2 and 2.0 are one value: ints become floats where the loss's parameter is a float, defaults are filled."""
    a = config_from_dict({"search": {"losses": {"focal": {"gamma": 2}}}})
    b = config_from_dict({"search": {"configs": ["focal"]}})
    c = config_from_dict({"search": {"losses": {"focal": {}}}})
    assert a.trials[0].params == b.trials[0].params == c.trials[0].params == {"alpha": 0.75, "gamma": 2.0}
    assert isinstance(a.trials[0].params["gamma"], float)
    assert a.trials[0].label == b.trials[0].label == "focal[alpha=0.75,gamma=2]/s0"


@pytest.mark.parametrize(("search", "first", "second"), [
    ({"losses": {"focal": {"gamma": 2, "alpha": 0.75}}, "configs": ["focal"]},
     "search.losses.focal (alpha=0.75, gamma=2)", "search.configs[0] ('focal')"),
    ({"losses": {"focal": {}}, "configs": ["focal"]}, "search.losses.focal", "search.configs[0] ('focal')"),
    ({"losses": {"focal": {"gamma": [2, 2.0]}}}, "search.losses.focal (gamma=2)",
     "search.losses.focal (gamma=2.0)"),
    ({"losses": {"bce": {"iw": True}}, "configs": ["iw-bce"]}, "search.losses.bce", "search.configs[0] ('iw-bce')"),
])
def test_the_same_trial_twice_is_refused_naming_both_places(search, first, second):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"search": search}, source="s.yaml")
    msg = str(err.value)
    assert msg.startswith("s.yaml: search: ") and "defined twice" in msg
    assert first in msg and second in msg, msg


def test_labels_never_round_distinct_values():
    cfg = config_from_dict({"search": {"losses": {"focal": {"alpha": [0.75, 0.7500001]}}}})
    labels = [t.label for t in cfg.trials]
    assert labels == ["focal[alpha=0.75,gamma=2]/s0", "focal[alpha=0.7500001,gamma=2]/s0"]


@pytest.mark.parametrize(
    ("data", "key", "needle"),
    [
        ({"trainig": {}}, "trainig", "unknown key"),
        ({"training": {"epochs": 0}}, "training.epochs", "positive"),
        ({"training": {"patch_size": [30, 32, 32]}}, "training.patch_size", "multiple of 8"),
        ({"search": {"losses": {"hinge": {}}}}, "search.losses.hinge", "unknown loss"),
        ({"search": {"losses": {"asl": {"beta": [1.0, -1.0]}}}}, "search.losses.asl", "beta"),
        ({"search": {"losses": {"asl": {"beta": 0}}}}, "search.losses.asl", "beta"),
        ({"search": {"losses": {"focal": {"alpha": 1.5}}}}, "search.losses.focal", "alpha"),
        ({"search": {"losses": {"focal": {"alpha": 0.0}}}}, "search.losses.focal", "alpha"),
        ({"search": {"losses": {"dice": {"gamma": 2.0}}}}, "search.losses.dice", "gamma"),
        ({"search": {"losses": {"wce": {"iw": True}}}}, "search.losses.wce.iw", "without inverse weighting"),
        ({"search": {"losses": {"bce": {"iw": [True, True]}}}}, "search.losses.bce.iw", "duplicate"),
        ({"search": {"configs": ["bce"], "losses": {"bce": {}}}}, "search", "twice"),
        ({"search": {"configs": ["iw-wce"]}}, "search.configs", "unknown configuration"),
        ({"data": {"source": "cache"}}, "data.path", "required"),
        ({"data": {"source": "cache", "path": "/nonexistent/cache"}}, "data.path", "does not exist"),
        ({"resources": {"gpu": -1}}, "resources.gpu", ">= 0"),
        ({"inference": {"batch_size": 0}}, "inference.batch_size", "[1, 64]"),
        ({"data": {"folds": 1}}, "data.folds", "2 to 20 folds"),
        ({"search": {"losses": {"focal": {"alpha": {"low": 0.2, "high": 0.9}}}}}, "search.losses.focal.alpha",
         "a range needs a search algorithm that draws"),
        ({"search": {"algorithm": "random", "num_samples": 2, "losses": {"focal": {"alpha": {"low": 0.9, "high": 0.2}}}}},
         "search.losses.focal.alpha", "low (0.9) must be below high (0.2)"),
        ({"search": {"algorithm": "random", "num_samples": 2, "losses": {"focal": {"alpha": {"low": 0, "high": 0.5,
                                                                                          "log": True}}}}},
         "search.losses.focal.alpha", "a log range needs low > 0"),
        ({"search": {"algorithm": "random", "num_samples": 2, "losses": {"focal": {"beta": {"low": 1, "high": 2}}}}},
         "search.losses.focal.beta", "unknown parameter"),
        ({"search": {"algorithm": "random", "num_samples": 4, "losses": {"focal": {"alpha": {"low": 0.5, "high": 3}}}}},
         "search.losses.focal.alpha", "narrow it"),
        ({"search": {"algorithm": "random", "num_samples": 0, "losses": {"focal": {}}}}, "search.num_samples", ">= 1"),
        ({"search": {"algorithm": "random", "losses": {"focal": {}}}}, "search.num_samples", ">= 1"),
        ({"search": {"num_samples": 3, "losses": {"focal": {}}}}, "search.num_samples", "a grid runs every"),
        ({"search": {"algorithm": "bayes", "num_samples": 3, "losses": {"focal": {}}}}, "search.algorithm",
         "known: grid, random"),
        ({"search": {"losses": {"bce": {"iw.power": 0.5}}}}, "search.losses.bce.iw.power", "needs iw: true"),
        ({"search": {"losses": {"bce": {"iw": True, "iw.power": [0.5, 1.5]}}}}, "search.losses.bce.iw.power",
         "1.5 is outside [0, 1]"),
        ({"search": {"losses": {"bce": {"optimizer.lr": 0}}}}, "search.losses.bce.optimizer.lr", "must be > 0"),
        ({"search": {"losses": {"bce": {"optimizer.momentum": 0.5}}}}, "search.losses.bce.optimizer.momentum",
         "iw.power, optimizer.lr"),
        ({"iw": {"power": 2}}, "iw.power", "outside [0, 1]"),
        ({"search": {"algorithm": "tpe", "num_samples": 4, "losses": {"focal": {"gamma": [1.0, 2.0]}}}},
         "search.losses.focal", "at least one range"),
        ({"search": {"algorithm": "tpe", "num_samples": 4, "batch": 5,
                     "losses": {"focal": {"gamma": {"low": 1, "high": 3}}}}}, "search.batch", "between 1 and"),
        ({"search": {"algorithm": "random", "num_samples": 4, "batch": 2,
                     "losses": {"focal": {"gamma": {"low": 1, "high": 3}}}}}, "search.batch", "no meaning for random"),
        ({"search": {"algorithm": "tpe", "num_samples": 2, "configs": ["bce"],
                     "losses": {"focal": {"gamma": {"low": 1, "high": 3}}}}}, "search.configs", "cannot draw"),
        ({"search": {"algorithm": "tpe", "losses": {"focal": {"gamma": {"low": 1, "high": 3}}}}},
         "search.num_samples", ">= 1"),
        ({"search": {"algorithm": "tpe", "num_samples": 3, "losses": {"bce": {
            "iw": [False, True], "iw.power": {"low": 0.1, "high": 1}, "optimizer.lr": [0.01, 0.1]}}}},
         "search.losses.bce", "bce has 2 distinct points"),
        ({"evaluation": {"holdout_models": "folds"}}, "evaluation.holdout_models", "needs data.folds"),
        ({"data": {"folds": 3}, "evaluation": {"holdout_models": "all"}}, "evaluation.holdout_models", "one of"),
    ],
)
def test_invalid_configs_name_file_and_key(tmp_path, data, key, needle):
    data = {"search": {"configs": ["bce"]}, **data}
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key}"), msg
    assert needle in msg, msg


@pytest.mark.parametrize("gpus", [2, 1.5])
def test_more_than_one_gpu_per_trial_is_refused_at_dry_run_saying_why(tmp_path, capsys, gpus):
    """A trial trains on one GPU: asking for more would make Ray reserve GPUs it never uses."""
    path = _write(tmp_path, {"search": {"configs": ["bce"]}, "resources": {"cpu": 1, "gpu": gpus}})
    assert main(["launch", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: resources.gpu: {gpus:g} GPUs per trial" in err
    assert "faster than data-parallel" in err and "8 GPUs run 8 trials at once" in err
    for share in (0.125, 0.5, 1):  # a fraction shares a GPU; one is one GPU per trial
        assert load_config(_write(tmp_path, {"search": {"configs": ["bce"]},
                                             "resources": {"gpu": share}})).resources.gpu == share


def test_malformed_yaml_and_missing_file_exit_2(tmp_path, capsys):
    bad = _write(tmp_path, "search: [unclosed\n")
    assert main(["launch", str(bad), "--storage", str(tmp_path / "s")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(["launch", str(tmp_path / "missing.yaml"), "--storage", str(tmp_path / "s")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing was created for an invalid study


def test_relative_data_path_resolves_against_the_yaml(tmp_path):
    _cache(tmp_path)
    path = _write(tmp_path, {"data": {"source": "cache", "path": "cache"}, "search": {"configs": ["dice"]}})
    cfg = load_config(path)
    assert cfg.data.path == str((tmp_path / "cache").resolve())


def test_frozen_config_round_trip(tmp_path):
    cfg = load_config(Path(str(builtin_path("demo"))))
    text = yaml.safe_dump(cfg.to_dict())
    again = frozen_config_from_dict(yaml.safe_load(text))
    assert again.trials == cfg.trials
    assert again.to_dict() == cfg.to_dict()

"""study.tune.searcher.RoundSearcher driven as Tune drives it (suggest, results, completion), without Ray: the
rounds, what a stopped trial is told, and a driver that dies mid-round and restarts from what Tune kept."""

from __future__ import annotations

import json

import pytest
from ray.tune.search import Searcher

from study.loader import config_from_dict
from study.tune import searcher as searcher_mod
from study.tune import tuner as tuner_mod
from study.tune.searcher import RoundSearcher, points_file
from study.tune.tuner import TrialOutcome

SPACE = {"search": {"algorithm": "tpe", "num_samples": 5, "batch": 2, "seed": 0, "seeds": [0, 1],
                    "losses": {"bce": {"iw": [False, True], "iw.power": {"low": 0.1, "high": 1.0},
                                       "optimizer.lr": {"low": 1e-3, "high": 1e-1, "log": True}}}},
         "training": {"epochs": 3}}


def _value(trial: dict, epoch: int) -> float:
    """A synthetic validation score: best at lr = 0.01, improving with the epoch."""
    import math

    lr = trial["params"]["optimizer.lr"]
    return round(1.0 - 0.3 * abs(math.log10(lr) + 2) + 0.01 * trial["seed"] + 0.05 * epoch, 6)


class _Tune:
    """What Tune does with a searcher: ask for trials while some slot is free, run them, report, complete."""

    def __init__(self, s: RoundSearcher):
        self.s, self.n, self.trials = s, 0, {}

    def ask_all(self) -> str:
        while True:
            tid = f"t{self.n:05d}"
            got = self.s.suggest(tid)
            if got is None or got == Searcher.FINISHED:
                return "wait" if got is None else "finished"
            self.n += 1
            self.trials[tid] = {"trial": got["trial"], "order": got["order"], "epochs": [], "status": "UNFINISHED"}

    def run(self, tid: str, *, upto: int = 3, stop_paused: bool = False) -> None:
        t = self.trials[tid]
        for epoch in range(len(t["epochs"]), upto):
            result = {"epoch": epoch, "val_avg_recall": _value(t["trial"], epoch)}
            t["epochs"].append(result)
            self.s.on_trial_result(tid, result)
        if upto == 3 or stop_paused:
            t["status"] = "STOPPED" if stop_paused else "TERMINATED"
            self.s.on_trial_complete(tid, None if stop_paused else t["epochs"][-1])

    def outcomes(self, *_args):
        return [TrialOutcome(tid, t["trial"], t["status"], t["epochs"][-1] if t["epochs"] else {}, None, None,
                             list(t["epochs"])) for tid, t in sorted(self.trials.items())]


def _drive(tmp_path, *, kill_after: int | None = None, monkeypatch=None):
    cfg = config_from_dict(SPACE)
    tune = _Tune(RoundSearcher(cfg, tmp_path, "sweep"))
    if monkeypatch is not None:
        monkeypatch.setattr(tuner_mod, "outcomes", tune.outcomes)
    done = 0
    while True:
        state = tune.ask_all()
        pending = [tid for tid, t in tune.trials.items() if t["status"] == "UNFINISHED"]
        if state == "finished" and not pending:
            return cfg, tune
        for tid in pending:
            if kill_after is not None and done == kill_after:
                # the driver dies: this trial has reported one epoch; a new driver restores from Tune's state
                tune.run(tid, upto=1)
                tune.s = RoundSearcher(cfg, tmp_path, "sweep")
                kill_after = None
                continue
            tune.run(tid, stop_paused=(done % 5 == 4))  # some trials stopped while paused (no result)
            done += 1


def test_rounds_are_exactly_num_samples_per_configuration_with_every_seed(tmp_path):
    cfg, tune = _drive(tmp_path)
    specs = [t["trial"] for t in tune.trials.values()]
    assert len(specs) == cfg.sweep_size == (5 + 5) * 2  # bce draws its lr, iw-bce its lr and iw.power
    points: dict[str, set[str]] = {}
    for s in specs:
        key = json.dumps(s["params"], sort_keys=True)
        points.setdefault(("iw-" if s["iw"] else "") + s["loss"], set()).add(key)
    assert {c: len(p) for c, p in points.items()} == {"bce": 5, "iw-bce": 5}
    assert len({json.dumps(s, sort_keys=True) for s in specs}) == len(specs)  # no trial twice
    orders = [t["order"] for t in tune.trials.values()]  # ASHA's order of the trials: the suggestions' own
    assert orders == sorted(orders) and len(set(orders)) == len(orders) and orders[0] == "r000-00000"
    rounds = json.loads(points_file(tmp_path, "sweep").read_text())["rounds"]
    assert [len(r["iw-bce"]) for r in rounds] == [2, 2, 1]
    # the first round is the config's enumerated trials (what the dry run lists)
    first = specs[: len(cfg.trials)]
    assert first == [t.as_dict() for t in cfg.trials]


def test_a_driver_killed_mid_round_resumes_to_the_same_trials(tmp_path, monkeypatch):
    _, straight = _drive(tmp_path / "a")
    _, killed = _drive(tmp_path / "b", kill_after=7, monkeypatch=monkeypatch)
    spec = lambda tune: sorted(json.dumps(t["trial"], sort_keys=True) for t in tune.trials.values())  # noqa: E731
    assert spec(killed) == spec(straight)
    assert points_file(tmp_path / "a", "sweep").read_text() == points_file(tmp_path / "b", "sweep").read_text()


def test_a_trial_stopped_while_paused_is_told_its_last_value(tmp_path):
    cfg = config_from_dict(SPACE)
    s = RoundSearcher(cfg, tmp_path, "sweep")
    first = s.suggest("t0")
    s.on_trial_result("t0", {"epoch": 0, "val_avg_recall": 0.4})
    s.on_trial_result("t0", {"epoch": 1, "val_avg_recall": 0.55})
    s.on_trial_complete("t0")  # Tune's stop of a PAUSED trial: no result
    key = searcher_mod._key(first["trial"])
    assert s._values[key] == pytest.approx(0.55)
    s.suggest("t1")
    s.on_trial_complete("t1", error=True)
    assert s._values[searcher_mod._key(s._round_specs(0)[1].as_dict())] is None

"""study.tune.asha without Ray running: the decisions against Ray's own ASHA bracket, waiting, persistence, the
config's bad input, selection under ASHA and the validation subset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from study.cli import main
from study.loader import config_from_dict
from study.stages.select import select_winners
from study.tune.asha import AshaState, cutoff, settings_of
from study.tune.tuner import TrialOutcome
from trainables.config import SchedulerConfig
from trainables.errors import ConfigError


def _settings(eta=3, epochs=27, grace=1):
    return settings_of(SchedulerConfig(type="asha", grace_epochs=grace, reduction_factor=eta), epochs, True)


def _ray_serial(curves, groups, eta, epochs, grace):
    """Ray's _Bracket per group fed each trial's values one trial after another (grid order): trial -> the epoch
    it stopped at (None: it ran to the end)."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    class T:
        def __init__(self, i):
            self.trial_id = i

    brackets = {g: _Bracket(min_t=grace, max_t=epochs, reduction_factor=eta, s=0) for g in set(groups)}
    out = {}
    for i, (curve, g) in enumerate(zip(curves, groups)):
        out[i] = None
        for m in SchedulerConfig(type="asha", grace_epochs=grace, reduction_factor=eta).milestones(epochs):
            if brackets[g].on_result(T(i), m, curve[m - 1]) == TrialScheduler.STOP:
                out[i] = m
                break
    return out


def _run_serial(state: AshaState, curves, groups):
    for i, g in enumerate(groups):
        state.register(f"t{i:05d}", label=f"trial {i}", group=g)
    for i, curve in enumerate(curves):
        tid = f"t{i:05d}"
        for m in state.milestones:
            state.record(tid, m, curve[m - 1])
            if state.decide(tid, m) == "stop":
                break
        state.end(tid, "completed")
    return {i: state.stopped_at(f"t{i:05d}") for i in range(len(curves))}


@pytest.mark.parametrize("eta,epochs,grace,seed", [(3, 27, 1, 0), (2, 16, 2, 1), (3, 9, 1, 2), (4, 20, 1, 3)])
def test_decisions_equal_rays_bracket_in_grid_order(eta, epochs, grace, seed):
    rng = np.random.default_rng(seed)
    n = 30
    curves = np.cumsum(rng.uniform(0, 0.1, size=(n, epochs)), axis=1).round(3)  # ties happen too
    groups = [["bce", "iw-bce"][i % 2] for i in range(n)]
    s = settings_of(SchedulerConfig(type="asha", grace_epochs=grace, reduction_factor=eta), epochs, True)
    got = _run_serial(AshaState(None, s), curves.tolist(), groups)
    want = _ray_serial(curves.tolist(), groups, eta, epochs, grace)
    assert got == want
    assert sum(v is not None for v in want.values()) > n / 3  # the rule stopped a good share of them


def test_rungs_are_rays_milestones_below_max():
    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace, eta, epochs in [(1, 3, 27), (2, 2, 16), (1, 3, 10), (3, 3, 9), (1, 2, 5)]:
        ray_rungs = sorted(m for m, _ in _Bracket(grace, epochs, eta, 0)._rungs if m < epochs)
        assert list(SchedulerConfig(type="asha", grace_epochs=grace, reduction_factor=eta).milestones(epochs)) \
            == ray_rungs
    assert SchedulerConfig().milestones(100) == ()  # FIFO has none


def test_cutoff_is_the_upper_quantile_of_earlier_values():
    assert cutoff([], 3) is None
    assert cutoff([0.2, 0.3], 3) == pytest.approx(0.2 + (0.3 - 0.2) * 2 / 3)
    assert cutoff([0.5], 2) == 0.5


def test_a_trial_waits_for_an_earlier_one_of_its_group_only():
    state = AshaState(None, _settings(eta=2, epochs=8))
    for tid, g in [("a", "bce"), ("b", "iw-bce"), ("c", "bce")]:
        state.register(tid, label=tid, group=g)
    state.record("c", 1, 0.9)
    assert state.decide("c", 1) is None  # "a" (earlier, same group) has not reached epoch 1
    state.record("b", 1, 0.1)
    assert state.decide("b", 1) == "continue"  # first of its group: "a" and "c" are another configuration
    assert state.decide("c", 1, ended={"a"}) == "continue"  # "a" ended (errored) before the rung: not waited for
    state2 = AshaState(None, _settings(eta=2, epochs=8))
    for tid in "ac":
        state2.register(tid, label=tid, group="bce")
    state2.record("c", 1, 0.4)
    state2.record("a", 1, 0.5)
    assert state2.decide("c", 1) == "stop" and state2.stopped_at("c") == 1
    assert state2.decide("a", 1) == "continue"  # judged against nobody earlier


def test_searched_trials_follow_their_given_order_and_a_lost_one_recreated_takes_over_its_record():
    """A searcher's trial ids are random: "earlier" is the order it gives (``r<round>-<position>``), not the id; a
    trial Tune lost in a kill and the searcher created again under a new id takes over its old record."""
    state = AshaState(None, _settings(eta=2, epochs=8))
    for tid, order in [("zz", "r000-00000"), ("aa", "r000-00001"), ("mm", "r001-00000")]:
        state.register(tid, label=tid, group="bce", order=order)
    state.record("aa", 1, 0.9)
    assert state.decide("aa", 1) is None  # "zz" comes first in the search's order, whatever the ids say
    state.record("zz", 1, 0.5)
    assert state.decide("zz", 1) == "continue" and state.decide("aa", 1) == "continue"
    # "mm" was lost with the driver; its slot is created again as "qq": the record moves, nothing waits for "mm"
    state.adopt("r001-00000", "qq", live={"zz", "aa", "qq"})
    state.register("qq", label="qq", group="bce", order="r001-00000")
    assert "mm" not in state.trials and state.order("qq") == "r001-00000"
    state.record("qq", 1, 0.1)
    assert state.decide("qq", 1) == "stop"  # below both earlier values at eta 2
    state.adopt("r000-00000", "zz", live={"zz"})  # a trial Tune still has is never taken over
    assert "zz" in state.trials


def test_decisions_persist_and_replay(tmp_path):
    path = tmp_path / "sweep-asha.json"
    s = _settings(eta=2, epochs=8)
    state = AshaState.open(path, s)
    for tid in ("a", "b"):
        state.register(tid, label=tid, group="g")
    state.record("a", 1, 0.5)
    state.decide("a", 1)
    state.record("b", 1, 0.3)
    assert state.decide("b", 1) == "stop"
    again = AshaState.open(path, s)  # a resumed driver reads the same rungs back
    assert again.stopped_at("b") == 1 and again.decision("a", 1) == "continue"
    again.trials["b"]["values"]["1"] = 0.9  # a replayed epoch never re-decides
    assert again.decide("b", 1) == "stop"
    assert [e["trial_id"] for e in json.loads(path.read_text())["log"]] == ["a", "b"]
    assert "epoch 1: stop (0.300 < 0.500, 1 earlier)" in AshaState.read(path).describe("b")
    with pytest.raises(ValueError, match="cannot change"):
        AshaState.open(path, _settings(eta=3, epochs=8))


BASE = {"search": {"configs": ["bce"]}, "training": {"epochs": 9}}


@pytest.mark.parametrize("scheduler,key,needle", [
    ({"type": "hyperband"}, "scheduler.type", "unknown scheduler 'hyperband'; known: fifo, asha"),
    ({"type": "asha", "grace_epochs": 9}, "scheduler.grace_epochs", "must be < scheduler.max_epochs (9)"),
    ({"type": "asha", "grace_epochs": 9, "max_epochs": 9}, "scheduler.grace_epochs", "must be < scheduler.max_epochs"),
    ({"type": "asha", "reduction_factor": 1}, "scheduler.reduction_factor", "must be >= 2"),
    ({"type": "asha", "metric": "val_loss"}, "scheduler.metric", "'val_loss' is never reported by a trial"),
    ({"type": "asha", "max_epochs": 12}, "scheduler.max_epochs", "must equal training.epochs (9)"),
    ({"type": "asha", "reduction_factor": 2.5}, "scheduler.reduction_factor", "must be an integer, got 2.5"),
])
def test_bad_scheduler_names_the_key(scheduler, key, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict({**BASE, "scheduler": scheduler}, source="s.yaml")
    assert str(err.value).startswith(f"s.yaml: {key}") and needle in str(err.value), str(err.value)


def test_bad_scheduler_exits_2_before_the_study_folder_exists(tmp_path, capsys):
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "scheduler": {"type": "asha", "reduction_factor": 1}}))
    assert main(["launch", str(path), "--storage", str(tmp_path / "st")]) == 2
    assert "scheduler.reduction_factor" in capsys.readouterr().err
    assert not (tmp_path / "st").exists()


def _outcome(tid, iw, alpha, seed, recall, status="TERMINATED", stopped=None):
    history = [{"epoch": 0, "val_avg_recall": recall}]
    return TrialOutcome(tid, {"loss": "focal", "iw": iw, "params": {"alpha": alpha, "gamma": 2.0}, "seed": seed},
                        status, history[-1], None, None, history, stopped)


def test_selection_under_asha_takes_the_trials_that_reached_the_top():
    cfg = config_from_dict({"search": {"losses": {"focal": {"iw": [False, True], "alpha": [0.25, 0.75]}},
                                       "seeds": [0, 1]}, "training": {"epochs": 9},
                            "scheduler": {"type": "asha", "grace_epochs": 1, "reduction_factor": 3}})
    results = [
        _outcome("t1", False, 0.25, 0, 0.5), _outcome("t2", False, 0.25, 1, 0.4),
        _outcome("t3", False, 0.75, 0, 0.9, "STOPPED", 3),  # better at its rung, but stopped: not a candidate
        _outcome("t4", False, 0.75, 1, 0.45),
        # no iw trial reached the end: the best rung any reached (3) decides, and says so
        _outcome("t5", True, 0.25, 0, 0.3, "STOPPED", 1), _outcome("t6", True, 0.25, 1, 0.6, "STOPPED", 3),
        _outcome("t7", True, 0.75, 0, 0.7, "STOPPED", 3), _outcome("t8", True, 0.75, 1, 0.2, "ERROR"),
    ]
    sel = select_winners(results, cfg)
    w = {x["iw"]: x for x in sel["winners"]}
    assert w[False]["params"]["alpha"] == 0.25 and w[False]["score"] == pytest.approx(0.45)  # mean of t1, t2
    assert w[False]["judged_at_epoch"] == 9 and w[False]["trial_ids"] == ["t1", "t2"]
    assert w[True]["params"]["alpha"] == 0.75 and w[True]["judged_at_epoch"] == 3 and w[True]["trial_ids"] == ["t7"]
    assert sel["asha"]["judged_at_epoch"] == {"focal": 9, "iw-focal": 3}
    assert {s["trial"]["seed"] for s in sel["asha"]["stopped"] if not s["trial"]["iw"]} == {0}
    assert [e["status"] for e in sel["excluded"]] == ["ERROR"]


def test_validation_subset_is_fixed_seeded_and_holds_a_lesion():
    from trainables.trainer import validation_subset

    class Cache:
        lesions = {f"c{i}": (1 if i == 7 else 0) for i in range(10)}

        def meta(self, cid):
            return {"n_lesions": self.lesions[cid]}

    ids = [f"c{i}" for i in range(10)]
    a = validation_subset(Cache(), ids, 3, seed=0)
    assert a == validation_subset(Cache(), list(reversed(ids)), 3, seed=0)  # order of the split does not matter
    assert len(a) == 3 and "c7" in a  # the only lesion case replaces a drawn case
    assert len({tuple(validation_subset(Cache(), ids, 3, seed=s)) for s in range(5)}) > 1  # the seed draws
    assert sorted(validation_subset(Cache(), ids, 10, seed=0)) == sorted(ids)


def test_bench_rank_agreement_orders_by_epoch_judged_then_score():
    from benchmarks.asha import kendall

    fifo = {n: {"score": s} for n, s in zip("abcd", [0.9, 0.7, 0.5, 0.3])}
    # ASHA ran a and b to the end (epoch 9) and stopped c, d earlier: the same order as FIFO
    same = {"a": {"epoch": 9, "score": 0.8}, "b": {"epoch": 9, "score": 0.6}, "c": {"epoch": 3, "score": 0.95},
            "d": {"epoch": 1, "score": 0.99}}
    assert kendall(fifo, same, list("abcd")) == pytest.approx(1.0)
    # the FIFO best stopped first: every pair with it is discordant, b/c/d keep their order
    flipped = {**same, "a": {"epoch": 1, "score": 0.1}}
    assert kendall(fifo, flipped, list("abcd")) == pytest.approx(0.0)
    assert kendall(fifo, same, ["a"]) is None

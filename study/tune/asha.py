"""ASHA whose rungs survive a kill: the sweep's early stopping, persisted in the study folder.

Tune does not restore a scheduler's state on ``Tuner.restore`` (ray#30838): a restored
``AsyncHyperBandScheduler`` comes back from the experiment's pickle with empty rungs and ``training_iteration``
restarts, so a resumed trial is judged against different trials than it would have been. Here:

* **The rule is Ray's ASHA stop rule** (``ray.tune.schedulers.async_hyperband._Bracket``): rungs at
  ``G·η^k`` epochs below ``max_epochs``; a trial reaching a rung stops when its metric is below the
  ``(1 − 1/η)`` quantile (``numpy.nanpercentile``) of the values recorded there before it, else it continues.
* **"Before it" is the grid order, not the clock.** Asynchronous ASHA's decisions depend on which trial reaches
  a rung first, so two runs of one study (or a run and its resume) would disagree. Here a trial is judged
  against the trials *earlier in the grid* of its group that reached the rung, i.e. exactly the decisions ASHA
  makes when trials arrive one after another in grid order. A trial that reaches a rung before an earlier
  trial of its group has (the earlier one is behind, or not started) pauses (Tune's PAUSE: its checkpoint is
  kept, its CPU/GPU freed) until that trial has reached the rung or ended; a trial never waits for a later one.
* **Keyed by the trial's own epoch counter** (``epoch`` in its results, which continues from the checkpoint
  on resume), never by Tune's ``training_iteration``.
* **Persisted atomically at every change** (``<study>/ray/<stage>-asha.json``): each value recorded at a rung,
  each decision, each ending. After a SIGKILL, ``study resume`` replays the persisted decisions (a trial
  stopped before the kill is stopped again before it runs; one that was promoted is not judged again), so the
  resumed study makes exactly the decisions of an uninterrupted one.
* **Groups**: with ``selection.mode: per-config`` each (loss, iw) configuration has its own rungs, since a
  winner is chosen per configuration (a plain trial never stops an iw trial); with ``top-k`` one set.

A stopped trial is a finished trial for the study (its MLflow run FINISHED with a ``stopped_at_epoch`` tag),
never an error and never resumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.schedulers import TrialScheduler

from trainables.config import SchedulerConfig, StudyConfig
from trainables.io_utils import write_text_atomic
from trainables.naming import config_group, trial_label

CONTINUE, STOP = "continue", "stop"
COMPLETED, STOPPED, ERRORED = "completed", "stopped", "error"


def state_file(storage: Path, name: str) -> Path:
    """Where the rungs of the Tune experiment ``storage/name`` are kept."""
    return Path(storage) / f"{name}-asha.json"


def cutoff(values: list[float], reduction_factor: float) -> float | None:
    """Ray's cutoff: the (1 − 1/η) percentile of the values recorded at a rung (None when there is none)."""
    if not values:
        return None
    return float(np.nanpercentile(values, (1 - 1 / reduction_factor) * 100))


def _pausing(tune_controller, trial) -> bool:
    """Whether Tune is still pausing ``trial`` (its checkpoint being saved, or its PAUSE queued): stopping it now
    would be undone when the pause completes (Ray 2.60's controller keeps these in two private maps)."""
    tid = trial.trial_id
    return bool(trial.is_saving or tid in getattr(tune_controller, "_cached_trial_decisions", {})
                or tid in getattr(tune_controller, "_queued_trial_decisions", {}))


def group_of(trial: dict[str, Any], per_config: bool) -> str:
    """The trials a rung compares: the configuration's (per-config selection) or all, and only at the same fold
    (a cross-validated sweep never ranks folds against each other)."""
    fold = "" if trial.get("fold") is None else f"/f{trial['fold']}"
    return (config_group(trial) if per_config else "all") + fold


class AshaState:
    """The rungs of one sweep: values recorded per trial and rung epoch, decisions, endings (plain JSON).

    ``trials``: trial id -> ``{"label", "group", "values": {epoch: v}, "decisions": {epoch: {"decision",
    "cutoff", "compared"}}, "end": None | completed | stopped | error, "stopped_at_epoch"}``; ``log``: every
    decision in the order it was made. No Ray here: :class:`AshaScheduler` drives it, the tests call it.
    """

    def __init__(self, path: Path | None, settings: dict[str, Any], data: dict[str, Any] | None = None):
        self.path = Path(path) if path is not None else None
        self.settings = settings
        self.data = data or {"settings": settings, "trials": {}, "log": []}

    @classmethod
    def open(cls, path: Path, settings: dict[str, Any]) -> AshaState:
        """The persisted state at ``path`` (new if there is none); refuses one made with other settings."""
        path = Path(path)
        if not path.is_file():
            return cls(path, settings)
        data = json.loads(path.read_text())
        if data.get("settings") != settings:
            raise ValueError(f"{path}: made with scheduler settings {data.get('settings')}, not {settings}; "
                             "a study's scheduler cannot change once its sweep has started")
        return cls(path, settings, data)

    @classmethod
    def read(cls, path: Path) -> AshaState | None:
        """The persisted state, read-only (None when the sweep had no ASHA)."""
        path = Path(path)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(None, data["settings"], data)

    def save(self) -> None:
        if self.path is not None:
            write_text_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True))

    @property
    def milestones(self) -> list[int]:
        return list(self.settings["milestones"])

    @property
    def trials(self) -> dict[str, dict[str, Any]]:
        return self.data["trials"]

    def register(self, trial_id: str, *, label: str, group: str, order: str | None = None) -> None:
        if trial_id not in self.trials:
            self.trials[trial_id] = {"label": label, "group": group, "values": {}, "decisions": {}, "end": None,
                                     "stopped_at_epoch": None, **({"order": order} if order else {})}
            self.save()

    def adopt(self, order: str, trial_id: str, live: set[str]) -> None:
        """A searched trial created again after a kill (Tune's snapshot had lost it; a searcher's trial ids are
        random, so its new id differs) takes over the record of its lost self: same ``order``, an id Tune no longer
        has. Its rungs were decided once and stay so; without this the lost record would be an earlier trial that
        never reaches its rung, and every later one would wait for it."""
        lost = [t for t, rec in self.trials.items() if rec.get("order") == order and t != trial_id and t not in live]
        for old in lost:
            if trial_id not in self.trials:
                self.trials[trial_id] = self.trials[old]
            del self.trials[old]
            self.save()

    def order(self, trial_id: str) -> str:
        """Where the trial stands among the sweep's (its trial id, Tune's grid order, unless an order was given)."""
        return self.trials[trial_id].get("order") or trial_id

    def record(self, trial_id: str, epoch: int, value: float) -> None:
        rec = self.trials[trial_id]
        if str(epoch) not in rec["values"]:
            rec["values"][str(epoch)] = float(value)
            self.save()

    def decision(self, trial_id: str, epoch: int) -> str | None:
        d = self.trials[trial_id]["decisions"].get(str(epoch))
        return None if d is None else d["decision"]

    def stopped_at(self, trial_id: str) -> int | None:
        rec = self.trials.get(trial_id)
        return None if rec is None else rec["stopped_at_epoch"]

    def undecided(self, trial_id: str) -> int | None:
        """The earliest rung epoch where the trial has a value but no decision yet."""
        rec = self.trials[trial_id]
        pending = [int(e) for e in rec["values"] if e not in rec["decisions"]]
        return min(pending) if pending else None

    def end(self, trial_id: str, how: str) -> None:
        rec = self.trials[trial_id]
        if rec["end"] is None:
            rec["end"] = STOPPED if rec["stopped_at_epoch"] is not None else how
            self.save()

    def decide(self, trial_id: str, epoch: int, ended: set[str] = frozenset()) -> str | None:
        """Decide ``trial_id`` at rung ``epoch`` (its value recorded), or None when an earlier trial of its group
        has neither reached the rung nor ended (``ended``: trial ids Tune has ended, besides the persisted
        endings). A decision is persisted, and never made twice."""
        done = self.decision(trial_id, epoch)
        if done is not None:
            return done
        rec, key = self.trials[trial_id], str(epoch)
        values = []
        mine = self.order(trial_id)
        for other in sorted(self.trials, key=self.order):
            if self.order(other) >= mine:
                break
            o = self.trials[other]
            if o["group"] != rec["group"]:
                continue
            if key in o["values"]:
                values.append(o["values"][key])
            elif o["end"] is None and other not in ended:
                return None  # an earlier trial may still reach this rung: wait for it
        c = cutoff(values, self.settings["reduction_factor"])
        value = rec["values"][key]
        decision = STOP if c is not None and value < c else CONTINUE
        rec["decisions"][key] = {"decision": decision, "cutoff": c, "compared": len(values)}
        if decision == STOP:
            rec["stopped_at_epoch"] = epoch
        self.data["log"].append({"trial_id": trial_id, "epoch": epoch, "value": value, "cutoff": c,
                                 "compared": len(values), "decision": decision})
        self.save()
        return decision

    def describe(self, trial_id: str) -> str:
        """One line of a trial's rung decisions, e.g. ``epoch 1: continue (0.41 ≥ 0.38, 2 earlier); ...``."""
        rec = self.trials.get(trial_id) or {"decisions": {}, "values": {}}
        parts = []
        for e in sorted(rec["decisions"], key=int):
            d, v = rec["decisions"][e], rec["values"][e]
            if d["cutoff"] is None:
                parts.append(f"epoch {e}: {d['decision']} ({v:.3f}, first at this rung)")
            else:
                op = "<" if d["decision"] == STOP else "≥"
                parts.append(f"epoch {e}: {d['decision']} ({v:.3f} {op} {d['cutoff']:.3f}, "
                             f"{d['compared']} earlier)")
        return "; ".join(parts)


def settings_of(sch: SchedulerConfig, epochs: int, per_config: bool) -> dict[str, Any]:
    return {"metric": sch.metric, "grace_epochs": sch.grace_epochs, "reduction_factor": sch.reduction_factor,
            "max_epochs": epochs, "milestones": list(sch.milestones(epochs)), "groups": "per-config" if per_config
            else "all"}


def make_scheduler(cfg: StudyConfig, path: Path):
    """The sweep's Tune scheduler for ``cfg.scheduler`` (None: FIFO)."""
    if cfg.scheduler.type != "asha":
        return None
    return AshaScheduler(path, settings_of(cfg.scheduler, cfg.training.epochs, cfg.selection.mode == "per-config"))


class AshaScheduler(TrialScheduler):
    """The Tune side of :class:`AshaState` (module docstring). Pickled with the experiment as its settings and
    the state file's path only; the rungs are read from the file."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        super().__init__()
        self._path = str(path)
        self._settings = settings
        self._metric = None  # Tune would insist on the metric in every result; validations are not every epoch
        self._reset()

    def _reset(self) -> None:
        self._state: AshaState | None = None
        self._trials: dict[str, Any] = {}  # trial id -> Tune Trial
        self._waiting: dict[str, int] = {}  # trial id -> rung epoch it waits at
        self._promoted: set[str] = set()  # paused trials whose wait ended in CONTINUE

    def __getstate__(self):
        return {"path": self._path, "settings": self._settings}

    def __setstate__(self, d):
        self.__init__(d["path"], d["settings"])

    @property
    def state(self) -> AshaState:
        if self._state is None:
            self._state = AshaState.open(Path(self._path), self._settings)
        return self._state

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    # ---------------------------------------------------------------------------------------- helpers

    def _ended(self) -> set[str]:
        return {tid for tid, t in self._trials.items() if t.status in ("ERROR", "TERMINATED")}

    def _settle(self, tune_controller) -> None:
        """Decide every waiting trial that can now be decided (grid order): stop or promote it."""
        ended = self._ended()
        for tid in sorted(self._trials):
            t = self._trials[tid]
            if t.status == "ERROR" and self.state.trials[tid]["end"] is None:
                self.state.end(tid, ERRORED)
        for tid in sorted(self._waiting, key=self.state.order):
            if tid not in self._waiting:  # settled by a nested call (stop_trial notifies this scheduler)
                continue
            decision = self.state.decide(tid, self._waiting[tid], ended)
            if decision is None:
                continue
            del self._waiting[tid]
            trial = self._trials[tid]
            if decision == CONTINUE:
                self._promoted.add(tid)  # choose_trial_to_run resumes it from its rung checkpoint
            elif trial.status in ("PAUSED", "PENDING") and not _pausing(tune_controller, trial):
                tune_controller.stop_trial(trial)
            # a RUNNING trial is stopped at its next result, one whose pause is still on its way once it is
            # PAUSED (choose_trial_to_run): stopped now, the pause's end would set it back to PAUSED for good

    # ---------------------------------------------------------------------------------------- Tune hooks

    def on_trial_add(self, tune_controller, trial) -> None:
        spec = trial.config.get("trial", {})
        self._trials[trial.trial_id] = trial
        if trial.config.get("order"):
            self.state.adopt(trial.config["order"], trial.trial_id, set(self._trials))
        self.state.register(trial.trial_id, label=trial_label(spec) if spec else trial.trial_id,
                            group=group_of(spec, self._settings["groups"] == "per-config") if spec else "all",
                            order=trial.config.get("order"))
        if trial.status == "ERROR":
            self.state.end(trial.trial_id, ERRORED)

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        tid = trial.trial_id
        self._promoted.discard(tid)
        if "epoch" not in result:
            return TrialScheduler.CONTINUE
        epoch = int(result["epoch"]) + 1  # the trial's own count of epochs done (survives resumes)
        state = self.state
        if state.stopped_at(tid) is not None:  # stopped before a kill, restored past its rung: stop again
            return TrialScheduler.STOP
        undecided = state.undecided(tid)  # a rung passed while the driver was down (restored past it)
        if undecided is None and epoch in state.milestones and state.decision(tid, epoch) is None:
            value = result.get(self._settings["metric"])
            if value is None:
                raise RuntimeError(f"ASHA: trial {trial} reported no {self._settings['metric']!r} at its rung "
                                   f"epoch {epoch} (scheduler.metric)")
            state.record(tid, epoch, value)
            undecided = epoch
        action = TrialScheduler.CONTINUE
        if undecided is not None:
            decision = state.decide(tid, undecided, self._ended())
            if decision is None:
                self._waiting[tid] = undecided
                action = TrialScheduler.PAUSE
            elif decision == STOP:
                action = TrialScheduler.STOP
        self._settle(tune_controller)
        return action

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        if (result or {}).get("training_done") or self.state.stopped_at(trial.trial_id) is not None:
            self.state.end(trial.trial_id, COMPLETED)  # `end` says stopped when it was
        self._waiting.pop(trial.trial_id, None)
        self._settle(tune_controller)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if self.state.stopped_at(trial.trial_id) is not None:
            self.state.end(trial.trial_id, STOPPED)
        self._waiting.pop(trial.trial_id, None)
        self._settle(tune_controller)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._waiting.pop(trial.trial_id, None)  # a retry starts from its checkpoint and reports again
        # Ray 2.60 calls this for a retry after setting the trial to ERROR (it is requeued right after), and for
        # the last failure before it stops the trial: only then the trial ends, and its end is kept now (left to
        # the next settle, the last trial to fail of a sweep was never recorded as ended)
        if trial.status != "ERROR":
            self.state.end(trial.trial_id, ERRORED)

    def choose_trial_to_run(self, tune_controller):
        self._settle(tune_controller)
        trials = sorted(self._trials.values(), key=lambda t: self.state.order(t.trial_id))
        for t in trials:  # stopped (before a kill, restored as PENDING; or while its pause was saved): never run
            if (t.status in ("PENDING", "PAUSED") and not _pausing(tune_controller, t)
                    and self.state.stopped_at(t.trial_id) is not None):
                tune_controller.stop_trial(t)
        for t in trials:
            if t.status == "PENDING":
                return t
        for t in trials:
            if t.status == "PAUSED" and t.trial_id in self._promoted:
                return t
        return None

    def debug_string(self) -> str:
        stopped = sum(r["stopped_at_epoch"] is not None for r in self.state.trials.values())
        return f"ASHA (rungs at epochs {self.state.milestones}, kept in {self._path}): {stopped} stopped"

"""TPE in rounds: a Ray Tune searcher whose suggestions are a function of the study's seed and its finished
rounds only, so a study killed mid-search and resumed runs exactly the trials an uninterrupted one runs.

Ray's own ``OptunaSearch`` asks Optuna once per trial as slots free up: its suggestions depend on which trials
happened to finish first (not reproducible under concurrency, nor across a kill), a restored Tuner dropped its
state in older Ray (ray#30861) and a trial a scheduler stopped while paused is completed without a result
(ray#15283: Optuna never learns its value). Here instead:

* every (loss, iw) configuration draws ``search.num_samples`` points in rounds of ``search.batch``; a round's
  points come from :func:`study.loader.tpe_points` (Optuna's ``TPESampler``, seeded by ``search.seed``, the
  configuration and the round, rebuilt from every earlier point and its score), each point runs with every
  seed (and fold), and the next round is asked only when every trial of the rounds before it has ended;
* a point's score is the mean over its trials of the selection metric (``selection.metric``/``scope``, as the
  select stage scores); a trial ASHA stopped is told with its last value (what it reported at its rung),
  whether it was running or paused when stopped; a point whose trials all failed is told as failed;
* the rounds' points are written to ``ray/<stage>-tpe.json`` before their trials exist (never a second set of
  suggestions), and what has been created and scored is read back from Tune's experiment on every (re)start,
  not from a pickled searcher state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from trainables.config import StudyConfig, TrialSpec
from trainables.io_utils import write_text_atomic


def points_file(storage: Path, name: str) -> Path:
    """Where the rounds of the TPE search of the Tune experiment ``storage/name`` are kept."""
    return Path(storage) / f"{name}-tpe.json"


def _key(spec: Mapping[str, Any]) -> str:
    return json.dumps(TrialSpec.from_dict(spec).as_dict(), sort_keys=True)


class RoundSearcher(Searcher):
    """Suggests the sweep's trials round by round (see the module's description)."""

    def __init__(self, cfg: StudyConfig, storage: Path, name: str, folds: int | None = None):
        super().__init__(metric=None, mode=None)
        self.cfg, self.storage, self.name, self.folds = cfg, str(storage), name, folds
        self._fresh()

    def _fresh(self) -> None:
        self._synced = False
        self._rounds: list[dict[str, list[dict[str, Any]]]] = []
        self._created: set[str] = set()
        self._ids: dict[str, str] = {}  # Tune trial id -> trial key
        self._values: dict[str, float | None] = {}  # trial key -> its score (None: failed or never measured)
        self._epochs: dict[str, dict[int, float]] = {}  # Tune trial id -> epoch -> metric reported

    # ---------------------------------------------------------------------------------------- the rounds

    def _confs(self):
        from study.loader import _Errors, search_configs

        return search_configs(self.cfg.search, _Errors(""))

    def _round_specs(self, r: int) -> list[TrialSpec]:
        from study.loader import specs_of

        out = []
        for conf in self._confs():
            for point in self._rounds[r].get(conf.name, []):
                out += specs_of(conf, point, self.cfg.search.seeds, self.folds)
        return out

    def _history(self) -> dict[str, list[tuple[dict[str, Any], float | None]]]:
        """Every point of the rounds so far with its mean score over its trials (None when none scored)."""
        from study.loader import specs_of

        out: dict[str, list[tuple[dict[str, Any], float | None]]] = {}
        for conf in self._confs():
            for rnd in self._rounds:
                for point in rnd.get(conf.name, []):
                    keys = [_key(s.as_dict()) for s in specs_of(conf, point, self.cfg.search.seeds, self.folds)]
                    scores = [self._values[k] for k in keys if self._values.get(k) is not None]
                    out.setdefault(conf.name, []).append((point, sum(scores) / len(scores) if scores else None))
        return out

    def _next_round(self) -> None:
        from study.loader import tpe_round_cells

        self._rounds.append(tpe_round_cells(self.cfg.search, self._confs(), len(self._rounds), self._history()))
        self._save_rounds()

    def _save_rounds(self) -> None:
        write_text_atomic(points_file(Path(self.storage), self.name),
                          json.dumps({"search": self.cfg.search.model_dump(mode="json"), "rounds": self._rounds},
                                     indent=1) + "\n")

    def _score(self, epochs: Mapping[int, float]) -> float | None:
        from study.tune.tuner import trial_score

        sel = self.cfg.selection
        history = [{"epoch": e, sel.metric: v} for e, v in sorted(epochs.items())]
        return trial_score(history, sel.metric, sel.scope)

    def _sync(self) -> None:
        """What the rounds are (their file) and which of their trials Tune has, and their scores (its experiment
        on disk: the state this driver restored)."""
        from study.tune.tuner import outcomes, trial_score

        self._fresh()
        self._synced = True
        path = points_file(Path(self.storage), self.name)
        if path.is_file():
            self._rounds = json.loads(path.read_text())["rounds"]
        sel = self.cfg.selection
        for r in outcomes(Path(self.storage), self.name):
            key = _key(r.spec)
            self._created.add(key)
            self._ids[r.trial_id] = key
            if r.status in ("TERMINATED", "STOPPED"):
                self._values[key] = trial_score(r.history, sel.metric, sel.scope)
            elif r.status == "ERROR":
                self._values[key] = None
            else:  # unfinished: it runs again from its checkpoint; what it reported so far counts
                self._epochs[r.trial_id] = {int(h["epoch"]): float(h[sel.metric]) for h in r.history
                                            if h.get(sel.metric) is not None and "epoch" in h}

    # ----------------------------------------------------------------------------------- Tune's interface

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not self._synced:
            self._sync()
        while True:
            if not self._rounds:
                self._next_round()
            for r in range(len(self._rounds)):
                for i, spec in enumerate(self._round_specs(r)):
                    key = _key(spec.as_dict())
                    if key not in self._created:
                        self._created.add(key)
                        self._ids[trial_id] = key
                        # Tune's ids of searched trials are random: ASHA's "earlier trials" follow this order
                        return {"trial": spec.as_dict(), "order": f"r{r:03d}-{i:05d}"}
            if len(self._rounds) >= self.cfg.search.rounds:
                return Searcher.FINISHED
            if any(key not in self._values for key in self._created):
                return None  # the next round waits for every trial of this one
            self._next_round()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._synced:
            self._sync()
        value = result.get(self.cfg.selection.metric)
        if value is not None and "epoch" in result:
            self._epochs.setdefault(trial_id, {})[int(result["epoch"])] = float(value)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if not self._synced:
            self._sync()
        key = self._ids.get(trial_id)
        if key is None:
            return
        epochs = dict(self._epochs.get(trial_id, {}))
        if result and result.get(self.cfg.selection.metric) is not None and "epoch" in result:
            epochs[int(result["epoch"])] = float(result[self.cfg.selection.metric])
        # a trial stopped while paused comes without a result: its last reported value is its score
        self._values[key] = None if error else self._score(epochs)

    # the rounds and the scores are read back from the study folder and Tune's experiment on every start
    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"rounds": len(self._rounds)}))

    def restore(self, checkpoint_path: str) -> None:
        self._fresh()

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        self._fresh()

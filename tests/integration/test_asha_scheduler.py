"""study.tune.asha.AshaScheduler in a real Tune run: whatever order trials reach a rung in, the decisions are the ones
Ray's own ASHA bracket makes when the same values arrive one after another in grid order.

The trainable is synthetic (no network: each epoch sleeps and reports a value fixed by the trial's config) so
the arrival order can be forced: the first three trials are slow at first (trial 2 holds its first epoch until
trial 5 has reached the first rung), so later trials reach the first rung before the trials they are judged
against and have to wait (PAUSE) for them.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest

from study.tune.asha import AshaScheduler, AshaState, settings_of
from trainables.config import SchedulerConfig

pytestmark = pytest.mark.integration

EPOCHS = 9
SCHED = SchedulerConfig(type="asha", metric="val_avg_recall", grace_epochs=1, reduction_factor=3)
# (iw, value per epoch): the value curve of each trial
CURVES = [
    (False, [0.30, 0.40, 0.50, 0.55, 0.60, 0.62, 0.64, 0.65, 0.66]),
    (False, [0.20, 0.45, 0.46, 0.47, 0.48, 0.49, 0.50, 0.51, 0.52]),
    (True, [0.50, 0.50, 0.50, 0.50, 0.50, 0.50, 0.50, 0.50, 0.50]),
    (False, [0.25, 0.38, 0.60, 0.61, 0.62, 0.63, 0.64, 0.65, 0.70]),
    (False, [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90]),
    (True, [0.60, 0.60, 0.70, 0.70, 0.70, 0.70, 0.70, 0.70, 0.70]),
    (False, [0.33, 0.52, 0.53, 0.54, 0.55, 0.56, 0.57, 0.58, 0.59]),
    (True, [0.45, 0.45, 0.40, 0.40, 0.40, 0.40, 0.40, 0.40, 0.40]),
]


def _trainable(config):
    from ray import tune

    i = config["trial"]["seed"]  # the seed is the trial's index in CURVES
    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads((Path(d) / "state.json").read_text())["epoch"] + 1
    if start:
        with open(config["arrivals"], "a") as fh:
            fh.write(f"restart {i} {start}\n")
    for epoch in range(start, EPOCHS):
        # later trials reach the first rung before trials 0-2 do; trial 2 (the first of its group) holds its first
        # epoch until trial 5 has reached the rung, so trial 5 waits for it and is then promoted, however slowly
        # the workers start on a loaded machine
        if i == 2 and epoch == 0:
            _wait_for_line(config["arrivals"], "5 1 ", timeout=180.0)
        time.sleep({0: 3.0, 1: 3.0}.get(i, 0.1) if epoch == 0 else 0.1)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "state.json").write_text(json.dumps({"epoch": epoch}))
            with open(config["arrivals"], "a") as fh:  # when this trial reached the end of this epoch
                fh.write(f"{i} {epoch + 1} {time.time()}\n")
            tune.report({"epoch": epoch, "val_avg_recall": CURVES[i][1][epoch], "training_done": epoch + 1 == EPOCHS},
                        checkpoint=tune.Checkpoint.from_directory(d))


def _wait_for_line(path: str, prefix: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(path).is_file() and any(line.startswith(prefix) for line in Path(path).read_text().splitlines()):
            return
        time.sleep(0.1)
    raise RuntimeError(f"no line starting {prefix!r} in {path} within {timeout} s")


def _serial_decisions() -> dict[int, int | None]:
    """Ray's ASHA bracket fed the values trial by trial in grid order, one bracket per group: trial -> the rung
    epoch where it stopped (None: ran to the end)."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    class _T:
        def __init__(self, i):
            self.trial_id = f"t{i}"

    brackets = {g: _Bracket(min_t=1, max_t=EPOCHS, reduction_factor=3, s=0) for g in (False, True)}
    out = {}
    for i, (group, curve) in enumerate(CURVES):
        out[i] = None
        for m in SCHED.milestones(EPOCHS):
            if brackets[group].on_result(_T(i), m, curve[m - 1]) == TrialScheduler.STOP:
                out[i] = m
                break
    return out


def test_decisions_equal_serial_asha_whatever_the_arrival_order(tmp_path, no_leftover_processes):
    import ray
    from ray import tune

    expected = _serial_decisions()
    assert any(v is not None for v in expected.values()) and any(v is None for v in expected.values())
    arrivals = tmp_path / "arrivals.txt"
    state_path = tmp_path / "sweep-asha.json"
    scheduler = AshaScheduler(state_path, settings_of(SCHED, EPOCHS, per_config=True))
    space = {"arrivals": str(arrivals), "trial": tune.grid_search(
        [{"loss": "bce", "iw": iw, "params": {}, "seed": i} for i, (iw, _) in enumerate(CURVES)])}
    if ray.is_initialized():  # another test's Ray in this process (2 CPUs): this test needs 4 slots
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        tuner = tune.Tuner(tune.with_resources(_trainable, {"cpu": 1}), param_space=space,
                           tune_config=tune.TuneConfig(scheduler=scheduler),
                           run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="asha", verbose=0))
        grid = tuner.fit()
    finally:
        ray.shutdown()
    assert not grid.errors
    state = AshaState.read(state_path)
    by_index = {}
    for result in grid:
        by_index[result.config["trial"]["seed"]] = result.metrics["trial_id"]
    got = {i: state.stopped_at(tid) for i, tid in by_index.items()}
    assert got == expected
    # every trial ended: stopped ones at their rung (last epoch reported = the rung), the others at the end
    for result in grid:
        i = result.config["trial"]["seed"]
        assert result.metrics["epoch"] + 1 == (expected[i] or EPOCHS), i
    # the forced order: a trial reached the first rung before an earlier trial of its group did
    first = {}
    lines = arrivals.read_text().splitlines()
    # a trial that waited and was then promoted resumed from its rung checkpoint (Tune's PAUSE, then unpause)
    assert any(line.startswith("restart ") for line in lines), "no waiting trial was promoted"
    for line in lines:
        if line.startswith("restart "):
            continue
        i, epoch, t = line.split()
        if int(epoch) == 1:
            first.setdefault(int(i), float(t))
    assert any(first[j] < first[i] for i in first for j in first if j > i and CURVES[i][0] == CURVES[j][0]), \
        "every trial reached the first rung in grid order: the test did not exercise the grid-order rule"

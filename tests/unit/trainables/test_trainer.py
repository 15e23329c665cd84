"""The trial's training loop without Ray (``run_trial`` with a recording ``report``): what reaches the loss,
the optimiser and lr schedule it really runs, when validation metrics exist, and resume == uninterrupted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from study.loader import config_from_dict
from study.tune.space import study_payload
from trainables.build import STATE_FILE, build_model, load_state
from trainables.config import TrialConfig
from trainables.data import Cache, PatchSampler, make_phantom, prepare_cache
from trainables.losses import get_loss
from trainables.step import Precision
from trainables.trainable import run_trial

TINY = {
    "data": {"source": "phantom", "phantom": {"cases": 6, "seed": 0, "shape": [24, 32, 32]}},
    "model": {"width": 0.125},
    "training": {"epochs": 2, "iterations": 2, "patch_size": [16, 16, 16],
                 "lr_schedule": {"milestones": [1], "gamma": 0.1}},
    "inference": {"window": [24, 32, 32], "stride": [24, 32, 32]},
    "search": {"losses": {"dice": {"iw": [False, True]}}, "seeds": [3]},
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("trial")
    manifest = make_phantom(root / "phantom", n_cases=6, seed=0, shape=(24, 32, 32))
    prepare_cache(manifest, root / "cache", progress=False)
    return str(root / "cache")


def _config(cache_dir: str, *, loss="dice", iw=True, validate=False, epochs=None, **changes) -> dict:
    data = json.loads(json.dumps(TINY))
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    cfg = config_from_dict(data)
    trial = next(t for t in cfg.trials if t.loss == loss and t.iw == iw)
    return {"trial": trial.as_dict(), "study": study_payload(cfg, cache_dir),
            "run": {"stage": "sweep", "splits": ["train"], "validate": validate,
                    "epochs": epochs or cfg.training.epochs}}


class Recorder:
    """``report`` of run_trial: keeps every epoch's metrics and the checkpoint's state."""

    def __init__(self):
        self.metrics: list[dict] = []
        self.states: list[dict] = []

    def __call__(self, metrics, ckpt_dir):
        self.metrics.append(dict(metrics))
        self.states.append(load_state(ckpt_dir))
        assert (Path(ckpt_dir) / STATE_FILE).is_file()


def _first_batch_loss(config, weighted: bool, power: float = 1.0) -> float:
    """The loss of the sampler's first batch under the trial's initial model, recomputed from outside."""
    study, trial = config["study"], config["trial"]
    t = study["training"]
    torch.manual_seed(trial["seed"])
    typed = TrialConfig.from_dict(config)
    model = build_model(typed.study.model, typed.study.training.patch_size)
    cache = Cache(study["data"]["cache_dir"])
    sampler = PatchSampler(cache, cache.case_ids(["train"]), patch_size=tuple(t["patch_size"]),
                           batch_size=t["batch_size"], iw=True, iw_clip=tuple(study["iw"]["clip"]),
                           iw_power=power, lesion_prob=t["lesion_prob"], seed=trial["seed"], num_workers=0)
    batch = sampler.batch(0)
    assert (batch.weight > 1).any(), "the first batch holds no lesion: the test would prove nothing"
    loss_fn = get_loss(trial["loss"], **{k: v for k, v in trial["params"].items() if "." not in k})
    with torch.no_grad():
        logits = model(torch.from_numpy(batch.image))
        weight = torch.from_numpy(batch.weight) if weighted else None
        return float(loss_fn(logits, torch.from_numpy(batch.target), weight))


def test_the_iw_map_reaches_the_loss(cache_dir):
    """One iteration: the trial's loss is the first batch's loss *with* its iw map, and differs without it."""
    config = _config(cache_dir, iw=True, epochs=1, training={"iterations": 1})
    rec = Recorder()
    run_trial(config, state=None, report=rec)
    reported = rec.metrics[0]["train_loss"]
    assert reported == pytest.approx(_first_batch_loss(config, weighted=True), rel=1e-5)
    assert abs(reported - _first_batch_loss(config, weighted=False)) > 1e-3


def test_a_trials_iw_power_and_lr_reach_the_sampler_and_the_optimiser(cache_dir):
    """A search space's iw.power and optimizer.lr for one trial: the first batch's loss is weighted by the
    softened map (p = 0.5), not the paper's, and the optimiser runs at the trial's lr."""
    config = _config(cache_dir, iw=True, epochs=1, training={"iterations": 1})
    config["trial"]["params"] = {**config["trial"]["params"], "iw.power": 0.5, "optimizer.lr": 0.03}
    rec = Recorder()
    run_trial(config, state=None, report=rec)
    reported = rec.metrics[0]["train_loss"]
    assert reported == pytest.approx(_first_batch_loss(config, weighted=True, power=0.5), rel=1e-5)
    assert abs(reported - _first_batch_loss(config, weighted=True)) > 1e-3
    assert rec.metrics[0]["lr"] == pytest.approx(0.03)


def test_a_plain_trial_gets_no_weight(cache_dir):
    config = _config(cache_dir, iw=False, epochs=1, training={"iterations": 1})
    rec = Recorder()
    run_trial(config, state=None, report=rec)
    assert rec.metrics[0]["train_loss"] == pytest.approx(_first_batch_loss(config, weighted=False), rel=1e-5)


def test_optimiser_settings_and_lr_drop(cache_dir):
    """SGD as configured; lr × gamma from the milestone epoch on (0-based), stepped once per epoch."""
    config = _config(cache_dir, epochs=3, training={"iterations": 1, "lr_schedule": {"milestones": [1], "gamma": 0.1},
                                                    "optimizer": {"lr": 0.05, "momentum": 0.8, "nesterov": True,
                                                                  "weight_decay": 1e-4}})
    rec = Recorder()
    run_trial(config, state=None, report=rec)
    assert [m["lr"] for m in rec.metrics] == pytest.approx([0.05, 0.005, 0.005])
    group = rec.states[-1]["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"], group["dampening"]) == (0.8, True, 1e-4, 0)
    assert group["lr"] == pytest.approx(0.005)  # after the third epoch's step: still the one drop
    assert rec.states[-1]["scheduler"]["milestones"] == {1: 1}


def test_paper_protocol_drops_lr_at_epoch_80():
    """The paper's schedule (defaults): lr 1e-2 for epochs 0..79, 1e-3 from epoch 80 on."""
    from trainables.build import build_lr_schedule, build_optimizer

    cfg = config_from_dict({"search": {"losses": {"bce": {}}}}).training
    opt = build_optimizer(torch.nn.Linear(1, 1), cfg.optimizer)
    sched = build_lr_schedule(opt, cfg.lr_schedule)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:80] == pytest.approx([1e-2] * 80) and lrs[80:] == pytest.approx([1e-3] * 20)
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9


def test_validation_metrics_only_at_validated_epochs(cache_dir):
    config = _config(cache_dir, validate=True, epochs=5, training={"iterations": 1}, validation={"every": 2})
    rec = Recorder()
    run_trial(config, state=None, report=rec)
    has_val = [any(k.startswith("val_") for k in m) for m in rec.metrics]
    assert has_val == [False, True, False, True, True]  # epochs 2 and 4 (every 2) and the last; no stale copy


@pytest.mark.parametrize("network", [{}, {"network": "dynunet", "deep_supervision": True},
                                     {"network": "segresnet"}], ids=["unet2020", "dynunet-ds", "segresnet"])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_trial(cache_dir, monkeypatch, network):
    """Two epochs straight == one epoch, then a resume from its checkpoint, for every network of the registry;
    with fp16 + GradScaler (forced on the CPU) the scaler's state travels in the checkpoint."""
    monkeypatch.setattr(Precision, "for_device", classmethod(lambda cls, device, amp: cls("cpu", torch.float16)))
    config = _config(cache_dir, epochs=2, model=network)
    straight = Recorder()
    run_trial(config, state=None, report=straight)
    first = Recorder()

    def stop_after_first_epoch(metrics, ckpt_dir):  # the driver is killed right after epoch 1's checkpoint
        first(metrics, ckpt_dir)
        raise _Stop

    with pytest.raises(_Stop):
        run_trial(config, state=None, report=stop_after_first_epoch)
    assert first.states[0]["scaler"]["scale"] > 0  # the GradScaler's state is in the checkpoint
    resumed = Recorder()
    run_trial(config, state=first.states[0], report=resumed)
    assert [m["epoch"] for m in resumed.metrics] == [1]
    assert resumed.metrics[0]["train_loss"] == straight.metrics[1]["train_loss"]
    assert resumed.states[-1]["scaler"] == straight.states[-1]["scaler"]
    for key, value in straight.states[-1]["model"].items():
        assert torch.equal(resumed.states[-1]["model"][key], value), key


class _Stop(Exception):
    pass


# ---------------------------------------------------------------------------------------------- hooks


def test_a_fault_injected_into_the_train_step_hook_ends_the_trial(cache_dir):
    """The loop has no test branch: a test replaces the ``train_step`` hook, and a NaN from it ends the trial
    with TrialDivergedError after the epochs before it were reported."""
    from trainables.trainer import Trainer, TrialDivergedError

    rec = Recorder()
    trainer = Trainer(TrialConfig.from_dict(_config(cache_dir, epochs=3, training={"iterations": 2})), report=rec)
    real, steps = trainer.train_step, []

    def third_step_diverges(batch):
        steps.append(batch)
        return torch.tensor(float("nan")) if len(steps) == 3 else real(batch)

    trainer.train_step = third_step_diverges
    with pytest.raises(TrialDivergedError, match=r"non-finite training loss \(nan\) at epoch 1, iteration 0"):
        trainer.fit()
    assert [m["epoch"] for m in rec.metrics] == [0]


def test_the_studys_testing_faults_count_global_iterations_across_a_resume(cache_dir):
    """``testing.nan_at_iteration`` counts iterations from the trial's start, also in a resumed trainer; only
    the listed configurations get the fault."""
    from trainables.config import TestingConfig
    from trainables.trainer import Trainer, TrialDivergedError, inject_faults

    cfg = TrialConfig.from_dict(_config(cache_dir, iw=True, epochs=3, training={"iterations": 2}))
    first = Recorder()

    def stop_after_first_epoch(metrics, ckpt_dir):
        first(metrics, ckpt_dir)
        raise _Stop

    with pytest.raises(_Stop):
        Trainer(cfg, report=stop_after_first_epoch).fit()
    faults = TestingConfig(nan_at_iteration=5, nan_configs=("iw-dice",))
    resumed = Recorder()
    trainer = inject_faults(Trainer(cfg, state=first.states[0], report=resumed), faults)
    with pytest.raises(TrialDivergedError, match="at epoch 2, iteration 1"):  # global iteration 5 = 2 * 2 + 1
        trainer.fit()
    assert [m["epoch"] for m in resumed.metrics] == [1]
    other = Recorder()  # a configuration not listed runs to the end
    inject_faults(Trainer(cfg.model_copy(update={"trial": cfg.trial.model_copy(update={"iw": False})}),
                          state=first.states[0], report=other), faults).fit()
    assert [m["epoch"] for m in other.metrics] == [1, 2]


@pytest.mark.parametrize("loss", ["blob", "cc_dice_ce"])
def test_per_lesion_losses_get_the_samplers_labels(cache_dir, loss):
    """One iteration of a per-lesion loss: the trial's loss is the first batch's loss computed with the
    cropped instance labels (or their Voronoi regions) that the sampler yields, not labelled in the step."""
    from trainables.losses import loss_record

    data = json.loads(json.dumps(TINY))
    data["search"] = {"losses": {loss: {}}, "seeds": [3]}
    data["training"] = {**data["training"], "iterations": 1, "epochs": 1, "lr_schedule": {"milestones": []}}
    cfg = config_from_dict(data)
    config = {"trial": cfg.trials[0].as_dict(), "study": study_payload(cfg, cache_dir),
              "run": {"stage": "sweep", "splits": ["train"], "validate": False, "epochs": 1}}
    rec = Recorder()
    run_trial(config, state=None, report=rec)
    typed = TrialConfig.from_dict(config)
    torch.manual_seed(3)
    model = build_model(typed.study.model, typed.study.training.patch_size)
    cache = Cache(cache_dir)
    t = typed.study.training
    needs = loss_record(loss).needs
    batch = PatchSampler(cache, cache.case_ids(["train"]), patch_size=t.patch_size, batch_size=t.batch_size,
                         iw=False, lesion_prob=t.lesion_prob, seed=3, num_workers=0, extras=needs).batch(0)
    extras = {k: torch.from_numpy(v) for k, v in batch.extras(needs).items()}
    with torch.no_grad():
        expected = get_loss(loss)(model(torch.from_numpy(batch.image)), torch.from_numpy(batch.target), **extras)
    assert rec.metrics[0]["train_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_a_trial_in_a_reused_process_trains_bit_for_bit_like_a_fresh_one(cache_dir, tmp_path):
    """Tune reuses a trial's process for the next trial (reuse_actors): a trial run after another one in the same
    process (other loss, other seed, other threads, the global generators advanced, an iw sampler before it)
    reports the same losses and validation records and ends with the same weights as in a fresh process."""
    import subprocess
    import sys

    config = _config(cache_dir, loss="dice", iw=True, validate=True)
    other = _config(cache_dir, loss="dice", iw=False, validate=True)
    other["trial"]["seed"] = 11
    torch.set_num_threads(2)
    torch.rand(5)
    run_trial(other, state=None, report=Recorder())  # the previous trial of the actor
    reused = Recorder()
    run_trial(config, state=None, report=reused)
    script = tmp_path / "fresh.py"
    script.write_text(
        "import json, sys, torch\n"
        "from tests.unit.trainables.test_trainer import Recorder\n"
        "from trainables.trainable import run_trial\n"
        "rec = Recorder()\n"
        "run_trial(json.loads(sys.argv[1]), state=None, report=rec)\n"
        "torch.save({'metrics': rec.metrics, 'model': rec.states[-1]['model']}, sys.argv[2])\n")
    out = tmp_path / "fresh.pt"
    from tests.conftest import PROJECT_ROOT

    res = subprocess.run([sys.executable, str(script), json.dumps(config), str(out)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    fresh = torch.load(out, weights_only=False)
    strip = lambda ms: [{k: v for k, v in m.items() if "seconds" not in k and not k.startswith("phase_")}  # noqa: E731
                        for m in ms]
    assert strip(reused.metrics) == strip(fresh["metrics"]) and any("val_avg_recall" in m for m in reused.metrics)
    for key, value in fresh["model"].items():
        assert torch.equal(reused.states[-1]["model"][key], value), key


def test_a_trial_process_drops_only_the_systemexit_of_an_actor_that_ended(capsys):
    """Ray ends a finished (reused) trial actor with SystemExit, which can surface as "Exception ignored"; the trial
    process's unraisable hook drops that one and reports any other."""
    import sys

    from trainables.trainable import _quiet_actor_exit

    class Raises:  # its finaliser raises: Python hands the exception to sys.unraisablehook
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    hook = sys.unraisablehook
    sys.unraisablehook = _quiet_actor_exit
    try:
        Raises(SystemExit(1))
        assert capsys.readouterr().err == ""
        Raises(ValueError("a real problem"))
        assert "ValueError: a real problem" in capsys.readouterr().err
    finally:
        sys.unraisablehook = hook

"""Adding a loss touches two places, its function and its record: a toy loss registered here (and nothing else)
is validated by the config, labelled in ``study launch --dry-run``, logged as MLflow params by the driver's
callback and listed by ``study catalog``; the catalog page (docs/catalog.md) is what the records say."""

from __future__ import annotations

import pytest
import torch
import yaml

from study.cli import main
from study.cli.catalog import markdown
from study.loader import config_from_dict
from study.tune.space import study_payload
from tests.conftest import PROJECT_ROOT
from trainables.errors import ConfigError
from trainables.losses import LOSSES, LossRecord, get_loss, number, register_loss

CATALOG = PROJECT_ROOT / "docs" / "catalog.md"


def toy_l1_loss(logits, target, weight=None, scale: float = 1.0):
    """``scale * mean(w |sigmoid(x) - y|)``: a loss no module of the project knows."""
    err = (torch.sigmoid(logits) - target.to(logits.dtype)).abs()
    return scale * (err if weight is None else err * weight).mean()


@pytest.fixture
def toy():
    record = register_loss(LossRecord("toy_l1", toy_l1_loss, iw=True, doc="mean absolute error of p",
                                      params=(number("scale", "factor on the loss", gt=0),)))
    yield record
    LOSSES.pop("toy_l1")


def test_a_registered_loss_is_validated_and_enumerated(toy):
    cfg = config_from_dict({"search": {"losses": {"toy_l1": {"iw": [False, True], "scale": [1, 2.5]}}}})
    assert [t.label for t in cfg.trials] == ["toy_l1[scale=1]/s0", "iw-toy_l1[scale=1]/s0",
                                             "toy_l1[scale=2.5]/s0", "iw-toy_l1[scale=2.5]/s0"]
    assert cfg.trials[0].params == {"scale": 1.0} and isinstance(cfg.trials[0].params["scale"], float)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"search": {"losses": {"toy_l1": {"scale": -1}}}}, source="s.yaml")
    assert str(err.value).startswith("s.yaml: search.losses.toy_l1.scale: ") and "> 0" in str(err.value)
    with pytest.raises(ConfigError, match="unknown parameter"):
        config_from_dict({"search": {"losses": {"toy_l1": {"gamma": 2}}}})
    logits, target = torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2)
    assert float(get_loss("toy_l1", scale=2.0)(logits, target)) == pytest.approx(1.0)  # 2 * |0.5 - 1|


def test_a_registered_loss_is_labelled_by_launch_dry_run(toy, tmp_path, capsys):
    space = tmp_path / "toy.yaml"
    space.write_text(yaml.safe_dump({
        "model": {"width": 0.125}, "training": {"epochs": 1, "iterations": 1, "patch_size": [16, 16, 16]},
        "search": {"losses": {"toy_l1": {"iw": [False, True], "scale": 3}}}}))
    assert main(["launch", str(space), "--dry-run", "--storage", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "  toy_l1[scale=3]/s0" in out and "  iw-toy_l1[scale=3]/s0" in out
    assert "training step on this machine" in out  # the step was timed with the toy loss
    assert not (tmp_path / "s").exists()


def test_a_registered_loss_reaches_mlflow_params(toy, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from study.tune.callbacks import StudyCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    cfg = config_from_dict({"search": {"losses": {"toy_l1": {"iw": True, "scale": 0.5}}}})

    class _Trial:
        status, trial_id = "RUNNING", "toy_00000"
        config = {"trial": cfg.trials[0].as_dict(), "study": study_payload(cfg, "/nowhere"),
                  "run": {"stage": "sweep", "splits": ["train"], "validate": True, "epochs": 1,
                          "experiment_id": exp, "parent_run_id": None, "study_id": "s1"}}

    trial = _Trial()
    StudyCallback("sweep").on_trial_result(0, [trial], trial, {"epoch": 0, "epochs": 1, "train_loss": 0.3})
    (run,) = client.search_runs([exp])
    params = run.data.params
    assert (params["loss"], params["iw"], params["config"], params["toy_l1.scale"]) == (
        "toy_l1", "true", "iw-toy_l1[scale=0.5]", "0.5")
    assert run.info.run_name == "sweep:iw-toy_l1[scale=0.5]/s0"


def test_catalog_lists_a_registered_loss(toy, capsys):
    assert main(["catalog"]) == 0
    out = capsys.readouterr().out
    assert "toy_l1" in out and "mean absolute error of p" in out and "scale = 1.0" in out


def test_the_catalog_page_is_what_the_records_say():
    text = CATALOG.read_text()
    assert markdown() in text, "docs/catalog.md is stale: paste `study catalog --markdown` into it"


def test_the_strict_rule_takes_its_records_default_and_range():
    from trainables.config import StrictRuleConfig

    assert [StrictRuleConfig(rule=r).threshold for r in ("iou", "fraction", "hungarian", "one-to-one")] == \
        [0.3, 0.5, 0.5, None]
    with pytest.raises(ConfigError, match=r"s\.yaml: evaluation\.strict\.threshold: must be in \(0, 1\]"):
        config_from_dict({"search": {"configs": ["bce"]},
                          "evaluation": {"strict": {"rule": "one-to-one", "threshold": 5}}}, source="s.yaml")


def test_an_unknown_parameter_is_named_not_one_the_message_lists():
    with pytest.raises(ConfigError, match=r"^s\.yaml: search\.losses\.focal\.beta: .*unknown parameter"):
        config_from_dict({"search": {"losses": {"focal": {"alpha": 0.5, "beta": 1.0}}}}, source="s.yaml")
    with pytest.raises(ConfigError, match=r"^s\.yaml: search\.losses\.focal\.alpha: focal: alpha must be"):
        config_from_dict({"search": {"losses": {"focal": {"gamma": 1.0, "alpha": 2.0}}}}, source="s.yaml")


def test_a_losss_defaults_are_its_functions_and_a_bound_loss_checks_once():
    """The defaults are written once, in the function's signature (the record reads them); get_loss checks the
    parameters and binds the function under the direct-call check, so a training step checks nothing again."""
    import inspect

    from trainables.losses import LOSSES, focal_loss, get_loss

    for name, record in LOSSES.items():
        fn = getattr(record.fn, "__wrapped__", record.fn)
        sig = inspect.signature(fn).parameters
        assert record.defaults() == {p.name: p.canonical(sig[p.name].default) for p in record.params}, name
    bound = get_loss("focal", alpha=0.5)
    assert bound.func is focal_loss.__wrapped__ and bound.keywords == {"alpha": 0.5}
    with pytest.raises(ValueError, match="differ"):  # a record that does not match its function is refused
        register_loss(LossRecord("toy_bad", toy_l1_loss, iw=True, doc="x",
                                 params=(number("gain", "not a parameter of the function", gt=0),)))
    assert "toy_bad" not in LOSSES

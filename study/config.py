"""Study configuration: a search-space YAML validated into typed objects before anything starts.

Every error names the file and the dotted key (``demo.yaml: training.epochs: ...``) and is a
:class:`~trainables.errors.ConfigError`, which the command line turns into exit code 2.

The YAML is plain data (read with ``yaml.safe_load``); defaults are written here, in one place, and the
frozen, fully resolved config is written into the study folder so that a resumed study runs exactly the
same thing. See ``search_spaces/demo.yaml`` for an annotated example.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainables.errors import ConfigError
from trainables.naming import config_name, trial_folder, trial_label

# ---------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class PhantomConfig:
    """The built-in synthetic dataset (generated into the study folder)."""

    cases: int = 16
    seed: int = 0
    shape: tuple[int, int, int] = (48, 64, 64)
    contrast: tuple[float, float] = (0.14, 0.40)  # lesion brightness above the organ: (smallest, largest)
    noise: float = 0.05

    def check(self, err) -> None:
        if self.cases < 4:
            err("cases", "needs at least 4 cases (train, val and holdout must be non-empty)")
        if any(s < 8 for s in self.shape):
            err("shape", "every side must be at least 8 voxels")
        if not 0 < self.contrast[0] <= self.contrast[1]:
            err("contrast", "must be [small, large] with 0 < small <= large")
        if not 0 <= self.noise < 1:
            err("noise", "must be in [0, 1)")


@dataclass(frozen=True)
class DataConfig:
    """Where the cases come from and which splits each stage uses.

    ``source``: ``phantom`` (generated, the default), ``cache`` (a folder made by ``study data ...``)
    or ``manifest`` (a CSV prepared into the study folder with ``preset``).
    """

    source: str = "phantom"
    path: str | None = None
    preset: str = "none"
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    train: tuple[str, ...] = ("train",)
    val: tuple[str, ...] = ("val",)
    holdout: tuple[str, ...] = ("holdout",)

    def check(self, err) -> None:
        if self.source not in ("phantom", "cache", "manifest"):
            err("source", f"unknown source {self.source!r}; known: phantom, cache, manifest")
        if self.source in ("cache", "manifest") and not self.path:
            err("path", f"is required when source is {self.source!r}")
        if self.source == "phantom" and self.path:
            err("path", "is only used with source 'cache' or 'manifest'")
        if self.preset not in ("none", "luna16", "lits"):
            err("preset", f"unknown preset {self.preset!r}; known: none, luna16, lits")
        for key in ("train", "val", "holdout"):
            if not getattr(self, key):
                err(key, "needs at least one split name")


@dataclass(frozen=True)
class ModelConfig:
    """The authors' U-Net; ``width`` scales every channel count (1.0 = 11,074,306 parameters).

    ``channels_last``: run in ``torch.channels_last_3d`` memory format; null = on CPU only (faster there).
    """

    width: float = 1.0
    in_channels: int = 1
    channels_last: bool | None = None

    def check(self, err) -> None:
        if not 0 < self.width <= 4:
            err("width", "must be in (0, 4]")


@dataclass(frozen=True)
class OptimizerConfig:
    """SGD as in the paper (Nesterov momentum 0.9, lr 1e-2)."""

    lr: float = 1e-2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0

    def check(self, err) -> None:
        if self.lr <= 0:
            err("lr", "must be > 0")
        if not 0 <= self.momentum < 1:
            err("momentum", "must be in [0, 1)")
        if self.nesterov and self.momentum == 0:
            err("nesterov", "Nesterov momentum needs momentum > 0")
        if self.weight_decay < 0:
            err("weight_decay", "must be >= 0")


@dataclass(frozen=True)
class LrScheduleConfig:
    """Step schedule: lr is multiplied by ``gamma`` from each 0-based epoch in ``milestones`` on."""

    milestones: tuple[int, ...] = (80,)
    gamma: float = 0.1

    def check(self, err) -> None:
        if any(m < 0 for m in self.milestones):
            err("milestones", "epochs must be >= 0")
        if list(self.milestones) != sorted(set(self.milestones)):
            err("milestones", "must be strictly increasing")
        if not 0 < self.gamma <= 1:
            err("gamma", "must be in (0, 1]")


@dataclass(frozen=True)
class TrainingConfig:
    """The training protocol (SPEC §4); every number is a value here, presets shrink them.

    ``amp``: mixed precision on GPUs (bf16 autocast where supported, else fp16 with loss scaling); CPU trials
    run float32 (bf16 CPU training measured unreliable, see ``trainables.step``); not in the paper.
    """

    epochs: int = 100
    iterations: int = 100
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (128, 128, 128)
    lesion_prob: float = 0.5
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LrScheduleConfig = field(default_factory=LrScheduleConfig)
    amp: bool = False
    sampler_workers: int = 1

    def check(self, err) -> None:
        for key in ("epochs", "iterations", "batch_size"):
            if getattr(self, key) < 1:
                err(key, "must be a positive integer")
        if any(s < 8 or s % 8 for s in self.patch_size):
            err("patch_size", "every side must be a positive multiple of 8 (the U-Net pools three times)")
        if not 0 <= self.lesion_prob <= 1:
            err("lesion_prob", "must be in [0, 1]")
        if self.sampler_workers < 0:
            err("sampler_workers", "must be >= 0")


@dataclass(frozen=True)
class IwConfig:
    """Inverse weighting: ``clip: [1, 200000]`` (authors, default) or ``clip: null`` (paper's Eq. 1)."""

    clip: tuple[float, float] | None = (1.0, 2e5)

    def check(self, err) -> None:
        if self.clip is not None and not 0 <= self.clip[0] < self.clip[1]:
            err("clip", "must be [low, high] with 0 <= low < high, or null")


@dataclass(frozen=True)
class InferenceConfig:
    """Whole-volume sliding window (authors: 160³ windows, stride 144, uniform blending)."""

    window: tuple[int, int, int] = (160, 160, 160)
    stride: tuple[int, int, int] = (144, 144, 144)
    blending: str = "uniform"

    def check(self, err) -> None:
        if any(w < 8 or w % 8 for w in self.window):
            err("window", "every side must be a positive multiple of 8")
        if any(s < 1 or s > w for s, w in zip(self.stride, self.window)):
            err("stride", "every side must be in [1, window]")
        if self.blending not in ("uniform", "gaussian"):
            err("blending", "must be 'uniform' or 'gaussian'")


@dataclass(frozen=True)
class ValidationConfig:
    """Per-epoch validation of sweep trials (selection metric = ``val_avg_recall`` under luna16)."""

    n_boot: int = 0
    every: int = 1

    def check(self, err) -> None:
        if self.n_boot < 0:
            err("n_boot", "must be >= 0")
        if self.every < 1:
            err("every", "must be >= 1")


@dataclass(frozen=True)
class StrictRuleConfig:
    rule: str = "iou"
    threshold: float = 0.3

    def check(self, err) -> None:
        if self.rule not in ("fraction", "iou", "one-to-one"):
            err("rule", "must be one of fraction, iou, one-to-one")
        if self.rule != "one-to-one" and not 0 < self.threshold <= 1:
            err("threshold", "must be in (0, 1]")


@dataclass(frozen=True)
class EvaluationConfig:
    """Hold-out evaluation: bootstrap, size groups and the strict hit rule shown beside ``any``."""

    n_boot: int = 1000
    seed: int = 0
    strict: StrictRuleConfig = field(default_factory=StrictRuleConfig)
    size_cutoff_mm: float | None = None  # None: terciles of the hold-out lesion diameters
    threshold: str = "paper"  # paper: p > 0.5; calibrated: also a threshold chosen on validation (object Dice)

    def check(self, err) -> None:
        if self.threshold not in ("paper", "calibrated"):
            err("threshold", "must be 'paper' (p > 0.5) or 'calibrated' (chosen on validation, shown beside it)")
        if self.n_boot < 10:
            err("n_boot", "must be >= 10")
        if self.size_cutoff_mm is not None and self.size_cutoff_mm <= 0:
            err("size_cutoff_mm", "must be > 0")


@dataclass(frozen=True)
class SelectionConfig:
    """Winners: the best trial per (loss, iw) configuration (``per-config``) or the ``top-k`` overall."""

    mode: str = "per-config"
    k: int = 1
    metric: str = "val_avg_recall"
    scope: str = "last"

    def check(self, err) -> None:
        if self.mode not in ("per-config", "top-k"):
            err("mode", "must be 'per-config' or 'top-k'")
        if self.k < 1:
            err("k", "must be >= 1")
        if self.metric not in ("val_avg_recall", "val_obj_dice"):
            err("metric", "must be val_avg_recall or val_obj_dice")
        if self.scope not in ("last", "best"):
            err("scope", "must be 'last' (the last epoch, as the paper) or 'best'")


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-trial Ray resources, e.g. ``{cpu: 4, gpu: 1}``; ``custom`` pins trials to labelled nodes."""

    cpu: float = 1
    gpu: float = 0
    custom: dict[str, float] = field(default_factory=dict)

    def check(self, err) -> None:
        if self.cpu <= 0:
            err("cpu", "must be > 0")
        if self.gpu < 0:
            err("gpu", "must be >= 0")

    def as_ray(self) -> dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.gpu, **self.custom}


@dataclass(frozen=True)
class FailureConfig:
    max_failures: int = 1

    def check(self, err) -> None:
        if self.max_failures < 0:
            err("max_failures", "must be >= 0")


@dataclass(frozen=True)
class TestingConfig:
    """Test-only switches. ``nan_at_iteration`` makes the listed configurations produce a NaN loss."""

    nan_at_iteration: int | None = None
    nan_configs: tuple[str, ...] = ()
    sleep_per_iteration: float = 0.0


# ---------------------------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class TrialSpec:
    """One point of the grid: a loss, iw on/off, the loss parameters and a seed."""

    loss: str
    iw: bool
    params: dict[str, Any]
    seed: int

    @property
    def config_name(self) -> str:
        """The paper's configuration name, e.g. ``iw-focal``."""
        return config_name(self.loss, self.iw)

    @property
    def label(self) -> str:
        """Readable and unique within a study, e.g. ``iw-focal[alpha=0.75,gamma=2]/s0``."""
        return trial_label(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "iw": self.iw, "params": dict(self.params), "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialSpec:
        return cls(loss=d["loss"], iw=bool(d["iw"]), params=dict(d.get("params") or {}), seed=int(d["seed"]))


@dataclass(frozen=True)
class SearchConfig:
    """The grid, enumerated explicitly (no duplicate trials).

    ``losses`` maps a loss name to its axes: ``iw: [false, true]`` and the loss's own parameters
    (``gamma``/``alpha`` exist only for focal, ``beta`` only for asl, ...), each a value or a list.
    ``configs`` adds the paper's named configurations (``iw-focal`` etc.) with the paper's parameters.
    ``seeds`` is an axis over everything.
    """

    losses: dict[str, dict[str, Any]] = field(default_factory=dict)
    configs: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)


# ---------------------------------------------------------------------------------------------- study


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    iw: IwConfig = field(default_factory=IwConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    retrain_epochs: int | None = None
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    max_concurrent_trials: int | None = None
    failure: FailureConfig = field(default_factory=FailureConfig)
    testing: TestingConfig = field(default_factory=TestingConfig)
    source_file: str = ""
    trials: tuple[TrialSpec, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-safe), the frozen form written into the study folder."""
        return _plain(self)

    @property
    def epochs_retrain(self) -> int:
        return self.retrain_epochs or self.training.epochs


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, StudyConfig):
            out["trials"] = [t.as_dict() for t in obj.trials]
        return out
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------- parsing


class _Errors:
    """Collects the file name and key path for messages."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, message: str) -> typing.NoReturn:
        where = f"{self.source}: " if self.source else ""
        raise ConfigError(f"{where}{key}: {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, errors: _Errors) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            errors.fail(key, "must not be null")
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, errors)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    if tp is Any:
        return value
    if value is None:
        errors.fail(key, f"must not be null (expected {_type_name(tp)})")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            errors.fail(key, f"must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", errors) for i, v in enumerate(value))
        if len(value) != len(args):
            errors.fail(key, f"must be a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", errors) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            errors.fail(key, f"must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", errors) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            errors.fail(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.fail(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.fail(key, f"must be a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            errors.fail(key, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.fail(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")  # pragma: no cover - programming error


def _build(cls: type, data: Any, prefix: str, errors: _Errors) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.fail(prefix or "<top level>", f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    internal = {"source_file", "trials"} if cls is StudyConfig else set()
    unknown = sorted(set(data) - set(fields) - internal) + sorted(set(data) & internal)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        known = ", ".join(k for k in fields if k not in internal)
        errors.fail(key, f"unknown key; known keys here: {known}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, errors)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(lambda k, msg: errors.fail(f"{prefix}.{k}" if prefix else k, msg))
    return obj


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def enumerate_trials(search: SearchConfig, errors: _Errors) -> tuple[TrialSpec, ...]:
    """Expand the grid into explicit trials, validating every loss and parameter combination."""
    import itertools

    from trainables.losses import LOSS_NAMES, PAPER_CONFIGS, canonical_params, supports_iw

    # (loss, iw, canonical params, where in the YAML it comes from)
    cells: list[tuple[str, bool, dict[str, Any], str]] = []
    for loss, axes in search.losses.items():
        key = f"search.losses.{loss}"
        if loss not in LOSS_NAMES:
            errors.fail(key, f"unknown loss {loss!r}; known losses: {', '.join(LOSS_NAMES)}")
        axes = dict(axes or {})
        iw_values = _as_list(axes.pop("iw", [False]))
        for v in iw_values:
            if not isinstance(v, bool):
                errors.fail(f"{key}.iw", f"must be true/false or a list of them, got {v!r}")
            if v and not supports_iw(loss):
                errors.fail(f"{key}.iw", f"{loss} is a baseline without inverse weighting (iw: false only)")
        names = sorted(axes)
        value_lists = []
        for name in names:
            values = _as_list(axes[name])
            if not values:
                errors.fail(f"{key}.{name}", "is an empty list")
            value_lists.append(values)
        if len(set(iw_values)) != len(iw_values):
            errors.fail(f"{key}.iw", f"has duplicate values {iw_values!r}")
        for combo in itertools.product(*value_lists):
            given = dict(zip(names, combo))
            try:
                params = canonical_params(loss, given)
            except ValueError as exc:
                bad = next((n for n in names if n in str(exc)), None)
                errors.fail(f"{key}.{bad}" if bad else key, str(exc))
            where = f"{key}" + (f" ({', '.join(f'{n}={v!r}' for n, v in given.items())})" if given else "")
            for iw in iw_values:
                cells.append((loss, iw, params, where))
    for i, name in enumerate(search.configs):
        if name not in PAPER_CONFIGS:
            errors.fail("search.configs", f"unknown configuration {name!r}; known: {', '.join(PAPER_CONFIGS)}")
        paper = PAPER_CONFIGS[name]
        cells.append((paper["loss"], bool(paper["iw"]), canonical_params(paper["loss"], paper.get("params")),
                      f"search.configs[{i}] ({name!r})"))
    if not cells:
        errors.fail("search", "defines no trial: give search.losses and/or search.configs")
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
    trials = tuple(TrialSpec(loss=loss, iw=iw, params=params, seed=seed)
                   for loss, iw, params, _where in cells for seed in search.seeds)
    folders: dict[str, str] = {}
    for spec in trials:  # every per-trial folder and key must be unique
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
    if not path.is_file():
        raise ConfigError(f"{path}: search-space file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data_path is not None and isinstance(data, dict):
        p = Path(data_path).expanduser().resolve()
        if not p.exists():
            raise ConfigError(f"--data {data_path}: {p} does not exist")
        section = dict(data.get("data") or {})
        section["source"] = "manifest" if p.suffix.lower() == ".csv" else "cache"
        section["path"] = str(p)
        section.pop("phantom", None)
        data = {**data, "data": section}
    return config_from_dict(data, source=str(path), base_dir=path.resolve().parent)


def config_from_dict(data: Any, *, source: str = "", base_dir: Path | None = None) -> StudyConfig:
    errors = _Errors(source)
    if data is None:
        errors.fail("<top level>", "the file is empty")
    cfg: StudyConfig = _build(StudyConfig, data, "", errors)
    if cfg.retrain_epochs is not None and cfg.retrain_epochs < 1:
        errors.fail("retrain_epochs", "must be a positive integer or null")
    if cfg.max_concurrent_trials is not None and cfg.max_concurrent_trials < 1:
        errors.fail("max_concurrent_trials", "must be a positive integer or null")
    trials = enumerate_trials(cfg.search, errors)
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
        data_cfg = dataclasses.replace(data_cfg, path=str(p))
    known = {t.config_name for t in trials}
    for name in cfg.testing.nan_configs:
        if name not in known:
            errors.fail("testing.nan_configs", f"{name!r} is not a configuration of this study")
    return dataclasses.replace(cfg, data=data_cfg, trials=trials, source_file=source)


def frozen_config_from_dict(data: dict[str, Any]) -> StudyConfig:
    """Rebuild a config written by :meth:`StudyConfig.to_dict` (the study folder's frozen copy)."""
    data = dict(data)
    trials = data.pop("trials", [])
    source = data.pop("source_file", "")
    cfg = config_from_dict(data, source=source or "study.yaml")
    frozen = tuple(TrialSpec.from_dict(t) for t in trials)
    key = lambda t: json.dumps(t.as_dict(), sort_keys=True)  # noqa: E731
    if sorted(map(key, frozen)) != sorted(map(key, cfg.trials)):
        raise ConfigError(f"{source}: the frozen trial list does not match its search space")
    return dataclasses.replace(cfg, trials=frozen)  # the frozen order is the order Tune was given

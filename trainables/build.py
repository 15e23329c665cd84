"""The factories of a trial: the network, SGD and the lr schedule from the typed config, and the checkpoint reader.

One module that everything else imports (the trainer, the hold-out task, prediction, the timings, the GPU
check), so that none of them needs another's internals and no import goes round in a circle.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainables.config import LrScheduleConfig, ModelConfig, OptimizerConfig
from trainables.networks import network_record

#: the file of a trial checkpoint that holds its state (model, optimizer, schedule, scaler, sampler, epoch)
STATE_FILE = "state.pt"


def build_model(model: ModelConfig, patch_size: Sequence[int] = (128, 128, 128)) -> torch.nn.Module:
    """The network of the study's ``model`` section (:data:`trainables.networks.NETWORKS`; a dynunet is planned
    for ``patch_size``, the study's ``training.patch_size``), never compiled (see :func:`compiled`)."""
    return network_record(model.network).build(model, tuple(patch_size))


def compiled(model: torch.nn.Module, enabled: bool | None) -> torch.nn.Module:
    """``torch.compile(model)`` when ``enabled`` (the training step's forward), else ``model`` itself. The
    compiled module shares the parameters: checkpoints keep saving ``model.state_dict()``."""
    return torch.compile(model) if enabled else model


def build_optimizer(model: torch.nn.Module, optimizer: OptimizerConfig) -> torch.optim.SGD:
    """SGD with the study's settings (paper: Nesterov momentum 0.9, lr 1e-2, no weight decay)."""
    return torch.optim.SGD(model.parameters(), lr=optimizer.lr, momentum=optimizer.momentum,
                           nesterov=optimizer.nesterov, weight_decay=optimizer.weight_decay)


def build_lr_schedule(optimizer: torch.optim.Optimizer, schedule: LrScheduleConfig):
    """lr × ``gamma`` from each 0-based epoch in ``milestones`` on (stepped once per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(schedule.milestones),
                                                gamma=schedule.gamma)


def load_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a trial checkpoint (tensors and plain values only: ``weights_only=True``)."""
    path = Path(checkpoint_dir) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True)

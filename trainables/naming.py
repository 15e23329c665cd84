"""Names of configurations and trials, used by the trials, the driver, MLflow and the report alike.

A trial's label is injective: two trials with different (loss, iw, parameters, seed) never share a label,
provided their parameters are canonical (:func:`trainables.losses.canonical_params`: every parameter written
out, numbers as floats). Numbers are printed in Python's shortest round-trip form (``0.75``, ``2`` for 2.0,
``1e-05``), never rounded, so ``0.75`` and ``0.7500001`` stay apart. Folder names (:func:`trial_slug`) are
checked for uniqueness when the grid is enumerated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def config_name(loss: str, iw: bool) -> str:
    """The paper's configuration name: ``focal`` or ``iw-focal``."""
    return ("iw-" if iw else "") + loss


#: a trial's parameter naming its network when the search has a network axis (``search.models``)
NETWORK_PARAM = "model.network"


def config_group(trial: Mapping[str, Any]) -> str:
    """The configuration a winner is chosen for: ``iw-focal``, or ``iw-focal@dynunet`` when the trial names its
    network (a search over networks selects per network × loss × iw)."""
    network = (trial.get("params") or {}).get(NETWORK_PARAM)
    return config_name(trial["loss"], bool(trial["iw"])) + (f"@{network}" if network else "")


def format_value(value: Any) -> str:
    """A parameter value as it appears in labels: floats in shortest round-trip form, ``2.0`` as ``2``."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def params_label(params: Mapping[str, Any] | None) -> str:
    """``alpha=0.75,gamma=2`` (sorted by name; empty for a loss without parameters)."""
    return ",".join(f"{k}={format_value(v)}" for k, v in sorted((params or {}).items()))


def config_label(trial: Mapping[str, Any]) -> str:
    """The configuration with its hyperparameters, without the seed: ``iw-focal[alpha=0.75,gamma=2]``."""
    params = params_label(trial.get("params"))
    return config_name(trial["loss"], bool(trial["iw"])) + (f"[{params}]" if params else "")


def trial_label(trial: Mapping[str, Any]) -> str:
    """Readable and unique within a study, e.g. ``iw-focal[alpha=0.75,gamma=2]/s0``; a trial on fold k of a
    cross-validated sweep ends in ``/f<k>`` (``iw-focal[alpha=0.75,gamma=2]/s0/f2``).

    ``trial``: ``{"loss", "iw", "params", "seed"[, "fold"]}`` (the ``trial`` part of a trial's config).
    """
    fold = trial.get("fold")
    return f"{config_label(trial)}/s{trial['seed']}" + ("" if fold is None else f"/f{fold}")


def trial_folder(trial: Mapping[str, Any]) -> str:
    """The relative folder of a trial's files: ``iw-focal_alpha-0.75_gamma-2/s0`` (one folder per
    configuration, one subfolder per seed, so that ``study compare`` takes a configuration's folder)."""
    return f"{trial_slug(config_label(trial))}/s{trial['seed']}"


def trial_slug(label: str) -> str:
    """A file-system-safe form of a label: ``iw-focal_alpha-0.75_gamma-2_s0``."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_").replace("=", "-")

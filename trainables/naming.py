"""Names of configurations and trials, used by the trials, the driver, MLflow and the report alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def config_name(loss: str, iw: bool) -> str:
    """The paper's configuration name: ``focal`` or ``iw-focal``."""
    return ("iw-" if iw else "") + loss


def trial_label(trial: Mapping[str, Any]) -> str:
    """Readable and unique within a study, e.g. ``iw-focal[alpha=0.75,gamma=2]/s0``.

    ``trial``: ``{"loss", "iw", "params", "seed"}`` (the ``trial`` part of a trial's config).
    """
    params = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in sorted((trial.get("params") or {}).items()))
    return config_name(trial["loss"], bool(trial["iw"])) + (f"[{params}]" if params else "") + f"/s{trial['seed']}"

"""Data layer: readers, the preprocessing cache, the phantom, the LUNA16 / LiTS preparers and the patch sampler.

Arrays are ``[z, y, x]`` everywhere (SimpleITK's ``GetArrayFromImage`` order); spacing is ``(z, y, x)`` mm.

- :func:`make_phantom` writes the synthetic default dataset (NIfTI + ``manifest.csv``).
- :func:`prepare_cache` turns a manifest into a cache (``trainables.data.cache`` documents the layout);
  :func:`trainables.data.luna16.prepare_luna16` and :func:`trainables.data.lits.prepare_lits` do the same from the
  public datasets' own layouts.
- :class:`Cache` reads it at train time; :class:`PatchSampler` yields
  :class:`Batch` ``(image, target, weight)`` training batches with the inverse-weight map.

The names below are imported on first use, so that importing a light submodule (e.g. the preset table of
:mod:`trainables.data.preprocess`, read by the command line) does not import scipy, SimpleITK and the sampler.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainables.data.cache import Cache, Case, prepare_cache
    from trainables.data.manifest import SPLITS
    from trainables.data.phantom import make_phantom
    from trainables.data.sampler import Batch, PatchSampler

_WHERE = {
    "Cache": "cache",
    "Case": "cache",
    "prepare_cache": "cache",
    "SPLITS": "manifest",
    "make_phantom": "phantom",
    "Batch": "sampler",
    "PatchSampler": "sampler",
}

__all__ = ["SPLITS", "Batch", "Cache", "Case", "PatchSampler", "make_phantom", "prepare_cache"]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

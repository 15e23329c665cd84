"""Data layer: readers, the preprocessing cache, the phantom, the LUNA16 / LiTS preparers and the patch sampler.

Arrays are ``[z, y, x]`` everywhere (SimpleITK's ``GetArrayFromImage`` order); spacing is ``(z, y, x)`` mm.

- :func:`make_phantom` writes the synthetic default dataset (NIfTI + ``manifest.csv``).
- :func:`prepare_cache` turns a manifest into a cache (``trainables.data.cache`` documents the layout);
  :func:`trainables.data.luna16.prepare_luna16` and :func:`trainables.data.lits.prepare_lits` do the same from the
  public datasets' own layouts.
- :class:`Cache` / :func:`open_cache` read it at train time; :class:`PatchSampler` yields
  :class:`Batch` ``(image, target, weight)`` training batches with the inverse-weight map.
"""

from trainables.data.cache import Cache, Case, open_cache, prepare_cache
from trainables.data.manifest import SPLITS
from trainables.data.phantom import make_phantom
from trainables.data.sampler import Batch, PatchSampler

__all__ = ["SPLITS", "Batch", "Cache", "Case", "PatchSampler", "make_phantom", "open_cache", "prepare_cache"]

"""K train-validation folds over the cases of train ∪ validation, balanced by lesion count and lesion size.

nnU-Net trains 5 folds over its training set and MONAI Auto3DSeg does the same; here a study with
``data: {folds: K}`` splits the cases of its train and validation splits into K folds once (seeded), sweeps every
(configuration, seed) on each fold, selects on the mean over folds, and can judge the hold-out with each winner's
K fold models as an ensemble. The hold-out split is never touched.

The split (:func:`make_folds`) is deterministic for a seed and keeps every fold's validation part comparable:

1. Lesion sizes are put in groups by the terciles of all the cases' lesion diameters (one group with fewer than
   three lesions). Groups are covered first, rarest group first: a case holding a lesion of the group goes to a
   fold whose validation part has none yet (the one with the fewest cases), until every fold has one or the
   group's cases run out. So each fold validates on lesions of every size where the data allows it.
2. The other cases, most lesions first (ties in the seeded order), each go to the fold where the lesions per size
   group, the lesions in all and the case count stay most even (the smallest sum of squared deviations from an
   even share after adding the case).

A case without lesions counts only toward the case balance. The result lists the validation cases of each fold;
a fold's training cases are all the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from trainables.errors import DataError


def size_groups(diameters: Sequence[float]) -> list[float]:
    """Cut-offs (mm) splitting the diameters into three groups by their terciles ([] with fewer than 3)."""
    if len(diameters) < 3:
        return []
    return sorted({float(q) for q in np.quantile(np.asarray(diameters, dtype=float), [1 / 3, 2 / 3])})


def make_folds(lesions: Mapping[str, Sequence[float]], k: int, seed: int, *, key: str = "data.folds"
               ) -> list[list[str]]:
    """The validation cases of each of ``k`` folds (sorted ids), from ``lesions``: case id -> its lesion
    diameters in mm. Raises :class:`DataError` naming ``key`` when ``k`` is out of range or a fold's validation
    part would hold no lesion."""
    ids = sorted(lesions)
    if k < 2:
        raise DataError(f"{key}: {k} fold(s); cross-validation needs at least 2")
    if k > len(ids):
        raise DataError(f"{key}: {k} folds but train and validation hold {len(ids)} case(s); at most {len(ids)}")
    with_lesions = [c for c in ids if len(lesions[c])]
    if len(with_lesions) < k:
        raise DataError(f"{key}: {k} folds but only {len(with_lesions)} of the {len(ids)} train and validation "
                        f"case(s) hold lesions: a fold's validation part would hold no lesion; use at most "
                        f"{len(with_lesions)} folds")
    cuts = size_groups([d for c in ids for d in lesions[c]])
    n_groups = len(cuts) + 1
    counts = {c: np.bincount(np.searchsorted(cuts, np.asarray(lesions[c], dtype=float), side="right"),
                             minlength=n_groups).astype(float) for c in ids}
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    folds: list[list[str]] = [[] for _ in range(k)]
    held = np.zeros((k, n_groups))
    cases = np.zeros(k)
    placed: set[str] = set()

    def put(case: str, f: int) -> None:
        folds[f].append(case)
        held[f] += counts[case]
        cases[f] += 1
        placed.add(case)

    totals = sum(counts.values())
    for g in sorted(range(n_groups), key=lambda g: (totals[g], g)):  # rarest size group first
        candidates = [c for c in order if c not in placed and counts[c][g] > 0]
        for case in candidates:
            lacking = [f for f in range(k) if held[f, g] == 0]
            if not lacking:
                break
            put(case, min(lacking, key=lambda f: (cases[f], f)))
    target = totals / k
    for case in sorted((c for c in order if c not in placed), key=lambda c: -counts[c].sum()):  # stable: seeded
        def cost(f: int, case: str = case) -> float:
            after_held = held.copy()
            after_held[f] += counts[case]
            after_cases = cases.copy()
            after_cases[f] += 1
            spread = ((after_held - target) ** 2 / np.maximum(target, 1.0)).sum()
            lesions = after_held.sum(axis=1)
            balance = ((lesions - target.sum()) ** 2).sum() / max(target.sum(), 1.0)
            return float(spread + balance + ((after_cases - len(ids) / k) ** 2).sum())

        put(case, min(range(k), key=lambda f: (cost(f), f)))
    empty = [f for f in range(k) if held[f].sum() == 0]
    if empty:  # cannot happen with at least k cases with lesions (coverage puts one in every fold); kept as a guard
        raise DataError(f"{key}: fold(s) {empty} would validate on no lesion")
    return [sorted(f) for f in folds]


def fold_splits(val_folds: Sequence[Sequence[str]], fold: int) -> tuple[list[str], list[str]]:
    """``(training cases, validation cases)`` of ``fold``: its validation part, and every other fold's cases."""
    train = sorted(c for f, cs in enumerate(val_folds) if f != fold for c in cs)
    return train, sorted(val_folds[fold])

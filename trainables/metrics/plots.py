"""Figures of the paper from summaries (PNG, matplotlib's Agg canvas; no pyplot state, safe in workers).

* :func:`plot_froc`: FROC curves of several configurations with their bands (Fig. 4),
* :func:`plot_size_groups`: avg recall and object Dice per lesion-size group (Fig. 3),
* :func:`plot_diameters`: histogram of lesion diameters (Fig. 2),
* :func:`plot_training_curves`: training loss and validation metrics per epoch (convergence).

The report (``study.report``) draws its figures with these functions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainables.metrics.froc import LUNA_FP_RATES

__all__ = ["plot_froc", "plot_size_groups", "plot_diameters", "plot_training_curves"]

_IW_PREFIX = "iw-"


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def _family(name: str) -> str:
    return name[len(_IW_PREFIX) :] if name.startswith(_IW_PREFIX) else name


def _colours(names: Sequence[str]) -> dict[str, str]:
    """One colour per loss family, so that ``x`` and ``iw-x`` share it (as in the paper's figures)."""
    families = list(dict.fromkeys(_family(n) for n in names))
    return {f: f"C{i % 10}" for i, f in enumerate(families)}


def _configuration(name: str) -> str:
    """``iw-dice/s1`` -> ``iw-dice``: the curves of one configuration's seeds share colour, style and legend."""
    head, _, tail = name.rpartition("/")
    return head if head and tail.startswith("s") and tail[1:].isdigit() else name


def plot_froc(curves: Mapping[str, dict], path: str | os.PathLike, *, title: str | None = None,
              max_bands: int = 8) -> Path:
    """FROC curves on a log2 FP/image axis from 1/8 to 8, with bands.

    Args:
        curves: configuration name -> :func:`~trainables.metrics.summarize` result (uses ``froc`` and, when
            present, ``froc_band``). Names starting with ``"iw-"`` are drawn solid, the others dashed; a
            configuration and its ``iw-`` variant share a colour. The seeds of one configuration (``name/s0``,
            ``name/s1``, ...) share colour and style and one legend entry with their mean avg recall.
        path: PNG to write.
        title: figure title.
        max_bands: bootstrap bands are drawn only up to this many curves (beyond, they hide the curves).

    Returns:
        ``path``.
    """
    configs = {name: _configuration(name) for name in curves}
    groups = list(dict.fromkeys(configs.values()))
    means = {}
    for g in groups:
        avgs = [s.get("avg_recall") for n, s in curves.items() if configs[n] == g]
        avgs = [a for a in avgs if a is not None]
        means[g] = (sum(avgs) / len(avgs), len(avgs)) if avgs else (None, 0)
    many = len(groups) > 6
    fig = Figure(figsize=(8.4 if many else 6.4, 4.8))
    ax = fig.add_subplot()
    colours = _colours(groups)
    labelled: set[str] = set()
    for name, summary in curves.items():
        group = configs[name]
        colour = colours[_family(group)]
        style = "-" if name.startswith(_IW_PREFIX) else "--"
        froc = summary.get("froc") or {}
        fps, recall = np.asarray(froc.get("fps", []), float), np.asarray(froc.get("recall", []), float)
        label = None
        if group not in labelled:
            labelled.add(group)
            avg, n = means[group]
            label = group if avg is None else (f"{group} ({avg:.2f})" if n == 1 else f"{group} (mean {avg:.2f}, {n})")
        keep = fps > 0  # the (0, 0) anchor has no place on a log axis
        if keep.any():
            # extend flat to the right edge, as the interpolation does
            x = np.r_[fps[keep], max(8.0, fps[keep][-1])]
            y = np.r_[recall[keep], recall[keep][-1]]
            ax.plot(x, y, style, color=colour, label=label, lw=1.6 if len(curves) <= max_bands else 1.1)
        else:
            ax.plot([], [], style, color=colour, label=label)
        band = summary.get("froc_band")
        if band and band.get("lo") and len(curves) <= max_bands:
            ax.fill_between(band["fps_grid"], band["lo"], band["hi"], color=colour, alpha=0.15, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xlim(LUNA_FP_RATES[0], LUNA_FP_RATES[-1])
    ax.set_xticks(LUNA_FP_RATES)
    ax.set_xticklabels(["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("recall (detected lesions)")
    ax.grid(True, which="major", alpha=0.3)
    if curves:
        if many:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
                      title="configuration (avg recall, seeds)" if len(groups) < len(curves) else None)
        else:
            ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title if len(curves) <= max_bands else f"{title} (one line per seed; no bands)")
    return _save(fig, path)


def plot_size_groups(groups: Mapping[str, Mapping[str, dict]], path: str | os.PathLike) -> Path:
    """Bars of avg recall and object Dice per size group (Fig. 3).

    Args:
        groups: configuration -> group name -> summary (e.g. :func:`~trainables.metrics.size_groups`); error bars
            from ``avg_recall_std`` / ``obj_dice_std`` when present.
        path: PNG to write.
    """
    configs = list(groups)
    group_names = list(dict.fromkeys(g for c in configs for g in groups[c]))
    colours = _colours(configs)
    fig = Figure(figsize=(max(6.4, 1.6 * len(group_names) + 3), 4.4))
    width = 0.8 / max(len(configs), 1)
    for i, (key, label) in enumerate((("avg_recall", "avg recall"), ("obj_dice", "object Dice"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, cfg in enumerate(configs):
            vals = [groups[cfg].get(g, {}).get(key) for g in group_names]
            errs = [groups[cfg].get(g, {}).get(f"{key}_std") for g in group_names]
            x = np.arange(len(group_names)) + (j - (len(configs) - 1) / 2) * width
            ax.bar(
                x,
                [np.nan if v is None else v for v in vals],
                width,
                yerr=[0.0 if e is None else e for e in errs],
                color=colours[_family(cfg)],
                hatch=None if cfg.startswith(_IW_PREFIX) else "//",
                edgecolor="black",
                linewidth=0.5,
                label=cfg,
                capsize=2,
            )
        ax.set_xticks(np.arange(len(group_names)))
        ax.set_xticklabels(group_names)
        ax.set_ylim(0, 1)
        ax.set_title(label)
        ax.grid(True, axis="y", alpha=0.3)
    if configs:
        fig.axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_diameters(
    diameters_mm: Mapping[str, Sequence[float]] | Sequence[float],
    path: str | os.PathLike,
    *,
    cutoff_mm: float | None = None,
) -> Path:
    """Histogram of lesion equivalent diameters (Fig. 2), one series per dataset when a mapping is given;
    ``cutoff_mm`` draws the "small lesion" line."""
    series = dict(diameters_mm) if isinstance(diameters_mm, Mapping) else {"lesions": diameters_mm}
    arrays = {k: np.asarray(v, dtype=float) for k, v in series.items()}
    values = np.concatenate([a for a in arrays.values() if a.size] or [np.zeros(0)])
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(values, bins=30) if values.size else 10
    for name, a in arrays.items():
        ax.hist(a, bins=bins, alpha=0.6, label=f"{name} (n={a.size})")
    if cutoff_mm is not None:
        ax.axvline(cutoff_mm, color="black", ls="--", lw=1, label=f"{cutoff_mm:g} mm")
    ax.set_xlabel("equivalent diameter (mm)")
    ax.set_ylabel("lesions")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_training_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | os.PathLike, *,
                         title: str | None = None) -> Path:
    """Training loss and validation avg recall / object Dice per epoch of every sweep trial (convergence).

    Args:
        curves: trial label (``iw-dice/s0``) -> one row per epoch with ``epoch`` (0-based; drawn 1-based as the
            console prints it), ``train_loss`` and, at validated epochs, ``val_avg_recall``, ``val_obj_dice``.
            A configuration and its ``iw-`` variant share a colour; iw solid, plain dashed; seeds alike.
        path: PNG to write.
    """
    names = list(curves)
    configs = [n.rsplit("/", 1)[0] for n in names]
    colours = _colours(configs)
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    panels = (("train_loss", "training loss (mean of the epoch)"), ("val_avg_recall", "validation avg recall (any)"),
              ("val_obj_dice", "validation object Dice"))
    seen = set()
    for name, config in zip(names, configs):
        rows = curves[name]
        style = "-" if config.startswith(_IW_PREFIX) else "--"
        for ax, (key, _label) in zip(axes, panels):
            pts = [(r["epoch"] + 1, r[key]) for r in rows if r.get(key) is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, style, marker="o" if key != "train_loss" else None, ms=3, lw=1.2,
                        color=colours[_family(config)], alpha=0.8,
                        label=config if config not in seen and ax is axes[0] else None)
        seen.add(config)
    from matplotlib.ticker import MaxNLocator

    last = max((r["epoch"] + 1 for rows in curves.values() for r in rows), default=1)
    for ax, (key, label) in zip(axes, panels):
        ax.set_xlim(0.7, last + 0.3)  # every panel spans the training, even when validation ran only at the end
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "train_loss":
            ax.set_yscale("log")
    n_seeds = len(names) // max(1, len(set(configs)))
    fig.legend(loc="lower center", ncol=min(6, len(set(configs))), bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.suptitle(title or f"Sweep trials ({len(names)}: {len(set(configs))} configurations × ~{n_seeds} seeds)")
    fig.tight_layout()
    return _save(fig, path)

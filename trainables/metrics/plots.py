"""Figures of the paper from summaries (PNG, matplotlib's Agg canvas; no pyplot state, safe in workers).

* :func:`plot_froc`: FROC curves, one panel per loss, plain beside iw, with their uncertainty (Fig. 4),
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

__all__ = ["plot_froc", "froc_line", "plot_size_groups", "seed_aggregate", "plot_diameters", "plot_training_curves"]

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


#: where a FROC line is evaluated: the metric's own interpolation on a fine log grid from 1/8 to 8 FP/image
FROC_GRID = np.geomspace(LUNA_FP_RATES[0], LUNA_FP_RATES[-1], 97)
_PLAIN_STYLE, _IW_STYLE = "--", "-"


def froc_line(summary: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """The FROC line as drawn: recall on :data:`FROC_GRID` read exactly as the metric reads it (linear
    interpolation of the curve anchored at (0, 0)), from 1/8 FP/image up to the highest FP rate the model
    reaches, not beyond (the metric holds the last recall flat there; the figure does not draw what the model
    never produced). A model that never reaches 1/8 FP/image gives one point, at 1/8.

    Returns ``(fps, recall)``; both empty when the summary has no curve (no lesion).
    """
    froc = summary.get("froc") or {}
    fps, recall = np.asarray(froc.get("fps", []), float), np.asarray(froc.get("recall", []), float)
    if fps.size == 0:
        return np.zeros(0), np.zeros(0)
    reach = float(fps.max())
    x = FROC_GRID[FROC_GRID <= reach] if reach >= FROC_GRID[0] else FROC_GRID[:1]
    if reach > x[-1] and reach < FROC_GRID[-1]:
        x = np.r_[x, reach]
    return x, np.interp(x, fps, recall)


def _loss_of(config: str) -> str:
    """``iw-focal[alpha=0.25]`` -> ``focal``: the panel a configuration is drawn in."""
    return _family(config).split("[", 1)[0]


def _seed_groups(names) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(_configuration(n), []).append(n)
    return out


def _caption(fig: Figure, text: str) -> None:
    import textwrap

    fig.text(0.01, -0.01, "\n".join(textwrap.wrap(text, 150)), ha="left", va="top", fontsize="small")


def froc_figure(curves: Mapping[str, dict], *, title: str | None = None, hit_rule: str = "any overlap",
                bands: str = "auto") -> Figure:
    """:func:`plot_froc`'s figure (for tests and callers that want to add to it)."""
    configs = _seed_groups(curves)
    losses = list(dict.fromkeys(_loss_of(c) for c in configs))
    ncol = min(3, max(1, len(losses)))
    nrow = -(-len(losses) // ncol) if losses else 1
    fig = Figure(figsize=(4.6 * ncol, 4.3 * nrow + 0.4))
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    shading = set()
    several = False
    for ax, loss in zip(axes, losses):
        members = [c for c in configs if _loss_of(c) == loss]
        for k, config in enumerate(members):
            colour = f"C{k % 10}" if len(members) > 2 else ("#d55e00" if config.startswith(_IW_PREFIX) else "#0072b2")
            style = _IW_STYLE if config.startswith(_IW_PREFIX) else _PLAIN_STYLE
            names = configs[config]
            lines = {n: froc_line(curves[n]) for n in names}
            lines = {n: v for n, v in lines.items() if v[0].size}
            avgs = [curves[n].get("avg_recall") for n in names if curves[n].get("avg_recall") is not None]
            label = config if not avgs else f"{config}: {np.mean(avgs):.3f}"
            if len(avgs) > 1:
                label += " (" + ", ".join(f"{a:.3f}" for a in avgs) + ")"
            if not lines:
                ax.plot([], [], style, color=colour, label=label + " (no lesion)")
                continue
            if len(lines) == 1:
                (name, (x, y)), = lines.items()
                band = curves[name].get("froc_band") or {}
                if bands == "auto" and band.get("lo"):
                    g = np.asarray(band["fps_grid"], float)
                    keep = g <= x[-1] * (1 + 1e-9)
                    if keep.sum() >= 1:
                        ax.fill_between(g[keep], np.asarray(band["lo"])[keep], np.asarray(band["hi"])[keep],
                                        color=colour, alpha=0.18, lw=0, step=None)
                        shading.add("95 % case-bootstrap band (one seed)")
            else:  # seeds: thin lines to their own reach; the mean over them as the metric reads each seed
                reach = max(v[0][-1] for v in lines.values())
                for x, y in lines.values():
                    ax.plot(x, y, style, color=colour, lw=0.8, alpha=0.6, marker="o" if x.size == 1 else None,
                            ms=3, mfc="none")
                x = FROC_GRID[FROC_GRID <= reach] if reach >= FROC_GRID[0] else FROC_GRID[:1]
                ys = np.array([np.interp(x, curves[n]["froc"]["fps"], curves[n]["froc"]["recall"]) for n in lines])
                if bands == "auto":
                    ax.fill_between(x, ys.min(0), ys.max(0), color=colour, alpha=0.15, lw=0)
                    shading.add(f"range over the {len(lines)} seeds")
                y = ys.mean(0)
                several = True
            marks = np.isin(np.round(x, 9), np.round(LUNA_FP_RATES, 9))
            ax.plot(x, y, style, color=colour, lw=1.8, label=label, marker="o", markevery=list(np.flatnonzero(marks)),
                    ms=3.5)
            if x[-1] < LUNA_FP_RATES[-1] * (1 - 1e-9):
                ax.plot([x[-1]], [y[-1]], marker="|", color=colour, ms=10, mew=2)
        ax.set_xscale("log", base=2)
        ax.set_xlim(LUNA_FP_RATES[0] / 1.15, LUNA_FP_RATES[-1] * 1.15)
        ax.set_xticks(LUNA_FP_RATES)
        ax.set_xticklabels(["1/8", "1/4", "1/2", "1", "2", "4", "8"])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false positives per image")
        ax.set_ylabel("lesion recall")
        ax.set_title(loss)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize="small", frameon=False,
                  title="configuration: avg recall (per seed)", title_fontsize="small")
    for ax in axes[len(losses):]:
        ax.set_visible(False)
    first = next(iter(curves.values()), {})
    n = f"{first.get('n_images', '?')} cases, {first.get('n_lesions', '?')} lesions"
    fig.suptitle(f"{title or 'FROC'} ({n}; hit rule: {hit_rule})")
    seeds = (" Thin lines: the seeds; thick: their mean, each seed's recall held at its last value beyond the FP "
             "rate it reaches (as avg recall reads it)." if several else "")
    _caption(fig, "Dashed: plain loss; solid: with iw. avg recall = mean lesion recall at 1/8, 1/4, ..., 8 FP per "
             "image (the dots). A line ends (|) at the highest FP rate its model reaches." + seeds
             + (f" Shaded: {'; '.join(sorted(shading))}." if shading else ""))
    fig.tight_layout()
    return fig


def plot_froc(curves: Mapping[str, dict], path: str | os.PathLike, *, title: str | None = None,
              hit_rule: str = "any overlap", bands: str = "auto") -> Path:
    """FROC curves (paper Fig. 4), one panel per loss, plain (dashed) beside iw (solid).

    Args:
        curves: name (``iw-dice/s0``; seeds of one configuration share ``iw-dice``) -> a luna16
            :func:`~trainables.metrics.summarize` result (``froc``, ``froc_band``, ``avg_recall``,
            ``n_images``, ``n_lesions``).
        path: PNG to write.
        title: the figure's title; the case and lesion counts and ``hit_rule`` are added to it.
        bands: ``auto``: shade a single seed's 95 % case-bootstrap band, or the range over several seeds;
            ``none``: lines only.

    Each line is :func:`froc_line`: from 1/8 FP/image to the FP rate its model reaches. The legend (below each
    panel, outside the data) gives each configuration's avg recall, its mean over seeds first.
    """
    if bands not in ("auto", "none"):
        raise ValueError(f"bands must be auto or none, got {bands!r}")
    return _save(froc_figure(curves, title=title, hit_rule=hit_rule, bands=bands), path)


def seed_aggregate(groups: Mapping[str, Mapping[str, dict]]) -> dict[str, dict[str, dict]]:
    """Size-group summaries of each configuration (``name/s0``, ``name/s1`` -> ``name``) averaged over its seeds:
    ``avg_recall`` / ``obj_dice`` (mean), ``*_std`` (standard deviation over the seeds, None for one seed),
    ``n_seeds`` and ``n_lesions`` (of the group)."""
    by_config: dict[str, list] = {}
    for label, g in groups.items():
        by_config.setdefault(_configuration(label), []).append(g)
    out: dict[str, dict[str, dict]] = {}
    for config, runs in by_config.items():
        out[config] = {}
        for group in dict.fromkeys(g for r in runs for g in r):
            entry: dict = {"n_seeds": len(runs),
                           "n_lesions": next((r[group].get("n_lesions") for r in runs if group in r), None)}
            for key in ("avg_recall", "obj_dice"):
                vals = [r[group][key] for r in runs if r.get(group, {}).get(key) is not None]
                entry[key] = float(np.mean(vals)) if vals else None
                entry[f"{key}_std"] = float(np.std(vals)) if len(vals) > 1 else None
            out[config][group] = entry
    return out


def size_groups_figure(groups: Mapping[str, Mapping[str, dict]], *, title: str | None = None,
                       hit_rule: str = "any overlap") -> Figure:
    """:func:`plot_size_groups`'s figure."""
    agg = seed_aggregate(groups)
    configs = list(agg)
    group_names = list(dict.fromkeys(g for c in configs for g in agg[c]))
    n_les = {g: next((agg[c][g].get("n_lesions") for c in configs if g in agg[c]), None) for g in group_names}
    n_seeds = sorted({e["n_seeds"] for c in configs for e in agg[c].values()})
    colours = _colours(configs)
    fig = Figure(figsize=(max(8.0, 1.6 * len(group_names) * 2 + 2.5), 4.6))
    width = 0.8 / max(len(configs), 1)
    panels = (("avg_recall", f"avg recall ({hit_rule})"), ("obj_dice", "object Dice (detected lesions)"))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, cfg in enumerate(configs):
            vals = [agg[cfg].get(g, {}).get(key) for g in group_names]
            errs = [agg[cfg].get(g, {}).get(f"{key}_std") for g in group_names]
            x = np.arange(len(group_names)) + (j - (len(configs) - 1) / 2) * width
            heights = [np.nan if v is None else v for v in vals]
            ax.bar(x, heights, width, color=colours[_family(cfg)], hatch=None if cfg.startswith(_IW_PREFIX) else "//",
                   edgecolor="black", linewidth=0.5, label=cfg)
            has_err = [e is not None for e in errs]
            if any(has_err):
                ax.errorbar(x[has_err], np.asarray(heights)[has_err], yerr=np.asarray(errs, dtype=object)[has_err]
                            .astype(float), fmt="none", ecolor="black", capsize=2, lw=0.9)
            for xi, v in zip(x, vals):  # a zero is drawn, a missing value is said
                if v is None:
                    ax.text(xi, 0.015, "n/a", ha="center", va="bottom", fontsize=6.5)
                elif v == 0:
                    ax.plot([xi - width / 2, xi + width / 2], [0.004, 0.004], color=colours[_family(cfg)], lw=3,
                            solid_capstyle="butt")
                    ax.text(xi, 0.015, "0", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(np.arange(len(group_names)))
        ax.set_xticklabels([f"{g}\nn = {n_les[g]}" if n_les[g] is not None else g for g in group_names])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(label)
        ax.set_xlabel("equivalent diameter (n = hold-out lesions)")  # two panels side by side: short
        ax.set_title(label)
        ax.grid(True, axis="y", alpha=0.3)
    if configs:
        fig.axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    seeds = "/".join(map(str, n_seeds))
    err = ("Error bars: ± 1 standard deviation over the seeds, on both panels." if max(n_seeds, default=1) > 1
           else "One seed per configuration: no error bars (a case-level interval is in the report's tables).")
    fig.suptitle(title or "By lesion size")
    _caption(fig, f"Bars: mean over {seeds} seed(s) of each configuration; hatched: plain loss, solid: with iw. "
             f"{err} A bar at 0 is drawn as a line with '0' above it; n/a: no value (no lesion detected).")
    fig.tight_layout()
    return fig


def plot_size_groups(groups: Mapping[str, Mapping[str, dict]], path: str | os.PathLike, *,
                     title: str | None = None, hit_rule: str = "any overlap") -> Path:
    """Bars of avg recall and object Dice per lesion-size group (paper Fig. 3).

    Args:
        groups: run name (``iw-dice/s0``) -> group name -> summary (:func:`~trainables.metrics.size_groups`).
            The seeds of a configuration are averaged (:func:`seed_aggregate`); the error bars are the
            standard deviation over the seeds on both metrics, so that the two panels show the same kind of
            interval.
        path: PNG to write.
    """
    return _save(size_groups_figure(groups, title=title, hit_rule=hit_rule), path)


def plot_diameters(
    diameters_mm: Mapping[str, Sequence[float]] | Sequence[float],
    path: str | os.PathLike,
    *,
    cutoffs_mm: Sequence[float] = (),
    cutoff_mm: float | None = None,
) -> Path:
    """Histogram of lesion equivalent diameters (paper Fig. 2), one outlined series per split when a mapping
    is given (outlines, so that overlapping splits stay readable); ``cutoffs_mm`` (or one ``cutoff_mm``) are
    drawn and labelled as the size-group boundaries."""
    series = dict(diameters_mm) if isinstance(diameters_mm, Mapping) else {"lesions": diameters_mm}
    arrays = {k: np.asarray(v, dtype=float) for k, v in series.items()}
    values = np.concatenate([a for a in arrays.values() if a.size] or [np.zeros(0)])
    cuts = [float(c) for c in cutoffs_mm] + ([] if cutoff_mm is None else [float(cutoff_mm)])
    fig = Figure(figsize=(6.8, 4.2))
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(values, bins=30) if values.size else 10
    for k, (name, a) in enumerate(arrays.items()):
        ax.hist(a, bins=bins, histtype="step", lw=1.8, color=f"C{k % 10}", label=f"{name} (n = {a.size})")
    for c in sorted(set(cuts)):
        ax.axvline(c, color="black", ls=":", lw=1.2)
        ax.annotate(f"{c:g} mm", (c, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -12),
                    textcoords="offset points", fontsize="small")
    ax.set_xlabel("lesion equivalent diameter (mm)")
    ax.set_ylabel("lesions")
    ax.legend(fontsize="small", loc="upper right", title="split" if len(arrays) > 1 else None,
              title_fontsize="small")
    if cuts:
        ax.set_title("dotted: the size-group cut-offs", fontsize="small")
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


def plot_hyperparameters(configs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike, *,
                         metric: str = "val_avg_recall", title: str | None = None) -> Path:
    """Validation score against each numeric hyperparameter that varied: one panel per hyperparameter, one point
    per sweep trial (seeds and folds as separate points), one colour per configuration (iw filled, plain open).

    Args:
        configs: configuration (``iw-focal``) -> its points ``{"params", "seed", "score"}`` (selection.json's
            ``hyperparameters.<config>.points``).
        path: PNG to write.
    """
    names: list[str] = []
    for points in configs.values():
        for p in points:
            for k, v in p["params"].items():
                if isinstance(v, int | float) and not isinstance(v, bool) and k not in names:
                    if len({q["params"].get(k) for pts in configs.values() for q in pts}) > 1:
                        names.append(k)
    names.sort()
    colours = _colours(list(configs))
    fig = Figure(figsize=(4.2 * max(1, len(names)), 3.6))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(names))))
    for ax, name in zip(axes, names):
        for config, points in configs.items():
            pts = [(p["params"][name], p["score"]) for p in points if name in p["params"]]
            if not pts:
                continue
            x, y = zip(*pts)
            iw = config.startswith(_IW_PREFIX)
            ax.scatter(x, y, s=22, color=colours[_family(config)] if iw else "none",
                       edgecolors=colours[_family(config)], label=config, alpha=0.85)
        if name.endswith(".lr"):  # learning rates are searched on a log scale
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"validation {metric.removeprefix('val_')}")
        ax.grid(alpha=0.3)
    if not names:
        axes[0].text(0.5, 0.5, "no numeric hyperparameter varied", ha="center", va="center",
                     transform=axes[0].transAxes)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title or "Sweep trials: validation score against each hyperparameter (one point per trial)")
    fig.tight_layout()
    return _save(fig, path)

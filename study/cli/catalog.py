"""``study catalog``: what a study can name, read from the registries' records.

Losses (:data:`trainables.losses.LOSSES`), hit rules (:data:`trainables.metrics.HIT_RULES`), metric
protocols (:data:`trainables.metrics.PROTOCOLS`), preprocessing presets
(:data:`trainables.data.preprocess.PRESETS`), search algorithms and the training hyperparameters a search space
may set (:data:`trainables.config.SEARCH_ALGORITHMS`, :data:`trainables.config.TRAINING_HYPERPARAMETER_DOCS`).
``--markdown`` prints the tables of docs/catalog.md holds (a test keeps the two equal), so a record added in code
shows up in the CLI and the docs at once.
"""

from __future__ import annotations

from collections.abc import Sequence


def register(sub) -> None:
    p = sub.add_parser("catalog", help="the losses, hit rules, metric protocols, presets, networks and search algorithms a study can name",
                       description="Print every registered loss (with iw support and parameters), hit rule, "
                       "metric protocol and preprocessing preset, from their registry records.")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables (docs/catalog.md)")
    p.set_defaults(func=cmd_catalog)


def _param_text(params) -> str:
    return "; ".join(f"{p.name} = {p.default!r} ({p.expect}): {p.doc}" for p in params) or "none"


def _parameters(record, width: float, side: int) -> str:
    """The network's parameter count at ``width`` for a ``side``³ patch (one input channel)."""
    from trainables.build import build_model
    from trainables.config import ModelConfig
    from trainables.networks import monai_available
    from trainables.unet import count_parameters

    if record.monai and not monai_available():
        return "(needs MONAI)"
    model = build_model(ModelConfig(network=record.name, width=width), (side,) * 3)
    return f"{count_parameters(model):,}"


def tables() -> list[tuple[str, Sequence[str], list[Sequence[str]]]]:
    """(title, header, rows) for each registry."""
    from trainables.config import SEARCH_ALGORITHMS, TRAINING_HYPERPARAMETER_DOCS
    from trainables.data.preprocess import PRESETS
    from trainables.losses import LOSSES
    from trainables.metrics import HIT_RULES, PROTOCOLS
    from trainables.networks import NETWORKS

    losses = [(r.name, "yes" if r.iw else "no", r.doc, _param_text(r.params), r.source or "–", r.checked or "–")
              for r in LOSSES.values()]
    rules = [(r.name, "none" if r.default_threshold is None else f"{r.default_threshold:g}",
              "yes" if r.strict else "no", r.doc, r.checked or "–") for r in HIT_RULES.values()]
    protocols = [(r.name, r.doc, r.checked or "–") for r in PROTOCOLS.values()]
    presets = [(p.name, "required" if p.roi_required else "optional", p.doc) for p in PRESETS.values()]
    algorithms = [(name, runs, axes) for name, (runs, axes) in SEARCH_ALGORITHMS.items()]
    networks = [(r.name, r.doc, _parameters(r, 0.125, 32), _parameters(r, 1.0, 128), r.source, r.checked)
                for r in NETWORKS.values()]
    training = [(name, accepts, doc) for name, (accepts, doc) in TRAINING_HYPERPARAMETER_DOCS.items()]
    return [
        ("Losses", ("loss", "iw", "what it is", "parameters (default, accepted values)", "source",
                    "checked against"), losses),
        ("Hit rules", ("rule", "default threshold", "strict", "a lesion is hit when", "checked against"), rules),
        ("Metric protocols", ("protocol", "what it reports", "checked against"), protocols),
        ("Preprocessing presets", ("preset", "ROI", "what it does"), presets),
        ("Networks (model.network, search.models)", ("network", "what it is", "parameters, width 0.125, 32³ patch",
                                                     "parameters, width 1, 128³ patch", "source", "checked against"),
         networks),
        ("Search algorithms", ("search.algorithm", "what it runs", "an axis of a loss entry is"), algorithms),
        ("Training hyperparameters a loss entry may set", ("key", "accepted values", "what it sets"), training),
    ]


def markdown() -> str:
    out = []
    for title, header, rows in tables():
        out += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def plain() -> str:
    out = []
    for title, header, rows in tables():
        width = max(len(row[0]) for row in rows)
        out.append(f"{title} ({' · '.join(header)}):")
        out += [f"  {row[0]:<{width}}  " + " · ".join(row[1:]) for row in rows]
        out.append("")
    return "\n".join(out)


def cmd_catalog(args) -> int:
    print(markdown() if args.markdown else plain(), end="")
    return 0

"""``study catalog``: what a study can name, read from the registries' records.

Losses (:data:`trainables.losses.LOSSES`), hit rules (:data:`trainables.metrics.HIT_RULES`), metric
protocols (:data:`trainables.metrics.PROTOCOLS`) and preprocessing presets
(:data:`trainables.data.preprocess.PRESETS`). ``--markdown`` prints the tables of docs/catalog.md
holds (a test keeps the two equal), so a record added in code shows up in the CLI and the docs at once.
"""

from __future__ import annotations

from collections.abc import Sequence


def register(sub) -> None:
    p = sub.add_parser("catalog", help="the losses, hit rules, metric protocols and presets a study can name",
                       description="Print every registered loss (with iw support and parameters), hit rule, "
                       "metric protocol and preprocessing preset, from their registry records.")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables (docs/catalog.md)")
    p.set_defaults(func=cmd_catalog)


def _param_text(params) -> str:
    return "; ".join(f"{p.name} = {p.default!r} ({p.expect}): {p.doc}" for p in params) or "none"


def tables() -> list[tuple[str, Sequence[str], list[Sequence[str]]]]:
    """(title, header, rows) for each registry."""
    from trainables.data.preprocess import PRESETS
    from trainables.losses import LOSSES
    from trainables.metrics import HIT_RULES, PROTOCOLS

    losses = [(r.name, "yes" if r.iw else "no", r.doc, _param_text(r.params), r.source or "–", r.checked or "–")
              for r in LOSSES.values()]
    rules = [(r.name, "none" if r.default_threshold is None else f"{r.default_threshold:g}",
              "yes" if r.strict else "no", r.doc, r.checked or "–") for r in HIT_RULES.values()]
    protocols = [(r.name, r.doc, r.checked or "–") for r in PROTOCOLS.values()]
    presets = [(p.name, "required" if p.roi_required else "optional", p.doc) for p in PRESETS.values()]
    return [
        ("Losses", ("loss", "iw", "what it is", "parameters (default, accepted values)", "source",
                    "checked against"), losses),
        ("Hit rules", ("rule", "default threshold", "strict", "a lesion is hit when", "checked against"), rules),
        ("Metric protocols", ("protocol", "what it reports", "checked against"), protocols),
        ("Preprocessing presets", ("preset", "ROI", "what it does"), presets),
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

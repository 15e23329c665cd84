"""Plain-text tables for the console (the report's Markdown/HTML tables are in :mod:`study.report`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; '-' for a missing value."""
    return "-" if value is None else f"{float(value):.{digits}f}"


def text_table(rows: Sequence[Sequence[Any]], *, right_from: int | None = None, indent: str = "") -> str:
    """``rows[0]`` is the header; a rule under it; columns from ``right_from`` on are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

    def line(r: list[str]) -> str:
        return indent + "  ".join(
            c.rjust(w) if right_from is not None and i >= right_from else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()

    out = [line(cells[0]), indent + "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)

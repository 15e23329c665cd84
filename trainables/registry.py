"""A registry of records: name -> record, in registration order, with ``register`` and ``lookup``.

The hit rules (:data:`trainables.metrics.records.HIT_RULES`) and the metric protocols
(:data:`trainables.metrics.summary.PROTOCOLS`) are registries; each concept is one record (a frozen dataclass
with a ``name``) registered once. A registry is a plain ``dict`` for its readers (``name in REG``,
``", ".join(REG)``, ``REG.values()``, ``REG.pop(name)`` in tests).
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Registry"]

R = TypeVar("R")


class Registry(dict[str, R], Generic[R]):
    """name -> record of one ``kind`` (e.g. ``"hit rule"``); unknown names raise ``error``."""

    def __init__(self, kind: str, error: type[Exception] = ValueError, known: str = "expected one of") -> None:
        super().__init__()
        self.kind = kind
        self.error = error
        self.known = known  # how the error message introduces the registered names

    def register(self, record: R) -> R:
        """Add ``record`` under ``record.name`` (which must be new); returns the record."""
        name = record.name  # type: ignore[attr-defined]
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = record
        return record

    def lookup(self, name: str) -> R:
        """The record of ``name``; ``error`` naming the registered ones if unknown."""
        try:
            return self[name]
        except KeyError:
            raise self.error(f"unknown {self.kind} {name!r}; {self.known} {', '.join(self)}") from None

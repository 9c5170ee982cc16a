"""What every backend provides, and the plan the executor runs.

A backend is pure: it turns port changes into a :class:`Plan` (argument lists and stdin texts)
and says what to record about each port so the next change can find the old rules. Only
``executor.py`` runs the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

from ..ir import PortRuleset

# What a backend remembers about one port between changes (JSON-serialisable, stored in state).
PortRecord = Mapping[str, Any]


@dataclass(frozen=True)
class Step:
    """One process run: ``argv`` with ``stdin``; a failure is fatal unless ``ignore_errors``."""

    argv: tuple[str, ...]
    stdin: str = ""
    ignore_errors: bool = False


@dataclass(frozen=True)
class Plan:
    """``apply`` runs first; if a step fails, ``rollback`` runs (errors ignored) and the change
    fails with the old rules intact. ``commit`` then switches to the new rules."""

    apply: tuple[Step, ...] = ()
    commit: tuple[Step, ...] = ()
    rollback: tuple[Step, ...] = ()


@dataclass(frozen=True)
class PortChange:
    """Replace what is on ``port`` (``old``: the backend's record, None if nothing) by ``new``
    (None: remove the port's rules)."""

    port: str
    old: PortRecord | None
    new: PortRuleset | None


class Backend(Protocol):
    name: str

    def plan(self, changes: Sequence[PortChange], ids_in_use: Iterable[int] | None = None,
             ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """One plan for all changes (atomic where the backend allows) and each port's new record.

        ``ids_in_use``: the numeric port ids (``record["id"]``) of every port NOT in ``changes``
        (None: unknown); backends that number ports avoid them."""
        ...

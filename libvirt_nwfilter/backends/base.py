"""What every backend provides, and the plan the executor runs.

A backend is pure: it turns port changes into a :class:`Plan` (argument lists and stdin texts)
and says what to record about each port so the next change can find the old rules. Only
``executor.py`` runs the plan.

Drift detection and recovery (``verify``, ``reapply``, hook ``reconnect``), the same for every
backend: ``survey_steps()`` lists everything of ours (run each with ``executor.run``; stdout, or
"" for a failed step); ``kernel_digests(survey outputs, records)`` gives each port's digest of
what a kernel has; ``rebuild_plan(changes, survey)`` removes everything of ours and builds
exactly the given ports. Applying a change computes no digest (the per-binding path stays as
cheap as the change itself): the expected digest of a port is that of a reference kernel (a
throw-away network namespace) into which ``rebuild_plan`` put the recorded rulesets. Digests are
therefore independent of generations, of the other ports and of per-namespace ids: a port has
the same digest in every kernel holding the same rules for it.
"""

from __future__ import annotations

import json
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
    rebuild_reads_kernel: bool  # does rebuild_plan need the survey's outputs?

    def plan(self, changes: Sequence[PortChange], ids_in_use: Iterable[int] | None = None,
             ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """One plan for all changes (atomic where the backend allows) and each port's new record.

        ``ids_in_use``: the numeric port ids (``record["id"]``) of every port NOT in ``changes``
        (None: unknown); backends that number ports avoid them."""
        ...

    def rebuild_plan(self, changes: Sequence[PortChange], survey: Sequence[str],
                     ids_in_use: Iterable[int] | None = None,
                     ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """A plan that removes everything of ours found in the kernel (``survey``: the outputs of
        :meth:`survey_steps`) and builds exactly the ports in ``changes`` — EVERY binding that
        should exist, ``old`` being its stored record, possibly stale (used for ids and
        generations only). Never fails because recorded objects are missing (``reapply``)."""
        ...

    def survey_steps(self) -> tuple[Step, ...]:
        """Read-only steps listing everything of ours in the kernel. Run them with
        ``executor.run`` (no exception on failure) and pass their stdout ("" for a failed step),
        in order, to :meth:`kernel_digests` or :meth:`rebuild_plan`."""
        ...

    def kernel_digests(self, outputs: Sequence[str], records: Mapping[str, PortRecord | None],
                       ) -> dict[str, str | None]:
        """Pure: for every port of ``records`` (None records are skipped), a digest of what the
        kernel really has for it (its chains, rules, dispatch entries), from the survey outputs;
        None when nothing of the port is found although its record expects rules. A port whose
        record expects nothing (empty ruleset) and of which nothing is found has the digest of
        the empty structure. The digest does not depend on the port's generation, on other
        ports or on ids the backend assigns per kernel: the same port built from the same
        ruleset (:meth:`rebuild_plan`) in another kernel has the same digest."""
        ...


def canonical_digest(value: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``value`` (sorted keys, no spaces): digests of
    kernel state, comparable across processes and versions of the same digest format."""
    import hashlib  # only verify and reconnect need it

    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

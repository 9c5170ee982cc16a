"""The contract every backend fulfils, and the plan the executor runs.

A backend is pure: it turns port changes into a :class:`Plan` (argument lists and stdin texts)
and says what to record about each port so the next change can find the old rules. Only
``executor.py`` runs the plan. :class:`Backend` lists everything the service asks of a backend;
there is nothing else to call and nothing to probe for.

Drift detection and recovery (``verify``, ``reapply``, hook ``reconnect``), the same for every
backend: ``survey_steps()`` lists everything of ours (run each with ``executor.run``; stdout, or
"" for a failed step); ``kernel_digests(survey outputs, records)`` gives each port's digest of
what a kernel has; ``kernel_ports(survey outputs)`` names every port of which the kernel holds
anything of ours, ``inventory`` lists those objects per port and ``unrecorded`` names those no
record names (orphans); ``rebuild_plan(changes, survey)`` removes everything of ours and builds
exactly the given ports (keeping, if asked, the objects of some ports untouched). Applying a change
computes no digest (the per-binding path stays as cheap as the change itself): the expected
digest of a port is that of a reference kernel (a throw-away network namespace) into which
``rebuild_plan`` put the recorded rulesets. Digests are therefore independent of generations,
of the other ports and of per-namespace ids: a port has the same digest in every kernel holding
the same rules for it.

A refused step is reported with the input line the tool names and the port that line serves:
backends build each step's input with :class:`Batch`, which remembers the port of every block
of lines (:attr:`Step.owners`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from collections import Counter
from typing import Any, Hashable, Iterable, Mapping, Protocol, Sequence

from ..ir import PortRuleset

# What a backend remembers about one port between changes (JSON-serialisable, stored in state).
PortRecord = Mapping[str, Any]


@dataclass(frozen=True)
class Step:
    """One process run: ``argv`` with ``stdin``; a failure is fatal unless ``ignore_errors``.

    ``owners``: (first line, port) of each block of ``stdin`` lines that serves one port, in
    order ("" for lines that serve none); a line belongs to the last block starting at or
    before it."""

    argv: tuple[str, ...]
    stdin: str = ""
    ignore_errors: bool = False
    owners: tuple[tuple[int, str], ...] = ()

    def port_of_line(self, number: int) -> str:
        """The port that line ``number`` (1-based) of ``stdin`` serves; "" when none."""
        port = ""
        for first, owner in self.owners:
            if first > number:
                break
            port = owner
        return port


class Batch:
    """The input of one step, built block by block; each block serves one port (or none)."""

    __slots__ = ("lines", "owners", "_header")

    def __init__(self, *header: str):
        self.lines: list[str] = list(header)
        self.owners: list[tuple[int, str]] = []
        self._header = len(header)

    def add(self, lines: Iterable[str], port: str = "") -> None:
        first = len(self.lines) + 1
        self.lines.extend(lines)
        if len(self.lines) >= first and (self.owners[-1][1] if self.owners else "") != port:
            self.owners.append((first, port))

    def __bool__(self) -> bool:
        """Whether anything beyond the header was added."""
        return len(self.lines) > self._header

    def step(self, argv: Sequence[str], *footer: str, ignore_errors: bool = False) -> Step:
        """The step running ``argv`` on these lines, then ``footer`` (which serves no port)."""
        owners = self.owners + [(len(self.lines) + 1, "")] if footer and self.owners else self.owners
        text = "\n".join([*self.lines, *footer]) + "\n"
        return Step(tuple(argv), text, ignore_errors, tuple(owners))


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
    name: str  # stored with every binding: a record is only ever given back to its backend
    rebuild_reads_kernel: bool  # does rebuild_plan need the survey's outputs (even without keep)?
    needs_br_netfilter: bool  # do L3 rules see bridged packets only through br_netfilter?

    def plan(self, changes: Sequence[PortChange], ids_in_use: Iterable[int] | None = None,
             ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """One plan for all changes (atomic where the backend allows) and each port's new record.

        ``ids_in_use``: the numeric port ids (``record["id"]``) of every port NOT in ``changes``
        (None: unknown); backends that number ports avoid them."""
        ...

    def rebuild_plan(self, changes: Sequence[PortChange], survey: Sequence[str],
                     ids_in_use: Iterable[int] | None = None, keep: Iterable[str] = (),
                     ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """A plan that removes everything of ours found in the kernel (``survey``: the outputs of
        :meth:`survey_steps`) and builds exactly the ports in ``changes`` — EVERY binding that
        should exist, ``old`` being its stored record, possibly stale (used for ids and
        generations only). Never fails because recorded objects are missing (``reapply``).

        ``keep``: ports (not in ``changes``) whose objects the survey shows stay exactly as they
        are — chains, sets, rules, dispatch entries and mark ids, which no new port is given —
        while everything else of ours is rebuilt (a port whose record cannot be read). Given,
        the survey is always needed."""
        ...

    def teardown_plan(self, survey: Sequence[str]) -> Plan:
        """A plan removing everything of ours the survey shows, global objects included."""
        ...

    def survey_steps(self) -> tuple[Step, ...]:
        """Read-only steps listing everything of ours in the kernel, and only that. Run them with
        ``executor.run`` (no exception on failure) and pass their stdout ("" for a failed step),
        in order, to :meth:`kernel_digests`, :meth:`kernel_ports` or :meth:`rebuild_plan`."""
        ...

    def warm_up_steps(self) -> tuple[Step, ...]:
        """Read-only steps (dry runs) that make the next change of the process running them
        cheaper, for ``executor.warm_nft_cache``; none where nothing is gained."""
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

    def kernel_ports(self, outputs: Sequence[str]) -> set[str]:
        """Pure: every port of which the survey outputs show any object of ours (chains, sets,
        dispatch entries, port ids), whatever the records say: with the records, the orphans."""
        ...

    def inventory(self, outputs: Sequence[str]) -> dict[str, PortRecord]:
        """Pure: per port of :meth:`kernel_ports`, a record of exactly the objects of ours the
        kernel holds for it: ``plan([PortChange(port, record, None)])`` removes them and nothing
        else. What a rebuild that keeps some ports' objects untouched builds on: remove the
        other ports' inventories, build the wanted ports beside the kept ones."""
        ...

    def unrecorded(self, held: PortRecord, record: PortRecord | None) -> list[str]:
        """Pure: the objects of ``held`` (a port's :meth:`inventory` record) that ``record`` (the
        port's stored record; None: it has none) does not name, one phrase each (``chain bridge
        I-1/vp1``): the orphans ``verify`` names and a rebuild removes."""
        ...


def not_named(held: Iterable[tuple[Hashable, str]], named: Iterable[Hashable]) -> list[str]:
    """The phrases of ``held`` ((identity, phrase) per kernel object) whose identity ``named``
    lacks, counting repeats: an object the kernel holds twice and a record names once is one
    phrase."""
    left = Counter(named)
    phrases = []
    for identity, phrase in held:
        if left[identity] > 0:
            left[identity] -= 1
        else:
            phrases.append(phrase)
    return phrases


def canonical_digest(value: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``value`` (sorted keys, no spaces): digests of
    kernel state, comparable across processes and versions of the same digest format."""
    import hashlib  # only verify and reconnect need it

    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no spaces (also a sort key for mixed values)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

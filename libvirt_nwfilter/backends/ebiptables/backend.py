"""The ebiptables backend: the :class:`~libvirt_nwfilter.backends.base.Backend` contract, kept by
:mod:`.plan` (changes, rebuilds), :mod:`.listing` (what the kernel holds) and :mod:`.digest`.

Pure. :meth:`EbiptablesBackend.rebuild_plan` (``reapply``) takes the old state from a survey
instead of the records: leftovers go, every binding is rebuilt, and the global chains' hooks are
repaired. The digest module is imported when first needed: the per-binding path only plans.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from ..base import Plan, PortChange, PortRecord, Step
from . import listing
from .names import NAME
from .plan import plan
from .tools import configured


class EbiptablesBackend:
    """libvirt-compatible layout with ebtables/iptables/ip6tables restore transactions."""

    name = NAME
    rebuild_reads_kernel = True  # rebuild_plan removes what the survey found
    needs_br_netfilter = True  # L3 rules see bridged packets through br_netfilter (physdev)

    def __init__(self, restore_argv: Mapping[str, Sequence[str]] | None = None,
                 save_argv: Mapping[str, Sequence[str]] | None = None):
        """``restore_argv``, ``save_argv``: other commands for some tools (by tool name)."""
        self.tools = configured(restore_argv, save_argv)

    def plan(self, changes: Sequence[PortChange], ids_in_use: Iterable[int] | None = None,
             ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """One plan for all changes (``ids_in_use`` is for backends that number ports; unused)."""
        return plan(self.tools, changes)

    def rebuild_plan(self, changes: Sequence[PortChange], survey: Sequence[str],
                     ids_in_use: Iterable[int] | None = None, keep: Iterable[str] = (),
                     ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """For ``reapply``: ``changes`` lists EVERY port that should have rules but those of
        ``keep``, whose chains and rules the survey shows stay untouched; ``survey`` is the
        output of :meth:`survey_steps`. The stored records (``old``) are ignored: what the
        survey shows is the old state (:func:`.listing.inventory`), so objects a record lists
        but the kernel lost are never deleted, and leftovers (damaged chains, temporary chains,
        ports without a binding) are removed. The two-phase protocol is kept: apply builds the
        new chains beside whatever is left and repairs the global chains and their hooks
        (ip(6)tables), commit removes the old ones and renames; a refused apply rolls back."""
        del ids_in_use  # ports are not numbered here
        saves = listing.read(survey, self.tools)
        found = listing.inventory(saves)
        skipped = {c.port for c in changes} | set(keep)
        rebuilt = [PortChange(c.port, found.get(c.port), c.new) for c in changes]
        rebuilt += [PortChange(port, rec, None) for port, rec in sorted(found.items()) if port not in skipped]
        repair = {t.name: listing.repair_globals_lines(saves[t.name]) for t in self.tools if t.l3}
        return plan(self.tools, rebuilt, globals_repair=repair)

    def teardown_plan(self, survey: Sequence[str]) -> Plan:
        """Remove every object of ours the survey shows, the global chains included."""
        return Plan(apply=listing.purge_steps(self.tools, listing.read(survey, self.tools)))

    def survey_steps(self) -> tuple[Step, ...]:
        """``ebtables-save -t nat``, ``iptables-save -t filter``, ``ip6tables-save -t filter``
        (errors ignored), in the order the other methods expect their outputs."""
        return tuple(Step(t.save, ignore_errors=True) for t in self.tools)

    def warm_up_steps(self) -> tuple[Step, ...]:
        """None: the restore tools keep nothing between runs."""
        return ()

    def kernel_digests(self, outputs: Sequence[str] | Mapping[str, str], records: Mapping[str, PortRecord | None],
                       ) -> dict[str, str | None]:
        """Per recorded port, the digest of what the kernel has for it (:func:`.digest.port_structure`)
        from the survey outputs; None when nothing of it is found but its record expects rules.
        Equal for the same port in two kernels holding the same rules for it, whatever else
        they hold."""
        from . import digest

        saves = listing.read(outputs, self.tools)

        def of(port: str, record: PortRecord) -> str | None:
            structure = digest.port_structure(saves, port)
            if structure is None and not digest.expects_nothing(record):
                return None
            return digest.port_digest(structure)

        return {port: of(port, record) for port, record in records.items() if record is not None}

    def kernel_ports(self, outputs: Sequence[str]) -> set[str]:
        """Every port of which the kernel holds a chain of ours, a rule leading to one, or an
        ``nwf-in-post`` ACCEPT."""
        return set(self.inventory(outputs))

    def inventory(self, outputs: Sequence[str]) -> dict[str, PortRecord]:
        """Per port, a record of every object of ours the kernel holds (:func:`.listing.inventory`):
        ``PortChange(port, record, None)`` removes exactly those."""
        return listing.inventory(listing.read(outputs, self.tools))

    def unrecorded(self, held: PortRecord, record: PortRecord | None) -> list[str]:
        """The chains and rules of ``held`` (an inventory record) that ``record`` does not name
        (``ebtables chain nwf-J-vp1``, ``iptables rule '-A nwf-in-post … -j ACCEPT'``)."""
        return listing.unrecorded(held, record)

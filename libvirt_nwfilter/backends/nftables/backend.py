"""The nftables backend: the :class:`~libvirt_nwfilter.backends.base.Backend` contract, kept by
:mod:`.plan` (changes, rebuilds), :mod:`.listing` (what the kernel holds) and :mod:`.digest`.

Pure. The listing and digest modules are imported when first needed: the per-binding path
(CLI, hook) only plans.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from ...errors import NwfilterError
from ..base import Batch, Plan, PortChange, PortRecord, Step
from . import plan as planning
from .names import MarkLayout, port_id

DEFAULT_NFT = "/usr/sbin/nft"


class NftablesBackend:
    """Renders port changes as one nftables transaction (see :mod:`.plan`)."""

    name = "nftables"
    rebuild_reads_kernel = False  # rebuild_plan deletes and re-creates our tables (unless it keeps ports)

    def __init__(self, conntrack: str = "inet", l2_reject: bool = False, nft: str = DEFAULT_NFT,
                 *, mark_shift: int = 8, id_bits: int = 12):
        self.layout = planning.Layout(conntrack, l2_reject, MarkLayout(mark_shift, id_bits))
        self.nft = nft

    @property
    def conntrack(self) -> str:
        return self.layout.conntrack

    @property
    def marks(self) -> MarkLayout:
        return self.layout.marks

    @property
    def needs_br_netfilter(self) -> bool:
        """True when L3 rules only work with br_netfilter and bridge-nf-call-ip(6)tables=1."""
        return self.layout.inet

    # -- changes ---------------------------------------------------------------------------------
    def plan(self, changes: Sequence[PortChange], ids_in_use: Iterable[int] | None = None,
             ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """One ``nft -f -`` step for all ``changes`` and each changed port's new record
        (``ids_in_use``: see :func:`.plan.batch`); a port whose chains keep their shape is
        refilled in place."""
        text, records = planning.batch(self.layout, changes, ids_in_use=ids_in_use, refill=True)
        return self._plan(text), records

    def rebuild_plan(self, changes: Sequence[PortChange], survey: Sequence[str] = (),
                     ids_in_use: Iterable[int] | None = None, keep: Iterable[str] = (),
                     ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """Like :meth:`plan`, but for ``reapply`` when the kernel may not match the records
        (e.g. after ``nft flush ruleset``): ``changes`` must be ALL filtered ports but those of
        ``keep`` (``old`` records only keep ids and generations, and may be stale, missing or of
        another backend); atomic, and never fails because of missing old objects. Without
        ``keep`` the transaction deletes our tables first (``survey`` is not needed). With it,
        what the survey shows of the kept ports (chains, sets, dispatch elements, mark ids) stays
        untouched and counts as in use, and every other object of ours it shows is removed
        (:func:`.plan.beside`)."""
        kept = set(keep)
        held = self._held_beside(survey, kept) if kept else {}
        kept_ids = planning.held_ids((held[p] for p in kept if p in held), self.marks)
        cleaned: list[PortChange] = []
        claimed = set(kept_ids)
        for change in changes:
            old = planning.reusable(change.old, self.conntrack)
            pid = port_id(old)
            if pid is not None and (pid in claimed or not 1 <= pid <= self.marks.max_id):
                old["id"] = None  # a corrupt state gave two ports one id: renumber
            elif pid is not None:
                claimed.add(pid)
            if kept:
                old = planning.beside(old, held.get(change.port), self.conntrack)
            cleaned.append(PortChange(change.port, old, change.new))
        wanted = {change.port for change in changes}
        cleaned += [PortChange(port, record, None) for port, record in sorted(held.items())
                    if port not in wanted and port not in kept]
        text, records = planning.batch(self.layout, cleaned, ids_in_use=[*(ids_in_use or ()), *kept_ids],
                                       rebuild=not kept)
        return self._plan(text), records

    def _held_beside(self, survey: Sequence[str], kept: set[str]) -> dict[str, PortRecord]:
        """The inventory for a rebuild that keeps ``kept``; refused while objects of ours sit
        outside their port's table (removing them takes deleting that table, kept ports too)."""
        from . import listing

        with listing.paused_gc():
            view = listing.read(survey)
            astray = listing.misplaced(view)
            if astray:
                raise NwfilterError(
                    f"cannot rebuild while keeping the rules of {', '.join(sorted(kept))} (record unreadable): "
                    f"{len(astray)} object(s) of ours are outside their port's table ({astray[0]}; an earlier "
                    "version's single table, or someone else's change); repair with 'libvirt-nwfilter "
                    f"binding-delete --force {' '.join(sorted(kept))}' (or by restoring the records), then 'reapply'")
            return listing.inventory(view)

    def teardown_plan(self, survey: Sequence[str] = ()) -> Plan:
        """Remove all our tables (both families); succeeds whether they exist or not."""
        del survey
        return Plan(apply=(Step((self.nft, "-f", "-"), planning.remove_all_text()),))

    def _plan(self, lines: Batch) -> Plan:
        return Plan(apply=(lines.step((self.nft, "-f", "-")),))

    # -- reading the kernel back: survey, digests, inventory -----------------------------------
    def survey_steps(self) -> tuple[Step, ...]:
        """Each of our tables as JSON (``nft -j list table``; a missing table gives "")."""
        from .listing import survey_steps

        return survey_steps(self.nft)

    def warm_up_steps(self) -> tuple[Step, ...]:
        """A dry run with a rule and a map element (see :func:`.plan.cache_warming_text`)."""
        return (Step((self.nft, "-c", "-f", "-"), planning.cache_warming_text()),)

    def kernel_digests(self, outputs: Sequence[str], records: Mapping[str, PortRecord | None],
                       ) -> dict[str, str | None]:
        """Per recorded port, the digest of what the kernel has for it (see
        :func:`.digest.port_digest`), from the outputs of :meth:`survey_steps`. None: nothing of
        the port was found although its record expects something. Equal for the same port in
        two kernels holding the same rules for it, whatever its generation and mark id there."""
        from . import digest, listing

        def of(port: str, record: PortRecord) -> str | None:
            structure = digest.port_structure(index, port, record, digest.IdForms.of(record, self.marks))
            if structure is None and not digest.expects_nothing(record):
                return None
            return digest.port_digest(structure)

        with listing.paused_gc():
            index = digest.Index(listing.read(outputs))
            return {port: of(port, record) for port, record in records.items() if record is not None}

    def kernel_ports(self, outputs: Sequence[str]) -> set[str]:
        """Every port of which our tables hold a chain, set, dispatch element or port id."""
        return set(self.inventory(outputs))

    def inventory(self, outputs: Sequence[str]) -> dict[str, PortRecord]:
        """Per port, a record of every object of ours the kernel holds (:func:`.listing.inventory`):
        ``PortChange(port, record, None)`` removes exactly those."""
        from . import listing

        with listing.paused_gc():
            return listing.inventory(listing.read(outputs))

    def unrecorded(self, held: PortRecord, record: PortRecord | None) -> list[str]:
        """The chains, sets and map elements of ``held`` (an inventory record) that ``record``
        does not list (``chain bridge I-1/vp1``, ``element inet port_ids 0x00000005``)."""
        from . import listing

        return listing.unrecorded(held, record)

"""How a change reaches the kernel and the records: intent, plan, one transaction, records.

Every change (and every rebuild) goes through :class:`Committer`, under the host lock:

1. the rulesets are compiled and the backend's plan made (pure; a refusal changes nothing);
2. the intent is journalled (:mod:`journal`), atomically, BEFORE the kernel is touched;
3. the plan runs; a plan the kernel refuses is retried once as a rebuild of every binding (our
   rules may have been wiped behind our back, or objects of a lost record left in the way: a
   plan never lists the kernel, it is refused when it meets them);
4. the records are written (and, for a filter update, the filter stored);
5. the journal is removed.

A process killed anywhere between 2 and 5 leaves the journal, and the next command completes the
change from it with a rebuild (:mod:`recovery`), which deletes everything of ours in the kernel
and builds exactly the recorded bindings: a port never keeps rules that no record describes, and
a generation still in the kernel is never started again. A refusal before any rule changed
(compile errors, a refused or rolled-back transaction) removes the journal: nothing happened.

A rebuild never removes the rules of a port whose record cannot be read: unless the change
replaces that port's binding or the operator forces its removal, the backend keeps that port's
objects in the kernel exactly as they are (``rebuild_plan(keep=…)``) and rebuilds the rest.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Sequence

from . import executor
from .daemon import wakeup
from .backends.base import Backend, Plan, PortChange, PortRecord
from .errors import FirewallError, NwfilterError, PartialChange
from .ir import PortRuleset
from .journal import FilterUpdate, Intent, Journal, PortIntent
from .model import Binding, FilterRef, make_params
from .resolve import port_variables
from .rulesets import ruleset_hash
from .state import AppliedBinding, State, valid_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """One port's transition: ``old`` (None: nothing there) to ``new`` (None: remove)."""

    port: str
    old: AppliedBinding | None
    new: Binding | None
    ruleset: PortRuleset | None = None


def with_mac_parameter(binding: Binding) -> Binding:
    """The binding as libvirt stores it after instantiation: with a ``MAC`` parameter."""
    params = port_variables(binding.filterref.param_dict(), binding.mac)
    return replace(binding, filterref=FilterRef(binding.filterref.filter, make_params(params)))


class Committer:
    """Applies changes for one process. ``compile`` gives a binding's ruleset with the filters
    in force; ``backend_named`` makes another backend (to remove its rules)."""

    def __init__(self, backend: Backend, state: State, journal: Journal,
                 compile: Callable[[Binding], PortRuleset], backend_named: Callable[[str], Backend]):
        self.backend = backend
        self.state = state
        self.journal = journal
        executor.mark_changes(state.rundir)  # the resident service tells our changes by it
        self.compile = compile
        self.backend_named = backend_named
        self.journal_pending = False  # the journal on disk covers the work in progress
        self.always_rebuild = False  # the journal is damaged: every change rebuilds everything
        self._unsettled = False  # the kernel may have changed since the journal was written

    # -- the journal ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _journalled(self, intent: Intent) -> Iterator[None]:
        """``intent`` on disk for the duration of the block (a journal already pending covers
        it instead). Removed afterwards, or on an error that left the kernel unchanged."""
        if self.journal_pending:
            yield
            return
        self.journal.write(intent)
        self.journal_pending, self._unsettled = True, False
        try:
            yield
        except BaseException:
            if not self._unsettled:
                self.journal.clear()
            raise
        else:
            self.journal.clear()
        finally:
            self.journal_pending = False

    @contextlib.contextmanager
    def adopted(self) -> Iterator[None]:
        """Work that completes the journal already on disk (recovery): no journal of its own."""
        self.journal_pending = True
        try:
            yield
        finally:
            self.journal_pending = False

    # -- changes ----------------------------------------------------------------------------
    def commit(self, changes: Sequence[Change], command: str, filter_update: FilterUpdate | None = None,
               then: Callable[[], None] | None = None) -> list[AppliedBinding]:
        """One plan for every change, journalled, executed, recorded; ``then`` runs before the
        journal goes. Returns the new bindings' records."""
        if self.always_rebuild:
            return self.rebuild_with(changes, command, filter_update, then)
        ports = {c.port: PortIntent(c.old.binding if c.old else None, c.new) for c in changes}
        with self._journalled(Intent(command, ports, filter_update)):
            plan, records = self._plan(changes)
            self._require_bridge_netfilter(changes)
            try:
                self._execute(plan)
            except FirewallError as error:
                if isinstance(error, PartialChange):
                    raise
                # Refused: if our rules were wiped behind our back (nft flush ruleset, a
                # firewall reload) or objects no record names are in the way (a record lost),
                # building everything anew from what the kernel holds works.
                log.info("%s; retrying as one rebuild of every binding", error)
                try:
                    applied = self.rebuild_with(changes, command)
                except FirewallError:
                    raise error from None
            else:
                applied = self._record(changes, records)
            if then is not None:
                then()
            return applied

    def _plan(self, changes: Sequence[Change]) -> tuple[Plan, dict[str, PortRecord | None]]:
        changing = {c.port for c in changes}
        ids = [pid for port, pid in self.state.ids().items() if port not in changing]
        return self.backend.plan([PortChange(c.port, self._own_record(c.old), c.ruleset) for c in changes], ids)

    def rebuild_with(self, changes: Sequence[Change], command: str, filter_update: FilterUpdate | None = None,
                         then: Callable[[], None] | None = None) -> list[AppliedBinding]:
        """Rebuild every binding with ``changes`` applied; the records of ``changes``' ports."""
        changing = {c.port: c for c in changes}
        records, _ = self.state.scan()
        wanted = [a.binding for a in records if a.binding.portdev not in changing]
        wanted += [c.new for c in changes if c.new is not None]
        rulesets = {c.port: c.ruleset for c in changes if c.ruleset is not None}
        applied = self.rebuild(wanted, command, rulesets=rulesets, forget=changing, filter_update=filter_update,
                               then=then)
        return [a for a in applied if a.binding.portdev in changing]

    def rebuild(self, bindings: Sequence[Binding], command: str, *, rulesets: dict[str, PortRuleset] | None = None,
                forget: Iterable[str] = (), filter_update: FilterUpdate | None = None, teardown: Sequence[str] = (),
                then: Callable[[], None] | None = None) -> list[AppliedBinding]:
        """Make the kernel and the records hold exactly ``bindings`` (whatever the kernel holds
        now), in one plan; then remove the rules of the backends ``teardown``. A port whose
        record cannot be read is replaced when ``bindings`` has it, dropped when ``forget``
        names it, and otherwise kept exactly as the kernel holds it (its record stays, and
        ``verify`` names it until it is repaired)."""
        rulesets = rulesets or {}
        records, damaged = self.state.scan()
        damaged = [e for e in damaged if valid_port(e.port)]  # other files are not records of ours
        current = {a.binding.portdev: a for a in records}
        wanted = {b.portdev: b for b in bindings}
        dropped = set(forget)
        keep = sorted({e.port for e in damaged} - set(wanted) - dropped)
        for error in damaged:
            if error.port in keep:
                log.warning("%s", error)
        changes = [Change(port, current.get(port), binding, rulesets.get(port) or self.compile(binding))
                   for port, binding in wanted.items()]
        stale = sorted((set(current) | {e.port for e in damaged}) - set(wanted) - set(keep))
        ports = {c.port: PortIntent(c.old.binding if c.old else None, c.new) for c in changes
                 if c.old is None or c.old.binding != with_mac_parameter(c.new)}
        ports.update({port: PortIntent(current[port].binding if port in current else None, None) for port in stale})
        with self._journalled(Intent(command, ports, filter_update, tuple(teardown))):
            steps = self.backend.survey_steps()
            survey = executor.survey(steps) if self.backend.rebuild_reads_kernel or keep else ["" for _ in steps]
            plan, records_by_port = self.backend.rebuild_plan(
                [PortChange(c.port, self._own_record(c.old), c.ruleset) for c in changes], survey, [], keep=keep)
            self._require_bridge_netfilter(changes)
            self._execute(plan)
            applied = self._record(changes, records_by_port, stale)
            for name in teardown:
                self.teardown(name, keep)
            if then is not None:
                then()
            return applied

    def teardown(self, name: str, keep: Sequence[str] = ()) -> None:
        """Remove every rule of ours that backend ``name`` made (a backend change), but those of
        the ports ``keep``."""
        other = self.backend_named(name)
        survey = executor.survey(other.survey_steps())
        executor.execute(other.rebuild_plan([], survey, [], keep=keep)[0] if keep else other.teardown_plan(survey))
        log.warning("removed the rules of backend %s%s", name, f" but those of {', '.join(keep)}" if keep else "")

    # -- kernel and records ------------------------------------------------------------------
    def _execute(self, plan: Plan) -> None:
        self._unsettled = True
        try:
            executor.execute(plan)
        except FirewallError as error:
            self._unsettled = isinstance(error, PartialChange)  # otherwise refused or rolled back
            raise

    def _record(self, changes: Sequence[Change], records: dict[str, PortRecord | None],
                removed: Iterable[str] = ()) -> list[AppliedBinding]:
        applied = [AppliedBinding(with_mac_parameter(c.new), self.backend.name, dict(records[c.port]),
                                  ruleset_hash(c.ruleset)) for c in changes if c.new is not None]
        gone = [c.port for c in changes if c.new is None] + list(removed)
        self.state.write(applied, gone)
        wakeup.notify(self.state.rundir, [c.port for c in changes] + gone)
        for entry in applied:
            log.info("binding on %s: filter '%s' applied", entry.binding.portdev, entry.binding.filterref.filter)
        return applied

    def _own_record(self, applied: AppliedBinding | None) -> PortRecord | None:
        if applied is None or applied.backend != self.backend.name:
            return None
        return applied.record

    def _require_bridge_netfilter(self, changes: Sequence[Change]) -> None:
        """L3 rules see bridged packets only with br_netfilter on: switch it on, or refuse."""
        from .probe import BRIDGE_NF_SYSCTLS

        if not self.backend.needs_br_netfilter:
            return
        families = set().union(*(c.ruleset.l3_families() for c in changes if c.ruleset is not None))
        for family, name in zip((4, 6), BRIDGE_NF_SYSCTLS):
            if family not in families:
                continue
            value = executor.read_sysctl(name)
            if value is None and executor.load_module("br_netfilter"):
                value = executor.read_sysctl(name)
            if value is None:
                raise FirewallError(f"IPv{family} rules need the br_netfilter kernel module, which is not "
                                    "available: they would not see bridged traffic")
            if value != "1":
                log.warning("setting %s = 1 so that IPv%d rules see bridged traffic", name.replace("/", "."), family)
                executor.write_sysctl(name, "1")

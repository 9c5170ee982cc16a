"""Use cases: the only layer that sequences parse -> resolve -> compile -> apply -> state.

Every change runs under the host-wide lock, after completing what an interrupted process left
(:mod:`recovery`) and moving bindings made by another backend to the configured one. Changes
reach the kernel and the records through :class:`~libvirt_nwfilter.commit.Committer`
(journalled, one transaction); :mod:`drift` compares the kernel with the records.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Sequence

from . import recovery
from .backends.base import Backend, PortChange
from .commit import Change, Committer, with_mac_parameter
from .config import BACKENDS, Config
from .drift import Drift, kernel_check, kernel_drift
from .errors import BindingError, InUseError, NwfilterError
from .ir import PortRuleset
from .journal import FilterUpdate, Intent, Journal, JournalDamaged
from .learning.spec import compiled, same_learning
from .model import Binding, Filter, Lease
from .resolve import Lookup
from .rulesets import port_ruleset, ruleset_hash
from .state import AppliedBinding, RecordError, State, valid_port
from .store import FilterStore, Origin, referencing
from .xml import format_filter, parse_filter

log = logging.getLogger(__name__)

def _learned_before(binding: Binding, current: AppliedBinding | None) -> bool:
    return (current is not None and current.binding.learning is not None
            and (current.binding.owner_uuid, current.binding.mac) == (binding.owner_uuid, binding.mac))


def _inherit_learning(binding: Binding, current: AppliedBinding | None) -> Binding:
    """``binding`` with the addresses learned on its port, when the same owner and MAC learned
    them there (libvirt keeps a learned address until the port's teardown)."""
    if binding.learning is None and _learned_before(binding, current):
        return replace(binding, learning=current.binding.learning)
    return binding


@dataclass(frozen=True)
class FilterInfo:
    uuid: str
    name: str
    origin: Origin


class Service:
    """Entry point for the CLI and the hook; one instance per process."""

    def __init__(self, config: Config):
        if config.problem is not None:
            raise NwfilterError(config.problem)
        if config.backend not in BACKENDS:
            raise NwfilterError(f"unknown backend '{config.backend}' (expected {' or '.join(BACKENDS)})")
        self.config = config
        self.store = FilterStore(config.confdir)
        self.state = State(config.rundir)
        self.journal = Journal(config.rundir)
        self._backend: Backend | None = None
        self._committer: Committer | None = None
        self.journal_damage: JournalDamaged | None = None  # found by the locked section running

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = self._backend_named(self.config.backend)
        return self._backend

    def _backend_named(self, name: str) -> Backend:
        from .probe import make_backend

        return make_backend(replace(self.config, backend=name))

    @property
    def committer(self) -> Committer:
        if self._committer is None:
            self._committer = Committer(self.backend, self.state, self.journal, self.ruleset, self._backend_named)
        return self._committer

    @contextlib.contextmanager
    def locked(self, migrate: bool = True, recover: bool = True) -> Iterator[Intent | None]:
        """The host-wide lock, after completing any change a crash interrupted (unless not
        ``recover``: the pending intent is then given to the block) and, with ``migrate``,
        moving bindings of another backend. Filters are read afresh under it."""
        with self.state.locked(self.config.lock_timeout):
            self.store = FilterStore(self.config.confdir)
            try:
                intent = self._pending()
                if intent is not None and recover:
                    recovery.complete(intent, self.committer, self.state, self.journal, self.store)
                    intent = None
                if migrate and intent is None and self.state.backends() - {self.config.backend}:
                    recovery.move_backend(self.committer, self.state)
                yield intent
            finally:
                self.journal_damage = None
                if self._committer is not None:
                    self._committer.always_rebuild = self._committer.journal_pending = False

    def _pending(self) -> Intent | None:
        """The journal's intent; a damaged journal is reported and every change of this run
        becomes a rebuild of every binding from its record (correct whatever it said)."""
        try:
            return self.journal.read()
        except JournalDamaged as damaged:
            log.warning("%s", damaged)
            self.journal_damage = damaged
            self.committer.always_rebuild = self.committer.journal_pending = True
            return None

    def _settled(self) -> None:
        """Before reading: complete a change a crash interrupted (a quick check otherwise). What
        stands in the way (a damaged journal, the lock, a refused recovery) is a warning: the
        records can be read anyway (each file is written atomically)."""
        if not self.journal.exists():
            return
        try:
            self.journal.read()
            with self.locked(migrate=False):
                pass
        except NwfilterError as error:
            log.warning("%s", error)

    # -- filters ------------------------------------------------------------------------
    def list_filters(self) -> list[FilterInfo]:
        self._settled()
        return [FilterInfo(flt.uuid or "", name, self.store.origin(name)) for name, flt in self.store.all().items()]

    def dumpxml(self, name_or_uuid: str) -> str:
        self._settled()
        return format_filter(self.store.find(name_or_uuid))

    def define(self, data: bytes, source: str) -> tuple[Filter, bool]:
        """Define a filter; every binding using it switches to the new rules, all or nothing.

        Returns the stored filter and whether the definition changed. A definition that any
        affected binding cannot take is refused and nothing changes.
        """
        parsed = parse_filter(data, source)
        with self.locked():
            flt = self.store.prepare(parsed)
            current = self.store.lookup(flt.name)
            if current is not None and format_filter(current) == format_filter(flt):
                return flt, False
            affected = self._users_of(flt.name)
            if not affected:
                self.store.write(flt)
            else:
                self._update_filter(flt, current, affected)
            log.info("filter '%s' defined (%d binding(s) updated)", flt.name, len(affected))
            return flt, True

    def undefine(self, name_or_uuid: str) -> Filter:
        with self.locked():
            name = self.store.find(name_or_uuid).name
            users = self._users_of(name)
            if users:
                ports = ", ".join(a.binding.portdev for a in users)
                raise InUseError(f"filter '{name}' is in use by the binding(s) on {ports}")
            flt = self.store.remove(name)
        log.info("filter '%s' undefined", flt.name)
        return flt

    def _users_of(self, name: str) -> list[AppliedBinding]:
        filters = self.store.all()
        records = self.state.all()
        reaches = {top: referencing(filters, [top], name)  # per top filter, not per binding
                   for top in {a.binding.filterref.filter for a in records}}
        return [a for a in records if reaches[a.binding.filterref.filter]]

    def _update_filter(self, flt: Filter, current: Filter | None, affected: list[AppliedBinding]) -> None:
        lookup = self._overlay(flt)
        failures, changes = [], []
        for applied in affected:
            try:
                changes.append(Change(applied.binding.portdev, applied, *self.prepared(applied.binding, lookup)))
            except NwfilterError as error:
                failures.append(f"binding on {applied.binding.portdev} (owner {applied.binding.owner_name}): {error}")
        if failures:
            raise NwfilterError(f"filter '{flt.name}' not defined, in use and not applicable: " + "; ".join(failures))
        previous = format_filter(current) if current is not None and not self.store.origin(flt.name).shipped \
            else None
        update = FilterUpdate(flt.name, format_filter(flt), previous)
        self.committer.commit(changes, "define", update, then=lambda: self.store.write(flt))

    def _overlay(self, flt: Filter) -> Lookup:
        return lambda name: flt if name == flt.name else self.store.source(name)

    # -- bindings -----------------------------------------------------------------------
    def ruleset(self, binding: Binding, lookup: Lookup | None = None) -> PortRuleset:
        """The port's ruleset for ``binding`` with the current (or given) filters (pure)."""
        return self.prepared(binding, lookup)[1]

    def prepared(self, binding: Binding, lookup: Lookup | None = None) -> tuple[Binding, PortRuleset]:
        """``binding`` with its learning state as its filters give it (IP learning, see
        :mod:`.learning`), and its ruleset (pure)."""
        lookup = lookup or self.store.source
        ruleset, learning = compiled(binding, lambda ref: port_ruleset(ref, binding.mac, lookup, self.config.max_rules))
        return (binding if learning == binding.learning else replace(binding, learning=learning)), ruleset

    def render(self, binding: Binding) -> str:
        """What :meth:`create_binding` would run, as text (nothing is applied)."""
        plan, _ = self.backend.plan([PortChange(binding.portdev, None, self.ruleset(binding))])
        return "".join(f"# {' '.join(step.argv)}\n{step.stdin}" for step in plan.apply + plan.commit)

    def check(self, bindings: Iterable[Binding]) -> None:
        """Resolve and compile every binding without applying anything (hook ``prepare``)."""
        for binding in bindings:
            self.ruleset(binding)

    def create_binding(self, binding: Binding) -> AppliedBinding:
        """Instantiate a binding on its port; refused if the port already has one."""
        with self.locked():
            if self.state.get(binding.portdev) is not None:
                raise BindingError(f"binding '{binding.portdev}' already exists")
            change = Change(binding.portdev, None, *self.prepared(binding))
            self._require_learner([change])
            return self.committer.commit([change], "binding-create")[0]

    def delete_binding(self, port: str) -> AppliedBinding:
        with self.locked():
            applied = self.binding(port)
            self.committer.commit([Change(port, applied, None)], "binding-delete")
            log.info("binding on %s deleted", port)
            return applied

    def force_delete(self, ports: Sequence[str]) -> None:
        """Forget the records of ``ports`` whatever they hold (unreadable ones included) and
        rebuild every other binding, which removes whatever the kernel holds for ``ports``."""
        for port in ports:
            self.state.path(port)  # a valid port name
        with self.locked(recover=False) as intent:
            if intent is not None:
                recovery.complete(intent, self.committer, self.state, self.journal, self.store, forget=ports)
            else:
                records, _ = self.state.scan()
                self.committer.rebuild([a.binding for a in records if a.binding.portdev not in ports],
                                       "binding-delete --force", forget=ports)
        log.info("records of %s forgotten and every other binding rebuilt", ", ".join(ports))

    def binding(self, port: str) -> AppliedBinding:
        self._settled()
        applied = self.state.get(port)
        if applied is None:
            raise BindingError(f"no nwfilter binding for port dev '{port}'")
        return applied

    def list_bindings(self) -> list[AppliedBinding]:
        self._settled()
        return self.state.all()

    def bind_owner(self, bindings: Sequence[Binding]) -> list[AppliedBinding]:
        """Instantiate several bindings (a guest's interfaces) all or nothing.

        A port that already has a binding gets the new one in the same transaction (its old
        rules stay until the switch); a binding of another owner there is logged and replaced.
        A port whose record cannot be read is replaced through a rebuild of every binding.
        """
        with self.locked():
            changes, unreadable = [], False
            for binding in bindings:
                binding, ruleset = self.prepared(binding)
                try:
                    current = self.state.get(binding.portdev)
                except RecordError as error:
                    log.warning("%s; replacing it", error.path)
                    current, unreadable = None, True
                if current is not None and current.binding.owner_uuid != binding.owner_uuid:
                    log.warning("port %s: replacing the binding owned by %s", binding.portdev,
                                current.binding.owner_name)
                changes.append(Change(binding.portdev, current, binding, ruleset))
            self._require_learner(changes)
            command = f"binding the ports of '{bindings[0].owner_name}'" if bindings else "binding"
            if unreadable:
                return self.committer.rebuild_with(changes, command)
            return self.committer.commit(changes, command)

    def unbind_owner(self, owner_uuid: str) -> list[str]:
        """Remove every binding owned by ``owner_uuid``; returns the ports cleaned. A record
        that cannot be read is left (logged with its repair)."""
        with self.locked():
            owned = []
            for port in self.state.owned_ports(owner_uuid):
                try:
                    applied = self.state.get(port)
                except RecordError as error:
                    log.error("%s", error)
                    continue
                if applied is not None and applied.binding.owner_uuid == owner_uuid:
                    owned.append(applied)
            if owned:
                self.committer.commit([Change(a.binding.portdev, a, None) for a in owned],
                                      f"unbinding the ports of '{owned[0].binding.owner_name}'")
            for applied in owned:
                log.info("binding on %s removed (owner %s)", applied.binding.portdev, applied.binding.owner_name)
            return [a.binding.portdev for a in owned]

    def sync(self, bindings: Sequence[Binding]) -> list[str]:
        """Make the kernel hold ``bindings`` (hook ``reconnect``), skipping ports that are intact.

        A port is left alone when its binding and compiled rules are what the state records and
        the kernel holds exactly those rules. If a recorded port's rules were damaged or wiped,
        or a port's record cannot be read, every binding is rebuilt in one transaction. Returns
        the ports that were (re)applied.
        """
        with self.locked():
            current: dict[str, AppliedBinding | None] = {}
            unreadable = False
            for binding in bindings:
                try:
                    current[binding.portdev] = self.state.get(binding.portdev)
                except RecordError as error:
                    log.warning("%s; replacing it", error.path)
                    current[binding.portdev], unreadable = None, True
            prepared = [self.prepared(_inherit_learning(b, current[b.portdev])) for b in bindings]
            bindings = [binding for binding, _ in prepared]
            rulesets = {binding.portdev: ruleset for binding, ruleset in prepared}
            self._require_learner([Change(b.portdev, current[b.portdev], b) for b in bindings])
            recorded = [a for a in current.values() if a is not None]
            intact = self._intact_ports(recorded)
            todo = [b for b in bindings if not self._unchanged(current[b.portdev], b, rulesets[b.portdev], intact)]
            if not todo:
                return []
            command = f"re-binding the ports of '{bindings[0].owner_name}'"
            if unreadable or any(a.binding.portdev not in intact for a in recorded):
                everything = {a.binding.portdev: a.binding for a in self.state.scan()[0]}
                everything.update({b.portdev: b for b in bindings})
                self.committer.rebuild(list(everything.values()), command, rulesets=rulesets)
            else:
                self.committer.commit([Change(b.portdev, current[b.portdev], b, rulesets[b.portdev]) for b in todo],
                                      command)
            return [b.portdev for b in todo]

    def _require_learner(self, changes: Sequence[Change]) -> None:
        """A binding that starts learning its address needs the resident service, which learns
        it: refused (one line) when the service does not run. A port that goes on learning
        (the same owner and MAC learned there before) is left alone."""
        from .daemon.server import running

        starting = [c.new for c in changes if c.new is not None and c.new.learning is not None
                    and not _learned_before(c.new, c.old)]
        if starting and not running(self.config.rundir):
            binding = starting[0]
            raise NwfilterError(f"port {binding.portdev}: its IP address is to be learned (CTRL_IP_LEARNING "
                                f"'{binding.learning.mode}'), which needs the resident service libvirt-nwfilterd, "
                                f"and it is not running: start it, or give {' and '.join(binding.learning.variables)} as a "
                                "parameter")

    def update_learned(self, port: str, binding: Binding, leases: tuple[Lease, ...]) -> AppliedBinding | None:
        """Make ``leases`` the addresses learned on ``port`` and apply its filter with them (the
        learning-time rules with none), if the port's record still holds ``binding`` (its
        learned addresses aside); None when it does not. A change of expiry times alone is
        only recorded (the rules stay the same)."""
        with self.locked():
            try:
                current = self.state.get(port)
            except RecordError as error:
                log.error("%s", error)
                return None
            if current is None or not same_learning(current.binding, binding):
                return None
            new, ruleset = self.prepared(replace(current.binding, learning=replace(binding.learning, leases=leases)))
            if new == current.binding:
                return current
            if ruleset_hash(ruleset) == current.ruleset_hash and current.backend == self.backend.name:
                applied = AppliedBinding(new, current.backend, current.record, current.ruleset_hash)
                self.state.write([applied])
                return applied
            return self.committer.commit([Change(port, current, new, ruleset)], f"IP learning on {port}")[0]

    def _intact_ports(self, recorded: Sequence[AppliedBinding]) -> set[str]:
        """The recorded ports whose kernel rules are intact: those the resident service knows
        to be (it watches every change to our tables), the others checked against a reference."""
        from . import executor
        from .daemon import knowledge

        generation = executor.nft_generation if self.backend.name == "nftables" else None
        known = knowledge.intact(self.config.rundir, self.backend.name, generation)
        trusted = {a.binding.portdev for a in recorded if known.get(a.binding.portdev) == a.ruleset_hash}
        rest = [a for a in recorded if a.binding.portdev not in trusted]
        return trusted | (self.kernel_check(rest)[1] if rest else set())

    def kernel_check(self, recorded: Sequence[AppliedBinding]) -> tuple[dict[str, str | None], set[str]]:
        """The live digest of each recorded port, and the ports whose kernel rules are intact
        (:func:`drift.kernel_check`)."""
        return kernel_check(self.backend, recorded, self.ruleset)

    @staticmethod
    def _unchanged(current: AppliedBinding | None, binding: Binding, ruleset: PortRuleset, intact: set[str]) -> bool:
        return (current is not None and binding.portdev in intact and current.ruleset_hash == ruleset_hash(ruleset)
                and current.binding == with_mac_parameter(binding))

    def reapply(self) -> list[AppliedBinding]:
        """Re-instantiate every recorded binding with the current filters, from scratch; the
        repair of a damaged journal (removed once the rebuild is done)."""
        with self.locked():
            damaged_journal = self.journal_damage is not None
            applied = self.committer.rebuild([a.binding for a in self.state.scan()[0]], "reapply")
            if damaged_journal:
                self.journal.clear()
                log.warning("removed the damaged journal %s: every binding was rebuilt from its record",
                            self.journal.path)
            return applied

    def remove_bindings(self, ports: Iterable[str]) -> None:
        """Remove the bindings of ``ports`` (those that exist and can be read)."""
        with self.locked():
            gone = []
            for port in ports:
                try:
                    applied = self.state.get(port)
                except RecordError as error:
                    log.error("%s", error)
                    continue
                if applied is not None:
                    gone.append(applied)
            if gone:
                self.committer.commit([Change(a.binding.portdev, a, None) for a in gone], "removing stale bindings")

    def verify(self) -> list[Drift]:
        """Compare kernel, records and filters; everything that disagrees, with what is wrong
        (an interrupted change is completed first): ports whose rules drifted, kernel objects
        of ours that no record names (orphans), files that cannot be used."""
        with self.locked(migrate=False):
            found: list[Drift] = []
            if self.journal_damage is not None:
                found.append(Drift(str(self.journal.path), str(self.journal_damage), file=True))
            records, damaged = self.state.scan()
            found += [Drift(error.port, str(error), file=True) for error in damaged]
            if not self.state.index_matches(records, damaged) or self.state.index_problem:
                problem = self.state.index_problem or "does not match the binding files"
                self.state.rebuild_index()
                found.append(Drift(str(self.state.index_path), f"{problem}; rebuilt from the binding files",
                                   file=True))
            unchanged = []
            for applied in records:
                try:
                    current = ruleset_hash(self.ruleset(applied.binding))
                except NwfilterError as error:
                    found.append(Drift(applied.binding.portdev, f"its filter no longer resolves: {error}"))
                    continue
                if current == applied.ruleset_hash:
                    unchanged.append(applied)
                else:  # what the kernel should hold is unknown: the filters changed since
                    found.append(Drift(applied.binding.portdev, "applied rules differ from its filters' definitions"))
            kept = [error.port for error in damaged if valid_port(error.port)]
            return kernel_drift(self.backend, unchanged, self.ruleset, records, kept) + found

    # -- status -------------------------------------------------------------------------
    def status(self) -> list[tuple[str, str]]:
        """Label/value lines describing backend, kernel capabilities and counts."""
        from . import executor
        from .probe import BRIDGE_NF_SYSCTLS, capabilities

        caps = capabilities(self.config.rundir)
        if self.config.backend == "nftables":
            tracking = ("bridge family (nf_conntrack_bridge)" if caps.bridge_conntrack
                        else "inet family via br_netfilter, ports carried in the packet mark")
        else:
            tracking = "iptables/ip6tables via br_netfilter (physdev)"
        lines = [("Backend", self.config.backend), ("Connection tracking", tracking),
                 ("nf_conntrack_bridge", "yes" if caps.bridge_conntrack else "no"),
                 ("Reject in bridge tables", "yes" if caps.bridge_reject else "no (L2 reject is drop)")]
        for name in BRIDGE_NF_SYSCTLS:
            value = executor.read_sysctl(name)
            shown = "not available (br_netfilter not loaded)" if value is None else value
            if value == "0":
                shown += " (L3 rules are switched on when a binding needs them)"
            lines.append((name.rsplit("/", 1)[1], shown))
        filters = self.list_filters()
        bindings, damaged = self.state.scan()
        user = sum(1 for f in filters if not f.origin.shipped)
        count = f"{len(bindings)} on {len({b.binding.owner_uuid for b in bindings})} owner(s)"
        if damaged:
            count += f", and {len(damaged)} unreadable record(s) ('verify' names them)"
        learning = [b.binding.learning for b in bindings if b.binding.learning is not None]
        if learning:
            waiting = sum(1 for item in learning if not item.leases)
            count += (f"; {len(learning)} learn their IP address ({waiting} learning, {len(learning) - waiting} "
                      f"with {sum(len(item.leases) for item in learning)} address(es) learned)")
        lines += [("Filters", f"{len(filters)} ({len(filters) - user} built in, {user} defined here)"),
                  ("Bindings", count),
                  ("Configuration", str(self.config.confdir)), ("State", str(self.config.rundir))]
        from .daemon.status import status_lines

        return lines + status_lines(self.config.rundir)

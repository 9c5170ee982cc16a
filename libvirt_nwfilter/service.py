"""Use cases: the only layer that sequences parse -> resolve -> compile -> apply -> state.

Every change runs under the host-wide lock: compile everything first (pure), then one plan for
the kernel, then the state. A filter redefinition that affects bindings is journalled so that a
crash at any instant is completed by the next command (roll forward), keeping store, state and
kernel consistent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from . import executor
from .backends.base import Backend, PortChange, PortRecord, Step
from .compiler import compile_port
from .config import BACKENDS, Config
from .errors import BindingError, FirewallError, InUseError, NwfilterError
from .ir import Field, PortRuleset
from .model import Binding, Filter, FilterRef, make_params
from .resolve import Lookup, port_variables, resolve
from .state import AppliedBinding, State
from .store import FilterStore, Origin, referencing, write_atomically
from .xml import format_filter, parse_filter

log = logging.getLogger(__name__)

JOURNAL = "update.json"


@dataclass(frozen=True)
class FilterInfo:
    uuid: str
    name: str
    origin: Origin


@dataclass(frozen=True)
class Drift:
    """A port whose kernel rules, state or filters disagree."""

    port: str
    problem: str


@dataclass(frozen=True)
class _Change:
    """One port's transition: ``old`` (None: nothing there) to ``new`` (None: remove)."""

    port: str
    old: AppliedBinding | None
    new: Binding | None
    ruleset: PortRuleset | None = None


def with_mac_parameter(binding: Binding) -> Binding:
    """The binding as libvirt stores it after instantiation: with a ``MAC`` parameter."""
    params = port_variables(binding.filterref.param_dict(), binding.mac)
    ref = FilterRef(binding.filterref.filter, make_params(params))
    return Binding(binding.owner_name, binding.owner_uuid, binding.portdev, binding.mac, ref, binding.linkdev)


def _copy_ipsets(changes: Sequence[PortChange], netns: str) -> None:
    """Copy the kernel ipsets the rules name into ``netns`` (rules referring to a missing set
    are refused by iptables)."""
    names = {cond.value.name for change in changes if change.new is not None
             for rule in change.new.fi + change.new.fo + change.new.hi
             for cond in rule.conds if cond.field is Field.IPSET}
    for name in sorted(names):
        found, saved = executor.query(("ipset", "save", name))
        if found:
            executor.run(Step(("ipset", "restore", "-exist"), saved), netns)


def ruleset_hash(ruleset: PortRuleset) -> str:
    """A 64-bit fingerprint of a compiled ruleset (zlib: hashlib costs start-up time)."""
    data = repr(ruleset).encode()
    return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"


class Service:
    """Entry point for the CLI and the hook; one instance per process."""

    def __init__(self, config: Config):
        if config.backend not in BACKENDS:
            raise NwfilterError(f"unknown backend '{config.backend}' (expected {' or '.join(BACKENDS)})")
        self.config = config
        self.store = FilterStore(config.confdir)
        self.state = State(config.rundir)
        self._backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            from .probe import make_backend

            self._backend = make_backend(self.config)
        return self._backend

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The host-wide lock, after completing any update a crash interrupted. Filters are
        read afresh under it: another process may have redefined them meanwhile."""
        with self.state.locked():
            self.store = FilterStore(self.config.confdir)
            self._recover()
            yield

    def _settled(self) -> None:
        """Before reading: complete an update a crash interrupted (a quick check otherwise)."""
        if (self.state.rundir / JOURNAL).is_file():
            with self.locked():
                pass

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
        return [a for a in self.state.all() if referencing(filters, [a.binding.filterref.filter], name)]

    def _update_filter(self, flt: Filter, current: Filter | None, affected: list[AppliedBinding]) -> None:
        lookup = self._overlay(flt)
        failures, changes = [], []
        for applied in affected:
            try:
                changes.append(_Change(applied.binding.portdev, applied, applied.binding,
                                       self.ruleset(applied.binding, lookup)))
            except NwfilterError as error:
                failures.append(f"binding on {applied.binding.portdev} (owner {applied.binding.owner_name}): {error}")
        if failures:
            raise NwfilterError(f"filter '{flt.name}' not defined, in use and not applicable: " + "; ".join(failures))
        journal = {"filter": format_filter(flt),
                   "previous": format_filter(current) if self.store.origin(flt.name) is not Origin.BUILTIN
                   and current is not None else None}
        write_atomically(self.state.rundir / JOURNAL, json.dumps(journal) + "\n", mode=0o600)
        try:
            self._commit(changes)
        except NwfilterError:  # refused: nothing changed (an interruption keeps the journal)
            (self.state.rundir / JOURNAL).unlink(missing_ok=True)
            raise
        self.store.write(flt)
        (self.state.rundir / JOURNAL).unlink(missing_ok=True)

    def _overlay(self, flt: Filter) -> Lookup:
        return lambda name: flt if name == flt.name else self.store.source(name)

    def _recover(self) -> None:
        """Complete a filter update a crash interrupted: store the new filter, rebuild all."""
        path = self.state.rundir / JOURNAL
        if not path.is_file():
            return
        journal = json.loads(path.read_text(encoding="utf-8"))
        new = parse_filter(journal["filter"], str(path))
        log.warning("completing the interrupted update of filter '%s'", new.name)
        self.store.write(new)
        try:
            self._rebuild(self.state.all())
        except NwfilterError as error:
            log.error("cannot complete the update of filter '%s' (%s); restoring the previous one", new.name, error)
            if journal["previous"] is None:
                self.store.remove(new.name)
            else:
                self.store.write(parse_filter(journal["previous"], str(path)))
            self._rebuild(self.state.all())
        path.unlink()

    # -- bindings -----------------------------------------------------------------------
    def ruleset(self, binding: Binding, lookup: Lookup | None = None) -> PortRuleset:
        """The port's ruleset for ``binding`` with the current (or given) filters (pure)."""
        return compile_port(resolve(binding.filterref, binding.mac, lookup or self.store.source))

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
            return self._commit([_Change(binding.portdev, None, binding, self.ruleset(binding))])[0]

    def delete_binding(self, port: str) -> AppliedBinding:
        with self.locked():
            applied = self.binding(port)
            self._commit([_Change(port, applied, None)])
            log.info("binding on %s deleted", port)
            return applied

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
        """
        with self.locked():
            changes = []
            for binding in bindings:
                ruleset = self.ruleset(binding)
                current = self.state.get(binding.portdev)
                if current is not None and current.binding.owner_uuid != binding.owner_uuid:
                    log.warning("port %s: replacing the binding owned by %s", binding.portdev,
                                current.binding.owner_name)
                changes.append(_Change(binding.portdev, current, binding, ruleset))
            return self._commit(changes)

    def unbind_owner(self, owner_uuid: str) -> list[str]:
        """Remove every binding owned by ``owner_uuid``; returns the ports cleaned."""
        with self.locked():
            owned = [a for a in map(self.state.get, self.state.owned_ports(owner_uuid)) if a is not None]
            if owned:
                self._commit([_Change(a.binding.portdev, a, None) for a in owned])
            for applied in owned:
                log.info("binding on %s removed (owner %s)", applied.binding.portdev, applied.binding.owner_name)
            return [a.binding.portdev for a in owned]

    def sync(self, bindings: Sequence[Binding]) -> list[str]:
        """Make the kernel hold ``bindings`` (hook ``reconnect``), skipping ports that are intact.

        A port is left alone when its binding and compiled rules are what the state records and
        the kernel holds exactly those rules. If a recorded port's rules were damaged or wiped,
        every binding is rebuilt in one transaction. Returns the ports that were (re)applied.
        """
        with self.locked():
            rulesets = {b.portdev: self.ruleset(b) for b in bindings}
            current = {b.portdev: self.state.get(b.portdev) for b in bindings}
            recorded = [a for a in current.values() if a is not None]
            intact = self._intact_ports(recorded)
            todo = [b for b in bindings if not self._unchanged(current[b.portdev], b, rulesets[b.portdev], intact)]
            if not todo:
                return []
            if any(a.binding.portdev not in intact for a in recorded):
                everything = {a.binding.portdev: a.binding for a in self.state.all()}
                everything.update({b.portdev: b for b in bindings})
                self._rebuild_bindings(list(everything.values()), rulesets)
            else:
                self._commit([_Change(b.portdev, current[b.portdev], b, rulesets[b.portdev]) for b in todo])
            return [b.portdev for b in todo]

    @staticmethod
    def _unchanged(current: AppliedBinding | None, binding: Binding, ruleset: PortRuleset, intact: set[str]) -> bool:
        return (current is not None and binding.portdev in intact and current.ruleset_hash == ruleset_hash(ruleset)
                and current.binding == with_mac_parameter(binding))

    def reapply(self) -> list[AppliedBinding]:
        """Re-instantiate every recorded binding with the current filters, from scratch."""
        with self.locked():
            return self._rebuild(self.state.all())

    def remove_bindings(self, ports: Iterable[str]) -> None:
        """Remove the bindings of ``ports`` (those that exist)."""
        with self.locked():
            gone = [a for a in (self.state.get(p) for p in ports) if a is not None]
            if gone:
                self._commit([_Change(a.binding.portdev, a, None) for a in gone])

    def verify(self) -> list[Drift]:
        """Compare kernel, state and filters; every port that drifted, with what is wrong."""
        with self.locked():
            found, unchanged = [], []
            for applied in self.state.all():
                try:
                    current = ruleset_hash(self.ruleset(applied.binding))
                except NwfilterError as error:
                    found.append(Drift(applied.binding.portdev, f"its filter no longer resolves: {error}"))
                    continue
                if current == applied.ruleset_hash:
                    unchanged.append(applied)
                else:  # what the kernel should hold is unknown: the filters changed since
                    found.append(Drift(applied.binding.portdev, "applied rules differ from its filters' definitions"))
            return self._kernel_drift(unchanged) + found

    def _kernel_drift(self, recorded: Sequence[AppliedBinding]) -> list[Drift]:
        found = []
        live, intact = self._kernel_check(recorded)
        for applied in recorded:
            port = applied.binding.portdev
            if applied.backend != self.backend.name:
                found.append(Drift(port, f"applied with backend {applied.backend}, configured {self.backend.name}"))
            elif live.get(port) is None:
                found.append(Drift(port, "rules missing from the kernel"))
            elif port not in intact:
                found.append(Drift(port, "kernel rules differ from the recorded ones (missing, extra or changed)"))
        return found

    def _intact_ports(self, recorded: Sequence[AppliedBinding]) -> set[str]:
        """The recorded ports whose kernel rules are intact: those the resident service knows
        to be (it watches every change to our tables), the others checked against a reference."""
        from .daemon import knowledge

        known = knowledge.intact(self.config.rundir, self.backend.name)
        trusted = {a.binding.portdev for a in recorded if known.get(a.binding.portdev) == a.ruleset_hash}
        rest = [a for a in recorded if a.binding.portdev not in trusted]
        return trusted | (self._kernel_check(rest)[1] if rest else set())

    def _kernel_check(self, recorded: Sequence[AppliedBinding]) -> tuple[dict[str, str | None], set[str]]:
        """The live digest of each port, and the ports whose kernel rules are intact.

        A port is intact when the kernel holds what the same kernel makes of its recorded rules:
        the reference is built in a throw-away network namespace from the state (same backend),
        so both sides are in the kernel's own printed form."""
        mine = [a for a in recorded if a.backend == self.backend.name]
        if not mine:
            return {}, set()
        steps = self.backend.survey_steps()
        live = self.backend.kernel_digests(executor.survey(steps), {a.binding.portdev: a.record for a in mine})
        changes = [PortChange(a.binding.portdev, a.record, self.ruleset(a.binding)) for a in mine]
        with executor.reference_namespace() as netns:
            _copy_ipsets(changes, netns)
            plan, records = self.backend.rebuild_plan(changes, ["" for _ in steps], [])
            executor.execute(plan, netns)
            survey = executor.survey(steps, netns)
        reference = self.backend.kernel_digests(survey, {p: r for p, r in records.items() if r is not None})
        return live, {port for port, digest in live.items() if digest is not None and digest == reference.get(port)}

    # -- internals ----------------------------------------------------------------------
    def _rebuild(self, recorded: Sequence[AppliedBinding]) -> list[AppliedBinding]:
        current = {a.binding.portdev: a for a in recorded}
        return self._rebuild_bindings([a.binding for a in recorded], {}, current)

    def _rebuild_bindings(self, bindings: Sequence[Binding], rulesets: dict[str, PortRuleset],
                          current: dict[str, AppliedBinding] | None = None) -> list[AppliedBinding]:
        """Every binding that should exist, built anew in one plan (whatever the kernel holds)."""
        current = current if current is not None else {b.portdev: self.state.get(b.portdev) for b in bindings}
        changes = [_Change(b.portdev, current.get(b.portdev), b, rulesets.get(b.portdev) or self.ruleset(b))
                   for b in bindings]
        steps = self.backend.survey_steps()
        survey = executor.survey(steps) if self.backend.rebuild_reads_kernel else ["" for _ in steps]
        return self._commit(changes, lambda port_changes: self.backend.rebuild_plan(port_changes, survey, []))

    def _rebuild_with(self, changes: Sequence[_Change]) -> list[AppliedBinding]:
        """Rebuild all bindings, with ``changes`` applied; the bindings of ``changes``' ports."""
        changing = {c.port: c for c in changes}
        keep = [a.binding for a in self.state.all() if a.binding.portdev not in changing]
        wanted = keep + [c.new for c in changes if c.new is not None]
        rulesets = {c.port: c.ruleset for c in changes if c.ruleset is not None}
        applied = self._rebuild_bindings(wanted, rulesets)
        for change in changes:
            if change.new is None:
                self.state.remove(change.port)
        return [a for a in applied if a.binding.portdev in changing]

    def _commit(self, changes: Sequence[_Change],
                planner: Callable[[list[PortChange]], tuple] | None = None) -> list[AppliedBinding]:
        """One plan for every change, executed, then recorded; the new bindings' state."""
        port_changes = [PortChange(c.port, self._own_record(c.old), c.ruleset) for c in changes]
        if planner is None:
            changing = {c.port for c in changes}
            ids = [pid for port, pid in self.state.ids().items() if port not in changing]
            plan, records = self.backend.plan(port_changes, ids)
        else:
            plan, records = planner(port_changes)
        self._require_bridge_netfilter(changes)
        try:
            executor.execute(plan)
        except FirewallError as error:
            if planner is not None or not any(c.old for c in changes):
                raise
            # Refused while replacing or removing recorded rules: if they were wiped behind our
            # back (nft flush ruleset, a firewall reload), building everything anew works.
            log.info("%s; retrying as one rebuild of every binding", error)
            try:
                return self._rebuild_with(changes)
            except FirewallError:
                raise error from None
        applied = [AppliedBinding(with_mac_parameter(c.new), self.backend.name, dict(records[c.port]),
                                  ruleset_hash(c.ruleset)) for c in changes if c.new is not None]
        self.state.update(applied, [c.port for c in changes if c.new is None])
        for entry in applied:
            log.info("binding on %s: filter '%s' applied", entry.binding.portdev, entry.binding.filterref.filter)
        return applied

    def _own_record(self, applied: AppliedBinding | None) -> PortRecord | None:
        if applied is None or applied.backend != self.backend.name:
            return None
        return applied.record

    def _require_bridge_netfilter(self, changes: Sequence[_Change]) -> None:
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

    # -- status -------------------------------------------------------------------------
    def status(self) -> list[tuple[str, str]]:
        """Label/value lines describing backend, kernel capabilities and counts."""
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
        bindings = self.state.all()
        user = sum(1 for f in filters if f.origin is not Origin.BUILTIN)
        lines += [("Filters", f"{len(filters)} ({len(filters) - user} built in, {user} defined here)"),
                  ("Bindings", f"{len(bindings)} on {len({b.binding.owner_uuid for b in bindings})} owner(s)"),
                  ("Configuration", str(self.config.confdir)), ("State", str(self.config.rundir))]
        from .daemon.status import status_lines

        return lines + status_lines(self.config.rundir)

"""Use cases: the only layer that sequences parse -> resolve -> compile -> apply -> state."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from .backends.base import Backend, PortChange
from .compiler import compile_port
from .config import BACKENDS, Config
from .errors import BindingError, NwfilterError
from .ir import PortRuleset
from .executor import execute
from .model import Binding, Filter, FilterRef, make_params
from .resolve import port_variables, resolve
from .state import AppliedBinding, State
from .store import FilterStore, Origin
from .xml import format_filter, parse_filter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterInfo:
    uuid: str
    name: str
    origin: Origin


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

    # -- filters ------------------------------------------------------------------------
    def list_filters(self) -> list[FilterInfo]:
        return [FilterInfo(flt.uuid or "", name, self.store.origin(name)) for name, flt in self.store.all().items()]

    def dumpxml(self, name_or_uuid: str) -> str:
        return format_filter(self.store.find(name_or_uuid))

    def define(self, data: bytes, source: str) -> tuple[Filter, bool]:
        """Define a filter from XML; returns it and whether the stored definition changed."""
        flt = self.store.prepare(parse_filter(data, source))
        current = self.store.lookup(flt.name)
        changed = current is None or format_filter(current) != format_filter(flt)
        if changed:
            self.store.write(flt)
            log.info("filter '%s' defined", flt.name)
        return flt, changed

    def undefine(self, name_or_uuid: str) -> Filter:
        flt = self.store.remove(self.store.find(name_or_uuid).name)
        log.info("filter '%s' undefined", flt.name)
        return flt

    # -- bindings -----------------------------------------------------------------------
    def ruleset(self, binding: Binding) -> PortRuleset:
        """The port's ruleset for ``binding`` with the current filter definitions (pure)."""
        return compile_port(resolve(binding.filterref, binding.mac, self.store.lookup))

    def render(self, binding: Binding) -> str:
        """What :meth:`create_binding` would run, as text (nothing is applied)."""
        plan, _ = self.backend.plan([PortChange(binding.portdev, None, self.ruleset(binding))])
        return "".join(f"# {' '.join(step.argv)}\n{step.stdin}" for step in plan.apply + plan.commit)

    def create_binding(self, binding: Binding) -> AppliedBinding:
        """Instantiate a binding on its port; refused if the port already has one."""
        with self.state.locked():
            if self.state.get(binding.portdev) is not None:
                raise BindingError(f"binding '{binding.portdev}' already exists")
            return self._apply_new([binding])[0]

    def delete_binding(self, port: str) -> AppliedBinding:
        with self.state.locked():
            applied = self.binding(port)
            plan, _ = self.backend.plan([PortChange(port, applied.record, None)])
            execute(plan)
            self.state.remove(port)
            log.info("binding on %s deleted", port)
            return applied

    def binding(self, port: str) -> AppliedBinding:
        applied = self.state.get(port)
        if applied is None:
            raise BindingError(f"no nwfilter binding for port dev '{port}'")
        return applied

    def list_bindings(self) -> list[AppliedBinding]:
        return self.state.all()

    def check(self, bindings: list[Binding]) -> None:
        """Resolve and compile every binding without applying anything (hook ``prepare``)."""
        for binding in bindings:
            self.ruleset(binding)

    def bind_owner(self, bindings: list[Binding]) -> list[AppliedBinding]:
        """Instantiate several bindings (a guest's interfaces) all or nothing.

        A port that already has a binding gets the new one in the same transaction (its old
        rules stay until the switch); a binding of another owner there is logged and replaced.
        """
        with self.state.locked():
            old = {}
            for binding in bindings:
                current = self.state.get(binding.portdev)
                if current is not None:
                    if current.binding.owner_uuid != binding.owner_uuid:
                        log.warning("port %s: replacing binding owned by %s", binding.portdev,
                                    current.binding.owner_name)
                    old[binding.portdev] = current
            return self._apply_new(bindings, old)

    def unbind_owner(self, owner_uuid: str) -> list[str]:
        """Remove every binding owned by ``owner_uuid``; returns the ports cleaned."""
        with self.state.locked():
            owned = [a for a in self.state.all() if a.binding.owner_uuid == owner_uuid]
            if owned:
                plan, _ = self.backend.plan([PortChange(a.binding.portdev, a.record, None) for a in owned])
                execute(plan)
            for applied in owned:
                self.state.remove(applied.binding.portdev)
                log.info("binding on %s removed (owner %s)", applied.binding.portdev, applied.binding.owner_name)
            return [a.binding.portdev for a in owned]

    def _other_ids(self, ports) -> list[int]:
        changing = set(ports)
        return [pid for port, pid in self.state.ids().items() if port not in changing]

    def _apply_new(self, bindings: list[Binding], old: dict[str, AppliedBinding] | None = None) -> list[AppliedBinding]:
        """Compile every binding first, then one plan for all of them, then record the state."""
        old = old or {}
        rulesets = {b.portdev: self.ruleset(b) for b in bindings}
        changes = [PortChange(b.portdev, old[b.portdev].record if b.portdev in old else None, rulesets[b.portdev])
                   for b in bindings]
        plan, records = self.backend.plan(changes, self._other_ids(b.portdev for b in bindings))
        execute(plan)
        applied = []
        for b in bindings:
            entry = AppliedBinding(with_mac_parameter(b), self.backend.name, dict(records[b.portdev]),
                                   ruleset_hash(rulesets[b.portdev]))
            self.state.put(entry)
            applied.append(entry)
            log.info("binding on %s: filter '%s' applied", b.portdev, b.filterref.filter)
        return applied


def with_mac_parameter(binding: Binding) -> Binding:
    """The binding as libvirt stores it after instantiation: with a ``MAC`` parameter."""
    params = port_variables(binding.filterref.param_dict(), binding.mac)
    ref = FilterRef(binding.filterref.filter, make_params(params))
    return Binding(binding.owner_name, binding.owner_uuid, binding.portdev, binding.mac, ref, binding.linkdev)


def ruleset_hash(ruleset: PortRuleset) -> str:
    return hashlib.sha256(repr(ruleset).encode()).hexdigest()[:32]

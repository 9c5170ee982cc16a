"""Self-healing: our rules are watched and rebuilt after a change the tool did not make.

nftables: ``nft monitor`` reports every change to the ruleset; a burst of changes that touch
our tables (debounced: one check per burst) triggers a check. Every backend is also checked
every ``interval`` seconds (ebiptables has no monitor). Changes made through the tool trigger
checks too (the monitor does not tell who made a change), so checks are spaced to take at most a
quarter of the time.

A check compares each recorded port's rules in the kernel (the backend's digest of a listing)
with what they were when the service last found them intact: the first time (at start, and
for a port whose record changed since) through a reference built from the records in a
throw-away namespace (``Service``'s check), later against the digest remembered then. A port whose rules are missing or changed is broken; the
records are the truth, so the repair rebuilds every binding from them in one transaction
(``Service.reapply``) and logs the ports that were broken.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .. import executor
from ..config import Config
from ..errors import NwfilterError
from ..service import Service
from ..state import AppliedBinding
from . import knowledge
from .status import Report

log = logging.getLogger(__name__)

QUIET = 0.15  # seconds without a change that end a burst
LONGEST_BURST = 2.0  # a burst that goes on is checked after this long anyway
TABLE_MARK = "libvirt_nwfilter"  # in nft monitor lines about our tables
MAX_PAUSE = 10.0  # seconds: the longest pause between two checks


class Healer:
    def __init__(self, config: Config, report: Report, interval: float):
        self.config = config
        self.report = report
        self.interval = interval
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.expected: dict[str, tuple[str, str]] = {}  # port -> (ruleset hash, kernel digest)
        self._monitor = None
        self._threads: list[threading.Thread] = []

    # -- threads --------------------------------------------------------------------------
    def start(self) -> None:
        watching = "checked every %gs" % self.interval
        if self.config.backend == "nftables":
            self._spawn(self._watch_monitor)
            watching = f"nft monitor, and {watching}"
        self.report.update(healing=watching)
        self._spawn(self._work)

    def _spawn(self, body: Callable[[], None]) -> None:
        thread = threading.Thread(target=body, name=body.__name__, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        self.changed.set()
        if self._monitor is not None:
            self._monitor.terminate()

    def _watch_monitor(self) -> None:
        while not self.stopping.is_set():
            try:
                self._monitor = executor.stream(("nft", "monitor"))
            except NwfilterError as error:
                log.error("cannot watch the ruleset: %s", error)
                self.stopping.wait(10)
                continue
            for line in self._monitor.stdout:
                if TABLE_MARK in line:
                    knowledge.forget(self.config.rundir)
                    self.changed.set()
            self._monitor.wait()
            if not self.stopping.is_set():
                log.warning("nft monitor ended (status %s); restarting it", self._monitor.returncode)
                self.changed.set()
                self.stopping.wait(1)

    def _work(self) -> None:
        self._guarded(self.check_fully)
        while not self.stopping.is_set():
            if self.changed.wait(self.interval):
                self._settle()
            if not self.stopping.is_set():
                began = time.monotonic()
                self._guarded(self.check)
                # A check lists every rule: with many ports it costs CPU that the requests
                # changing them need. At most a quarter of the time goes to checking.
                self.stopping.wait(min(3 * (time.monotonic() - began), MAX_PAUSE))

    def _settle(self) -> None:
        """Wait for the end of a burst of changes."""
        began = time.monotonic()
        while self.changed.is_set() and time.monotonic() - began < LONGEST_BURST:
            self.changed.clear()
            time.sleep(QUIET)
        self.changed.clear()

    def _guarded(self, check: Callable[[Service], None]) -> None:
        try:
            check(Service(self.config))
        except Exception as error:  # noqa: BLE001 - the watcher keeps watching
            log.error("checking the rules failed: %s", error, exc_info=not isinstance(error, NwfilterError))

    # -- checks ---------------------------------------------------------------------------
    def check_fully(self, service: Service) -> None:
        """Against a reference kernel built from the records (at start)."""
        recorded = self._mine(service)
        live, intact = service.kernel_check(recorded)
        self.expected = {a.binding.portdev: (a.ruleset_hash, live[a.binding.portdev])
                         for a in recorded if a.binding.portdev in intact}
        broken = sorted(a.binding.portdev for a in recorded if a.binding.portdev not in intact)
        self._conclude(service, recorded, broken)

    def check(self, service: Service) -> None:
        """Against the digests remembered from earlier checks; a broken port is checked once
        more under the host lock (a change of ours may have been half way) before a repair."""
        broken = self._broken(service, self._mine(service))
        if broken:
            with service.state.locked(service.config.lock_timeout):
                recorded = self._mine(service)
                broken = self._broken(service, recorded)
        else:
            recorded = self._mine(service)
        self._conclude(service, recorded, broken)

    def _mine(self, service: Service) -> list[AppliedBinding]:
        return [a for a in service.state.all() if a.backend == service.backend.name]

    def _broken(self, service: Service, recorded: list[AppliedBinding]) -> list[str]:
        steps = service.backend.survey_steps()
        live = service.backend.kernel_digests(executor.survey(steps), {a.binding.portdev: a.record for a in recorded})
        broken, unknown = [], []
        for applied in recorded:
            port, digest = applied.binding.portdev, live.get(applied.binding.portdev)
            known = self.expected.get(port)
            if digest is None or (known is not None and known[0] == applied.ruleset_hash and known[1] != digest):
                log.debug("port %s: rules %s", port, "missing" if digest is None else "changed")
                broken.append(port)
            elif known is None or known[0] != applied.ruleset_hash:
                unknown.append(applied)  # changed through the tool (or behind its back since)
        if unknown:  # checked against a reference kernel, once per change
            _, intact = service.kernel_check(unknown)
            for applied in unknown:
                port = applied.binding.portdev
                if port in intact:
                    self.expected[port] = (applied.ruleset_hash, live[port])
                else:
                    log.debug("port %s: rules differ from the reference", port)
                    broken.append(port)
        for port in set(self.expected) - {a.binding.portdev for a in recorded}:
            del self.expected[port]
        return sorted(broken)

    def _conclude(self, service: Service, recorded: list[AppliedBinding], broken: list[str]) -> None:
        if broken:
            self._repair(service, broken)
            return
        knowledge.record(self.config.rundir, service.backend.name,
                         {a.binding.portdev: a.ruleset_hash for a in recorded})

    def _repair(self, service: Service, broken: list[str]) -> None:
        knowledge.forget(self.config.rundir)
        began = time.monotonic()
        log.warning("rules of %d port(s) changed behind our back (%s): rebuilding every binding",
                    len(broken), _listing(broken))
        applied = service.reapply()
        took = time.monotonic() - began
        log.warning("repaired: %d binding(s) rebuilt in one transaction in %.2f s (ports that were broken: %s)",
                    len(applied), took, _listing(broken))
        self.report.count("repairs", last_repair={"time": time.time(), "what": f"{len(broken)} port(s) restored "
                                                  f"({_listing(broken)}) in {took:.2f} s"})
        self.expected = {}
        self.check(service)  # remembers the rebuilt rules' digests and says so


def _listing(ports: list[str], most: int = 10) -> str:
    shown = ", ".join(ports[:most])
    return shown + (f" and {len(ports) - most} more" if len(ports) > most else "")

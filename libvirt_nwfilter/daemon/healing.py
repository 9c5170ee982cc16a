"""Self-healing: our rules are watched and rebuilt after a change the tool did not make.

The records are the truth: a repair rebuilds every binding from them in one transaction
(``Service.reapply``) and logs the ports that were broken. Between repairs the healer keeps
what it knows in ``kernel-intact.json`` (:mod:`.knowledge`): the ports whose rules are what
their records say, which lets a hook ``reconnect`` skip its reference namespace.

* nftables (:mod:`.nft_watch`): every committed transaction is announced by the kernel, with
  the name of the process that made it; a change of ours only updates what is known, anyone
  else's change to our tables is repaired at once (a burst of changes is one repair).
* ebiptables (:class:`PeriodicHealer`): no notifications; every ``interval`` seconds each
  recorded port's rules in the kernel (a digest of the listing) are compared with what they
  were when the healer last found them intact (the first time, and after a change through the
  tool, against a reference built from the records in a throw-away namespace).

A full check against the reference kernel runs at start (and, with nftables, when
notifications were lost). Repairs that follow each other closely back off (a repair that
cannot hold is logged, not repeated in a loop).
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

MAX_PAUSE = 10.0  # seconds: the longest pause between two periodic checks
REPAIR_WINDOW = 60.0  # seconds: more than REPAIRS_IN_WINDOW repairs in it back off
REPAIRS_IN_WINDOW = 3
LONGEST_BACK_OFF = 600.0


def make_healer(config: Config, report: Report, interval: float) -> "Healer":
    if config.backend == "nftables":
        from .nft_watch import NftablesHealer

        return NftablesHealer(config, report, interval)
    return PeriodicHealer(config, report, interval)


class Healer:
    """Threads, repairs and knowledge, shared by both ways of watching."""

    def __init__(self, config: Config, report: Report, interval: float):
        self.config = config
        self.report = report
        self.interval = interval
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._repairs: list[float] = []

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stopping.set()

    def _spawn(self, body: Callable[[], None]) -> None:
        thread = threading.Thread(target=body, name=body.__name__, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _guarded(self, work: Callable[[Service], None]) -> None:
        try:
            work(Service(self.config))
        except Exception as error:  # noqa: BLE001 - the watcher keeps watching
            log.error("checking the rules failed: %s", error, exc_info=not isinstance(error, NwfilterError))

    def _mine(self, service: Service) -> list[AppliedBinding]:
        return [a for a in service.state.all() if a.backend == service.backend.name]

    def _repair(self, service: Service, broken: list[str]) -> None:
        """Rebuild every binding from its record, logged with the ports that were broken."""
        self._back_off()
        knowledge.forget(self.config.rundir)
        began = time.monotonic()
        log.warning("rules of %d port(s) changed behind our back (%s): rebuilding every binding",
                    len(broken), listing(broken))
        applied = service.reapply()
        took = time.monotonic() - began
        log.warning("repaired: %d binding(s) rebuilt in one transaction in %.2f s (ports that were broken: %s)",
                    len(applied), took, listing(broken))
        self.report.count("repairs", last_repair={"time": time.time(), "what": f"{len(broken)} port(s) restored "
                                                  f"({listing(broken)}) in {took:.2f} s"})

    def _back_off(self) -> None:
        """Wait before a repair when the last ones came in quick succession."""
        now = time.monotonic()
        self._repairs = [t for t in self._repairs if now - t < REPAIR_WINDOW] + [now]
        excess = len(self._repairs) - REPAIRS_IN_WINDOW
        if excess > 0:
            pause = min(REPAIR_WINDOW * 2 ** (excess - 1), LONGEST_BACK_OFF)
            log.error("%d repairs within %g s: our rules do not hold (something keeps changing them); "
                      "waiting %g s before the next repair", len(self._repairs), REPAIR_WINDOW, pause)
            self.stopping.wait(pause)


class PeriodicHealer(Healer):
    """ebiptables: a check every ``interval`` seconds (at most a quarter of the time)."""

    def __init__(self, config: Config, report: Report, interval: float):
        super().__init__(config, report, interval)
        self.expected: dict[str, tuple[str, str]] = {}  # port -> (ruleset hash, kernel digest)

    def start(self) -> None:
        self.report.update(healing=f"checked every {self.interval:g}s")
        self._spawn(self._work)

    def _work(self) -> None:
        self._guarded(self.check_fully)
        while not self.stopping.wait(self.interval):
            began = time.monotonic()
            self._guarded(self.check)
            # A check lists every rule: with many ports it costs CPU that the requests
            # changing them need. At most a quarter of the time goes to checking.
            self.stopping.wait(min(3 * (time.monotonic() - began), MAX_PAUSE))

    def check_fully(self, service: Service) -> None:
        """Against a reference kernel built from the records (at start); when a port looks
        broken, once more under the host lock (a change of ours may have been half way)."""
        recorded = self._mine(service)
        live, intact = service.kernel_check(recorded)
        if len(intact) < len(recorded):
            with service.state.locked(service.config.lock_timeout):
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
            self.expected = {}
            self.check(service)  # remembers the rebuilt rules' digests and says so
            return
        knowledge.record(self.config.rundir, service.backend.name,
                         {a.binding.portdev: a.ruleset_hash for a in recorded})


def listing(ports: list[str], most: int = 10) -> str:
    shown = ", ".join(ports[:most])
    return shown + (f" and {len(ports) - most} more" if len(ports) > most else "")

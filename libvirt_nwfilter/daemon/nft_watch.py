"""Self-healing with nftables: the kernel's notification of every committed transaction.

A reader thread receives the notifications (:func:`~libvirt_nwfilter.executor.nft_notifications`)
and groups them into transactions (:mod:`~libvirt_nwfilter.backends.nftables.notices`); a worker
thread takes them in bursts (a burst ends after ``QUIET`` seconds without one):

* a transaction that does not touch our tables only advances the generation;
* one of ours (committed by :data:`~libvirt_nwfilter.executor.MARKED_NFT`) makes the ports it
  touched unknown until their records are read again, once no change is in progress (no
  journal): their rules are then what the records say;
* anyone else's is a repair, at once: every binding is rebuilt from its record.

What is known is written to ``kernel-intact.json`` with the generation it is valid for, so a
hook ``reconnect`` trusts it only when the kernel has seen no transaction since. Notifications
lost (the kernel says so) or a reader that had to start again mean a full check against a
reference kernel, as at start.
"""

from __future__ import annotations

import errno
import logging
import queue
import time
from dataclasses import dataclass, field

from .. import executor
from ..backends.nftables.notices import Transaction, Transactions
from ..errors import NwfilterError
from ..service import Service
from ..state import RecordError
from . import knowledge
from .healing import Healer, listing

log = logging.getLogger(__name__)

QUIET = 0.1  # seconds without a transaction that end a burst
LONGEST_BURST = 2.0  # a burst that goes on is handled after this long anyway
RETRY = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # seconds between looks at a change of ours in progress
RECEIVE = 1 << 20


@dataclass
class _Burst:
    """What a burst of transactions asks for."""

    full_check: bool = False
    foreign: set[str] = field(default_factory=set)  # ports someone else touched
    foreign_shared: bool = False  # someone else touched our tables, base chains or maps


class NftablesHealer(Healer):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.transactions: queue.Queue = queue.Queue()
        self.generation: int | None = None  # the last transaction accounted for
        self.intact: dict[str, str] = {}  # port -> ruleset hash of the record its rules match
        self.pending: set[str] = set()  # ports changed by us, whose records are to be read again
        self._socket = None

    def start(self) -> None:
        self.report.update(healing="nf_tables notifications (every change, at once)")
        self._spawn(self._receive)
        self._spawn(self._work)

    def stop(self) -> None:
        super().stop()
        self.transactions.put(None)

    # -- the reader -------------------------------------------------------------------------
    def _receive(self) -> None:
        while not self.stopping.is_set():
            try:
                sock = executor.nft_notifications()
            except OSError as error:
                log.error("cannot receive nf_tables notifications: %s", error)
                self.stopping.wait(10)
                continue
            self.transactions.put("start")  # what happened before is unknown: check fully
            with sock:
                sock.settimeout(1.0)
                self._read(sock)

    def _read(self, sock) -> None:
        grouping = Transactions()
        while not self.stopping.is_set():
            try:
                data = sock.recv(RECEIVE)
            except TimeoutError:
                continue
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    log.error("receiving nf_tables notifications failed: %s; starting again", error)
                    return
                log.warning("nf_tables notifications were lost (the kernel's queue was full): checking every port")
                grouping = Transactions()
                self.transactions.put("lost")
                continue
            for transaction in grouping.feed(data):
                self.transactions.put(transaction)

    # -- the worker -------------------------------------------------------------------------
    def _work(self) -> None:
        retries = 0
        while not self.stopping.is_set():
            burst = self._collect(RETRY[min(retries, len(RETRY) - 1)] if self.pending else None)
            if burst is None:
                return
            retries = retries + 1 if self.pending else 0
            try:
                self._handle(burst)
            except Exception as error:  # noqa: BLE001 - the watcher keeps watching
                log.error("checking the rules failed: %s", error, exc_info=not isinstance(error, NwfilterError))
                self.intact, self.pending = {}, set()
                knowledge.forget(self.config.rundir)

    def _collect(self, timeout: float | None) -> _Burst | None:
        """The next burst (None: stopping); an empty one after ``timeout`` seconds of nothing."""
        burst = _Burst()
        try:
            item = self.transactions.get(timeout=timeout)
        except queue.Empty:
            return burst
        began = time.monotonic()
        while True:
            if item is None:
                return None
            self._account(item, burst)
            if time.monotonic() - began > LONGEST_BURST:
                return burst
            try:
                item = self.transactions.get(timeout=QUIET)
            except queue.Empty:
                return burst

    def _account(self, item: Transaction | str, burst: _Burst) -> None:
        if isinstance(item, str):  # "start" or "lost"
            burst.full_check = True
            return
        self.generation = max(self.generation or 0, item.generation)
        if not item.ours:
            return
        for port in item.ports:
            self.intact.pop(port, None)
        if item.process == executor.MARKED_NFT:
            self.pending |= item.ports
            return
        log.debug("generation %d by %s (pid %d) touched our rules: ports %s%s", item.generation, item.process,
                  item.pid, listing(sorted(item.ports)), ", shared objects" if item.shared else "")
        burst.foreign |= item.ports
        burst.foreign_shared |= item.shared

    def _handle(self, burst: _Burst) -> None:
        service = Service(self.config)
        if burst.full_check:
            self._check_fully(service)
        elif burst.foreign or burst.foreign_shared:
            mine = sorted(a.binding.portdev for a in self._mine(service))
            broken = sorted(burst.foreign) if not burst.foreign_shared else sorted(set(mine) | burst.foreign)
            self.intact = {}
            self._publish(service)  # before the repair: a reconnect waiting for it trusts nothing
            self._repair(service, broken or mine)
        self._settle(service)

    def _check_fully(self, service: Service) -> None:
        """Against a reference kernel built from the records; a broken port is repaired. A check
        that a change of ours overlapped (its journal on disk, or the generation moved while
        checking: records and kernel may be of different moments) is made again, up to
        ``len(RETRY)`` times, after a pause."""
        for pause in (*RETRY, None):
            generation = executor.nft_generation()  # read before the listing: later changes come as notifications
            busy = service.journal.exists()
            recorded = self._mine(service)
            _, intact = service.kernel_check(recorded)
            overlapped = executor.nft_generation() != generation or busy or service.journal.exists()
            if pause is None or not overlapped:
                break
            log.debug("the ruleset changed while it was checked: checking again")
            self.stopping.wait(pause)
        self.generation = max(self.generation or 0, generation or 0)
        self.intact = {a.binding.portdev: a.ruleset_hash for a in recorded if a.binding.portdev in intact}
        self.pending = set()
        broken = sorted(a.binding.portdev for a in recorded if a.binding.portdev not in intact)
        if broken:
            self._publish(service)
            self._repair(service, broken)

    def _settle(self, service: Service) -> None:
        """Read the records of the ports our changes touched, once no change is in progress."""
        if self.pending and not service.journal.exists():
            for port in sorted(self.pending):
                try:
                    applied = service.state.get(port)
                except RecordError:
                    applied = None
                if applied is not None and applied.backend == service.backend.name:
                    self.intact[port] = applied.ruleset_hash
            if service.journal.exists():  # a change began meanwhile: its records may be half written
                for port in self.pending:
                    self.intact.pop(port, None)
                return
            self.pending = set()
        self._publish(service)

    def _publish(self, service: Service) -> None:
        if self.generation is not None:
            knowledge.record(self.config.rundir, service.backend.name, self.intact, self.generation)

"""IP address learning in the resident service (semantics.md §10; the rules in :mod:`..learning`).

The learner runs in the watcher process: one thread watches every learning port, another
applies what it learns. Ports are found in the records (the state's index names each binding
that learns, with its mode), read at start, whenever a process that changed records says so
(:mod:`.wakeup`) and every :data:`RESCAN` seconds.

* Watching: one ``AF_PACKET`` socket per port, bound to it, with a kernel filter
  (:mod:`..learning.bpf`) that passes only frames that can teach something; each is
  rate-limited per direction (10 a second, bursts of 50, as libvirt), parsed and judged
  (:mod:`..learning.snoop`). ``any`` ports are watched until their first address, ``dhcp``
  ports for as long as they exist (their leases expire here too).
* Applying: :meth:`Service.update_learned` under the host lock, like every change (journal,
  one transaction, records); the record is the truth again once it is written. A port whose
  binding changed or went meanwhile is dropped, whatever was learned.

Nothing is learned while the service is stopped: the ports keep what their records say (the
learning-time rules, or the addresses learned), and leases that expired meanwhile are removed
when it starts again.
"""

from __future__ import annotations

import ctypes
import logging
import selectors
import socket
import struct
import threading
import time
from dataclasses import replace
from typing import Callable

from ..config import Config
from ..errors import NwfilterError
from ..learning import bpf, snoop, snoop6
from ..learning.record import format_time
from ..learning.spec import SERVER_VARIABLE_V6, servers
from ..model import Binding, Lease
from ..state import RecordError, State
from . import wakeup
from .status import Report

log = logging.getLogger(__name__)

RESCAN = 30.0  # seconds between scans of the records
CHORES = 0.5  # seconds between checks of the leases' expiry
RETRY = 5.0  # seconds before a change that failed is tried again
BURST_READS = 64  # frames read from one socket before the others get their turn
SO_ATTACH_FILTER = 26
ETH_P_ALL = 3
PACKET_OUTGOING = 4
WARN_EVERY = 10.0  # seconds between two warnings about a flood on one port


class Watch:
    """One learning port: its socket, the binding it learns for, and what it learned (IPv4 in
    ``leases``, IPv6 in ``addresses6``)."""

    def __init__(self, binding: Binding, sock: socket.socket, ipv6_limit: int):
        self.binding = binding
        self.port = binding.portdev
        self.mode = binding.learning.mode
        self.mac = bytes.fromhex(binding.mac.replace(":", ""))
        self.servers, self.servers6 = servers(binding), servers(binding, SERVER_VARIABLE_V6)
        self.learns4, self.learns6 = learns(binding)
        self.sock = sock
        self.ipv6_limit = ipv6_limit
        self.take(binding)
        self.buckets = {True: snoop.TokenBucket(), False: snoop.TokenBucket()}
        self.warned = 0.0

    def take(self, binding: Binding) -> None:
        """What ``binding``'s record says was learned."""
        self.binding = binding
        self.leases = snoop.Leases(lease for lease in binding.learning.leases if ":" not in lease.address)
        self.addresses6 = snoop6.Addresses6((lease for lease in binding.learning.leases if ":" in lease.address),
                                            self.ipv6_limit)
        self.done = self.mode == "any" and bool(self.leases.expiry)  # any: the IPv4 address was learned

    @property
    def finished(self) -> bool:
        """Nothing more to learn: ``any`` has its IPv4 address and IPv6 is not learned."""
        return self.done and not self.learns6

    def all_leases(self) -> tuple[Lease, ...]:
        return self.leases.leases() + self.addresses6.leases()

    def next_expiry(self) -> int | None:
        return min((e for e in (self.leases.next_expiry(), self.addresses6.next_expiry()) if e is not None),
                   default=None)

    def close(self) -> None:
        self.sock.close()


def learns(binding: Binding) -> tuple[bool, bool]:
    """Whether ``binding`` learns IPv4 (``IP``) and IPv6 (``IPV6``) addresses."""
    return "IP" in binding.learning.variables, "IPV6" in binding.learning.variables


def open_socket(port: str, mode: str, mac: bytes, ipv6: bool = False) -> socket.socket:
    """A raw socket on ``port`` that receives only what the kernel filter passes: created for
    no protocol, filtered, then bound (so that no unfiltered frame is ever queued)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 0)
    try:
        code = bpf.program(mode, mac, ipv6)
        buffer = ctypes.create_string_buffer(code, len(code))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                        struct.pack("HL", len(code) // 8, ctypes.addressof(buffer)))
        sock.bind((port, ETH_P_ALL))
    except BaseException:
        sock.close()
        raise
    return sock


class Learner:
    def __init__(self, config: Config, report: Report, clock: Callable[[], float] = time.time):
        self.config = config
        self.report = report
        self.clock = clock
        self.state = State(config.rundir)
        self.watches: dict[str, Watch] = {}
        self.missing: dict[str, Binding] = {}  # learning ports that cannot be watched (said once)
        self.stopping = threading.Event()
        self.selector = selectors.DefaultSelector()
        self.wake = None
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Binding, tuple[Lease, ...]]] = {}
        self._busy: set[str] = set()  # pending or being applied: the record may be behind
        self._work = threading.Condition(self._lock)
        self._earliest: int | None = None  # the earliest expiry of a lease (as of the last chores)
        self._buffer = bytearray(65536)

    # -- threads --------------------------------------------------------------------------
    def start(self) -> None:
        self.wake = wakeup.listen(self.config.rundir)
        self.selector.register(self.wake, selectors.EVENT_READ)
        threading.Thread(target=self._watch, name="learning", daemon=True).start()
        threading.Thread(target=self._apply, name="learning-apply", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        with self._work:
            self._work.notify_all()
        if self.wake is not None:
            wakeup.notify(self.config.rundir, ["*"])

    def _watch(self) -> None:
        next_scan = next_chores = 0.0
        while not self.stopping.is_set():
            try:
                now = time.monotonic()
                if now >= next_scan:
                    self.scan(None)
                    next_scan = now + RESCAN
                if now >= next_chores:  # at most every CHORES seconds, however busy the sockets are
                    self._expire()
                    next_chores = now + CHORES
                for key, _ in self.selector.select(self._timeout(next_scan)):
                    if key.fileobj is self.wake:
                        self.scan(wakeup.receive(self.wake))
                    else:
                        self.read(key.data)
            except Exception:  # noqa: BLE001 - the learner keeps learning
                log.exception("IP learning: internal error")
                self.stopping.wait(1)
        for watch in list(self.watches.values()):
            self._drop(watch)

    def _timeout(self, next_scan: float) -> float:
        """Until the next scan or the next lease expiry, whichever comes first."""
        timeout = next_scan - time.monotonic()
        if self._earliest is not None:
            timeout = min(timeout, self._earliest - self.clock())
        return max(timeout, CHORES)

    # -- ports ----------------------------------------------------------------------------
    def scan(self, ports: set[str] | None) -> None:
        """Follow the records: every learning port (``ports`` None), or those named."""
        try:
            learning = self.state.learning_ports()
        except NwfilterError as error:
            log.error("IP learning: cannot read the state's index: %s", error)
            return
        names = set(learning) | set(self.watches) | set(self.missing)
        for port in sorted(names if ports is None else names & ports | set(learning) - set(self.watches)):
            self._follow(port, learning.get(port))

    def _follow(self, port: str, mode: str | None) -> None:
        binding = None
        if mode is not None:
            try:
                applied = self.state.get(port)
            except RecordError as error:
                log.warning("IP learning: %s", error)
                applied = None
            binding = applied.binding if applied is not None else None
        watch = self.watches.get(port)
        if binding is None or binding.learning is None:
            if watch is not None or port in self.missing:  # watched, or waiting for its port to be back
                log.info("port %s: IP learning stopped (its binding went)", port)
            if watch is not None:
                self._drop(watch)
            self.missing.pop(port, None)
            return
        if watch is not None and watch.binding == binding:
            return
        if watch is not None and snoop_same(watch.binding, binding):
            if port not in self._busy:
                self._take_record(watch, binding)
            return
        if watch is not None:
            self._drop(watch)
        self._start(binding)

    def _take_record(self, watch: Watch, binding: Binding) -> None:
        """The record is the truth: what it says was learned replaces ours."""
        watch.take(binding)
        self._note_expiry(watch)
        if watch.finished:
            self._drop(watch)

    def _start(self, binding: Binding) -> None:
        port = binding.portdev
        learns4, learns6 = learns(binding)
        if binding.learning.mode == "any" and not learns6 and binding.learning.leases:
            self.missing.pop(port, None)
            return  # learned already
        mac = bytes.fromhex(binding.mac.replace(":", ""))
        try:
            sock = open_socket(port, binding.learning.mode, mac, learns6)
        except OSError as error:
            if self.missing.get(port) != binding:
                log.warning("port %s learns its IP address (%s) but cannot be watched: %s; tried again every "
                            "%g s", port, binding.learning.mode, error.strerror or error, RESCAN)
            self.missing[port] = binding
            return
        self.missing.pop(port, None)
        watch = Watch(binding, sock, self.config.ipv6_learning_limit)
        self.watches[port] = watch
        self._note_expiry(watch)
        self.selector.register(sock, selectors.EVENT_READ, watch)
        log.info("port %s: learning its IP address (%s%s)", port, watch.mode,
                 f", DHCP servers {', '.join(watch.servers)}" if watch.servers else "")
        self._report()

    def _drop(self, watch: Watch) -> None:
        if self.watches.get(watch.port) is watch:
            del self.watches[watch.port]
            self.selector.unregister(watch.sock)
            watch.close()
            self._report()

    def _report(self) -> None:
        counts = {"any": 0, "dhcp": 0}
        for watch in self.watches.values():
            counts[watch.mode] += 1
        self.report.update(learning=f"watching {len(self.watches)} port(s) ({counts['any']} any, "
                                    f"{counts['dhcp']} dhcp)")

    # -- frames ---------------------------------------------------------------------------
    def read(self, watch: Watch) -> None:
        view = memoryview(self._buffer)
        for _ in range(BURST_READS):
            try:
                size, address = watch.sock.recvfrom_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # the port went away (ENETDOWN) or changed
                log.info("port %s: its socket failed (%s); watched again once the port is back", watch.port,
                         error.strerror or error)
                self._drop(watch)
                self.missing[watch.port] = watch.binding
                return
            to_guest = address[2] == PACKET_OUTGOING
            if not watch.buckets[to_guest].take():
                self._flooded(watch, to_guest)
                continue
            frame = bytes(view[:size])
            if watch.learns4 and not watch.done:
                self.learn(watch, snoop.inspect(frame, to_guest, watch.mac))
            if watch.learns6:
                facts = snoop6.inspect6(frame, to_guest, watch.mac)
                if facts:
                    self._changed(watch, watch.addresses6.apply(facts, watch.servers6, int(self.clock())), 6)

    def _flooded(self, watch: Watch, to_guest: bool) -> None:
        now = time.monotonic()
        if now - watch.warned >= WARN_EVERY:
            watch.warned = now
            bucket = watch.buckets[to_guest]
            log.warning("port %s: more than %g frames a second %s the guest could teach an address: %d ignored",
                        watch.port, bucket.rate, "to" if to_guest else "from", bucket.refused)
            bucket.refused = 0

    def learn(self, watch: Watch, facts: tuple[snoop.Fact, ...]) -> None:
        if not facts:
            return
        if watch.mode == "any":
            fact = snoop.first_address(facts, watch.servers)
            if fact is not None:
                watch.done = True
                watch.leases = snoop.Leases([Lease(fact.address)])
                log.info("port %s: learned %s (%s)", watch.port, fact.address, fact.kind)
                self._queue(watch, watch.all_leases())
            return
        events = watch.leases.apply(facts, watch.servers, int(self.clock()))
        self._changed(watch, events)

    def _expire(self) -> None:
        now = int(self.clock())
        for watch in list(self.watches.values()):
            self._changed(watch, watch.leases.expire(now))
            self._changed(watch, watch.addresses6.expire(now), 6)
        self._earliest = min((e for w in self.watches.values() if (e := w.next_expiry()) is not None), default=None)

    def _changed(self, watch: Watch, events: list[snoop.Event], family: int = 4) -> None:
        held = watch.leases if family == 4 else watch.addresses6
        for event in events:
            until = f" until {format_time(event.expires)}" if event.expires is not None else ""
            if event.what == "refused":
                log.warning("port %s: %s not taken: the port holds %d IPv%d addresses already", watch.port,
                            event.address, len(held.expiry), family)
            elif event.what in ("learned", "renewed"):
                log.info("port %s: %s %s (%s%s)", watch.port, event.what, event.address,
                         "DHCP lease" if family == 4 else "IPv6", until or " without end")
            else:
                log.info("port %s: dropped %s (%s)", watch.port, event.address,
                         {"expired": "its lease expired", "released": "released by the guest",
                          "declined": "declined by the guest",
                          "replaced": f"the port holds {watch.ipv6_limit} IPv6 addresses: the oldest goes"}[event.what])
        if any(event.what != "refused" for event in events):
            self._note_expiry(watch)
            self._queue(watch, watch.all_leases())

    def _note_expiry(self, watch: Watch) -> None:
        expiry = watch.next_expiry()
        if expiry is not None and (self._earliest is None or expiry < self._earliest):
            self._earliest = expiry

    # -- applying -------------------------------------------------------------------------
    def _queue(self, watch: Watch, leases: tuple[Lease, ...]) -> None:
        with self._work:
            self._pending[watch.port] = (watch.binding, leases)
            self._busy.add(watch.port)
            self._work.notify()

    def _apply(self) -> None:
        while not self.stopping.is_set():
            with self._work:
                while not self._pending and not self.stopping.is_set():
                    self._work.wait()
                if self.stopping.is_set():
                    return
                port, (binding, leases) = next(iter(self._pending.items()))
                del self._pending[port]
            try:
                self._apply_one(port, binding, leases)
            except Exception as error:  # noqa: BLE001 - tried again
                log.error("port %s: the learned addresses could not be applied (tried again in %g s): %s", port,
                          RETRY, error, exc_info=not isinstance(error, NwfilterError))
                with self._work:
                    self._pending.setdefault(port, (binding, leases))
                self.stopping.wait(RETRY)
                continue
            with self._work:
                if port not in self._pending:
                    self._busy.discard(port)
            wakeup.notify(self.config.rundir, [port])

    def _apply_one(self, port: str, binding: Binding, leases: tuple[Lease, ...]) -> None:
        from ..service import Service

        if Service(self.config).update_learned(port, binding, leases) is None:
            log.info("port %s: its binding changed meanwhile: what was learned is not applied", port)
            return
        shown = ", ".join(lease.address for lease in leases) or "none (learning-time rules)"
        log.info("port %s: filter '%s' applied with the learned address(es) %s", port, binding.filterref.filter,
                 shown)
        try:
            self.report.count("learned", last_learned={"time": time.time(), "what": f"port {port}: {shown}"})
        except NwfilterError as error:  # a report, not state
            log.warning("%s", error)


def snoop_same(watched: Binding, recorded: Binding) -> bool:
    """The same learning binding, whatever was learned."""
    from ..learning.spec import same_learning

    return same_learning(recorded, watched)

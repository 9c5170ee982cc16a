#!/usr/bin/env python3
"""Batched traffic checks across network namespaces, in one process (run by tests/traffic.py).

    python3 tests/nsprobe.py frames < SPEC.json
    python3 tests/nsprobe.py conns < SPEC.json

The process stays in the namespace it was started in and opens every socket inside the
namespace it belongs to (``setns(2)`` around ``socket(2)``: a socket keeps the namespace it was
made in), so one ``select`` loop watches every receiver of a batch and every check of a batch
shares one wait. Standard library only; prints one JSON object on stdout.

frames
    ``{"receivers": [[NETNS, IFACE, OUTGOING], ...],
    "frames": [{"send": [NETNS, IFACE], "wire": HEX, "match": HEX, "receiver": I,
    "await": BOOL}, ...], "settle": S, "timeout": S}``

    Binds one packet socket per receiver, which sees the frames IFACE receives, or with
    OUTGOING the ones it sends (e.g. on a bridge port: what the bridge sends out through it), pins
    itself to one CPU and sends the frames in the given order (frames sent from one CPU are
    processed by the kernel in that order), then captures until every awaited frame was seen
    and no watched frame arrived for ``settle`` seconds, or ``timeout`` seconds in all. A frame
    counts as seen when its receiver got a frame starting with its ``match`` bytes. Prints
    ``{"seen": [BOOL per frame], "seconds": S}``.

conns
    ``{"servers": [[NETNS, KIND, ADDR, PORT], ...], "clients": [{"netns": NS, "kind": KIND,
    "addr": A, "port": P, "source": ADDR|null, "await": BOOL}, ...], "wait": S,
    "timeout": S}``

    KIND is ``tcp`` (the server greets every connection with ``nwft-ok``), ``udp`` (the
    server echoes a random token) or ``ping`` (ICMP/ICMPv6 echo; no server). Servers are
    set up first, then every client starts at once. The batch ends when every client has
    finished, or when every awaited client has and no client finished for ``wait`` seconds,
    or after ``timeout`` seconds; a client still waiting then counts as ``timeout``. Prints ``{"results": [{"ok": BOOL,
    "outcome": "ok"|"refused"|"unreachable"|"timeout"|"error", "error": TEXT|null,
    "seconds": S}, ...]}``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import socket
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
GREETING = b"nwft-ok\n"
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


# ------------------------------------------------------------------------------------------
# Namespaces


class Namespaces:
    """Opens sockets inside named network namespaces and comes back to its own afterwards."""

    def __init__(self):
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY)

    def _enter(self, fd: int) -> None:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")

    def socket(self, netns: str | None, *args) -> socket.socket:
        """``socket.socket(*args)`` made inside ``netns`` (None: this process's own)."""
        if netns is None:
            return socket.socket(*args)
        fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
        try:
            self._enter(fd)
            try:
                return socket.socket(*args)
            finally:
                self._enter(self.home)
        finally:
            os.close(fd)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def pin_to_one_cpu() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


# ------------------------------------------------------------------------------------------
# frames


def cmd_frames(spec: dict, ns: Namespaces) -> dict:
    receivers = []
    for netns, iface, outgoing in spec["receivers"]:
        sock = ns.socket(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((iface, ETH_P_ALL))
        sock.setblocking(False)
        receivers.append((sock, iface, outgoing))
    senders: dict[tuple[str, str], socket.socket] = {}
    for frame in spec["frames"]:
        key = tuple(frame["send"])
        if key not in senders:
            senders[key] = ns.socket(key[0], socket.AF_PACKET, socket.SOCK_RAW)
            senders[key].bind((key[1], 0))
    for sock, _, _ in receivers:  # frames queued between socket() and bind()
        while _recv(sock) is not None:
            pass
    frames = spec["frames"]
    matches = [bytes.fromhex(f["match"]) for f in frames]
    seen = [False] * len(frames)
    waiting = {i for i, f in enumerate(frames) if f["await"]}
    by_receiver: dict[int, list[int]] = {}
    for i, frame in enumerate(frames):
        by_receiver.setdefault(frame["receiver"], []).append(i)

    pin_to_one_cpu()
    started = time.monotonic()
    for frame in frames:
        senders[tuple(frame["send"])].send(bytes.fromhex(frame["wire"]))
    last = time.monotonic()
    deadline = started + spec["timeout"]
    while True:
        now = time.monotonic()
        if now >= deadline or (not waiting and now - last >= spec["settle"]):
            break
        limit = deadline if waiting else min(deadline, last + spec["settle"])
        readable, _, _ = select.select([r[0] for r in receivers], [], [], max(0.0, limit - now))
        for index, (sock, iface, outgoing) in enumerate(receivers):
            if sock not in readable:
                continue
            while (got := _recv(sock)) is not None:
                data, addr = got
                if addr[0] != iface or (addr[2] == PACKET_OUTGOING) != outgoing:
                    continue
                for i in by_receiver.get(index, ()):
                    if not seen[i] and data.startswith(matches[i]):
                        seen[i] = True
                        waiting.discard(i)
                        last = time.monotonic()
    return {"seen": seen, "seconds": round(time.monotonic() - started, 3)}


def _recv(sock: socket.socket):
    try:
        return sock.recvfrom(65535)
    except BlockingIOError:
        return None


# ------------------------------------------------------------------------------------------
# conns


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def internet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071), as libvirt_nwfilter.simulate.frames computes it: kept
    here because this script imports nothing beyond the standard library (it starts for every
    batch)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _outcome(err: int) -> str:
    if err == errno.ECONNREFUSED:
        return "refused"
    if err in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM):
        return "unreachable"
    return "error"


class Server:
    """A TCP listener that greets and closes, or a UDP socket that echoes."""

    def __init__(self, ns: Namespaces, netns: str, kind: str, addr: str, port: int):
        self.kind = kind
        sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
        self.sock = ns.socket(netns, _family(addr), sock_type)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, port))
        if kind == "tcp":
            self.sock.listen(64)
        self.sock.setblocking(False)

    def handle(self) -> None:
        try:
            if self.kind == "tcp":
                conn, _ = self.sock.accept()
                with conn:
                    conn.setblocking(True)
                    conn.settimeout(1.0)
                    conn.sendall(GREETING)
            else:
                data, peer = self.sock.recvfrom(65535)
                self.sock.sendto(data, peer)
        except OSError:
            pass


class Client:
    """One connection attempt; ``done`` once it has an outcome."""

    def __init__(self, ns: Namespaces, spec: dict):
        self.kind, self.addr, self.port = spec["kind"], spec["addr"], spec.get("port") or 0
        self.awaited = spec["await"]
        self.result: dict | None = None
        self.started = time.monotonic()
        self.token = os.urandom(8).hex().encode()
        self.buffer = b""
        family = _family(self.addr)
        if self.kind == "ping":
            proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
            self.sock = ns.socket(spec["netns"], family, socket.SOCK_RAW, proto)
        else:
            sock_type = socket.SOCK_STREAM if self.kind == "tcp" else socket.SOCK_DGRAM
            self.sock = ns.socket(spec["netns"], family, sock_type)
        if spec.get("source"):
            self.sock.bind((spec["source"], 0))
        self.sock.setblocking(False)
        self.connecting = False
        try:
            self._start(family)
        except OSError as exc:
            self.finish(False, _outcome(exc.errno), f"{type(exc).__name__}: {exc}")

    def _start(self, family: int) -> None:
        if self.kind == "tcp":
            err = self.sock.connect_ex((self.addr, self.port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            self.connecting = True
        elif self.kind == "udp":
            self.sock.connect((self.addr, self.port))
            self.sock.send(self.token)
        else:
            self.ident = int.from_bytes(os.urandom(2), "big")
            v6 = family == socket.AF_INET6
            message = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, self.ident, 1) + self.token
            if not v6:  # the kernel fills in the ICMPv6 checksum itself
                message = message[:2] + struct.pack("!H", internet_checksum(message)) + message[4:]
            self.sock.sendto(message, (self.addr, 0))

    def finish(self, ok: bool, outcome: str, error: str | None = None) -> None:
        if self.result is None:
            self.result = {"ok": ok, "outcome": outcome, "error": error,
                           "seconds": round(time.monotonic() - self.started, 3)}
            self.sock.close()

    @property
    def done(self) -> bool:
        return self.result is not None

    def wants_write(self) -> bool:
        return not self.done and self.connecting

    def on_event(self) -> None:
        try:
            if self.connecting:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                self.connecting = False
                return
            if self.kind == "tcp":
                chunk = self.sock.recv(64)
                self.buffer += chunk
                if not chunk or len(self.buffer) >= len(GREETING):
                    ok = self.buffer == GREETING
                    self.finish(ok, "ok" if ok else "error", None if ok else f"reply {self.buffer!r}")
            elif self.kind == "udp":
                data = self.sock.recv(65535)
                if data == self.token:
                    self.finish(True, "ok")
            else:
                self._on_icmp()
        except OSError as exc:
            self.finish(False, _outcome(exc.errno), f"{type(exc).__name__}: {exc}")

    def _on_icmp(self) -> None:
        data, peer = self.sock.recvfrom(65535)
        v6 = self.sock.family == socket.AF_INET6
        if not v6:
            data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 sockets deliver the IP header too
        if len(data) < 8 or socket.inet_pton(self.sock.family, peer[0]) != \
                socket.inet_pton(self.sock.family, self.addr):
            return
        kind, _, _, ident, _ = struct.unpack("!BBHHH", data[:8])
        if kind == (129 if v6 else 0) and ident == self.ident and data[8:] == self.token:
            self.finish(True, "ok")


def cmd_conns(spec: dict, ns: Namespaces) -> dict:
    servers = [Server(ns, *entry) for entry in spec["servers"]]
    clients = [Client(ns, entry) for entry in spec["clients"]]
    started = time.monotonic()
    deadline = started + spec["timeout"]
    while True:
        now = time.monotonic()
        pending = [c for c in clients if not c.done]
        awaited_left = any(c.awaited for c in pending)
        finished = [c.started + c.result["seconds"] for c in clients if c.done]
        quiet_from = max(finished, default=started)
        if not pending or now >= deadline or (not awaited_left and now - quiet_from >= spec["wait"]):
            break
        limit = deadline if awaited_left else min(deadline, quiet_from + spec["wait"])
        reads = [s.sock for s in servers] + [c.sock for c in pending if not c.connecting]
        writes = [c.sock for c in pending if c.wants_write()]
        readable, writable, _ = select.select(reads, writes, [], max(0.0, limit - now))
        for server in servers:
            if server.sock in readable:
                server.handle()
        for client in pending:
            if client.sock in readable or client.sock in writable:
                client.on_event()
    for client in clients:
        client.finish(False, "timeout", "no answer within the wait")
    return {"results": [c.result for c in clients]}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("frames", "conns"):
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.load(sys.stdin)
    ns = Namespaces()
    emit((cmd_frames if argv[0] == "frames" else cmd_conns)(spec, ns))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Traffic probe run *inside* a network namespace by tests/netlab.py.

    ip netns exec NS python3 tests/frametool.py COMMAND ...

Standard library only (it starts in a few tens of milliseconds; scapy is used by the test
process to build and decode frames, never here). Every command prints JSON on stdout.

Commands
--------
send IFACE HEX [HEX ...]
    Transmit raw Ethernet frames (given as hex, starting with the destination MAC) on IFACE
    through an AF_PACKET socket. Prints {"sent": N}.

sniff IFACE [--prefix HEX ...] [--first] [--outgoing] [--max-seconds S]
    Capture frames received on IFACE. Prints {"ready": true} once the socket is bound, then
    reads commands from stdin: "stop SECONDS" ends the capture SECONDS from now; end of
    input ends it at once. With --prefix only frames starting with one of the prefixes are
    kept; with --first the capture ends at the first kept frame. Outgoing frames (sent by
    IFACE's own namespace) are ignored unless --outgoing. Finally prints
    {"frames": [HEX, ...], "seen": N_ALL_FRAMES, "truncated": BOOL}.

tcp-listen ADDR PORT
    Listen on ADDR:PORT, answer every connection with "nwft-ok\\n" and close it. Prints
    {"ready": true} once listening; runs until stdin reaches end of input.

tcp-connect ADDR PORT [--timeout S]
    Connect, expect "nwft-ok". Prints {"ok": BOOL, "error": TEXT|null}; exit status 0 iff ok.

udp-listen ADDR PORT
    Echo every UDP datagram back to its sender. Same ready/stdin protocol as tcp-listen.

udp-request ADDR PORT [--timeout S]
    Send a random token, expect it echoed back. Prints {"ok": ..., "error": ...}; exit 0 iff ok.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
MAX_FRAMES = 2000
TCP_GREETING = b"nwft-ok\n"


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def packet_socket(iface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((iface, ETH_P_ALL))
    return sock


def cmd_send(args: argparse.Namespace) -> int:
    frames = [bytes.fromhex(h) for h in args.frames]
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((args.iface, 0))
        for frame in frames:
            sock.send(frame)
    emit({"sent": len(frames)})
    return 0


def wait_stdin_lines(deadline_holder: list, stdin_open: list) -> None:
    """Read one line of the stdin control protocol and update the deadline."""
    line = sys.stdin.readline()
    if not line:
        stdin_open[0] = False
        deadline_holder[0] = min(deadline_holder[0], time.monotonic())
        return
    parts = line.split()
    if len(parts) == 2 and parts[0] == "stop":
        deadline_holder[0] = min(deadline_holder[0], time.monotonic() + float(parts[1]))


def cmd_sniff(args: argparse.Namespace) -> int:
    prefixes = [bytes.fromhex(p) for p in args.prefix]
    sock = packet_socket(args.iface)
    ifindex = socket.if_nametoindex(args.iface)
    # Frames of other interfaces may have been queued between socket() and bind().
    sock.setblocking(False)
    while True:
        try:
            sock.recvfrom(65535)
        except BlockingIOError:
            break
    emit({"ready": True, "ifindex": ifindex})

    deadline = [time.monotonic() + args.max_seconds]
    stdin_open = [True]
    kept: list[str] = []
    seen = 0
    truncated = False
    done = False
    while not done:
        timeout = deadline[0] - time.monotonic()
        if timeout <= 0:
            break
        watch = [sock] + ([sys.stdin] if stdin_open[0] else [])
        readable, _, _ = select.select(watch, [], [], timeout)
        if sys.stdin in readable:
            wait_stdin_lines(deadline, stdin_open)
        if sock not in readable:
            continue
        while True:
            try:
                frame, addr = sock.recvfrom(65535)
            except BlockingIOError:
                break
            if addr[0] != args.iface:
                continue
            if addr[2] == PACKET_OUTGOING and not args.outgoing:
                continue
            seen += 1
            if prefixes and not any(frame.startswith(p) for p in prefixes):
                continue
            if len(kept) >= MAX_FRAMES:
                truncated = True
                continue
            kept.append(frame.hex())
            if args.first:
                done = True
                break
    emit({"frames": kept, "seen": seen, "truncated": truncated})
    return 0


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def serve_until_eof(sock: socket.socket, handle) -> None:
    emit({"ready": True})
    while True:
        readable, _, _ = select.select([sock, sys.stdin], [], [])
        if sys.stdin in readable and not sys.stdin.readline():
            return
        if sock in readable:
            handle(sock)


def cmd_tcp_listen(args: argparse.Namespace) -> int:
    sock = socket.socket(family_of(args.addr), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.addr, args.port))
    sock.listen(64)

    def handle(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        try:
            conn.sendall(TCP_GREETING)
        except OSError:
            pass
        finally:
            conn.close()

    serve_until_eof(sock, handle)
    return 0


def cmd_tcp_connect(args: argparse.Namespace) -> int:
    result = {"ok": False, "error": None}
    try:
        with socket.create_connection((args.addr, args.port), timeout=args.timeout) as conn:
            data = b""
            while len(data) < len(TCP_GREETING):
                chunk = conn.recv(64)
                if not chunk:
                    break
                data += chunk
            result["ok"] = data == TCP_GREETING
            if not result["ok"]:
                result["error"] = f"unexpected reply {data!r}"
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    emit(result)
    return 0 if result["ok"] else 1


def cmd_udp_listen(args: argparse.Namespace) -> int:
    sock = socket.socket(family_of(args.addr), socket.SOCK_DGRAM)
    sock.bind((args.addr, args.port))

    def handle(s: socket.socket) -> None:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)

    serve_until_eof(sock, handle)
    return 0


def cmd_udp_request(args: argparse.Namespace) -> int:
    result = {"ok": False, "error": None}
    token = os.urandom(8).hex().encode()
    try:
        with socket.socket(family_of(args.addr), socket.SOCK_DGRAM) as sock:
            sock.settimeout(args.timeout)
            sock.connect((args.addr, args.port))
            sock.send(token)
            data = sock.recv(65535)
            result["ok"] = data == token
            if not result["ok"]:
                result["error"] = f"unexpected reply {data!r}"
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    emit(result)
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("send")
    p.add_argument("iface")
    p.add_argument("frames", nargs="+")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("sniff")
    p.add_argument("iface")
    p.add_argument("--prefix", action="append", default=[])
    p.add_argument("--first", action="store_true")
    p.add_argument("--outgoing", action="store_true")
    p.add_argument("--max-seconds", type=float, default=30.0)
    p.set_defaults(func=cmd_sniff)

    for name, func in (("tcp-listen", cmd_tcp_listen), ("udp-listen", cmd_udp_listen)):
        p = sub.add_parser(name)
        p.add_argument("addr")
        p.add_argument("port", type=int)
        p.set_defaults(func=func)

    for name, func in (("tcp-connect", cmd_tcp_connect), ("udp-request", cmd_udp_request)):
        p = sub.add_parser(name)
        p.add_argument("addr")
        p.add_argument("port", type=int)
        p.add_argument("--timeout", type=float, default=0.5)
        p.set_defaults(func=func)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

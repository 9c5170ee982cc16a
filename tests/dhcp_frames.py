"""DHCP and ARP frames for the IP learning tests (standard library only; built on the frame
builders of tests/bindings_helpers.py).

:func:`reply` builds what a server sends a client (OFFER, ACK, NAK), :func:`client` what a
client sends (DISCOVER, REQUEST, RELEASE, DECLINE, INFORM); :func:`options` the option field,
with or without END. :func:`probe`/:func:`announcement` are the ARP frames of RFC 5227.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct

from bindings_helpers import BCAST, ETH_IPV4, PROTO_UDP, arp, ether, ipv4, mac_bytes, udp

MAGIC = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)


def _ip(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def options(message_type: int | None, lease: int | None = None, server_id: str | None = None,
            requested: str | None = None, extra: bytes = b"", end: bool = True) -> bytes:
    out = b""
    if message_type is not None:
        out += bytes([53, 1, message_type])
    if lease is not None:
        out += bytes([51, 4]) + struct.pack("!I", lease)
    if server_id is not None:
        out += bytes([54, 4]) + _ip(server_id)
    if requested is not None:
        out += bytes([50, 4]) + _ip(requested)
    return out + extra + (b"\xff" if end else b"")


def bootp(op: int, client_mac: str, opts: bytes, ciaddr: str = "0.0.0.0", yiaddr: str = "0.0.0.0",
          siaddr: str = "0.0.0.0", xid: int | None = None, htype: int = 1, hlen: int = 6) -> bytes:
    xid = secrets.randbits(32) if xid is None else xid
    return struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, htype, hlen, 0, xid, 0, 0x8000, _ip(ciaddr), _ip(yiaddr),
                       _ip(siaddr), bytes(4), mac_bytes(client_mac) + bytes(10), b"", b"") + MAGIC + opts


def reply(message_type: int, server_mac: str, server_ip: str, client_mac: str, yiaddr: str, lease: int | None = 3600,
          dst_mac: str = BCAST, dst_ip: str = "255.255.255.255", opts: bytes | None = None) -> bytes:
    """A server's reply (67 -> 68) offering or acknowledging ``yiaddr`` to ``client_mac``."""
    opts = options(message_type, lease, server_id=server_ip) if opts is None else opts
    body = bootp(2, client_mac, opts, yiaddr=yiaddr, siaddr=server_ip)
    return ether(dst_mac, server_mac, ETH_IPV4, ipv4(server_ip, dst_ip, PROTO_UDP, udp(server_ip, dst_ip, 67, 68, body)))


def client(message_type: int, client_mac: str, src_ip: str = "0.0.0.0", ciaddr: str = "0.0.0.0",
           requested: str | None = None, dst_ip: str = "255.255.255.255", dst_mac: str = BCAST,
           opts: bytes | None = None) -> bytes:
    """A client's message (68 -> 67)."""
    opts = options(message_type, requested=requested) if opts is None else opts
    body = bootp(1, client_mac, opts, ciaddr=ciaddr)
    return ether(dst_mac, client_mac, ETH_IPV4, ipv4(src_ip, dst_ip, PROTO_UDP, udp(src_ip, dst_ip, 68, 67, body)))


def probe(mac: str, address: str) -> bytes:
    """An ARP probe (RFC 5227): who has ``address``? sender 0.0.0.0."""
    return arp(mac, BCAST, 1, mac, "0.0.0.0", "00:00:00:00:00:00", address)


def announcement(mac: str, address: str) -> bytes:
    """An ARP announcement: sender and target ``address``."""
    return arp(mac, BCAST, 1, mac, address, "00:00:00:00:00:00", address)

"""What a frame on a learning port teaches, and the bookkeeping of what was learned (pure).

:func:`inspect` turns one frame into :class:`Fact` s: an address the guest uses or claims
(the IPv4 source of its packets, the address of its ARP announcements), a DHCP reply offering
or acknowledging an address to its MAC, or a DHCP RELEASE/DECLINE from it. Then, per mode
(semantics.md §10):

* ``any``: :func:`first_address` -- the first address seen wins, and learning ends;
* ``dhcp``: :class:`Leases` -- every ACK of a trusted server adds (or renews) a lease,
  RELEASE/DECLINE and expiry remove one.

Differences from libvirt (README, "IP address learning"): ARP teaches the address the guest
claims for itself (libvirt's code reads the target of any request, but never reaches it);
RELEASE removes the address in ``ciaddr`` and DECLINE the requested address, both from the
guest (libvirt reads ``yiaddr``, which is 0.0.0.0 in both, and takes DECLINE only towards the
guest); ``DHCPSERVER`` is believed in both modes, and checked here too, not only in the
kernel; an ACK without lease time (the reply to an INFORM) teaches nothing.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ..model import Lease
from . import frames
from .record import MAX_LEASES, address_key

BROADCAST = b"\xff" * 6
DHCP_SERVER_PORT, DHCP_CLIENT_PORT = 67, 68

# Fact kinds
SOURCE, ARP, OFFER, ACK, RELEASE, DECLINE = ("IPv4 source", "ARP", "DHCP OFFER", "DHCP ACK", "DHCP RELEASE",
                                             "DHCP DECLINE")
_REPLIES = {frames.OFFER: OFFER, frames.ACK: ACK}
_CLIENT_MESSAGES = {frames.RELEASE: RELEASE, frames.DECLINE: DECLINE}


@dataclass(frozen=True)
class Fact:
    kind: str
    address: str
    server: str | None = None  # IPv4 source of a DHCP reply
    lease_time: int | None = None  # seconds (frames.INFINITE_LEASE: infinite)


def usable(address: str) -> bool:
    """An address a guest can own: not 0.0.0.0, not multicast or class E (224.0.0.0/3)."""
    first = int(address.split(".", 1)[0])
    return address != "0.0.0.0" and first < 224


def inspect(frame: bytes, to_guest: bool, mac: bytes) -> tuple[Fact, ...]:
    """The facts ``frame`` (sent to the guest, or by it) tells about the guest of ``mac``."""
    ether = frames.ethernet(frame)
    if ether is None:
        return ()
    if to_guest:
        if ether.dst not in (mac, BROADCAST) or ether.ethertype != frames.ETHERTYPE_IPV4:
            return ()
        return _dhcp_reply(ether.payload, mac)
    if ether.src != mac:
        return ()
    if ether.ethertype == frames.ETHERTYPE_ARP:
        return _arp(ether.payload)
    if ether.ethertype == frames.ETHERTYPE_IPV4:
        return _from_guest_ipv4(ether.payload)
    return ()


def _dhcp_message(packet: bytes, sport: int, dport: int) -> tuple[frames.Ipv4, frames.Dhcp] | None:
    ip = frames.ipv4(packet)
    if ip is None or ip.protocol != frames.PROTO_UDP:
        return None
    datagram = frames.udp(ip.payload)
    if datagram is None or (datagram.sport, datagram.dport) != (sport, dport):
        return None
    message = frames.dhcp(datagram.payload)
    return None if message is None else (ip, message)


def _dhcp_reply(packet: bytes, mac: bytes) -> tuple[Fact, ...]:
    found = _dhcp_message(packet, DHCP_SERVER_PORT, DHCP_CLIENT_PORT)
    if found is None:
        return ()
    ip, message = found
    kind = _REPLIES.get(message.message_type)
    if message.op != 2 or message.client_mac != mac or kind is None or not usable(message.yiaddr):
        return ()
    return (Fact(kind, message.yiaddr, ip.src, message.lease_time),)


def _from_guest_ipv4(packet: bytes) -> tuple[Fact, ...]:
    ip = frames.ipv4(packet)
    if ip is None:
        return ()
    facts = [Fact(SOURCE, ip.src)] if usable(ip.src) else []
    found = _dhcp_message(packet, DHCP_CLIENT_PORT, DHCP_SERVER_PORT)
    if found is not None:
        message = found[1]
        kind = _CLIENT_MESSAGES.get(message.message_type)
        address = message.ciaddr if kind == RELEASE else message.requested_address
        if message.op == 1 and kind is not None and address is not None and usable(address):
            facts.append(Fact(kind, address))
    return tuple(facts)


def _arp(payload: bytes) -> tuple[Fact, ...]:
    """The address the guest claims: the sender of a reply or request, or the target of a
    probe (sender 0.0.0.0) or announcement (sender = target)."""
    message = frames.arp(payload)
    if message is None or message.opcode not in (1, 2):
        return ()
    probe = message.opcode == 1 and message.sender_ip in ("0.0.0.0", message.target_ip)
    address = message.target_ip if probe else message.sender_ip
    return (Fact(ARP, address),) if usable(address) else ()


def trusted(fact: Fact, servers: Sequence[str]) -> bool:
    """A DHCP reply is believed from any server, or only from ``servers`` when given."""
    return not servers or fact.server in servers


def first_address(facts: Iterable[Fact], servers: Sequence[str]) -> Fact | None:
    """``any``: the fact that teaches the guest's address, if one does."""
    for fact in facts:
        if fact.kind in (SOURCE, ARP) or (fact.kind in (OFFER, ACK) and trusted(fact, servers)):
            return fact
    return None


@dataclass(frozen=True)
class Event:
    """A change of the leases, for the log: ``what`` is learned, renewed, released, declined,
    expired or refused (the port holds MAX_LEASES already)."""

    what: str
    address: str
    expires: int | None = None


class Leases:
    """The DHCP leases of one port (``dhcp``): address -> expiry (None: infinite)."""

    def __init__(self, leases: Iterable[Lease] = ()):
        self.expiry: dict[str, int | None] = {lease.address: lease.expires for lease in leases}

    def leases(self) -> tuple[Lease, ...]:
        return tuple(sorted((Lease(a, e) for a, e in self.expiry.items()), key=address_key))

    def apply(self, facts: Iterable[Fact], servers: Sequence[str], now: int) -> list[Event]:
        events = []
        for fact in facts:
            if fact.kind == ACK and trusted(fact, servers) and fact.lease_time is not None:
                events.append(self._acknowledged(fact, now))
            elif fact.kind in (RELEASE, DECLINE) and fact.address in self.expiry:
                del self.expiry[fact.address]
                events.append(Event("released" if fact.kind == RELEASE else "declined", fact.address))
        return events

    def _acknowledged(self, fact: Fact, now: int) -> Event:
        expires = None if fact.lease_time == frames.INFINITE_LEASE else now + fact.lease_time
        known = fact.address in self.expiry
        if not known and len(self.expiry) >= MAX_LEASES:
            return Event("refused", fact.address, expires)
        self.expiry[fact.address] = expires
        return Event("renewed" if known else "learned", fact.address, expires)

    def expire(self, now: int) -> list[Event]:
        gone = sorted((a for a, e in self.expiry.items() if e is not None and e <= now),
                      key=lambda a: int(ipaddress.ip_address(a)))
        for address in gone:
            del self.expiry[address]
        return [Event("expired", address) for address in gone]

    def next_expiry(self) -> int | None:
        return min((e for e in self.expiry.values() if e is not None), default=None)


class TokenBucket:
    """Rate limit: ``rate`` frames a second on average, bursts of ``burst`` (libvirt: 10 and 50)."""

    def __init__(self, rate: float = 10.0, burst: int = 50, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.last = clock()
        self.refused = 0  # frames refused since the last report

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.refused += 1
        return False

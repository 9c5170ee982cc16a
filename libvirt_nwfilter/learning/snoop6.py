"""What an IPv6 frame on a learning port teaches, and the bookkeeping of the IPv6 addresses a
port learned (pure; issue 15: IPv6 address learning).

:func:`inspect6` turns one frame into :class:`~.snoop.Fact` s:

* from the guest: a duplicate address detection probe (RFC 4862 §5.4: a Neighbour Solicitation
  from ``::`` to the target's solicited-node group, hop limit 255, no link-layer option) names an
  address the guest is about to use -- SLAAC, privacy or manual alike; a DHCPv6 RELEASE or
  DECLINE gives addresses up;
* to the guest: a DHCPv6 REPLY (UDP 547 -> 546) to its MAC leases each address of its IA_NA
  options for their valid lifetime (0: the server takes the address back).

:class:`Addresses6` keeps a port's addresses within a bound: a DAD probe beyond it replaces the
address least recently probed (the guest's newest addresses are the ones in use: privacy
addresses rotate), a lease beyond it is refused. Link-local addresses are never learned (the
filters allow the guest's link-local addresses by rule), nor multicast, loopback, unspecified or
IPv4-mapped ones.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence

from ..model import Lease
from . import frames, frames6
from .snoop import Event, Fact, Leases

DAD, REPLY6, RELEASE6, DECLINE6 = "DAD probe", "DHCPv6 REPLY", "DHCPv6 RELEASE", "DHCPv6 DECLINE"
DEFAULT_LIMIT = 16  # IPv6 addresses one port may hold
_CLIENT_MESSAGES = {frames6.RELEASE: RELEASE6, frames6.DECLINE: DECLINE6}


def usable6(address: str) -> bool:
    """An IPv6 address a guest can own and a filter should name: global or unique local."""
    parsed = ipaddress.IPv6Address(address)
    return not (parsed.is_unspecified or parsed.is_loopback or parsed.is_multicast or parsed.is_link_local
                or parsed.ipv4_mapped is not None)


def solicited_node(address: str) -> str:
    """The solicited-node multicast group of ``address`` (RFC 4291 §2.7.1)."""
    low = int(ipaddress.IPv6Address(address)) & 0xFFFFFF
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0")) | low))


def inspect6(frame: bytes, to_guest: bool, mac: bytes) -> tuple[Fact, ...]:
    """The facts ``frame`` (sent to the guest, or by it) tells about the IPv6 addresses of the
    guest of ``mac``."""
    ether = frames.ethernet(frame)
    if ether is None or ether.ethertype != frames6.ETHERTYPE_IPV6:
        return ()
    packet = frames6.ipv6(ether.payload)
    if packet is None:
        return ()
    if to_guest:
        return _reply(packet) if ether.dst == mac else ()
    if ether.src != mac:
        return ()
    if packet.next_header == frames6.PROTO_ICMPV6:
        return _probe(packet)
    return _client_message(packet)


def _dhcpv6(packet: frames6.Ipv6, sport: int, dport: int) -> frames6.Dhcpv6 | None:
    if packet.next_header != frames6.PROTO_UDP:
        return None
    datagram = frames.udp(packet.payload)
    if datagram is None or (datagram.sport, datagram.dport) != (sport, dport):
        return None
    return frames6.dhcpv6(datagram.payload)


def _reply(packet: frames6.Ipv6) -> tuple[Fact, ...]:
    message = _dhcpv6(packet, frames6.DHCPV6_SERVER_PORT, frames6.DHCPV6_CLIENT_PORT)
    if message is None or message.message_type != frames6.REPLY:
        return ()
    return tuple(Fact(REPLY6, a.address, packet.src, a.valid_lifetime) for a in message.addresses
                 if usable6(a.address))


def _client_message(packet: frames6.Ipv6) -> tuple[Fact, ...]:
    message = _dhcpv6(packet, frames6.DHCPV6_CLIENT_PORT, frames6.DHCPV6_SERVER_PORT)
    kind = _CLIENT_MESSAGES.get(message.message_type) if message is not None else None
    if kind is None:
        return ()
    return tuple(Fact(kind, a.address) for a in message.addresses if usable6(a.address))


def _probe(packet: frames6.Ipv6) -> tuple[Fact, ...]:
    found = frames6.solicitation(packet.payload)
    if (found is None or packet.src != frames6.UNSPECIFIED or packet.hop_limit != 255
            or found.source_link_layer is not None or not usable6(found.target)
            or packet.dst != solicited_node(found.target)):
        return ()
    return (Fact(DAD, found.target),)


def trusted6(fact: Fact, servers: Sequence[str]) -> bool:
    """A DHCPv6 reply is believed from any server, or only from ``servers`` (DHCPSERVERV6: the
    source addresses of their replies, usually link-local) when given."""
    return not servers or fact.server in servers


class Addresses6(Leases):
    """The IPv6 addresses of one port: address -> expiry (None: none), in the order learned."""

    def __init__(self, leases: Iterable[Lease] = (), limit: int = DEFAULT_LIMIT):
        leases = tuple(leases)
        super().__init__(leases)
        self.limit = limit
        # addresses learned from DAD probes, oldest first (from a record: those without expiry)
        self.probed: list[str] = [lease.address for lease in leases if lease.expires is None]

    def apply(self, facts: Iterable[Fact], servers: Sequence[str], now: int) -> list[Event]:
        events = []
        for fact in facts:
            if fact.kind == DAD:
                events += self._probed(fact.address)
            elif fact.kind == REPLY6 and trusted6(fact, servers):
                events += self._leased(fact, now)
            elif fact.kind in (RELEASE6, DECLINE6) and fact.address in self.expiry:
                self._forget(fact.address)
                events.append(Event("released" if fact.kind == RELEASE6 else "declined", fact.address))
        return events

    def _forget(self, address: str) -> None:
        del self.expiry[address]
        if address in self.probed:
            self.probed.remove(address)

    def _probed(self, address: str) -> list[Event]:
        if address in self.expiry:
            if address in self.probed:  # probed again: in use, the newest now
                self.probed.remove(address)
                self.probed.append(address)
            return []
        events = []
        if len(self.expiry) >= self.limit:
            if not self.probed:
                return [Event("refused", address)]
            oldest = self.probed[0]
            self._forget(oldest)
            events.append(Event("replaced", oldest))
        self.expiry[address] = None
        self.probed.append(address)
        return events + [Event("learned", address)]

    def _leased(self, fact: Fact, now: int) -> list[Event]:
        known = fact.address in self.expiry
        if fact.lease_time == 0:  # the server takes it back
            if known:
                self._forget(fact.address)
            return [Event("expired", fact.address)] if known else []
        expires = None if fact.lease_time == frames6.INFINITE_LIFETIME else now + fact.lease_time
        if not known and len(self.expiry) >= self.limit:
            return [Event("refused", fact.address, expires)]
        if fact.address in self.probed:
            self.probed.remove(fact.address)  # leased now: it expires with its lease
        self.expiry[fact.address] = expires
        return [Event("renewed" if known else "learned", fact.address, expires)]

    def expire(self, now: int) -> list[Event]:
        events = super().expire(now)
        self.probed = [a for a in self.probed if a in self.expiry]
        return events

"""Parsing of the frames a learning port sees: Ethernet (with up to two VLAN tags), ARP, IPv4,
UDP and DHCP (pure; no I/O).

Every function takes bytes as they came from the wire and returns a parsed header or None when
the data is not that protocol, is truncated, or contradicts itself (lengths that do not fit,
options that run past the end, a message type given twice). Nothing here raises on any input:
a guest controls these bytes. Addresses are returned as bytes (MACs) or canonical dotted text
(IPv4). IPv6 (ethertype 0x86dd) is left out; its parser joins :data:`ETHERTYPE_IPV4`'s
siblings when IPv6 learning comes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ETHERTYPE_IPV4, ETHERTYPE_ARP = 0x0800, 0x0806
VLAN_ETHERTYPES = (0x8100, 0x88A8)
MAX_VLAN_TAGS = 2
PROTO_UDP = 17
DHCP_MAGIC = b"\x63\x82\x53\x63"
BOOTP_SIZE = 236  # the fixed BOOTP header, before the magic cookie

# DHCP options and message types (RFC 2132)
OPT_PAD, OPT_END = 0, 255
OPT_REQUESTED_ADDRESS, OPT_LEASE_TIME, OPT_MESSAGE_TYPE, OPT_SERVER_ID = 50, 51, 53, 54
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
INFINITE_LEASE = 0xFFFFFFFF

_ETHER = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s")


def ipv4_text(raw: bytes) -> str:
    return "%d.%d.%d.%d" % tuple(raw)


@dataclass(frozen=True)
class Ethernet:
    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes
    vlans: tuple[int, ...] = ()  # VLAN ids of in-band tags, outermost first


@dataclass(frozen=True)
class Arp:
    opcode: int
    sender_mac: bytes
    sender_ip: str
    target_mac: bytes
    target_ip: str


@dataclass(frozen=True)
class Ipv4:
    src: str
    dst: str
    protocol: int
    payload: bytes  # empty for a fragment that is not the first


@dataclass(frozen=True)
class Udp:
    sport: int
    dport: int
    payload: bytes


@dataclass(frozen=True)
class Dhcp:
    op: int  # 1 request, 2 reply
    client_mac: bytes | None  # chaddr when it is an Ethernet address (htype 1, hlen 6)
    ciaddr: str
    yiaddr: str
    message_type: int | None
    lease_time: int | None  # seconds; INFINITE_LEASE for an infinite lease
    server_id: str | None
    requested_address: str | None


def ethernet(frame: bytes) -> Ethernet | None:
    """The Ethernet header; in-band 802.1Q/802.1ad tags (at most two) are skipped. Frames with
    an IEEE 802.3 length instead of a type are not ours (None)."""
    if len(frame) < _ETHER.size:
        return None
    dst, src, ethertype = _ETHER.unpack_from(frame)
    offset, vlans = _ETHER.size, []
    while ethertype in VLAN_ETHERTYPES:
        if len(vlans) == MAX_VLAN_TAGS or len(frame) < offset + 4:
            return None
        tci, ethertype = struct.unpack_from("!HH", frame, offset)
        vlans.append(tci & 0x0FFF)
        offset += 4
    if ethertype < 0x0600:
        return None
    return Ethernet(dst, src, ethertype, bytes(frame[offset:]), tuple(vlans))


def arp(payload: bytes) -> Arp | None:
    """ARP for IPv4 over Ethernet (other hardware or protocol types: None)."""
    if len(payload) < _ARP.size:
        return None
    htype, ptype, hlen, plen, opcode, sha, spa, tha, tpa = _ARP.unpack_from(payload)
    if (htype, ptype, hlen, plen) != (1, ETHERTYPE_IPV4, 6, 4):
        return None
    return Arp(opcode, sha, ipv4_text(spa), tha, ipv4_text(tpa))


def ipv4(payload: bytes) -> Ipv4 | None:
    """The IPv4 header; the payload ends where the total length says (trailing padding cut).
    A header that does not fit, or a total length beyond the data (truncated): None."""
    if len(payload) < _IPV4.size:
        return None
    version_ihl, _, total, _, fragment, _, protocol, _, src, dst = _IPV4.unpack_from(payload)
    header = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or header < _IPV4.size or total < header or total > len(payload):
        return None
    first_and_whole = fragment & 0x3FFF == 0  # offset 0 and no more fragments
    data = bytes(payload[header:total]) if first_and_whole else b""
    return Ipv4(ipv4_text(src), ipv4_text(dst), protocol, data)


def udp(payload: bytes) -> Udp | None:
    if len(payload) < _UDP.size:
        return None
    sport, dport, length, _ = _UDP.unpack_from(payload)
    if length < _UDP.size or length > len(payload):
        return None
    return Udp(sport, dport, bytes(payload[_UDP.size:length]))


def dhcp(payload: bytes) -> Dhcp | None:
    """A DHCP message (BOOTP without the magic cookie, or with malformed options: None)."""
    if len(payload) < BOOTP_SIZE + len(DHCP_MAGIC) or payload[BOOTP_SIZE:BOOTP_SIZE + 4] != DHCP_MAGIC:
        return None
    op, htype, hlen, _, _, _, _, ciaddr, yiaddr, _, _, chaddr = _BOOTP.unpack_from(payload)
    options = _options(payload[BOOTP_SIZE + 4:])
    if options is None:
        return None
    return Dhcp(op, chaddr[:6] if (htype, hlen) == (1, 6) else None, ipv4_text(ciaddr), ipv4_text(yiaddr),
                _byte(options.get(OPT_MESSAGE_TYPE)), _word(options.get(OPT_LEASE_TIME)),
                _address(options.get(OPT_SERVER_ID)), _address(options.get(OPT_REQUESTED_ADDRESS)))


_KNOWN_SIZES = {OPT_MESSAGE_TYPE: 1, OPT_LEASE_TIME: 4, OPT_SERVER_ID: 4, OPT_REQUESTED_ADDRESS: 4}


def _options(data: bytes) -> dict[int, bytes] | None:
    """The options we use, by code. An option that runs past the end, a known option of the
    wrong size or given twice: None (the message is not believed). Options after END are
    ignored; a missing END is tolerated (some clients pad to the end instead)."""
    found: dict[int, bytes] = {}
    index, end = 0, len(data)
    while index < end:
        code = data[index]
        if code == OPT_PAD:
            index += 1
            continue
        if code == OPT_END:
            break
        if index + 2 > end:
            return None
        size = data[index + 1]
        value = data[index + 2:index + 2 + size]
        if len(value) != size:
            return None
        if code in _KNOWN_SIZES:
            if size != _KNOWN_SIZES[code] or code in found:
                return None
            found[code] = bytes(value)
        index += 2 + size
    return found


def _byte(value: bytes | None) -> int | None:
    return value[0] if value else None


def _word(value: bytes | None) -> int | None:
    return struct.unpack("!I", value)[0] if value else None


def _address(value: bytes | None) -> str | None:
    return ipv4_text(value) if value else None

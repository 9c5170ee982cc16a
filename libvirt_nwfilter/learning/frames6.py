"""Parsing of the IPv6 frames that can teach a guest's IPv6 addresses (pure; no I/O): the IPv6
header with its extension headers, ICMPv6 Neighbour Solicitations (duplicate address
detection, RFC 4862) and DHCPv6 messages with their IA_NA addresses (RFC 8415).

As in :mod:`.frames`, every function takes the bytes as they came from the wire and returns the
parsed message or None when the data is not that protocol, is truncated or contradicts itself;
nothing raises on any input. Addresses are canonical IPv6 text (``ipaddress``'s compressed form).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETHERTYPE_IPV6 = 0x86DD
PROTO_UDP, PROTO_ICMPV6 = 17, 58
HOP_BY_HOP, ROUTING, FRAGMENT, DESTINATION_OPTIONS, NO_NEXT_HEADER = 0, 43, 44, 60, 59
_SKIPPED_HEADERS = (HOP_BY_HOP, ROUTING, DESTINATION_OPTIONS)
MAX_EXTENSION_HEADERS = 8
NEIGHBOUR_SOLICITATION = 135
ND_SOURCE_LINK_LAYER = 1
UNSPECIFIED = "::"

# DHCPv6 (RFC 8415): ports, message types, options
DHCPV6_CLIENT_PORT, DHCPV6_SERVER_PORT = 546, 547
ADVERTISE, REPLY, RELEASE, DECLINE = 2, 7, 8, 9
OPT_IA_NA, OPT_IAADDR, OPT_STATUS_CODE = 3, 5, 13
INFINITE_LIFETIME = 0xFFFFFFFF
MAX_OPTIONS = 64  # per level: more is not a message we believe

_IPV6 = struct.Struct("!IHBB16s16s")
_EXTENSION = struct.Struct("!BB")
_FRAGMENT = struct.Struct("!BBHI")
_ICMPV6 = struct.Struct("!BBHI16s")
_OPTION = struct.Struct("!HH")
_IA_NA = struct.Struct("!III")
_IAADDR = struct.Struct("!16sII")


@dataclass(frozen=True)
class Ipv6:
    src: str
    dst: str
    next_header: int  # after the extension headers
    hop_limit: int
    payload: bytes  # empty for a fragment that is not a whole packet


@dataclass(frozen=True)
class Solicitation:
    target: str
    source_link_layer: bytes | None  # the option's address, when given


@dataclass(frozen=True)
class Address:
    address: str
    valid_lifetime: int  # seconds; INFINITE_LIFETIME: infinite; 0: the address is given up


@dataclass(frozen=True)
class Dhcpv6:
    message_type: int
    addresses: tuple[Address, ...]  # of every IA_NA whose status (if any) is Success


def ipv6_text(raw: bytes) -> str:
    return str(ipaddress.IPv6Address(raw))


def ipv6(payload: bytes) -> Ipv6 | None:
    """The IPv6 header; hop-by-hop, routing and destination options headers are skipped (at
    most :data:`MAX_EXTENSION_HEADERS`), a fragment header makes the payload empty unless the
    fragment is the whole packet. The payload ends where the payload length says."""
    if len(payload) < _IPV6.size:
        return None
    first, length, next_header, hop_limit, src, dst = _IPV6.unpack_from(payload)
    end = _IPV6.size + length
    if first >> 28 != 6 or end > len(payload):
        return None
    offset, whole = _IPV6.size, True
    for _ in range(MAX_EXTENSION_HEADERS + 1):
        if next_header in _SKIPPED_HEADERS:
            if offset + _EXTENSION.size > end:
                return None
            next_header, size = _EXTENSION.unpack_from(payload, offset)
            offset += (size + 1) * 8
        elif next_header == FRAGMENT:
            if offset + _FRAGMENT.size > end:
                return None
            next_header, _, fragment, _ = _FRAGMENT.unpack_from(payload, offset)
            whole = whole and fragment == 0  # offset 0 and no more fragments
            offset += _FRAGMENT.size
        else:
            break
    else:
        return None
    if offset > end:
        return None
    data = bytes(payload[offset:end]) if whole else b""
    return Ipv6(ipv6_text(src), ipv6_text(dst), next_header, hop_limit, data)


def solicitation(message: bytes) -> Solicitation | None:
    """An ICMPv6 Neighbour Solicitation (code 0) with well-formed options (RFC 4861 §4.3)."""
    if len(message) < _ICMPV6.size:
        return None
    kind, code, _, _, target = _ICMPV6.unpack_from(message)
    if kind != NEIGHBOUR_SOLICITATION or code != 0:
        return None
    link_layer, offset = None, _ICMPV6.size
    while offset < len(message):
        if offset + 2 > len(message):
            return None
        option, units = message[offset], message[offset + 1]
        if units == 0 or offset + units * 8 > len(message):
            return None
        if option == ND_SOURCE_LINK_LAYER:
            if link_layer is not None or units != 1:
                return None
            link_layer = bytes(message[offset + 2:offset + 8])
        offset += units * 8
    return Solicitation(ipv6_text(target), link_layer)


def dhcpv6(payload: bytes) -> Dhcpv6 | None:
    """A DHCPv6 client/server message (not a relay message) and the addresses of its IA_NA
    options. Options that run past their container, or too many of them: None."""
    if len(payload) < 4 or payload[0] in (12, 13):  # RELAY-FORW, RELAY-REPL
        return None
    options = _options(payload[4:])
    if options is None:
        return None
    addresses: list[Address] = []
    for code, value in options:
        if code == OPT_IA_NA:
            found = _ia_na(value)
            if found is None:
                return None
            addresses += found
    return Dhcpv6(payload[0], tuple(addresses))


def _options(data: bytes) -> list[tuple[int, bytes]] | None:
    found, offset = [], 0
    while offset < len(data):
        if offset + _OPTION.size > len(data) or len(found) == MAX_OPTIONS:
            return None
        code, size = _OPTION.unpack_from(data, offset)
        value = data[offset + _OPTION.size:offset + _OPTION.size + size]
        if len(value) != size:
            return None
        found.append((code, bytes(value)))
        offset += _OPTION.size + size
    return found


def _ia_na(value: bytes) -> list[Address] | None:
    """The addresses of one IA_NA; none when its status is not Success (0)."""
    if len(value) < _IA_NA.size:
        return None
    options = _options(value[_IA_NA.size:])
    if options is None:
        return None
    addresses = []
    for code, inner in options:
        if code == OPT_STATUS_CODE:
            if len(inner) < 2:
                return None
            if struct.unpack_from("!H", inner)[0] != 0:
                return []
        elif code == OPT_IAADDR:
            if len(inner) < _IAADDR.size or _options(inner[_IAADDR.size:]) is None:
                return None
            raw, preferred, valid = _IAADDR.unpack_from(inner)
            if preferred > valid:  # RFC 8415 §21.6: such an address is ignored
                continue
            addresses.append(Address(ipv6_text(raw), valid))
    return addresses

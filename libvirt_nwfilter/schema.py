"""The filter language as data: value types, name maps and per-protocol attribute tables.

One generic parser and one generic formatter (``xml.py``) are driven by these tables, and the
compiler decodes canonical values through :func:`decode`. Nothing here touches the system.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Mapping


class ValueType(enum.Enum):
    """The data types of filter-language.md §4."""

    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT16_DEC = "UINT16-DEC"
    MAC = "MAC"
    MACMASK = "MACMASK"
    IPV4 = "IPV4"
    IPV4MASK = "IPV4MASK"
    IPV6 = "IPV6"
    IPV6MASK = "IPV6MASK"
    BOOLEAN = "BOOLEAN"
    COMMENT = "COMMENT"
    STATE = "STATE"
    TCPFLAGS = "TCPFLAGS"
    IPSETNAME = "IPSETNAME"
    IPSETFLAGS = "IPSETFLAGS"
    NDLLADDR = "NDLLADDR"  # extension: a MAC, or ``none`` (docs/filter-language-extensions.md)


class Negation(enum.Enum):
    """How ``match='no'`` applies to an attribute."""

    OWN = "own"  # negatable on its own
    FOLLOWS = "follows"  # takes the negation of its base attribute
    REFUSED = "refused"  # negation is an error (state, ipset, ipsetflags)
    IGNORED = "ignored"  # negation has no effect (comment)


class Layer(enum.Enum):
    """Where a protocol element is evaluated."""

    L2 = "l2"
    L3V4 = "l3v4"
    L3V6 = "l3v6"


def _names(pairs: dict[str, int]) -> Mapping[str, int]:
    return MappingProxyType(pairs)


ETHERTYPES = _names({"arp": 0x0806, "rarp": 0x8035, "ipv4": 0x0800, "ipv6": 0x86DD, "vlan": 0x8100})
ARP_OPCODES = _names({
    "Request": 1, "Reply": 2, "Request_Reverse": 3, "Reply_Reverse": 4, "DRARP_Request": 5,
    "DRARP_Reply": 6, "DRARP_Error": 7, "InARP_Request": 8, "ARP_NAK": 9,
})
IP_PROTOCOLS = _names({
    "tcp": 6, "udp": 17, "udplite": 136, "esp": 50, "ah": 51, "icmp": 1, "igmp": 2, "sctp": 132,
    "icmpv6": 58,
})

# Our namespace: the domain metadata's, and that of the extension attributes of the filter
# language (docs/filter-language-extensions.md), written with the prefix ``nwf:``.
NWF_NAMESPACE = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
EXTENSION_PREFIX = "nwf:"
ND_TYPES = (135, 136)  # Neighbour Solicitation, Neighbour Advertisement: what nwf:nd-* apply to

CONNTRACK_STATES = ("NEW", "ESTABLISHED", "RELATED", "INVALID")
TCP_FLAG_BITS = _names({"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20})
TCP_FLAGS_ALL = 0x3F
COMMENT_MAX = 256

_UINT_MAX = {ValueType.UINT8: 0xFF, ValueType.UINT16: 0xFFFF, ValueType.UINT32: 0xFFFFFFFF,
             ValueType.UINT16_DEC: 0xFFFF}
_MAC_RE = re.compile(r"^[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}\Z")
_IPSET_RE = re.compile(r"^[A-Za-z0-9_.:+ -]{1,31}\Z")


@dataclass(frozen=True)
class AttrSpec:
    """One attribute of a protocol element."""

    name: str
    vtype: ValueType
    negation: Negation = Negation.OWN
    base: str | None = None  # the attribute this companion belongs to
    names: Mapping[str, int] | None = None  # accepted names for numeric values
    minimum: int = 0
    maximum: int | None = None
    variables: bool = True  # may the value be a $variable?
    names_only_decimal: bool = False  # unnamed numbers always print in decimal (opcode)

    @property
    def extension(self) -> bool:
        """One of our attributes (namespace :data:`NWF_NAMESPACE`): libvirt does not know it."""
        return self.name.startswith(EXTENSION_PREFIX)

    @property
    def upper(self) -> int:
        return self.maximum if self.maximum is not None else _UINT_MAX[self.vtype]


@dataclass(frozen=True)
class ProtocolSpec:
    """One of the 24 protocol elements."""

    name: str
    layer: Layer
    attrs: tuple[AttrSpec, ...]

    def attr(self, name: str) -> AttrSpec | None:
        return _ATTR_INDEX[self.name].get(name)

    @property
    def family(self) -> int | None:
        """IP family the element's addresses use (4 or 6), or None for MAC-only elements."""
        if self.layer is Layer.L3V6 or self.name == "ipv6":
            return 6
        if self.layer is Layer.L3V4 or self.name == "ip":
            return 4
        return None


def _a(name: str, vtype: ValueType, base: str | None = None, **kw) -> AttrSpec:
    negation = kw.pop("negation", Negation.FOLLOWS if base else Negation.OWN)
    return AttrSpec(name, vtype, negation, base, **kw)


V = ValueType
COMMENT = _a("comment", V.COMMENT, negation=Negation.IGNORED, variables=False)
ETH = (
    _a("srcmacaddr", V.MAC), _a("srcmacmask", V.MACMASK, "srcmacaddr"),
    _a("dstmacaddr", V.MAC), _a("dstmacmask", V.MACMASK, "dstmacaddr"),
)


def _ports() -> tuple[AttrSpec, ...]:
    return (
        _a("srcportstart", V.UINT16), _a("srcportend", V.UINT16, "srcportstart"),
        _a("dstportstart", V.UINT16), _a("dstportend", V.UINT16, "dstportstart"),
    )


def _ip_group(addr: ValueType, mask: ValueType) -> tuple[AttrSpec, ...]:
    return (
        _a("srcipaddr", addr), _a("srcipmask", mask, "srcipaddr"),
        _a("dstipaddr", addr), _a("dstipmask", mask, "dstipaddr"),
    )


def _l3_group(addr: ValueType, mask: ValueType) -> tuple[AttrSpec, ...]:
    return (
        _a("srcmacaddr", V.MAC), *_ip_group(addr, mask),
        _a("srcipfrom", addr), _a("srcipto", addr, "srcipfrom"),
        _a("dstipfrom", addr), _a("dstipto", addr, "dstipfrom"),
        _a("dscp", V.UINT8, maximum=63),
        _a("connlimit-above", V.UINT16_DEC),
        _a("state", V.STATE, negation=Negation.REFUSED, variables=False),
        _a("ipset", V.IPSETNAME, negation=Negation.REFUSED),
        _a("ipsetflags", V.IPSETFLAGS, "ipset", negation=Negation.REFUSED, variables=False),
    )


def _stp() -> tuple[AttrSpec, ...]:
    attrs = [_a("srcmacaddr", V.MAC), _a("srcmacmask", V.MACMASK, "srcmacaddr"),
             _a("type", V.UINT8), _a("flags", V.UINT8)]

    def rng(name: str, vtype: ValueType) -> list[AttrSpec]:
        return [_a(name, vtype), _a(f"{name}-hi", vtype, name)]

    def addr(name: str) -> list[AttrSpec]:
        return [_a(name, V.MAC), _a(f"{name}-mask", V.MACMASK, name)]

    attrs += rng("root-priority", V.UINT16) + addr("root-address") + rng("root-cost", V.UINT32)
    attrs += rng("sender-priority", V.UINT16) + addr("sender-address")
    for name in ("port", "age", "max-age", "hello-time", "forward-delay"):
        attrs += rng(name, V.UINT16)
    return tuple(attrs)


_ARP = ETH + (
    _a("hwtype", V.UINT16), _a("protocoltype", V.UINT16),
    _a("opcode", V.UINT16, names=ARP_OPCODES, names_only_decimal=True),
    _a("arpsrcmacaddr", V.MAC), _a("arpdstmacaddr", V.MAC),
    _a("arpsrcipaddr", V.IPV4), _a("arpsrcipmask", V.IPV4MASK, "arpsrcipaddr"),
    _a("arpdstipaddr", V.IPV4), _a("arpdstipmask", V.IPV4MASK, "arpdstipaddr"),
    _a("gratuitous", V.BOOLEAN, variables=False),
)
_IPPROTO = _a("protocol", V.UINT8, names=IP_PROTOCOLS)
_IP4 = _l3_group(V.IPV4, V.IPV4MASK)
_IP6 = _l3_group(V.IPV6, V.IPV6MASK)
_ICMP_TYPE = (_a("type", V.UINT8), _a("code", V.UINT8, "type"))
_ICMPV6_GROUP = ("type", "typeend", "code", "codeend")
# Extension (docs/filter-language-extensions.md): Neighbour Discovery fields ebtables cannot read.
ND_TARGET = "nwf:nd-target"
ND_LLADDR = "nwf:nd-lladdr"
_ND = (_a(ND_TARGET, V.IPV6), _a(ND_LLADDR, V.NDLLADDR, negation=Negation.REFUSED))

_PROTOCOLS: tuple[ProtocolSpec, ...] = (
    ProtocolSpec("mac", Layer.L2, ETH + (
        _a("protocolid", V.UINT16, names=ETHERTYPES, minimum=0x600),)),
    ProtocolSpec("vlan", Layer.L2, ETH + (
        _a("vlanid", V.UINT16, maximum=4095),
        _a("encap-protocol", V.UINT16, names=ETHERTYPES, minimum=0x3C))),
    ProtocolSpec("stp", Layer.L2, _stp()),
    ProtocolSpec("arp", Layer.L2, _ARP),
    ProtocolSpec("rarp", Layer.L2, _ARP),
    ProtocolSpec("ip", Layer.L2, ETH + _ip_group(V.IPV4, V.IPV4MASK) + (_IPPROTO,) + _ports() + (
        _a("dscp", V.UINT8, maximum=63),)),
    ProtocolSpec("ipv6", Layer.L2, ETH + _ip_group(V.IPV6, V.IPV6MASK) + (_IPPROTO,) + _ports() + (
        _a("type", V.UINT8), _a("typeend", V.UINT8, "type"),
        _a("code", V.UINT8, "type"), _a("codeend", V.UINT8, "type")) + _ND),
    ProtocolSpec("tcp", Layer.L3V4, _IP4 + _ports() + (
        _a("option", V.UINT8), _a("flags", V.TCPFLAGS, variables=False))),
    ProtocolSpec("udp", Layer.L3V4, _IP4 + _ports()),
    ProtocolSpec("udplite", Layer.L3V4, _IP4),
    ProtocolSpec("esp", Layer.L3V4, _IP4),
    ProtocolSpec("ah", Layer.L3V4, _IP4),
    ProtocolSpec("sctp", Layer.L3V4, _IP4 + _ports()),
    ProtocolSpec("icmp", Layer.L3V4, _IP4 + _ICMP_TYPE),
    ProtocolSpec("igmp", Layer.L3V4, _IP4),
    ProtocolSpec("all", Layer.L3V4, _IP4),
    ProtocolSpec("tcp-ipv6", Layer.L3V6, _IP6 + _ports() + (_a("option", V.UINT8),)),
    ProtocolSpec("udp-ipv6", Layer.L3V6, _IP6 + _ports()),
    ProtocolSpec("udplite-ipv6", Layer.L3V6, _IP6),
    ProtocolSpec("esp-ipv6", Layer.L3V6, _IP6),
    ProtocolSpec("ah-ipv6", Layer.L3V6, _IP6),
    ProtocolSpec("sctp-ipv6", Layer.L3V6, _IP6 + _ports()),
    ProtocolSpec("icmpv6", Layer.L3V6, _IP6 + _ICMP_TYPE),
    ProtocolSpec("all-ipv6", Layer.L3V6, _IP6),
)
_PROTOCOLS = tuple(ProtocolSpec(p.name, p.layer, p.attrs + (COMMENT,)) for p in _PROTOCOLS)
PROTOCOLS: Mapping[str, ProtocolSpec] = MappingProxyType({p.name: p for p in _PROTOCOLS})
_ATTR_INDEX = {p.name: {a.name: a for a in p.attrs} for p in _PROTOCOLS}
ATTR_ORDER = {p.name: {a.name: i for i, a in enumerate(p.attrs)} for p in _PROTOCOLS}

# Protocols whose ports are allowed on the L2 ip/ipv6 elements: tcp, udp, dccp, sctp.
PORT_PROTOCOLS = frozenset({6, 17, 33, 132})
ICMPV6_GROUP = _ICMPV6_GROUP


# ------------------------------------------------------------------------------------------
# Literal parsing: text -> canonical text. Raises ValueError("what is allowed").


DECIMAL_CAP = 10 ** 30  # beyond every range in the language


def decimal(digits: str) -> int:
    """The value of ``[+-]?[0-9]+`` text of any length; numbers too long to matter (Python
    refuses to convert more than 4300 digits) become +-DECIMAL_CAP, outside every range."""
    sign = -1 if digits.startswith("-") else 1
    body = digits.lstrip("+-").lstrip("0")
    return sign * (int(body) if len(body) <= 30 else DECIMAL_CAP) if body else 0


def _parse_uint(spec: AttrSpec, text: str) -> str:
    raw = text.strip(" \t\n\r")
    if spec.names is not None:
        for name, number in spec.names.items():
            if raw.lower() == name.lower():
                return name
    if spec.vtype is ValueType.UINT16_DEC:
        if not _is_decimal(raw):
            raise ValueError(f"expected a decimal number 0..{spec.upper}")
        value, is_hex = decimal(raw), False
    elif _is_decimal(raw):
        value, is_hex = decimal(raw), False
    else:
        digits = raw[2:] if raw[:2].lower() == "0x" else raw
        if not digits or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise ValueError(_uint_hint(spec))
        value, is_hex = int(digits, 16), True
    if not spec.minimum <= value <= spec.upper:
        raise ValueError(f"out of range: {_range_text(spec)}")
    if spec.names is not None:
        for name, number in spec.names.items():
            if number == value:
                return name
        if spec.names_only_decimal:
            return str(value)
    return f"0x{value:x}" if is_hex else str(value)


def _is_decimal(text: str) -> bool:
    """ASCII decimal digits only (``str.isdigit`` also accepts other scripts and superscripts)."""
    return text.isascii() and text.isdigit()


def _range_text(spec: AttrSpec) -> str:
    lo = f"0x{spec.minimum:x} ({spec.minimum})" if spec.minimum else "0"
    return f"allowed {lo}..{spec.upper}"


def _uint_hint(spec: AttrSpec) -> str:
    hint = f"expected a decimal or hexadecimal number ({_range_text(spec)})"
    if spec.names:
        hint += " or one of " + ", ".join(spec.names)
    return hint


def _parse_mac(text: str) -> str:
    if not _MAC_RE.match(text):
        raise ValueError("expected a MAC address like 52:54:00:12:34:56")
    return ":".join(f"{int(group, 16):02x}" for group in text.split(":"))


def _contiguous(bits: int, width: int) -> int:
    """Prefix length of a contiguous mask, else ValueError."""
    prefix = bin(bits).count("1")
    if bits != ((1 << width) - 1) ^ ((1 << (width - prefix)) - 1):
        raise ValueError("mask must be contiguous (ones followed by zeros)")
    return prefix


def _parse_macmask(text: str) -> str:
    canonical = _parse_mac(text)
    _contiguous(int(canonical.replace(":", ""), 16), 48)
    return canonical


def _parse_ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError("expected an IPv4 address in dotted-quad form like 10.0.0.1") from None


def _parse_ipv6(text: str) -> str:
    if "%" in text:
        raise ValueError("expected an IPv6 address without zone index")
    try:
        packed = ipaddress.IPv6Address(text).packed
    except ValueError:
        raise ValueError("expected an IPv6 address like 2001:db8::1") from None
    return socket.inet_ntop(socket.AF_INET6, packed)


def _parse_mask(text: str, width: int) -> str:
    raw = text.strip(" \t\n\r")
    if _is_decimal(raw):
        if decimal(raw) > width:
            raise ValueError(f"prefix length must be 0..{width}")
        return str(decimal(raw))
    parser = _parse_ipv4 if width == 32 else _parse_ipv6
    try:
        address = ipaddress.ip_address(parser(raw))
    except ValueError:
        raise ValueError(f"expected a prefix length 0..{width} or a netmask") from None
    return str(_contiguous(int(address), width))


def _parse_boolean(text: str) -> str:
    if text in ("true", "yes", "1"):
        return "true"
    if text in ("false", "no", "0"):
        return "false"
    raise ValueError("expected true, yes, 1, false, no or 0")


def _parse_comment(text: str) -> str:
    kept = "".join(c for c in text if c in "\t\n\r" or ord(c) >= 0x20)
    return kept[:COMMENT_MAX]


def _parse_state(text: str) -> str:
    items = [item.strip().upper() for item in text.split(",")]
    if not text.strip() or any(item not in CONNTRACK_STATES + ("NONE",) for item in items):
        raise ValueError("expected a comma-separated list of NEW, ESTABLISHED, RELATED, INVALID or NONE")
    if "NONE" in items:
        return "NONE"
    return ",".join(state for state in CONNTRACK_STATES if state in items)


def tcp_flag_bits(side: str) -> int:
    """Bits of one side of a TCP flags value (names or ALL/NONE, comma-separated)."""
    bits = 0
    for item in (part.strip().upper() for part in side.split(",")):
        if item in ("", "NONE"):
            continue
        if item == "ALL":
            bits |= TCP_FLAGS_ALL
        elif item in TCP_FLAG_BITS:
            bits |= TCP_FLAG_BITS[item]
        else:
            raise ValueError("expected MASK/FLAGS, each a comma list of SYN, ACK, URG, PSH, FIN, RST, ALL or NONE")
    return bits


def _format_tcp_flags(bits: int) -> str:
    if bits == 0:
        return "NONE"
    if bits == TCP_FLAGS_ALL:
        return "ALL"
    return ",".join(name for name, bit in TCP_FLAG_BITS.items() if bits & bit)


def _parse_tcpflags(text: str) -> str:
    if text.count("/") != 1:
        raise ValueError("expected MASK/FLAGS, e.g. SYN,ACK/SYN")
    mask, flags = text.split("/")
    return f"{_format_tcp_flags(tcp_flag_bits(mask))}/{_format_tcp_flags(tcp_flag_bits(flags))}"


def _parse_ipsetname(text: str) -> str:
    if not _IPSET_RE.match(text):
        raise ValueError("expected 1..31 characters from A-Z a-z 0-9 _ . : + - and space")
    return text


def _parse_ndlladdr(text: str) -> str:
    if text.lower() == "none":
        return "none"
    try:
        return _parse_mac(text)
    except ValueError:
        raise ValueError("expected a MAC address like 52:54:00:12:34:56 or 'none'") from None


def _parse_ipsetflags(text: str) -> str:
    items = [item.strip().lower() for item in text.split(",")]
    if not 1 <= len(items) <= 6 or any(item not in ("src", "dst") for item in items):
        raise ValueError("expected 1..6 comma-separated items, each src or dst")
    return ",".join(items)


_PARSERS = {
    V.MAC: _parse_mac, V.MACMASK: _parse_macmask, V.IPV4: _parse_ipv4, V.IPV6: _parse_ipv6,
    V.IPV4MASK: lambda t: _parse_mask(t, 32), V.IPV6MASK: lambda t: _parse_mask(t, 128),
    V.BOOLEAN: _parse_boolean, V.COMMENT: _parse_comment, V.STATE: _parse_state,
    V.TCPFLAGS: _parse_tcpflags, V.IPSETNAME: _parse_ipsetname, V.IPSETFLAGS: _parse_ipsetflags,
    V.NDLLADDR: _parse_ndlladdr,
}


def parse_literal(spec: AttrSpec, text: str) -> str:
    """Check a literal value of ``spec`` and return its canonical text (ValueError if bad)."""
    if spec.vtype in _UINT_MAX:
        return _parse_uint(spec, text)
    return _parse_typed(spec.vtype, text)


@lru_cache(maxsize=1 << 12)
def _parse_typed(vtype: ValueType, text: str) -> str:
    """A value's canonical text by type (a port's MAC and addresses fill several rules)."""
    return _PARSERS[vtype](text)


# ------------------------------------------------------------------------------------------
# Decoding canonical text into typed values for the compiler and backends.


def decode_uint(spec: AttrSpec, canonical: str) -> int:
    """Number of a canonical numeric value (names mapped)."""
    if spec.names is not None and canonical in spec.names:
        return spec.names[canonical]
    return int(canonical, 16) if canonical.startswith("0x") else int(canonical)


def mask_prefix(canonical: str) -> int:
    """Prefix length of a canonical MAC mask."""
    return bin(int(canonical.replace(":", ""), 16)).count("1")

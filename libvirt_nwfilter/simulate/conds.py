"""IR conditions -> predicates over :class:`~.packet.Packet` (pure).

Each condition means what the kernel makes of its rendering on both backends (semantics.md §6,
§7 and the backends' docstrings), including where the tools agree on something surprising:

* a field the packet does not have never matches, negated or not (ebtables' ``arp``, ``ip``,
  ``ip6``, ``vlan`` and ``stp`` matches return "no match" before looking at the inversion;
  nftables' payload expressions carry the same protocol dependency);
* ARP sender/target addresses are read only from Ethernet/IPv4 ARP (``hwtype`` 1 for MACs,
  ``protocoltype`` 0x0800 for IPs);
* IPv4 ICMP type 255 means "any type" (iptables), and its negation never matches;
* ``ct direction`` needs a tracked connection; a packet the tracker rejected is ``INVALID``,
  one it does not track (IPv6 neighbour discovery, MLD) matches no state at all;
* Neighbour Discovery fields (our extension) exist only in ICMPv6 Neighbour Solicitations and
  Advertisements, which the packet language builds without extension headers; the options test
  compares the whole option area (none, or the one link-layer option of the message's kind);
* STP fields are read where ebtables' ``stp`` match reads them: its 6-byte header check covers
  the LLC header, the protocol id and the *version*, so what it calls the type is the version
  byte and every configuration field is read one byte later than the BPDU has it (only the
  ebiptables backend renders STP fields; the nftables backend refuses them).
"""

from __future__ import annotations

import ipaddress
from typing import Callable

from ..ir import Cond, Field, IcmpType, Icmpv6Range, IpNet, IpRange, MacMatch, NdLinkLayer, NumRange, TcpFlags
from .frames import bpdu
from .packet import Packet

Predicate = Callable[[Packet], bool]


def never(p: Packet) -> bool:
    """A condition no packet meets (a backend may leave its rule out of the kernel)."""
    return False


class Unsupported(Exception):
    """A condition whose outcome simulate cannot know (a kernel ipset's members)."""


def _mask(bits: int, prefix: int) -> int:
    return ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)


def _mac_value(value: MacMatch | str) -> tuple[int, int]:
    if isinstance(value, str):
        value = MacMatch(value)
    mask = _mask(48, value.prefix)
    return int(value.mac.replace(":", ""), 16) & mask, mask


_FULL_MAC = (1 << 48) - 1


def _negatable(test: Predicate, negated: bool) -> Predicate:
    return (lambda p: not test(p)) if negated else test


def _guarded(present: Predicate, test: Predicate, negated: bool) -> Predicate:
    """``test`` (inverted when negated) on packets that have the field; never elsewhere."""
    if negated:
        return lambda p: present(p) and not test(p)
    return lambda p: present(p) and test(p)


def _mac_cond(attr: str, value, negated: bool) -> Predicate:
    wanted, mask = _mac_value(value)
    if attr == "src_mac":
        test = (lambda p: p.src_mac == wanted) if mask == _FULL_MAC else (lambda p: p.src_mac & mask == wanted)
    else:
        test = (lambda p: p.dst_mac == wanted) if mask == _FULL_MAC else (lambda p: p.dst_mac & mask == wanted)
    return _negatable(test, negated)


def _net(value: IpNet) -> tuple[int, int, int]:
    network = ipaddress.ip_network(f"{value.address}/{value.prefix}", strict=False)
    return value.family, int(network.network_address), int(network.netmask)


def _ip_cond(attr: str, value: IpNet, negated: bool) -> Predicate:
    """The hottest condition: one lambda per (field, negation), no nested calls."""
    family, wanted, mask = _net(value)
    if attr == "ip_src":
        if negated:
            return lambda p: p.family == family and p.ip_src & mask != wanted
        return lambda p: p.family == family and p.ip_src & mask == wanted
    if negated:
        return lambda p: p.family == family and p.ip_dst & mask != wanted
    return lambda p: p.family == family and p.ip_dst & mask == wanted


def _range_cond(attr: str, value: IpRange, negated: bool) -> Predicate:
    low, high = int(ipaddress.ip_address(value.first)), int(ipaddress.ip_address(value.last))
    family = value.family
    return _guarded(lambda p: p.family == family, lambda p: low <= getattr(p, attr) <= high, negated)


def _port_cond(attr: str, value: NumRange, negated: bool) -> Predicate:
    low, high = value.low, value.high
    return _guarded(lambda p: getattr(p, attr) is not None, lambda p: low <= getattr(p, attr) <= high, negated)


def _arp_cond(attr: str, value, negated: bool) -> Predicate:
    return _guarded(lambda p: p.arp_opcode is not None, lambda p: getattr(p, attr) == value, negated)


def _arp_mac_cond(attr: str, value, negated: bool) -> Predicate:
    wanted, mask = _mac_value(value)
    return _guarded(lambda p: p.arp_opcode is not None and p.arp_htype == 1,
                    lambda p: (getattr(p, attr) & mask) == wanted, negated)


def _arp_ip_cond(attr: str, value: IpNet, negated: bool) -> Predicate:
    _, wanted, mask = _net(value)
    return _guarded(lambda p: p.arp_opcode is not None and p.arp_ptype == 0x0800,
                    lambda p: (getattr(p, attr) & mask) == wanted, negated)


def _icmp_cond(value: IcmpType, negated: bool, family: int) -> Predicate:
    kind = value.type
    codes = (0, 255) if value.code is None else (value.code, value.code)
    if family == 4 and kind == 255:
        return never if negated else (lambda p: p.icmp_type is not None)
    return _guarded(lambda p: p.icmp_type is not None,
                    lambda p: p.icmp_type == kind and codes[0] <= p.icmp_code <= codes[1], negated)


def _icmpv6_range_cond(value: Icmpv6Range, negated: bool) -> Predicate:
    v = value
    return _guarded(lambda p: p.icmp_type is not None and p.family == 6,
                    lambda p: v.type_low <= p.icmp_type <= v.type_high and v.code_low <= p.icmp_code <= v.code_high,
                    negated)


def _nd_lladdr_cond(value: NdLinkLayer) -> Predicate:
    """The option area of an NS/NA is exactly ``value`` (docs/filter-language-extensions.md):
    packets here never carry extension headers or other options, so the layout is the option."""
    wanted = None if value.mac is None else int(value.mac.replace(":", ""), 16)
    kind = _ND_OPTION.get(value.option)
    return lambda p: p.nd_target is not None and p.nd_lladdr == wanted and (wanted is None or p.icmp_type == kind)


_ND_OPTION = {1: 135, 2: 136}  # link-layer option type -> the message that carries it


def _stp_raw(p: Packet) -> bytes | None:
    """The bytes ebtables' stp match reads: the LLC header and what follows (None: not STP)."""
    return bpdu(p) if p.stp is not None else None


# ebtables' view (see the module docstring): (offset in the bytes after the 802.3 header, length)
_STP_OFFSETS = {
    Field.STP_TYPE: (5, 1), Field.STP_FLAGS: (6, 1), Field.STP_ROOT_PRIO: (7, 2),
    Field.STP_ROOT_ADDR: (9, 6), Field.STP_ROOT_COST: (15, 4), Field.STP_SENDER_PRIO: (19, 2),
    Field.STP_SENDER_ADDR: (21, 6), Field.STP_PORT: (27, 2), Field.STP_MSG_AGE: (29, 2),
    Field.STP_MAX_AGE: (31, 2), Field.STP_HELLO_TIME: (33, 2), Field.STP_FORWARD_DELAY: (35, 2),
}
_STP_HEADER = b"\x42\x42\x03\x00\x00\x00"


def _stp_cond(field: Field, value, negated: bool) -> Predicate:
    offset, length = _STP_OFFSETS[field]

    def read(p: Packet) -> int | None:
        data = _stp_raw(p)
        if data is None or len(data) < offset + length or not data.startswith(_STP_HEADER):
            return None
        return int.from_bytes(data[offset:offset + length], "big")

    if isinstance(value, MacMatch):
        wanted, mask = _mac_value(value)
        test = lambda p: (read(p) & mask) == wanted  # noqa: E731
    elif isinstance(value, NumRange):
        test = lambda p: value.low <= read(p) <= value.high  # noqa: E731
    else:
        test = lambda p: read(p) == value  # noqa: E731
    return _guarded(lambda p: read(p) is not None, test, negated)


def _tcp_option_cond(kind: int, negated: bool) -> Predicate:
    return _guarded(lambda p: p.ip_proto == 6 and p.sport is not None,
                    lambda p: kind in p.tcp_options, negated)


def _tcp_flags_cond(value: TcpFlags, negated: bool) -> Predicate:
    mask, flags = value.mask, value.flags
    return _guarded(lambda p: p.ip_proto == 6 and p.sport is not None,
                    lambda p: (p.tcp_flags & mask) == flags, negated)


def compile_cond(cond: Cond, family: int | None = None,
                 connlimit: Callable[[Packet, int], int] | None = None) -> Predicate:
    """A predicate for ``cond``. ``family``: the L3 rule's family (None at L2). ``connlimit``
    counts the connections of a packet's source for this rule (stateful: called once per test)."""
    f, v, neg = cond.field, cond.value, cond.negated
    if f is Field.ETHER_TYPE:
        return (lambda p: p.ethertype != v) if neg else (lambda p: p.ethertype == v)
    if f is Field.IP_PROTO:
        return _guarded(lambda p: p.family is not None, lambda p: p.ip_proto == v, neg)
    if f is Field.DSCP:
        return _guarded(lambda p: p.family is not None, lambda p: p.dscp == v, neg)
    if f in (Field.ETHER_SRC, Field.SRC_MAC):
        return _mac_cond("src_mac", v, neg)
    if f is Field.ETHER_DST:
        return _mac_cond("dst_mac", v, neg)
    if f is Field.VLAN_ID:
        return _guarded(lambda p: p.vlan_id is not None, lambda p: p.vlan_id == v, neg)
    if f is Field.VLAN_ENCAP:
        return _guarded(lambda p: p.vlan_id is not None, lambda p: p.vlan_encap == v, neg)
    if f in _STP_OFFSETS:
        return _stp_cond(f, v, neg)
    if f in (Field.ARP_HTYPE, Field.ARP_PTYPE, Field.ARP_OPCODE):
        attr = {Field.ARP_HTYPE: "arp_htype", Field.ARP_PTYPE: "arp_ptype", Field.ARP_OPCODE: "arp_opcode"}[f]
        return _arp_cond(attr, v, neg)
    if f in (Field.ARP_SHA, Field.ARP_THA):
        return _arp_mac_cond("arp_sha" if f is Field.ARP_SHA else "arp_tha", v, neg)
    if f in (Field.ARP_SPA, Field.ARP_TPA):
        return _arp_ip_cond("arp_spa" if f is Field.ARP_SPA else "arp_tpa", v, neg)
    if f is Field.ARP_GRATUITOUS:
        return _guarded(lambda p: p.arp_opcode is not None and p.arp_ptype == 0x0800,
                        lambda p: p.arp_spa == p.arp_tpa, neg)
    if f in (Field.IP_SRC, Field.IP_DST):
        return _ip_cond("ip_src" if f is Field.IP_SRC else "ip_dst", v, neg)
    if f in (Field.IP_SRC_RANGE, Field.IP_DST_RANGE):
        return _range_cond("ip_src" if f is Field.IP_SRC_RANGE else "ip_dst", v, neg)
    if f in (Field.SPORT, Field.DPORT):
        return _port_cond("sport" if f is Field.SPORT else "dport", v, neg)
    if f is Field.ICMPV6_TYPE_CODE:
        return _icmpv6_range_cond(v, neg)
    if f is Field.ICMP_TYPE:
        return _icmp_cond(v, neg, family or 4)
    if f is Field.ND_TARGET:
        wanted = int(ipaddress.IPv6Address(v))
        return _guarded(lambda p: p.nd_target is not None, lambda p: p.nd_target == wanted, neg)
    if f is Field.ND_LLADDR:
        if neg:
            raise Unsupported("a negated nwf:nd-lladdr (no backend renders it)")
        return _nd_lladdr_cond(v)
    if f is Field.TCP_FLAGS:
        return _tcp_flags_cond(v, neg)
    if f is Field.TCP_OPTION:
        return _tcp_option_cond(v, neg)
    if f is Field.CT_STATE:
        states = frozenset(v)
        return lambda p: p.ct_state in states
    if f is Field.CT_DIRECTION:
        return lambda p: p.ct_dir == v
    if f is Field.CONNLIMIT_ABOVE:
        if connlimit is None:
            raise Unsupported("connlimit-above outside an L3 rule")
        return lambda p: (connlimit(p, v) > v) != neg
    if f is Field.IPSET:
        raise Unsupported(f"the rule matches kernel ipset '{v.name}', whose members simulate cannot know")
    raise Unsupported(f"condition {f.value}")

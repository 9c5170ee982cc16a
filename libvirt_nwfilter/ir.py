"""Backend-neutral ruleset of one port, produced by ``compile.py`` and rendered by backends.

The layout mirrors libvirt's (semantics.md §1, §3, §7):

* L2, per side: a root chain (rules and jumps, already interleaved by priority) and sub-chains.
  ``Side.FROM_VM`` is libvirt's ``libvirt-I-<port>`` (frames the VM sends), ``Side.TO_VM`` is
  ``libvirt-O-<port>``.
* L3: three copies, ``fi`` (forwarded from the VM), ``fo`` (forwarded to the VM) and ``hi`` (from
  the VM to the host), each an ordered list of IPv4 and IPv6 rules.

Every condition is already oriented for the copy it sits in (reversal is done), every value is
typed and validated, and verdicts are per layer (``accept`` at L3 from-VM is ``RETURN``,
``reject`` at L2 is ``DROP``). A backend only translates.

Rules carry their ``source`` (the :class:`~libvirt_nwfilter.resolve.RuleInstance` they were
compiled from: filter, chain, rule priority, the concrete rule) for ``simulate`` to name them.
It is left out of ``repr`` and of comparisons, so rendering, equality and the ruleset hash
(``service.ruleset_hash``) do not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence, Union

from .model import FastHashEnum

if TYPE_CHECKING:
    from .resolve import RuleInstance


class Side(FastHashEnum):
    FROM_VM = "from-vm"
    TO_VM = "to-vm"


class Verdict(FastHashEnum):
    ACCEPT = "accept"
    DROP = "drop"
    REJECT = "reject"
    RETURN = "return"
    CONTINUE = "continue"  # no verdict: go on with the next rule


class Field(FastHashEnum):
    """What a condition tests. The comment gives the type of ``Cond.value``."""

    # Ethernet (L2 elements; the first two also appear as implicit jump/protocol conditions)
    ETHER_SRC = "ether-src"  # MacMatch
    ETHER_DST = "ether-dst"  # MacMatch
    ETHER_TYPE = "ether-type"  # int
    VLAN_ID = "vlan-id"  # int
    VLAN_ENCAP = "vlan-encap"  # int (ethertype inside the tag)
    # STP BPDU fields (frame also matched by ETHER_DST 01:80:c2:00:00:00)
    STP_TYPE = "stp-type"  # int
    STP_FLAGS = "stp-flags"  # int
    STP_ROOT_PRIO = "stp-root-prio"  # NumRange
    STP_ROOT_ADDR = "stp-root-addr"  # MacMatch
    STP_ROOT_COST = "stp-root-cost"  # NumRange
    STP_SENDER_PRIO = "stp-sender-prio"  # NumRange
    STP_SENDER_ADDR = "stp-sender-addr"  # MacMatch
    STP_PORT = "stp-port"  # NumRange
    STP_MSG_AGE = "stp-msg-age"  # NumRange
    STP_MAX_AGE = "stp-max-age"  # NumRange
    STP_HELLO_TIME = "stp-hello-time"  # NumRange
    STP_FORWARD_DELAY = "stp-forward-delay"  # NumRange
    # ARP / RARP payload
    ARP_HTYPE = "arp-htype"  # int
    ARP_PTYPE = "arp-ptype"  # int
    ARP_OPCODE = "arp-opcode"  # int
    ARP_SHA = "arp-sha"  # str (MAC, sender hardware address)
    ARP_THA = "arp-tha"  # str (MAC, target hardware address)
    ARP_SPA = "arp-spa"  # IpNet (family 4; sender protocol address)
    ARP_TPA = "arp-tpa"  # IpNet (family 4; target protocol address)
    ARP_GRATUITOUS = "arp-gratuitous"  # True (only ever present when gratuitous='true')
    # IP header (L2 ip/ipv6 and every L3 element)
    IP_SRC = "ip-src"  # IpNet
    IP_DST = "ip-dst"  # IpNet
    IP_SRC_RANGE = "ip-src-range"  # IpRange (L3 only)
    IP_DST_RANGE = "ip-dst-range"  # IpRange (L3 only)
    IP_PROTO = "ip-proto"  # int (L2 ip/ipv6 'protocol'; for ipv6 the upper-layer protocol)
    DSCP = "dscp"  # int 0..63 (the 6-bit DSCP field)
    SPORT = "sport"  # NumRange
    DPORT = "dport"  # NumRange
    ICMPV6_TYPE_CODE = "icmpv6-type-code"  # Icmpv6Range (L2 ipv6 element)
    # Neighbour Discovery (L2 ipv6 element; our extension, docs/filter-language-extensions.md)
    ND_TARGET = "nd-target"  # str (IPv6 address): bytes 8..23 of the ICMPv6 message
    ND_LLADDR = "nd-lladdr"  # NdLinkLayer; never negated
    # L3 only
    SRC_MAC = "src-mac"  # str (MAC)
    ICMP_TYPE = "icmp-type"  # IcmpType (icmp / icmpv6 elements; family from the rule)
    TCP_FLAGS = "tcp-flags"  # TcpFlags
    TCP_OPTION = "tcp-option"  # int
    CT_STATE = "ct-state"  # tuple[str, ...] of NEW/ESTABLISHED/RELATED/INVALID; never negated
    CT_DIRECTION = "ct-direction"  # "original" | "reply"; never negated
    CONNLIMIT_ABOVE = "connlimit-above"  # int
    IPSET = "ipset"  # IpSet; never negated


@dataclass(frozen=True)
class MacMatch:
    mac: str  # lower-case aa:bb:cc:dd:ee:ff
    prefix: int = 48  # mask length; 48 = exact


@dataclass(frozen=True)
class IpNet:
    address: str  # canonical text
    prefix: int  # 32 / 128 = host
    family: int  # 4 or 6


@dataclass(frozen=True)
class IpRange:
    first: str
    last: str  # == first when no end was given
    family: int


@dataclass(frozen=True)
class NumRange:
    low: int
    high: int  # == low for a single value


@dataclass(frozen=True)
class Icmpv6Range:
    type_low: int
    type_high: int
    code_low: int
    code_high: int


@dataclass(frozen=True)
class NdLinkLayer:
    """The options of a Neighbour Solicitation/Advertisement sent straight over IPv6 (next
    header 58): ``mac`` None = no option at all (ICMPv6 length 24); otherwise exactly one
    option, of type ``option`` (1 source, 2 target link-layer address), length 1, holding
    ``mac`` (ICMPv6 length 32)."""

    option: int
    mac: str | None  # lower-case aa:bb:cc:dd:ee:ff


@dataclass(frozen=True)
class IcmpType:
    type: int
    code: int | None = None


@dataclass(frozen=True)
class TcpFlags:
    mask: int  # bits: FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, URG 0x20
    flags: int


@dataclass(frozen=True)
class IpSet:
    name: str
    flags: tuple[str, ...]  # each "src" or "dst", already swapped on reversed copies


@dataclass(frozen=True)
class Cond:
    field: Field
    value: object
    negated: bool = False


@dataclass(frozen=True)
class L2Rule:
    conds: tuple[Cond, ...]
    verdict: Verdict  # never REJECT (reject is DROP at L2)
    origin: str  # "filter 'x' rule 3": for messages and comments
    source: RuleInstance | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Jump:
    """A jump from a root chain into a sub-chain, taken when ``conds`` match."""

    chain: str  # the chain name, e.g. "arp-ip"
    conds: tuple[Cond, ...]


@dataclass(frozen=True)
class SubChain:
    """An L2 sub-chain. A frame that falls off its end is ACCEPTED for this hook, as in libvirt,
    whose ebtables chains have policy ACCEPT (semantics.md §4 says RETURN; libvirt 9.0.0 was
    observed to accept, see tests/ORACLE.md)."""

    name: str
    priority: int
    rules: tuple[L2Rule, ...]


@dataclass(frozen=True)
class L2Side:
    root: tuple[Union[L2Rule, Jump], ...] = ()
    subchains: tuple[SubChain, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.root


# The L3 element names as protocols (the -ipv6 suffix dropped; icmpv6 stays icmpv6).
L3_PROTOCOLS = ("tcp", "udp", "udplite", "esp", "ah", "sctp", "icmp", "igmp", "all", "icmpv6")


@dataclass(frozen=True)
class L3Rule:
    family: int  # 4 or 6
    protocol: str  # one of L3_PROTOCOLS ("all" = any protocol of the family)
    conds: tuple[Cond, ...]
    verdict: Verdict
    origin: str
    comment: str | None = None
    source: RuleInstance | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class PortRuleset:
    from_vm: L2Side = L2Side()
    to_vm: L2Side = L2Side()
    fi: tuple[L3Rule, ...] = ()
    fo: tuple[L3Rule, ...] = ()
    hi: tuple[L3Rule, ...] = ()

    def l2(self, side: Side) -> L2Side:
        return self.from_vm if side is Side.FROM_VM else self.to_vm

    def l3_families(self) -> frozenset[int]:
        return frozenset(rule.family for rule in self.fi + self.fo + self.hi)


def ruleset_text(ruleset: PortRuleset) -> str:
    """``repr(ruleset)``, made from cached representations of its rules (a filter tree shared by
    many ports repeats most of them): the text a ruleset's fingerprint is computed from."""
    return (f"PortRuleset(from_vm={_side_text(ruleset.from_vm)}, to_vm={_side_text(ruleset.to_vm)}, "
            f"fi={_tuple_text(ruleset.fi)}, fo={_tuple_text(ruleset.fo)}, hi={_tuple_text(ruleset.hi)})")


def _side_text(side: L2Side) -> str:
    subchains = [f"SubChain(name={sub.name!r}, priority={sub.priority!r}, rules={_tuple_text(sub.rules)})"
                 for sub in side.subchains]
    return f"L2Side(root={_tuple_text(side.root)}, subchains={_joined(subchains)})"


def _tuple_text(items: Sequence[object]) -> str:
    return _joined([_rule_text(item) for item in items])


def _joined(parts: list[str]) -> str:
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


_rule_text = lru_cache(maxsize=1 << 16)(repr)

"""Hand-built PortRulesets for the ebiptables golden files and kernel tests.

Each builder returns a :class:`PortRuleset` as the compiler would produce it (conditions already
oriented, implicit protocol conditions present, verdicts per layer). ``CASES`` lists the golden cases: a
file name, a port and a builder each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from libvirt_nwfilter.ir import Field, Icmpv6Range, IcmpType, IpRange, IpSet, Jump, L2Side, MacMatch, NumRange
from libvirt_nwfilter.ir import PortRuleset, SubChain, TcpFlags, Verdict
from ir_builders import c, l2, l3  # noqa: E402  (tests/ is on the path)
from ir_builders import ethertype as etype  # noqa: E402
from ir_builders import net4 as ip4  # noqa: E402
from ir_builders import net6 as ip6  # noqa: E402

F = Field
V = Verdict
BCAST = "ff:ff:ff:ff:ff:ff"
STP_DEST = MacMatch("01:80:c2:00:00:00")


# ---------------------------------------------------------------------------------------------
# clean-traffic (semantics.md §3.1) for one MAC and a list of IPv4 addresses


def clean_traffic(mac: str = "52:54:00:12:34:56", ips: tuple[str, ...] = ("10.0.0.5",)) -> PortRuleset:
    rarp_match = (
        c(F.ETHER_DST, MacMatch(BCAST)),
        etype(0x8035),
        c(F.ARP_OPCODE, 3),
        c(F.ARP_SHA, mac),
        c(F.ARP_THA, mac),
        c(F.ARP_SPA, ip4("0.0.0.0")),
        c(F.ARP_TPA, ip4("0.0.0.0")),
    )
    from_vm = L2Side(
        root=(
            Jump("mac", ()),
            Jump("ipv4-ip", (etype(0x0800),)),
            l2(V.ACCEPT, etype(0x0800)),
            Jump("arp-mac", (etype(0x0806),)),
            Jump("arp-ip", (etype(0x0806),)),
            l2(V.ACCEPT, etype(0x0806)),
            Jump("rarp", (etype(0x8035),)),
            l2(V.ACCEPT, etype(0x0835)),
            l2(V.DROP),
        ),
        subchains=(
            SubChain("mac", -800, (l2(V.RETURN, c(F.ETHER_SRC, MacMatch(mac))), l2(V.DROP))),
            SubChain(
                "ipv4-ip",
                -710,
                (
                    l2(V.RETURN, etype(0x0800), c(F.IP_SRC, ip4("0.0.0.0")), c(F.IP_PROTO, 17)),
                    *(l2(V.RETURN, etype(0x0800), c(F.IP_SRC, ip4(a))) for a in ips),
                    l2(V.DROP),
                ),
            ),
            SubChain("arp-mac", -520, (l2(V.RETURN, etype(0x0806), c(F.ARP_SHA, mac)), l2(V.DROP))),
            SubChain(
                "arp-ip",
                -510,
                (*(l2(V.RETURN, etype(0x0806), c(F.ARP_SPA, ip4(a))) for a in ips), l2(V.DROP)),
            ),
            SubChain("rarp", -400, (l2(V.ACCEPT, c(F.ETHER_SRC, MacMatch(mac)), *rarp_match), l2(V.DROP))),
        ),
    )
    to_vm = L2Side(
        root=(
            Jump("ipv4", (etype(0x0800),)),
            l2(V.ACCEPT, etype(0x0806)),
            Jump("rarp", (etype(0x8035),)),
            l2(V.DROP),
        ),
        subchains=(
            SubChain("ipv4", -700, (l2(V.ACCEPT, etype(0x0800)),)),
            SubChain("rarp", -400, (l2(V.ACCEPT, *rarp_match), l2(V.DROP))),
        ),
    )
    return PortRuleset(from_vm=from_vm, to_vm=to_vm)


# ---------------------------------------------------------------------------------------------
# semantics.md §6.9 (L3 only), with our dport negation fix


def l3_example() -> PortRuleset:
    est_reply = (c(F.CT_STATE, ("ESTABLISHED",)), c(F.CT_DIRECTION, "reply"))
    new_orig = (c(F.CT_STATE, ("NEW", "ESTABLISHED")), c(F.CT_DIRECTION, "original"))
    fi = (
        l3(4, "tcp", V.RETURN, c(F.SPORT, NumRange(22, 22)), *est_reply),
        l3(4, "icmp", V.RETURN, c(F.ICMP_TYPE, IcmpType(8)), c(F.CT_STATE, ("NEW", "ESTABLISHED"))),
        l3(4, "udp", V.RETURN, c(F.IP_SRC, ip4("10.1.0.2")), c(F.DPORT, NumRange(53, 53)), *new_orig),
        l3(4, "udp", V.RETURN, c(F.IP_SRC, ip4("10.1.0.3")), c(F.DPORT, NumRange(123, 123)), *new_orig),
        l3(4, "all", V.DROP),
        l3(6, "tcp", V.RETURN, c(F.DPORT, NumRange(80, 80), negated=True), *new_orig),
    )
    fo = (
        l3(4, "tcp", V.ACCEPT, c(F.DPORT, NumRange(22, 22)), *new_orig),
        l3(4, "all", V.ACCEPT, c(F.CT_STATE, ("NEW",)), comment="st new"),
        l3(4, "udp", V.ACCEPT, c(F.IP_DST, ip4("10.1.0.2")), c(F.SPORT, NumRange(53, 53)), *est_reply),
        l3(4, "udp", V.ACCEPT, c(F.IP_DST, ip4("10.1.0.3")), c(F.SPORT, NumRange(123, 123)), *est_reply),
        l3(4, "all", V.DROP),
        l3(6, "tcp", V.ACCEPT, c(F.SPORT, NumRange(80, 80), negated=True), *est_reply),
    )
    return PortRuleset(fi=fi, fo=fo, hi=fi)


# ---------------------------------------------------------------------------------------------
# One rule per L2 field (from-VM root chain), negated and plain


def l2_fields() -> PortRuleset:
    mac = "52:54:00:aa:bb:cc"
    root = (
        l2(V.DROP, c(F.ETHER_SRC, MacMatch(mac), negated=True)),
        l2(V.CONTINUE, c(F.ETHER_SRC, MacMatch("52:54:00:00:00:00", 24)),
           c(F.ETHER_DST, MacMatch("01:00:5e:00:00:00", 25), negated=True)),
        l2(V.ACCEPT, etype(0x0806)),
        l2(V.ACCEPT, c(F.ETHER_TYPE, 0x0600, negated=True)),
        l2(V.ACCEPT, etype(0x8100), c(F.VLAN_ID, 10, negated=True), c(F.VLAN_ENCAP, 0x0806)),
        l2(
            V.DROP,
            c(F.ETHER_DST, STP_DEST),
            c(F.STP_TYPE, 0),
            c(F.STP_FLAGS, 1, negated=True),
            c(F.STP_ROOT_PRIO, NumRange(1, 2)),
            c(F.STP_ROOT_ADDR, MacMatch("52:54:00:00:00:01", 40)),
            c(F.STP_ROOT_COST, NumRange(3, 4), negated=True),
            c(F.STP_SENDER_PRIO, NumRange(5, 5)),
            c(F.STP_SENDER_ADDR, MacMatch("52:54:00:00:00:02")),
            c(F.STP_PORT, NumRange(6, 7)),
            c(F.STP_MSG_AGE, NumRange(8, 8)),
            c(F.STP_MAX_AGE, NumRange(9, 9)),
            c(F.STP_HELLO_TIME, NumRange(10, 10)),
            c(F.STP_FORWARD_DELAY, NumRange(11, 15)),
        ),
        l2(
            V.RETURN,
            etype(0x0806),
            c(F.ARP_HTYPE, 1),
            c(F.ARP_OPCODE, 1, negated=True),
            c(F.ARP_PTYPE, 0x0800),
            c(F.ARP_SPA, ip4("10.0.0.1")),
            c(F.ARP_TPA, ip4("10.0.0.0", 24), negated=True),
            c(F.ARP_SHA, mac),
            c(F.ARP_THA, BCAST, negated=True),
            c(F.ARP_GRATUITOUS, True),
        ),
        l2(V.DROP, etype(0x8035), c(F.ARP_OPCODE, 3), c(F.ARP_GRATUITOUS, True, negated=True)),
        l2(
            V.ACCEPT,
            etype(0x0800),
            c(F.IP_SRC, ip4("10.0.0.1")),
            c(F.IP_DST, ip4("10.0.0.0", 8), negated=True),
            c(F.IP_PROTO, 6),
            c(F.SPORT, NumRange(10, 20)),
            c(F.DPORT, NumRange(22, 22), negated=True),
            c(F.DSCP, 46),
        ),
        l2(V.ACCEPT, etype(0x0800), c(F.DSCP, 3, negated=True)),
        l2(
            V.ACCEPT,
            etype(0x86DD),
            c(F.IP_SRC, ip6("fe80::", 10)),
            c(F.IP_DST, ip6("ff02::1:2"), negated=True),
            c(F.IP_PROTO, 58),
            c(F.ICMPV6_TYPE_CODE, Icmpv6Range(1, 2, 0, 255)),
        ),
        l2(V.ACCEPT, etype(0x86DD), c(F.IP_PROTO, 17), c(F.SPORT, NumRange(546, 546)), c(F.DPORT, NumRange(547, 547))),
        l2(V.DROP, etype(0x86DD), c(F.IP_PROTO, 58), c(F.ICMPV6_TYPE_CODE, Icmpv6Range(128, 128, 0, 0), negated=True)),
        l2(V.DROP),
    )
    return PortRuleset(from_vm=L2Side(root=root))


# ---------------------------------------------------------------------------------------------
# One rule per L3 field


def l3_fields() -> PortRuleset:
    rules = (
        l3(4, "tcp", V.RETURN, c(F.SRC_MAC, "52:54:00:00:00:01", negated=True),
           c(F.IP_SRC, ip4("10.0.0.0", 24)), c(F.IP_DST, ip4("10.0.1.1"), negated=True),
           c(F.DSCP, 10), c(F.TCP_FLAGS, TcpFlags(0x12, 0x02), negated=True),
           c(F.SPORT, NumRange(1024, 65535)), c(F.DPORT, NumRange(22, 22)),
           c(F.TCP_OPTION, 5, negated=True), c(F.CT_STATE, ("NEW", "ESTABLISHED")),
           c(F.CT_DIRECTION, "original")),
        l3(4, "tcp", V.DROP, c(F.TCP_FLAGS, TcpFlags(0x3F, 0x00))),
        l3(4, "tcp", V.DROP, c(F.TCP_FLAGS, TcpFlags(0x3F, 0x3F))),
        l3(4, "udp", V.REJECT, c(F.IP_SRC_RANGE, IpRange("10.0.0.1", "10.0.0.9", 4)),
           c(F.IP_DST_RANGE, IpRange("10.0.1.1", "10.0.1.1", 4), negated=True),
           c(F.SPORT, NumRange(53, 53), negated=True)),
        l3(4, "sctp", V.DROP, c(F.DPORT, NumRange(5000, 5010))),
        l3(4, "udplite", V.DROP),
        l3(4, "esp", V.DROP),
        l3(4, "ah", V.DROP),
        l3(4, "igmp", V.DROP),
        l3(4, "icmp", V.RETURN, c(F.ICMP_TYPE, IcmpType(8, 0)), c(F.CT_STATE, ("NEW", "ESTABLISHED"))),
        l3(4, "icmp", V.DROP, c(F.ICMP_TYPE, IcmpType(13), negated=True)),
        l3(4, "all", V.ACCEPT, c(F.IPSET, IpSet("trusted", ("src", "dst"))),
           c(F.CONNLIMIT_ABOVE, 10, negated=True)),
        l3(4, "all", V.CONTINUE, c(F.CONNLIMIT_ABOVE, 5), comment="count: \"many\" \\ conns\n"),
        l3(4, "all", V.DROP, c(F.IPSET, IpSet("my set", ("dst",)))),
        l3(6, "tcp", V.RETURN, c(F.SRC_MAC, "52:54:00:00:00:01"),
           c(F.IP_SRC, ip6("fd00::", 64)), c(F.IP_DST_RANGE, IpRange("fd00::1", "fd00::9", 6)),
           c(F.DPORT, NumRange(80, 88)), c(F.TCP_OPTION, 2)),
        l3(6, "icmpv6", V.RETURN, c(F.ICMP_TYPE, IcmpType(128)), c(F.CT_STATE, ("NEW", "ESTABLISHED"))),
        l3(6, "icmpv6", V.DROP, c(F.ICMP_TYPE, IcmpType(1, 3), negated=True)),
        l3(6, "all", V.DROP, c(F.DSCP, 46, negated=True), comment="v6 dscp"),
    )
    return PortRuleset(fi=rules, fo=(), hi=rules)


def to_vm_only() -> PortRuleset:
    return PortRuleset(
        to_vm=L2Side(
            root=(l2(V.ACCEPT, c(F.ETHER_DST, MacMatch("52:54:00:12:34:56"))), l2(V.ACCEPT, c(F.ETHER_DST, MacMatch(BCAST))), l2(V.DROP)),
        )
    )


def stp_and_vlan_chains() -> PortRuleset:
    """Sub-chains entered by destination MAC (stp) and by ethertype 0x8100 (vlan), inout rule
    copies on both sides."""
    stp_rule = l2(V.DROP, c(F.ETHER_DST, STP_DEST), c(F.STP_TYPE, 0x80))
    vlan_rule = l2(V.ACCEPT, etype(0x8100), c(F.VLAN_ID, 42))
    side = L2Side(
        root=(Jump("stp", (c(F.ETHER_DST, STP_DEST),)), Jump("vlan-x", (etype(0x8100),)), l2(V.ACCEPT)),
        subchains=(SubChain("stp", -810, (stp_rule,)), SubChain("vlan-x", -750, (vlan_rule, l2(V.DROP)))),
    )
    return PortRuleset(from_vm=side, to_vm=side)


def mixed() -> PortRuleset:
    """L2 on both sides plus IPv4 and IPv6 L3 rules (every tool in one plan)."""
    rs = clean_traffic()
    allow_ssh_in = (
        l3(4, "tcp", V.ACCEPT, c(F.DPORT, NumRange(22, 22)), c(F.CT_STATE, ("NEW", "ESTABLISHED")),
           c(F.CT_DIRECTION, "original")),
    )
    reply = (
        l3(4, "tcp", V.RETURN, c(F.SPORT, NumRange(22, 22)), c(F.CT_STATE, ("ESTABLISHED",)),
           c(F.CT_DIRECTION, "reply")),
    )
    v6 = (l3(6, "all", V.DROP),)
    return PortRuleset(from_vm=rs.from_vm, to_vm=rs.to_vm, fi=reply + v6, fo=allow_ssh_in + v6, hi=reply + v6)


def empty() -> PortRuleset:
    return PortRuleset()


@dataclass(frozen=True)
class Case:
    name: str  # of the golden file
    port: str
    build: Callable[[], PortRuleset]


# Reviewed by hand against the spec, with assertions of their own in test_properties.py: every
# case; mixed only for its chain names and tools (its rules are not asserted one by one).
CASES = [
    Case("clean-traffic", "vnet0", clean_traffic),
    Case("clean-traffic-two-ips", "vnet1", lambda: clean_traffic(ips=("10.0.0.5", "10.0.0.6"))),
    Case("l3-example", "vp2", l3_example),
    Case("l2-fields", "vp3", l2_fields),
    Case("l3-fields", "vp4", l3_fields),
    Case("to-vm-only", "tap-a.1", to_vm_only),
    Case("stp-vlan-chains", "vp5", stp_and_vlan_chains),
    Case("mixed", "vnet123456789ab", mixed),
    Case("empty", "vp6", empty),
]
IPSETS = ("trusted", "my set")  # the kernel ipsets the l3-fields case names

"""Hand-built :class:`PortRuleset` cases for the nftables backend (golden and kernel tests).

Each case yields the batches to run in order: every batch but the last is *setup* (applied
for real before the kernel check), the last one is the golden text. Records flow from one batch
to the next exactly as the service would store them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from libvirt_nwfilter.backends.base import PortChange
from libvirt_nwfilter.backends.nftables import NftablesBackend
from libvirt_nwfilter.ir import Field, Icmpv6Range, IcmpType, IpRange, Jump, L2Side, MacMatch, NdLinkLayer, NumRange
from libvirt_nwfilter.ir import PortRuleset
from libvirt_nwfilter.ir import SubChain, TcpFlags, Verdict
from ir_builders import c, l2, l3, net4, net6  # noqa: E402  (tests/ is on the path)
from ir_builders import ethertype as et  # noqa: E402

MAC = "52:54:00:00:00:01"
IP = "10.0.0.1"
BCAST = "ff:ff:ff:ff:ff:ff"
A, D, R, C, X = Verdict.ACCEPT, Verdict.DROP, Verdict.RETURN, Verdict.CONTINUE, Verdict.REJECT


# ----------------------------------------------------------------------------------------------
# Rulesets


def clean_traffic(mac: str = MAC, ips: tuple[str, ...] = (IP,)) -> PortRuleset:
    """clean-traffic as libvirt lays it out (semantics.md §3.1): 25 L2 rules, 7 sub-chains."""
    o = "filter 'clean-traffic' rule {}"
    rarp_match = (et(0x8035), c(Field.ARP_HTYPE, 1), c(Field.ARP_PTYPE, 0x0800),
                  c(Field.ARP_OPCODE, 3), c(Field.ARP_SHA, mac), c(Field.ARP_THA, mac),
                  c(Field.ARP_SPA, net4("0.0.0.0")), c(Field.ARP_TPA, net4("0.0.0.0")))
    subs_from = (
        SubChain("mac", -800, (
            l2(R, c(Field.ETHER_SRC, MacMatch(mac)), origin="filter 'no-mac-spoofing' rule 1"),
            l2(D, origin="filter 'no-mac-spoofing' rule 2"),
        )),
        SubChain("ipv4-ip", -710, (
            l2(R, et(0x0800), c(Field.IP_SRC, net4("0.0.0.0")), c(Field.IP_PROTO, 17),
               origin="filter 'no-ip-spoofing' rule 1"),
            *(l2(R, et(0x0800), c(Field.IP_SRC, net4(ip)), origin="filter 'no-ip-spoofing' rule 2")
              for ip in ips),
            l2(D, et(0x0800), origin="filter 'no-ip-spoofing' rule 3"),
        )),
        SubChain("arp-mac", -520, (
            l2(R, et(0x0806), c(Field.ARP_SHA, mac), origin="filter 'no-arp-mac-spoofing' rule 1"),
            l2(D, et(0x0806), origin="filter 'no-arp-mac-spoofing' rule 2"),
        )),
        SubChain("arp-ip", -510, (
            *(l2(R, et(0x0806), c(Field.ARP_SPA, net4(ip)), origin="filter 'no-arp-ip-spoofing' rule 1")
              for ip in ips),
            l2(D, et(0x0806), origin="filter 'no-arp-ip-spoofing' rule 2"),
        )),
        SubChain("rarp", -400, (
            l2(A, c(Field.ETHER_SRC, MacMatch(mac)), c(Field.ETHER_DST, MacMatch(BCAST)), *rarp_match,
               origin="filter 'qemu-announce-self-rarp' rule 1"),
            l2(D, et(0x8035), origin="filter 'qemu-announce-self-rarp' rule 3"),
        )),
    )
    root_from = (
        Jump("mac", ()),
        Jump("ipv4-ip", (et(0x0800),)),
        l2(A, et(0x0800), origin=o.format(1)),
        Jump("arp-mac", (et(0x0806),)),
        Jump("arp-ip", (et(0x0806),)),
        l2(A, et(0x0806), origin=o.format(2)),
        Jump("rarp", (et(0x8035),)),
        l2(A, et(0x0835), origin=o.format(3)),
        l2(D, origin=o.format(4)),
    )
    subs_to = (
        SubChain("ipv4", -700, (l2(A, et(0x0800), origin="filter 'allow-incoming-ipv4' rule 1"),)),
        SubChain("rarp", -400, (
            l2(A, c(Field.ETHER_DST, MacMatch(BCAST)), *rarp_match,
               origin="filter 'qemu-announce-self-rarp' rule 2"),
            l2(D, et(0x8035), origin="filter 'qemu-announce-self-rarp' rule 3"),
        )),
    )
    root_to = (
        Jump("ipv4", (et(0x0800),)),
        l2(A, et(0x0806), origin=o.format(2)),
        Jump("rarp", (et(0x8035),)),
        l2(D, origin=o.format(4)),
    )
    return PortRuleset(from_vm=L2Side(root_from, subs_from), to_vm=L2Side(root_to, subs_to))


def root_only() -> PortRuleset:
    return PortRuleset(
        from_vm=L2Side((
            l2(D, c(Field.ETHER_SRC, MacMatch(MAC), negated=True)),
            l2(A, et(0x0800)),
            l2(C, et(0x0806)),
            l2(R, et(0x86DD)),
            l2(D),
        )),
        to_vm=L2Side((l2(A, c(Field.ETHER_DST, MacMatch(MAC))), l2(D))),
    )


def l2_every_field() -> PortRuleset:
    """One rule per L2 field shape, with negations (from the VM, root chain)."""
    rules = (
        l2(A, c(Field.ETHER_SRC, MacMatch("52:54:00:12:34:56", 24)),
           c(Field.ETHER_DST, MacMatch("01:00:5e:00:00:00", 25), negated=True)),
        l2(D, c(Field.ETHER_TYPE, 0x0800, negated=True), c(Field.ETHER_SRC, MacMatch(MAC), negated=True)),
        l2(A, et(0x8100), c(Field.VLAN_ID, 10), c(Field.VLAN_ENCAP, 0x0806)),
        l2(D, et(0x8100), c(Field.VLAN_ID, 4095, negated=True), c(Field.VLAN_ENCAP, 0x0800, negated=True)),
        l2(A, c(Field.ETHER_DST, MacMatch("01:80:c2:00:00:00")), c(Field.ETHER_SRC, MacMatch(MAC))),
        l2(R, et(0x0806), c(Field.ARP_HTYPE, 1), c(Field.ARP_PTYPE, 0x0800), c(Field.ARP_OPCODE, 2),
           c(Field.ARP_SHA, MAC), c(Field.ARP_THA, "52:54:00:00:00:02", negated=True),
           c(Field.ARP_SPA, net4("10.0.0.0", 8)), c(Field.ARP_TPA, net4("10.1.2.3"), negated=True)),
        l2(D, et(0x0806), c(Field.ARP_OPCODE, 1, negated=True), c(Field.ARP_HTYPE, 6, negated=True),
           c(Field.ARP_PTYPE, 0x86DD, negated=True)),
        l2(A, et(0x8035), c(Field.ARP_HTYPE, 1), c(Field.ARP_PTYPE, 0x0800), c(Field.ARP_OPCODE, 3),
           c(Field.ARP_SHA, MAC), c(Field.ARP_THA, MAC, negated=True),
           c(Field.ARP_SPA, net4("0.0.0.0")), c(Field.ARP_TPA, net4("192.168.0.0", 16), negated=True)),
        l2(R, et(0x0800), c(Field.IP_SRC, net4("10.1.2.3", 24)), c(Field.IP_DST, net4("10.9.9.9"), negated=True),
           c(Field.IP_PROTO, 6), c(Field.SPORT, NumRange(1024, 65535)), c(Field.DPORT, NumRange(22, 22), negated=True),
           c(Field.DSCP, 46)),
        l2(D, et(0x0800), c(Field.IP_PROTO, 17, negated=True), c(Field.DSCP, 0, negated=True)),
        l2(A, et(0x0800), c(Field.IP_PROTO, 33), c(Field.DPORT, NumRange(5000, 5010))),
        l2(R, et(0x86DD), c(Field.IP_SRC, net6("fe80::1", 10)), c(Field.IP_DST, net6("ff02::1"), negated=True),
           c(Field.IP_PROTO, 17), c(Field.SPORT, NumRange(546, 546)), c(Field.DPORT, NumRange(547, 547))),
        l2(A, et(0x86DD), c(Field.IP_PROTO, 58), c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(133, 136, 0, 0))),
        l2(D, et(0x86DD), c(Field.IP_PROTO, 58), c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(128, 129, 0, 255), negated=True)),
        l2(D, et(0x86DD), c(Field.IP_PROTO, 58), c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(0, 255, 3, 4), negated=True)),
        l2(D, et(0x86DD), c(Field.IP_PROTO, 58), c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(1, 2, 0, 3), negated=True)),
        l2(A, et(0x86DD), c(Field.IP_PROTO, 58), c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(0, 255, 0, 255))),
        l2(C, c(Field.ETHER_SRC, MacMatch(MAC, 0))),
    )
    return PortRuleset(from_vm=L2Side(rules))


def nd_fields() -> PortRuleset:
    """Neighbour Discovery fields (our extension) in a sub-chain, as no-nd-spoofing lays them out."""
    nd = (et(0x86DD), c(Field.IP_PROTO, 58))
    rules = (
        l2(R, *nd, c(Field.IP_SRC, net6("::")), c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(135, 135, 0, 255))),
        l2(R, *nd, c(Field.IP_SRC, net6("fd00::1")), c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(135, 135, 0, 255)),
           c(Field.ND_LLADDR, NdLinkLayer(1, MAC))),
        l2(R, *nd, c(Field.IP_SRC, net6("fe80::5054:ff:fe00:1")), c(Field.ICMPV6_TYPE_CODE,
                                                                    Icmpv6Range(136, 136, 0, 255)),
           c(Field.ND_TARGET, "fd00::1"), c(Field.ND_LLADDR, NdLinkLayer(2, None))),
        l2(D, *nd, c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(136, 136, 0, 255)), c(Field.ND_TARGET, "fd00::1", negated=True)),
        l2(D, *nd, c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(135, 136, 0, 255))),
        l2(R),
    )
    return PortRuleset(from_vm=L2Side((Jump("ipv6-nd", (et(0x86DD),)),), (SubChain("ipv6-nd", -620, rules),)))


def l3_every_field_v4() -> PortRuleset:
    o = "filter 'l3' rule {}"
    fi = (
        l3(4, "tcp", R, c(Field.IP_DST, net4("10.1.0.0", 16)), c(Field.DPORT, NumRange(22, 22)),
           c(Field.CT_STATE, ("NEW", "ESTABLISHED")), c(Field.CT_DIRECTION, "original"),
           comment='ssh "out"', origin=o.format(1)),
        l3(4, "tcp", D, c(Field.SRC_MAC, MAC, negated=True), c(Field.IP_SRC, net4("10.0.0.5"), negated=True),
           c(Field.IP_DST_RANGE, IpRange("10.2.0.1", "10.2.0.9", 4)), c(Field.DSCP, 10),
           c(Field.TCP_FLAGS, TcpFlags(0x3F, 0x02)), c(Field.SPORT, NumRange(1, 1023), negated=True),
           c(Field.DPORT, NumRange(80, 90)), c(Field.TCP_OPTION, 2), origin=o.format(2)),
        l3(4, "tcp", X, c(Field.TCP_FLAGS, TcpFlags(0x12, 0x12), negated=True),
           c(Field.TCP_OPTION, 254, negated=True), c(Field.IP_SRC_RANGE, IpRange("10.3.0.1", "10.3.0.1", 4), negated=True),
           origin=o.format(3)),
        l3(4, "udp", R, c(Field.DPORT, NumRange(53, 53)), c(Field.CONNLIMIT_ABOVE, 10, negated=True),
           origin=o.format(4)),
        l3(4, "tcp", D, c(Field.CONNLIMIT_ABOVE, 4), comment="x" * 200, origin=o.format(5)),
        l3(4, "icmp", R, c(Field.ICMP_TYPE, IcmpType(8, None)), c(Field.CT_STATE, ("NEW", "ESTABLISHED")),
           origin=o.format(6)),
        l3(4, "icmp", R, c(Field.ICMP_TYPE, IcmpType(3, 4)), origin=o.format(7)),
        l3(4, "icmp", D, c(Field.ICMP_TYPE, IcmpType(5, None), negated=True), origin=o.format(8)),
        l3(4, "icmp", D, c(Field.ICMP_TYPE, IcmpType(3, 1), negated=True), origin=o.format(9)),
        l3(4, "icmp", R, c(Field.ICMP_TYPE, IcmpType(255, None)), origin=o.format(10)),
        l3(4, "icmp", D, c(Field.ICMP_TYPE, IcmpType(255, 0), negated=True), origin=o.format(11)),
        l3(4, "udplite", C, origin=o.format(12)),
        l3(4, "esp", R, origin=o.format(13)),
        l3(4, "ah", R, origin=o.format(14)),
        l3(4, "sctp", R, c(Field.SPORT, NumRange(9, 9)), origin=o.format(15)),
        l3(4, "igmp", D, comment="no igmp", origin=o.format(16)),
        l3(4, "all", R, c(Field.CT_STATE, ("RELATED", "INVALID")), origin=o.format(17)),
        l3(4, "all", D, origin=o.format(18)),
    )
    fo = (
        l3(4, "tcp", A, c(Field.IP_SRC, net4("10.1.0.0", 16)), c(Field.SPORT, NumRange(22, 22)),
           c(Field.CT_STATE, ("ESTABLISHED",)), c(Field.CT_DIRECTION, "reply"), comment='ssh "out"',
           origin=o.format(1)),
        l3(4, "all", A, c(Field.CT_STATE, ("NEW",)), comment="st new", origin=o.format(19)),
        l3(4, "all", D, origin=o.format(18)),
    )
    return PortRuleset(fi=fi, fo=fo, hi=fi)


def l3_every_field_v6() -> PortRuleset:
    o = "filter 'l3v6' rule {}"
    fi = (
        l3(6, "tcp", R, c(Field.IP_DST, net6("fd00::", 64)), c(Field.DPORT, NumRange(80, 80), negated=True),
           c(Field.CT_STATE, ("NEW", "ESTABLISHED")), c(Field.CT_DIRECTION, "original"), origin=o.format(1)),
        l3(6, "udp", D, c(Field.SRC_MAC, MAC), c(Field.IP_SRC_RANGE, IpRange("fd00::1", "fd00::9", 6)),
           c(Field.DSCP, 46, negated=True), origin=o.format(2)),
        l3(6, "icmpv6", R, c(Field.ICMP_TYPE, IcmpType(128, 0)), c(Field.CT_STATE, ("NEW", "ESTABLISHED")),
           origin=o.format(3)),
        l3(6, "icmpv6", D, c(Field.ICMP_TYPE, IcmpType(135, 0), negated=True), origin=o.format(4)),
        l3(6, "icmpv6", D, c(Field.ICMP_TYPE, IcmpType(255, None)), origin=o.format(5)),
        l3(6, "tcp", X, c(Field.TCP_OPTION, 8), c(Field.CONNLIMIT_ABOVE, 2), origin=o.format(6)),
        l3(6, "sctp", R, c(Field.DPORT, NumRange(100, 200)), origin=o.format(7)),
        l3(6, "udplite", R, origin=o.format(8)),
        l3(6, "esp", R, origin=o.format(9)),
        l3(6, "ah", C, origin=o.format(10)),
        l3(6, "all", D, origin=o.format(11)),
    )
    fo = (
        l3(6, "tcp", A, c(Field.IP_SRC, net6("fd00::", 64)), c(Field.SPORT, NumRange(80, 80), negated=True),
           c(Field.CT_STATE, ("ESTABLISHED",)), c(Field.CT_DIRECTION, "reply"), origin=o.format(1)),
        l3(6, "all", D, origin=o.format(11)),
    )
    return PortRuleset(fi=fi, fo=fo, hi=fi)


def l3_no_ct() -> PortRuleset:
    """L3 rules without connection tracking (checkable in the bridge mode on any kernel)."""
    fi = (l3(4, "tcp", R, c(Field.DPORT, NumRange(22, 22))), l3(4, "udp", X, c(Field.DPORT, NumRange(53, 53))),
          l3(6, "icmpv6", R, c(Field.ICMP_TYPE, IcmpType(135, None))), l3(4, "all", D))
    fo = (l3(4, "tcp", A, c(Field.SPORT, NumRange(22, 22))), l3(4, "all", D))
    return PortRuleset(from_vm=root_only().from_vm, fi=fi, fo=fo, hi=fi)


def ssh_to_a(mac: str = MAC, ip: str = IP) -> PortRuleset:
    """No MAC spoofing from the VM, and only TCP to port 22 towards it (default state matching)."""
    o = "filter 'ssh-only' rule {}"
    from_vm = L2Side((Jump("mac", ()),), (SubChain("mac", -800, (
        l2(R, c(Field.ETHER_SRC, MacMatch(mac)), origin=o.format(1)), l2(D, origin=o.format(2)))),))
    fi = (l3(4, "tcp", R, c(Field.SPORT, NumRange(22, 22)), c(Field.CT_STATE, ("ESTABLISHED",)),
             c(Field.CT_DIRECTION, "reply"), origin=o.format(3)),
          l3(4, "all", D, origin=o.format(4)))
    fo = (l3(4, "tcp", A, c(Field.DPORT, NumRange(22, 22)), c(Field.CT_STATE, ("NEW", "ESTABLISHED")),
             c(Field.CT_DIRECTION, "original"), origin=o.format(3)),
          l3(4, "all", D, origin=o.format(4)))
    return PortRuleset(from_vm=from_vm, fi=fi, fo=fo, hi=fi)


def only_fo() -> PortRuleset:
    return PortRuleset(fo=(l3(4, "tcp", A, c(Field.DPORT, NumRange(80, 80))), l3(4, "all", D)))


def odd_names() -> PortRuleset:
    return PortRuleset(from_vm=L2Side(
        (Jump("arp-x:y_z", (et(0x0806),)), Jump("ipv4.a:b_c", (et(0x0800),)), l2(D)),
        (SubChain("arp-x:y_z", -500, (l2(R, et(0x0806), c(Field.ARP_SPA, net4(IP))), l2(D, et(0x0806)))),
         SubChain("ipv4.a:b_c", -700, (l2(A, et(0x0800)),)))))


# ----------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    name: str
    conntrack: str
    batches: Callable[[NftablesBackend], list[str]]
    needs_bridge_ct: bool = False
    l2_reject: bool = False
    notes: str = ""


def _run(backend: NftablesBackend, batches: list[list[tuple[str, PortRuleset | None]]],
         rebuild_last: bool = False) -> list[str]:
    """Render batches of (port, new ruleset) in order, passing records (and the other ports' ids)
    along as the service does."""
    records: dict[str, dict] = {}
    texts = []
    for index, batch in enumerate(batches):
        changes = [PortChange(port, records.get(port), new) for port, new in batch]
        ids = [r["id"] for p, r in records.items() if p not in {port for port, _ in batch} and r["id"] is not None]
        if rebuild_last and index == len(batches) - 1:
            plan, new_records = backend.rebuild_plan(changes, [], ids)
        else:
            plan, new_records = backend.plan(changes, ids)
        texts.append(plan.apply[0].stdin)
        for port, record in new_records.items():
            if record is None:
                records.pop(port, None)
            else:
                records[port] = dict(record)
    return texts


def _single(port: str, ruleset: Callable[[], PortRuleset]):
    return lambda b: _run(b, [[(port, ruleset())]])


# Reviewed by hand against the spec, with assertions of their own in test_properties.py:
# clean_traffic, clean_traffic_two_ips, root_only, l2_every_field, l3_every_field_v4, l3_only_fo, ssh_to_a,
# l3_every_field_v6, bridge_mode_l3_every_field_v4, bridge_mode_l3_no_ct(_reject), multi_port_batch,
# rebuild, odd_port_names, bridge_mode_replace, replace, delete: every case but nd_fields.
CASES = [
    Case("root_only", "inet", _single("vnet0", root_only)),
    Case("clean_traffic", "inet", _single("vnet0", clean_traffic)),
    Case("clean_traffic_two_ips", "inet", _single("vnet0", lambda: clean_traffic(ips=(IP, "10.0.0.2")))),
    Case("l2_every_field", "inet", _single("vnet0", l2_every_field)),
    Case("nd_fields", "inet", _single("vnet0", nd_fields)),
    Case("l3_every_field_v4", "inet", _single("vnet0", l3_every_field_v4)),
    Case("l3_every_field_v6", "inet", _single("vnet0", l3_every_field_v6)),
    Case("l3_only_fo", "inet", _single("vnet0", only_fo)),
    Case("ssh_to_a", "inet", _single("vp1", ssh_to_a)),
    Case("odd_port_names", "inet", _single("a:b_c.d-e", odd_names)),
    Case("bridge_mode_l3_every_field_v4", "bridge", _single("vnet0", l3_every_field_v4), needs_bridge_ct=True),
    Case("bridge_mode_l3_no_ct", "bridge", _single("vnet0", l3_no_ct)),
    Case("bridge_mode_l3_no_ct_reject", "bridge", _single("vnet0", l3_no_ct), l2_reject=True,
         notes="kernel check needs bridge reject"),
    Case("replace", "inet", lambda b: _run(b, [
        [("vnet0", ssh_to_a())],
        [("vnet0", clean_traffic())],
        [("vnet0", PortRuleset(from_vm=clean_traffic().from_vm, fi=l3_no_ct().fi, fo=l3_no_ct().fo))],
    ])),
    Case("delete", "inet", lambda b: _run(b, [[("vnet0", ssh_to_a())], [("vnet0", None)]])),
    Case("multi_port_batch", "inet", lambda b: _run(b, [
        [("vnet0", clean_traffic()), ("vnet1", ssh_to_a("52:54:00:00:00:02", "10.0.0.2")),
         ("vnet2", only_fo())],
        [("vnet0", None), ("vnet1", root_only()), ("vnet3", ssh_to_a("52:54:00:00:00:03", "10.0.0.3")),
         ("vnet4", l3_no_ct())],
    ])),
    Case("bridge_mode_replace", "bridge", lambda b: _run(b, [
        [("vnet0", l3_no_ct())], [("vnet0", root_only())]])),
    Case("rebuild", "inet", lambda b: _run(b, [
        [("vnet0", ssh_to_a()), ("vnet1", only_fo())],
        [("vnet0", ssh_to_a()), ("vnet1", only_fo())],
    ], rebuild_last=True)),
]


def backend_for(case: Case) -> NftablesBackend:
    return NftablesBackend(conntrack=case.conntrack, l2_reject=case.l2_reject)

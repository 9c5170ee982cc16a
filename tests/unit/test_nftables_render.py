"""Unit tests of the nftables backend: what each IR field renders to, refusals, batch shape,
records and port ids. Pure: no kernel (tests/golden/nftables checks the texts with nft)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from libvirt_nwfilter.backends.base import PortChange
from libvirt_nwfilter.backends.nftables import NftablesBackend, probe_bridge_conntrack_text, probe_l2_reject_text
from libvirt_nwfilter.backends.nftables.names import (IDS_TABLE, LEGACY_TABLE, OUR_TABLES, SHARD_TABLES, parse_object,
                                                      shard_of)
from libvirt_nwfilter.backends.nftables.plan import remove_all_text
from libvirt_nwfilter.errors import NwfilterError, UnsupportedError, ValidationError
from libvirt_nwfilter.ir import Cond, Field, Icmpv6Range, IcmpType, IpNet, IpRange, IpSet, Jump, L2Rule, L2Side
from libvirt_nwfilter.ir import L3Rule, MacMatch, NumRange, PortRuleset, SubChain, TcpFlags, Verdict

MAC = "52:54:00:00:00:01"
ORIGIN = "filter 'f' rule 7"
T0 = shard_of("vnet0")  # the table (bridge, inet) of vnet0's chains, sets and dispatch elements


def c(field, value, negated=False):
    return Cond(field, value, negated)


def render(backend: NftablesBackend, changes, ids_in_use=None) -> tuple[str, dict]:
    """The text of the one nft step a plan has, and the new records."""
    plan, records = backend.plan(changes, ids_in_use)
    (step,) = plan.apply
    return step.stdin, records


def rules_of(text: str, chain_prefix: str) -> list[str]:
    out = []
    for line in text.splitlines():
        m = re.match(r"add rule (?:bridge|inet) (libvirt_nwfilter_\d+) (\S+) (.*)$", line)
        if m and m.group(2).startswith(chain_prefix):
            assert m.group(1) == shard_of(parse_object(m.group(2)).port), line  # in its port's shard
            out.append(m.group(3))
    return out


def l2_line(*conds, verdict=Verdict.ACCEPT, conntrack="inet") -> str:
    rs = PortRuleset(from_vm=L2Side((L2Rule(tuple(conds), verdict, ORIGIN),)))
    text, _ = render(NftablesBackend(conntrack=conntrack), [PortChange("vnet0", None, rs)])
    lines = rules_of(text, "I-1/vnet0")
    assert len(lines) == 1, lines
    return lines[0]


def l3_lines(*conds, family=4, protocol="tcp", verdict=Verdict.RETURN, comment=None, conntrack="inet",
             l2_reject=False) -> list[str]:
    rs = PortRuleset(fi=(L3Rule(family, protocol, tuple(conds), verdict, ORIGIN, comment),))
    text, _ = render(NftablesBackend(conntrack=conntrack, l2_reject=l2_reject), [PortChange("vnet0", None, rs)])
    return rules_of(text, "FI-1/vnet0")


def l3_line(*conds, **kwargs) -> str:
    lines = l3_lines(*conds, **kwargs)
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------------------------
# L2 fields


@pytest.mark.parametrize("cond, expected", [
    (c(Field.ETHER_SRC, MacMatch(MAC)), f"ether saddr {MAC}"),
    (c(Field.ETHER_SRC, MacMatch(MAC), True), f"ether saddr != {MAC}"),
    (c(Field.ETHER_DST, MacMatch("01:00:5E:12:34:56", 24)), "ether daddr & ff:ff:ff:00:00:00 == 01:00:5e:00:00:00"),
    (c(Field.ETHER_DST, MacMatch("01:00:5e:12:34:56", 25), True), "ether daddr & ff:ff:ff:80:00:00 != 01:00:5e:00:00:00"),
    (c(Field.ETHER_SRC, MacMatch(MAC, 0)), "ether saddr & 00:00:00:00:00:00 == 00:00:00:00:00:00"),
    (c(Field.ETHER_TYPE, 0x806), "ether type 0x0806"),
    (c(Field.ETHER_TYPE, 0x835, True), "ether type != 0x0835"),
    (c(Field.VLAN_ID, 10), "vlan id 10"),
    (c(Field.VLAN_ID, 10, True), "vlan id != 10"),
    (c(Field.VLAN_ENCAP, 0x0806), "vlan type 0x0806"),
    (c(Field.VLAN_ENCAP, 0x0800, True), "vlan type != 0x0800"),
])
def test_l2_ethernet_fields(cond, expected):
    assert l2_line(cond) == f"{expected} accept"


def test_arp_fields_named_with_ebtables_guards():
    line = l2_line(c(Field.ETHER_TYPE, 0x0806), c(Field.ARP_HTYPE, 1), c(Field.ARP_PTYPE, 0x800),
                   c(Field.ARP_OPCODE, 2, True), c(Field.ARP_SHA, MAC), c(Field.ARP_THA, MAC, True),
                   c(Field.ARP_SPA, IpNet("10.1.2.3", 8, 4)), c(Field.ARP_TPA, IpNet("10.0.0.1", 32, 4), True))
    # the header checks ebtables makes come once, before the first address field; the negated
    # compares carry a no-op mask (nft 1.0.6 would merge neighbours into one wrong compare)
    assert line == ("ether type 0x0806 arp htype 1 arp ptype 0x0800 arp operation & 0xffff != 2 arp hlen 6 "
                    f"arp plen 4 arp saddr ether {MAC} arp daddr ether & ff:ff:ff:ff:ff:ff != {MAC} "
                    "arp saddr ip 10.0.0.0/8 arp daddr ip & 255.255.255.255 != 10.0.0.1 accept")


@pytest.mark.parametrize("conds, expected", [
    ((c(Field.ETHER_DST, MacMatch("52:54:00:00:00:01"), True), c(Field.ETHER_SRC, MacMatch("52:54:00:00:00:02"), True)),
     "ether daddr & ff:ff:ff:ff:ff:ff != 52:54:00:00:00:01 ether saddr & ff:ff:ff:ff:ff:ff != 52:54:00:00:00:02"),
    ((c(Field.ETHER_TYPE, 0x0800), c(Field.IP_PROTO, 6), c(Field.SPORT, NumRange(1, 1), True),
      c(Field.DPORT, NumRange(2, 2), True)),
     "ether type 0x0800 ip protocol 6 th sport & 0xffff != 1 th dport & 0xffff != 2"),
    ((c(Field.ETHER_SRC, MacMatch("52:54:00:00:00:02"), True),), "ether saddr != 52:54:00:00:00:02"),
])
def test_negated_neighbours_are_not_merged_by_nft(conds, expected):
    """nft 1.0.6 turns ``A != x B != y`` on adjacent fields into "not (A = x and B = y)": two or
    more negated compares get a no-op mask; a single one stays as it was."""
    assert l2_line(*conds) == f"{expected} accept"


def test_arp_ip_field_guards_only_where_needed():
    assert l2_line(c(Field.ETHER_TYPE, 0x0806), c(Field.ARP_OPCODE, 1)) == "ether type 0x0806 arp operation 1 accept"
    assert l2_line(c(Field.ETHER_TYPE, 0x0806), c(Field.ARP_SPA, IpNet("10.0.0.1", 32, 4)), verdict=Verdict.RETURN) == \
        "ether type 0x0806 arp ptype 0x0800 arp hlen 6 arp plen 4 arp saddr ip 10.0.0.1 return"


def test_rarp_fields_use_raw_payload():
    # nft's arp expressions would add "ether type arp" and never match RARP
    line = l2_line(c(Field.ETHER_TYPE, 0x8035), c(Field.ARP_OPCODE, 3), c(Field.ARP_SHA, MAC),
                   c(Field.ARP_SPA, IpNet("10.0.0.0", 8, 4), True), c(Field.ARP_TPA, IpNet("0.0.0.0", 32, 4)))
    assert line == ("ether type 0x8035 @nh,48,16 0x0003 @nh,16,16 0x0800 @nh,32,8 0x0006 "
                    "@nh,40,8 0x0004 @nh,0,16 0x0001 @nh,64,48 0x525400000001 "
                    "@nh,112,32 & 0xff000000 != 0x0a000000 @nh,192,32 0x00000000 accept")
    assert "arp " not in line


@pytest.mark.parametrize("conds, expected", [
    ((c(Field.ETHER_TYPE, 0x800), c(Field.IP_SRC, IpNet("10.1.2.3", 24, 4))), "ip saddr 10.1.2.0/24"),
    ((c(Field.ETHER_TYPE, 0x800), c(Field.IP_DST, IpNet("10.1.2.3", 32, 4), True)), "ip daddr != 10.1.2.3"),
    ((c(Field.ETHER_TYPE, 0x800), c(Field.IP_PROTO, 6)), "ip protocol 6"),
    ((c(Field.ETHER_TYPE, 0x800), c(Field.IP_PROTO, 17, True)), "ip protocol != 17"),
    ((c(Field.ETHER_TYPE, 0x800), c(Field.IP_PROTO, 6), c(Field.SPORT, NumRange(10, 20)),
      c(Field.DPORT, NumRange(22, 22), True)), "ip protocol 6 th sport 10-20 th dport != 22"),
    ((c(Field.ETHER_TYPE, 0x800), c(Field.DSCP, 46)), "ip dscp 46"),
    ((c(Field.ETHER_TYPE, 0x800), c(Field.DSCP, 0, True)), "ip dscp != 0"),
    ((c(Field.ETHER_TYPE, 0x86DD), c(Field.IP_SRC, IpNet("FE80::1", 10, 6))), "ip6 saddr fe80::/10"),
    ((c(Field.ETHER_TYPE, 0x86DD), c(Field.IP_DST, IpNet("ff02::1", 128, 6), True)), "ip6 daddr != ff02::1"),
    ((c(Field.ETHER_TYPE, 0x86DD), c(Field.IP_PROTO, 17)), "meta l4proto 17"),
    ((c(Field.ETHER_TYPE, 0x86DD), c(Field.IP_PROTO, 58), c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(133, 136, 0, 0))),
     "meta l4proto 58 icmpv6 type 133-136 icmpv6 code 0"),
    ((c(Field.ETHER_TYPE, 0x86DD), c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(128, 128, 0, 255))), "icmpv6 type 128"),
    ((c(Field.ETHER_TYPE, 0x86DD), c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(1, 2, 0, 255), True)), "icmpv6 type != 1-2"),
    ((c(Field.ETHER_TYPE, 0x86DD), c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(0, 255, 3, 4), True)), "icmpv6 code != 3-4"),
    ((c(Field.ETHER_TYPE, 0x86DD), c(Field.ICMPV6_TYPE_CODE, Icmpv6Range(1, 2, 0, 3), True)),
     "icmpv6 type . icmpv6 code != { 1-2 . 0-3 }"),
])
def test_l2_ip_fields(conds, expected):
    ethertype = f"ether type 0x{conds[0].value:04x}"
    assert l2_line(*conds) == f"{ethertype} {expected} accept"


@pytest.mark.parametrize("verdict, text", [(Verdict.ACCEPT, "accept"), (Verdict.DROP, "drop"),
                                           (Verdict.RETURN, "return"), (Verdict.CONTINUE, "counter"),
                                           (Verdict.REJECT, "drop")])
def test_l2_verdicts(verdict, text):
    assert l2_line(c(Field.ETHER_TYPE, 0x800), verdict=verdict) == f"ether type 0x0800 {text}"
    assert l2_line(verdict=verdict) == text


def test_stp_destination_renders_but_stp_payload_fields_are_refused():
    stp = c(Field.ETHER_DST, MacMatch("01:80:c2:00:00:00"))
    assert l2_line(stp, c(Field.ETHER_SRC, MacMatch(MAC))) == f"ether daddr 01:80:c2:00:00:00 ether saddr {MAC} accept"
    for field, attribute in [(Field.STP_TYPE, "type"), (Field.STP_FLAGS, "flags"),
                             (Field.STP_ROOT_PRIO, "root-priority"), (Field.STP_ROOT_ADDR, "root-address"),
                             (Field.STP_ROOT_COST, "root-cost"), (Field.STP_SENDER_PRIO, "sender-priority"),
                             (Field.STP_SENDER_ADDR, "sender-address"), (Field.STP_PORT, "port"),
                             (Field.STP_MSG_AGE, "age"), (Field.STP_MAX_AGE, "max-age"),
                             (Field.STP_HELLO_TIME, "hello-time"), (Field.STP_FORWARD_DELAY, "forward-delay")]:
        with pytest.raises(UnsupportedError) as info:
            l2_line(stp, c(field, 1))
        assert ORIGIN in str(info.value) and f"'{attribute}'" in str(info.value)


def test_gratuitous_arp_is_refused():
    with pytest.raises(UnsupportedError, match=r"filter 'f' rule 7: attribute 'gratuitous'"):
        l2_line(c(Field.ETHER_TYPE, 0x0806), c(Field.ARP_GRATUITOUS, True))


def test_ipset_is_refused():
    with pytest.raises(UnsupportedError, match=r"filter 'f' rule 7: attribute 'ipset'.*kernel ipsets"):
        l3_line(c(Field.IPSET, IpSet("blocked", ("src",))))


# ----------------------------------------------------------------------------------------------
# L3 fields


@pytest.mark.parametrize("cond, expected", [
    (c(Field.SRC_MAC, MAC), f"ether saddr {MAC}"),
    (c(Field.SRC_MAC, MAC, True), f"ether saddr != {MAC}"),
    (c(Field.IP_SRC, IpNet("10.0.0.9", 8, 4)), "ip saddr 10.0.0.0/8"),
    (c(Field.IP_DST, IpNet("10.0.0.9", 32, 4), True), "ip daddr != 10.0.0.9"),
    (c(Field.IP_SRC_RANGE, IpRange("10.0.0.1", "10.0.0.9", 4)), "ip saddr 10.0.0.1-10.0.0.9"),
    (c(Field.IP_DST_RANGE, IpRange("10.0.0.1", "10.0.0.1", 4), True), "ip daddr != 10.0.0.1"),
    (c(Field.DSCP, 10), "ip dscp 10"),
    (c(Field.SPORT, NumRange(1, 1023), True), "th sport != 1-1023"),
    (c(Field.DPORT, NumRange(22, 22)), "th dport 22"),
    (c(Field.TCP_FLAGS, TcpFlags(0x3F, 0x02)), "tcp flags & (fin|syn|rst|psh|ack|urg) == syn"),
    (c(Field.TCP_FLAGS, TcpFlags(0x12, 0x12), True), "tcp flags & (syn|ack) != (syn|ack)"),
    (c(Field.TCP_FLAGS, TcpFlags(0x06, 0x00)), "tcp flags & (syn|rst) == 0x0"),
    (c(Field.TCP_OPTION, 2), "tcp option 2 exists"),
    (c(Field.TCP_OPTION, 254, True), "tcp option 254 missing"),
    (c(Field.CT_STATE, ("NEW", "ESTABLISHED")), "ct state new,established"),
    (c(Field.CT_DIRECTION, "reply"), "ct direction reply"),
])
def test_l3_fields_v4(cond, expected):
    assert l3_line(cond) == f"meta nfproto ipv4 meta l4proto 6 {expected} return"


@pytest.mark.parametrize("cond, expected", [
    (c(Field.IP_SRC, IpNet("fd00::1", 64, 6)), "ip6 saddr fd00::/64"),
    (c(Field.IP_DST_RANGE, IpRange("fd00::1", "fd00::9", 6), True), "ip6 daddr != fd00::1-fd00::9"),
    (c(Field.DSCP, 46, True), "ip6 dscp != 46"),
])
def test_l3_fields_v6(cond, expected):
    assert l3_line(cond, family=6, protocol="udp") == f"meta nfproto ipv6 meta l4proto 17 {expected} return"


@pytest.mark.parametrize("family, protocol, number", [
    (4, "tcp", 6), (4, "udp", 17), (4, "udplite", 136), (4, "esp", 50), (4, "ah", 51), (4, "sctp", 132),
    (4, "icmp", 1), (4, "igmp", 2), (6, "tcp", 6), (6, "icmpv6", 58), (6, "sctp", 132)])
def test_l3_protocols_are_numeric(family, protocol, number):
    nfproto = "ipv4" if family == 4 else "ipv6"
    assert l3_line(family=family, protocol=protocol) == f"meta nfproto {nfproto} meta l4proto {number} return"


def test_l3_all_matches_the_family_only():
    assert l3_line(family=4, protocol="all", verdict=Verdict.DROP) == "meta nfproto ipv4 drop"
    assert l3_line(family=6, protocol="all", verdict=Verdict.DROP) == "meta nfproto ipv6 drop"
    assert (l3_line(family=6, protocol="all", verdict=Verdict.DROP, conntrack="bridge")
            == "ether type 0x86dd drop")


@pytest.mark.parametrize("icmp, negated, expected", [
    (IcmpType(8), False, "icmp type 8"),
    (IcmpType(3, 4), False, "icmp type 3 icmp code 4"),
    (IcmpType(5), True, "icmp type != 5"),
    (IcmpType(3, 1), True, "icmp type . icmp code != { 3 . 1 }"),
])
def test_icmp_type(icmp, negated, expected):
    assert l3_line(c(Field.ICMP_TYPE, icmp, negated), protocol="icmp") == \
        f"meta nfproto ipv4 meta l4proto 1 {expected} return"


def test_icmp_type_255_is_any_type_like_iptables():
    assert l3_line(c(Field.ICMP_TYPE, IcmpType(255)), protocol="icmp") == "meta nfproto ipv4 meta l4proto 1 return"
    assert l3_lines(c(Field.ICMP_TYPE, IcmpType(255, 3), True), protocol="icmp") == []  # never matches
    # ip6tables has no such special case
    assert l3_line(c(Field.ICMP_TYPE, IcmpType(255)), family=6, protocol="icmpv6") == \
        "meta nfproto ipv6 meta l4proto 58 icmpv6 type 255 return"
    assert l3_line(c(Field.ICMP_TYPE, IcmpType(1, 0), True), family=6, protocol="icmpv6") == \
        "meta nfproto ipv6 meta l4proto 58 icmpv6 type . icmpv6 code != { 1 . 0 } return"


def test_connlimit_uses_a_per_source_dynamic_set():
    rs = PortRuleset(fi=(L3Rule(4, "tcp", (c(Field.CONNLIMIT_ABOVE, 5), c(Field.DPORT, NumRange(80, 80))),
                                Verdict.DROP, ORIGIN),
                         L3Rule(6, "tcp", (c(Field.CONNLIMIT_ABOVE, 7, True),), Verdict.RETURN, ORIGIN)))
    text, records = render(NftablesBackend(), [PortChange("vnet0", None, rs)])
    assert rules_of(text, "FI-1/vnet0") == [
        "meta nfproto ipv4 meta l4proto 6 th dport 80 add @CL-1/vnet0/1 { ip saddr ct count over 5 } drop",
        "meta nfproto ipv6 meta l4proto 6 add @CL-1/vnet0/2 { ip6 saddr ct count 7 } return",
    ]
    assert f"add set inet {T0} CL-1/vnet0/1 {{ type ipv4_addr; size 65535; flags dynamic; }}" in text
    assert f"add set inet {T0} CL-1/vnet0/2 {{ type ipv6_addr; size 65535; flags dynamic; }}" in text
    assert records["vnet0"]["sets"] == [["inet", "CL-1/vnet0/1"], ["inet", "CL-1/vnet0/2"]]
    # replaced: the old sets go after the old chains
    text, _ = render(NftablesBackend(), [PortChange("vnet0", records["vnet0"], PortRuleset())])
    assert text.index(f"delete chain inet {T0} FI-1/vnet0") < \
        text.index(f"delete set inet {T0} CL-1/vnet0/1")


@pytest.mark.parametrize("verdict, inet, bridge, bridge_reject", [
    (Verdict.ACCEPT, "accept", "accept", "accept"), (Verdict.DROP, "drop", "drop", "drop"),
    (Verdict.RETURN, "return", "return", "return"), (Verdict.CONTINUE, "counter", "counter", "counter"),
    (Verdict.REJECT, "reject", "drop", "reject")])
def test_l3_verdicts(verdict, inet, bridge, bridge_reject):
    assert l3_line(verdict=verdict).endswith(f" {inet}")
    assert l3_line(verdict=verdict, conntrack="bridge").endswith(f" {bridge}")
    assert l3_line(verdict=verdict, conntrack="bridge", l2_reject=True).endswith(f" {bridge_reject}")


@pytest.mark.parametrize("comment, expected", [
    ("plain", '"plain"'),
    ('say "hi"', "\"say 'hi'\""),
    ("tab\there\nnewline", '"tab here newline"'),
    ("a $b \\ c; d # e", '"a $b \\ c; d # e"'),
    ("x" * 300, '"' + "x" * 128 + '"'),
    ("é" * 100, '"' + "é" * 64 + '"'),  # 128 bytes, cut on a character boundary
])
def test_comments(comment, expected):
    assert l3_line(comment=comment) == f"meta nfproto ipv4 meta l4proto 6 return comment {expected}"


def test_l3_order_connlimit_after_matches_comment_last():
    line = l3_line(c(Field.CONNLIMIT_ABOVE, 3), c(Field.DPORT, NumRange(22, 22)), c(Field.CT_STATE, ("NEW",)),
                   comment="c", verdict=Verdict.DROP)
    assert line == ("meta nfproto ipv4 meta l4proto 6 th dport 22 ct state new "
                    "add @CL-1/vnet0/1 { ip saddr ct count over 3 } drop comment \"c\"")


# ----------------------------------------------------------------------------------------------
# Chains, jumps, layout


def sample() -> PortRuleset:
    sub = SubChain("arp-ip", -510, (L2Rule((c(Field.ETHER_TYPE, 0x806),), Verdict.RETURN, ORIGIN),))
    from_vm = L2Side((Jump("arp-ip", (c(Field.ETHER_TYPE, 0x806),)), L2Rule((), Verdict.DROP, ORIGIN)), (sub,))
    to_vm = L2Side((L2Rule((), Verdict.ACCEPT, ORIGIN),))
    fo = (L3Rule(4, "tcp", (c(Field.DPORT, NumRange(22, 22)),), Verdict.ACCEPT, ORIGIN),)
    return PortRuleset(from_vm=from_vm, to_vm=to_vm, fo=fo)


def test_subchains_jumps_and_dispatch():
    text, records = render(NftablesBackend(), [PortChange("vnet0", None, sample())], [])
    # the sub-chain ends in accept: libvirt's ebtables chains have policy ACCEPT
    assert rules_of(text, "I-1/vnet0") == ["ether type 0x0806 jump I-1/vnet0/arp-ip", "drop", "ether type 0x0806 return", "accept"]
    assert f'add element bridge {T0} l2_from_vm {{ "vnet0" : jump I-1/vnet0 }}' in text
    assert f'add element bridge {T0} l2_to_vm {{ "vnet0" : jump O-1/vnet0 }}' in text
    # chains exist before any rule jumps to them
    assert text.index(f"add chain bridge {T0} I-1/vnet0/arp-ip") < text.index("jump I-1/vnet0/arp-ip")
    # only FO rules: egress mark, no ingress mark rule in the from-VM root chain
    assert "meta mark set" not in " ".join(rules_of(text, "I-1/vnet0"))
    assert rules_of(text, "MO-1/vnet0") == ["meta mark set meta mark & 0xfff000ff | 0x00000100"]
    assert records["vnet0"] == {
        "backend": "nftables", "format": 1, "mode": "inet", "gen": 1, "id": 1,
        "chains": [["bridge", "I-1/vnet0"], ["bridge", "I-1/vnet0/arp-ip"], ["bridge", "O-1/vnet0"],
                   ["inet", "FO-1/vnet0"], ["bridge", "MO-1/vnet0"]],
        "sets": [],
        "elements": [["bridge", "l2_from_vm", "vnet0"], ["bridge", "l2_to_vm", "vnet0"],
                     ["inet", "fo", 0x100], ["bridge", "mark_out", "vnet0"], ["inet", "port_ids", 1]],
    }


def test_ingress_mark_is_the_first_rule_of_the_from_vm_root():
    rs = PortRuleset(from_vm=L2Side((L2Rule((), Verdict.ACCEPT, ORIGIN),)),
                     fi=(L3Rule(4, "all", (), Verdict.DROP, ORIGIN),))
    text, _ = render(NftablesBackend(), [PortChange("vnet0", None, rs)], [])
    assert rules_of(text, "I-1/vnet0") == ["meta mark set meta mark & 0x000fffff | 0x00100000", "accept"]
    # an L3-only port still gets a from-VM chain for the mark
    rs = PortRuleset(hi=(L3Rule(4, "all", (), Verdict.DROP, ORIGIN),))
    text, _ = render(NftablesBackend(), [PortChange("vnet0", None, rs)], [])
    assert rules_of(text, "I-1/vnet0") == ["meta mark set meta mark & 0x000fffff | 0x00100000"]
    assert "MO-1" not in text


def test_bridge_mode_layout_has_no_marks_and_no_inet_table():
    text, records = render(NftablesBackend(conntrack="bridge"), [PortChange("vnet0", None, sample())])
    assert "inet" not in text.replace("nftables batch", "")
    assert "mark" not in text and IDS_TABLE not in text
    b = f"bridge {T0}"
    assert f"add chain {b} l3-fwd-in {{ type filter hook forward priority 0; policy accept; }}" in text
    assert f"add chain {b} l3-fwd-out {{ type filter hook forward priority 1; policy accept; }}" in text
    assert f"add chain {b} l3-input {{ type filter hook input priority 0; policy accept; }}" in text
    assert f"add rule {b} l3-fwd-in iifname vmap @fi" in text
    assert f"add rule {b} l3-fwd-out oifname vmap @fo" in text
    assert f"add rule {b} l3-input iifname vmap @hi" in text
    assert [l for l in text.splitlines() if "vmap @f" in l] == [f"add rule {b} l3-fwd-in iifname vmap @fi",
                                                                f"add rule {b} l3-fwd-out oifname vmap @fo"]
    assert f'add element {b} fo {{ "vnet0" : jump FO-1/vnet0 }}' in text
    assert rules_of(text, "FO-1/vnet0") == ["ether type 0x0800 meta l4proto 6 th dport 22 accept"]
    assert records["vnet0"]["id"] is None and records["vnet0"]["mode"] == "bridge"


def test_base_chains_and_priorities_inet_mode():
    text, _ = render(NftablesBackend(), [PortChange("vnet0", None, sample())])
    b, i = f"bridge {T0}", f"inet {T0}"
    for expected in [
        f"add chain {b} l2-from-vm {{ type filter hook prerouting priority -300; policy accept; }}",
        f"add chain {b} l2-to-vm {{ type filter hook postrouting priority 300; policy accept; }}",
        f"add chain {b} mark-out {{ type filter hook forward priority -200; policy accept; }}",
        f"add chain {i} l3-fwd-in {{ type filter hook forward priority 0; policy accept; }}",
        f"add chain {i} l3-fwd-out {{ type filter hook forward priority 1; policy accept; }}",
        f"add chain {i} l3-input {{ type filter hook input priority 0; policy accept; }}",
        f"add rule {b} l2-from-vm iifname vmap @l2_from_vm",
        f"add rule {b} l2-to-vm oifname vmap @l2_to_vm",
        f"add rule {b} mark-out oifname vmap @mark_out",
        f"add rule {i} l3-fwd-in meta mark & 0xfff00000 vmap @fi",
        f"add rule {i} l3-fwd-out meta mark & 0x000fff00 vmap @fo",
        f"add rule {i} l3-input meta mark & 0xfff00000 vmap @hi",
        f"add table inet {IDS_TABLE}",
        f"add map inet {IDS_TABLE} port_ids {{ type mark : ifname; }}",
    ]:
        assert expected in text
    # FI before FO: each in its own base chain, FO's at a later priority of the same hook (FI's
    # return continues with FO, whichever shards the two ports are in); one dispatch rule each
    assert [l for l in text.splitlines() if "vmap @f" in l] == [
        f"add rule {i} l3-fwd-in meta mark & 0xfff00000 vmap @fi",
        f"add rule {i} l3-fwd-out meta mark & 0x000fff00 vmap @fo"]
    assert " l3-fwd " not in text
    # base chains are flushed and refilled every time, never appended to twice
    for chain in ("l2-from-vm", "l2-to-vm", "mark-out", "l3-fwd-in", "l3-fwd-out", "l3-input"):
        where = f"{i if chain.startswith('l3') else b} {chain}"
        assert text.count(f"add rule {where} ") == 1
        assert text.index(f"flush chain {where}\n") < text.index(f"add rule {where} ")
    assert "flush ruleset" not in text and "delete table" not in text
    # port_ids is in the ids table only; the shard has no such map
    assert "port_ids" not in "".join(l for l in text.splitlines() if T0 in l)


def test_mark_layout_is_configurable():
    backend = NftablesBackend(mark_shift=0, id_bits=8)
    assert (backend.marks.in_mask, backend.marks.out_mask, backend.marks.max_id) == (0xFF00, 0xFF, 255)
    with pytest.raises(ValueError):
        NftablesBackend(mark_shift=16, id_bits=12)


# ----------------------------------------------------------------------------------------------
# Batches, records, ids


def test_replace_switches_elements_then_removes_old_generation():
    """A change of shape (here: FI rules no more) makes a new generation and switches to it."""
    backend = NftablesBackend()
    before = dataclasses.replace(sample(), fi=(L3Rule(4, "udp", (), Verdict.DROP, ORIGIN),))
    _, records = render(backend, [PortChange("vnet0", None, before)], [])
    text, new = render(backend, [PortChange("vnet0", records["vnet0"], sample())])
    assert new["vnet0"]["gen"] == 2 and new["vnet0"]["id"] == 1
    lines = text.splitlines()
    first_new_rule = next(i for i, l in enumerate(lines) if l.startswith(f"add rule bridge {T0} I-2/"))
    delete = lines.index(f'delete element bridge {T0} l2_from_vm {{ "vnet0" }}')
    add = lines.index(f'add element bridge {T0} l2_from_vm {{ "vnet0" : jump I-2/vnet0 }}')
    flush = lines.index(f"flush chain bridge {T0} I-1/vnet0")
    drop = lines.index(f"delete chain bridge {T0} I-1/vnet0")
    assert first_new_rule < delete < add < flush < drop
    assert f"delete element inet {IDS_TABLE} port_ids {{ 0x00000001 }}" in lines
    assert f'add element inet {IDS_TABLE} port_ids {{ 0x00000001 : "vnet0" }}' in lines
    # every old chain is flushed before any is deleted (sub-chains are jump targets)
    flushes = [i for i, l in enumerate(lines) if l.startswith("flush chain") and "-1/" in l]
    deletes = [i for i, l in enumerate(lines) if l.startswith("delete chain")]
    assert max(flushes) < min(deletes)


def test_a_port_of_the_same_shape_is_refilled_in_place():
    """New rules needing exactly the chains and elements the record lists: those chains are
    flushed and filled again (no chain made or removed, no switch, same record); a port with a
    connlimit set, and a rebuild, make a new generation instead."""
    backend = NftablesBackend()
    _, records = render(backend, [PortChange("vnet0", None, sample())], [])
    changed = dataclasses.replace(sample(), to_vm=L2Side((L2Rule((), Verdict.DROP, ORIGIN),)))
    text, new = render(backend, [PortChange("vnet0", records["vnet0"], changed)])
    assert new == records
    lines = text.splitlines()
    port_lines = [line for line in lines if "vnet0" in line and not line.startswith("#")]
    flushes = [f"flush chain {family} {T0} {name}" for family, name in records["vnet0"]["chains"]]
    assert port_lines[:len(flushes)] == flushes
    assert rules_of(text, "O-1/vnet0") == ["drop"] and rules_of(text, "I-1/vnet0/arp-ip") == ["ether type 0x0806 return", "accept"]
    assert not [line for line in port_lines if line.startswith(("add chain", "delete chain", "flush set"))
                or (line.startswith(("add element", "delete element")) and "jump" in line)]
    # the port's other dispatch slots are still probed
    assert f"add element inet {T0} fi {{ 0x00100000 : accept }}" in lines
    with_set = dataclasses.replace(sample(), fi=(L3Rule(4, "tcp", (c(Field.CONNLIMIT_ABOVE, 4),), Verdict.DROP, ORIGIN),))
    _, first = render(backend, [PortChange("vnet1", None, with_set)], [])
    _, again = render(backend, [PortChange("vnet1", first["vnet1"], with_set)])
    assert first["vnet1"]["sets"] and again["vnet1"]["gen"] == 2
    rebuilt, records_rebuilt = backend.rebuild_plan([PortChange("vnet0", records["vnet0"], changed)])
    assert records_rebuilt["vnet0"]["gen"] == 2 and "refilled" not in rebuilt.apply[0].stdin


def test_delete_only_removes_what_the_record_lists():
    backend = NftablesBackend()
    _, records = render(backend, [PortChange("vnet0", None, PortRuleset(to_vm=sample().to_vm))])
    text, new = render(backend, [PortChange("vnet0", records["vnet0"], None)])
    assert new == {"vnet0": None}
    lines = text.splitlines()
    probes = [l for l in lines if l.endswith(": accept }")]
    deletions = [l for l in lines if l.startswith("delete") and l.replace("delete", "add", 1)[:-1] + ": accept }"
                 not in probes]
    assert deletions == [f'delete element bridge {T0} l2_to_vm {{ "vnet0" }}',
                         f"delete chain bridge {T0} O-1/vnet0"]
    # the port's other dispatch slots are probed (a leftover element there refuses the batch)
    assert probes == [f'add element bridge {T0} l2_from_vm {{ "vnet0" : accept }}',
                      f'add element bridge {T0} mark_out {{ "vnet0" : accept }}']


def test_batch_text_does_not_depend_on_other_ports():
    backend = NftablesBackend()
    others = {f"vnet{i}": render(backend, [PortChange(f"vnet{i}", None, sample())], range(1, i))[1][f"vnet{i}"]
              for i in range(1, 50)}
    alone, _ = render(backend, [PortChange("tap0", None, sample())], [7])
    crowded, _ = render(backend, [PortChange("tap0", None, sample())], [7] + [r["id"] for r in others.values()])
    assert len(alone.splitlines()) == len(crowded.splitlines())
    assert "vnet1" not in crowded


def test_id_allocation():
    backend = NftablesBackend()
    l3 = PortRuleset(fi=(L3Rule(4, "all", (), Verdict.DROP, ORIGIN),))
    l2 = PortRuleset(to_vm=sample().to_vm)
    _, r = render(backend, [PortChange("a", None, l3), PortChange("b", None, l2), PortChange("c", None, l3)], [])
    assert (r["a"]["id"], r["b"]["id"], r["c"]["id"]) == (1, None, 2)
    # kept across changes; the lowest id free of every known record and hint
    _, r2 = render(backend, [PortChange("c", r["c"], l3), PortChange("d", None, l3)], [r["a"]["id"], 3])
    assert (r2["c"]["id"], r2["d"]["id"]) == (2, 4)
    # ids of ports deleted in the same batch are not reused in it
    _, r3 = render(backend, [PortChange("a", r["a"], None), PortChange("e", None, l3)], [r["c"]["id"]])
    assert r3["e"]["id"] == 3
    # bridge mode: no ids at all
    _, r4 = render(NftablesBackend(conntrack="bridge"), [PortChange("a", None, l3)])
    assert r4["a"]["id"] is None
    # exhausted
    with pytest.raises(UnsupportedError, match="no free port id"):
        render(NftablesBackend(id_bits=2), [PortChange("z", None, l3)], [1, 2, 3])


def test_id_allocation_without_knowledge_of_other_ports():
    """ids_in_use=None: the search starts at a position derived from the port name (crc32), so
    that ports created one by one by a caller that passes no records rarely clash."""
    backend = NftablesBackend()
    l3 = PortRuleset(fi=(L3Rule(4, "all", (), Verdict.DROP, ORIGIN),))
    ids = {port: render(backend, [PortChange(port, None, l3)])[1][port]["id"] for port in ("vnet0", "vnet1", "vnet2")}
    assert len(set(ids.values())) == 3 and all(1 <= i <= 4095 for i in ids.values())
    assert render(backend, [PortChange("vnet0", None, l3)])[1]["vnet0"]["id"] == ids["vnet0"]  # deterministic
    # still never one another port of the batch has
    other = {"backend": "nftables", "mode": "inet", "gen": 1, "id": ids["vnet0"], "chains": [], "elements": []}
    assert render(backend, [PortChange("x", other, l3), PortChange("vnet0", None, l3)])[1]["vnet0"]["id"] == \
        ids["vnet0"] % 4095 + 1


def test_plan_is_one_nft_step():
    backend = NftablesBackend(nft="/sbin/nft")
    plan, records = backend.plan([PortChange("vnet0", None, sample()), PortChange("vnet1", None, sample())])
    assert len(plan.apply) == 1 and not plan.commit and not plan.rollback
    assert plan.apply[0].argv == ("/sbin/nft", "-f", "-") and not plan.apply[0].ignore_errors
    assert set(records) == {"vnet0", "vnet1"}
    rebuild, _ = backend.rebuild_plan([PortChange("vnet0", records["vnet0"], sample())])
    text = rebuild.apply[0].stdin
    assert text.index(f"delete table bridge {LEGACY_TABLE}\n") < text.index(f"delete table bridge {T0}\n") < \
        text.index(f"add chain bridge {T0} I-2/vnet0")
    assert "delete element" not in text and "delete chain" not in text



def tables_named(text: str) -> set[tuple[str, str]]:
    """(family, table) of every line of ``text`` that names one."""
    return set(re.findall(r"^(?:add|delete|flush) \w+ (bridge|inet) (\S+)", text, re.M))


def test_ports_are_spread_over_shards_and_a_batch_ensures_only_theirs():
    assert {shard_of(f"vnet{i}") for i in range(64)} == set(SHARD_TABLES)
    t1 = shard_of("vnet1")
    assert T0 != t1
    text, _ = render(NftablesBackend(), [PortChange("vnet0", None, sample()), PortChange("vnet1", None, sample())], [])
    assert tables_named(text) == {("bridge", T0), ("inet", T0), ("bridge", t1), ("inet", t1), ("inet", IDS_TABLE)}
    for line in text.splitlines():  # every object of a port is in its own shard
        for port, table in (("vnet0", T0), ("vnet1", t1)):
            if f"/{port}" in line and "port_ids" not in line:
                assert f" {table} " in line, line
    assert f"add chain inet {t1} l3-fwd-in {{ type filter hook forward priority 0; policy accept; }}" in text
    # one port: its shard (and the ids table) only, no other shard named anywhere
    text, _ = render(NftablesBackend(), [PortChange("vnet0", None, sample())], [])
    assert tables_named(text) == {("bridge", T0), ("inet", T0), ("inet", IDS_TABLE)}
    assert not [l for l in text.splitlines() if any(t in l for t in SHARD_TABLES if t != T0)]
    text, _ = render(NftablesBackend(conntrack="bridge"), [PortChange("vnet0", None, sample())])
    assert tables_named(text) == {("bridge", T0)}


def test_port_ids_are_in_the_ids_table_and_unique_across_shards():
    l3 = PortRuleset(fi=(L3Rule(4, "all", (), Verdict.DROP, ORIGIN),))
    by_shard: dict[str, str] = {}
    for i in range(100):
        by_shard.setdefault(shard_of(f"vnet{i}"), f"vnet{i}")
    ports, other = [by_shard[t] for t in SHARD_TABLES[:-1]], by_shard[SHARD_TABLES[-1]]  # one per shard
    text, records = render(NftablesBackend(), [PortChange(p, None, l3) for p in ports], [])
    assert [records[p]["id"] for p in ports] == list(range(1, len(ports) + 1))
    assert [l for l in text.splitlines() if "port_ids" in l] == [
        f"add map inet {IDS_TABLE} port_ids {{ type mark : ifname; }}",
        *(f'add element inet {IDS_TABLE} port_ids {{ 0x0000000{i} : "{p}" }}' for i, p in enumerate(ports, 1))]
    # the ids table holds the id registry only
    assert {" ".join(l.split()[:5]) for l in text.splitlines() if IDS_TABLE in l} == {
        f"add table inet {IDS_TABLE}", f"add map inet {IDS_TABLE} port_ids", f"add element inet {IDS_TABLE} port_ids"}
    # a port of another shard, given the ids in use, gets a free one
    _, r = render(NftablesBackend(), [PortChange(other, None, l3)], [records[p]["id"] for p in ports])
    assert r[other]["id"] == len(ports) + 1


def test_rebuild_deletes_every_table_of_ours_before_creating_anything():
    backend = NftablesBackend()
    _, records = render(backend, [PortChange("vnet0", None, sample())], [])
    plan, _ = backend.rebuild_plan([PortChange("vnet0", records["vnet0"], sample())])
    lines = plan.apply[0].stdin.splitlines()
    deletes = [i for i, l in enumerate(lines) if l.startswith("delete table ")]
    assert {lines[i] for i in deletes} == {f"delete table {family} {table}"
                                          for family in ("bridge", "inet") for table in OUR_TABLES}
    assert all(lines[i - 1] == lines[i].replace("delete", "add", 1) for i in deletes)  # idempotent
    first_creation = next(i for i, l in enumerate(lines) if l.startswith("add ") and not l.startswith("add table "))
    assert max(deletes) < first_creation
    # then only the port's shard (and the ids table) is ensured
    assert tables_named("\n".join(lines[max(deletes) + 1:])) == {("bridge", T0), ("inet", T0), ("inet", IDS_TABLE)}


def test_remove_all_names_every_table_of_ours_including_the_legacy_one():
    tables = ["libvirt_nwfilter", *(f"libvirt_nwfilter_{k}" for k in range(4)), "libvirt_nwfilter_ids"]
    assert set(tables) == OUR_TABLES and LEGACY_TABLE == "libvirt_nwfilter"
    text = remove_all_text()
    assert {l for l in text.splitlines() if l.startswith("delete ")} == {
        f"delete table {family} {table}" for family in ("bridge", "inet") for table in tables}
    assert NftablesBackend().teardown_plan([]).apply[0].stdin == text

def test_empty_batch_and_noop():
    text, records = render(NftablesBackend(), [])
    assert records == {} and "add element" not in text and "add table" not in text  # no shard to ensure
    text, records = render(NftablesBackend(), [PortChange("vnet0", None, None)])
    # nothing of vnet0 is created or deleted: its dispatch slots are only probed (add, delete)
    assert records == {"vnet0": None}
    assert [l for l in text.splitlines() if "vnet0" in l] == [
        f'{verb} element bridge {T0} {m} {{ "vnet0"{value} }}'
        for m in ("l2_from_vm", "l2_to_vm", "mark_out") for verb, value in (("add", " : accept"), ("delete", ""))]


@pytest.mark.parametrize("port", ["", "a" * 16, "vnet 0", 'x"y', "a/b", "a*", "..", "é"])
def test_bad_port_names_are_refused(port):
    with pytest.raises(ValidationError):
        render(NftablesBackend(), [PortChange(port, None, sample())])


def test_odd_port_and_chain_names_are_encoded():
    rs = PortRuleset(from_vm=L2Side((Jump("arp-x:y_z", ()),), (SubChain("arp-x:y_z", 0, ()),)))
    text, records = render(NftablesBackend(), [PortChange("a:b_c", None, rs)])
    assert records["a:b_c"]["chains"] == [["bridge", "I-1/a_cb__c"], ["bridge", "I-1/a_cb__c/arp-x_cy__z"]]
    assert f'add element bridge {shard_of("a:b_c")} l2_from_vm {{ "a:b_c" : jump I-1/a_cb__c }}' in text


def test_same_port_twice_and_foreign_records_are_refused():
    with pytest.raises(NwfilterError, match="twice"):
        render(NftablesBackend(), [PortChange("a", None, sample()), PortChange("a", None, None)])
    with pytest.raises(NwfilterError, match="backend"):
        render(NftablesBackend(), [PortChange("a", {"backend": "ebiptables"}, None)])
    bad = {"backend": "nftables", "gen": 1, "chains": [["bridge", "x; flush ruleset"]], "elements": []}
    with pytest.raises(NwfilterError, match="bad chain"):
        render(NftablesBackend(), [PortChange("a", bad, None)])


def test_teardown_and_probes():
    assert remove_all_text() == "".join(f"add table {family} {table}\ndelete table {family} {table}\n"
                                        for family in ("bridge", "inet") for table in sorted(OUR_TABLES))
    step, = NftablesBackend(nft="/x/nft").teardown_plan([]).apply
    assert step.argv == ("/x/nft", "-f", "-")
    # the cache warm-up: a dry run of a self-contained shard (table, map, base chain, rule, element)
    warm, = NftablesBackend(nft="/x/nft").warm_up_steps()
    assert warm.argv == ("/x/nft", "-c", "-f", "-")
    lines = warm.stdin.splitlines()
    assert lines[0] == f"add table bridge {SHARD_TABLES[0]}" and tables_named(warm.stdin) == {("bridge", SHARD_TABLES[0])}
    assert f"add rule bridge {SHARD_TABLES[0]} l2-from-vm accept" in lines
    assert f'add element bridge {SHARD_TABLES[0]} l2_from_vm {{ "-" : accept }}' in lines
    assert f"add map bridge {SHARD_TABLES[0]} l2_from_vm {{ type ifname : verdict; }}" in lines
    probe = probe_bridge_conntrack_text()
    assert "table bridge libvirt_nwfilter_probe" in probe and "ct state" in probe and "ct count" in probe
    assert "reject" in probe_l2_reject_text()
    assert NftablesBackend().needs_br_netfilter and not NftablesBackend(conntrack="bridge").needs_br_netfilter


def test_negated_prefixes_keep_their_form_beside_a_masked_compare():
    line = l3_line(c(Field.IP_DST, IpNet("10.0.0.0", 8, 4), True), c(Field.IP_SRC, IpNet("10.0.0.9", 32, 4), True),
                   c(Field.SPORT, NumRange(5, 5), True))
    assert "ip daddr != 10.0.0.0/8" in line
    assert "ip saddr & 255.255.255.255 != 10.0.0.9" in line and "th sport & 0xffff != 5" in line

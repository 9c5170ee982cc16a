"""Unit tests of the ebiptables backend: rendering of every IR field, names, plans, records."""

from __future__ import annotations

import json

import pytest

from golden.ebiptables import cases
from libvirt_nwfilter.backends.base import PortChange
from libvirt_nwfilter.backends.ebiptables import EbiptablesBackend, listing, names
from libvirt_nwfilter.backends.ebiptables.plan import ensure_globals_text, render_port
from libvirt_nwfilter.backends.ebiptables.render import fmt_comment, render_l2_conds, render_l2_rule, render_l3_args
from libvirt_nwfilter.backends.ebiptables.tools import TOOLS
from libvirt_nwfilter.errors import UnsupportedError
from libvirt_nwfilter.ir import Cond, Field, Icmpv6Range, IcmpType, IpNet, IpRange, IpSet, Jump, L2Rule, L2Side
from libvirt_nwfilter.ir import L3Rule, MacMatch, NumRange, PortRuleset, Side, SubChain, TcpFlags, Verdict

F = Field
MAC = "52:54:00:12:34:56"


def c(field, value, negated=False):
    return Cond(field, value, negated)


def l2args(*conds, jump=False):
    return " ".join(render_l2_conds(conds, jump=jump))


def l3args(protocol, *conds, family=4, verdict=Verdict.ACCEPT, comment=None):
    return " ".join(render_l3_args(L3Rule(family, protocol, tuple(conds), verdict, "t", comment)))


ET_IP, ET_IP6, ET_ARP, ET_RARP, ET_VLAN = (c(F.ETHER_TYPE, v) for v in (0x800, 0x86DD, 0x806, 0x8035, 0x8100))
STP = c(F.ETHER_DST, MacMatch("01:80:c2:00:00:00"))


# ---------------------------------------------------------------------------------------------
# L2: one test per field


@pytest.mark.parametrize(
    "conds, expected",
    [
        ((c(F.ETHER_SRC, MacMatch(MAC)),), f"-s {MAC}"),
        ((c(F.ETHER_SRC, MacMatch(MAC), True),), f"-s ! {MAC}"),
        ((c(F.ETHER_SRC, MacMatch("52:54:00:00:00:00", 24)),), "-s 52:54:00:00:00:00/ff:ff:ff:00:00:00"),
        ((c(F.ETHER_DST, MacMatch("01:00:5e:00:00:00", 25), True),), "-d ! 01:00:5e:00:00:00/ff:ff:ff:80:00:00"),
        ((c(F.ETHER_DST, MacMatch("01:00:00:00:00:00", 8)),), "-d 01:00:00:00:00:00/ff:00:00:00:00:00"),
        ((c(F.ETHER_TYPE, 0x806),), "-p 0x806"),
        ((c(F.ETHER_TYPE, 0x600, True),), "-p ! 0x600"),
        ((c(F.ETHER_TYPE, 0x835),), "-p 0x835"),
        ((ET_VLAN, c(F.VLAN_ID, 10)), "-p 0x8100 --vlan-id 10"),
        ((ET_VLAN, c(F.VLAN_ID, 4095, True)), "-p 0x8100 --vlan-id ! 4095"),
        # ebtables reads --vlan-encap as hex; libvirt's decimal 2054 would mean 0x2054.
        ((ET_VLAN, c(F.VLAN_ENCAP, 0x806)), "-p 0x8100 --vlan-encap 0x0806"),
        ((ET_VLAN, c(F.VLAN_ENCAP, 0x800, True)), "-p 0x8100 --vlan-encap ! 0x0800"),
        ((STP, c(F.STP_TYPE, 0x80)), "-d 01:80:c2:00:00:00 --stp-type 128"),
        ((STP, c(F.STP_FLAGS, 1, True)), "-d 01:80:c2:00:00:00 --stp-flags ! 1"),
        ((STP, c(F.STP_ROOT_PRIO, NumRange(1, 2))), "-d 01:80:c2:00:00:00 --stp-root-prio 1:2"),
        ((STP, c(F.STP_ROOT_ADDR, MacMatch(MAC, 40))), f"-d 01:80:c2:00:00:00 --stp-root-addr {MAC}/ff:ff:ff:ff:ff:00"),
        ((STP, c(F.STP_ROOT_COST, NumRange(3, 4), True)), "-d 01:80:c2:00:00:00 --stp-root-cost ! 3:4"),
        ((STP, c(F.STP_SENDER_PRIO, NumRange(5, 5))), "-d 01:80:c2:00:00:00 --stp-sender-prio 5"),
        ((STP, c(F.STP_SENDER_ADDR, MacMatch(MAC))), f"-d 01:80:c2:00:00:00 --stp-sender-addr {MAC}"),
        ((STP, c(F.STP_PORT, NumRange(6, 7))), "-d 01:80:c2:00:00:00 --stp-port 6:7"),
        ((STP, c(F.STP_MSG_AGE, NumRange(8, 8))), "-d 01:80:c2:00:00:00 --stp-msg-age 8"),
        ((STP, c(F.STP_MAX_AGE, NumRange(9, 10))), "-d 01:80:c2:00:00:00 --stp-max-age 9:10"),
        ((STP, c(F.STP_HELLO_TIME, NumRange(2, 2))), "-d 01:80:c2:00:00:00 --stp-hello-time 2"),
        ((STP, c(F.STP_FORWARD_DELAY, NumRange(11, 15), True)), "-d 01:80:c2:00:00:00 --stp-forward-delay ! 11:15"),
        ((ET_ARP, c(F.ARP_HTYPE, 1)), "-p 0x806 --arp-htype 1"),
        ((ET_ARP, c(F.ARP_OPCODE, 2, True)), "-p 0x806 --arp-opcode ! 2"),
        ((ET_ARP, c(F.ARP_PTYPE, 0x800)), "-p 0x806 --arp-ptype 0x800"),
        # ARP addresses always carry their own prefix (semantics §12 R4).
        ((ET_ARP, c(F.ARP_SPA, IpNet("10.0.0.5", 32, 4))), "-p 0x806 --arp-ip-src 10.0.0.5/32"),
        ((ET_ARP, c(F.ARP_SPA, IpNet("10.0.0.0", 24, 4)), c(F.ARP_TPA, IpNet("10.0.0.9", 32, 4), True)),
         "-p 0x806 --arp-ip-src 10.0.0.0/24 --arp-ip-dst ! 10.0.0.9/32"),
        ((ET_RARP, c(F.ARP_SHA, MAC)), f"-p 0x8035 --arp-mac-src {MAC}"),
        ((ET_ARP, c(F.ARP_THA, "ff:ff:ff:ff:ff:ff", True)), "-p 0x806 --arp-mac-dst ! ff:ff:ff:ff:ff:ff"),
        ((ET_ARP, c(F.ARP_GRATUITOUS, True)), "-p 0x806 --arp-gratuitous"),
        ((ET_ARP, c(F.ARP_GRATUITOUS, True, True)), "-p 0x806 ! --arp-gratuitous"),
        ((ET_IP, c(F.IP_SRC, IpNet("10.0.0.5", 32, 4))), "-p ipv4 --ip-source 10.0.0.5"),
        ((ET_IP, c(F.IP_DST, IpNet("10.0.0.0", 8, 4), True)), "-p ipv4 --ip-destination ! 10.0.0.0/8"),
        ((ET_IP, c(F.IP_PROTO, 17)), "-p ipv4 --ip-protocol 17"),
        ((ET_IP, c(F.IP_PROTO, 6), c(F.SPORT, NumRange(10, 20))), "-p ipv4 --ip-protocol 6 --ip-source-port 10:20"),
        ((ET_IP, c(F.IP_PROTO, 6), c(F.DPORT, NumRange(22, 22), True)), "-p ipv4 --ip-protocol 6 --ip-destination-port ! 22"),
        # DSCP shifted into the TOS byte (semantics §12 R3).
        ((ET_IP, c(F.DSCP, 46)), "-p ipv4 --ip-tos 0xb8"),
        ((ET_IP, c(F.DSCP, 63)), "-p ipv4 --ip-tos 0xfc"),
        ((ET_IP, c(F.DSCP, 3, True)), "-p ipv4 --ip-tos ! 0x0c"),
        ((ET_IP6, c(F.DSCP, 46)), "-p ipv6 --ip6-tclass 0xb8"),
        ((ET_IP6, c(F.IP_SRC, IpNet("fe80::", 10, 6))), "-p ipv6 --ip6-source fe80::/10"),
        ((ET_IP6, c(F.IP_DST, IpNet("ff02::1:2", 128, 6), True)), "-p ipv6 --ip6-destination ! ff02::1:2"),
        ((ET_IP6, c(F.IP_PROTO, 17), c(F.SPORT, NumRange(546, 546)), c(F.DPORT, NumRange(547, 547))),
         "-p ipv6 --ip6-protocol 17 --ip6-source-port 546 --ip6-destination-port 547"),
        ((ET_IP6, c(F.IP_PROTO, 58), c(F.ICMPV6_TYPE_CODE, Icmpv6Range(1, 2, 0, 255))),
         "-p ipv6 --ip6-protocol 58 --ip6-icmp-type 1:2/0:255"),
        ((ET_IP6, c(F.IP_PROTO, 58), c(F.ICMPV6_TYPE_CODE, Icmpv6Range(128, 128, 0, 0), True)),
         "-p ipv6 --ip6-protocol 58 --ip6-icmp-type ! 128:128/0:0"),
        ((), ""),
    ],
)
def test_l2_field(conds, expected):
    assert l2args(*conds) == expected


def test_l2_arguments_in_libvirt_order_whatever_the_ir_order():
    conds = (c(F.ARP_SHA, MAC), c(F.ARP_SPA, IpNet("10.0.0.1", 32, 4)), ET_RARP,
             c(F.ETHER_DST, MacMatch("ff:ff:ff:ff:ff:ff")), c(F.ARP_OPCODE, 3), c(F.ETHER_SRC, MacMatch(MAC)))
    assert l2args(*conds) == (
        f"-s {MAC} -d ff:ff:ff:ff:ff:ff -p 0x8035 --arp-opcode 3 --arp-ip-src 10.0.0.1/32 --arp-mac-src {MAC}"
    )
    ip = (c(F.DSCP, 1), c(F.DPORT, NumRange(1, 1)), c(F.SPORT, NumRange(2, 2)), c(F.IP_PROTO, 6),
          c(F.IP_DST, IpNet("1.1.1.1", 32, 4)), c(F.IP_SRC, IpNet("2.2.2.2", 32, 4)), ET_IP)
    assert l2args(*ip) == ("-p ipv4 --ip-source 2.2.2.2 --ip-destination 1.1.1.1 --ip-protocol 6 "
                           "--ip-source-port 2 --ip-destination-port 1 --ip-tos 0x04")


@pytest.mark.parametrize(
    "conds, expected",
    [
        ((), ""),
        ((c(F.ETHER_TYPE, 0x800),), "-p 0x0800"),
        ((c(F.ETHER_TYPE, 0x806),), "-p 0x0806"),
        ((c(F.ETHER_TYPE, 0x8100),), "-p 0x8100"),
        ((STP,), "-d 01:80:c2:00:00:00"),
    ],
)
def test_jump_conditions(conds, expected):
    assert l2args(*conds, jump=True) == expected


@pytest.mark.parametrize(
    "conds, message",
    [
        ((c(F.ARP_OPCODE, 1),), "ARP fields"),
        ((c(F.ETHER_TYPE, 0x806, True), c(F.ARP_OPCODE, 1)), "ARP fields"),
        ((c(F.VLAN_ID, 1),), "VLAN fields"),
        ((c(F.IP_PROTO, 6),), "IP fields"),
        ((c(F.STP_TYPE, 0),), "STP fields"),
        ((ET_IP, c(F.ICMPV6_TYPE_CODE, Icmpv6Range(0, 1, 0, 1))), "ICMPv6"),
        ((ET_IP, c(F.IP_SRC, IpNet("fe80::", 10, 6))), "IPv6 address"),
        ((c(F.SRC_MAC, MAC),), "cannot be matched at L2"),
        ((c(F.CT_STATE, ("NEW",)),), "cannot be matched at L2"),
    ],
)
def test_l2_refusals(conds, message):
    with pytest.raises(UnsupportedError, match=message):
        render_l2_conds(conds)


@pytest.mark.parametrize(
    "verdict, target",
    [(Verdict.ACCEPT, "ACCEPT"), (Verdict.DROP, "DROP"), (Verdict.REJECT, "DROP"),
     (Verdict.RETURN, "RETURN"), (Verdict.CONTINUE, "CONTINUE")],
)
def test_l2_targets(verdict, target):
    assert render_l2_rule("X", L2Rule((), verdict, "t")) == f"-A X -j {target}"


# ---------------------------------------------------------------------------------------------
# L3: one test per field


@pytest.mark.parametrize(
    "protocol, conds, expected",
    [
        ("all", (), "-p all"),
        ("udplite", (), "-p udplite"),
        ("esp", (), "-p esp"),
        ("ah", (), "-p ah"),
        ("igmp", (), "-p igmp"),
        ("all", (c(F.SRC_MAC, MAC),), f"-p all -m mac --mac-source {MAC}"),
        ("all", (c(F.SRC_MAC, MAC, True),), f"-p all -m mac ! --mac-source {MAC}"),
        ("all", (c(F.IP_SRC, IpNet("10.0.0.1", 32, 4)),), "-p all --source 10.0.0.1"),
        ("all", (c(F.IP_SRC, IpNet("10.0.0.0", 24, 4), True),), "-p all ! --source 10.0.0.0/24"),
        ("all", (c(F.IP_DST, IpNet("10.0.0.1", 32, 4), True),), "-p all ! --destination 10.0.0.1"),
        ("all", (c(F.IP_SRC_RANGE, IpRange("10.0.0.1", "10.0.0.9", 4)),), "-p all -m iprange --src-range 10.0.0.1-10.0.0.9"),
        ("all", (c(F.IP_SRC_RANGE, IpRange("10.0.0.1", "10.0.0.1", 4), True),), "-p all -m iprange ! --src-range 10.0.0.1"),
        ("all", (c(F.IP_DST_RANGE, IpRange("10.0.0.1", "10.0.0.2", 4), True),), "-p all -m iprange ! --dst-range 10.0.0.1-10.0.0.2"),
        ("all", (c(F.DSCP, 10),), "-p all -m dscp --dscp 10"),
        ("all", (c(F.DSCP, 63, True),), "-p all -m dscp ! --dscp 63"),
        ("tcp", (c(F.TCP_FLAGS, TcpFlags(0x12, 0x02)),), "-p tcp --tcp-flags SYN,ACK SYN"),
        ("tcp", (c(F.TCP_FLAGS, TcpFlags(0x3F, 0x00), True),), "-p tcp ! --tcp-flags ALL NONE"),
        ("tcp", (c(F.TCP_FLAGS, TcpFlags(0x3F, 0x3F)),), "-p tcp --tcp-flags ALL ALL"),
        ("tcp", (c(F.TCP_FLAGS, TcpFlags(0x2D, 0x21)),), "-p tcp --tcp-flags FIN,RST,PSH,URG FIN,URG"),
        ("tcp", (c(F.SPORT, NumRange(1024, 65535)),), "-p tcp --sport 1024:65535"),
        ("udp", (c(F.DPORT, NumRange(53, 53), True),), "-p udp ! --dport 53"),
        ("sctp", (c(F.SPORT, NumRange(1, 2), True),), "-p sctp ! --sport 1:2"),
        ("tcp", (c(F.TCP_OPTION, 5),), "-p tcp --tcp-option 5"),
        ("tcp", (c(F.TCP_OPTION, 2, True),), "-p tcp ! --tcp-option 2"),
        ("icmp", (c(F.ICMP_TYPE, IcmpType(8)),), "-p icmp --icmp-type 8"),
        ("icmp", (c(F.ICMP_TYPE, IcmpType(3, 4), True),), "-p icmp ! --icmp-type 3/4"),
        ("all", (c(F.CT_STATE, ("NEW", "ESTABLISHED")),), "-p all -m conntrack --ctstate NEW,ESTABLISHED"),
        ("all", (c(F.CT_STATE, ("RELATED", "INVALID")),), "-p all -m conntrack --ctstate RELATED,INVALID"),
        ("all", (c(F.CT_DIRECTION, "original"),), "-p all -m conntrack --ctdir Original"),
        ("all", (c(F.CT_DIRECTION, "reply"),), "-p all -m conntrack --ctdir Reply"),
        ("all", (c(F.IPSET, IpSet("trusted", ("src",))),), "-p all -m set --match-set trusted src"),
        ("all", (c(F.IPSET, IpSet("a b", ("dst", "src"))),), '-p all -m set --match-set "a b" dst,src'),
        ("all", (c(F.CONNLIMIT_ABOVE, 10),), "-p all -m connlimit --connlimit-above 10"),
        ("all", (c(F.CONNLIMIT_ABOVE, 3, True),), "-p all -m connlimit ! --connlimit-above 3"),
    ],
)
def test_l3_field(protocol, conds, expected):
    assert l3args(protocol, *conds, verdict=Verdict.CONTINUE) == expected


def test_l3_ipv6():
    assert l3args("icmpv6", c(F.ICMP_TYPE, IcmpType(128, 0)), family=6) == "-p icmpv6 --icmpv6-type 128/0 -j ACCEPT"
    assert l3args("icmp", c(F.ICMP_TYPE, IcmpType(1)), family=6) == "-p icmpv6 --icmpv6-type 1 -j ACCEPT"
    assert l3args("tcp", c(F.IP_SRC, IpNet("fd00::", 64, 6)), c(F.IP_DST, IpNet("fd00::1", 128, 6)), family=6) == (
        "-p tcp --source fd00::/64 --destination fd00::1 -j ACCEPT"
    )
    assert l3args("all", c(F.IP_DST_RANGE, IpRange("fd00::1", "fd00::9", 6)), family=6) == (
        "-p all -m iprange --dst-range fd00::1-fd00::9 -j ACCEPT"
    )


def test_l3_order_follows_libvirt_not_the_ir():
    conds = (
        c(F.CONNLIMIT_ABOVE, 2), c(F.IPSET, IpSet("s", ("src",))), c(F.CT_DIRECTION, "reply"),
        c(F.CT_STATE, ("ESTABLISHED",)), c(F.TCP_OPTION, 1), c(F.DPORT, NumRange(2, 2)), c(F.SPORT, NumRange(3, 3)),
        c(F.TCP_FLAGS, TcpFlags(2, 2)), c(F.DSCP, 4), c(F.IP_DST, IpNet("1.1.1.1", 32, 4)),
        c(F.IP_SRC_RANGE, IpRange("2.2.2.1", "2.2.2.2", 4)), c(F.SRC_MAC, MAC),
    )
    assert l3args("tcp", *conds, comment="hi") == (
        f"-p tcp -m mac --mac-source {MAC} -m iprange --src-range 2.2.2.1-2.2.2.2 --destination 1.1.1.1 "
        "-m dscp --dscp 4 --tcp-flags SYN SYN --sport 3 --dport 2 --tcp-option 1 "
        "-m conntrack --ctstate ESTABLISHED -m conntrack --ctdir Reply -m set --match-set s src "
        "-m connlimit --connlimit-above 2 -m comment --comment hi -j ACCEPT"
    )


@pytest.mark.parametrize(
    "verdict, tail",
    [(Verdict.ACCEPT, " -j ACCEPT"), (Verdict.DROP, " -j DROP"), (Verdict.REJECT, " -j REJECT"),
     (Verdict.RETURN, " -j RETURN"), (Verdict.CONTINUE, "")],
)
def test_l3_targets(verdict, tail):
    # continue at L3 is a rule without target (semantics §12 R1)
    assert l3args("all", verdict=verdict) == "-p all" + tail


@pytest.mark.parametrize(
    "text, rendered",
    [
        ("plain", "plain"),
        ("st new", '"st new"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\nbreak\ttab", '"line break tab"'),
        ("", '""'),
        ("#hash", '"#hash"'),
    ],
)
def test_comment_quoting(text, rendered):
    assert l3args("all", comment=text).endswith(f"-m comment --comment {rendered} -j ACCEPT")


def test_comment_truncated_to_255_bytes_on_a_character_boundary():
    assert len(fmt_comment("x" * 300)) == 255
    text = fmt_comment("é" * 200)  # 2 bytes each
    assert len(text.encode()) == 254 and text == "é" * 127


@pytest.mark.parametrize(
    "protocol, cond, message",
    [
        ("udp", c(F.TCP_FLAGS, TcpFlags(2, 2)), "TCP flags"),
        ("udp", c(F.TCP_OPTION, 2), "TCP option"),
        ("all", c(F.SPORT, NumRange(1, 1)), "ports"),
        ("tcp", c(F.ICMP_TYPE, IcmpType(1)), "ICMP type"),
        ("all", c(F.IPSET, IpSet("s", ("src",)), True), "negated ipset"),
        ("all", c(F.CT_STATE, ("NEW",), True), "connection state"),
        ("all", c(F.CT_DIRECTION, "sideways"), "connection direction"),
        ("all", c(F.ETHER_TYPE, 0x800), "cannot be matched at L3"),
        ("all", c(F.IP_SRC, IpNet("fe80::", 10, 6)), "IPv6 address"),
    ],
)
def test_l3_refusals(protocol, cond, message):
    with pytest.raises(UnsupportedError, match=message):
        l3args(protocol, cond)


# ---------------------------------------------------------------------------------------------
# Names


def test_chain_names_and_budget():
    port, suffix = "a" * 15, "b" * 12
    assert names.l2_root_chain(Side.FROM_VM, "vnet0") == "nwf-I-vnet0"
    assert names.l2_root_chain(Side.TO_VM, "vnet0", temp=True) == "nwf-P-vnet0"
    assert names.l2_sub_chain(Side.FROM_VM, "vnet0", "arp-ip") == "NI-vnet0:arp-ip"
    assert names.l2_sub_chain(Side.TO_VM, "vnet0", "ipv4", temp=True) == "NP-vnet0:ipv4"
    assert names.l3_chain("fo", "vnet0") == "NFO-vnet0" and names.l3_chain("hi", "vnet0", True) == "NHJ-vnet0"
    longest_eb = [names.l2_sub_chain(s, port, suffix, t) for s in Side for t in (False, True)]
    longest_eb += [names.l2_root_chain(s, port, t) for s in Side for t in (False, True)]
    assert max(map(len, longest_eb)) == names.EBTABLES_CHAIN_MAX == 31
    longest_ipt = [names.l3_chain(cp, port, t) for cp in names.L3_COPIES for t in (False, True)]
    assert max(map(len, longest_ipt + list(names.GLOBAL_CHAINS))) <= names.IPTABLES_CHAIN_MAX


def test_names_never_look_like_libvirts():
    libvirt_prefixes = ("libvirt-", "I-", "O-", "J-", "P-", "FI-", "FO-", "FJ-", "FP-", "HI-", "HJ-")
    ours = [names.l2_root_chain(s, "vnet0", t) for s in Side for t in (False, True)]
    ours += [names.l2_sub_chain(s, "vnet0", "mac", t) for s in Side for t in (False, True)]
    ours += [names.l3_chain(cp, "vnet0", t) for cp in names.L3_COPIES for t in (False, True)]
    ours += list(names.GLOBAL_CHAINS)
    assert not [n for n in ours if n.startswith(libvirt_prefixes)]


def test_sub_chain_names_of_different_ports_cannot_collide():
    # libvirt: I-a-arp-mac is both (port a-arp, chain mac) and (port a, chain arp-mac)
    assert names.l2_sub_chain(Side.FROM_VM, "a-arp", "mac") != names.l2_sub_chain(Side.FROM_VM, "a", "arp-mac")


@pytest.mark.parametrize("port", ["vnet0", "tap-a.1", "v_1", "x" * 15, "veth@1"])
def test_good_ports(port):
    assert names.check_port(port) == port


@pytest.mark.parametrize("port", ["", "x" * 16, "vnet+", "a:b", "a b", "-x", "a!b", 'a"b', "#a", "a/b", "."])
def test_bad_ports(port):
    with pytest.raises(UnsupportedError, match="port name"):
        names.check_port(port)


def test_bad_sub_chain_name():
    rs = PortRuleset(from_vm=L2Side(root=(Jump("arp x", ()),), subchains=(SubChain("arp x", 1, ()),)))
    with pytest.raises(UnsupportedError, match="sub-chain"):
        render_port("vp1", rs)


def test_jump_to_unknown_sub_chain():
    rs = PortRuleset(from_vm=L2Side(root=(Jump("mac", ()),)))
    with pytest.raises(UnsupportedError, match="unknown sub-chain"):
        render_port("vp1", rs)


# ---------------------------------------------------------------------------------------------
# Plans and records

backend = EbiptablesBackend()


def plan_for(port, old, new):
    return backend.plan([PortChange(port, old, new)])


def tools_of(steps):
    return [s.argv[0] for s in steps]


def test_fresh_port_plan_shape():
    plan, recs = plan_for("vnet0", None, cases.mixed())
    assert tools_of(plan.apply) == ["ebtables-restore", "iptables-restore", "iptables-restore",
                                    "ip6tables-restore", "ip6tables-restore"]
    ensure4, main4 = plan.apply[1], plan.apply[2]
    assert ensure4.ignore_errors and not main4.ignore_errors
    assert ensure4.stdin == ensure_globals_text()
    assert tools_of(plan.commit) == ["iptables-restore", "ip6tables-restore", "ebtables-restore"]
    assert tools_of(plan.rollback) == ["ip6tables-restore", "iptables-restore", "ebtables-restore"]
    assert all(s.ignore_errors for s in plan.rollback)
    assert all(s.argv[1:] == ("-w", "--noflush") for s in plan.apply + plan.commit if s.argv[0] != "ebtables-restore")
    assert plan.apply[0].argv == ("ebtables-restore", "--noflush")
    # new root chains are linked after the old ones (appended), under temporary names
    assert "-A PREROUTING -i vnet0 -j nwf-J-vnet0\n" in plan.apply[0].stdin
    assert "-A nwf-in -m physdev --physdev-in vnet0 -g NFJ-vnet0\n" in main4.stdin
    assert "-A nwf-out -m physdev --physdev-is-bridged --physdev-out vnet0 -g NFP-vnet0\n" in main4.stdin
    assert "-A nwf-host-in -m physdev --physdev-in vnet0 -g NHJ-vnet0\n" in main4.stdin
    assert "-A nwf-in-post -m physdev --physdev-in vnet0 -j ACCEPT\n" in main4.stdin
    assert main4.stdin.startswith("*filter\n") and main4.stdin.endswith("COMMIT\n")
    assert plan.apply[0].stdin.startswith("*nat\n")
    # commit renames; the links follow the rename
    assert "-E nwf-J-vnet0 nwf-I-vnet0\n" in plan.commit[2].stdin
    assert "-E NFJ-vnet0 NFI-vnet0\n" in plan.commit[0].stdin
    rec = recs["vnet0"]
    assert json.loads(json.dumps(rec)) == rec
    assert rec["ebtables"]["rules"] == ["-A PREROUTING -i vnet0 -j nwf-I-vnet0", "-A POSTROUTING -o vnet0 -j nwf-O-vnet0"]
    assert rec["l2"]["from-vm"] == ["mac", "ipv4-ip", "arp-mac", "arp-ip", "rarp"]
    assert rec["l3"] == [4, 6]
    assert "-A nwf-in-post -m physdev --physdev-in vnet0 -j ACCEPT" in rec["iptables"]["rules"]


def test_replace_keeps_in_post_and_tears_old():
    _, recs = plan_for("vnet0", None, cases.mixed())
    plan, recs2 = plan_for("vnet0", recs["vnet0"], cases.mixed())
    assert recs2 == recs
    ipt_apply = plan.apply[2].stdin
    assert "nwf-in-post" not in ipt_apply  # already there
    ipt_commit = plan.commit[0].stdin
    assert "-D nwf-in -m physdev --physdev-in vnet0 -g NFI-vnet0\n" in ipt_commit
    assert "nwf-in-post" not in ipt_commit
    assert ipt_commit.index(":NFI-vnet0 - [0:0]") < ipt_commit.index("-X NFI-vnet0") < ipt_commit.index("-E NFJ-vnet0 NFI-vnet0")
    eb_commit = plan.commit[2].stdin
    assert eb_commit.index("-D PREROUTING -i vnet0 -j nwf-I-vnet0") < eb_commit.index(":nwf-I-vnet0 ACCEPT")
    assert "-X NI-vnet0:mac\n" in eb_commit
    # rollback does not touch the in-post rule it did not add
    assert "nwf-in-post" not in plan.rollback[1].stdin


def test_dropping_a_family_removes_its_in_post_rule():
    _, recs = plan_for("vnet0", None, cases.mixed())
    plan, recs2 = plan_for("vnet0", recs["vnet0"], cases.clean_traffic())
    assert tools_of(plan.apply) == ["ebtables-restore"]
    commit = {s.argv[0]: s.stdin for s in plan.commit}
    assert "-D nwf-in-post -m physdev --physdev-in vnet0 -j ACCEPT\n" in commit["iptables-restore"]
    assert "-X NFI-vnet0\n" in commit["ip6tables-restore"]
    assert recs2["vnet0"]["iptables"] == {"chains": [], "rules": []}


def test_removal_is_commit_only():
    _, recs = plan_for("vnet0", None, cases.mixed())
    plan, recs2 = plan_for("vnet0", recs["vnet0"], None)
    assert plan.apply == () and plan.rollback == ()
    assert tools_of(plan.commit) == ["iptables-restore", "ip6tables-restore", "ebtables-restore"]
    assert recs2 == {"vnet0": None}
    ebt = plan.commit[2].stdin
    assert "-E " not in ebt and "-D POSTROUTING -o vnet0 -j nwf-O-vnet0\n" in ebt


def test_removing_an_unknown_port_does_nothing():
    plan, recs = plan_for("vnet0", None, None)
    assert plan.apply == plan.commit == plan.rollback == ()
    assert recs == {"vnet0": None}


def test_empty_ruleset_has_no_steps_but_a_record():
    plan, recs = plan_for("vnet0", None, PortRuleset())
    assert plan.apply == plan.commit == plan.rollback == ()
    assert recs["vnet0"]["l2"] == {"from-vm": None, "to-vm": None} and recs["vnet0"]["l3"] == []


def test_l2_only_and_v6_only():
    plan, _ = plan_for("vp1", None, cases.to_vm_only())
    assert tools_of(plan.apply) == ["ebtables-restore"]
    assert "nwf-J-vp1" not in plan.apply[0].stdin and "nwf-P-vp1" in plan.apply[0].stdin
    v6 = PortRuleset(fo=(L3Rule(6, "all", (), Verdict.DROP, "t"),))
    plan, recs = plan_for("vp1", None, v6)
    assert tools_of(plan.apply) == ["ip6tables-restore", "ip6tables-restore"]
    # all three copies' chains exist even when only one has rules (libvirt)
    assert recs["vp1"]["ip6tables"]["chains"] == ["NFI-vp1", "NFO-vp1", "NHI-vp1"]


def test_one_invocation_per_tool_and_phase_for_many_ports():
    changes = [PortChange(f"vnet{i}", None, cases.mixed()) for i in range(50)]
    plan, recs = backend.plan(changes)
    assert len(plan.apply) == 5 and len(plan.commit) == 3 and len(plan.rollback) == 3
    assert len(recs) == 50
    assert plan.apply[0].stdin.count("-A PREROUTING") == 50


def test_duplicate_port_in_one_plan():
    with pytest.raises(UnsupportedError, match="twice"):
        backend.plan([PortChange("vp1", None, cases.empty()), PortChange("vp1", None, None)])


def test_leftover_temporaries_in_old_record_are_removed_by_apply():
    old = {
        "backend": "ebiptables",
        "ebtables": {"chains": ["nwf-I-vp1", "nwf-J-vp1", "NJ-vp1:mac"],
                     "rules": ["-A PREROUTING -i vp1 -j nwf-I-vp1", "-A PREROUTING -i vp1 -j nwf-J-vp1"]},
    }
    plan, _ = plan_for("vp1", old, cases.to_vm_only())
    apply = plan.apply[0].stdin.splitlines()
    assert apply[1:6] == ["-D PREROUTING -i vp1 -j nwf-J-vp1", ":nwf-J-vp1 ACCEPT", ":NJ-vp1:mac ACCEPT",
                          "-X nwf-J-vp1", "-X NJ-vp1:mac"]
    commit = plan.commit[0].stdin
    assert "-D PREROUTING -i vp1 -j nwf-I-vp1\n" in commit and "nwf-J-vp1" not in commit


def test_foreign_record_refused():
    with pytest.raises(UnsupportedError, match="backend"):
        plan_for("vp1", {"backend": "nftables"}, None)


def test_restore_commands_can_be_overridden():
    b = EbiptablesBackend({"ebtables": ("/opt/ebtables-restore", "--noflush")})
    plan, _ = b.plan([PortChange("vp1", None, cases.to_vm_only())])
    assert plan.apply[0].argv == ("/opt/ebtables-restore", "--noflush")


# ---------------------------------------------------------------------------------------------
# Reading the kernel back

EBT_SAVE = """# Generated by ebtables-save
*nat
:PREROUTING ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:NI-vp1:mac RETURN
:NJ-vp1:mac RETURN
:libvirt-I-vp9 ACCEPT
:nwf-I-vp1 RETURN
:nwf-J-vp1 RETURN
:NO-vp2:orphan RETURN
-A PREROUTING -i vp9 -j libvirt-I-vp9
-A PREROUTING -i vp1 -j nwf-I-vp1
-A PREROUTING -i vp1 -j nwf-J-vp1
-A NI-vp1:mac -s 52:54:00:00:00:01 -j RETURN
-A nwf-I-vp1 -j NI-vp1:mac
-A nwf-J-vp1 -j NJ-vp1:mac
"""
IPT_SAVE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:NFI-vp1 - [0:0]
:NFO-vp1 - [0:0]
:NHI-vp1 - [0:0]
:libvirt-in - [0:0]
:nwf-host-in - [0:0]
:nwf-in - [0:0]
:nwf-in-post - [0:0]
:nwf-out - [0:0]
-A INPUT -j nwf-host-in
-A FORWARD -j libvirt-in
-A FORWARD -j nwf-in
-A FORWARD -j nwf-out
-A FORWARD -j nwf-in-post
-A NFI-vp1 -j DROP
-A nwf-host-in -m physdev --physdev-in vp1 -g NHI-vp1
-A nwf-in -m physdev --physdev-in vp1 -g NFI-vp1
-A nwf-in-post -m physdev --physdev-in vp1 -j ACCEPT
-A nwf-out -m physdev --physdev-out vp1 --physdev-is-bridged -g NFO-vp1
COMMIT
"""


def test_inventory_from_save_outputs():
    recs = listing.inventory(listing.read({"ebtables": EBT_SAVE, "iptables": IPT_SAVE}))
    assert set(recs) == {"vp1", "vp2"}
    r = recs["vp1"]
    assert r["ebtables"]["chains"] == ["nwf-I-vp1", "nwf-J-vp1", "NI-vp1:mac", "NJ-vp1:mac"]
    assert r["ebtables"]["rules"] == ["-A PREROUTING -i vp1 -j nwf-I-vp1", "-A PREROUTING -i vp1 -j nwf-J-vp1"]
    assert r["iptables"]["chains"] == ["NFI-vp1", "NFO-vp1", "NHI-vp1"]
    assert len(r["iptables"]["rules"]) == 4
    assert r["l2"] == {"from-vm": ["mac"], "to-vm": None} and r["l3"] == [4]
    assert recs["vp2"]["ebtables"]["chains"] == ["NO-vp2:orphan"]
    # such a record is a valid "old": apply drops the temporaries, commit the rest
    plan, _ = plan_for("vp1", r, None)
    commit = {s.argv[0]: s.stdin for s in plan.commit}
    assert "-D nwf-out -m physdev --physdev-out vp1 --physdev-is-bridged -g NFO-vp1\n" in commit["iptables-restore"]
    assert "-D nwf-in-post -m physdev --physdev-in vp1 -j ACCEPT\n" in commit["iptables-restore"]


def test_purge_steps_spare_libvirt():
    steps = EbiptablesBackend().teardown_plan([EBT_SAVE, IPT_SAVE]).apply
    text = {s.argv[0]: s.stdin for s in steps}
    assert "libvirt" not in text["ebtables-restore"] and "libvirt" not in text["iptables-restore"]
    assert "-D FORWARD -j nwf-in\n" in text["iptables-restore"] and "-X nwf-in-post\n" in text["iptables-restore"]
    assert "-X NO-vp2:orphan\n" in text["ebtables-restore"]
    assert "-D PREROUTING -i vp1 -j nwf-J-vp1\n" in text["ebtables-restore"]
    assert "ip6tables-restore" not in text  # nothing of ours there
    (step,) = listing.purge_steps(TOOLS, listing.read({"iptables": IPT_SAVE}), globals=False)
    assert "-X nwf-in\n" not in step.stdin and "FORWARD" not in step.stdin
    assert ":nwf-in-post - [0:0]\n" in step.stdin and "-X nwf-in-post" not in step.stdin  # flushed, kept


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_both_ports_negated_use_two_match_instances(protocol):
    """iptables-nft 1.8.9 compiles '! --sport A ! --dport B' of ONE match into a single compare
    of both ports (matching unless both are equal); a second match instance keeps them apart."""
    args = l3args(protocol, c(F.SPORT, NumRange(547, 547), True), c(F.DPORT, NumRange(40000, 40000), True))
    assert args == f"-p {protocol} ! --sport 547 -m {protocol} ! --dport 40000 -j ACCEPT"
    one = l3args(protocol, c(F.SPORT, NumRange(547, 547)), c(F.DPORT, NumRange(40000, 40000), True))
    assert one == f"-p {protocol} --sport 547 ! --dport 40000 -j ACCEPT"

"""Our IPv6 first-hop security (docs/filter-language-extensions.md, README): the reserved
variable IPV6_LINKLOCAL, the Neighbour Discovery fields from attribute to IR to nft text, the
ebiptables refusal, and the four built-in filters of ours (their files and the rules they make).
Pure; tests/kernel/test_ipv6_first_hop.py sends the frames."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from libvirt_nwfilter.backends.base import PortChange
from libvirt_nwfilter.backends.ebiptables import EbiptablesBackend
from libvirt_nwfilter.backends.ebiptables.render import render_l2_rule
from libvirt_nwfilter.backends.nftables import NftablesBackend
from libvirt_nwfilter.backends.nftables.names import shard_of
from libvirt_nwfilter.compiler import compile_port, match_conds
from libvirt_nwfilter.errors import MissingVariablesError, UnsupportedError, ValidationError
from libvirt_nwfilter.ir import (Cond, Field, Icmpv6Range, IpNet, Jump, L2Rule, L2Side, NdLinkLayer, NumRange,
                                 PortRuleset, Verdict)
from libvirt_nwfilter.model import FilterRef, make_params
from libvirt_nwfilter.resolve import LINK_LOCAL, eui64_link_local, resolve
from libvirt_nwfilter.store import FilterStore, own_dir
from libvirt_nwfilter.xml import format_filter, parse_filter

MAC = "52:54:00:00:00:01"
LL = "fe80::5054:ff:fe00:1"
NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
OWN = sorted(p.stem for p in own_dir().glob("*.xml"))


@pytest.fixture
def store(tmp_path) -> FilterStore:
    return FilterStore(tmp_path)


def instances(store, name: str, mac: str = MAC, **params):
    values = {key: tuple(v) if isinstance(v, (list, tuple)) else (v,) for key, v in params.items()}
    return resolve(FilterRef(name, make_params(values)), mac, store.source)


# ----------------------------------------------------------------------------------------------
# IPV6_LINKLOCAL


@pytest.mark.parametrize("mac, address", [
    ("52:54:00:00:00:01", "fe80::5054:ff:fe00:1"),
    ("0:1:2:3:4:5", "fe80::201:2ff:fe03:405"),  # any spelling the MAC type accepts
    ("02:00:00:00:00:00", "fe80::ff:fe00:0"),  # the universal/local bit flips back to 0
    ("FF:FF:FF:FF:FF:FF", "fe80::fdff:ffff:feff:ffff"),
])
def test_eui64_link_local(mac, address):
    assert eui64_link_local(mac) == address


def link_locals(store, **params) -> set[str]:
    found = instances(store, "t", **params)
    return {i.rule.match.value("srcipaddr") for i in found}


@pytest.fixture
def ll_store(tmp_path):
    (tmp_path / "filters").mkdir()
    (tmp_path / "filters" / "t.xml").write_text(
        "<filter name='t'><rule action='accept' direction='out'><ipv6 srcipaddr='$IPV6_LINKLOCAL'/></rule></filter>")
    return FilterStore(tmp_path)


def test_link_local_defaults_to_the_macs(ll_store):
    assert link_locals(ll_store) == {LL}
    assert link_locals(ll_store, MAC=["52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:0:0:0:1"]) == {
        LL, "fe80::5054:ff:fe00:2"}


def test_link_local_given_replaces_the_derived_one(ll_store):
    assert link_locals(ll_store, IPV6_LINKLOCAL=["fe80::1234", "fe80::5678"]) == {"fe80::1234", "fe80::5678"}


def test_link_local_of_a_mac_that_is_no_mac_is_missing(ll_store):
    with pytest.raises(MissingVariablesError, match=LINK_LOCAL):
        instances(ll_store, "t", MAC="notamac")


def test_link_local_is_not_a_binding_parameter(store):
    """Like libvirt's stored bindings, ours name MAC only: the derived value is the resolver's."""
    from libvirt_nwfilter.model import Binding
    from libvirt_nwfilter.service import with_mac_parameter

    binding = Binding("g", "c7a5fdbd-edaf-9455-926a-d65c16db1809", "vnet0", MAC, FilterRef("no-ipv6-ra"))
    assert with_mac_parameter(binding).filterref.params == (("MAC", (MAC,)),)


# ----------------------------------------------------------------------------------------------
# Attribute -> IR


def nd_match(attrs: str):
    flt = parse_filter(f"<filter name='t' xmlns:nwf='{NS}'><rule action='return' direction='out'>"
                       f"<ipv6 protocol='icmpv6' {attrs}/></rule></filter>")
    return flt.entries[0].match


@pytest.mark.parametrize("attrs, expected", [
    ("type='135' nwf:nd-lladdr='52:54:0:0:0:1'", Cond(Field.ND_LLADDR, NdLinkLayer(1, MAC))),
    ("type='136' nwf:nd-lladdr='52:54:00:00:00:01'", Cond(Field.ND_LLADDR, NdLinkLayer(2, MAC))),
    ("type='136' nwf:nd-lladdr='none'", Cond(Field.ND_LLADDR, NdLinkLayer(2, None))),
    ("type='0x87' nwf:nd-target='FD00::1'", Cond(Field.ND_TARGET, "fd00::1")),
])
def test_nd_attributes_become_conditions(attrs, expected):
    conds = match_conds(nd_match(attrs))
    assert conds[-1] == expected and conds[0].field is Field.IP_PROTO


def test_nd_target_negated():
    match = nd_match("type='136'/><ipv6 match='no' nwf:nd-target='fd00::1'")
    assert match_conds(match)[-1] == Cond(Field.ND_TARGET, "fd00::1", True)


def test_nd_type_given_by_a_variable_is_checked_once_known(tmp_path):
    (tmp_path / "filters").mkdir()
    (tmp_path / "filters" / "t.xml").write_text(
        f"<filter name='t' xmlns:nwf='{NS}'><rule action='return' direction='out'>"
        "<ipv6 protocol='icmpv6' type='$T' nwf:nd-lladdr='$MAC'/></rule></filter>")
    store = FilterStore(tmp_path)
    assert match_conds(instances(store, "t", T="136")[0].rule.match)[-1] == Cond(Field.ND_LLADDR,
                                                                                 NdLinkLayer(2, MAC))
    with pytest.raises(ValidationError, match="type='135' or '136'"):
        instances(store, "t", T="134")


# ----------------------------------------------------------------------------------------------
# IR -> nft text, and the ebiptables refusal


def nft_rule(*conds: Cond) -> str:
    ruleset = PortRuleset(from_vm=L2Side((L2Rule((Cond(Field.ETHER_TYPE, 0x86DD), *conds), Verdict.RETURN,
                                                 "filter 'f' rule 3"),)))
    plan, _ = NftablesBackend(conntrack="inet").plan([PortChange("vnet0", None, ruleset)])
    prefix = f"add rule bridge {shard_of('vnet0')} I-1/vnet0 "
    (line,) = [line for line in plan.apply[0].stdin.splitlines() if line.startswith(prefix)]
    return line.removeprefix(prefix)


@pytest.mark.parametrize("cond, text", [
    (Cond(Field.ND_TARGET, "fd00::1"), "@th,64,128 0xfd000000000000000000000000000001"),
    (Cond(Field.ND_TARGET, "fe80::5054:ff:fe00:1", True), "@th,64,128 != 0xfe80000000000000505400fffe000001"),
    (Cond(Field.ND_LLADDR, NdLinkLayer(2, None)), "ip6 nexthdr 58 ip6 length 24"),
    (Cond(Field.ND_LLADDR, NdLinkLayer(1, MAC)), "ip6 nexthdr 58 ip6 length 32 @th,192,64 0x0101525400000001"),
    (Cond(Field.ND_LLADDR, NdLinkLayer(2, "ff:ee:dd:cc:bb:aa")),
     "ip6 nexthdr 58 ip6 length 32 @th,192,64 0x0201ffeeddccbbaa"),
])
def test_nd_fields_on_nftables(cond, text):
    assert nft_rule(Cond(Field.IP_PROTO, 58), cond) == f"ether type 0x86dd meta l4proto 58 {text} return"


def test_negated_options_test_refused_on_nftables():
    with pytest.raises(UnsupportedError, match=r"filter 'f' rule 3: attribute 'nwf:nd-lladdr' cannot be rendered"):
        nft_rule(Cond(Field.ND_LLADDR, NdLinkLayer(2, MAC), True))


@pytest.mark.parametrize("cond, attribute", [(Cond(Field.ND_TARGET, "fd00::1"), "nwf:nd-target"),
                                             (Cond(Field.ND_LLADDR, NdLinkLayer(2, None)), "nwf:nd-lladdr")])
def test_nd_fields_refused_by_ebiptables_with_one_line(cond, attribute):
    rule = L2Rule((Cond(Field.ETHER_TYPE, 0x86DD), Cond(Field.IP_PROTO, 58), cond), Verdict.RETURN,
                  "filter 'f' rule 3")
    with pytest.raises(UnsupportedError) as info:
        render_l2_rule("X", rule)
    message = str(info.value)
    assert "\n" not in message and message == (
        f"filter 'f' rule 3: attribute '{attribute}' cannot be rendered by the ebiptables backend: ebtables "
        "cannot read Neighbour Discovery targets or options (use the nftables backend)")


# ----------------------------------------------------------------------------------------------
# The four filters of ours


@pytest.mark.parametrize("name", OWN)
def test_own_filter_file_reads_back_canonically(name):
    text = (own_dir() / f"{name}.xml").read_text()
    flt = parse_filter(text)
    assert flt.name == name
    canonical = format_filter(flt)
    assert parse_filter(canonical) == flt and format_filter(parse_filter(canonical)) == canonical


def test_own_filters_are_the_four_of_the_contract():
    assert OWN == ["clean-traffic-dualstack", "no-dhcpv6-server", "no-ipv6-ra", "no-nd-spoofing"]


def test_only_no_nd_spoofing_uses_the_extension():
    uses = {name for name in OWN if f"xmlns:nwf='{NS}'" in format_filter(parse_filter((own_dir() / f"{name}.xml")
                                                                                      .read_text()))}
    assert uses == {"no-nd-spoofing"}


def from_vm(store, name: str, **params) -> L2Side:
    return compile_port(instances(store, name, **params)).from_vm


def drops_first_hop(rule) -> bool:
    return isinstance(rule, L2Rule) and rule.verdict is Verdict.DROP and rule.origin.startswith(
        ("filter 'no-ipv6-ra'", "filter 'no-dhcpv6-server'"))


def test_no_ipv6_ra_and_no_dhcpv6_server_are_root_drops(store):
    side = from_vm(store, "no-ipv6-ra")
    assert [r.conds for r in side.root] == [
        (Cond(Field.ETHER_TYPE, 0x86DD), Cond(Field.IP_PROTO, 58), Cond(Field.ICMPV6_TYPE_CODE, icmp(134))),
        (Cond(Field.ETHER_TYPE, 0x86DD), Cond(Field.IP_PROTO, 58), Cond(Field.ICMPV6_TYPE_CODE, icmp(137)))]
    assert all(drops_first_hop(r) for r in side.root) and not side.subchains
    (rule,) = from_vm(store, "no-dhcpv6-server").root
    assert drops_first_hop(rule) and Cond(Field.SPORT, NumRange(547, 547)) in rule.conds
    assert compile_port(instances(store, "no-ipv6-ra")).to_vm == L2Side()


def icmp(number: int) -> Icmpv6Range:
    return Icmpv6Range(number, number, 0, 255)


def test_no_nd_spoofing_rules_for_two_addresses(store):
    side = from_vm(store, "no-nd-spoofing", IPV6=["fd00::1", "fd00::2"])
    (chain,) = side.subchains
    assert (chain.name, chain.priority) == ("ipv6-nd", -620)
    assert side.root == (Jump("ipv6-nd", (Cond(Field.ETHER_TYPE, 0x86DD),)),)
    returns = [r for r in chain.rules if r.verdict is Verdict.RETURN]
    # DAD, NS: 3 sources x 2 option layouts, NA: 3 sources x 3 targets x 2 layouts, the final return
    assert len(returns) == 1 + 6 + 18 + 1 and len(chain.rules) == len(returns) + 1
    na = [dict((c.field, c.value) for c in r.conds) for r in returns if Cond(Field.ND_TARGET, "fd00::2") in r.conds]
    assert {(d[Field.IP_SRC].address, d[Field.ND_LLADDR].mac) for d in na} == {
        (src, mac) for src in ("fd00::1", "fd00::2", LL) for mac in (MAC, None)}
    assert chain.rules[-2].verdict is Verdict.DROP and chain.rules[-1] == L2Rule(
        (), Verdict.RETURN, "filter 'no-nd-spoofing' rule 15")


def test_no_nd_spoofing_needs_ipv6(store):
    with pytest.raises(MissingVariablesError, match=r"IPV6 \(needed by no-nd-spoofing\)"):
        instances(store, "no-nd-spoofing")


def test_dualstack_order_from_the_guest(store):
    """Source MAC first, then the RA/redirect/DHCPv6-server drops, then the ND and source chains,
    then the IPv6 accept; IPv4 and ARP exactly where clean-traffic has them."""
    side = from_vm(store, "clean-traffic-dualstack", IP="10.0.0.1", IPV6="fd00::1")
    names = [f"jump {e.chain}" if isinstance(e, Jump) else e.origin for e in side.root]
    assert names == [
        "jump mac", "jump ipv4-ip",
        "filter 'no-ipv6-ra' rule 1", "filter 'no-ipv6-ra' rule 2", "filter 'no-dhcpv6-server' rule 1",
        "filter 'clean-traffic' rule 1", "jump ipv6-nd", "jump ipv6-source", "jump ipv6",
        "jump arp-mac", "jump arp-ip", "filter 'clean-traffic' rule 2", "jump rarp",
        "filter 'qemu-announce-self' rule 1", "filter 'no-other-l2-traffic' rule 1"]
    clean = from_vm(store, "clean-traffic", IP="10.0.0.1")
    ipv4_only = [e for e in side.root if not (isinstance(e, Jump) and e.chain.startswith("ipv6"))
                 and not drops_first_hop(e)]
    assert tuple(ipv4_only) == clean.root
    source = next(s for s in side.subchains if s.name == "ipv6-source")
    assert [c.value for r in source.rules[:2] for c in r.conds if c.field is Field.IP_SRC] == [
        IpNet("fd00::1", 128, 6), IpNet(LL, 128, 6)]
    assert source.rules[-1].verdict is Verdict.DROP


def test_dualstack_to_the_guest_adds_ipv6_to_clean_traffic(store):
    dual = compile_port(instances(store, "clean-traffic-dualstack", IP="10.0.0.1", IPV6="fd00::1")).to_vm
    clean = compile_port(instances(store, "clean-traffic", IP="10.0.0.1")).to_vm
    assert [e for e in dual.root if not (isinstance(e, Jump) and e.chain == "ipv6")] == list(clean.root)
    assert next(s for s in dual.subchains if s.name == "ipv6").rules[0].verdict is Verdict.ACCEPT


@pytest.mark.parametrize("name, params", [("no-nd-spoofing", {"IPV6": "fd00::1"}),
                                          ("clean-traffic-dualstack", {"IP": "10.0.0.1", "IPV6": "fd00::1"})])
def test_ebiptables_refuses_the_filters_using_nd_fields(store, name, params):
    ruleset = compile_port(instances(store, name, **params))
    with pytest.raises(UnsupportedError, match=r"^filter 'no-nd-spoofing' rule 2: attribute 'nwf:nd-lladdr'"):
        EbiptablesBackend().plan([PortChange("vnet0", None, ruleset)])


@pytest.mark.parametrize("name", ["no-ipv6-ra", "no-dhcpv6-server"])
def test_ebiptables_renders_the_others(store, name):
    plan, _ = EbiptablesBackend().plan([PortChange("vnet0", None, compile_port(instances(store, name)))])
    text = "".join(step.stdin for step in plan.apply)
    assert "--ip6-protocol" in text and "-j DROP" in text


def test_own_dir_is_packaged():
    setup = (Path(__file__).resolve().parents[2] / "setup.cfg").read_text()
    assert "own_filters/*.xml" in setup


# ----------------------------------------------------------------------------------------------
# simulate: packets with Neighbour Discovery fields, their frames, and the offline verdicts

from libvirt_nwfilter.simulate.evaluate import Simulator  # noqa: E402
from libvirt_nwfilter.simulate.explain import text_report  # noqa: E402
from libvirt_nwfilter.simulate.frames import build  # noqa: E402
from libvirt_nwfilter.simulate.packet import Addresses, PacketError, parse_packets  # noqa: E402

GUEST = Addresses(MAC, guest_ipv4="10.0.0.1", guest_ipv6="fd00::1")


def packets(*words: str):
    return parse_packets(list(words), GUEST)


def test_nd_packet_defaults_speak_for_the_sender_and_ask_about_the_peer():
    na, ns, dad, na_in = packets("out icmpv6 type=136", "out icmpv6 type=135", "out icmpv6 type=135 srcipaddr=::",
                                 "in icmpv6 type=136")
    assert (na.nd_target, na.nd_lladdr) == (0xFD000000000000000000000000000001, 0x525400000001)
    assert ns.nd_target == 0x20010DB8000000000000000000000001 and ns.nd_lladdr == 0x525400000001
    assert dad.nd_lladdr is None  # from :: a solicitation carries no link-layer option
    assert na_in.nd_target == 0x20010DB8000000000000000000000001 and na_in.nd_lladdr == 0x5254_00FF_FF01


def test_nd_fields_given_and_refused():
    (given,) = packets("out icmpv6 type=136 nwf:nd-target=fe80::1 nwf:nd-lladdr=NONE")
    assert (given.nd_target, given.nd_lladdr) == (0xFE800000000000000000000000000001, None)
    for text, reason in (("out icmpv6 type=128 nwf:nd-target=fd00::1", "only icmpv6 neighbour solicitations"),
                         ("out udp-ipv6 nwf:nd-lladdr=none", "only icmpv6 neighbour solicitations"),
                         ("out icmpv6 type=136 nwf:nd-lladdr=1:2", "MAC address like"),
                         ("out icmpv6 type=136 nwf:nd-target=10.0.0.1", "IPv6 address")):
        with pytest.raises(PacketError, match=reason):
            packets(text)


@pytest.mark.parametrize("text", ["out icmpv6 type=136", "out icmpv6 type=135", "out icmpv6 type=136 nwf:nd-lladdr=none",
                                  "out icmpv6 type=135 srcipaddr=:: dstipaddr=ff02::1:ff00:1"])
def test_nd_frames_are_what_scapy_reads(text):
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, IPv6
    from scapy.layers.l2 import Ether

    (packet,) = packets(text)
    frame = Ether(build(packet, tag=7))
    message = frame[ICMPv6ND_NA if packet.icmp_type == 136 else ICMPv6ND_NS]
    assert int(ipaddress.IPv6Address(message.tgt)) == packet.nd_target
    option = ICMPv6NDOptDstLLAddr if packet.icmp_type == 136 else ICMPv6NDOptSrcLLAddr
    if packet.nd_lladdr is None:
        assert frame[IPv6].plen == 24 and option not in frame
    else:
        assert frame[IPv6].plen == 32 and frame[option].lladdr == "52:54:00:00:00:01"
    again = Ether(bytes(frame))
    del again[IPv6].payload.cksum
    assert Ether(bytes(again))[IPv6].payload.cksum == message.cksum  # the checksum scapy computes


def test_dualstack_offline_verdicts_and_the_rule_named():
    ruleset = compile_port(resolve(FilterRef("clean-traffic-dualstack", make_params(
        {"IP": ("10.0.0.1",), "IPV6": ("fd00::1",)})), MAC, FilterStore(Path("/nonexistent")).source))
    words = {"out icmpv6 type=136": "pass", "out icmpv6 type=136 nwf:nd-lladdr=none": "pass",
             "out icmpv6 type=136 nwf:nd-target=fd00::2": "drop",
             "out icmpv6 type=136 nwf:nd-lladdr=52:54:00:99:99:99": "drop",
             "out icmpv6 type=135 srcipaddr=fe80::5054:ff:fe00:1": "pass", "out icmpv6 type=135 srcipaddr=::": "pass",
             "out icmpv6 type=135 nwf:nd-lladdr=52:54:00:99:99:99": "drop", "out icmpv6 type=134": "drop",
             "out icmpv6 type=137": "drop", "out udp-ipv6 srcportstart=547 dstportstart=546": "drop",
             "out udp-ipv6 srcipaddr=fd00::99": "drop", "out udp-ipv6": "pass", "in icmpv6 type=134": "pass"}
    results = Simulator(ruleset).run(packets(*words))
    assert {r.packet.text: r.verdict for r in results} == words
    report = text_report(3, results[2])
    assert "dropped by filter 'no-nd-spoofing' rule 14" in report
    assert "needs nwf:nd-target=fd00::1 (packet: fd00::2)" in report

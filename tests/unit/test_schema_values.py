"""Value types, name maps, special ranges and attribute tables (filter-language.md §4, §6).

Expectations are written out from the spec, not derived from the package's own tables, so a
wrong table entry shows up here.
"""

from __future__ import annotations

import pytest

from libvirt_nwfilter.schema import (PROTOCOLS, Negation, ValueType, decode_uint, mask_prefix,
                                     parse_literal, tcp_flag_bits)


def lit(protocol: str, attr: str, text: str) -> str:
    return parse_literal(PROTOCOLS[protocol].attr(attr), text)


def ok(protocol: str, attr: str, cases: list[tuple[str, str]]):
    return [pytest.param(protocol, attr, text, want, id=f"{protocol}/{attr}={text!r}") for text, want in cases]


def bad(protocol: str, attr: str, texts: list[str]):
    return [pytest.param(protocol, attr, text, id=f"{protocol}/{attr}={text!r}") for text in texts]


# --------------------------------------------------------------------------------------------
# Numbers: decimal first, then hex (with or without 0x), hex re-emitted as hex

GOOD = (
    # UINT8 (tcp option): decimal, 0x, 0X, bare hex with a letter, whitespace, leading zeros
    ok("tcp", "option", [
        ("0b1", "0xb1"),  # bare hex digits
        ("10", "10"), ("0", "0"), ("255", "255"), ("0x10", "0x10"), ("0X1F", "0x1f"),
        ("1f", "0x1f"), ("ff", "0xff"), ("FF", "0xff"), ("0xff", "0xff"), ("0x0", "0x0"),
        ("0x0010", "0x10"), ("010", "10"), (" 10 ", "10"), ("\t0x0a\n", "0xa"), ("a", "0xa"),
    ])
    # UINT16 (ports)
    + ok("tcp", "srcportstart", [
        ("65535", "65535"), ("0xffff", "0xffff"), ("0xFFFF", "0xffff"), ("abcd", "0xabcd"),
        ("80", "80"), ("0x50", "0x50"),
    ])
    # UINT32 (stp root-cost)
    + ok("stp", "root-cost", [("4294967295", "4294967295"), ("0xffffffff", "0xffffffff"),
                              ("deadbeef", "0xdeadbeef")])
    # UINT16-DEC (connlimit-above): decimal only
    + ok("tcp", "connlimit-above", [("0", "0"), ("10", "10"), ("65535", "65535"), (" 7 ", "7")])
    + ok("tcp-ipv6", "connlimit-above", [("010", "10")])
    # UINT8 elsewhere
    + ok("icmp", "type", [("255", "255"), ("0x8", "0x8")])
    + ok("stp", "flags", [("0x80", "0x80")])
    # special ranges
    + ok("mac", "protocolid", [("0x600", "0x600"), ("1536", "1536"), ("0xffff", "0xffff"),
                               ("0x835", "0x835"), ("2101", "2101")])
    + ok("vlan", "encap-protocol", [("0x3c", "0x3c"), ("60", "60"), ("0x3C", "0x3c")])
    + ok("vlan", "vlanid", [("0", "0"), ("4095", "4095"), ("0xfff", "0xfff")])
    + ok("tcp", "dscp", [("63", "63"), ("0x3f", "0x3f"), ("0", "0")])
    + ok("ip", "dscp", [("63", "63"), ("3f", "0x3f")])
    + ok("all-ipv6", "dscp", [("1", "1")])
)

BAD = (
    bad("tcp", "option", ["256", "0x100", "", " ", "-1", "0x", "0xg", "x10", "1.5", "1_0", "0x1_0",
                          "\u0661\u0660", "\u00b2", "ten"])
    + bad("tcp", "srcportstart", ["65536", "0x10000", "-0", "+", "80,81", "80-81"])
    + bad("stp", "root-cost", ["4294967296", "0x100000000"])
    + bad("tcp", "connlimit-above", ["0x10", "1f", "65536", "-1", "", "\u0661"])
    + bad("mac", "protocolid", ["0x5ff", "1535", "0", "0x10000", "foo", "806"])  # 806 is decimal
    + bad("vlan", "encap-protocol", ["0x3b", "59", "0"])
    + bad("vlan", "vlanid", ["4096", "0x1000", "0xffff"])
    + bad("tcp", "dscp", ["64", "0x40", "255"])
    + bad("ip", "dscp", ["64"])
    + bad("icmp", "type", ["256"])
    + bad("icmp", "code", ["256", "0x100"])
)


@pytest.mark.parametrize("protocol, attr, text, want", GOOD)
def test_numbers_accepted(protocol, attr, text, want):
    assert lit(protocol, attr, text) == want


@pytest.mark.parametrize("protocol, attr, text", BAD)
def test_numbers_refused(protocol, attr, text):
    with pytest.raises(ValueError):
        lit(protocol, attr, text)


def test_decimal_is_tried_before_hex():
    # '10' is ten, not sixteen; '0x10' and '1f' are hex
    assert decode_uint(PROTOCOLS["tcp"].attr("option"), lit("tcp", "option", "10")) == 10
    assert decode_uint(PROTOCOLS["tcp"].attr("option"), lit("tcp", "option", "0x10")) == 16
    assert decode_uint(PROTOCOLS["tcp"].attr("option"), lit("tcp", "option", "1f")) == 31


def test_range_error_mentions_limits():
    with pytest.raises(ValueError, match="4095"):
        lit("vlan", "vlanid", "4096")
    with pytest.raises(ValueError, match="0x600"):
        lit("mac", "protocolid", "1535")


# --------------------------------------------------------------------------------------------
# Name maps: names case-insensitive, printed in canonical spelling; numbers with a name print
# the name; otherwise hex stays hex (opcode always decimal)

NAMES = (
    ok("mac", "protocolid", [
        ("2054", "arp"), ("0x806", "arp"), ("0x0806", "arp"),
        ("ARP", "arp"), ("Arp", "arp"), ("IPv4", "ipv4"), ("2048", "ipv4"), ("0x800", "ipv4"),
        ("0x86dd", "ipv6"), ("34525", "ipv6"), ("0x8035", "rarp"), ("RARP", "rarp"),
        ("0x8100", "vlan"), ("33024", "vlan"),
    ])
    + ok("vlan", "encap-protocol", [("ipv6", "ipv6"), ("0x806", "arp"), ("0x88cc", "0x88cc")])
    + ok("arp", "opcode", [
        ("1", "Request"), ("0x1", "Request"), ("request", "Request"), ("REPLY", "Reply"),
        ("2", "Reply"), ("request_reverse", "Request_Reverse"), ("4", "Reply_Reverse"),
        ("drarp_request", "DRARP_Request"), ("6", "DRARP_Reply"), ("drarp_error", "DRARP_Error"),
        ("8", "InARP_Request"), ("arp_nak", "ARP_NAK"), ("0x9", "ARP_NAK"),
        ("0x20", "32"), ("32", "32"), ("0xa", "10"), ("10", "10"), ("0", "0"), ("ffff", "65535"),
    ])
    + ok("rarp", "opcode", [("3", "Request_Reverse"), ("0x20", "32")])
    + ok("ip", "protocol", [
        ("17", "udp"), ("0x11", "udp"), ("UDP", "udp"), ("6", "tcp"), ("tcp", "tcp"),
        ("136", "udplite"), ("50", "esp"), ("51", "ah"), ("1", "icmp"), ("2", "igmp"),
        ("132", "sctp"), ("58", "icmpv6"), ("ICMPv6", "icmpv6"), ("33", "33"), ("0x21", "0x21"),
        ("255", "255"), ("0", "0"),
    ])
    + ok("ipv6", "protocol", [("58", "icmpv6"), ("0x3a", "icmpv6"), ("udp", "udp"), ("47", "47")])
)


@pytest.mark.parametrize("protocol, attr, text, want", NAMES)
def test_name_maps(protocol, attr, text, want):
    assert lit(protocol, attr, text) == want


@pytest.mark.parametrize("protocol, attr, text", bad("arp", "opcode", ["requests", "0x10000", "Requestx"])
                         + bad("ip", "protocol", ["tcpx", "256", "ipv4"])
                         + bad("mac", "protocolid", ["udp", "Request"]))
def test_name_maps_refuse_other_names(protocol, attr, text):
    with pytest.raises(ValueError):
        lit(protocol, attr, text)


def test_names_decode_to_numbers():
    assert decode_uint(PROTOCOLS["mac"].attr("protocolid"), "arp") == 0x806
    assert decode_uint(PROTOCOLS["arp"].attr("opcode"), "ARP_NAK") == 9
    assert decode_uint(PROTOCOLS["ip"].attr("protocol"), "udplite") == 136
    assert decode_uint(PROTOCOLS["ip"].attr("protocol"), "0x21") == 33


# --------------------------------------------------------------------------------------------
# MAC and MACMASK


@pytest.mark.parametrize("text, want", [
    ("1:2:3:4:5:6", "01:02:03:04:05:06"), ("52:54:00:12:34:56", "52:54:00:12:34:56"),
    ("AA:BB:CC:DD:EE:FF", "aa:bb:cc:dd:ee:ff"), ("a:B:c:D:e:F", "0a:0b:0c:0d:0e:0f"),
    ("00:00:00:00:00:00", "00:00:00:00:00:00"),
])
def test_mac(text, want):
    assert lit("mac", "srcmacaddr", text) == want
    assert lit("tcp", "srcmacaddr", text) == want


@pytest.mark.parametrize("text", [
    "52-54-00-12-34-56", "001:02:03:04:05:06", "1:2:3:4:5", "1:2:3:4:5:6:7", "", "gg:00:00:00:00:00",
    "1:2:3:4:5:6\n", " 1:2:3:4:5:6", "1:2:3:4:5:6 ", "1::3:4:5:6", "525400123456", "1:2:3:4:5:6:",
])
def test_mac_refused(text):
    with pytest.raises(ValueError):
        lit("mac", "srcmacaddr", text)


@pytest.mark.parametrize("text, want", [
    ("ff:ff:ff:ff:ff:ff", "ff:ff:ff:ff:ff:ff"), ("00:00:00:00:00:00", "00:00:00:00:00:00"),
    ("FF:FF:FF:0:0:0", "ff:ff:ff:00:00:00"), ("ff:f0:0:0:0:0", "ff:f0:00:00:00:00"),
    ("80:0:0:0:0:0", "80:00:00:00:00:00"), ("ff:ff:ff:ff:ff:fe", "ff:ff:ff:ff:ff:fe"),
])
def test_macmask(text, want):
    assert lit("mac", "srcmacmask", text) == want
    assert lit("stp", "root-address-mask", text) == want


@pytest.mark.parametrize("text", [
    "ff:00:ff:00:00:00", "0f:ff:ff:ff:ff:ff", "ff:ff:ff:ff:ff:7f", "00:00:00:00:00:01",
    "fe:ff:ff:ff:ff:ff", "ff:ff:ff:ff:ff", "ff-ff-ff-00-00-00",
])
def test_macmask_non_contiguous_refused(text):
    with pytest.raises(ValueError):
        lit("mac", "dstmacmask", text)


def test_mask_prefix():
    assert mask_prefix("ff:ff:ff:00:00:00") == 24
    assert mask_prefix("ff:f0:00:00:00:00") == 12
    assert mask_prefix("00:00:00:00:00:00") == 0


# --------------------------------------------------------------------------------------------
# IPv4, IPv4 masks


@pytest.mark.parametrize("text", ["10.0.0.1", "0.0.0.0", "255.255.255.255", "192.168.122.1"])
def test_ipv4(text):
    assert lit("ip", "srcipaddr", text) == text
    assert lit("arp", "arpsrcipaddr", text) == text
    assert lit("tcp", "srcipfrom", text) == text


@pytest.mark.parametrize("text", [
    "10.1", "10", "010.001.002.003", "01.2.3.4", "10.0.0.01", "256.1.1.1", "1.2.3.4.5", "0x0a.0.0.1",
    "10.0.0.1\n", "", "10.0.0.", "::1", "10.0.0.1/24", "1.2.3.-4", "\u0661.2.3.4",
])
def test_ipv4_strict(text):
    with pytest.raises(ValueError):
        lit("ip", "srcipaddr", text)


@pytest.mark.parametrize("text, want", [
    ("24", "24"), ("0", "0"), ("32", "32"), ("024", "24"), (" 16 ", "16"),
    ("255.255.255.0", "24"), ("255.255.255.255", "32"), ("0.0.0.0", "0"), ("255.255.128.0", "17"),
    ("128.0.0.0", "1"),
])
def test_ipv4mask(text, want):
    assert lit("ip", "srcipmask", text) == want
    assert lit("arp", "arpsrcipmask", text) == want
    assert lit("udp", "dstipmask", text) == want


@pytest.mark.parametrize("text", ["33", "-1", "x", "255.0.255.0", "255.255.255.1", "0.255.255.255",
                                  "255.255.0", "24.0", "", "\u0662\u0664", "ffff::"])
def test_ipv4mask_refused(text):
    with pytest.raises(ValueError):
        lit("ip", "srcipmask", text)


# --------------------------------------------------------------------------------------------
# IPv6: printed in inet_ntop form


@pytest.mark.parametrize("text, want", [
    ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"), ("FE80::", "fe80::"), ("::", "::"), ("::1", "::1"),
    ("::ffff:10.1.2.3", "::ffff:10.1.2.3"), ("::FFFF:0A01:0203", "::ffff:10.1.2.3"),
    ("0:0:0:0:0:ffff:a01:203", "::ffff:10.1.2.3"),
    ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),  # RFC 5952: the first of equal runs
    ("2001:0db8:0000:0000:0001:0000:0000:0001", "2001:db8::1:0:0:1"),
    ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),  # a single 0 group is not compressed
    ("2001:db8:0:0:1:1:1:1", "2001:db8::1:1:1:1"),
    ("ff02::1:2", "ff02::1:2"), ("FF02:0:0:0:0:0:1:2", "ff02::1:2"),
])
def test_ipv6_inet_ntop_form(text, want):
    assert lit("ipv6", "srcipaddr", text) == want
    assert lit("tcp-ipv6", "dstipaddr", text) == want
    assert lit("icmpv6", "srcipfrom", text) == want


@pytest.mark.parametrize("text", ["fe80::1%eth0", "1:2:3:4:5:6:7:8:9", "10.0.0.1", "", "2001:db8::1\n",
                                  "2001:db8::g", ":::", "2001:db8::/64", "1::2::3"])
def test_ipv6_refused(text):
    with pytest.raises(ValueError):
        lit("ipv6", "srcipaddr", text)


def test_dstipto_typed_by_family():
    # libvirt types dstipto as IPv4 in IPv6 elements; we use the element's family (§13 #12)
    assert lit("tcp-ipv6", "dstipto", "2001:DB8::2") == "2001:db8::2"
    with pytest.raises(ValueError):
        lit("tcp-ipv6", "dstipto", "10.0.0.1")
    with pytest.raises(ValueError):
        lit("tcp", "dstipto", "::1")


@pytest.mark.parametrize("text, want", [
    ("64", "64"), ("128", "128"), ("0", "0"), ("ffff::", "16"), ("ffff:ffff:ffff:ffff:8000::", "65"),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "128"), ("::", "0"), ("FFC0::", "10"),
])
def test_ipv6mask(text, want):
    assert lit("ipv6", "srcipmask", text) == want
    assert lit("udp-ipv6", "dstipmask", text) == want


@pytest.mark.parametrize("text", ["129", "ffff::1", "0:ffff::", "255.255.255.0", "x", "-1", "ffff::%1"])
def test_ipv6mask_refused(text):
    with pytest.raises(ValueError):
        lit("ipv6", "srcipmask", text)


# --------------------------------------------------------------------------------------------
# BOOLEAN, COMMENT


@pytest.mark.parametrize("text, want", [("true", "true"), ("yes", "true"), ("1", "true"),
                                        ("false", "false"), ("no", "false"), ("0", "false")])
def test_boolean(text, want):
    assert lit("arp", "gratuitous", text) == want


@pytest.mark.parametrize("text", ["TRUE", "True", "Yes", "on", "off", "", " true", "2", "y"])
def test_boolean_refused(text):
    with pytest.raises(ValueError):
        lit("arp", "gratuitous", text)


def test_comment_verbatim_and_literal_dollar():
    assert lit("tcp", "comment", "") == ""
    assert lit("tcp", "comment", "$x") == "$x"
    assert lit("tcp", "comment", "a 'quoted' & <b>") == "a 'quoted' & <b>"
    assert lit("mac", "comment", "  spaced  ") == "  spaced  "


def test_comment_truncated_to_256():
    assert lit("tcp", "comment", "x" * 300) == "x" * 256
    assert lit("tcp", "comment", "x" * 256) == "x" * 256
    assert lit("tcp", "comment", "\u00e9" * 300) == "\u00e9" * 256
    assert lit("tcp", "comment", "\U0001f600" * 257) == "\U0001f600" * 256


def test_comment_control_characters():
    # C0 controls other than TAB, LF, CR are dropped (before truncation)
    assert lit("tcp", "comment", "a\x01b\x1fc\x00d") == "abcd"
    assert lit("tcp", "comment", "\t\n\r") == "\t\n\r"
    assert lit("tcp", "comment", "\x01" * 10 + "y" * 256) == "y" * 256


# --------------------------------------------------------------------------------------------
# STATE


@pytest.mark.parametrize("text, want", [
    ("NEW", "NEW"), ("new", "NEW"), ("established,new", "NEW,ESTABLISHED"),
    (" invalid , related ", "RELATED,INVALID"), ("INVALID,RELATED,ESTABLISHED,NEW", "NEW,ESTABLISHED,RELATED,INVALID"),
    ("INVALID,NEW", "NEW,INVALID"), ("NONE", "NONE"), ("none", "NONE"), ("new,none", "NONE"),
    ("NONE,ESTABLISHED", "NONE"), ("NEW,NEW", "NEW"), ("Related", "RELATED"),
])
def test_state(text, want):
    assert lit("tcp", "state", text) == want
    assert lit("all-ipv6", "state", text) == want


@pytest.mark.parametrize("text", ["", " ", "NEWESTABLISHED", "NEW;ESTABLISHED", "FOO", "NEW ESTABLISHED",
                                  "NEW,FOO", "ESTABLISHEDNEW"])
def test_state_refused(text):
    with pytest.raises(ValueError):
        lit("tcp", "state", text)


# --------------------------------------------------------------------------------------------
# TCPFLAGS


@pytest.mark.parametrize("text, want", [
    ("SYN,ACK/SYN", "SYN,ACK/SYN"), ("ack,syn/syn", "SYN,ACK/SYN"), ("PSH/", "PSH/NONE"),
    ("/", "NONE/NONE"), ("/SYN", "NONE/SYN"), ("ALL/ALL", "ALL/ALL"), ("all/none", "ALL/NONE"),
    ("SYN,ACK,URG,PSH,FIN,RST/NONE", "ALL/NONE"), ("ALL,SYN/NONE", "ALL/NONE"),
    ("URG,ACK,PSH,RST,SYN/FIN", "SYN,RST,PSH,ACK,URG/FIN"), ("NONE/ALL", "NONE/ALL"),
    (" syn , ack / syn ", "SYN,ACK/SYN"), ("FIN,SYN,RST,PSH,ACK/URG", "FIN,SYN,RST,PSH,ACK/URG"),
    ("NONE,SYN/SYN", "SYN/SYN"),
])
def test_tcpflags(text, want):
    assert lit("tcp", "flags", text) == want


@pytest.mark.parametrize("text", ["SYN", "", "SYN/ACK/FIN", "SYNACK/SYN", "FOO/SYN", "SYN/FOO", "SYN ACK/SYN",
                                  "SYN;ACK/SYN"])
def test_tcpflags_refused(text):
    with pytest.raises(ValueError):
        lit("tcp", "flags", text)


def test_tcp_flag_bits():
    assert tcp_flag_bits("SYN,ACK") == 0x12
    assert tcp_flag_bits("ALL") == 0x3F
    assert tcp_flag_bits("") == 0
    assert tcp_flag_bits("NONE") == 0


# --------------------------------------------------------------------------------------------
# IPSETNAME, IPSETFLAGS


@pytest.mark.parametrize("text", ["myset", "a" * 31, "my set", "a+b-c_d.e:f", "A", "0", " x"])
def test_ipsetname(text):
    assert lit("tcp", "ipset", text) == text
    assert lit("all", "ipset", text) == text


@pytest.mark.parametrize("text", ["", "a" * 32, "a/b", "a,b", "\u00e9", "x\n", "a\tb", "a'b", "a$b"])
def test_ipsetname_refused(text):
    with pytest.raises(ValueError):
        lit("tcp", "ipset", text)


@pytest.mark.parametrize("text, want", [
    ("src", "src"), ("SRC,dst", "src,dst"), ("dst,src,src", "dst,src,src"), (" src , dst ", "src,dst"),
    ("src,dst,src,dst,src,dst", "src,dst,src,dst,src,dst"), ("DST", "dst"),
])
def test_ipsetflags(text, want):
    assert lit("udp", "ipsetflags", text) == want


@pytest.mark.parametrize("text", ["", "src,", "foo", "src,dst,src,dst,src,dst,src", "src dst", "srcdst", ","])
def test_ipsetflags_refused(text):
    with pytest.raises(ValueError):
        lit("udp", "ipsetflags", text)


# --------------------------------------------------------------------------------------------
# The attribute tables, in canonical order, as written in the spec (§6)

ETH = ["srcmacaddr", "srcmacmask", "dstmacaddr", "dstmacmask"]
L3 = ["srcmacaddr", "srcipaddr", "srcipmask", "dstipaddr", "dstipmask", "srcipfrom", "srcipto",
      "dstipfrom", "dstipto", "dscp", "connlimit-above", "state", "ipset", "ipsetflags"]
PORTS = ["srcportstart", "srcportend", "dstportstart", "dstportend"]
ARP = ETH + ["hwtype", "protocoltype", "opcode", "arpsrcmacaddr", "arpdstmacaddr", "arpsrcipaddr",
             "arpsrcipmask", "arpdstipaddr", "arpdstipmask", "gratuitous"]
STP = ["srcmacaddr", "srcmacmask", "type", "flags", "root-priority", "root-priority-hi", "root-address",
       "root-address-mask", "root-cost", "root-cost-hi", "sender-priority", "sender-priority-hi",
       "sender-address", "sender-address-mask", "port", "port-hi", "age", "age-hi", "max-age",
       "max-age-hi", "hello-time", "hello-time-hi", "forward-delay", "forward-delay-hi"]
SPEC_TABLES = {
    "mac": ETH + ["protocolid"],
    "vlan": ETH + ["vlanid", "encap-protocol"],
    "stp": STP,
    "arp": ARP,
    "rarp": ARP,
    "ip": ETH + ["srcipaddr", "srcipmask", "dstipaddr", "dstipmask", "protocol"] + PORTS + ["dscp"],
    "ipv6": ETH + ["srcipaddr", "srcipmask", "dstipaddr", "dstipmask", "protocol"] + PORTS
    + ["type", "typeend", "code", "codeend"],
    "tcp": L3 + PORTS + ["option", "flags"],
    "udp": L3 + PORTS,
    "sctp": L3 + PORTS,
    "udplite": L3, "esp": L3, "ah": L3, "igmp": L3, "all": L3,
    "icmp": L3 + ["type", "code"],
    "tcp-ipv6": L3 + PORTS + ["option"],
    "udp-ipv6": L3 + PORTS,
    "sctp-ipv6": L3 + PORTS,
    "udplite-ipv6": L3, "esp-ipv6": L3, "ah-ipv6": L3, "all-ipv6": L3,
    "icmpv6": L3 + ["type", "code"],
}


def test_there_are_24_protocol_elements():
    assert sorted(PROTOCOLS) == sorted(SPEC_TABLES)
    assert len(PROTOCOLS) == 24
    assert "igmp-ipv6" not in PROTOCOLS


@pytest.mark.parametrize("protocol", sorted(SPEC_TABLES))
def test_attribute_table_order(protocol):
    extensions = EXTENSIONS.get(protocol, [])
    assert [a.name for a in PROTOCOLS[protocol].attrs] == SPEC_TABLES[protocol] + extensions + ["comment"]
    assert [a.name for a in PROTOCOLS[protocol].attrs if a.extension] == extensions


# Our attributes (docs/filter-language-extensions.md), after libvirt's and before the comment.
EXTENSIONS = {"ipv6": ["nwf:nd-target", "nwf:nd-lladdr"]}


# companion <- base, per §5
COMPANIONS = {
    "srcmacmask": "srcmacaddr", "dstmacmask": "dstmacaddr", "srcipmask": "srcipaddr",
    "dstipmask": "dstipaddr", "srcipto": "srcipfrom", "dstipto": "dstipfrom",
    "srcportend": "srcportstart", "dstportend": "dstportstart", "arpsrcipmask": "arpsrcipaddr",
    "arpdstipmask": "arpdstipaddr", "root-address-mask": "root-address",
    "sender-address-mask": "sender-address",
}


@pytest.mark.parametrize("protocol", sorted(SPEC_TABLES))
def test_negation_kinds(protocol):
    spec = PROTOCOLS[protocol]
    for attr in spec.attrs:
        name = attr.name
        if name == "comment":
            assert attr.negation is Negation.IGNORED and not attr.variables
        elif name in ("state", "ipset", "ipsetflags", "nwf:nd-lladdr"):
            assert attr.negation is Negation.REFUSED, name
        elif name in COMPANIONS:
            assert (attr.negation, attr.base) == (Negation.FOLLOWS, COMPANIONS[name]), name
        elif name.endswith("-hi"):
            assert (attr.negation, attr.base) == (Negation.FOLLOWS, name[:-3]), name
        elif name == "code" or (protocol == "ipv6" and name in ("typeend", "codeend")):
            assert (attr.negation, attr.base) == (Negation.FOLLOWS, "type"), name
        else:
            assert attr.negation is Negation.OWN and attr.base is None, name


def test_types_per_family():
    for name, spec in PROTOCOLS.items():
        for attr in spec.attrs:
            if attr.name in ("srcipaddr", "dstipaddr", "srcipfrom", "srcipto", "dstipfrom", "dstipto"):
                want = ValueType.IPV6 if name in ("ipv6", "icmpv6") or name.endswith("-ipv6") else ValueType.IPV4
                assert attr.vtype is want, (name, attr.name)
    assert PROTOCOLS["tcp"].attr("connlimit-above").vtype is ValueType.UINT16_DEC
    assert PROTOCOLS["stp"].attr("root-cost").vtype is ValueType.UINT32
    assert PROTOCOLS["stp"].attr("root-cost-hi").vtype is ValueType.UINT32
    assert PROTOCOLS["icmp"].attr("type").vtype is ValueType.UINT8
    for name in ("state", "ipsetflags", "gratuitous", "comment"):
        for spec in PROTOCOLS.values():
            if spec.attr(name):
                assert not spec.attr(name).variables, (spec.name, name)
    assert not PROTOCOLS["tcp"].attr("flags").variables  # tcp flags (§8.4); stp flags is a number
    assert PROTOCOLS["stp"].attr("flags").variables

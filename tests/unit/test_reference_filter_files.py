"""Guard the 24 shipped reference filters (libvirt_nwfilter/filters/*.xml).

The expected content is encoded below from the project spec
(spec/reference-filters.md), independently of the package's own parser and
formatter: every file must parse, be named after its filter, contain exactly
the listed chain / printed chain priority / entries in document order, and be
written in the canonical output form of filter-language.md section 12 (without
a <uuid> element).  Only the standard library is used.
"""

import pathlib
import xml.etree.ElementTree as ET

import pytest

FILTER_DIR = pathlib.Path(__file__).resolve().parents[2] / "libvirt_nwfilter" / "filters"

MAC = "$MAC"
BCAST = "ff:ff:ff:ff:ff:ff"

# A rule is (action, direction, priority, element, attributes); element None
# means "no protocol element"; attributes are (name, value) pairs in canonical
# attribute order.  A bare string is a <filterref filter='...'/>.
DHCP_OUT = (("srcipaddr", "0.0.0.0"), ("dstipaddr", "255.255.255.255"),
            ("protocol", "udp"), ("srcportstart", "68"), ("dstportstart", "67"))
DHCPV6_OUT = (("srcipaddr", "fe80::"), ("srcipmask", "10"), ("dstipaddr", "ff02::1:2"),
              ("protocol", "udp"), ("srcportstart", "546"), ("dstportstart", "547"))
RARP_ANNOUNCE = (("dstmacaddr", BCAST), ("opcode", "Request_Reverse"),
                 ("arpsrcmacaddr", MAC), ("arpdstmacaddr", MAC),
                 ("arpsrcipaddr", "0.0.0.0"), ("arpdstipaddr", "0.0.0.0"))

# name: (chain, printed chain priority or None, entries)
EXPECTED = {
    "allow-arp": ("arp", -500, [
        ("accept", "inout", 500, None, ()),
    ]),
    "allow-dhcp": ("ipv4", -700, [
        ("accept", "out", 100, "ip", DHCP_OUT),
        ("accept", "in", 100, "ip", (("protocol", "udp"), ("srcportstart", "67"),
                                     ("dstportstart", "68"))),
    ]),
    "allow-dhcp-server": ("ipv4", -700, [
        ("accept", "out", 100, "ip", DHCP_OUT),
        ("accept", "in", 100, "ip", (("srcipaddr", "$DHCPSERVER"), ("protocol", "udp"),
                                     ("srcportstart", "67"), ("dstportstart", "68"))),
    ]),
    "allow-dhcpv6": ("ipv6", -600, [
        ("accept", "out", 100, "ipv6", DHCPV6_OUT),
        ("accept", "in", 100, "ipv6", (("protocol", "udp"), ("srcportstart", "547"),
                                       ("dstportstart", "546"))),
    ]),
    "allow-dhcpv6-server": ("ipv6", -600, [
        ("accept", "out", 100, "ipv6", DHCPV6_OUT),
        ("accept", "in", 100, "ipv6", (("srcipaddr", "$DHCPSERVER"), ("protocol", "udp"),
                                       ("srcportstart", "547"), ("dstportstart", "546"))),
    ]),
    "allow-incoming-ipv4": ("ipv4", -700, [("accept", "in", 500, None, ())]),
    "allow-incoming-ipv6": ("ipv6", -600, [("accept", "in", 500, None, ())]),
    "allow-ipv4": ("ipv4", -700, [("accept", "inout", 500, None, ())]),
    "allow-ipv6": ("ipv6", -600, [("accept", "inout", 500, None, ())]),
    "clean-traffic": ("root", None, [
        "no-mac-spoofing",
        "no-ip-spoofing",
        ("accept", "out", -650, "mac", (("protocolid", "ipv4"),)),
        "allow-incoming-ipv4",
        "no-arp-spoofing",
        ("accept", "inout", -500, "mac", (("protocolid", "arp"),)),
        "no-other-l2-traffic",
        "qemu-announce-self",
    ]),
    "clean-traffic-gateway": ("root", None, [
        "no-mac-spoofing",
        "no-ip-spoofing",
        "no-arp-spoofing",
        ("accept", "inout", -500, "mac", (("protocolid", "arp"),)),
        ("accept", "in", 500, "mac", (("srcmacaddr", "$GATEWAY_MAC"),)),
        ("accept", "out", 500, "mac", (("dstmacaddr", "$GATEWAY_MAC"),)),
        "no-other-l2-traffic",
        "qemu-announce-self",
    ]),
    "no-arp-ip-spoofing": ("arp-ip", -510, [
        ("return", "out", 400, "arp", (("arpsrcipaddr", "$IP"),)),
        ("drop", "out", 1000, None, ()),
    ]),
    "no-arp-mac-spoofing": ("arp-mac", -520, [
        ("return", "out", 350, "arp", (("arpsrcmacaddr", MAC),)),
        ("drop", "out", 1000, None, ()),
    ]),
    "no-arp-spoofing": ("root", None, [
        "no-arp-mac-spoofing",
        "no-arp-ip-spoofing",
    ]),
    "no-ip-multicast": ("ipv4", -700, [
        ("drop", "out", 500, "ip", (("dstipaddr", "224.0.0.0"), ("dstipmask", "4"))),
    ]),
    "no-ip-spoofing": ("ipv4-ip", -710, [
        ("return", "out", 100, "ip", (("srcipaddr", "0.0.0.0"), ("protocol", "udp"))),
        ("return", "out", 500, "ip", (("srcipaddr", "$IP"),)),
        ("drop", "out", 1000, None, ()),
    ]),
    "no-ipv6-multicast": ("ipv6", -600, [
        ("drop", "out", 500, "ipv6", (("dstipaddr", "ff00::"), ("dstipmask", "8"))),
    ]),
    "no-ipv6-spoofing": ("ipv6-ip", -610, [
        ("return", "out", 100, "ipv6", (("srcipaddr", "fe80::"), ("srcipmask", "10"),
                                        ("protocol", "udp"))),
        ("return", "out", 500, "ipv6", (("srcipaddr", "$IPV6"),)),
        ("drop", "out", 1000, None, ()),
    ]),
    "no-mac-broadcast": ("ipv4", -700, [
        ("drop", "out", 500, "mac", (("dstmacaddr", BCAST),)),
    ]),
    "no-mac-spoofing": ("mac", -800, [
        ("return", "out", 500, "mac", (("srcmacaddr", MAC),)),
        ("drop", "out", 500, "mac", ()),  # a <mac/> element without attributes
    ]),
    "no-other-l2-traffic": ("root", None, [("drop", "inout", 1000, None, ())]),
    "no-other-rarp-traffic": ("rarp", -400, [("drop", "inout", 1000, None, ())]),
    "qemu-announce-self": ("root", None, [
        ("accept", "out", 500, "mac", (("protocolid", "0x835"),)),
        "qemu-announce-self-rarp",
        "no-other-rarp-traffic",
    ]),
    "qemu-announce-self-rarp": ("rarp", -400, [
        ("accept", "out", 500, "rarp", (("srcmacaddr", MAC),) + RARP_ANNOUNCE),
        ("accept", "in", 500, "rarp", RARP_ANNOUNCE),
    ]),
}

NAMES = sorted(EXPECTED)


def _path(name):
    return FILTER_DIR / (name + ".xml")


def _entries(root):
    """Entry list of a parsed <filter>, in the table's notation."""
    out = []
    for child in root:
        if child.tag == "filterref":
            assert set(child.attrib) == {"filter"}, child.attrib
            assert len(child) == 0, "filterref with parameters"
            out.append(child.get("filter"))
            continue
        assert child.tag == "rule", "unexpected child <%s>" % child.tag
        assert list(child.attrib) == ["action", "direction", "priority"], child.attrib
        protos = list(child)
        assert len(protos) <= 1, "more than one protocol element"
        if protos:
            proto = protos[0]
            assert len(proto) == 0
            element, attrs = proto.tag, tuple(proto.attrib.items())
        else:
            element, attrs = None, ()
        out.append((child.get("action"), child.get("direction"),
                    int(child.get("priority")), element, attrs))
    return out


def _canonical_text(name):
    """The byte-exact canonical form (filter-language.md section 12)."""
    chain, prio, entries = EXPECTED[name]
    head = "<filter name='%s' chain='%s'" % (name, chain)
    if prio is not None:
        head += " priority='%d'" % prio
    lines = [head + ">"]
    for entry in entries:
        if isinstance(entry, str):
            lines.append("  <filterref filter='%s'/>" % entry)
            continue
        action, direction, priority, element, attrs = entry
        rule = "  <rule action='%s' direction='%s' priority='%d'" % (action, direction, priority)
        if element is None:
            lines.append(rule + "/>")
        else:
            lines.append(rule + ">")
            lines.append("    <%s%s/>" % (element, "".join(" %s='%s'" % kv for kv in attrs)))
            lines.append("  </rule>")
    lines.append("</filter>")
    return "\n".join(lines) + "\n"


def test_exactly_the_24_reference_filters():
    assert len(EXPECTED) == 24
    assert sorted(p.stem for p in FILTER_DIR.glob("*.xml")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_filter_structure(name):
    root = ET.parse(_path(name)).getroot()
    chain, prio, entries = EXPECTED[name]
    assert root.tag == "filter"
    assert root.get("name") == name
    expected_attrs = ["name", "chain"] + (["priority"] if prio is not None else [])
    assert list(root.attrib) == expected_attrs
    assert root.get("chain") == chain
    if prio is not None:
        assert int(root.get("priority")) == prio
    assert root.find("uuid") is None
    assert _entries(root) == entries


@pytest.mark.parametrize("name", NAMES)
def test_filter_is_in_canonical_form(name):
    text = _path(name).read_text(encoding="utf-8")
    assert text == _canonical_text(name)


def test_references_resolve_within_the_set():
    for name, (_chain, _prio, entries) in EXPECTED.items():
        for entry in entries:
            if isinstance(entry, str):
                assert entry in EXPECTED, "%s references unknown %s" % (name, entry)

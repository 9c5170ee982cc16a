"""libvirt as the reference for the filter language.

For every filter Debian's libvirt-daemon-config-nwfilter ships and every hand-written and
generated case of the unit tests: libvirt's own ``nwfilter-dumpxml`` of the original must equal
(a) libvirt's dumpxml of OUR canonical output defined back into libvirt — libvirt reads our
output as the very same filter — and (b) our canonical output itself, byte for byte (UUID aside).
Cases where we deliberately differ from libvirt (filter-language.md §13) are listed with the
attributes they concern and checked to differ exactly there, while libvirt reads our output as
the very same filter as the original (the difference lies in how we read the author's XML, not in
what our output means to libvirt).

libvirt is driven through one connection of its Python binding (``virsh`` per call would cost
four process starts per case).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import libvirt
import pytest

from libvirt_nwfilter.errors import ValidationError
from libvirt_nwfilter.xml import format_filter, parse_filter
from libvirtd import URI, virsh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import test_filter_xml as cases  # noqa: E402  (the unit tests' hand-written cases)

DEBIAN_FILTERS = Path("/usr/share/libvirt/nwfilter")
_UUID_LINE = re.compile(r"^\s*<uuid>[^<]*</uuid>\n", re.M)

# Hand-written cases whose meaning we deliberately read differently from libvirt (§13), with
# the attributes where our reading and libvirt's differ: libvirt's own dumpxml loses what the
# author wrote there, ours keeps it.
DELIBERATE = {
    # §13 item 7: libvirt copies srcportstart's negation to dstport*
    "dstport-own-negation": {"dstportstart", "dstportend"},
    "dstport-negated-alone": {"dstportstart"},
    "neg-pos-neg": {"dstportstart"},
    # §13 item 7: libvirt takes the ICMPv6 group's negation from 'type'
    "icmpv6-group-shared": {"typeend", "codeend"},
    "icmpv6-group-code-alone": {"code"},
    # §13 item 8: libvirt drops ipset + ipsetflags given together
    "ipset-both-kept": {"ipset", "ipsetflags"},
    # §13 item 22: we keep TAB/LF/CR in comments as character references, libvirt writes them raw
    "escaping": {"comment"},
}
# Input libvirt refuses where we accept: element order of merged elements (§13 item 19), an IPv6
# dstipto (§13 item 12: libvirt types it as IPv4), and trailing blanks in a variable reference
# (filter-language.md §9.1 grammar allows them).
LIBVIRT_REFUSES = {"ports-order-independent", "ipv6-dstipto-family", "variables-printed-form"}
# Generated one-attribute cases that hit the same deliberate differences.
DELIBERATE_ATTRIBUTES = {
    (p, a) for p in ("tcp", "udp", "udplite", "esp", "ah", "sctp", "icmp", "igmp", "tcp-ipv6", "udp-ipv6",
                     "udplite-ipv6", "esp-ipv6", "ah-ipv6", "sctp-ipv6", "icmpv6")
    for a in ("ipset", "ipsetflags")
} | {(p, "dstipto") for p in ("tcp-ipv6", "udp-ipv6", "udplite-ipv6", "esp-ipv6", "ah-ipv6", "sctp-ipv6",
                              "icmpv6", "all-ipv6")}


@pytest.fixture(scope="module")
def conn(libvirtd):
    connection = libvirt.open(URI)
    yield connection
    connection.close()


def _undefine(conn, name: str) -> None:
    try:
        conn.nwfilterLookupByName(name).undefine()
    except libvirt.libvirtError:
        pass


def _libvirt_dump(conn, name: str, xml: str) -> str:
    """libvirt's ``nwfilter-dumpxml`` of ``xml`` defined as ``name`` (UUID line removed)."""
    _undefine(conn, name)
    flt = conn.nwfilterDefineXML(xml)
    try:
        dumped = flt.XMLDesc(0)
    finally:
        flt.undefine()
    return _UUID_LINE.sub("", dumped.rstrip("\n") + "\n")


def _attributes(xml: str) -> dict[str, tuple[str, bool]]:
    """Our reading of a one-rule filter: attribute -> (value, negated)."""
    rule = parse_filter(xml).entries[0]
    return {attr.name: (str(attr.value), attr.negated) for attr in rule.match.attrs}


def _renamed(xml: str, name: str) -> str:
    return re.sub(r"(<filter\b[^>]*\bname=)(['\"])[^'\"]*\2", rf"\g<1>'{name}'", xml, count=1)


def _cases() -> list:
    found = []
    if DEBIAN_FILTERS.is_dir():
        for path in sorted(DEBIAN_FILTERS.glob("*.xml")):
            found.append(pytest.param(path.read_text(), id=f"debian-{path.stem}"))
    for name, (raw, _) in sorted(cases.HAND.items()):
        if name not in DELIBERATE.keys() | LIBVIRT_REFUSES:
            found.append(pytest.param(raw, id=f"hand-{name}"))
    for param in cases.ALL_ATTRS:
        protocol, attr = param.values
        if (protocol, attr) not in DELIBERATE_ATTRIBUTES and not cases.PROTOCOLS[protocol].attr(attr).extension:
            found.append(pytest.param(("positive", protocol, attr), id=f"attr-{protocol}@{attr}"))
    return found


def _attribute_case(protocol: str, attr: str) -> str:
    sample = cases.sample(attr, cases.PROTOCOLS[protocol].attr(attr).vtype)
    if attr == "comment":  # without the TAB of the unit tests' sample (§13 item 22)
        sample = (sample[0].replace("\t", ""), sample[1])
    values = {**cases.requirements(protocol, attr), attr: sample}
    written = " ".join(f"{n}='{cases.xattr(raw)}'" for n, (raw, _) in values.items())
    return cases.rule_doc(f"<{protocol} {written}/>")


def test_debian_filters_are_installed():
    assert len(list(DEBIAN_FILTERS.glob("*.xml"))) == 24, "scripts/bootstrap installs libvirt-daemon-config-nwfilter"


@pytest.mark.parametrize("source", _cases())
def test_libvirt_reads_our_output_as_the_original(conn, source):
    raw = _attribute_case(*source[1:]) if isinstance(source, tuple) else source
    name = "nwft-oracle"
    original = _renamed(raw, name)
    ours = _UUID_LINE.sub("", format_filter(parse_filter(original)))
    assert _libvirt_dump(conn, name, ours) == _libvirt_dump(conn, name, original)
    assert ours == _libvirt_dump(conn, name, original)


@pytest.mark.parametrize("name", sorted(DELIBERATE))
def test_deliberate_differences_are_where_the_spec_says(conn, name):
    """Our reading of the author's XML and libvirt's (its dumpxml, read back) differ in exactly
    the attributes the spec item names, and agree on every other one."""
    raw, _ = cases.HAND[name]
    original = _renamed(raw, "nwft-oracle")
    ours, theirs = _attributes(original), _attributes(_libvirt_dump(conn, "nwft-oracle", original))
    differing = {attr for attr in ours.keys() | theirs.keys() if ours.get(attr) != theirs.get(attr)}
    assert differing == DELIBERATE[name], f"ours {ours}, libvirt's {theirs}"


@pytest.mark.parametrize("name", sorted(DELIBERATE))
def test_deliberate_differences_change_only_the_printed_form(conn, name):
    """libvirt reads our output exactly as it reads the original (same dumpxml): where we read
    a case differently, our printed form still means to libvirt what the author's XML meant."""
    raw, _ = cases.HAND[name]
    original = _renamed(raw, "nwft-oracle")
    ours = format_filter(parse_filter(original))
    assert _libvirt_dump(conn, "nwft-oracle", ours) == _libvirt_dump(conn, "nwft-oracle", original)


@pytest.mark.parametrize("value", ["-1000", "1000", "-999", "999", "0", " 5", "5 ", " 5 ", "+5", "05", "1001",
                                   "-1001", "0x10", "abc", ""])
def test_rule_priority_parsing_matches_libvirt(conn, value):
    """A value libvirt reads as written we read the same; one it silently turns into the
    default (500) we refuse (filter-language.md §13 item 5)."""
    raw = f"<filter name='nwft-oracle' chain='root'><rule action='drop' direction='out' priority='{value}'/></filter>"
    seen = re.search(r"priority='(-?\d+)'", _libvirt_dump(conn, "nwft-oracle", raw)).group(1)
    literal = value.strip() and value.lstrip().lstrip("+").lstrip("-").isdigit() and seen == str(int(value))
    if literal or value.strip() == "500":
        assert re.search(r"priority='(-?\d+)'", format_filter(parse_filter(raw))).group(1) == seen
    else:
        with pytest.raises(ValidationError):
            parse_filter(raw)


@pytest.mark.parametrize("name", sorted(LIBVIRT_REFUSES))
def test_libvirt_refuses_what_we_accept_there(conn, name):
    raw, _ = cases.HAND[name]
    parse_filter(raw)
    _undefine(conn, "nwft-oracle")
    with pytest.raises(libvirt.libvirtError):
        conn.nwfilterDefineXML(_renamed(raw, "nwft-oracle"))


# ----------------------------------------------------------------------------------------------
# Our extension attributes (docs/filter-language-extensions.md) as libvirt sees them

EXTENSION_FILTER = (
    "<filter name='nwft-oracle' chain='ipv6-nd' priority='-620' "
    "xmlns:nwf='http://libvirt-nwfilter.org/xmlns/nwfilter/1.0'>\n"
    "  <rule action='return' direction='out' priority='300'>\n"
    "    <ipv6 srcipaddr='$IPV6' protocol='icmpv6' type='136' nwf:nd-target='$IPV6' nwf:nd-lladdr='$MAC'/>\n"
    "  </rule>\n"
    "</filter>\n")


def test_libvirt_schema_refuses_the_extension(conn):
    """virsh nwfilter-define --validate checks libvirt's schema, which has no room for them."""
    _undefine(conn, "nwft-oracle")
    proc = virsh("nwfilter-define", "/dev/stdin", "--validate", input=EXTENSION_FILTER, check=False)
    assert proc.returncode != 0 and "nwft-oracle" not in conn.listNWFilters()


def test_libvirt_without_validation_drops_the_extension(conn):
    """Without --validate libvirt's parser ignores attributes it does not know: the rule it keeps
    accepts every advertisement (what the README warns about)."""
    dumped = _libvirt_dump(conn, "nwft-oracle", EXTENSION_FILTER)
    assert "nd-target" not in dumped and "nd-lladdr" not in dumped
    assert "<ipv6 srcipaddr='$IPV6' protocol='icmpv6' type='136'/>" in dumped

"""libvirt as the reference for the filter language.

For every filter Debian's libvirt-daemon-config-nwfilter ships and every hand-written and
generated case of the unit tests: libvirt's own ``nwfilter-dumpxml`` of the original must equal
(a) libvirt's dumpxml of OUR canonical output defined back into libvirt — libvirt reads our
output as the very same filter — and (b) our canonical output itself, byte for byte (UUID aside).
Cases where we deliberately differ from libvirt (filter-language.md §13) are listed and checked
to differ exactly there.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from libvirt_nwfilter.errors import ValidationError
from libvirt_nwfilter.xml import format_filter, parse_filter
from libvirtd import virsh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import test_filter_xml as cases  # noqa: E402  (the unit tests' hand-written cases)

DEBIAN_FILTERS = Path("/usr/share/libvirt/nwfilter")
_UUID_LINE = re.compile(r"^\s*<uuid>[^<]*</uuid>\n", re.M)

# Hand-written cases whose meaning we deliberately read differently from libvirt (§13):
# libvirt's own dumpxml then loses what the author wrote, ours keeps it.
DELIBERATE = {
    "dstport-own-negation",  # §13 item 7: libvirt copies srcportstart's negation to dstport*
    "dstport-negated-alone",
    "neg-pos-neg",
    "icmpv6-group-shared",  # §13 item 7: libvirt takes the ICMPv6 group's negation from 'type'
    "icmpv6-group-code-alone",
    "ipset-both-kept",  # §13 item 8: libvirt drops ipset + ipsetflags given together
    "escaping",  # §13 item 22: we keep TAB/LF/CR in comments as character references
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


def _libvirt_dump(name: str, xml: str) -> str:
    virsh("nwfilter-undefine", name, check=False)
    virsh("nwfilter-define", "/dev/stdin", input=xml)
    dumped = virsh("nwfilter-dumpxml", name).stdout
    virsh("nwfilter-undefine", name)
    return _UUID_LINE.sub("", dumped.rstrip("\n") + "\n")


def _renamed(xml: str, name: str) -> str:
    return re.sub(r"(<filter\b[^>]*\bname=)(['\"])[^'\"]*\2", rf"\g<1>'{name}'", xml, count=1)


def _cases() -> list:
    found = []
    if DEBIAN_FILTERS.is_dir():
        for path in sorted(DEBIAN_FILTERS.glob("*.xml")):
            found.append(pytest.param(path.read_text(), id=f"debian-{path.stem}"))
    for name, (raw, _) in sorted(cases.HAND.items()):
        if name not in DELIBERATE | LIBVIRT_REFUSES:
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
def test_libvirt_reads_our_output_as_the_original(libvirtd, source):
    raw = _attribute_case(*source[1:]) if isinstance(source, tuple) else source
    name = "nwft-oracle"
    original = _renamed(raw, name)
    ours = _UUID_LINE.sub("", format_filter(parse_filter(original)))
    assert _libvirt_dump(name, ours) == _libvirt_dump(name, original)
    assert ours == _libvirt_dump(name, original)


@pytest.mark.parametrize("name", sorted(DELIBERATE))
def test_deliberate_differences_are_where_the_spec_says(libvirtd, name):
    raw, _ = cases.HAND[name]
    original = _renamed(raw, "nwft-oracle")
    ours = _UUID_LINE.sub("", format_filter(parse_filter(original)))
    assert ours != _libvirt_dump("nwft-oracle", original)


@pytest.mark.parametrize("name", sorted(DELIBERATE))
def test_deliberate_differences_change_only_the_printed_form(libvirtd, name):
    """Where we read a case differently, libvirt still accepts our output."""
    raw, _ = cases.HAND[name]
    ours = format_filter(parse_filter(_renamed(raw, "nwft-oracle")))
    _libvirt_dump("nwft-oracle", ours)


@pytest.mark.parametrize("value", ["-1000", "1000", "-999", "999", "0", " 5", "5 ", " 5 ", "+5", "05", "1001",
                                   "-1001", "0x10", "abc", ""])
def test_rule_priority_parsing_matches_libvirt(libvirtd, value):
    """A value libvirt reads as written we read the same; one it silently turns into the
    default (500) we refuse (filter-language.md §13 item 5)."""
    raw = f"<filter name='nwft-oracle' chain='root'><rule action='drop' direction='out' priority='{value}'/></filter>"
    seen = re.search(r"priority='(-?\d+)'", _libvirt_dump("nwft-oracle", raw)).group(1)
    literal = value.strip() and value.lstrip().lstrip("+").lstrip("-").isdigit() and seen == str(int(value))
    if literal or value.strip() == "500":
        assert re.search(r"priority='(-?\d+)'", format_filter(parse_filter(raw))).group(1) == seen
    else:
        with pytest.raises(ValidationError):
            parse_filter(raw)


@pytest.mark.parametrize("name", sorted(LIBVIRT_REFUSES))
def test_libvirt_refuses_what_we_accept_there(libvirtd, name):
    raw, _ = cases.HAND[name]
    parse_filter(raw)
    assert virsh("nwfilter-define", "/dev/stdin", input=_renamed(raw, "nwft-oracle"), check=False).returncode != 0


# ----------------------------------------------------------------------------------------------
# Our extension attributes (docs/filter-language-extensions.md) as libvirt sees them

EXTENSION_FILTER = (
    "<filter name='nwft-oracle' chain='ipv6-nd' priority='-620' "
    "xmlns:nwf='http://libvirt-nwfilter.org/xmlns/nwfilter/1.0'>\n"
    "  <rule action='return' direction='out' priority='300'>\n"
    "    <ipv6 srcipaddr='$IPV6' protocol='icmpv6' type='136' nwf:nd-target='$IPV6' nwf:nd-lladdr='$MAC'/>\n"
    "  </rule>\n"
    "</filter>\n")


def test_libvirt_schema_refuses_the_extension(libvirtd):
    """virsh nwfilter-define --validate checks libvirt's schema, which has no room for them."""
    virsh("nwfilter-undefine", "nwft-oracle", check=False)
    proc = virsh("nwfilter-define", "/dev/stdin", "--validate", input=EXTENSION_FILTER, check=False)
    assert proc.returncode != 0 and "nwft-oracle" not in virsh("nwfilter-list").stdout


def test_libvirt_without_validation_drops_the_extension(libvirtd):
    """Without --validate libvirt's parser ignores attributes it does not know: the rule it keeps
    accepts every advertisement (what the README warns about)."""
    dumped = _libvirt_dump("nwft-oracle", EXTENSION_FILTER)
    assert "nd-target" not in dumped and "nd-lladdr" not in dumped
    assert "<ipv6 srcipaddr='$IPV6' protocol='icmpv6' type='136'/>" in dumped

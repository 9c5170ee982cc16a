"""Parsing and canonical formatting of <filter> documents (filter-language.md §1–§13).

Three kinds of cases: every protocol element with every attribute (built from the schema
tables), hand-written XML with its expected canonical output, and a hypothesis property over
random valid filters. Every refusal of §13 is checked for a located message.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirt_nwfilter.errors import ValidationError
from libvirt_nwfilter.model import (LIBVIRT_CHAIN_DEFAULTS, Action, Attr, Direction, Filter, FilterRef,
                                    Match, Rule, VarRef, chain_prefix, make_params)
from libvirt_nwfilter.schema import (ATTR_ORDER, ICMPV6_GROUP, NWF_NAMESPACE, PORT_PROTOCOLS, PROTOCOLS,
                                     Negation, ValueType, decode_uint, parse_literal)
from libvirt_nwfilter.xml import MAX_DOCUMENT_BYTES, format_filter, parse_filter

FILTER_DIR = Path(__file__).resolve().parents[2] / "libvirt_nwfilter" / "filters"
PORT_ATTRS = ("srcportstart", "srcportend", "dstportstart", "dstportend")


# --------------------------------------------------------------------------------------------
# helpers


def xattr(text: str) -> str:
    """Text escaped for a single-quoted XML attribute in test input."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;").replace("\t", "&#9;").replace("\n", "&#10;")
            .replace("\r", "&#13;"))


def parse(xml: str | bytes) -> Filter:
    return parse_filter(xml, "t.xml")


def canonical(xml: str | bytes) -> str:
    """Format, and check that re-parsing and re-formatting are stable."""
    first = parse(xml)
    out = format_filter(first)
    second = parse(out)
    assert second == first
    assert format_filter(second) == out
    return out


def problems(xml: str | bytes) -> tuple[str, ...]:
    with pytest.raises(ValidationError) as info:
        parse(xml)
    return info.value.problems


def rule_doc(children: str, action: str = "accept", direction: str = "out", extra: str = "") -> str:
    """A filter with one rule; our namespace is declared when the children use it."""
    namespace = f" xmlns:nwf='{NWF_NAMESPACE}'" if "nwf:" in children else ""
    return (f"<filter name='t'{namespace}><rule action='{action}' direction='{direction}'{extra}>"
            f"{children}</rule></filter>")


def rule_out(lines: list[str], action: str = "accept", direction: str = "out", priority: int = 500,
             extra: str = "") -> str:
    head = f"  <rule action='{action}' direction='{direction}' priority='{priority}'{extra}>"
    body = "".join(f"    {line}\n" for line in lines)
    namespace = f" xmlns:nwf='{NWF_NAMESPACE}'" if "nwf:" in body else ""
    return f"<filter name='t' chain='root'{namespace}>\n{head}\n{body}  </rule>\n</filter>\n"


# --------------------------------------------------------------------------------------------
# Every protocol element with every attribute, built from the schema tables

SAMPLE = {  # type -> (raw input, canonical output as printed)
    ValueType.UINT8: ("0X1F", "0x1f"),
    ValueType.UINT16: ("1000", "1000"),
    ValueType.UINT32: ("0xFFFFFFFF", "0xffffffff"),
    ValueType.UINT16_DEC: ("042", "42"),
    ValueType.MAC: ("AA:b:0:1:2:3", "aa:0b:00:01:02:03"),
    ValueType.MACMASK: ("FF:FF:FF:0:0:0", "ff:ff:ff:00:00:00"),
    ValueType.IPV4: ("10.1.2.3", "10.1.2.3"),
    ValueType.IPV4MASK: ("255.255.0.0", "16"),
    ValueType.IPV6: ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
    ValueType.IPV6MASK: ("ffff:ffff::", "32"),
    ValueType.BOOLEAN: ("yes", "true"),
    ValueType.COMMENT: ("a 'b' & <c> \"d\"\t", "a &apos;b&apos; &amp; &lt;c&gt; &quot;d&quot;&#9;"),
    ValueType.STATE: ("established,new", "NEW,ESTABLISHED"),
    ValueType.TCPFLAGS: ("syn,ack/syn", "SYN,ACK/SYN"),
    ValueType.IPSETNAME: ("my set", "my set"),
    ValueType.IPSETFLAGS: ("SRC,dst", "src,dst"),
    ValueType.NDLLADDR: ("AA:b:0:1:2:3", "aa:0b:00:01:02:03"),
}
OVERRIDE = {  # attribute -> (raw, printed) where the type sample does not fit
    "protocolid": ("2054", "arp"), "encap-protocol": ("0x800", "ipv4"), "opcode": ("0x2", "Reply"),
    "protocol": ("17", "udp"), "vlanid": ("0xfff", "0xfff"), "dscp": ("0x3f", "0x3f"),
}


def sample(name: str, vtype: ValueType) -> tuple[str, str]:
    return OVERRIDE.get(name) or SAMPLE[vtype]


def requirements(protocol: str, name: str) -> dict[str, tuple[str, str]]:
    """Attributes an element needs next to ``name`` to be valid (base, protocol)."""
    spec = PROTOCOLS[protocol]
    need: dict[str, tuple[str, str]] = {}
    base = spec.attr(name).base
    if base:
        need[base] = sample(base, spec.attr(base).vtype)
    if protocol in ("ip", "ipv6") and name in PORT_ATTRS:
        need["protocol"] = ("6", "tcp")
    if protocol == "ipv6" and name in ICMPV6_GROUP:
        need["protocol"] = ("58", "icmpv6")
    if spec.attr(name).extension:  # Neighbour Discovery fields: one ND message type
        need.update(protocol=("58", "icmpv6"), type=("136", "136"))
    return need


ALL_ATTRS = [pytest.param(p, a.name, id=f"{p}@{a.name}") for p, s in PROTOCOLS.items() for a in s.attrs]


@pytest.mark.parametrize("protocol, name", ALL_ATTRS)
def test_every_attribute_positive(protocol, name):
    spec = PROTOCOLS[protocol]
    present = {name: sample(name, spec.attr(name).vtype), **requirements(protocol, name)}
    inner = " ".join(f"{n}='{xattr(raw)}'" for n, (raw, _) in present.items())
    order = ATTR_ORDER[protocol]
    want = " ".join(f"{n}='{out}'" for n, (_, out) in sorted(present.items(), key=lambda kv: order[kv[0]]))
    assert canonical(rule_doc(f"<{protocol} {inner}/>")) == rule_out([f"<{protocol} {want}/>"])


@pytest.mark.parametrize("protocol, name", ALL_ATTRS)
def test_every_attribute_negated(protocol, name):
    spec = PROTOCOLS[protocol]
    attr = spec.attr(name)
    own = {name: sample(name, attr.vtype)}
    base = attr.base
    if base:
        own[base] = sample(base, spec.attr(base).vtype)
    others = {k: v for k, v in requirements(protocol, name).items() if k not in own}
    negated_text = " ".join(f"{n}='{xattr(raw)}'" for n, (raw, _) in own.items())
    children = f"<{protocol} match='no' {negated_text}/>"
    if others:
        children += f"<{protocol} " + " ".join(f"{n}='{raw}'" for n, (raw, _) in others.items()) + "/>"
    doc = rule_doc(children)
    if attr.negation is Negation.REFUSED or (base and spec.attr(base).negation is Negation.REFUSED):
        found = problems(doc)
        assert any("cannot be negated" in p and f"<{protocol}>" in p for p in found), found
        return
    model = parse(doc)
    for n in own:
        assert model.entries[0].match.get(n).negated, n
    for n in others:
        assert not model.entries[0].match.get(n).negated, n
    # expected siblings: one per run of equal negation in canonical order (§12)
    order = ATTR_ORDER[protocol]
    items = sorted([(n, out, True) for n, (_, out) in own.items()]
                   + [(n, out, False) for n, (_, out) in others.items()], key=lambda t: order[t[0]])
    assert canonical(doc) == rule_out(siblings(protocol, items))


def siblings(protocol: str, items: list[tuple[str, str, bool]]) -> list[str]:
    """The §12 splitting algorithm, written independently of the formatter."""
    runs: list[tuple[bool, list[str]]] = []
    for name, value, negated in items:
        if not runs or runs[-1][0] != negated:
            runs.append((negated, []))
        runs[-1][1].append(f"{name}='{value}'")
    return [f"<{protocol} " + ("match='no' " if neg else "") + " ".join(attrs) + "/>" for neg, attrs in runs]


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_every_element_empty(protocol):
    assert canonical(rule_doc(f"<{protocol}/>")) == rule_out([f"<{protocol}/>"])
    assert canonical(rule_doc(f"<{protocol} match='no'/>")) == rule_out([f"<{protocol}/>"])
    assert canonical(rule_doc(f"<{protocol} match='yes'/>")) == rule_out([f"<{protocol}/>"])


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_every_element_unknown_attribute(protocol):
    found = problems(rule_doc(f"<{protocol} bogusattr='1'/>"))
    assert len(found) == 1
    assert "unknown attribute 'bogusattr'" in found[0] and f"<{protocol}>" in found[0]


# --------------------------------------------------------------------------------------------
# Hand-written cases with expected canonical output

HAND = {
    # §12 example: srcmacaddr positive, srcipaddr negated, dscp positive -> three siblings
    "three-siblings": (
        rule_doc("<tcp srcmacaddr='52:54:00:00:00:01' dscp='2'/><tcp match='no' srcipaddr='10.0.0.1'/>"),
        rule_out(["<tcp srcmacaddr='52:54:00:00:00:01'/>", "<tcp match='no' srcipaddr='10.0.0.1'/>",
                  "<tcp dscp='2'/>"])),
    # a companion written in a positive element follows its negated base
    "companion-follows-base": (
        rule_doc("<ip match='no' srcipaddr='10.0.0.0'/><ip srcipmask='255.0.0.0' protocol='udp'/>"),
        rule_out(["<ip match='no' srcipaddr='10.0.0.0' srcipmask='8'/>", "<ip protocol='udp'/>"])),
    "companion-positive-base": (
        rule_doc("<tcp srcportstart='1'/><tcp match='no' srcportend='0x10'/>"),
        rule_out(["<tcp srcportstart='1' srcportend='0x10'/>"])),
    "neg-pos-neg": (
        rule_doc("<udp match='no' srcipaddr='1.2.3.4' dstportstart='53'/><udp dstipaddr='5.6.7.8'/>"),
        rule_out(["<udp match='no' srcipaddr='1.2.3.4'/>", "<udp dstipaddr='5.6.7.8'/>",
                  "<udp match='no' dstportstart='53'/>"])),
    # dstportstart has its own negation (libvirt copies srcportstart's: §13 #7)
    "dstport-own-negation": (
        rule_doc("<tcp match='no' srcportstart='1' srcportend='2'/><tcp dstportstart='80' dstportend='90'/>"),
        rule_out(["<tcp match='no' srcportstart='1' srcportend='2'/>",
                  "<tcp dstportstart='80' dstportend='90'/>"])),
    "dstport-negated-alone": (
        rule_doc("<tcp match='no' dstportstart='80'/>"),
        rule_out(["<tcp match='no' dstportstart='80'/>"])),
    # merging: the later element's value and negation win
    "later-wins": (
        rule_doc("<tcp srcportstart='1'/><tcp match='no' srcportstart='2'/>"),
        rule_out(["<tcp match='no' srcportstart='2'/>"])),
    "later-wins-positive": (
        rule_doc("<mac match='no' protocolid='arp'/><mac protocolid='0x800'/>"),
        rule_out(["<mac protocolid='ipv4'/>"])),
    # ipv6 ICMPv6 group: with type, the others follow type
    "icmpv6-group-follows-type": (
        rule_doc("<ipv6 match='no' type='1' typeend='3'/><ipv6 protocol='icmpv6' code='0' codeend='4'/>"),
        rule_out(["<ipv6 protocol='icmpv6'/>", "<ipv6 match='no' type='1' typeend='3' code='0' codeend='4'/>"])),
    # without type, a lone negated code keeps its negation (libvirt loses it: §13 #7)
    "icmpv6-group-code-alone": (
        rule_doc("<ipv6 protocol='58'/><ipv6 match='no' code='1'/>"),
        rule_out(["<ipv6 protocol='icmpv6'/>", "<ipv6 match='no' code='1'/>"])),
    "icmpv6-group-shared": (
        rule_doc("<ipv6 match='no' typeend='5' codeend='2'/><ipv6 protocol='icmpv6'/>"),
        rule_out(["<ipv6 protocol='icmpv6'/>", "<ipv6 match='no' typeend='5' codeend='2'/>"])),
    "ports-order-independent": (
        rule_doc("<ip srcportstart='10'/><ip protocol='tcp'/>"),
        rule_out(["<ip protocol='tcp' srcportstart='10'/>"])),
    "ip-dccp-ports": (
        rule_doc("<ip protocol='33' dstportstart='1'/>"),
        rule_out(["<ip protocol='33' dstportstart='1'/>"])),
    "stp-ranges": (
        rule_doc("<stp match='no' root-priority='1' root-priority-hi='0x10'/><stp flags='0x1' type='0'/>"),
        rule_out(["<stp type='0' flags='0x1'/>", "<stp match='no' root-priority='1' root-priority-hi='0x10'/>"])),
    "comment-in-negated-sibling": (
        rule_doc("<tcp match='no' comment='c' srcipaddr='1.1.1.1'/>"),
        rule_out(["<tcp match='no' srcipaddr='1.1.1.1' comment='c'/>"])),
    "comment-negated-alone": (
        rule_doc("<tcp srcipaddr='1.1.1.1'/><tcp match='no' comment='c'/>"),
        rule_out(["<tcp srcipaddr='1.1.1.1'/>", "<tcp match='no' comment='c'/>"])),
    "comment-literal-dollar": (
        rule_doc("<all comment='$x'/>"),
        rule_out(["<all comment='$x'/>"])),
    "escaping": (
        rule_doc("<tcp comment='a&#9;b&#10;c&#13;d &quot;q&quot; &apos;s&apos; &amp; &lt;&gt;'/>"),
        rule_out(["<tcp comment='a&#9;b&#10;c&#13;d &quot;q&quot; &apos;s&apos; &amp; &lt;&gt;'/>"])),
    "literal-whitespace-normalised": (  # raw TAB/LF in XML input are attribute-normalised to spaces
        rule_doc("<tcp comment='a\tb\nc'/>"),
        rule_out(["<tcp comment='a b c'/>"])),
    "comment-quote-styles": (
        rule_doc("<tcp comment=\"it's\"/>"),
        rule_out(["<tcp comment='it&apos;s'/>"])),
    "variables-printed-form": (
        rule_doc("<ip srcipaddr='$B[ @0 ]' dstipaddr='$A[ 1 ]' srcipmask='$M[@7]' protocol='$P '/>"),
        rule_out(["<ip srcipaddr='$B' srcipmask='$M[@7]' dstipaddr='$A[1]' protocol='$P'/>"])),
    "variables-iterator-1000": (
        rule_doc("<udp srcportstart='$P[@1000]' dstportstart='$Q[0]'/>"),
        rule_out(["<udp srcportstart='$P[@1000]' dstportstart='$Q[0]'/>"])),
    "name-maps": (
        rule_doc("<arp protocoltype='0x800' opcode='0x20' hwtype='1'/>"),
        rule_out(["<arp hwtype='1' protocoltype='0x800' opcode='32'/>"])),
    "gratuitous-negated": (
        rule_doc("<arp match='no' gratuitous='1'/>"),
        rule_out(["<arp match='no' gratuitous='true'/>"])),
    "no-protocol": (
        "<filter name='t'><rule action='drop' direction='inout'/></filter>",
        "<filter name='t' chain='root'>\n  <rule action='drop' direction='inout' priority='500'/>\n</filter>\n"),
    "statematch-false": (
        rule_doc("<all/>", direction="in", extra=" statematch='FALSE' priority=' -1000'"),
        rule_out(["<all/>"], direction="in", priority=-1000, extra=" statematch='false'")),
    "statematch-0": (
        rule_doc("<all/>", extra=" statematch='0'"),
        rule_out(["<all/>"], extra=" statematch='false'")),
    "statematch-true-not-printed": (
        rule_doc("<all/>", extra=" statematch='True'"),
        rule_out(["<all/>"])),
    "statematch-1-not-printed": (
        rule_doc("<all/>", extra=" statematch='1'"),
        rule_out(["<all/>"])),
    "rule-priority-0-printed": (
        rule_doc("<all/>", action="continue", direction="inout", extra=" priority='0'"),
        rule_out(["<all/>"], action="continue", direction="inout", priority=0)),
    "rule-priority-plus": (
        rule_doc("<all/>", action="return", extra=" priority='+5'"),
        rule_out(["<all/>"], action="return", priority=5)),
    "reject": (
        rule_doc("<all-ipv6/>", action="reject", direction="in"),
        rule_out(["<all-ipv6/>"], action="reject", direction="in")),
    "whole-filter": (
        "<?xml version='1.0' encoding='UTF-8'?>\n<!-- header -->\n"
        "<filter name='f.x-1' chain='ipv4-ip' priority='-710'>\n"
        "  <rule action='drop' direction='out'/>\n  <?pi ignored?>\n"
        "  <filterref filter='other'>\n"
        "    <parameter name='b' value='2'/><parameter name='B' value='x:y'/>\n"
        "    <parameter name='a' value='3'/><parameter name='b' value='1'/>\n"
        "  </filterref>\n  <filterref filter='second'/>\n"
        "  <uuid>  0123456789ABCDEF0123456789ABCDEF </uuid>\n"
        "</filter>\n",
        "<filter name='f.x-1' chain='ipv4-ip' priority='-710'>\n"
        "  <uuid>01234567-89ab-cdef-0123-456789abcdef</uuid>\n"
        "  <rule action='drop' direction='out' priority='500'/>\n"
        "  <filterref filter='other'>\n"
        "    <parameter name='B' value='x:y'/>\n"
        "    <parameter name='a' value='3'/>\n"
        "    <parameter name='b' value='2'/>\n"
        "    <parameter name='b' value='1'/>\n"
        "  </filterref>\n"
        "  <filterref filter='second'/>\n"
        "</filter>\n"),
    "ipset-both-kept": (
        rule_doc("<tcp ipset='s' ipsetflags='dst'/>"),
        rule_out(["<tcp ipset='s' ipsetflags='dst'/>"])),
    "ipv6-dstipto-family": (
        rule_doc("<udp-ipv6 dstipfrom='2001:db8::1' dstipto='2001:DB8::FF'/>"),
        rule_out(["<udp-ipv6 dstipfrom='2001:db8::1' dstipto='2001:db8::ff'/>"])),
    "stp-srcmac-out": (
        rule_doc("<stp srcmacaddr='1:80:c2:0:0:0' srcmacmask='ff:ff:ff:ff:ff:ff'/>", direction="in"),
        rule_out(["<stp srcmacaddr='01:80:c2:00:00:00' srcmacmask='ff:ff:ff:ff:ff:ff'/>"], direction="in")),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_written(name):
    source, want = HAND[name]
    assert canonical(source) == want


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_written_output_is_fixed_point(name):
    _, want = HAND[name]
    assert canonical(want) == want


def test_mixed_entries_keep_document_order():
    doc = ("<filter name='t'><filterref filter='a'/><rule action='drop' direction='in'/>"
           "<filterref filter='b'/><rule action='accept' direction='out'/></filter>")
    flt = parse(doc)
    assert [type(e).__name__ for e in flt.entries] == ["FilterRef", "Rule", "FilterRef", "Rule"]
    assert [e.filter for e in flt.entries if isinstance(e, FilterRef)] == ["a", "b"]


def test_hint_only_names_attributes_of_the_element():
    found = problems(rule_doc("<tcp port_hi='1'/>"))
    assert "did you mean" not in found[0]


def test_state_twice_is_an_error_but_other_attributes_merge():
    found = problems(rule_doc("<tcp state='NEW'/><tcp state='ESTABLISHED'/>"))
    assert any("'state'" in p and "once" in p for p in found), found
    flt = parse(rule_doc("<tcp state='NEW' srcportstart='1'/><tcp srcportstart='2'/>"))
    assert flt.entries[0].match.value("srcportstart") == "2"


# --------------------------------------------------------------------------------------------
# Chains and priorities

@pytest.mark.parametrize("chain", ["root", "mac", "arp-ip", "arp-mac", "ipv4-ip", "ipv6-ip", "stp-xyz", "macfoo",
                                   "ipv4.a:b_c", "vlan", "rarp", "rarpx", "stp", "arp", "ipv6", "mac123456789",
                                   "vlan-100", "ipv4-"])
def test_valid_chain_names(chain):
    assert parse(f"<filter name='t' chain='{chain}'/>").chain == chain


@pytest.mark.parametrize("chain, words", [
    ("mac1234567890", ["longer than 12"]), ("rootx", ["rootx", "root"]), ("foo", ["foo", "mac", "ipv6"]),
    ("mac/x", ["invalid characters"]), ("", ["chain"]), ("ROOT", ["ROOT"]), ("Mac", ["Mac"]),
    ("mac x", ["invalid characters"]), ("mac&#10;", ["invalid characters"]), ("root-1", ["root"]),
    ("ipv", ["ipv"]),
])
def test_invalid_chain_names(chain, words):
    found = problems(f"<filter name='t' chain='{chain}'/>")
    assert len(found) == 1
    assert "t.xml:1" in found[0] and "<filter>" in found[0]
    for word in words:
        assert word in found[0]


@pytest.mark.parametrize("head, printed, effective", [
    ("", "chain='root'", 0),
    ("priority='-300'", "chain='root'", 0),  # chain absent: range-checked, then ignored
    ("chain='root'", "chain='root'", 0),
    ("chain='root' priority='5'", "chain='root' priority='5'", 0),
    ("chain='root' priority='0'", "chain='root'", 0),
    ("chain='mac'", "chain='mac' priority='-800'", -800),
    ("chain='vlan'", "chain='vlan' priority='-750'", -750),
    ("chain='ipv4'", "chain='ipv4' priority='-700'", -700),
    ("chain='ipv6-x'", "chain='ipv6-x' priority='-600'", -600),
    ("chain='arp'", "chain='arp' priority='-500'", -500),
    ("chain='arp-ip'", "chain='arp-ip' priority='-500'", -500),
    ("chain='rarp'", "chain='rarp' priority='-400'", -400),
    ("chain='arp' priority='-510'", "chain='arp' priority='-510'", -510),
    ("chain='arp' priority='1000'", "chain='arp' priority='1000'", 1000),
    ("chain='arp' priority=' 7'", "chain='arp' priority='7'", 7),
    ("chain='stp'", "chain='stp'", -810),  # never printed unless explicit
    ("chain='stp-x' priority='-810'", "chain='stp-x' priority='-810'", -810),
    ("chain='stp' priority='-5'", "chain='stp' priority='-5'", -5),
])
def test_chain_priority_printing(head, printed, effective):
    flt = parse(f"<filter name='t' {head}/>")
    assert flt.effective_priority == effective
    assert canonical(f"<filter name='t' {head}/>") == f"<filter name='t' {printed}>\n</filter>\n"


@pytest.mark.parametrize("head", ["chain='arp' priority='0'", "chain='arp' priority='-500'", "chain='arp'"])
def test_explicit_default_or_zero_priority_reads_back_the_same(head):
    # An explicit priority='0' is not printed and an absent one prints the default (§12). The
    # stored file is the canonical form, so the model must not depend on which of the three was
    # written, or a definition would change its chain priority when read back from the store.
    flt = parse(f"<filter name='t' {head}/>")
    assert flt == parse("<filter name='t' chain='arp'/>")
    assert flt.effective_priority == -500
    assert format_filter(flt) == "<filter name='t' chain='arp' priority='-500'>\n</filter>\n"
    assert parse(format_filter(flt)) == flt


def test_stp_explicit_zero_is_not_remembered():
    # Spec conflict (reported): libvirt reads stp priority='0' as 0 before and after dumpxml; we
    # print nothing for it (§12) and so can only read it back as "not given" (-810).
    flt = parse("<filter name='t' chain='stp' priority='0'/>")
    assert format_filter(flt) == "<filter name='t' chain='stp'>\n</filter>\n"
    assert flt.effective_priority == -810


@pytest.mark.parametrize("value", ["abc", "1001", "-1001", "1.5", "1_0", "0x10", "", "\u0665", "1 0"])
def test_chain_priority_refused(value):
    for head in (f"chain='mac' priority='{value}'", f"priority='{value}'"):
        found = problems(f"<filter name='t' {head}/>")
        assert len(found) == 1 and "'priority'" in found[0] and f"'{value}'" in found[0], found


@pytest.mark.parametrize("value", ["abc", "1001", "-1001", "1.5", "1_0", "0x10", "", "\u0665"])
def test_rule_priority_refused(value):
    found = problems(f"<filter name='t'><rule action='drop' direction='in' priority='{value}'/></filter>")
    assert len(found) == 1
    assert "<rule>" in found[0] and "'priority'" in found[0] and f"'{value}'" in found[0]


def test_rule_priority_bounds():
    for value in (-1000, 1000):
        flt = parse(f"<filter name='t'><rule action='drop' direction='in' priority='{value}'/></filter>")
        assert flt.entries[0].priority == value
    assert parse("<filter name='t'><rule action='drop' direction='in'/></filter>").entries[0].priority == 500


# --------------------------------------------------------------------------------------------
# Names, UUIDs, filterref/parameter


@pytest.mark.parametrize("name", ["a", "_x", "A.b-c_d", "a" * 200, "clean-traffic", "x1"])
def test_valid_filter_names(name):
    assert parse(f"<filter name='{name}'/>").name == name


@pytest.mark.parametrize("name", ["1abc", "-x", ".x", "a b", "a" * 201, "a/b", "a&#10;", "a:b", "a$", "a&apos;b",
                                  "\u00e9t\u00e9"])
def test_invalid_filter_names(name):
    found = problems(f"<filter name='{name}'/>")
    assert len(found) == 1 and "'name'" in found[0] and "<filter>" in found[0]


def test_filter_without_name():
    for doc in ("<filter/>", "<filter name=''/>"):
        found = problems(doc)
        assert len(found) == 1 and "'name' is required" in found[0]


@pytest.mark.parametrize("text, want", [
    ("01234567-89ab-cdef-0123-456789abcdef", "01234567-89ab-cdef-0123-456789abcdef"),
    ("01234567-89AB-CDEF-0123-456789ABCDEF", "01234567-89ab-cdef-0123-456789abcdef"),
    ("0123456789abcdef0123456789abcdef", "01234567-89ab-cdef-0123-456789abcdef"),
    (" 0123456789abcdef0123456789abcdef\n", "01234567-89ab-cdef-0123-456789abcdef"),
])
def test_uuid_forms(text, want):
    out = canonical(f"<filter name='t'><rule action='drop' direction='in'/><uuid>{text}</uuid></filter>")
    assert out.splitlines()[1] == f"  <uuid>{want}</uuid>"


@pytest.mark.parametrize("text", ["", "0123456789abcdef0123456789abcde", "0123456789abcdef0123456789abcdefa",
                                  "01234567-89ab-cdef-0123456789abcdef", "0123456g-89ab-cdef-0123-456789abcdef",
                                  "{01234567-89ab-cdef-0123-456789abcdef}", "01234567--89ab-cdef-0123-456789abcde"])
def test_uuid_malformed(text):
    found = problems(f"<filter name='t'><uuid>{text}</uuid></filter>")
    assert any("<uuid>" in p and "UUID" in p for p in found), found


def test_uuid_twice_and_attributes():
    u = "01234567-89ab-cdef-0123-456789abcdef"
    assert any("more than one" in p for p in problems(f"<filter name='t'><uuid>{u}</uuid><uuid>{u}</uuid></filter>"))
    assert any("unknown attribute 'x'" in p for p in problems(f"<filter name='t'><uuid x='1'>{u}</uuid></filter>"))
    assert any("<b>" in p for p in problems(f"<filter name='t'><uuid>{u}<b/></uuid></filter>"))


@pytest.mark.parametrize("body, words", [
    ("<filterref/>", ["<filterref>", "'filter' is required"]),
    ("<filterref filter=''/>", ["<filterref>", "'filter' is required"]),
    ("<filterref filter='1x'/>", ["<filterref>", "'1x'"]),
    ("<filterref filter='x' other='1'/>", ["<filterref>", "unknown attribute 'other'"]),
    ("<filterref filter='x'><parameter name='bad-name' value='1'/></filterref>", ["<parameter>", "'bad-name'"]),
    ("<filterref filter='x'><parameter name='A' value='1/2'/></filterref>", ["<parameter>", "'1/2'", "'A'"]),
    ("<filterref filter='x'><parameter name='A' value='1&#10;'/></filterref>", ["<parameter>", "'1\\n'"]),
    ("<filterref filter='x'><parameter name='A&#10;' value='1'/></filterref>", ["<parameter>", "'A\\n'"]),
    ("<filterref filter='x'><parameter name='A' value='a b'/></filterref>", ["<parameter>", "'a b'"]),
    ("<filterref filter='x'><parameter name='A'/></filterref>", ["<parameter>", "'A'", "value"]),
    ("<filterref filter='x'><parameter name='A' value=''/></filterref>", ["<parameter>", "'A'", "value"]),
    ("<filterref filter='x'><parameter value='1'/></filterref>", ["<parameter>", "name"]),
    ("<filterref filter='x'><parameter name='A' value='1' extra='2'/></filterref>", ["unknown attribute 'extra'"]),
    ("<filterref filter='x'><param name='A' value='1'/></filterref>", ["<param>", "unknown element"]),
    ("<filterref filter='x'><p:parameter xmlns:p='urn:x' name='A' value='1'/></filterref>", ["parameter", "unknown"]),
    ("<filterref filter='x'>junk</filterref>", ["<filterref>", "junk"]),
    ("<filterref filter='x'><parameter name='A' value='1'>t</parameter></filterref>", ["<parameter>", "'t'"]),
    ("<filterref filter='x'><parameter name='A' value='1'><y/></parameter></filterref>", ["<y>"]),
])
def test_filterref_problems(body, words):
    found = problems(f"<filter name='t'>{body}</filter>")
    assert len(found) == 1, found
    assert "filter 't'" in found[0]
    for word in words:
        assert word in found[0], (word, found[0])


def test_parameters_sorted_values_in_order():
    doc = ("<filter name='t'><filterref filter='x'><parameter name='z' value='1'/><parameter name='IP' value='10.0.0.2'/>"
           "<parameter name='IP' value='10.0.0.1'/><parameter name='_' value='0x10'/><parameter name='A1' value='fe80::1'/>"
           "</filterref></filter>")
    out = canonical(doc)
    assert [line.strip() for line in out.splitlines()[2:-2]] == [
        "<parameter name='A1' value='fe80::1'/>", "<parameter name='IP' value='10.0.0.2'/>",
        "<parameter name='IP' value='10.0.0.1'/>", "<parameter name='_' value='0x10'/>",
        "<parameter name='z' value='1'/>"]


# --------------------------------------------------------------------------------------------
# Variables


@pytest.mark.parametrize("text, ref", [
    ("$A", VarRef("A")), ("$A[@0]", VarRef("A")), ("$B[ @0 ]", VarRef("B")), ("$A[ 1 ]", VarRef("A", index=1)),
    ("$A[@2]", VarRef("A", iterator=2)), ("$A[@1000]", VarRef("A", iterator=1000)), ("$_1", VarRef("_1")),
    ("$A ", VarRef("A")), ("$A[0]", VarRef("A", index=0)), ("$1", VarRef("1")),
])
def test_variable_references(text, ref):
    flt = parse(rule_doc(f"<udp srcportstart='{text}'/>"))
    assert flt.entries[0].match.value("srcportstart") == ref


@pytest.mark.parametrize("text", ["$", "$A[1]junk", "$A[", "$A[@]", "$A-B", "$A[@1001]", "$A[-1]", "$A[1", "$A]",
                                  "$A[x]", "$ A", "$A[@1]]", "$$A"])
def test_variable_references_refused(text):
    found = problems(rule_doc(f"<udp srcportstart='{text}'/>"))
    assert len(found) == 1
    assert "<udp>" in found[0] and "'srcportstart'" in found[0] and f"'{text}'" in found[0]


def test_iterator_limit_message():
    found = problems(rule_doc("<udp srcportstart='$A[@1001]'/>"))
    assert "1000" in found[0]


@pytest.mark.parametrize("element", [
    "<tcp state='$S'/>", "<tcp flags='$F'/>", "<tcp ipset='s' ipsetflags='$F'/>", "<arp gratuitous='$G'/>",
    "<all-ipv6 state='$S[0]'/>",
])
def test_variables_refused_where_not_allowed(element):
    found = problems(rule_doc(element))
    assert len(found) == 1 and "variables are not allowed" in found[0]


def test_variables_allowed_elsewhere():
    flt = parse(rule_doc("<tcp ipset='$SET' srcipaddr='$IP' srcipmask='$M' connlimit-above='$N' option='$O'/>"))
    assert {a.name for a in flt.entries[0].match.attrs if isinstance(a.value, VarRef)} == {
        "ipset", "srcipaddr", "srcipmask", "connlimit-above", "option"}
    flt = parse(rule_doc("<stp flags='$F' root-cost='$C'/>"))
    assert all(isinstance(a.value, VarRef) for a in flt.entries[0].match.attrs)


# --------------------------------------------------------------------------------------------
# §13: every refusal, each with a located message naming filter, element and attribute/value

REFUSALS = {
    "1-unknown-child": (rule_doc("<tcp/><foo/>"), ["<foo>", "unknown"]),
    "1-unknown-first-child": (rule_doc("<foo/>"), ["<foo>", "unknown"]),
    "1-text-in-rule": (rule_doc("<tcp/>junk"), ["<rule>", "junk"]),
    "2-other-protocol": (rule_doc("<tcp/><udp/>"), ["<udp>", "<tcp>"]),
    "3-unknown-filter-child": ("<filter name='t'><bogus/></filter>", ["<bogus>", "unknown element"]),
    "3-text-in-filter": ("<filter name='t'><rule action='drop' direction='in'/>junk</filter>", ["<filter>", "junk"]),
    "3-unknown-filterref-child": ("<filter name='t'><filterref filter='x'><bogus/></filterref></filter>",
                                  ["<bogus>", "unknown element"]),
    "3-unknown-filter-attribute": ("<filter name='t' color='red'/>", ["<filter>", "unknown attribute 'color'"]),
    "3-unknown-rule-attribute": (rule_doc("", extra=" prio='1'"), ["<rule>", "unknown attribute 'prio'"]),
    "4-typo-hint": (rule_doc("<tcp srcportstart='1' srcporttend='2'/>"),
                    ["<tcp>", "'srcporttend'", "did you mean 'srcportend'"]),
    "4-dstmacaddr-on-icmp": (rule_doc("<icmp dstmacaddr='1:2:3:4:5:6'/>"), ["<icmp>", "'dstmacaddr'"]),
    "4-srcmacmask-on-l3": (rule_doc("<all srcmacaddr='1:2:3:4:5:6' srcmacmask='ff:ff:ff:ff:ff:ff'/>"),
                           ["<all>", "'srcmacmask'"]),
    "4-flags-on-tcp-ipv6": (rule_doc("<tcp-ipv6 flags='SYN/SYN'/>"), ["<tcp-ipv6>", "'flags'"]),
    "4-port_hi": (rule_doc("<stp port='1' port_hi='2'/>"), ["<stp>", "'port_hi'", "did you mean 'port-hi'"]),
    "4-msg-age": (rule_doc("<stp msg-age='1'/>"), ["<stp>", "'msg-age'", "did you mean 'age'"]),
    "4-dscp-on-ipv6": (rule_doc("<ipv6 dscp='1'/>"), ["<ipv6>", "'dscp'"]),
    "4-igmp-ipv6": (rule_doc("<igmp-ipv6/>"), ["<igmp-ipv6>"]),
    "4-port_hi-on-tcp-no-wrong-hint": (rule_doc("<tcp port_hi='1'/>"), ["<tcp>", "unknown attribute 'port_hi'"]),
    "4-namespaced-protocol": (rule_doc("<p:tcp xmlns:p='urn:x'/>"), ["tcp", "unknown"]),
    "5-rule-priority": (rule_doc("", extra=" priority='high'"), ["<rule>", "'priority'", "'high'"]),
    "5-rule-priority-range": (rule_doc("", extra=" priority='2000'"), ["<rule>", "'priority'", "'2000'"]),
    "6-parameter-name": ("<filter name='t'><filterref filter='x'><parameter name='bad-name' value='1'/></filterref>"
                         "</filter>", ["<parameter>", "'bad-name'"]),
    "6-parameter-value": ("<filter name='t'><filterref filter='x'><parameter name='X' value='1/2'/></filterref>"
                          "</filter>", ["<parameter>", "'1/2'"]),
    "8-ipsetflags-alone": (rule_doc("<tcp ipsetflags='src'/>"), ["<tcp>", "'ipsetflags'", "'ipset'"]),
    "9-negated-state": (rule_doc("<tcp match='no' state='NEW'/>"), ["<tcp>", "'state'", "negated"]),
    "9-negated-ipset": (rule_doc("<udp match='no' ipset='s'/>"), ["<udp>", "'ipset'", "negated"]),
    "9-negated-ipsetflags": (rule_doc("<all ipset='s'/><all match='no' ipsetflags='dst'/>"),
                             ["<all>", "'ipsetflags'", "negated"]),
    "10-match-false": (rule_doc("<tcp match='false' srcportstart='1'/>"), ["<tcp>", "'match'", "'false'"]),
    "10-match-NO": (rule_doc("<tcp match='NO' srcportstart='1'/>"), ["<tcp>", "'match'", "'NO'"]),
    "10-statematch": (rule_doc("<all/>", extra=" statematch='no'"), ["<rule>", "'statematch'", "'no'"]),
    "10-boolean": (rule_doc("<arp gratuitous='TRUE'/>"), ["<arp>", "'gratuitous'", "'TRUE'"]),
    "11-ipv4-short": (rule_doc("<ip srcipaddr='10.1'/>"), ["<ip>", "'srcipaddr'", "'10.1'"]),
    "11-ipv4-octal": (rule_doc("<tcp dstipaddr='010.001.002.003'/>"), ["<tcp>", "'dstipaddr'", "'010.001.002.003'"]),
    "12-dstipto-v4-in-v6": (rule_doc("<tcp-ipv6 dstipfrom='::1' dstipto='10.0.0.1'/>"),
                            ["<tcp-ipv6>", "'dstipto'", "'10.0.0.1'"]),
    "13-addr-and-range": (rule_doc("<tcp srcipaddr='1.1.1.1' srcipfrom='1.1.1.2'/>"),
                          ["<tcp>", "'srcipaddr'", "'srcipfrom'"]),
    "13-dst-addr-and-range": (rule_doc("<udp-ipv6 dstipaddr='::1'/><udp-ipv6 dstipfrom='::2'/>"),
                              ["<udp-ipv6>", "'dstipaddr'", "'dstipfrom'"]),
    "14-mask-alone": (rule_doc("<tcp srcipmask='8'/>"), ["<tcp>", "'srcipmask'", "'srcipaddr'"]),
    "14-code-alone": (rule_doc("<icmp code='1'/>"), ["<icmp>", "'code'", "'type'"]),
    "14-icmpv6-code-alone": (rule_doc("<icmpv6 code='1'/>"), ["<icmpv6>", "'code'", "'type'"]),
    "14-hi-alone": (rule_doc("<stp root-cost-hi='1'/>"), ["<stp>", "'root-cost-hi'", "'root-cost'"]),
    "14-portend-alone": (rule_doc("<tcp dstportend='1'/>"), ["<tcp>", "'dstportend'", "'dstportstart'"]),
    "14-arpmask-alone": (rule_doc("<arp arpsrcipmask='8'/>"), ["<arp>", "'arpsrcipmask'", "'arpsrcipaddr'"]),
    "14-macmask-alone": (rule_doc("<mac dstmacmask='ff:ff:ff:ff:ff:ff'/>"), ["<mac>", "'dstmacmask'", "'dstmacaddr'"]),
    "14-ipto-alone": (rule_doc("<all srcipto='1.1.1.1'/>"), ["<all>", "'srcipto'", "'srcipfrom'"]),
    "15-empty-state": (rule_doc("<tcp state=''/>"), ["<tcp>", "'state'", "''"]),
    "15-glued-state": (rule_doc("<tcp state='NEWESTABLISHED'/>"), ["<tcp>", "'state'", "'NEWESTABLISHED'"]),
    "15-glued-flags": (rule_doc("<tcp flags='SYNACK/SYN'/>"), ["<tcp>", "'flags'", "'SYNACK/SYN'"]),
    "15-state-twice": (rule_doc("<tcp state='NEW'/><tcp state='NEW'/>"), ["<tcp>", "'state'"]),
    "16-dollar-alone": (rule_doc("<tcp srcipaddr='$'/>"), ["<tcp>", "'srcipaddr'", "'$'"]),
    "16-trailing-junk": (rule_doc("<tcp srcipaddr='$A[1]junk'/>"), ["<tcp>", "'srcipaddr'", "'$A[1]junk'"]),
    "17-variable-state": (rule_doc("<tcp state='$S'/>"), ["<tcp>", "'state'", "'$S'"]),
    "17-variable-flags": (rule_doc("<tcp flags='$F'/>"), ["<tcp>", "'flags'", "'$F'"]),
    "17-variable-ipsetflags": (rule_doc("<tcp ipset='s' ipsetflags='$F'/>"), ["<tcp>", "'ipsetflags'", "'$F'"]),
    "17-variable-gratuitous": (rule_doc("<rarp gratuitous='$G'/>"), ["<rarp>", "'gratuitous'", "'$G'"]),
    "18-icmpv6-type-no-protocol": (rule_doc("<ipv6 type='1'/>"), ["<ipv6>", "icmpv6"]),
    "18-icmpv6-code-udp": (rule_doc("<ipv6 protocol='udp' code='1'/>"), ["<ipv6>", "icmpv6"]),
    "18-icmpv6-group-conflict": (rule_doc("<ipv6 protocol='icmpv6' match='no' code='1'/><ipv6 codeend='2'/>"),
                                 ["<ipv6>", "codeend", "negation"]),
    "18-stp-srcmac-inout": (rule_doc("<stp srcmacaddr='1:2:3:4:5:6'/>", direction="inout"),
                            ["<stp>", "'srcmacaddr'", "inout"]),
    "19-ports-without-protocol": (rule_doc("<ip srcportstart='10'/>"), ["<ip>", "protocol"]),
    "19-ports-wrong-protocol": (rule_doc("<ipv6 protocol='icmpv6' dstportstart='10'/>"), ["<ipv6>", "protocol"]),
    "21-rootx": ("<filter name='t' chain='rootx'/>", ["<filter>", "'rootx'", "root"]),
    "rule-missing-action": ("<filter name='t'><rule direction='in'/></filter>", ["<rule>", "'action'"]),
    "rule-missing-direction": ("<filter name='t'><rule action='drop'/></filter>", ["<rule>", "'direction'"]),
    "rule-bad-action": ("<filter name='t'><rule action='allow' direction='in'/></filter>", ["<rule>", "'allow'"]),
    "rule-bad-direction": ("<filter name='t'><rule action='drop' direction='both'/></filter>", ["<rule>", "'both'"]),
    "rule-action-case": ("<filter name='t'><rule action='DROP' direction='in'/></filter>", ["<rule>", "'DROP'"]),
    "value-with-newline": (rule_doc("<tcp ipset='abc&#10;'/>"), ["<tcp>", "'ipset'", "abc\\n"]),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusals_are_located(name):
    doc, words = REFUSALS[name]
    found = problems(doc)
    assert len(found) >= 1
    assert any(all(word in p for word in words) for p in found), found
    for p in found:
        assert p.startswith("t.xml:1: "), p
        assert "filter 't'" in p, p
        assert "\n" not in p, p


def test_several_problems_reported_at_once():
    doc = """<filter name='t' chain='bogus'>
  <rule action='drop' direction='in' priority='x'>
    <tcp srcipaddr='10.1' srcporttend='1'/>
  </rule>
  <filterref filter='y'><parameter name='A' value='1/2'/></filterref>
  <rule action='accept' direction='up'/>
</filter>"""
    with pytest.raises(ValidationError) as info:
        parse(doc)
    found = info.value.problems
    assert len(found) == 6, found
    assert [p.split(":")[1] for p in found] == ["1", "2", "3", "3", "5", "6"]
    assert str(info.value) == "; ".join(found)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# XML safety and malformed input


def test_doctype_with_entity_refused():
    found = problems("<!DOCTYPE filter [<!ENTITY x 'abc'>]><filter name='&x;'/>")
    assert len(found) == 1 and "DOCTYPE" in found[0]


def test_plain_doctype_refused():
    assert "DOCTYPE" in problems("<!DOCTYPE filter><filter name='a'/>")[0]


def test_external_entity_not_read(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("TOPSECRET")
    doc = (f"<!DOCTYPE filter [<!ENTITY x SYSTEM '{secret.as_uri()}'>]>"
           "<filter name='a'><rule action='drop' direction='in'><tcp comment='&x;'/></rule></filter>")
    with pytest.raises(ValidationError) as info:
        parse(doc)
    assert "TOPSECRET" not in str(info.value)


def test_external_dtd_not_loaded(tmp_path):
    dtd = tmp_path / "x.dtd"
    dtd.write_text("<!ENTITY x 'abc'>")
    found = problems(f"<!DOCTYPE filter SYSTEM '{dtd.as_uri()}'><filter name='a&x;'/>")
    assert len(found) == 1


def test_billion_laughs_refused():
    """Refused with one line, nothing expanded (libxml2 stops at the entity amplification)."""
    entities = "<!ENTITY a0 'lol'>" + "".join(f"<!ENTITY a{i} '{'&a%d;' % (i - 1) * 10}'>" for i in range(1, 10))
    found = problems(f"<!DOCTYPE filter [{entities}]><filter name='a'><rule action='drop' direction='in'>"
                     "<tcp comment='&a9;'/></rule></filter>")
    assert len(found) == 1 and "lollol" not in found[0], found


def test_size_limit():
    head, tail = b"<filter name='a'><!--", b"--></filter>"
    at_limit = head + b"x" * (MAX_DOCUMENT_BYTES - len(head) - len(tail)) + tail
    assert len(at_limit) == MAX_DOCUMENT_BYTES
    assert parse(at_limit).name == "a"
    found = problems(head + b"x" * MAX_DOCUMENT_BYTES + tail)
    assert len(found) == 1 and "larger than" in found[0]


def test_largest_document_parses():
    rule = "<rule action='drop' direction='in'><tcp dstportstart='80'/><tcp match='no' srcipaddr='1.2.3.4'/></rule>"
    count = (MAX_DOCUMENT_BYTES - 100) // len(rule)
    flt = parse("<filter name='a'>" + rule * count + "</filter>")
    assert len(flt.entries) == count > 8000
    assert all(entry == flt.entries[0] for entry in flt.entries)


@pytest.mark.parametrize("doc", [
    "", "not xml", "<filter name='a'>", "<filter name='a'></filterx>", "<filter name='a'/><filter name='b'/>",
    b"<filter name='\xff\xfe'/>", "<filter name='a&#1;'/>", "<filter name='&foo;'/>", "<filter name=a/>",
    "<filter name='a' name='b'/>",
])
def test_malformed_xml(doc):
    found = problems(doc)
    assert len(found) == 1 and found[0].startswith("t.xml:") and "malformed XML" in found[0]


@pytest.mark.parametrize("doc", ["<filterbinding/>", "<rule action='drop' direction='in'/>",
                                 "<filter xmlns='urn:x' name='a'/>", "<x:filter xmlns:x='urn:x' name='a'/>"])
def test_wrong_root(doc):
    found = problems(doc)
    assert len(found) == 1 and "<filter>" in found[0]


def test_namespaced_attribute_is_unknown():
    found = problems(rule_doc("<tcp xmlns:x='urn:x' x:srcportstart='1'/>"))
    assert len(found) == 1 and "unknown attribute" in found[0]


def test_str_and_bytes_input_agree():
    doc = "<?xml version='1.0' encoding='UTF-8'?><filter name='t'><rule action='drop' direction='in'>" \
          "<tcp comment='\u00e9t\u00e9'/></rule></filter>"
    assert parse(doc) == parse(doc.encode("utf-8"))
    assert parse(doc).entries[0].match.value("comment") == "\u00e9t\u00e9"


@pytest.mark.parametrize("encoding", ["ISO-8859-1", "UTF-16", "utf-8"])
def test_str_input_ignores_declared_encoding(encoding):
    doc = (f"<?xml version='1.0' encoding='{encoding}'?><filter name='t'><rule action='drop' direction='in'>"
           "<tcp comment='\u00e9\u20ac'/></rule></filter>")
    assert parse(doc).entries[0].match.value("comment") == "\u00e9\u20ac"
    if encoding != "ISO-8859-1":
        assert parse(doc.encode(encoding)).entries[0].match.value("comment") == "\u00e9\u20ac"


def test_latin1_bytes_honour_declaration():
    doc = "<?xml version='1.0' encoding='ISO-8859-1'?><filter name='t'><rule action='drop' direction='in'>" \
          "<tcp comment='\u00e9'/></rule></filter>"
    assert parse(doc.encode("latin-1")).entries[0].match.value("comment") == "\u00e9"


def test_comment_truncated_in_document():
    flt = parse(rule_doc(f"<tcp comment='{'x' * 300}'/>"))
    assert flt.entries[0].match.value("comment") == "x" * 256


# --------------------------------------------------------------------------------------------
# Round trips of every built-in filter


@pytest.mark.parametrize("path", sorted(FILTER_DIR.glob("*.xml")), ids=lambda p: p.stem)
def test_builtin_round_trip(path):
    text = path.read_text(encoding="utf-8")
    flt = parse(text)
    assert flt.name == path.stem
    assert canonical(text) == text  # shipped files are in canonical form (without <uuid>)


def test_there_are_24_builtins():
    assert len(list(FILTER_DIR.glob("*.xml"))) == 24


# --------------------------------------------------------------------------------------------
# Property: random valid filters survive format -> parse -> format unchanged

UINTS = (ValueType.UINT8, ValueType.UINT16, ValueType.UINT32)
STATE_ITEMS = ("NEW", "ESTABLISHED", "RELATED", "INVALID", "NONE")
FLAG_ITEMS = ("SYN", "ACK", "URG", "PSH", "FIN", "RST", "ALL", "NONE")
NAME_CHARS = "abcXYZ019_"


def random_case(draw, text: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c.lower() for c in text)


@st.composite
def raw_values(draw, spec) -> str:
    """Raw input text for an attribute, in any accepted spelling."""
    vt = spec.vtype
    if vt in UINTS:
        if spec.names and draw(st.booleans()):
            return random_case(draw, draw(st.sampled_from(sorted(spec.names))))
        number = draw(st.integers(spec.minimum, spec.upper))
        style = draw(st.sampled_from(["dec", "0x", "0X", "pad"]))
        return {"dec": str(number), "0x": f"0x{number:x}", "0X": f"0X{number:X}",
                "pad": f"0x{number:06x}"}[style]
    if vt is ValueType.UINT16_DEC:
        return str(draw(st.integers(0, 0xFFFF)))
    if vt is ValueType.MAC or (vt is ValueType.NDLLADDR and draw(st.booleans())):
        return ":".join(random_case(draw, f"{b:x}") for b in draw(st.lists(st.integers(0, 255), min_size=6, max_size=6)))
    if vt is ValueType.NDLLADDR:
        return random_case(draw, "none")
    if vt is ValueType.MACMASK:
        prefix = draw(st.integers(0, 48))
        value = ((1 << prefix) - 1) << (48 - prefix)
        return ":".join(f"{(value >> s) & 0xFF:02X}" for s in range(40, -1, -8))
    if vt is ValueType.IPV4:
        return str(ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1))))
    if vt in (ValueType.IPV4MASK, ValueType.IPV6MASK):
        width = 32 if vt is ValueType.IPV4MASK else 128
        prefix = draw(st.integers(0, width))
        if draw(st.booleans()):
            return str(prefix)
        return str(ipaddress.ip_network(f"{'0.0.0.0' if width == 32 else '::'}/{prefix}").netmask)
    if vt is ValueType.IPV6:
        address = ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))
        return draw(st.sampled_from([address.exploded, address.compressed, address.exploded.upper()]))
    if vt is ValueType.BOOLEAN:
        return draw(st.sampled_from(["true", "yes", "1", "false", "no", "0"]))
    if vt is ValueType.COMMENT:
        return draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffe\uffff"),
                            max_size=300))
    if vt is ValueType.STATE:
        return ",".join(random_case(draw, s) for s in draw(st.lists(st.sampled_from(STATE_ITEMS), min_size=1, max_size=5)))
    if vt is ValueType.TCPFLAGS:
        side = st.lists(st.sampled_from(FLAG_ITEMS), max_size=4).map(",".join)
        return f"{draw(side)}/{draw(side)}"
    if vt is ValueType.IPSETNAME:
        return draw(st.from_regex(r"[A-Za-z0-9_.:+ -]{1,31}", fullmatch=True))
    assert vt is ValueType.IPSETFLAGS
    return ",".join(draw(st.lists(st.sampled_from(["src", "dst", "SRC", "Dst"]), min_size=1, max_size=6)))


names = st.text(NAME_CHARS, min_size=1, max_size=6)
varrefs = st.one_of(
    names.map(VarRef),
    st.tuples(names, st.integers(0, 20)).map(lambda t: VarRef(t[0], index=t[1])),
    st.tuples(names, st.integers(1, 1000)).map(lambda t: VarRef(t[0], iterator=t[1])),
)


@st.composite
def matches(draw, protocol: str) -> Match:
    spec = PROTOCOLS[protocol]
    chosen = draw(st.lists(st.sampled_from([a.name for a in spec.attrs]), unique=True, max_size=7))
    values: dict[str, object] = {}
    for name in chosen:
        attr = spec.attr(name)
        if attr.variables and draw(st.integers(0, 3)) == 0:
            values[name] = draw(varrefs)
        else:
            values[name] = parse_literal(attr, draw(raw_values(attr)))
    _repair(protocol, values, draw)
    negated = {name: draw(st.booleans()) for name in values}
    attrs = []
    for name in sorted(values, key=ATTR_ORDER[protocol].__getitem__):
        attrs.append(Attr(name, values[name], _negation(protocol, name, values, negated)))
    return Match(protocol, tuple(attrs))


def _repair(protocol: str, values: dict, draw) -> None:
    """Make a random attribute set satisfy the cross-attribute rules of §8."""
    spec = PROTOCOLS[protocol]
    for side in ("src", "dst"):
        if f"{side}ipaddr" in values and spec.attr(f"{side}ipfrom"):
            values.pop(f"{side}ipfrom", None)
    if _uses_nd(protocol, values):  # one positive Neighbour Solicitation/Advertisement type
        values["protocol"] = "icmpv6"
        values["type"] = draw(st.sampled_from(["135", "136"]))
        values.pop("typeend", None)
    if protocol in ("ip", "ipv6"):
        group = protocol == "ipv6" and any(n in values for n in ICMPV6_GROUP)
        ports = any(n in values for n in PORT_ATTRS)
        protocol_attr = spec.attr("protocol")
        if group:
            for name in PORT_ATTRS:
                values.pop(name, None)
            if not isinstance(values.get("protocol"), VarRef):
                values["protocol"] = "icmpv6"
        elif ports and not isinstance(values.get("protocol"), VarRef):
            current = values.get("protocol")
            if current is None or decode_uint(protocol_attr, current) not in PORT_PROTOCOLS:
                values["protocol"] = parse_literal(protocol_attr, draw(st.sampled_from(["6", "udp", "0x84", "33"])))
    for name in list(values):
        base = spec.attr(name).base
        if base and base not in values and not (protocol == "ipv6" and name in ICMPV6_GROUP):
            del values[name]


def _uses_nd(protocol: str, values: dict) -> bool:
    return any(PROTOCOLS[protocol].attr(name).extension for name in values)


def _negation(protocol: str, name: str, values: dict, negated: dict) -> bool:
    attr = PROTOCOLS[protocol].attr(name)
    if attr.negation is Negation.REFUSED:
        return False
    if _uses_nd(protocol, values) and name in ("protocol", *ICMPV6_GROUP):
        return False
    if protocol == "ipv6" and name in ICMPV6_GROUP:
        leader = "type" if "type" in values else next(n for n in ICMPV6_GROUP if n in values)
        return negated[leader]
    if attr.negation is Negation.FOLLOWS:
        return negated[attr.base]
    return negated[name]


@st.composite
def rules(draw) -> Rule:
    match = draw(st.none() | st.sampled_from(sorted(PROTOCOLS)).flatmap(matches))
    directions = list(Direction)
    if match is not None and match.protocol == "stp" and match.get("srcmacaddr"):
        directions.remove(Direction.INOUT)
    return Rule(draw(st.sampled_from(list(Action))), draw(st.sampled_from(directions)),
                draw(st.integers(-1000, 1000)), draw(st.booleans()), match)


filter_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,12}", fullmatch=True)
filterrefs = st.builds(
    lambda name, params: FilterRef(name, make_params(params)),
    filter_names,
    st.dictionaries(st.from_regex(r"[A-Za-z0-9_]{1,5}", fullmatch=True),
                    st.lists(st.from_regex(r"[A-Za-z0-9_.:]{1,8}", fullmatch=True), min_size=1, max_size=3),
                    max_size=3),
)
chains = st.one_of(
    st.just("root"),
    st.tuples(st.sampled_from(["mac", "vlan", "stp", "arp", "rarp", "ipv4", "ipv6"]),
              st.from_regex(r"[A-Za-z0-9_.:-]{0,4}", fullmatch=True)).map("".join),
)


@st.composite
def filters(draw) -> Filter:
    chain = draw(chains)
    default = LIBVIRT_CHAIN_DEFAULTS[chain_prefix(chain)]
    priority = draw(st.none() | st.integers(-1000, 1000).filter(lambda p: p not in (0, default)))
    uuid = draw(st.none() | st.uuids().map(str))
    entries = draw(st.lists(st.one_of(rules(), filterrefs), max_size=5))
    return Filter(draw(filter_names), chain, priority, uuid, tuple(entries))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(filters())
def test_property_format_parse_format(flt):
    text = format_filter(flt)
    again = parse(text)
    assert again == flt
    assert format_filter(again) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(PROTOCOLS)).flatmap(matches), st.randoms(use_true_random=False))
def test_property_one_element_per_attribute_in_any_order(match, rnd):
    """Writing every attribute in its own element, in any order, parses to the same match."""
    elements = []
    for attr in match.attrs:
        negated = attr.negated
        spec = match.spec.attr(attr.name)
        follows_base = spec.negation is Negation.FOLLOWS and spec.base and match.get(spec.base)
        if follows_base and not (match.protocol == "ipv6" and attr.name in ICMPV6_GROUP and not match.get("type")):
            negated = rnd.random() < 0.5  # a companion's own match= does not matter
        text = xattr(str(attr.value))
        elements.append(f"<{match.protocol}{' match=' + repr('no') if negated else ''} {attr.name}='{text}'/>")
    rnd.shuffle(elements)
    direction = "out"
    doc = rule_doc("".join(elements) or f"<{match.protocol}/>", direction=direction)
    assert parse(doc).entries[0].match == match


# --------------------------------------------------------------------------------------------
# Our extension attributes (docs/filter-language-extensions.md): round trips and prefixes

ND_ATTRS = [a.name for a in PROTOCOLS["ipv6"].attrs if a.extension]


@st.composite
def nd_matches(draw) -> Match:
    """ipv6 matches with at least one extension attribute (and anything else of ipv6)."""
    match = draw(matches("ipv6"))
    if not _uses_nd("ipv6", {a.name for a in match.attrs}):
        extra = draw(st.sampled_from(ND_ATTRS))
        values = {a.name: a.value for a in match.attrs}
        values[extra] = parse_literal(PROTOCOLS["ipv6"].attr(extra), draw(raw_values(PROTOCOLS["ipv6"].attr(extra))))
        _repair("ipv6", values, draw)
        negated = {a.name: a.negated for a in match.attrs} | {extra: False}
        order = ATTR_ORDER["ipv6"]
        match = Match("ipv6", tuple(Attr(n, values[n], _negation("ipv6", n, values, negated))
                                    for n in sorted(values, key=order.__getitem__)))
    return match


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(nd_matches(), min_size=1, max_size=3), st.sampled_from(["nwf", "x", "ns0", "libvirt"]))
def test_property_extension_round_trip_under_any_prefix(ms, prefix):
    """A filter using the extension, written with any prefix for our namespace, parses to the
    same model; its canonical form (prefix nwf, declared once on <filter>) is byte-stable."""
    flt = Filter("t", "ipv6-nd", None, None, tuple(Rule(Action.RETURN, Direction.OUT, 500, True, m) for m in ms))
    text = format_filter(flt)
    assert text.count("xmlns:nwf=") == 1 and text.splitlines()[0].endswith(f" xmlns:nwf='{NWF_NAMESPACE}'>")
    assert parse(text) == flt and format_filter(parse(text)) == text
    written = text.replace("xmlns:nwf=", f"xmlns:{prefix}=").replace(" nwf:", f" {prefix}:")
    assert parse(written) == flt


def test_extension_canonical_form():
    doc = ("<filter name='t' chain='ipv6-nd' xmlns:n='" + NWF_NAMESPACE + "'><rule action='return' direction='out'>"
           "<ipv6 n:nd-lladdr='NONE' protocol='58' type='135'/><ipv6 match='no' n:nd-target='FD00:0:0::1'/>"
           "</rule><rule action='drop' direction='out'/></filter>")
    assert canonical(doc) == (
        "<filter name='t' chain='ipv6-nd' priority='-600' xmlns:nwf='" + NWF_NAMESPACE + "'>\n"
        "  <rule action='return' direction='out' priority='500'>\n"
        "    <ipv6 protocol='icmpv6' type='135'/>\n"
        "    <ipv6 match='no' nwf:nd-target='fd00::1'/>\n"
        "    <ipv6 nwf:nd-lladdr='none'/>\n"
        "  </rule>\n"
        "  <rule action='drop' direction='out' priority='500'/>\n"
        "</filter>\n")


def test_filter_without_extension_declares_no_namespace():
    doc = f"<filter name='t' xmlns:nwf='{NWF_NAMESPACE}'><rule action='drop' direction='out'/></filter>"
    assert "xmlns" not in canonical(doc)


@pytest.mark.parametrize("children, expected", [
    ("<ipv6 nwf:nd-target='::1'/>", "requires a positive protocol='icmpv6' and type='135' or '136'"),
    ("<ipv6 protocol='icmpv6' type='134' nwf:nd-target='::1'/>", "type='135' or '136'"),
    ("<ipv6 protocol='icmpv6' type='135' typeend='136' nwf:nd-lladdr='none'/>", "without typeend"),
    ("<ipv6 protocol='icmpv6'/><ipv6 match='no' type='136'/><ipv6 nwf:nd-target='::1'/>", "positive"),
    ("<ipv6 protocol='icmpv6' type='136' match='no' nwf:nd-lladdr='none'/>", "cannot be negated"),
    ("<ipv6 protocol='icmpv6' type='136' nwf:nd-lladdr='52:54:00:00:00'/>", "MAC address like"),
    ("<ipv6 protocol='icmpv6' type='136' nwf:nd-target='10.0.0.1'/>", "IPv6 address"),
    ("<ipv6 protocol='icmpv6' type='136' nwf:nd-tagret='::1'/>", "did you mean 'nwf:nd-target'"),
    ("<ip nwf:nd-target='::1'/>", "unknown attribute 'nwf:nd-target'"),
    ("<icmpv6 type='136' nwf:nd-target='::1'/>", "unknown attribute 'nwf:nd-target'"),
])
def test_extension_misuse_refused_with_a_located_line(children, expected):
    found = problems(rule_doc(children))
    assert any(expected in p and p.startswith("t.xml:1: filter 't'") for p in found), found


def test_extension_in_another_namespace_is_unknown():
    doc = "<filter name='t' xmlns:nwf='urn:other'><rule action='drop' direction='out'>" \
          "<ipv6 protocol='icmpv6' type='136' nwf:nd-target='::1'/></rule></filter>"
    found = problems(doc)
    assert len(found) == 1 and "unknown attribute '{urn:other}nd-target'" in found[0]


def test_extension_variables_checked_after_substitution():
    flt = parse(rule_doc("<ipv6 protocol='icmpv6' type='$T' nwf:nd-target='$IPV6' nwf:nd-lladdr='$MAC'/>"))
    assert {a.name for a in flt.entries[0].match.attrs if isinstance(a.value, VarRef)} == {
        "type", "nwf:nd-target", "nwf:nd-lladdr"}

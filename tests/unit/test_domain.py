"""libvirt_nwfilter.domain: domain XML, our metadata, bindings, metadata formatting, conversion."""

from __future__ import annotations

import re

import pytest
from lxml import etree

from libvirt_nwfilter.domain import (NAMESPACE, Domain, Interface, convert_native, metadata_xml, parse_domain,
                                     parse_identity, parse_metadata, to_bindings, with_entry)
from libvirt_nwfilter.errors import BindingError, ValidationError
from libvirt_nwfilter.model import Binding, FilterRef

UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
MAC1, MAC2 = "52:54:00:12:34:56", "52:54:00:12:34:57"


def iface(mac: str, kind: str = "bridge", target: str | None = "vnet0", extra: str = "") -> str:
    target_el = f"<target dev='{target}'/>" if target else ""
    return (f"    <interface type='{kind}'>\n      <mac address='{mac}'/>\n      <source bridge='br0'/>\n"
            f"      {target_el}\n{extra}    </interface>\n")


def meta(body: str, prefix: str = "nwf", uri: str = NAMESPACE) -> str:
    if prefix:
        return f"<{prefix}:nwfilter xmlns:{prefix}='{uri}'>\n{body.replace('<', f'<{prefix}:').replace(f'<{prefix}:/', f'</{prefix}:')}</{prefix}:nwfilter>"
    return f"<nwfilter xmlns='{uri}'>\n{body}</nwfilter>"


def entry(mac: str, filter: str = "clean-traffic", params: tuple[tuple[str, str], ...] = (("IP", "10.0.0.5"),)) -> str:
    inner = "".join(f"<parameter name='{n}' value='{v}'/>\n" for n, v in params)
    return f"<interface mac='{mac}'>\n<filterref filter='{filter}'>\n{inner}</filterref>\n</interface>\n"


def domain_xml(interfaces: str, metadata: str | None = None, name: str = "guest1", uuid: str = UUID) -> str:
    meta_el = f"  <metadata>\n{metadata}\n  </metadata>\n" if metadata is not None else ""
    return (f"<domain type='kvm' id='7'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n{meta_el}"
            f"  <devices>\n{interfaces}  </devices>\n</domain>\n")


def test_metadata_with_the_usual_prefix():
    dom = parse_domain(domain_xml(iface(MAC1), meta(entry(MAC1))))
    assert dom == Domain("guest1", UUID, (
        Interface("bridge", MAC1, "vnet0", FilterRef("clean-traffic", (("IP", ("10.0.0.5",)),)), False),))
    assert dom.filtered == dom.interfaces


@pytest.mark.parametrize("prefix", ["x", "libvirt-nwfilter", ""])
def test_metadata_is_found_by_namespace_not_prefix(prefix):
    dom = parse_domain(domain_xml(iface(MAC1), meta(entry(MAC1), prefix=prefix)))
    assert dom.interfaces[0].filterref == FilterRef("clean-traffic", (("IP", ("10.0.0.5",)),))


def test_nwf_prefix_in_another_namespace_is_not_ours():
    dom = parse_domain(domain_xml(iface(MAC1), meta(entry(MAC1), uri="http://example.org/other")))
    assert dom.interfaces[0].filterref is None
    assert dom.filtered == ()


def test_other_metadata_is_ignored():
    other = "<app:data xmlns:app='http://example.org/app'><app:x/></app:data>"
    dom = parse_domain(domain_xml(iface(MAC1), other + meta(entry(MAC1))))
    assert dom.interfaces[0].filterref is not None


def test_unprefixed_children_of_our_element_are_accepted():
    body = (f"<nwf:nwfilter xmlns:nwf='{NAMESPACE}'><interface mac='{MAC1}'>"
            "<filterref filter='allow-arp'/></interface></nwf:nwfilter>")
    dom = parse_domain(domain_xml(iface(MAC1), body))
    assert dom.interfaces[0].filterref == FilterRef("allow-arp")


def test_mac_is_lower_case_and_matched_case_insensitively():
    dom = parse_domain(domain_xml(iface("52:54:00:AB:CD:EF"), meta(entry("52:54:00:ab:CD:ef"))))
    assert dom.interfaces[0].mac == "52:54:00:ab:cd:ef"
    assert dom.interfaces[0].filterref is not None


def test_list_parameters_keep_their_order():
    params = (("IP", "10.0.0.9"), ("IP", "10.0.0.1"), ("DHCPSERVER", "10.0.0.254"))
    dom = parse_domain(domain_xml(iface(MAC1), meta(entry(MAC1, params=params))))
    assert dom.interfaces[0].filterref.params == (("DHCPSERVER", ("10.0.0.254",)), ("IP", ("10.0.0.9", "10.0.0.1")))


def test_missing_targets_before_start():
    dom = parse_domain(domain_xml(iface(MAC1, target=None), meta(entry(MAC1))))
    assert dom.interfaces[0].target is None
    assert to_bindings(dom, require_target=False) == [
        Binding("guest1", UUID, "", MAC1, FilterRef("clean-traffic", (("IP", ("10.0.0.5",)),)))]
    with pytest.raises(BindingError, match=rf"domain 'guest1': interface {MAC1}: no <target dev>"):
        to_bindings(dom)


def test_bindings_owned_by_the_domain_on_the_taps():
    xml = domain_xml(iface(MAC1, target="vnet3") + iface(MAC2, kind="network", target="vnet4"),
                     meta(entry(MAC1) + entry(MAC2, "allow-arp", ())))
    assert to_bindings(parse_domain(xml)) == [
        Binding("guest1", UUID, "vnet3", MAC1, FilterRef("clean-traffic", (("IP", ("10.0.0.5",)),))),
        Binding("guest1", UUID, "vnet4", MAC2, FilterRef("allow-arp")),
    ]


def test_invalid_target_is_refused():
    dom = parse_domain(domain_xml(iface(MAC1, target="a-very-long-interface-name"), meta(entry(MAC1))))
    with pytest.raises(BindingError, match="not a valid interface name"):
        to_bindings(dom)


def test_unfiltered_interfaces_give_no_binding():
    dom = parse_domain(domain_xml(iface(MAC1) + iface(MAC2, target="vnet1")))
    assert [i.filterref for i in dom.interfaces] == [None, None]
    assert to_bindings(dom) == []


def test_native_filterref_is_left_to_libvirt(caplog):
    native = "      <filterref filter='clean-traffic'><parameter name='IP' value='10.0.0.1'/></filterref>\n"
    dom = parse_domain(domain_xml(iface(MAC1, extra=native), meta(entry(MAC1))))
    assert dom.interfaces[0].native_filterref
    assert dom.filtered == ()
    with caplog.at_level("DEBUG"):
        assert to_bindings(dom) == []
    assert "left to libvirt" in caplog.text and MAC1 in caplog.text


def test_other_interface_types_are_ignored():
    xml = domain_xml(iface(MAC1, kind="direct", target="macvtap0") + iface(MAC2, kind="user", target=None))
    assert parse_domain(xml).interfaces == ()


def test_metadata_for_an_unsupported_interface_type_is_refused():
    with pytest.raises(ValidationError) as error:
        parse_domain(domain_xml(iface(MAC1, kind="direct"), meta(entry(MAC1))))
    assert "domain 'guest1'" in str(error.value) and MAC1 in str(error.value)
    assert "type 'direct' cannot be filtered" in str(error.value)


def test_mac_not_in_domain_is_kept_as_absent_entry():
    dom = parse_domain(domain_xml(iface(MAC1), meta(entry(MAC1) + entry(MAC2))))
    assert [i.mac for i in dom.filtered] == [MAC1]
    assert [(a.mac, a.filterref, a.problems) for a in dom.absent] == [(MAC2, dom.interfaces[0].filterref, ())]


def test_problems_of_an_absent_entry_refuse_nothing_and_are_kept():
    dom = parse_domain(domain_xml(iface(MAC1), meta(entry(MAC1) + entry(MAC2, params=(("IP", "1;x"),)))))
    assert [i.mac for i in dom.filtered] == [MAC1]
    (absent,) = dom.absent
    assert absent.mac == MAC2 and absent.filterref is None
    assert len(absent.problems) == 1 and f"interface {MAC2}" in absent.problems[0]
    assert "value '1;x' is invalid" in absent.problems[0]


def test_problems_of_a_present_entry_still_refuse():
    with pytest.raises(ValidationError, match="value '1;x' is invalid"):
        parse_domain(domain_xml(iface(MAC1), meta(entry(MAC1, params=(("IP", "1;x"),)) + entry(MAC2))))


@pytest.mark.parametrize("params, expected", [
    ((("IP", ""),), "parameter 'IP': value '' is invalid"),
    ((("I P", "1"),), "parameter name 'I P' is invalid"),
    ((("IP", "10.0.0.1;x"),), "value '10.0.0.1;x' is invalid"),
])
def test_bad_parameters_name_domain_and_mac(params, expected):
    with pytest.raises(ValidationError) as error:
        parse_domain(domain_xml(iface(MAC1), meta(entry(MAC1, params=params))))
    message = str(error.value)
    assert "domain 'guest1'" in message and f"interface {MAC1}" in message and expected in message
    assert "<parameter>" in message and "{" not in message  # local names, not {uri}parameter


@pytest.mark.parametrize("body, expected", [
    (f"<interface mac='{MAC1}'/>\n", "expected exactly one <filterref"),
    (f"<interface mac='{MAC1}'><filterref filter='a'/><filterref filter='b'/></interface>\n",
     "expected exactly one <filterref"),
    ("<interface mac='nope'><filterref filter='a'/></interface>\n", "'nope' is not a MAC address"),
    ("<interface><filterref filter='a'/></interface>\n", "attribute 'mac': '' is not a MAC address"),
    (entry(MAC1) + entry(MAC1.upper()), "more than one entry for this MAC address"),
    (f"<interface mac='{MAC1}'><filterref/></interface>\n", "attribute 'filter' is required"),
    (f"<interface mac='{MAC1}'><filterref filter='a b'/></interface>\n", "'a b' is not a valid filter name"),
    (f"<interface mac='{MAC1}' ip='1'><filterref filter='a'/></interface>\n", "unknown attribute 'ip'"),
    ("<port mac='x'/>\n", "unknown element (expected <interface mac=...>)"),
])
def test_malformed_metadata(body, expected):
    with pytest.raises(ValidationError, match=re.escape(expected)):
        parse_domain(domain_xml(iface(MAC1), meta(body)))


def test_two_elements_in_our_namespace():
    with pytest.raises(ValidationError, match="more than one element in the namespace"):
        parse_domain(domain_xml(iface(MAC1), meta(entry(MAC1)) + meta(entry(MAC1), prefix="y")))


def test_wrong_root_element_in_our_namespace():
    with pytest.raises(ValidationError, match="expected <nwfilter>"):
        parse_domain(domain_xml(iface(MAC1), f"<nwf:filters xmlns:nwf='{NAMESPACE}'/>"))


def test_foreign_namespace_inside_our_element():
    body = (f"<nwf:nwfilter xmlns:nwf='{NAMESPACE}' xmlns:o='http://example.org/o'>"
            f"<o:interface mac='{MAC1}'><nwf:filterref filter='a'/></o:interface></nwf:nwfilter>")
    with pytest.raises(ValidationError, match="foreign namespace"):
        parse_domain(domain_xml(iface(MAC1), body))


@pytest.mark.parametrize("xml, expected", [
    ("<domain><uuid>" + UUID + "</uuid></domain>", "has no <name>"),
    ("<domain><name>g</name></domain>", "domain 'g': the domain has no <uuid>"),
    ("<domain><name>g</name><uuid>123</uuid></domain>", "malformed UUID"),
    ("<network/>", "expected root element <domain>"),
    ("<domain>", "malformed XML"),
    ("<!DOCTYPE domain [<!ENTITY x 'y'>]><domain><name>&x;</name></domain>", "DOCTYPE|malformed"),
])
def test_bad_domain_documents(xml, expected):
    with pytest.raises(ValidationError, match=expected):
        parse_domain(xml)


def test_parse_identity_ignores_broken_metadata():
    xml = domain_xml(iface(MAC1), meta(entry(MAC1, params=(("IP", ""),))), uuid=UUID.upper())
    assert parse_identity(xml) == ("guest1", UUID)
    with pytest.raises(ValidationError):
        parse_domain(xml)
    assert parse_domain(xml, metadata=False).interfaces[0].filterref is None


def test_metadata_xml_round_trip():
    entries = {MAC1: FilterRef("clean-traffic", (("IP", ("10.0.0.1", "10.0.0.2")),)), MAC2: FilterRef("allow-arp")}
    text = metadata_xml(entries)
    root = etree.fromstring(text)
    assert root.tag == "nwfilter" and root.nsmap == {}  # libvirt's setMetadata adds the namespace
    assert parse_metadata(text) == entries
    assert text == (
        "<nwfilter>\n"
        "  <interface mac='52:54:00:12:34:56'>\n"
        "    <filterref filter='clean-traffic'>\n"
        "      <parameter name='IP' value='10.0.0.1'/>\n"
        "      <parameter name='IP' value='10.0.0.2'/>\n"
        "    </filterref>\n"
        "  </interface>\n"
        "  <interface mac='52:54:00:12:34:57'>\n"
        "    <filterref filter='allow-arp'/>\n"
        "  </interface>\n"
        "</nwfilter>\n")
    assert metadata_xml({}) == "<nwfilter/>\n"


def test_metadata_as_libvirt_stores_it_is_read_back():
    """setMetadata puts the element and its descendants into our namespace with the key prefix."""
    stored = meta(entry(MAC1))
    dom = parse_domain(domain_xml(iface(MAC1), stored))
    assert parse_metadata(metadata_xml({i.mac: i.filterref for i in dom.filtered})) == {MAC1: dom.interfaces[0].filterref}
    assert parse_metadata(stored) == {MAC1: dom.interfaces[0].filterref}


def test_parse_metadata_validates():
    with pytest.raises(ValidationError, match="value '' is invalid"):
        parse_metadata(f"<nwfilter><interface mac='{MAC1}'><filterref filter='a'><parameter name='IP' value=''/>"
                       "</filterref></interface></nwfilter>")
    with pytest.raises(ValidationError):
        parse_metadata("<other/>")


def test_with_entry():
    dom = parse_domain(domain_xml(iface(MAC1) + iface(MAC2, target="vnet1"), meta(entry(MAC1))))
    changed = with_entry(dom, MAC2, FilterRef("allow-arp"))
    assert [i.filterref for i in changed.interfaces] == [dom.interfaces[0].filterref, FilterRef("allow-arp")]
    assert with_entry(changed, MAC1, None).filtered == (changed.interfaces[1],)


def test_convert_native_moves_filterrefs_into_metadata():
    native = "      <filterref filter='clean-traffic'>\n        <parameter name='IP' value='10.0.0.1'/>\n      </filterref>\n"
    direct = ("    <interface type='direct'>\n      <mac address='52:54:00:00:00:09'/>\n"
              "      <filterref filter='allow-arp'/>\n    </interface>\n")
    xml = domain_xml(iface(MAC1, target=None, extra=native) + iface(MAC2, target=None) + direct,
                     "<app:x xmlns:app='http://example.org/app'/>")
    result = convert_native(xml)
    assert result.converted == ((MAC1, FilterRef("clean-traffic", (("IP", ("10.0.0.1",)),))),)
    assert result.left == ("interface 52:54:00:00:00:09 of type 'direct' stays with libvirt",)
    dom = parse_domain(result.xml)
    assert dom.interfaces[0].filterref == result.converted[0][1] and not dom.interfaces[0].native_filterref
    root = etree.fromstring(result.xml.encode())
    assert root.find("metadata/{http://example.org/app}x") is not None
    assert root.find(f"metadata/{{{NAMESPACE}}}nwfilter").prefix == "nwf"
    assert len(root.findall(".//devices/interface/filterref")) == 1  # the direct one stays


def test_convert_native_adds_metadata_element_and_keeps_existing_entries():
    native = "      <filterref filter='allow-arp'/>\n"
    xml = domain_xml(iface(MAC1, extra=native) + iface(MAC2, target="vnet1"))
    xml = xml.replace("<metadata>", "")
    first = convert_native(xml)
    root = etree.fromstring(first.xml.encode())
    assert [child.tag for child in root][:4] == ["name", "uuid", "metadata", "devices"]
    second_iface = root.findall("devices/interface")[1]
    etree.SubElement(second_iface, "filterref", filter="no-mac-spoofing")
    second = convert_native(etree.tostring(root))
    dom = parse_domain(second.xml)
    assert [i.filterref.filter for i in dom.interfaces] == ["allow-arp", "no-mac-spoofing"]


def test_convert_native_refuses_interface_with_both():
    xml = domain_xml(iface(MAC1, extra="<filterref filter='allow-arp'/>"), meta(entry(MAC1)))
    with pytest.raises(ValidationError, match="both libvirt's <filterref> and an entry of ours"):
        convert_native(xml)


def test_convert_native_without_native_references_changes_nothing():
    result = convert_native(domain_xml(iface(MAC1)))
    assert result.converted == () and result.left == ()

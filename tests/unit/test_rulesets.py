"""Rulesets and fingerprints kept per process (rulesets.py): the same reference, MAC and filter
objects give back the very ruleset compiled before; a changed filter (a new object, as a changed
file parses to) or another parameter is compiled anew; a fingerprint is kept with its ruleset."""

from __future__ import annotations

from libvirt_nwfilter import rulesets
from libvirt_nwfilter.model import FilterRef, make_params
from libvirt_nwfilter.xml import parse_filter

MAC = "52:54:00:00:00:01"
TOP = "<filter name='top' chain='root'><filterref filter='ip'/></filter>"
IP_RULE = ("<filter name='ip' chain='ipv4'><rule action='accept' direction='out' priority='500'>"
           "<ip srcipaddr='$IP' protocol='{protocol}'/></rule></filter>")


def store(protocol: str = "tcp"):
    filters = {f.name: f for f in (parse_filter(TOP), parse_filter(IP_RULE.format(protocol=protocol)))}
    return filters.get


def ref(ip: str) -> FilterRef:
    return FilterRef("top", make_params({"IP": [ip]}))


def test_unchanged_inputs_give_the_ruleset_compiled_before():
    lookup = store()
    first = rulesets.port_ruleset(ref("10.0.0.1"), MAC, lookup)
    assert rulesets.port_ruleset(ref("10.0.0.1"), MAC, lookup) is first
    assert rulesets.port_ruleset(ref("10.0.0.2"), MAC, lookup) is not first
    assert rulesets.port_ruleset(ref("10.0.0.1"), "52:54:00:00:00:02", lookup) is not first
    assert rulesets.port_ruleset(ref("10.0.0.1"), MAC, lookup, max_rules=10) is not first
    with_mac = FilterRef("top", make_params({"IP": ["10.0.0.1"], "MAC": [MAC]}))  # as a record holds it
    assert rulesets.port_ruleset(with_mac, MAC, lookup) is first


def test_a_changed_filter_is_compiled_anew():
    tcp = rulesets.port_ruleset(ref("10.0.0.1"), MAC, store("tcp"))
    udp = rulesets.port_ruleset(ref("10.0.0.1"), MAC, store("udp"))
    assert udp != tcp and rulesets.ruleset_hash(udp) != rulesets.ruleset_hash(tcp)
    same_text = rulesets.port_ruleset(ref("10.0.0.1"), MAC, store("tcp"))  # other objects, same content
    assert same_text == tcp and same_text is not tcp


def test_the_fingerprint_depends_on_the_content_only():
    one = rulesets.port_ruleset(ref("10.0.0.1"), MAC, store())
    other = rulesets.port_ruleset(ref("10.0.0.1"), MAC, store())
    assert rulesets.ruleset_hash(one) == rulesets.ruleset_hash(other) == rulesets.ruleset_hash(one)

"""The compiler against the layouts libvirt 9.0.0 was observed to build (semantics.md §3.1, §6.9)."""

from __future__ import annotations

from libvirt_nwfilter.compiler import compile_port
from libvirt_nwfilter.ir import Cond, Field, IcmpType, IpNet, Jump, NumRange, Verdict
from libvirt_nwfilter.model import FilterRef, make_params
from libvirt_nwfilter.resolve import resolve
from libvirt_nwfilter.store import FilterStore
from libvirt_nwfilter.xml import parse_filter

MAC = "52:54:00:00:00:01"
EXAMPLE = """<filter name='t69' chain='root'>
  <rule action='accept' direction='in' priority='100'><tcp dstportstart='22'/></rule>
  <rule action='accept' direction='out' priority='200'><icmp type='8'/></rule>
  <rule action='accept' direction='in' priority='250'><all state='NEW' comment='st new'/></rule>
  <rule action='accept' direction='out' priority='260'><udp srcipaddr='$IP' dstportstart='$PORTS'/></rule>
  <rule action='drop' direction='inout' priority='1000'><all/></rule>
  <rule action='accept' direction='out' priority='300'><tcp-ipv6 match='no' dstportstart='80'/></rule>
</filter>"""
OPEN = [Cond(Field.CT_STATE, ("NEW", "ESTABLISHED")), Cond(Field.CT_DIRECTION, "original")]
REPLY = [Cond(Field.CT_STATE, ("ESTABLISHED",)), Cond(Field.CT_DIRECTION, "reply")]


def compiled(ref: FilterRef, extra=None, tmp=None):
    store = FilterStore(tmp)
    return compile_port(resolve(ref, MAC, lambda name: (extra or {}).get(name) or store.source(name)))


def shape(rules):
    return [(r.family, r.protocol, list(r.conds), r.verdict) for r in rules]


def test_semantics_6_9_example(tmp_path):
    flt = parse_filter(EXAMPLE)
    ref = FilterRef("t69", make_params({"IP": ["10.1.0.2", "10.1.0.3"], "PORTS": ["53", "123"]}))
    rs = compiled(ref, {"t69": flt}, tmp_path)
    src = lambda ip: Cond(Field.IP_SRC, IpNet(ip, 32, 4))  # noqa: E731
    dst = lambda ip: Cond(Field.IP_DST, IpNet(ip, 32, 4))  # noqa: E731
    port = lambda field, n: Cond(field, NumRange(n, n))  # noqa: E731
    from_vm = [
        (4, "tcp", [port(Field.SPORT, 22), *REPLY], Verdict.RETURN),
        (4, "icmp", [Cond(Field.ICMP_TYPE, IcmpType(8)), OPEN[0]], Verdict.RETURN),  # no ctdir: ICMP type
        (4, "udp", [src("10.1.0.2"), port(Field.DPORT, 53), *OPEN], Verdict.RETURN),
        (4, "udp", [src("10.1.0.3"), port(Field.DPORT, 123), *OPEN], Verdict.RETURN),  # zip, not product
        (6, "tcp", [Cond(Field.DPORT, NumRange(80, 80), negated=True), *OPEN], Verdict.RETURN),
        (4, "all", [], Verdict.DROP),
    ]
    assert shape(rs.fi) == from_vm
    assert shape(rs.hi) == from_vm
    assert shape(rs.fo) == [
        (4, "tcp", [port(Field.DPORT, 22), *OPEN], Verdict.ACCEPT),
        (4, "all", [Cond(Field.CT_STATE, ("NEW",))], Verdict.ACCEPT),  # state=NEW on 'in': FO only
        (4, "udp", [dst("10.1.0.2"), port(Field.SPORT, 53), *REPLY], Verdict.ACCEPT),
        (4, "udp", [dst("10.1.0.3"), port(Field.SPORT, 123), *REPLY], Verdict.ACCEPT),
        (6, "tcp", [Cond(Field.SPORT, NumRange(80, 80), negated=True), *REPLY], Verdict.ACCEPT),
        (4, "all", [], Verdict.DROP),  # no FO copy of the icmp rule
    ]
    assert [r.comment for r in rs.fo][1] == "st new"


def test_clean_traffic_root_chains(tmp_path):
    rs = compiled(FilterRef("clean-traffic", make_params({"IP": ["10.0.0.1"]})), tmp=tmp_path)
    entries = lambda side: [e.chain if isinstance(e, Jump) else e.verdict for e in side.root]  # noqa: E731
    assert entries(rs.from_vm) == ["mac", "ipv4-ip", Verdict.ACCEPT, "arp-mac", "arp-ip", Verdict.ACCEPT, "rarp",
                                   Verdict.ACCEPT, Verdict.DROP]
    assert entries(rs.to_vm) == ["ipv4", Verdict.ACCEPT, "rarp", Verdict.DROP]
    assert [(s.name, s.priority) for s in rs.from_vm.subchains] == [
        ("mac", -800), ("ipv4-ip", -710), ("arp-mac", -520), ("arp-ip", -510), ("rarp", -400)]
    assert not (rs.fi or rs.fo or rs.hi)


def test_ruleset_text_is_the_rulesets_repr(tmp_path):
    """The fingerprint's text is built from cached pieces; it must stay exactly ``repr``."""
    from libvirt_nwfilter.ir import PortRuleset, ruleset_text

    flt = parse_filter(EXAMPLE)
    rulesets = [PortRuleset(),
                compiled(FilterRef("t69", make_params({"IP": ["10.1.0.2"], "PORTS": ["53"]})), {"t69": flt}, tmp_path),
                compiled(FilterRef("clean-traffic", make_params({"IP": ["10.0.0.1", "10.0.0.2"]})), tmp=tmp_path)]
    for ruleset in rulesets:
        assert ruleset_text(ruleset) == repr(ruleset)

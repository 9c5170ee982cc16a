"""The offline engine of ``simulate``: stages, verdicts, deciding rules and connection states
on the reference filters and hand-written ones; a hypothesis fuzz over generated filters and
thousands of generated packets (every result consistent and explainable). Agreement with the
kernel is tests/kernel/test_simulate_differential.py's job."""

from __future__ import annotations

import dataclasses
import json
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirt_nwfilter.errors import NwfilterError
from libvirt_nwfilter.ir import PortRuleset
from libvirt_nwfilter.rulesets import ruleset_hash
from libvirt_nwfilter.simulate.evaluate import END, ROOT_RETURN, RULE, SUB_END, Simulator
from libvirt_nwfilter.simulate.explain import json_report, text_report
from libvirt_nwfilter.simulate.packet import parse_packets

from simdiff import ruleset_of
from simgen import ADDRESSES, PacketGenerator, filter_trees

CLEAN = ruleset_of("clean-traffic", {"IP": ("10.0.0.1",)})


def run(ruleset: PortRuleset, *packets: str):
    return Simulator(ruleset).run(parse_packets(list(packets), ADDRESSES))


def decided_by(result, stage_index=0):
    stage = result.stages[stage_index]
    source = stage.rule.rule.source
    return (source.filter, source.rule_number, stage.passed)


def custom(xml_rules: str, chain: str = "root") -> PortRuleset:
    return ruleset_of("t", {}, {"t": f"<filter name='t' chain='{chain}'>{xml_rules}</filter>"})


def test_clean_traffic_dhcp_discover_passes_and_a_forged_source_ip_is_dropped_by_no_ip_spoofing():
    dhcp, forged = run(CLEAN, "out udp srcipaddr=0.0.0.0 dstipaddr=255.255.255.255 srcportstart=68 dstportstart=67",
                       "out udp srcipaddr=10.0.0.66")
    assert dhcp.verdict == "pass" and decided_by(dhcp) == ("clean-traffic", 1, True)
    assert forged.verdict == "drop" and decided_by(forged) == ("no-ip-spoofing", 3, False)
    assert forged.unreached == ["l3-fi"]


def test_clean_traffic_arp_reply_with_a_foreign_sender_mac_is_dropped_and_its_twin_passes():
    foreign, own = run(CLEAN, "out arp opcode=Reply arpsrcmacaddr=52:54:00:66:66:66", "out arp opcode=Reply")
    assert foreign.verdict == "drop" and decided_by(foreign) == ("no-arp-mac-spoofing", 2, False)
    assert own.verdict == "pass" and decided_by(own) == ("clean-traffic", 2, True)


def test_a_source_mac_that_is_not_unicast_is_dropped_by_the_bridge_before_any_rule():
    bad, good = run(PortRuleset(), "out mac srcmacaddr=01:00:5e:00:00:01", "out mac")
    assert (bad.verdict, bad.stages[0].key, good.verdict) == ("drop", "bridge", "pass")


def test_sub_chain_end_accepts_and_root_return_continues():
    sub = ruleset_of("t", {}, {"s": "<filter name='s' chain='arp'><rule action='drop' direction='out' priority='1'>"
                                     "<arp opcode='Reply'/></rule></filter>",
                               "t": "<filter name='t' chain='root'><filterref filter='s'/>"
                                    "<rule action='drop' direction='out' priority='900'/></filter>"})
    request, reply = run(sub, "out arp", "out arp opcode=Reply")
    assert (request.verdict, request.stages[0].how) == ("pass", SUB_END)  # libvirt's chains: policy ACCEPT
    assert (reply.verdict, reply.stages[0].how) == ("drop", RULE)
    returned = custom("<rule action='return' direction='out' priority='1'><mac protocolid='arp'/></rule>"
                      "<rule action='drop' direction='out' priority='2'/>")
    arp, other = run(returned, "out arp", "out ip")
    assert (arp.verdict, arp.stages[0].how, other.verdict) == ("pass", ROOT_RETURN, "drop")


def test_state_rules_need_the_connection_first_and_the_explanation_says_so():
    rs = custom("<rule action='accept' direction='out' priority='1'><tcp/></rule>"
                "<rule action='drop' direction='inout' priority='2'><all/></rule>")
    lone, syn, synack, ack = run(rs, "in tcp srcportstart=80 dstportstart=40000 flags=SYN,ACK",
                                 "out tcp srcportstart=40000 dstportstart=80",
                                 "in tcp srcportstart=80 dstportstart=40000 flags=SYN,ACK",
                                 "out tcp srcportstart=40000 dstportstart=80 flags=ACK")
    assert [r.verdict for r in (lone, syn, synack, ack)] == ["drop", "pass", "pass", "pass"]
    assert (lone.conntrack.state, synack.conntrack.state, ack.conntrack.state) == ("INVALID", "ESTABLISHED", "ESTABLISHED")
    assert "a state rule needs the connection to exist" in text_report(1, lone)


def test_host_to_guest_meets_no_l3_rule_and_guest_to_host_meets_hi():
    rs = custom("<rule action='drop' direction='inout' priority='1'><all/></rule>")
    from_host, to_host, forwarded = run(rs, "in udp --from-host", "out udp --to-host", "in udp")
    assert [s.key for s in from_host.stages] == ["l2-in"] and from_host.verdict == "pass"
    assert [s.key for s in to_host.stages] == ["l2-out", "l3-hi"] and to_host.verdict == "drop"
    assert forwarded.verdict == "drop"


def test_reject_drops_and_says_the_sender_hears_of_it():
    rs = custom("<rule action='reject' direction='out' priority='1'><udp dstportstart='53'/></rule>")
    [result] = run(rs, "out udp dstportstart=53")
    assert result.verdict == "drop" and "ICMP error" in text_report(1, result)


def test_tracker_states_of_protocols_the_kernel_treats_specially():
    rs = custom("<rule action='accept' direction='out' priority='1'><all/></rule>"
                "<rule action='accept' direction='out' priority='2'><all-ipv6/></rule>")
    lite, ndp, reply, echo = run(rs, "out udplite", "out icmpv6 type=135", "out icmp type=0", "out icmp type=8")
    assert (lite.conntrack.state, ndp.conntrack.state, reply.conntrack.state, echo.conntrack.state) == (
        "INVALID", "UNTRACKED", "INVALID", "NEW")


def test_explicit_state_overrides_the_tracker():
    rs = custom("<rule action='accept' direction='in' priority='1' statematch='true'><tcp state='ESTABLISHED'/></rule>"
                "<rule action='drop' direction='in' priority='2'><all/></rule>")
    assumed, tracked = run(rs, "in tcp state=ESTABLISHED", "in tcp")
    assert (assumed.verdict, tracked.verdict) == ("pass", "drop")


def test_rule_sources_do_not_change_equality_repr_or_the_ruleset_hash():
    rule = CLEAN.from_vm.subchains[0].rules[0]
    assert rule.source is not None and rule.source.filter == "no-mac-spoofing"
    assert dataclasses.replace(rule, source=None) == rule and "source" not in repr(rule)
    stripped = PortRuleset(CLEAN.from_vm, CLEAN.to_vm, tuple(dataclasses.replace(r, source=None) for r in CLEAN.fi))
    assert ruleset_hash(stripped) == ruleset_hash(CLEAN)


def test_reference_filters_thousands_of_packets_explain_consistently():
    from simdiff import BUILTIN_PARAMS, BUILTINS

    for index, name in enumerate(BUILTINS):
        rs = ruleset_of(name, BUILTIN_PARAMS.get(name, {}))
        _check_run(rs, PacketGenerator(rs, random.Random(index)).words(400), f"{name} seed {index}")


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(filters=filter_trees(), seed=st.integers(0, 2 ** 32 - 1))
def test_generated_filters_every_result_is_consistent_and_explainable(filters, seed):
    try:
        rs = ruleset_of("gen-root", {}, filters)
    except NwfilterError:
        return
    _check_run(rs, PacketGenerator(rs, random.Random(seed)).words(300), f"seed {seed} filters {filters}")


def _check_run(ruleset: PortRuleset, words: list[str], context: str) -> None:
    packets = parse_packets(words, ADDRESSES)
    results = Simulator(ruleset).run(packets)
    again = Simulator(ruleset).run(parse_packets(words, ADDRESSES))
    assert [r.verdict for r in results] == [r.verdict for r in again], context
    for number, result in enumerate(results, 1):
        assert result.passed == all(s.passed for s in result.stages), context
        for stage in result.stages:
            if stage.how in (RULE, ROOT_RETURN):
                assert stage.rule.matches(result.packet), f"{context}: packet {number} {result.packet.text}"
            if stage.how == END:
                assert not any(r.matches(result.packet) and r.sub is None and r.verdict.value != "continue"
                               for r in stage.chain.rules), context
        json.dumps(json_report(result))
        assert text_report(number, result).startswith(f"packet {number}: ")

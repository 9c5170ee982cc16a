"""Custom filters instantiated on real bridge ports: masks, negation, port ranges, priorities and
sub-chain interleaving, ``return``/``accept``/``continue``, reject, connection-state matching,
and what happens to a frame that falls off the end of an L2 sub-chain.

The CLI runs inside the lab's host namespace, once per backend; filters are defined with
``define`` into the test's own confdir. Semantics: shared/spec/semantics.md (§3 ordering, §4
sub-chains, §5 actions, §6 L3). One deliberate reading of libvirt that these tests pin: a frame
that falls off an L2 sub-chain is ACCEPTED (libvirt's ebtables chains have policy ACCEPT;
checked against libvirt's engine in tests/libvirt/test_oracle_verdicts.py), not returned as
semantics.md §4 says.
"""

from __future__ import annotations

import pytest

import netlab
from bindings_helpers import (  # noqa: F401  (fixtures)
    IP6_A, IP6_B, IP_A, IP_B, IP_HOST, MAC_A, MAC_B, arp_request, backend, cli, ether, filter_xml,
    ip_frame, ipv4, ipv6_udp, pair, raw, tcp, ETH_IPV4, PROTO_TCP, PROTO_UDP, udp,
)
from traffic import Conn, Probe, check_connections, check_frames


def rule(action: str, direction: str, priority: int, element: str = "", **extra: str) -> str:
    attrs = "".join(f" {k}='{v}'" for k, v in extra.items())
    return (f"<rule action='{action}' direction='{direction}' priority='{priority}'{attrs}>"
            f"{element}</rule>")


def define_and_bind(cli, vm, filters: dict[str, str], top: str, params=None) -> None:
    for xml in filters.values():
        cli.define(xml)
    cli.binding_create(vm.port, vm.mac, top, params)


def tcp_frame(src_mac, dst_mac, src_ip, dst_ip, sport, dport, flags=0x02) -> bytes:
    return ether(dst_mac, src_mac, ETH_IPV4, ipv4(src_ip, dst_ip, PROTO_TCP,
                                                  tcp(src_ip, dst_ip, sport, dport, flags)))


def udp_frame(src_mac, dst_mac, src_ip, dst_ip, sport, dport) -> bytes:
    return ether(dst_mac, src_mac, ETH_IPV4, ipv4(src_ip, dst_ip, PROTO_UDP,
                                                  udp(src_ip, dst_ip, sport, dport)))


# ----------------------------------------------------------------------------------------------
# Masks and negation


def test_mac_masks(lab, cli, pair):
    a, b = pair
    define_and_bind(cli, a, {"f": filter_xml("nwft-macmask", "\n".join([
        rule("drop", "out", 100, "<mac srcmacaddr='02:aa:00:00:00:00' srcmacmask='ff:ff:00:00:00:00'/>"),
        rule("drop", "out", 110, "<mac dstmacaddr='01:00:5e:00:00:00' dstmacmask='ff:ff:ff:80:00:00'/>"),
        rule("drop", "in", 120, "<mac srcmacaddr='52:54:00:00:00:00' srcmacmask='ff:ff:ff:ff:ff:f0'/>"),
    ]))}, "nwft-macmask")
    P = Probe
    check_frames(lab, [
        P("src in 02:aa::/16", a, ip_frame("02:aa:12:34:56:78", MAC_B, IP_A, IP_B), b, False),
        P("src 02:ab (outside the mask)", a, ip_frame("02:ab:00:00:00:00", MAC_B, IP_A, IP_B), b, True),
        P("dst IPv4 multicast MAC", a, ip_frame(MAC_A, "01:00:5e:7f:ff:fa", IP_A, "239.255.255.250", "udp"), b, False),
        P("dst 01:00:5e:80:.. (outside the mask)", a, ip_frame(MAC_A, "01:00:5e:80:00:01", IP_A, IP_B, "udp"), b, True),
        P("own MAC", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, True),
        P("to VM from 52:54:00:00:00:0x", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A), a, False),
        P("to VM from 52:54:00:00:00:1x", b, ip_frame("52:54:00:00:00:12", MAC_A, IP_B, IP_A), a, True),
    ])


def test_ip_masks_and_negation_at_l2(lab, cli, pair):
    """Drop everything NOT from 10.0.0.0/24 (prefix mask) and anything to 192.168.0.0/255.255.0.0
    (dotted mask)."""
    a, b = pair
    define_and_bind(cli, a, {"f": filter_xml("nwft-ipmask", "\n".join([
        rule("drop", "out", 100, "<ip match='no' srcipaddr='10.0.0.0' srcipmask='24'/>"),
        rule("drop", "out", 110, "<ip dstipaddr='192.168.0.0' dstipmask='255.255.0.0'/>"),
    ]))}, "nwft-ipmask")
    P = Probe
    check_frames(lab, [
        P("from 10.0.0.1", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, True),
        P("from 10.0.0.200", a, ip_frame(MAC_A, MAC_B, "10.0.0.200", IP_B), b, True),
        P("from 10.0.1.1", a, ip_frame(MAC_A, MAC_B, "10.0.1.1", IP_B), b, False),
        P("from 192.0.2.1", a, ip_frame(MAC_A, MAC_B, "192.0.2.1", IP_B, "udp"), b, False),
        P("to 192.168.7.7", a, ip_frame(MAC_A, MAC_B, IP_A, "192.168.7.7"), b, False),
        P("to 192.169.0.1", a, ip_frame(MAC_A, MAC_B, IP_A, "192.169.0.1"), b, True),
        P("ARP is not IPv4", a, arp_request(MAC_A, "10.9.9.9", IP_B), b, True),
        P("towards the VM from anywhere", b, ip_frame(MAC_B, MAC_A, "192.0.2.1", IP_A), a, True),
    ])


def test_ip_mask_negation_at_l3(lab, cli, pair):
    """L3 (iptables layer) negated source network: the VM may only use 10.0.0.0/24; the
    reversed copy (towards the VM) drops what is not addressed to 10.0.0.0/24."""
    a, b = pair
    define_and_bind(cli, a, {"f": filter_xml("nwft-l3neg", rule(
        "drop", "out", 100, "<all match='no' srcipaddr='10.0.0.0' srcipmask='255.255.255.0'/>"))},
        "nwft-l3neg")
    P = Probe
    check_frames(lab, [
        P("from 10.0.0.1", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, True),
        P("from 10.0.1.1", a, ip_frame(MAC_A, MAC_B, "10.0.1.1", IP_B, "udp"), b, False),
        P("to the VM at 10.0.0.1", b, ip_frame(MAC_B, MAC_A, "192.0.2.9", IP_A), a, True),
        P("to the VM at 10.0.5.1", b, ip_frame(MAC_B, MAC_A, IP_B, "10.0.5.1"), a, False),
    ])
    assert lab.ping(a, IP_B) and lab.tcp_connect(b, IP_A, 8080), lab.last_exchange


# ----------------------------------------------------------------------------------------------
# Port ranges


def test_port_ranges_l3(lab, cli, pair):
    """The VM may open TCP connections to ports 8000-8010 only (an ``out`` rule: its reversed
    copy lets the answers in); b cannot reach the VM on 8000, but reaches the host there."""
    a, b = pair
    lab.set_bridge_address(ipv4=f"{IP_HOST}/24")
    define_and_bind(cli, a, {"f": filter_xml("nwft-ports", "\n".join([
        rule("accept", "out", 100, "<tcp dstportstart='8000' dstportend='8010'/>"),
        rule("drop", "inout", 1000, "<all/>"),
    ]))}, "nwft-ports")
    allowed = {7999: False, 8000: True, 8005: True, 8010: True, 8011: False}
    check_connections(lab, [Conn(f"a -> b:{port}", "tcp", a, IP_B, port, ok) for port, ok in allowed.items()] + [
        Conn("b -> a:8000", "tcp", b, IP_A, 8000, False),
        Conn("b -> host:8000", "tcp", b, IP_HOST, 8000, True)])


def test_port_ranges_l2(lab, cli, pair):
    a, b = pair
    define_and_bind(cli, a, {"f": filter_xml("nwft-ports2", "\n".join([
        rule("drop", "out", 100, "<ip protocol='udp' dstportstart='5000' dstportend='5005'/>"),
        rule("drop", "out", 110, "<ip protocol='tcp' srcportstart='1024' srcportend='1030'/>"),
    ]))}, "nwft-ports2")
    P = Probe
    check_frames(lab, [
        P("udp 4999", a, udp_frame(MAC_A, MAC_B, IP_A, IP_B, 40000, 4999), b, True),
        P("udp 5000", a, udp_frame(MAC_A, MAC_B, IP_A, IP_B, 40000, 5000), b, False),
        P("udp 5005", a, udp_frame(MAC_A, MAC_B, IP_A, IP_B, 40000, 5005), b, False),
        P("udp 5006", a, udp_frame(MAC_A, MAC_B, IP_A, IP_B, 40000, 5006), b, True),
        P("tcp to 5000 (udp rule)", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 40000, 5000), b, True),
        P("tcp from 1023", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 1023, 80), b, True),
        P("tcp from 1027", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 1027, 80), b, False),
        P("tcp from 1031", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 1031, 80), b, True),
    ])


# ----------------------------------------------------------------------------------------------
# Priorities and interleaving


def add_vms(lab, n: int) -> list:
    """``n`` extra VMs ``v0``... (ports after vp1/vp2), MAC 52:54:00:00:01:0N, IP 10.0.0.1N."""
    return [lab.add_vm(f"v{i}", f"52:54:00:00:01:{i:02x}", ipv4=f"10.0.0.{10 + i}/24") for i in range(n)]


SUBCHAIN_PRIORITIES = {"jump-before": (-700, True), "tie-jump-first": (0, True), "jump-after": (100, False)}


def test_subchain_priority_places_the_jump(lab, cli, pair):
    """Sub-chain ``ipv4`` accepts IPv4; a root rule (priority 0) drops IPv4. The chain priority
    decides whether the jump comes before the drop (equal priorities: jump first). One port per
    variant, probed together."""
    a, b = pair
    probes = []
    for vm, (variant, (chain_priority, delivered)) in zip(add_vms(lab, 3), SUBCHAIN_PRIORITIES.items()):
        define_and_bind(cli, vm, {
            "sub": filter_xml(f"nwft-sub-{vm.name}", rule("accept", "out", 500, "<ip/>"), chain="ipv4",
                              priority=chain_priority),
            "root": filter_xml(f"nwft-prio-{vm.name}", f"<filterref filter='nwft-sub-{vm.name}'/>\n" +
                               rule("drop", "out", 0, "<mac protocolid='ipv4'/>")),
        }, f"nwft-prio-{vm.name}")
        probes += [Probe(f"{variant}: IPv4", vm, ip_frame(vm.mac, MAC_B, vm.ipv4, IP_B), b, delivered),
                   Probe(f"{variant}: ARP (no sub-chain)", vm, arp_request(vm.mac, vm.ipv4, IP_B), b, True)]
    check_frames(lab, probes)


RULE_ORDER = {"accept-first": (600, 100, True), "drop-first": (100, 600, False)}


def test_rule_priority_orders_within_a_subchain(lab, cli, pair):
    """Inside a sub-chain the rules' own priorities order them, not document order (the drop
    of 10.0.0.9 is written first in both variants). One port per variant."""
    a, b = pair
    probes = []
    for vm, (variant, (drop_prio, accept_prio, delivered)) in zip(add_vms(lab, 2), RULE_ORDER.items()):
        define_and_bind(cli, vm, {"sub": filter_xml(f"nwft-order-{vm.name}", "\n".join([
            rule("drop", "out", drop_prio, "<ip srcipaddr='10.0.0.9'/>"),
            rule("accept", "out", accept_prio, "<ip/>"),
        ]), chain="ipv4")}, f"nwft-order-{vm.name}")
        probes += [Probe(f"{variant}: from 10.0.0.9", vm, ip_frame(vm.mac, MAC_B, "10.0.0.9", IP_B), b, delivered),
                   Probe(f"{variant}: from own IP", vm, ip_frame(vm.mac, MAC_B, vm.ipv4, IP_B), b, True)]
    check_frames(lab, probes)


def test_root_rules_of_referenced_filters_sort_with_the_root(lab, cli, pair):
    """A root-chain filter reached through a filterref contributes its rules to the root chain,
    sorted by priority with the referencing filter's own rules."""
    a, b = pair
    define_and_bind(cli, a, {
        "inner": filter_xml("nwft-inner-root", rule("accept", "out", -100, "<mac protocolid='ipv4'/>")),
        "outer": filter_xml("nwft-outer-root", rule("drop", "out", -200, "<ip srcipaddr='10.0.0.9'/>") +
                            "\n<filterref filter='nwft-inner-root'/>\n" +
                            rule("drop", "out", 0, "<mac protocolid='ipv4'/>")),
    }, "nwft-outer-root")
    check_frames(lab, [
        Probe("from 10.0.0.9 (-200 drop first)", a, ip_frame(MAC_A, MAC_B, "10.0.0.9", IP_B), b, False),
        Probe("from 10.0.0.1 (-100 accept before 0 drop)", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, True),
    ])


# (variant: rules in document order as (action, priority), then whether b reaches the VM's port 80)
L3_ORDER = {
    "accept-by-priority": ([("drop", 200), ("accept", 100)], True),
    "drop-by-priority": ([("accept", 200), ("drop", 100)], False),
    "tie-document-order-drop": ([("drop", 100), ("accept", 100)], False),
    "tie-document-order-accept": ([("accept", 100), ("drop", 100)], True),
}


def test_l3_rule_order_priority_then_document_order(lab, cli, pair):
    """L3 rules of the root chain are ordered by priority, equal priorities in document order
    (semantics.md §3 step 1, a stable sort); an L3 accept in a non-root filter comes after every
    root L3 rule whatever its priority (§3 "Consequences"). One port per variant, each with an
    accepted port 81 (the twin of its drop); all connections in one batch."""
    a, b = pair
    vms = add_vms(lab, len(L3_ORDER) + 1)
    checks = []
    for vm, (variant, (order, reaches)) in zip(vms, L3_ORDER.items()):
        rules = [rule(action, "in", priority, "<tcp dstportstart='80'/>") for action, priority in order]
        define_and_bind(cli, vm, {"f": filter_xml(f"nwft-l3o-{vm.name}", "\n".join([
            *rules, rule("accept", "in", 300, "<tcp dstportstart='81'/>"), rule("drop", "inout", 1000, "<all/>"),
        ]))}, f"nwft-l3o-{vm.name}")
        checks += [Conn(f"{variant}: b -> :80", "tcp", b, vm.ipv4, 80, reaches),
                   Conn(f"{variant}: b -> :81", "tcp", b, vm.ipv4, 81, True)]
    vm = vms[-1]
    define_and_bind(cli, vm, {
        "sub": filter_xml("nwft-l3o-sub", rule("accept", "in", -500, "<tcp dstportstart='80'/>"), chain="ipv4"),
        "root": filter_xml("nwft-l3o-root", "<filterref filter='nwft-l3o-sub'/>\n" + "\n".join([
            rule("drop", "in", 500, "<tcp dstportstart='80'/>"), rule("accept", "in", 300, "<tcp dstportstart='81'/>"),
            rule("drop", "inout", 1000, "<all/>")])),
    }, "nwft-l3o-root")
    checks += [Conn("non-root accept -500 after root drop 500: b -> :80", "tcp", b, vm.ipv4, 80, False),
               Conn("non-root: b -> :81", "tcp", b, vm.ipv4, 81, True)]
    check_connections(lab, checks)


# ----------------------------------------------------------------------------------------------
# return / accept / continue


RAC = {"accept": (True, True), "return": (False, False), "continue": (True, False)}


def test_l2_return_accept_continue(lab, cli, pair):
    """Sub-chain ipv4: r1 ``ACTION ip src <own IP>`` (100), r2 ``drop udp`` (200); root: drop
    IPv4 (500). accept ends it (both pass), return goes back to the root drop (both dropped),
    continue goes on to r2 (UDP dropped) and the ICMP falls off the end (accepted). One port
    per action, probed together."""
    a, b = pair
    probes = []
    for vm, (action, (icmp, udp_)) in zip(add_vms(lab, 3), RAC.items()):
        define_and_bind(cli, vm, {
            "sub": filter_xml(f"nwft-rac-sub-{vm.name}", rule(action, "out", 100, f"<ip srcipaddr='{vm.ipv4}'/>") +
                              "\n" + rule("drop", "out", 200, "<ip protocol='udp'/>"), chain="ipv4"),
            "root": filter_xml(f"nwft-rac-{vm.name}", f"<filterref filter='nwft-rac-sub-{vm.name}'/>\n" +
                               rule("drop", "out", 500, "<mac protocolid='ipv4'/>")),
        }, f"nwft-rac-{vm.name}")
        probes += [Probe(f"{action}: icmp", vm, ip_frame(vm.mac, MAC_B, vm.ipv4, IP_B, "icmp"), b, icmp),
                   Probe(f"{action}: udp", vm, ip_frame(vm.mac, MAC_B, vm.ipv4, IP_B, "udp"), b, udp_)]
    check_frames(lab, probes)


def test_l2_return_in_root_chain_leaves_the_port_chain(lab, cli, pair):
    a, b = pair
    define_and_bind(cli, a, {"f": filter_xml("nwft-rootret", "\n".join([
        rule("return", "out", 100, "<mac protocolid='ipv4'/>"),
        rule("drop", "out", 1000),
    ]))}, "nwft-rootret")
    check_frames(lab, [
        Probe("IPv4 returned", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, True),
        Probe("ARP dropped", a, arp_request(MAC_A, IP_A, IP_B), b, False),
    ])


@pytest.mark.parametrize("action, unsolicited", [("accept", False), ("return", True)])
def test_l3_accept_has_state_return_has_not(lab, cli, pair, action, unsolicited):
    """``out ACTION tcp dstport 22`` + drop all: both let a connect to b:22; only ``accept``
    carries the implicit state match, so a SYN that b sends *from* port 22 to a passes with
    ``return`` (reversed copy without state) and is dropped with ``accept``."""
    a, b = pair
    define_and_bind(cli, a, {"f": filter_xml("nwft-l3act", "\n".join([
        rule(action, "out", 100, "<tcp dstportstart='22'/>"),
        rule("drop", "inout", 1000, "<all/>"),
    ]))}, "nwft-l3act")
    check_connections(lab, [Conn("a -> b:22", "tcp", a, IP_B, 22, True),
                            Conn("a -> b:23", "tcp", a, IP_B, 23, False)])
    check_frames(lab, [Probe("SYN from b's port 22", b, tcp_frame(MAC_B, MAC_A, IP_B, IP_A, 22, 5555), a, unsolicited),
                       Probe("ARP from b (no L3 rule)", b, arp_request(MAC_B, IP_B, IP_A), a, True)])


def test_l3_continue_is_not_terminal(lab, cli, pair):
    """Ours (semantics.md §12 R1): an L3 ``continue`` rule matches without a verdict, so the
    drop after it still applies (libvirt cannot instantiate it at all)."""
    a, b = pair
    define_and_bind(cli, a, {"f": filter_xml("nwft-l3cont", "\n".join([
        rule("continue", "in", 100, "<tcp dstportstart='22'/>"),
        rule("accept", "in", 200, "<tcp dstportstart='23'/>", statematch="false"),
        rule("drop", "inout", 1000, "<all/>"),
    ]))}, "nwft-l3cont")
    check_connections(lab, [Conn("b -> a:22", "tcp", b, IP_A, 22, False),
                            Conn("b -> a:23", "tcp", b, IP_A, 23, True)])


# ----------------------------------------------------------------------------------------------
# Reject


def test_l3_reject_answers_drop_stays_silent(lab, cli, pair):
    """A rejected connection is answered (refused / unreachable); a dropped one gets no answer
    at all, in the same wait in which port 80 connects."""
    a, b = pair
    lab.set_bridge_address(ipv4=f"{IP_HOST}/24")  # the host sends the ICMP error: needs a route
    define_and_bind(cli, a, {"f": filter_xml("nwft-reject", "\n".join([
        rule("reject", "in", 100, "<tcp dstportstart='81'/>"),
        rule("drop", "in", 100, "<tcp dstportstart='82'/>"),
    ]))}, "nwft-reject")
    got = check_connections(lab, [Conn("b -> a:81 (reject)", "tcp", b, IP_A, 81, False),
                                  Conn("b -> a:82 (drop)", "tcp", b, IP_A, 82, False),
                                  Conn("b -> a:80", "tcp", b, IP_A, 80, True)])
    assert got["b -> a:81 (reject)"].outcome in ("refused", "unreachable"), got
    assert got["b -> a:82 (drop)"].outcome == "timeout", got


def test_l2_reject_is_drop(lab, cli, pair):
    a, b = pair
    define_and_bind(cli, a, {"f": filter_xml("nwft-l2reject", rule(
        "reject", "out", 100, "<mac protocolid='0x88b5'/>"))}, "nwft-l2reject")
    check_frames(lab, [
        Probe("0x88b5 rejected = dropped", a, raw(MAC_A, MAC_B, 0x88B5), b, False),
        Probe("0x88b6 passes", a, raw(MAC_A, MAC_B, 0x88B6), b, True),
    ])


# ----------------------------------------------------------------------------------------------
# Connection state at L3


def test_stateful_out_rule(lab, cli, pair):
    """``out accept udp dport 53``: the VM may query b:53 and gets the answer; b cannot use the
    same rule to reach the VM; an unsolicited 'answer' from b's port 53 is dropped."""
    a, b = pair
    define_and_bind(cli, a, {"f": filter_xml("nwft-state-out", "\n".join([
        rule("accept", "out", 110, "<udp dstportstart='53'/>"),
        rule("drop", "inout", 1000, "<all/>"),
    ]))}, "nwft-state-out")
    lab.set_bridge_address(ipv4=f"{IP_HOST}/24")
    check_connections(lab, [Conn("a -> b:53", "udp", a, IP_B, 53, True),
                            Conn("a -> b:54", "udp", a, IP_B, 54, False),
                            Conn("b -> a:53", "udp", b, IP_A, 53, False),
                            Conn("b -> host:53", "udp", b, IP_HOST, 53, True)])
    check_frames(lab, [
        Probe("unsolicited UDP from b:53", b, udp_frame(MAC_B, MAC_A, IP_B, IP_A, 53, 40002), a, False),
        Probe("ARP from b (no L3 rule)", b, arp_request(MAC_B, IP_B, IP_A), a, True),
        Probe("UDP from a to b:53 (NEW, allowed)", a, udp_frame(MAC_A, MAC_B, IP_A, IP_B, 40007, 53), b, True),
    ])


def test_stateful_in_rule(lab, cli, pair):
    """``in accept tcp dport 22``: a listener on the VM is reachable only on port 22, the VM's
    replies pass, the VM cannot use the rule to open connections, nothing unsolicited passes.
    (Regression: the compiler once swapped the state sets of 'in' accept rules, fixed in e146147.)"""
    a, b = pair
    define_and_bind(cli, a, {"f": filter_xml("nwft-state", "\n".join([
        rule("accept", "in", 100, "<tcp dstportstart='22'/>"),
        rule("drop", "inout", 1000, "<all/>"),
    ]))}, "nwft-state")
    lab.set_bridge_address(ipv4=f"{IP_HOST}/24")
    check_connections(lab, [
        Conn("b -> a:22", "tcp", b, IP_A, 22, True),
        Conn("b -> a:80", "tcp", b, IP_A, 80, False),
        Conn("b ping a", "ping", b, IP_A, expect=False),
        Conn("a -> b:22", "tcp", a, IP_B, 22, False),
        Conn("host -> b:22 (b unfiltered)", "tcp", netlab.HOST, IP_B, 22, True),
    ])
    check_frames(lab, [
        Probe("unsolicited SYN-ACK from a:22", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 22, 40001, 0x12), b, False),
        Probe("SYN from a:22", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 22, 40008), b, False),
        Probe("ARP from a (no L3 rule)", a, arp_request(MAC_A, IP_A, IP_B), b, True),
        Probe("SYN to a:80", b, tcp_frame(MAC_B, MAC_A, IP_B, IP_A, 40004, 80), a, False),
        Probe("ARP to a (no L3 rule)", b, arp_request(MAC_B, IP_B, IP_A), a, True),
    ])


def test_statematch_false(lab, cli, pair):
    a, b = pair
    define_and_bind(cli, a, {"f": filter_xml("nwft-nostate", "\n".join([
        rule("accept", "in", 100, "<tcp dstportstart='22'/>", statematch="false"),
        rule("drop", "inout", 1000, "<all/>"),
    ]))}, "nwft-nostate")
    check_connections(lab, [Conn("b -> a:22", "tcp", b, IP_A, 22, True),
                            Conn("b -> a:80", "tcp", b, IP_A, 80, False)])
    check_frames(lab, [
        Probe("unsolicited SYN-ACK from a:22 (no state check)", a,
              tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 22, 40001, 0x12), b, True),
        Probe("unsolicited SYN from a:22", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 22, 40005), b, True),
        Probe("SYN from a:23", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 23, 40006), b, False),
    ])


@pytest.mark.parametrize("with_established", [True, False])
def test_explicit_state_new(lab, cli, pair, with_established):
    """``in accept tcp dport 22 state=NEW`` has only the to-VM copy (no reversed copy), so the
    VM's replies need a separate ESTABLISHED rule."""
    a, b = pair
    lab.set_bridge_address(ipv4=f"{IP_HOST}/24")
    rules = [rule("accept", "in", 100, "<tcp dstportstart='22' state='NEW'/>")]
    if with_established:
        rules.append(rule("accept", "inout", 110, "<all state='ESTABLISHED'/>"))
    rules.append(rule("drop", "inout", 1000, "<all/>"))
    define_and_bind(cli, a, {"f": filter_xml("nwft-new", "\n".join(rules))}, "nwft-new")
    check_connections(lab, [
        Conn("b -> a:22", "tcp", b, IP_A, 22, with_established),
        Conn("b -> a:80", "tcp", b, IP_A, 80, False),
        Conn("a -> b:22", "tcp", a, IP_B, 22, False),
        # twins: the same connections between unfiltered endpoints
        Conn("b -> host:22", "tcp", b, IP_HOST, 22, True),
        Conn("host -> b:22", "tcp", netlab.HOST, IP_B, 22, True),
    ])


def test_l3_does_not_apply_host_to_vm(lab, cli, pair):
    """Host -> VM passes only L2 (semantics.md §1.2): FO is reached from FORWARD only. With
    ``in drop all state=NEW`` (only the FO copy exists) b cannot connect to a, the host can."""
    a, b = pair
    lab.set_bridge_address(ipv4=f"{IP_HOST}/24")
    define_and_bind(cli, a, {"f": filter_xml("nwft-l3drop", rule("drop", "in", 1000, "<all state='NEW'/>"))},
                    "nwft-l3drop")
    check_connections(lab, [Conn("b -> a:80", "tcp", b, IP_A, 80, False),
                            Conn("host -> a:80", "tcp", netlab.HOST, IP_A, 80, True),
                            Conn("a -> b:80", "tcp", a, IP_B, 80, True)])


# ----------------------------------------------------------------------------------------------
# Falling off the end of an L2 sub-chain


def test_frame_falling_off_a_subchain_is_accepted(lab, cli, pair):
    """Sub-chain ``ipv4`` only drops 10.0.0.9 (both directions); the root drops everything
    after it. A frame that no sub-chain rule decides is ACCEPTED (policy ACCEPT, as libvirt's
    ebtables chains), so it never reaches the root drop; ARP (no sub-chain) is dropped."""
    a, b = pair
    define_and_bind(cli, a, {
        "sub": filter_xml("nwft-falloff-sub", rule("drop", "out", 500, "<ip srcipaddr='10.0.0.9'/>") + "\n" +
                          rule("drop", "in", 500, "<ip srcipaddr='10.0.0.9'/>"), chain="ipv4"),
        "root": filter_xml("nwft-falloff", "<filterref filter='nwft-falloff-sub'/>\n" +
                           rule("drop", "inout", 1000)),
    }, "nwft-falloff")
    P = Probe
    check_frames(lab, [
        P("IPv4 from a (falls off)", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, True),
        P("IPv4 from 10.0.0.9", a, ip_frame(MAC_A, MAC_B, "10.0.0.9", IP_B), b, False),
        P("ARP from a", a, arp_request(MAC_A, IP_A, IP_B), b, False),
        P("IPv6 from a", a, ipv6_udp(MAC_A, MAC_B, IP6_A, IP6_B), b, False),
        P("IPv4 to a (falls off)", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A), a, True),
        P("IPv4 to a from 10.0.0.9", b, ip_frame(MAC_B, MAC_A, "10.0.0.9", IP_A), a, False),
        P("ARP to a", b, arp_request(MAC_B, IP_B, IP_A), a, False),
    ])

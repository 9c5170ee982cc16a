"""Same frames, same connections, two engines: libvirt's own nwfilter driver (the oracle) and
ours, on the same port of the test libvirtd's lab (tests/libvirtd.py, ``libvirt_lab``).

For each case the filters are defined in libvirt (``virsh nwfilter-define``) and in ours
(``define`` into a per-test confdir). The probes of a case are built once; they run first with
libvirt's binding on the port (``virsh nwfilter-binding-create``), which is then deleted, and
then, for each of our backends, with our binding (created with the CLI in the same namespace,
deleted afterwards). Verdicts must be identical per probe. libvirt's verdicts are computed once
per case (on the first backend's test) and reused for the other.

Frames are stdlib-built (tests/bindings_helpers.py); a probe's verdict is delivered/dropped, a
connection's is True/False, or connected/refused/timeout for reject cases. Frame probes go out
in one batch, then the connections of a case run in one batch, all at once (tests/traffic.py);
neither has expectations, so a "dropped" counts only when its twin (a check sharing its sender
or receiver) passed in the same wait (else the case is inconclusive and fails: give it a
control that passes). A case may filter VM b's port too (``b_binding``). A case
that shows a known, reported mismatch gets ``xfail=<reason>`` (strict). Set
NWFT_ORACLE_VERBOSE=1 (with ``-s``) to print libvirt's verdicts.

Reproduced libvirt behaviour these cases pin (all verified equal on both backends when
written): a frame falling off an L2 sub-chain is ACCEPTED; sub-chain jumps interleave with root
rules by priority (ties: jump first) and sub-chain contents sort by rule priority; ``return``
in the root chain leaves the port's chain; L2 ``reject`` drops; ``inout`` L2 rules are reversed
on the from-VM side (ARP IPs too); list variables zip, ``$X[@n]`` iterators cross; an ICMP-type
``out`` accept rule has no reversed copy (replies are dropped); reversed L3 copies lose
``srcmacaddr`` and match wider; host -> VM traffic meets no L3 rule, VM -> host meets HI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import pytest

import libvirtd as lv
import netlab
from bindings_helpers import (  # noqa: F401  (fixture)
    BCAST, ETH_IPV4, IP6_A, IP6_A2, IP6_B, IP_A, IP_A2, IP_B, IP_G, IP_HOST, LL_A, LL_B, MAC_A,
    MAC_B, MAC_G, PROTO_TCP, PROTO_UDP, SPOOF_MAC, Cli, arp_reply, arp_request, backend,
    dhcp_discover, dhcp_offer, ether, filter_xml, icmp_echo, ip_frame, ipv4, ipv6_echo, ipv6_udp,
    rarp, raw, tcp, udp, untagged, vlan_tagged,
)
from traffic import Conn, Probe, Result, connections, frames


def rule(action: str, direction: str, priority: int, element: str = "", **extra: str) -> str:
    attrs = "".join(f" {k}='{v}'" for k, v in extra.items())
    return f"<rule action='{action}' direction='{direction}' priority='{priority}'{attrs}>{element}</rule>"


def tcp_frame(src_mac, dst_mac, src_ip, dst_ip, sport, dport, flags=0x02) -> bytes:
    return ether(dst_mac, src_mac, ETH_IPV4, ipv4(src_ip, dst_ip, PROTO_TCP, tcp(src_ip, dst_ip, sport, dport, flags)))


def udp_frame(src_mac, dst_mac, src_ip, dst_ip, sport, dport) -> bytes:
    return ether(dst_mac, src_mac, ETH_IPV4, ipv4(src_ip, dst_ip, PROTO_UDP, udp(src_ip, dst_ip, sport, dport)))


# ----------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    name: str
    filter: str
    params: dict = field(default_factory=dict)
    filters: dict = field(default_factory=dict)  # name -> XML, defined in this order
    probes: Callable = None  # (vms) -> list[Probe]
    connections: dict = field(default_factory=dict)  # name -> Connect
    gateway: bool = False
    setup: Callable | None = None  # (lab, vms) -> None, before any binding
    xfail: str | None = None
    b_binding: tuple | None = None  # (filter, params): VM b's port is filtered as well


def P(name, src, frame, dst):
    return Probe(name, src, frame, dst)


@dataclass(frozen=True)
class Connect:
    """A connection check of a case, built against the test's VMs: ``src``/``dst`` are VM names
    (or ``host``), ``dst`` the listener's VM when ``dst_ip`` is not its first address.
    ``detailed``: the verdict is the outcome (connected, refused or timeout), not True/False."""

    kind: str
    src: str
    dst_ip: str
    port: int | None = None
    dst: str | None = None
    source_ip: str | None = None
    detailed: bool = False

    def conn(self, name: str, v: dict) -> Conn:
        src = netlab.HOST if self.src == "host" else v[self.src]
        return Conn(name, self.kind, src, self.dst_ip, self.port, source_ip=self.source_ip,
                    dst_ns=v[self.dst].ns if self.dst else None)

    def verdict(self, result: Result):
        if not self.detailed:
            return result.ok
        return "connected" if result.ok else "refused" if result.outcome in ("refused", "unreachable") else "timeout"


def tcp_ok(src, dst_ip, port, dst=None):
    return Connect("tcp", src, dst_ip, port, dst)


def udp_ok(src, dst_ip, port):
    return Connect("udp", src, dst_ip, port)


def ping_ok(src, dst_ip, source_ip=None):
    return Connect("ping", src, dst_ip, source_ip=source_ip)


def tcp_outcome(src, dst_ip, port):
    return Connect("tcp", src, dst_ip, port, detailed=True)


def second_ip(lab, v):
    v["a"].run(["ip", "addr", "add", f"{IP_A2}/24", "dev", "eth0"])


def clean_traffic_probes(v):
    a, b = v["a"], v["b"]
    return [
        P("own MAC+IP", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b),
        P("second IP", a, ip_frame(MAC_A, MAC_B, IP_A2, IP_B, "udp"), b),
        P("other src MAC", a, ip_frame(SPOOF_MAC, MAC_B, IP_A, IP_B), b),
        P("other src IP", a, ip_frame(MAC_A, MAC_B, "10.0.0.9", IP_B), b),
        P("DHCP discover 0.0.0.0", a, dhcp_discover(MAC_A), b),
        P("ICMP from 0.0.0.0", a, ip_frame(MAC_A, BCAST, "0.0.0.0", "255.255.255.255"), b),
        P("ARP own", a, arp_request(MAC_A, IP_A, IP_B), b),
        P("ARP second IP", a, arp_request(MAC_A, IP_A2, "10.0.0.77"), b),
        P("ARP other IP", a, arp_request(MAC_A, "10.0.0.9", IP_B), b),
        P("ARP other sender MAC", a, arp_request(MAC_A, IP_A, "10.0.0.78", sha=SPOOF_MAC), b),
        P("ARP reply own", a, arp_reply(MAC_A, MAC_B, IP_A, IP_B), b),
        P("ARP reply other IP", a, arp_reply(MAC_A, MAC_B, IP_B, IP_B), b),
        P("IPv6 link-local", a, ipv6_echo(MAC_A, MAC_B, LL_A, LL_B), b),
        P("IPv6 global", a, ipv6_udp(MAC_A, MAC_B, IP6_A, IP6_B), b),
        P("RARP announce", a, rarp(MAC_A, MAC_A, MAC_A), b),
        P("RARP other tha", a, rarp(MAC_A, MAC_A, MAC_B), b),
        P("RARP op 4", a, rarp(MAC_A, MAC_A, MAC_A, op=4), b),
        P("RARP unicast", a, rarp(MAC_A, MAC_A, MAC_A, dst_mac=MAC_B), b),
        P("0x835", a, raw(MAC_A, BCAST, 0x0835), b),
        P("0x88b5", a, raw(MAC_A, MAC_B, 0x88B5), b),
        P("to host: DHCP", a, dhcp_discover(MAC_A), netlab.HOST),
        P("in: IPv4", b, ip_frame(MAC_B, MAC_A, "192.0.2.7", IP_A, "udp"), a),
        P("in: broadcast", b, ip_frame(MAC_B, BCAST, IP_B, "10.0.0.255", "udp"), a),
        P("in: DHCP offer", b, dhcp_offer(MAC_B, IP_B, MAC_A, IP_A), a),
        P("in: ARP request", b, arp_request(MAC_B, IP_B, IP_A), a),
        P("in: ARP reply", b, arp_reply(MAC_B, MAC_A, IP_B, IP_A), a),
        P("in: IPv6", b, ipv6_udp(MAC_B, MAC_A, IP6_B, IP6_A), a),
        P("in: RARP announce of $MAC", b, rarp(MAC_B, MAC_A, MAC_A), a),
        P("in: RARP other", b, rarp(MAC_B, MAC_B, MAC_B), a),
        P("in: 0x835", b, raw(MAC_B, BCAST, 0x0835), a),
        P("in: 0x88b5", b, raw(MAC_B, MAC_A, 0x88B5), a),
    ]


def gateway_probes(v):
    a, b, g = v["a"], v["b"], v["g"]
    return [
        P("IPv4 to gateway", a, ip_frame(MAC_A, MAC_G, IP_A, "8.8.8.8"), g),
        P("IPv4 to other VM", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b),
        P("IPv4 broadcast", a, dhcp_discover(MAC_A), g),
        P("spoofed IP to gateway", a, ip_frame(MAC_A, MAC_G, "10.0.0.9", "8.8.8.8"), g),
        P("spoofed MAC to gateway", a, ip_frame(SPOOF_MAC, MAC_G, IP_A, "8.8.8.8"), g),
        P("ARP broadcast", a, arp_request(MAC_A, IP_A, IP_B), b),
        P("ARP lie", a, arp_request(MAC_A, IP_B, IP_G), g),
        P("IPv6 to gateway", a, ipv6_udp(MAC_A, MAC_G, IP6_A, IP6_B), g),
        P("0x88b5 to gateway", a, raw(MAC_A, MAC_G, 0x88B5), g),
        P("0x88b5 to other VM", a, raw(MAC_A, MAC_B, 0x88B5), b),
        P("RARP announce", a, rarp(MAC_A, MAC_A, MAC_A), b),
        P("from gateway", g, ip_frame(MAC_G, MAC_A, "8.8.8.8", IP_A), a),
        P("from other VM", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A), a),
        P("ARP from other VM", b, arp_request(MAC_B, IP_B, IP_A), a),
        P("0x88b5 from gateway", g, raw(MAC_G, MAC_A, 0x88B5), a),
    ]


def broadcast_multicast_probes(v):
    a, b = v["a"], v["b"]
    return [
        P("IPv4 broadcast MAC", a, ip_frame(MAC_A, BCAST, IP_A, "10.0.0.255", "udp"), b),
        P("DHCP discover", a, dhcp_discover(MAC_A), b),
        P("IPv4 unicast", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b),
        P("224.0.0.251", a, ip_frame(MAC_A, "01:00:5e:00:00:fb", IP_A, "224.0.0.251", "udp"), b),
        P("239.255.255.250", a, ip_frame(MAC_A, "01:00:5e:7f:ff:fa", IP_A, "239.255.255.250", "udp"), b),
        P("230.1.2.3 to unicast MAC", a, ip_frame(MAC_A, MAC_B, IP_A, "230.1.2.3"), b),
        P("240.0.0.1", a, ip_frame(MAC_A, MAC_B, IP_A, "240.0.0.1"), b),
        P("ARP broadcast", a, arp_request(MAC_A, IP_A, IP_B), b),
        P("0x88b5 broadcast", a, raw(MAC_A, BCAST, 0x88B5), b),
        P("IPv6 to broadcast MAC", a, ipv6_udp(MAC_A, BCAST, IP6_A, IP6_B), b),
        P("in: broadcast", b, ip_frame(MAC_B, BCAST, IP_B, "10.0.0.255", "udp"), a),
        P("in: multicast", b, ip_frame(MAC_B, "01:00:5e:00:00:fb", IP_B, "224.0.0.251", "udp"), a),
    ]


def ipv6_probes(v):
    a, b = v["a"], v["b"]
    return [
        P("own IPv6", a, ipv6_echo(MAC_A, MAC_B, IP6_A, IP6_B), b),
        P("second IPv6", a, ipv6_udp(MAC_A, MAC_B, IP6_A2, IP6_B), b),
        P("other IPv6", a, ipv6_echo(MAC_A, MAC_B, "fd00::9", IP6_B), b),
        P("link-local UDP", a, ipv6_udp(MAC_A, "33:33:00:01:00:02", LL_A, "ff02::1:2", 546, 547), b),
        P("link-local ICMPv6", a, ipv6_echo(MAC_A, MAC_B, LL_A, LL_B), b),
        P("IPv4", a, ip_frame(MAC_A, MAC_B, "10.0.0.9", IP_B), b),
        P("ARP", a, arp_request(MAC_A, IP_A, IP_B), b),
        P("in: IPv6 from anyone", b, ipv6_echo(MAC_B, MAC_A, "fd00::99", IP6_A), a),
        P("in: IPv4", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A), a),
    ]


def dhcp_probes(v):
    a, b, g = v["a"], v["b"], v["g"]
    return [
        P("discover", a, dhcp_discover(MAC_A), g),
        P("68->67 from own IP", a, ether(BCAST, MAC_A, ETH_IPV4, ipv4(
            IP_A, "255.255.255.255", PROTO_UDP, udp(IP_A, "255.255.255.255", 68, 67))), g),
        P("68->67 to unicast", a, ether(MAC_G, MAC_A, ETH_IPV4, ipv4(
            "0.0.0.0", IP_G, PROTO_UDP, udp("0.0.0.0", IP_G, 68, 67))), g),
        P("other IPv4", a, ip_frame(MAC_A, MAC_G, IP_A, IP_G), g),
        P("ARP", a, arp_request(MAC_A, IP_A, IP_G), g),
        P("in: offer from server 1", g, dhcp_offer(MAC_G, IP_G, MAC_A, IP_A), a),
        P("in: offer from server 2", g, dhcp_offer(MAC_G, "10.0.0.253", MAC_A, IP_A, MAC_A), a),
        P("in: offer from rogue", b, dhcp_offer(MAC_B, IP_B, MAC_A, IP_A), a),
        P("in: server wrong port", g, ether(MAC_A, MAC_G, ETH_IPV4, ipv4(
            IP_G, IP_A, PROTO_UDP, udp(IP_G, IP_A, 69, 68))), a),
        P("in: other IPv4 from server", g, ip_frame(MAC_G, MAC_A, IP_G, IP_A), a),
    ]


def mixed_l2_probes(v):
    a, b = v["a"], v["b"]
    return [
        P("IPv4 out", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b),
        P("IPv4 in", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A), a),
        P("IPv6 out", a, ipv6_echo(MAC_A, MAC_B, IP6_A, IP6_B), b),
        P("IPv6 in", b, ipv6_udp(MAC_B, MAC_A, IP6_B, IP6_A), a),
        P("ARP out", a, arp_request(MAC_A, IP_A, IP_B), b),
        P("ARP in", b, arp_request(MAC_B, IP_B, IP_A), a),
        P("RARP out", a, rarp(MAC_A, MAC_A, MAC_A), b),
        P("0x88b5 out", a, raw(MAC_A, MAC_B, 0x88B5), b),
        P("0x88b5 in", b, raw(MAC_B, MAC_A, 0x88B5), a),
        P("to host", a, dhcp_discover(MAC_A), netlab.HOST),
        P("b to host (unfiltered port)", b, dhcp_discover(MAC_B), netlab.HOST),
        P("host to b (unfiltered port)", netlab.HOST, ip_frame(MAC_G, MAC_B, IP_HOST, IP_B, "udp"), b),
    ]


def masks_probes(v):
    a, b = v["a"], v["b"]
    return [
        P("src 02:aa:12:34:56:78", a, ip_frame("02:aa:12:34:56:78", MAC_B, IP_A, IP_B), b),
        P("src 02:ab::", a, ip_frame("02:ab:00:00:00:00", MAC_B, IP_A, IP_B), b),
        P("dst 01:00:5e:7f:ff:fa", a, ip_frame(MAC_A, "01:00:5e:7f:ff:fa", IP_A, "239.255.255.250", "udp"), b),
        P("dst 01:00:5e:80:00:01", a, ip_frame(MAC_A, "01:00:5e:80:00:01", IP_A, IP_B, "udp"), b),
        P("from 10.0.0.200", a, ip_frame(MAC_A, MAC_B, "10.0.0.200", IP_B), b),
        P("from 10.0.1.1", a, ip_frame(MAC_A, MAC_B, "10.0.1.1", IP_B), b),
        P("to 192.168.7.7", a, ip_frame(MAC_A, MAC_B, IP_A, "192.168.7.7"), b),
        P("to 192.169.0.1", a, ip_frame(MAC_A, MAC_B, IP_A, "192.169.0.1"), b),
        P("udp dport 4999", a, udp_frame(MAC_A, MAC_B, IP_A, IP_B, 40000, 4999), b),
        P("udp dport 5000", a, udp_frame(MAC_A, MAC_B, IP_A, IP_B, 40000, 5000), b),
        P("udp dport 5005", a, udp_frame(MAC_A, MAC_B, IP_A, IP_B, 40000, 5005), b),
        P("udp dport 5006", a, udp_frame(MAC_A, MAC_B, IP_A, IP_B, 40000, 5006), b),
        P("tcp sport 1027", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 1027, 80), b),
        P("tcp sport 1031", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 1031, 80), b),
        P("0x88b5 (reject)", a, raw(MAC_A, MAC_B, 0x88B5), b),
        P("ARP not from 10/24", a, arp_request(MAC_A, "10.9.9.9", IP_B), b),
        P("in: from 52:54:00:00:00:02", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A), a),
        P("in: from 52:54:00:00:00:12", b, ip_frame("52:54:00:00:00:12", MAC_A, IP_B, IP_A), a),
        P("in: ARP not in 10/24", b, arp_request(MAC_B, "192.0.2.1", IP_A), a),
    ]


def actions_probes(v):
    a, b = v["a"], v["b"]
    out = []
    for src in ("10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5"):
        out.append(P(f"icmp from {src}", a, ip_frame(MAC_A, MAC_B, src, IP_B, "icmp"), b))
        out.append(P(f"udp from {src}", a, ip_frame(MAC_A, MAC_B, src, IP_B, "udp"), b))
    out += [P("ARP (root return)", a, arp_request(MAC_A, IP_A, IP_B), b),
            P("IPv6 (root drop)", a, ipv6_udp(MAC_A, MAC_B, IP6_A, IP6_B), b),
            P("in: IPv4 falls off", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A), a),
            P("in: IPv4 from 10.0.0.9", b, ip_frame(MAC_B, MAC_A, "10.0.0.9", IP_A), a),
            P("in: ARP", b, arp_request(MAC_B, IP_B, IP_A), a)]
    return out


def priorities_probes(v):
    a, b = v["a"], v["b"]
    return [
        P("IPv4 (jump after the drop)", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b),
        P("ARP (jump before the drop)", a, arp_request(MAC_A, IP_A, IP_B), b),
        P("RARP (tie: jump first)", a, rarp(MAC_A, MAC_A, MAC_A), b),
        P("IPv6 from fd00::9 (sub-chain order)", a, ipv6_udp(MAC_A, MAC_B, "fd00::9", IP6_B), b),
        P("IPv6 from fd00::1", a, ipv6_udp(MAC_A, MAC_B, IP6_A, IP6_B), b),
        P("0x88b5 (root -100 accept)", a, raw(MAC_A, MAC_B, 0x88B5), b),
        P("0x88b6 (root drop)", a, raw(MAC_A, MAC_B, 0x88B6), b),
    ]


def l3_out_probes(v):
    a, b = v["a"], v["b"]
    return [
        P("unsolicited UDP from b:53", b, udp_frame(MAC_B, MAC_A, IP_B, IP_A, 53, 40002), a),
        P("UDP a -> b:53", a, udp_frame(MAC_A, MAC_B, IP_A, IP_B, 40007, 53), b),
        P("SYN from b:22 to a", b, tcp_frame(MAC_B, MAC_A, IP_B, IP_A, 22, 5555), a),
        P("SYN a -> b:8005", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 40010, 8005), b),
        P("SYN a -> b:8011", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 40011, 8011), b),
        P("from 10.0.1.1", a, udp_frame(MAC_A, MAC_B, "10.0.1.1", IP_B, 40012, 53), b),
        P("in: to 10.0.5.1", b, udp_frame(MAC_B, MAC_A, IP_B, "10.0.5.1", 40013, 9), a),
        P("in: ARP (no L3 rule)", b, arp_request(MAC_B, IP_B, IP_A), a),
    ]


def l3_state_probes(v):
    a, b = v["a"], v["b"]
    return [
        P("SYN-ACK from a:22", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 22, 40001, 0x12), b),
        P("SYN from a:22", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 22, 40008), b),
        P("SYN from a:2222 (statematch=false)", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 2222, 40009, 0x12), b),
        P("SYN to a:80", b, tcp_frame(MAC_B, MAC_A, IP_B, IP_A, 40004, 80), a),
        P("ARP from a (no L3 rule)", a, arp_request(MAC_A, IP_A, IP_B), b),
        P("ARP to a (no L3 rule)", b, arp_request(MAC_B, IP_B, IP_A), a),
    ]


def vlan_probe(name, src, dst, vid: int) -> Probe:
    frame = vlan_tagged(MAC_A, MAC_B, vid, ETH_IPV4, ipv4(IP_A, IP_B, 1, icmp_echo()))
    return Probe(name, src, frame, dst, seen_as=untagged(frame))


def l2_fields_probes(v):
    a, b = v["a"], v["b"]
    return [
        vlan_probe("VLAN 10", a, b, 10),
        vlan_probe("VLAN 20", a, b, 20),
        P("ARP request", a, arp_request(MAC_A, IP_A, IP_B), b),
        P("ARP reply", a, arp_reply(MAC_A, MAC_B, IP_A, IP_B), b),
        P("ICMPv6 echo", a, ipv6_echo(MAC_A, MAC_B, IP6_A, IP6_B), b),
        P("IPv6 UDP", a, ipv6_udp(MAC_A, MAC_B, IP6_A, IP6_B), b),
        P("0x88b5 broadcast", a, raw(MAC_A, BCAST, 0x88B5), b),
        P("0x88b5 unicast", a, raw(MAC_A, MAC_B, 0x88B5), b),
        P("in: RARP request", b, rarp(MAC_B, MAC_A, MAC_A), a),
        P("in: RARP reply", b, rarp(MAC_B, MAC_A, MAC_A, op=4), a),
        P("in: tcp dport 23", b, tcp_frame(MAC_B, MAC_A, IP_B, IP_A, 40000, 23), a),
        P("in: tcp dport 24", b, tcp_frame(MAC_B, MAC_A, IP_B, IP_A, 40000, 24), a),
    ]


def l3_lists_probes(v):
    a, b = v["a"], v["b"]
    out = [P("echo request a->b", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B, "icmp"), b),
           P("echo request b->a", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A, "icmp"), a),
           P("ARP b->a (no L3 rule)", b, arp_request(MAC_B, IP_B, IP_A), a)]
    for src in (IP_A, IP_A2):
        for port in (53, 123):
            out.append(P(f"udp {src}->{port}", a, udp_frame(MAC_A, MAC_B, src, IP_B, 40000 + port, port), b))
            out.append(P(f"tcp {src}->{port}", a, tcp_frame(MAC_A, MAC_B, src, IP_B, 41000 + port, port), b))
    out.append(P("tcp 10.0.0.1->80", a, tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 41080, 80), b))
    return out


CASES = [
    Case("clean-traffic", "clean-traffic", {"IP": [IP_A, IP_A2]}, probes=clean_traffic_probes,
         setup=second_ip, connections={
             "ping a->b from IP 1": ping_ok("a", IP_B, IP_A),
             "ping a->b from IP 2": ping_ok("a", IP_B, IP_A2),
             "tcp b->a IP 2": tcp_ok("b", IP_A2, 8080, dst="a"),
             "ping6 a->b": ping_ok("a", IP6_B),
         }),
    Case("clean-traffic-gateway", "clean-traffic-gateway", {"IP": IP_A, "GATEWAY_MAC": MAC_G},
         gateway=True, probes=gateway_probes, connections={
             "ping a->g": ping_ok("a", IP_G), "ping a->b": ping_ok("a", IP_B),
             "tcp g->a": tcp_ok("g", IP_A, 2222)}),
    Case("no-mac-broadcast", "no-mac-broadcast", probes=broadcast_multicast_probes),
    Case("no-ip-multicast", "no-ip-multicast", probes=broadcast_multicast_probes),
    Case("no-ipv6-spoofing", "no-ipv6-spoofing", {"IPV6": [IP6_A, IP6_A2]}, probes=ipv6_probes),
    Case("allow-dhcp-server", "nwft-o-dhcp-only", {"DHCPSERVER": [IP_G, "10.0.0.253"]}, gateway=True,
         filters={"nwft-o-ipv4-drop": filter_xml("nwft-o-ipv4-drop", rule("drop", "inout", 1000), chain="ipv4"),
                  "nwft-o-dhcp-only": filter_xml("nwft-o-dhcp-only", "<filterref filter='allow-dhcp-server'/>\n"
                                                 "<filterref filter='nwft-o-ipv4-drop'/>")},
         probes=dhcp_probes),
    Case("allow-ipv6+allow-incoming-ipv4", "nwft-o-v6-in4", filters={"nwft-o-v6-in4": filter_xml(
        "nwft-o-v6-in4", "\n".join(f"<filterref filter='{f}'/>" for f in
                                   ("allow-ipv6", "allow-incoming-ipv4", "allow-arp", "no-other-l2-traffic")))},
         probes=mixed_l2_probes, connections={"ping6 a->b": ping_ok("a", IP6_B), "ping b->a": ping_ok("b", IP_A),
                                              "ping6 b->a": ping_ok("b", IP6_A)}),
    Case("no-other-l2-traffic", "no-other-l2-traffic", probes=mixed_l2_probes),
    Case("l2-masks-negation-ports-reject", "nwft-o-masks", filters={"nwft-o-masks": filter_xml(
        "nwft-o-masks", "\n".join([
            rule("drop", "out", 100, "<mac srcmacaddr='02:aa:00:00:00:00' srcmacmask='ff:ff:00:00:00:00'/>"),
            rule("drop", "out", 110, "<mac dstmacaddr='01:00:5e:00:00:00' dstmacmask='ff:ff:ff:80:00:00'/>"),
            rule("drop", "in", 120, "<mac srcmacaddr='52:54:00:00:00:00' srcmacmask='ff:ff:ff:ff:ff:f0'/>"),
            rule("drop", "out", 130, "<ip match='no' srcipaddr='10.0.0.0' srcipmask='24'/>"),
            rule("drop", "out", 140, "<ip dstipaddr='192.168.0.0' dstipmask='255.255.0.0'/>"),
            rule("drop", "out", 150, "<ip protocol='udp' dstportstart='5000' dstportend='5005'/>"),
            rule("drop", "out", 160, "<ip protocol='tcp' srcportstart='1024' srcportend='1030'/>"),
            rule("reject", "out", 170, "<mac protocolid='0x88b5'/>"),
            rule("drop", "inout", 180, "<arp match='no' arpsrcipaddr='10.0.0.0' arpsrcipmask='24'/>"),
        ]))}, probes=masks_probes),
    Case("l2-accept-return-continue-falloff", "nwft-o-rac", filters={
        "nwft-o-rac-sub": filter_xml("nwft-o-rac-sub", "\n".join([
            rule("accept", "out", 100, "<ip srcipaddr='10.0.0.1'/>"),
            rule("return", "out", 110, "<ip srcipaddr='10.0.0.3'/>"),
            rule("continue", "out", 120, "<ip srcipaddr='10.0.0.4'/>"),
            rule("drop", "out", 200, "<ip protocol='udp'/>"),
            rule("drop", "in", 200, "<ip srcipaddr='10.0.0.9'/>"),
        ]), chain="ipv4"),
        "nwft-o-rac": filter_xml("nwft-o-rac", "\n".join([
            "<filterref filter='nwft-o-rac-sub'/>",
            rule("return", "out", 100, "<mac protocolid='arp'/>"),
            rule("drop", "inout", 500, "<mac protocolid='ipv4'/>"),
            rule("drop", "inout", 1000),
        ]))}, probes=actions_probes),
    Case("l2-priorities-interleaving", "nwft-o-prio", filters={
        "nwft-o-prio-v4": filter_xml("nwft-o-prio-v4", rule("accept", "out", 500, "<ip/>"), chain="ipv4", priority=100),
        "nwft-o-prio-arp": filter_xml("nwft-o-prio-arp", rule("accept", "out", 500), chain="arp-x", priority=-600),
        "nwft-o-prio-rarp": filter_xml("nwft-o-prio-rarp", rule("accept", "out", 500), chain="rarp-x", priority=0),
        "nwft-o-prio-v6": filter_xml("nwft-o-prio-v6", "\n".join([
            rule("drop", "out", 600, "<ipv6 srcipaddr='fd00::9'/>"),
            rule("accept", "out", 100, "<ipv6 srcipaddr='fd00::' srcipmask='16'/>"),
        ]), chain="ipv6"),
        "nwft-o-prio-inner": filter_xml("nwft-o-prio-inner", rule("accept", "out", -100, "<mac protocolid='0x88b5'/>")),
        "nwft-o-prio": filter_xml("nwft-o-prio", "\n".join([
            "<filterref filter='nwft-o-prio-v4'/>", "<filterref filter='nwft-o-prio-arp'/>",
            "<filterref filter='nwft-o-prio-rarp'/>", "<filterref filter='nwft-o-prio-v6'/>",
            rule("drop", "out", 0, "<mac protocolid='ipv4'/>"),
            rule("drop", "out", 0, "<mac protocolid='arp'/>"),
            rule("drop", "out", 0, "<mac protocolid='rarp'/>"),
            "<filterref filter='nwft-o-prio-inner'/>",
            rule("drop", "out", 1000),
        ]))}, probes=priorities_probes),
    Case("l3-out-state-ranges-negation", "nwft-o-l3out", filters={"nwft-o-l3out": filter_xml(
        "nwft-o-l3out", "\n".join([
            rule("drop", "out", 50, "<all match='no' srcipaddr='10.0.0.0' srcipmask='255.255.255.0'/>"),
            rule("accept", "out", 100, "<udp dstportstart='53'/>"),
            rule("accept", "out", 110, "<tcp dstportstart='8000' dstportend='8010'/>"),
            rule("return", "out", 120, "<tcp dstportstart='22'/>"),
            rule("drop", "inout", 1000, "<all/>"),
        ]))}, probes=l3_out_probes, connections={
            "udp a->b:53": udp_ok("a", IP_B, 53), "udp b->a:53": udp_ok("b", IP_A, 53),
            "tcp a->b:8000": tcp_ok("a", IP_B, 8000), "tcp a->b:8010": tcp_ok("a", IP_B, 8010),
            "tcp a->b:8011": tcp_ok("a", IP_B, 8011), "tcp a->b:22": tcp_ok("a", IP_B, 22),
            "tcp b->a:8000": tcp_ok("b", IP_A, 8000), "ping a->b": ping_ok("a", IP_B),
            "tcp b->host:8000 (control)": tcp_ok("b", IP_HOST, 8000)}),
    Case("l3-explicit-state-statematch", "nwft-o-l3st", filters={"nwft-o-l3st": filter_xml(
        "nwft-o-l3st", "\n".join([
            rule("accept", "in", 100, "<tcp dstportstart='22' state='NEW'/>"),
            rule("accept", "inout", 110, "<all state='ESTABLISHED'/>"),
            rule("accept", "in", 120, "<tcp dstportstart='2222'/>", statematch="false"),
            rule("drop", "inout", 1000, "<all/>"),
        ]))}, probes=l3_state_probes, connections={
            "tcp b->a:22": tcp_ok("b", IP_A, 22), "tcp b->a:80": tcp_ok("b", IP_A, 80),
            "tcp a->b:22": tcp_ok("a", IP_B, 22), "tcp b->a:2222": tcp_ok("b", IP_A, 2222),
            "tcp host->b:22 (control)": tcp_ok("host", IP_B, 22)}),
    Case("l3-in-accept-default-state", "nwft-o-l3in", filters={"nwft-o-l3in": filter_xml(
        "nwft-o-l3in", "\n".join([
            rule("accept", "in", 100, "<tcp dstportstart='22'/>"),
            rule("drop", "inout", 1000, "<all/>"),
        ]))}, probes=l3_state_probes, connections={
            "tcp b->a:22": tcp_ok("b", IP_A, 22), "tcp b->a:80": tcp_ok("b", IP_A, 80),
            "tcp a->b:22": tcp_ok("a", IP_B, 22), "tcp host->b:22 (control)": tcp_ok("host", IP_B, 22)}),
    Case("l3-ipv6", "nwft-o-l3v6", filters={"nwft-o-l3v6": filter_xml("nwft-o-l3v6", "\n".join([
        rule("accept", "inout", 90, "<icmpv6/>"),
        rule("accept", "out", 100, "<tcp-ipv6 dstportstart='8080'/>"),
        rule("drop", "out", 110, "<udp-ipv6 match='no' srcipaddr='fd00::' srcipmask='64'/>"),
        rule("accept", "out", 120, "<udp-ipv6/>", statematch="false"),
        rule("drop", "inout", 1000, "<all-ipv6/>"),
    ]))}, probes=lambda v: [
        P("UDP from fd00::1", v["a"], ipv6_udp(MAC_A, MAC_B, IP6_A, IP6_B), v["b"]),
        P("UDP from fd01::1", v["a"], ipv6_udp(MAC_A, MAC_B, "fd01::1", IP6_B), v["b"]),
        P("in: UDP to a", v["b"], ipv6_udp(MAC_B, MAC_A, IP6_B, IP6_A, 40000, 9), v["a"]),
        P("in: IPv4 (no IPv4 rules)", v["b"], ip_frame(MAC_B, MAC_A, IP_B, IP_A), v["a"]),
    ], connections={
        "tcp6 a->b:8080": tcp_ok("a", IP6_B, 8080), "tcp6 a->b:8081": tcp_ok("a", IP6_B, 8081),
        "tcp6 b->a:8080": tcp_ok("b", IP6_A, 8080), "ping6 a->b": ping_ok("a", IP6_B),
        "tcp4 b->a:80": tcp_ok("b", IP_A, 80)}),
    Case("l2-element-fields", "nwft-o-l2fields", filters={"nwft-o-l2fields": filter_xml(
        "nwft-o-l2fields", "\n".join([
            rule("drop", "out", 100, "<vlan vlanid='10'/>"),
            rule("drop", "out", 110, "<arp opcode='Reply'/>"),
            rule("drop", "out", 120, "<ipv6 protocol='icmpv6' type='128' typeend='129'/>"),
            rule("drop", "out", 130, "<mac protocolid='0x88b5' dstmacaddr='ff:ff:ff:ff:ff:ff'/>"),
            rule("drop", "in", 140, "<rarp opcode='Request_Reverse'/>"),
            rule("drop", "in", 150, "<ip protocol='tcp' dstportstart='23'/>"),
        ]))}, probes=l2_fields_probes),
    Case("l3-icmp-type-and-lists", "nwft-o-l3lists", {"IP": [IP_A, IP_A2], "PORTS": ["53", "123"]},
         setup=second_ip, filters={"nwft-o-l3lists": filter_xml("nwft-o-l3lists", "\n".join([
             rule("accept", "out", 100, "<icmp type='8'/>"),
             rule("accept", "out", 110, "<udp srcipaddr='$IP' dstportstart='$PORTS'/>"),
             rule("accept", "out", 120, "<tcp srcipaddr='$IP[@1]' dstportstart='$PORTS[@2]'/>"),
             rule("drop", "inout", 1000, "<all/>"),
         ]))}, probes=l3_lists_probes, connections={"ping a->b": ping_ok("a", IP_B),
                                                    "udp a->b:53 (control)": udp_ok("a", IP_B, 53)}),
    Case("l3-mac-source", "nwft-o-l3mac", gateway=True, filters={"nwft-o-l3mac": filter_xml("nwft-o-l3mac", "\n".join([
        rule("drop", "inout", 100, f"<all match='no' srcmacaddr='{MAC_G}'/>"),
        rule("drop", "out", 110, f"<udp srcmacaddr='{MAC_A}' dstportstart='7'/>"),
    ]))}, probes=lambda v: [
        P("in: IPv4 from b", v["b"], ip_frame(MAC_B, MAC_A, IP_B, IP_A, "udp"), v["a"]),
        P("in: IPv4 from g", v["g"], ip_frame(MAC_G, MAC_A, IP_G, IP_A, "udp"), v["a"]),
        P("in: udp 7 from g", v["g"], udp_frame(MAC_G, MAC_A, IP_G, IP_A, 7, 40000), v["a"]),
        P("in: udp from g's port 7", v["g"], udp_frame(MAC_G, MAC_A, IP_G, IP_A, 40000, 7), v["a"]),
        P("in: ARP from b", v["b"], arp_request(MAC_B, IP_B, IP_A), v["a"]),
        P("out: IPv4 to b", v["a"], ip_frame(MAC_A, MAC_B, IP_A, IP_B), v["b"]),
        P("out: udp 7 to b", v["a"], udp_frame(MAC_A, MAC_B, IP_A, IP_B, 40001, 7), v["b"]),
        P("out: udp 8 to b", v["a"], udp_frame(MAC_A, MAC_B, IP_A, IP_B, 40001, 8), v["b"]),
    ]),
    Case("l3-two-filtered-ports-and-host", "nwft-o-porta", b_binding=("nwft-o-portb", {}), filters={
        "nwft-o-porta": filter_xml("nwft-o-porta", "\n".join([
            "<filterref filter='no-mac-spoofing'/>",
            rule("accept", "out", 100, "<tcp dstportstart='22'/>"),
            rule("accept", "out", 110, "<tcp dstportstart='8000' dstportend='8001'/>"),
            rule("drop", "inout", 1000, "<all/>"),
        ])),
        "nwft-o-portb": filter_xml("nwft-o-portb", "\n".join([
            rule("accept", "in", 100, "<tcp dstportstart='22'/>"),
            rule("accept", "in", 110, "<udp dstportstart='53'/>"),
            rule("accept", "in", 120, "<tcp dstportstart='8001'/>"),
            rule("accept", "in", 130, "<tcp dstportstart='2022'/>"),
            rule("drop", "inout", 1000, "<all/>"),
        ]))}, probes=lambda v: [
            P("SYN a->b:22", v["a"], tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 40020, 22), v["b"]),
            P("SYN a->b:8000", v["a"], tcp_frame(MAC_A, MAC_B, IP_A, IP_B, 40021, 8000), v["b"]),
            P("SYN b->a:22", v["b"], tcp_frame(MAC_B, MAC_A, IP_B, IP_A, 40022, 22), v["a"]),
            P("ARP b->a (no L3 rule)", v["b"], arp_request(MAC_B, IP_B, IP_A), v["a"]),
            P("spoofed MAC a->b:22", v["a"], tcp_frame(SPOOF_MAC, MAC_B, IP_A, IP_B, 40023, 22), v["b"]),
        ], connections={
            "tcp a->b:22": tcp_ok("a", IP_B, 22), "tcp a->b:8000": tcp_ok("a", IP_B, 8000),
            "tcp a->b:8001": tcp_ok("a", IP_B, 8001), "tcp b->a:22": tcp_ok("b", IP_A, 22),
            "udp a->b:53": udp_ok("a", IP_B, 53), "ping a->b": ping_ok("a", IP_B),
            "tcp a->host:22": tcp_ok("a", IP_HOST, 22), "tcp a->host:8000": tcp_ok("a", IP_HOST, 8000),
            "tcp a->host:9000": tcp_ok("a", IP_HOST, 9000), "ping a->host": ping_ok("a", IP_HOST),
            "tcp b->host:9001": tcp_ok("b", IP_HOST, 9001), "tcp b->host:2222": tcp_ok("b", IP_HOST, 2222),
            "tcp host->b:2022": tcp_ok("host", IP_B, 2022), "tcp host->b:23": tcp_ok("host", IP_B, 23),
        }),
    Case("l3-reject", "nwft-o-reject", filters={"nwft-o-reject": filter_xml("nwft-o-reject", "\n".join([
        rule("reject", "in", 100, "<tcp dstportstart='81'/>"),
        rule("drop", "in", 100, "<tcp dstportstart='82'/>"),
        rule("reject", "out", 100, "<udp dstportstart='83'/>"),
    ]))}, connections={
        "tcp b->a:81": tcp_outcome("b", IP_A, 81), "tcp b->a:82": tcp_outcome("b", IP_A, 82),
        "tcp b->a:80": tcp_outcome("b", IP_A, 80),
        "udp a->b:83": udp_ok("a", IP_B, 83), "udp a->b:84": udp_ok("a", IP_B, 84)}),
]
CASE_IDS = [c.name for c in CASES]


# ----------------------------------------------------------------------------------------------
# Machinery


_ORACLE: dict[str, tuple[list, dict]] = {}  # case name -> (probes, libvirt verdicts)
_LIBVIRT_DEFINED: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def undefine_libvirt_filters(libvirtd):
    yield
    for name in reversed(_LIBVIRT_DEFINED):
        lv.virsh("nwfilter-undefine", name, check=False)
    _LIBVIRT_DEFINED.clear()
    _ORACLE.clear()


def make_vms(lab, case: Case) -> dict:
    v = {"a": lab.add_vm("a", MAC_A, ipv4=f"{IP_A}/24", ipv6=f"{IP6_A}/64"),
         "b": lab.add_vm("b", MAC_B, ipv4=f"{IP_B}/24", ipv6=f"{IP6_B}/64")}
    if case.gateway:
        v["g"] = lab.add_vm("g", MAC_G, ipv4=f"{IP_G}/24")
    if IP_HOST not in lab._bridge_addrs:
        lab.set_bridge_address(ipv4=f"{IP_HOST}/24")  # REJECT's ICMP error needs a route back
    if case.setup:
        case.setup(lab, v)
    for vm in v.values():
        lab.flush_neighbours(vm)
    return v


def measure(lab, v, case: Case, probes: list) -> dict:
    """Frame probes (one batch), then the connections (one batch, all at once). Neither has
    expectations: a failure counts only next to its twin's success (tests/traffic.py)."""
    got = dict(frames(lab, probes)) if probes else {}
    if case.connections:
        results = connections(lab, [check.conn(name, v) for name, check in case.connections.items()])
        got.update({name: check.verdict(results[name]) for name, check in case.connections.items()})
    return got


def libvirt_verdicts(lab, v, case: Case, probes: list) -> dict:
    """libvirt's verdicts (set NWFT_ORACLE_VERBOSE=1 and use -s to see them)."""
    for name, xml in case.filters.items():
        if name not in _LIBVIRT_DEFINED:
            path = lv.current()._workdir / f"{name}.xml"
            path.write_text(xml)
            lv.virsh("nwfilter-define", str(path))
            _LIBVIRT_DEFINED.append(name)
    lv.libvirt_oracle_binding(lab, v["a"].port, MAC_A, case.filter, case.params)
    try:
        if case.b_binding:
            lv.libvirt_oracle_binding(lab, v["b"].port, MAC_B, *case.b_binding)
        got = measure(lab, v, case, probes)
    finally:
        lv.libvirt_oracle_unbind(v["a"].port)
        if case.b_binding:
            lv.libvirt_oracle_unbind(v["b"].port, missing_ok=True)
    if os.environ.get("NWFT_ORACLE_VERBOSE"):
        print(f"\nlibvirt verdicts for {case.name}:")
        for name, verdict in got.items():
            print(f"  {name:45} {fmt(verdict)}")
    return got


def fmt(verdict) -> str:
    return {True: "delivered/ok", False: "dropped/failed"}.get(verdict, str(verdict))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)]
                                               if c.xfail else []) for c in CASES])
def test_same_verdicts_as_libvirt(libvirt_lab, backend, tmp_path, case):
    lab = libvirt_lab
    v = make_vms(lab, case)
    if case.name not in _ORACLE:
        probes = case.probes(v) if case.probes else []
        _ORACLE[case.name] = (probes, libvirt_verdicts(lab, v, case, probes))
    cached_probes, theirs = _ORACLE[case.name]
    # the same frames, re-addressed to this test's VM objects (same names, MACs and IPs)
    probes = [Probe(p.name, v[p.src.name] if hasattr(p.src, "name") and p.src.name in v else p.src,
                    p.frame, v[p.dst.name] if hasattr(p.dst, "name") and p.dst.name in v else p.dst,
                    seen_as=p.seen_as)
              for p in cached_probes]
    assert "vp" in v["a"].port and not lv.current().bindings(), "libvirt's binding must be gone"

    cli = Cli(lab.host_ns, tmp_path, backend)
    for xml in case.filters.values():
        cli.define(xml)
    for vm in v.values():
        lab.flush_neighbours(vm)
    cli.binding_create(v["a"].port, MAC_A, case.filter, case.params)
    try:
        if case.b_binding:
            cli.binding_create(v["b"].port, MAC_B, *case.b_binding)
        ours = measure(lab, v, case, probes)
    finally:
        cli.binding_delete(v["a"].port, check=False)
        if case.b_binding:
            cli.binding_delete(v["b"].port, check=False)

    values = set(theirs.values())
    assert len(values) > 1, f"libvirt gave one verdict for every probe ({values}): the case proves nothing"
    mismatches = [f"{name}: libvirt {fmt(theirs[name])}, ours ({backend}) {fmt(ours[name])}"
                  for name in theirs if ours.get(name) != theirs[name]]
    assert not mismatches, f"{case.name} ({case.filter}): verdicts differ from libvirt's:\n" + "\n".join(mismatches)

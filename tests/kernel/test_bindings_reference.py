"""The shipped filters instantiated on real bridge ports, with real frames and connections.

Every test runs the CLI (``python3 -m libvirt_nwfilter binding-create ...``) inside a fresh lab's
host namespace (tests/netlab.py), once per backend, and checks what passes: frames sent on a VM's
``eth0`` and captured on the receiving VM's ``eth0`` (or on ``br0``), plus ping/TCP/UDP.
Expectations come from shared/spec/reference-filters.md.
"""

from __future__ import annotations

import netlab
from bindings_helpers import (  # noqa: F401  (fixtures)
    BCAST, ETH_IPV4, IP6_A, IP6_A2, IP6_B, IP_A, IP_A2, IP_B, IP_G, LL_A, LL_B, MAC_A, MAC_B,
    MAC_G, PROTO_UDP, SPOOF_MAC, arp_reply, arp_request, backend, cli, dhcp_discover, dhcp_offer,
    ether, filter_xml, icmp_echo, ip_frame, ipv4, ipv6_echo, ipv6_udp, pair, rarp, raw, udp,
    untagged, vlan_tagged,
)
from traffic import Conn, Probe, check_connections, check_frames

IPS_A = [IP_A, IP_A2]


def vlan_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, vid: int = 10) -> bytes:
    return vlan_tagged(src_mac, dst_mac, vid, ETH_IPV4, ipv4(src_ip, dst_ip, 1, icmp_echo()))


# ----------------------------------------------------------------------------------------------
# clean-traffic, IP list-valued


def bind_clean_traffic(lab, cli, a):
    a.run(["ip", "addr", "add", f"{IP_A2}/24", "dev", "eth0"])
    cli.binding_create(a.port, a.mac, "clean-traffic", {"IP": IPS_A})


def test_clean_traffic_frames(lab, cli, pair):
    """Frames from the VM (anti-spoofing) and to the VM (IPv4, ARP, RARP announce only)."""
    a, b = pair
    bind_clean_traffic(lab, cli, a)
    P = Probe
    probes = [
        P("own MAC+IP", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, True),
        P("second IP of the list", a, ip_frame(MAC_A, MAC_B, IP_A2, IP_B, "udp"), b, True),
        P("another source MAC", a, ip_frame(SPOOF_MAC, MAC_B, IP_A, IP_B), b, False),
        P("another source IP", a, ip_frame(MAC_A, MAC_B, "10.0.0.9", IP_B), b, False),
        P("another source IP, TCP", a, ip_frame(MAC_A, MAC_B, "10.0.0.9", IP_B, "tcp"), b, False),
        P("DHCP discover from 0.0.0.0 (to b)", a, dhcp_discover(MAC_A), b, True),
        P("ICMP from 0.0.0.0 (only UDP may)", a, ip_frame(MAC_A, BCAST, "0.0.0.0", "255.255.255.255"), b, False),
        P("ARP request, own MAC and IP", a, arp_request(MAC_A, IP_A, IP_B), b, True),
        P("ARP request from the second IP", a, arp_request(MAC_A, IP_A2, "10.0.0.77"), b, True),
        P("ARP request claiming another IP", a, arp_request(MAC_A, "10.0.0.9", IP_B), b, False),
        P("ARP request claiming another MAC", a, arp_request(MAC_A, IP_A, "10.0.0.78", sha=SPOOF_MAC), b, False),
        P("ARP from another source MAC", a, arp_request(SPOOF_MAC, IP_A, "10.0.0.79", sha=SPOOF_MAC), b, False),
        P("ARP reply, own", a, arp_reply(MAC_A, MAC_B, IP_A, IP_B), b, True),
        P("ARP reply claiming another IP", a, arp_reply(MAC_A, MAC_B, IP_B, IP_B), b, False),
        P("ARP reply claiming another MAC", a, arp_reply(MAC_A, MAC_B, IP_A2, IP_B, sha=MAC_G), b, False),
        P("IPv6 link-local ICMPv6", a, ipv6_echo(MAC_A, MAC_B, LL_A, LL_B), b, False),
        P("IPv6 global UDP", a, ipv6_udp(MAC_A, MAC_B, IP6_A, IP6_B), b, False),
        P("IPv6 multicast", a, ipv6_udp(MAC_A, "33:33:00:00:00:01", LL_A, "ff02::1"), b, False),
        P("RARP announce-self from $MAC", a, rarp(MAC_A, MAC_A, MAC_A), b, True),
        P("RARP with another target MAC", a, rarp(MAC_A, MAC_A, MAC_B), b, False),
        P("RARP reply opcode", a, rarp(MAC_A, MAC_A, MAC_A, op=4), b, False),
        P("RARP unicast", a, rarp(MAC_A, MAC_A, MAC_A, dst_mac=MAC_B), b, False),
        P("RARP announce for another MAC", a, rarp(MAC_A, MAC_B, MAC_B), b, False),
        P("old announce ethertype 0x835", a, raw(MAC_A, BCAST, 0x0835), b, True),
        P("other ethertype 0x88b5", a, raw(MAC_A, MAC_B, 0x88B5), b, False),
        P("LLDP-like 0x88cc", a, raw(MAC_A, BCAST, 0x88CC), b, False),
        P("VLAN-tagged IPv4", a, (tagged := vlan_frame(MAC_A, MAC_B, IP_A, IP_B)), b, False, untagged(tagged)),
        P("DHCP discover from 0.0.0.0 (to host)", a, dhcp_discover(MAC_A), netlab.HOST, True),
        P("spoofed IP to host", a, ip_frame(MAC_A, BCAST, "10.0.0.9", "10.0.0.255"), netlab.HOST, False),
        P("in: IPv4 from b", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A), a, True),
        P("in: IPv4 from any source IP", b, ip_frame(MAC_B, MAC_A, "192.0.2.7", IP_A, "udp"), a, True),
        P("in: IPv4 from any source MAC", b, ip_frame(MAC_G, MAC_A, "198.51.100.1", IP_A2, "tcp"), a, True),
        P("in: IPv4 broadcast", b, ip_frame(MAC_B, BCAST, IP_B, "10.0.0.255", "udp"), a, True),
        P("in: IPv4 multicast", b, ip_frame(MAC_B, "01:00:5e:00:00:fb", IP_B, "224.0.0.251", "udp"), a, True),
        P("in: DHCP offer", b, dhcp_offer(MAC_B, IP_B, MAC_A, IP_A), a, True),
        P("in: ARP request", b, arp_request(MAC_B, IP_B, IP_A), a, True),
        P("in: ARP reply", b, arp_reply(MAC_B, MAC_A, IP_B, IP_A), a, True),
        P("in: ARP with any sender", b, arp_request(MAC_B, "10.0.0.99", IP_A2, sha=MAC_G), a, True),
        P("in: IPv6 to the VM", b, ipv6_echo(MAC_B, MAC_A, LL_B, LL_A), a, False),
        P("in: IPv6 UDP to the VM", b, ipv6_udp(MAC_B, MAC_A, IP6_B, IP6_A), a, False),
        P("in: RARP announce of $MAC echoed", b, rarp(MAC_B, MAC_A, MAC_A), a, True),
        P("in: RARP announce of another MAC", b, rarp(MAC_B, MAC_B, MAC_B), a, False),
        P("in: 0x835 towards the VM (only out)", b, raw(MAC_B, BCAST, 0x0835), a, False),
        P("in: other ethertype", b, raw(MAC_B, MAC_A, 0x88B5), a, False),
    ]
    check_frames(lab, probes)


def test_clean_traffic_real_traffic(lab, cli, pair):
    a, b = pair
    bind_clean_traffic(lab, cli, a)
    lab.flush_neighbours(a)
    lab.flush_neighbours(b)
    # ARP both ways (neighbour caches are empty), both IPs usable in both directions
    check_connections(lab, [Conn("ping a -> b from the first IP", "ping", a, IP_B, expect=True, source_ip=IP_A),
                            Conn("ping a -> b from the second IP", "ping", a, IP_B, expect=True, source_ip=IP_A2)])
    lab.flush_neighbours(b)
    check_connections(lab, [Conn("ping b -> a's second IP", "ping", b, IP_A2, expect=True),
                            Conn("ping b -> a", "ping", b, IP_A, expect=True),
                            Conn("tcp b -> a's second IP", "tcp", b, IP_A2, 8080, True, dst_ns=a.ns),
                            Conn("tcp a -> b", "tcp", a, IP_B, 8081, True),
                            Conn("udp b -> a", "udp", b, IP_A, 5353, True)])
    # no IPv6 at all, and a VM that moves to an address outside the list is cut off
    a.run(["ip", "addr", "add", "10.0.0.9/24", "dev", "eth0"])
    check_connections(lab, [Conn("ping6 a -> b", "ping", a, IP6_B, expect=False),
                            Conn("ping6 b -> a", "ping", b, IP6_A, expect=False),
                            Conn("ping a -> b from 10.0.0.9", "ping", a, IP_B, expect=False, source_ip="10.0.0.9"),
                            Conn("ping a -> b", "ping", a, IP_B, expect=True, source_ip=IP_A),
                            Conn("ping b -> a", "ping", b, IP_A, expect=True)])


# ----------------------------------------------------------------------------------------------
# Other shipped filters


def test_no_mac_broadcast(lab, cli, pair):
    a, b = pair
    cli.binding_create(a.port, a.mac, "no-mac-broadcast")
    P = Probe
    check_frames(lab, [
        P("IPv4 to broadcast MAC", a, ip_frame(MAC_A, BCAST, IP_A, "10.0.0.255", "udp"), b, False),
        P("DHCP discover (broadcast)", a, dhcp_discover(MAC_A), b, False),
        P("IPv4 unicast", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, True),
        P("IPv4 to a multicast MAC", a, ip_frame(MAC_A, "01:00:5e:00:00:fb", IP_A, "224.0.0.251", "udp"), b, True),
        P("ARP broadcast (not in the ipv4 chain)", a, arp_request(MAC_A, IP_A, IP_B), b, True),
        P("other ethertype broadcast", a, raw(MAC_A, BCAST, 0x88B5), b, True),
        P("IPv6 broadcast MAC", a, ipv6_udp(MAC_A, BCAST, IP6_A, IP6_B), b, True),
        P("broadcast towards the VM", b, ip_frame(MAC_B, BCAST, IP_B, "10.0.0.255", "udp"), a, True),
    ])
    assert lab.ping(a, IP_B)


def test_no_ip_multicast(lab, cli, pair):
    a, b = pair
    cli.binding_create(a.port, a.mac, "no-ip-multicast")
    P = Probe
    check_frames(lab, [
        P("224.0.0.251", a, ip_frame(MAC_A, "01:00:5e:00:00:fb", IP_A, "224.0.0.251", "udp"), b, False),
        P("239.255.255.250", a, ip_frame(MAC_A, "01:00:5e:7f:ff:fa", IP_A, "239.255.255.250", "udp"), b, False),
        P("multicast IP to unicast MAC", a, ip_frame(MAC_A, MAC_B, IP_A, "230.1.2.3"), b, False),
        P("240.0.0.1 (outside 224/4)", a, ip_frame(MAC_A, MAC_B, IP_A, "240.0.0.1"), b, True),
        P("223.255.255.255 (outside 224/4)", a, ip_frame(MAC_A, MAC_B, IP_A, "223.255.255.255"), b, True),
        P("unicast", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B, "tcp"), b, True),
        P("broadcast", a, ip_frame(MAC_A, BCAST, IP_A, "255.255.255.255", "udp"), b, True),
        P("IPv6 multicast (not IPv4)", a, ipv6_udp(MAC_A, "33:33:00:00:00:01", LL_A, "ff02::1"), b, True),
        P("multicast towards the VM", b, ip_frame(MAC_B, "01:00:5e:00:00:fb", IP_B, "224.0.0.251", "udp"), a, True),
    ])


def test_no_ipv6_spoofing(lab, cli, pair):
    a, b = pair
    cli.binding_create(a.port, a.mac, "no-ipv6-spoofing", {"IPV6": [IP6_A, IP6_A2]})
    P = Probe
    check_frames(lab, [
        P("own IPv6", a, ipv6_echo(MAC_A, MAC_B, IP6_A, IP6_B), b, True),
        P("second IPv6 of the list", a, ipv6_udp(MAC_A, MAC_B, IP6_A2, IP6_B), b, True),
        P("another IPv6", a, ipv6_echo(MAC_A, MAC_B, "fd00::9", IP6_B), b, False),
        P("another IPv6, UDP", a, ipv6_udp(MAC_A, MAC_B, "fd00::9", IP6_B), b, False),
        P("link-local UDP (DHCPv6)", a, ipv6_udp(MAC_A, "33:33:00:01:00:02", LL_A, "ff02::1:2", 546, 547), b, True),
        P("link-local UDP elsewhere", a, ipv6_udp(MAC_A, MAC_B, "fe80::1234", IP6_B), b, True),
        P("link-local ICMPv6 (not UDP)", a, ipv6_echo(MAC_A, MAC_B, LL_A, LL_B), b, False),
        P("IPv4 is not its business", a, ip_frame(MAC_A, MAC_B, "10.0.0.9", IP_B), b, True),
        P("IPv6 from anyone to the VM", b, ipv6_echo(MAC_B, MAC_A, "fd00::99", IP6_A), a, True),
    ])


def test_allow_dhcp_server(lab, cli, pair):
    """allow-dhcp-server in front of an IPv4 drop in the same (ipv4) chain: the VM may only
    send DHCP requests and receive DHCP replies from the servers in $DHCPSERVER."""
    a, b = pair
    g = lab.add_vm("g", MAC_G, ipv4=f"{IP_G}/24")
    cli.define(filter_xml("nwft-ipv4-drop", "<rule action='drop' direction='inout' priority='1000'/>",
                          chain="ipv4"))
    cli.define(filter_xml("nwft-dhcp-only", "<filterref filter='allow-dhcp-server'/>\n"
                                            "<filterref filter='nwft-ipv4-drop'/>"))
    cli.binding_create(a.port, a.mac, "nwft-dhcp-only", {"DHCPSERVER": [IP_G, "10.0.0.253"]})
    P = Probe
    check_frames(lab, [
        P("DHCP discover", a, dhcp_discover(MAC_A), g, True),
        P("UDP 68->67 not from 0.0.0.0", a, ether(BCAST, MAC_A, ETH_IPV4, ipv4(
            IP_A, "255.255.255.255", PROTO_UDP, udp(IP_A, "255.255.255.255", 68, 67))), g, False),
        P("UDP 68->67 to a unicast IP", a, ether(MAC_G, MAC_A, ETH_IPV4, ipv4(
            "0.0.0.0", IP_G, PROTO_UDP, udp("0.0.0.0", IP_G, 68, 67))), g, False),
        P("other IPv4 from the VM", a, ip_frame(MAC_A, MAC_G, IP_A, IP_G), g, False),
        P("ARP is not IPv4", a, arp_request(MAC_A, IP_A, IP_G), g, True),
        P("offer from the first server", g, dhcp_offer(MAC_G, IP_G, MAC_A, IP_A), a, True),
        P("offer from the second server", g, dhcp_offer(MAC_G, "10.0.0.253", MAC_A, IP_A, MAC_A), a, True),
        P("offer from a rogue server", b, dhcp_offer(MAC_B, IP_B, MAC_A, IP_A), a, False),
        P("server, wrong source port", g, ether(MAC_A, MAC_G, ETH_IPV4, ipv4(
            IP_G, IP_A, PROTO_UDP, udp(IP_G, IP_A, 69, 68))), a, False),
        P("other IPv4 from the server", g, ip_frame(MAC_G, MAC_A, IP_G, IP_A), a, False),
    ])
    check_connections(lab, [Conn("ping g -> a", "ping", g, IP_A, expect=False),
                            Conn("ping g -> b (unfiltered)", "ping", g, IP_B, expect=True)])


def test_clean_traffic_gateway(lab, cli, pair):
    a, b = pair
    g = lab.add_vm("g", MAC_G, ipv4=f"{IP_G}/24")
    cli.binding_create(a.port, a.mac, "clean-traffic-gateway", {"IP": IP_A, "GATEWAY_MAC": MAC_G})
    P = Probe
    check_frames(lab, [
        P("IPv4 to the gateway", a, ip_frame(MAC_A, MAC_G, IP_A, "8.8.8.8"), g, True),
        P("IPv4 to another VM", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, False),
        P("IPv4 broadcast", a, dhcp_discover(MAC_A), g, False),
        P("spoofed IP to the gateway", a, ip_frame(MAC_A, MAC_G, "10.0.0.9", "8.8.8.8"), g, False),
        P("spoofed MAC to the gateway", a, ip_frame(SPOOF_MAC, MAC_G, IP_A, "8.8.8.8"), g, False),
        P("ARP broadcast (to b)", a, arp_request(MAC_A, IP_A, IP_B), b, True),
        P("ARP broadcast (to the gateway)", a, arp_request(MAC_A, IP_A, IP_G), g, True),
        P("ARP claiming another IP", a, arp_request(MAC_A, IP_B, IP_G), g, False),
        P("IPv6 to the gateway", a, ipv6_udp(MAC_A, MAC_G, IP6_A, IP6_B), g, True),
        P("other ethertype to another VM", a, raw(MAC_A, MAC_B, 0x88B5), b, False),
        P("RARP announce", a, rarp(MAC_A, MAC_A, MAC_A), b, True),
        P("0x835", a, raw(MAC_A, BCAST, 0x0835), b, True),
        P("from the gateway", g, ip_frame(MAC_G, MAC_A, "8.8.8.8", IP_A), a, True),
        P("from another VM", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A), a, False),
        P("ARP from another VM", b, arp_request(MAC_B, IP_B, IP_A), a, True),
        P("IPv6 from another VM", b, ipv6_udp(MAC_B, MAC_A, IP6_B, IP6_A), a, False),
    ])
    check_connections(lab, [Conn("ping a -> g", "ping", a, IP_G, expect=True),
                            Conn("tcp g -> a:2222", "tcp", g, IP_A, 2222, True),
                            Conn("ping a -> b", "ping", a, IP_B, expect=False),
                            Conn("ping b -> a", "ping", b, IP_A, expect=False)])


def test_allow_ipv6_and_incoming_ipv4_in_a_custom_root(lab, cli, pair):
    """A custom root filter built from shipped ones: IPv6 both ways, IPv4 only towards the VM,
    ARP both ways, everything else dropped by no-other-l2-traffic."""
    a, b = pair
    cli.define(filter_xml("nwft-v6-in4", "\n".join(
        f"<filterref filter='{f}'/>" for f in
        ("allow-ipv6", "allow-incoming-ipv4", "allow-arp", "no-other-l2-traffic"))))
    cli.binding_create(a.port, a.mac, "nwft-v6-in4")
    P = Probe
    check_frames(lab, [
        P("IPv6 from the VM", a, ipv6_echo(MAC_A, MAC_B, IP6_A, IP6_B), b, True),
        P("IPv6 to the VM", b, ipv6_udp(MAC_B, MAC_A, IP6_B, IP6_A), a, True),
        P("IPv4 from the VM", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, False),
        P("IPv4 to the VM", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A), a, True),
        P("ARP from the VM", a, arp_request(MAC_A, IP_A, IP_B), b, True),
        P("ARP to the VM", b, arp_request(MAC_B, IP_B, IP_A), a, True),
        P("other ethertype from the VM", a, raw(MAC_A, MAC_B, 0x88B5), b, False),
        P("other ethertype to the VM", b, raw(MAC_B, MAC_A, 0x88B5), a, False),
        P("RARP from the VM", a, rarp(MAC_A, MAC_A, MAC_A), b, False),
    ])
    check_connections(lab, [Conn("ping6 a -> b", "ping", a, IP6_B, expect=True),
                            Conn("ping6 b -> a", "ping", b, IP6_A, expect=True),
                            Conn("tcp6 b -> a:8080", "tcp", b, IP6_A, 8080, True),
                            Conn("ping a -> b", "ping", a, IP_B, expect=False),
                            # the request arrives, the reply is dropped
                            Conn("ping b -> a", "ping", b, IP_A, expect=False)])


def test_no_other_l2_traffic(lab, cli, pair):
    """Nothing in or out of the VM; the same frames pass between b and the host (the twins)."""
    a, b = pair
    cli.binding_create(a.port, a.mac, "no-other-l2-traffic")
    P = Probe
    check_frames(lab, [
        P("IPv4 from the VM", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, False),
        P("ARP from the VM", a, arp_request(MAC_A, IP_A, IP_B), b, False),
        P("IPv6 from the VM", a, ipv6_udp(MAC_A, MAC_B, IP6_A, IP6_B), b, False),
        P("to host", a, dhcp_discover(MAC_A), netlab.HOST, False),
        P("IPv4 to the VM", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A), a, False),
        P("ARP to the VM", b, arp_request(MAC_B, IP_B, IP_A), a, False),
        P("other ethertype to the VM", b, raw(MAC_B, MAC_A, 0x88B5), a, False),
        P("b to host", b, dhcp_discover(MAC_B), netlab.HOST, True),
        P("host to b", netlab.HOST, ip_frame("52:54:00:00:00:fd", MAC_B, "10.0.0.250", IP_B), b, True),
    ])

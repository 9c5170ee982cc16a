"""Our IPv6 first-hop security filters (README "IPv6 first-hop security") on real bridge ports.

The lab: guest ``a`` (the port under test, vp1), another guest ``b`` and a router ``r`` running
Debian's radvd (SLAAC) and dnsmasq (DHCPv6). Guest ``a``'s kernel does real duplicate address
detection, router solicitation, SLAAC and MLD when its link comes up, and ISC dhclient leases it
a DHCPv6 address; frames that real guests do not send on their own (a rogue RA, a spoofed NA) are
crafted with scapy. Every probe that must be dropped is sent in the same batch, with the same
wait, as a twin that must pass (tests/traffic.py).

Backends: ``no-ipv6-ra`` and ``no-dhcpv6-server`` on both; ``no-nd-spoofing`` (and with it
``clean-traffic-dualstack``) needs the Neighbour Discovery fields only nftables can read, and the
ebiptables backend refuses it with one line naming the rule, changing nothing.
"""

from __future__ import annotations

import pytest

import ipv6lab as v6
import netlab
from bindings_helpers import (  # noqa: F401  (fixtures)
    BCAST, IP_A, IP_B, MAC_A, MAC_B, SPOOF_MAC, Cli, arp_reply, arp_request, backend, cli, dhcp_discover, ip_frame,
    kernel_snapshot, rarp, raw,
)
from traffic import Conn, Probe, check_connections, check_frames, frames

MAC_R = "52:54:00:00:00:fe"
IP_R, IP6_R, IP6_B = "10.0.0.254", "fd00::fe", "fd00::2"
SLAAC_A = v6.eui64(v6.PREFIX, MAC_A)  # fd00::5054:ff:fe00:1
DHCP_A = "fd00::a:1"  # the one address dnsmasq leases
LL_A, LL_B, LL_R = v6.link_local(MAC_A), v6.link_local(MAC_B), v6.link_local(MAC_R)
UNLISTED = "fd00::99"
IPV6_A = [SLAAC_A, DHCP_A]
DUALSTACK = {"IP": IP_A, "IPV6": IPV6_A}


@pytest.fixture
def guests(lab):
    """Guest a (no IPv6 address yet), guest b (fd00::2) and the router r (fd00::fe)."""
    a = lab.add_vm("a", MAC_A, ipv4=f"{IP_A}/24")
    b = lab.add_vm("b", MAC_B, ipv4=f"{IP_B}/24", ipv6=f"{IP6_B}/64")
    r = lab.add_vm("r", MAC_R, ipv4=f"{IP_R}/24", ipv6=f"{IP6_R}/64")
    return a, b, r


def ping_from(vm, source: str, destination: str, timeout: float = 2.0) -> bool:
    return vm.run(["ping", "-n", "-q", "-c", "1", "-W", str(timeout), "-I", source, destination],
                  check=False).returncode == 0


def autoconfigure(a, r, workdir, dhcp: bool = True) -> list[bytes]:
    """Router r advertises fd00::/64 (and leases DHCP_A); guest a's link comes up and its kernel
    configures itself. Returns the frames r received from a meanwhile (DAD, MLD, RS)."""
    v6.start_radvd(r, workdir, managed=dhcp)
    if dhcp:
        v6.start_dhcpv6_server(r, workdir, DHCP_A, DHCP_A)
    prefixes = [bytes.fromhex(mac.replace(":", "")) for mac in ("33:33:ff", v6.MLDV2_MAC, "33:33:00:00:00:02")]
    with netlab.Capture(ns=r.ns, iface=r.iface, prefixes=prefixes) as capture:
        v6.enable_autoconfiguration(a)
        assert v6.wait_for_address(a, SLAAC_A), f"no SLAAC address on a: {v6.addresses(a)}"
        if dhcp:
            lease = v6.dhcpv6_lease(a, workdir)
            assert lease.returncode == 0, f"dhclient -6: {lease.stderr[-800:]}"
            assert v6.wait_for_address(a, DHCP_A), f"DHCPv6 address not usable: {v6.addresses(a)}"
    return [f for f in capture.frames if f[6:12] == bytes.fromhex(MAC_A.replace(":", ""))]


# ----------------------------------------------------------------------------------------------
# clean-traffic-dualstack: a real guest


def test_dualstack_real_guest_slaac_dhcpv6_nd_and_mld(lab, guests, tmp_path):
    """The guest's kernel does DAD, MLD and router solicitation, gets its SLAAC address from a
    real router and its DHCPv6 address from a real server, and talks from both (its own NS/NA
    included); an address it was not given is cut off."""
    a, b, r = guests
    cli = Cli(lab.host_ns, tmp_path, "nftables")
    cli.binding_create(a.port, MAC_A, "clean-traffic-dualstack", DUALSTACK)
    sent = autoconfigure(a, r, tmp_path)
    seen = {(v6.icmpv6_type(f), v6.ipv6_source(f), v6.nd_target(f)) for f in sent}
    assert (135, "::", LL_A) in seen and (135, "::", SLAAC_A) in seen, f"DAD probes did not pass: {seen}"
    assert {(143, "::", None), (143, LL_A, None)} <= seen, f"MLD reports did not pass: {seen}"
    assert (133, LL_A, None) in seen, f"the router solicitation did not pass: {seen}"
    # traffic from each address it was given (its kernel's NS and NA both ways on the way)
    lab.flush_neighbours(r)
    assert ping_from(a, SLAAC_A, IP6_R), "from the SLAAC address"
    assert ping_from(a, DHCP_A, IP6_R), "from the DHCPv6 address"
    assert ping_from(a, "eth0", f"{LL_R}%eth0"), "link-local to link-local"
    lab.flush_neighbours(a)
    assert r.run(["ping", "-n", "-q", "-c", "1", "-W", "2", DHCP_A], check=False).returncode == 0, "r -> a"
    assert lab.ping(a, IP_R), "IPv4"
    # an address it was not given: same ping, same wait, dropped
    a.run(["ip", "-6", "addr", "add", f"{UNLISTED}/64", "dev", "eth0", "nodad"])
    check_connections(lab, [
        Conn("ping from an address not in IPV6", "ping", a, IP6_R, expect=False, source_ip=UNLISTED),
        Conn("ping from the SLAAC address (twin)", "ping", a, IP6_R, expect=True, source_ip=SLAAC_A)])


def test_dualstack_drops_what_a_guest_must_not_send(lab, guests, tmp_path):
    """Crafted frames from guest a, each dropped one next to its passing twin, in one batch."""
    a, b, r = guests
    cli = Cli(lab.host_ns, tmp_path, "nftables")
    cli.binding_create(a.port, MAC_A, "clean-traffic-dualstack", DUALSTACK)
    check_frames(lab, first_hop_probes(a, b, r) + nd_probes(a, b) + source_probes(a, b))
    assert "match the kernel" in cli.run("verify").stdout  # the raw payload matches read back


def first_hop_probes(a, b, r) -> list[Probe]:
    P = Probe
    return [
        P("RA from the guest", a, v6.router_advert(MAC_A, LL_A), b, False),
        P("RA from the router (twin)", r, v6.router_advert(MAC_R, LL_R), b, True),
        P("redirect from the guest", a, v6.redirect(MAC_A, LL_A, MAC_B, IP6_B, LL_A, "2001:db8::1"), b, False),
        P("redirect from the router (twin)", r, v6.redirect(MAC_R, LL_R, MAC_B, IP6_B, LL_R, "2001:db8::1"), b, True),
        P("DHCPv6 Advertise from the guest", a, v6.dhcp6_server_message("advertise", MAC_A, LL_A, MAC_B, LL_B),
          b, False),
        P("DHCPv6 Advertise from the router (twin)", r,
          v6.dhcp6_server_message("advertise", MAC_R, LL_R, MAC_B, LL_B), b, True),
        P("DHCPv6 Reply from the guest", a, v6.dhcp6_server_message("reply", MAC_A, LL_A, MAC_B, LL_B), b, False),
        P("DHCPv6 Reply from the router (twin)", r, v6.dhcp6_server_message("reply", MAC_R, LL_R, MAC_B, LL_B),
          b, True),
        P("DHCPv6 Solicit from the guest (a client)", a, v6.dhcp6_solicit(MAC_A, LL_A), b, True),
        P("router solicitation from the guest", a, v6.router_solicit(MAC_A, LL_A), b, True),
    ]


def nd_probes(a, b) -> list[Probe]:
    """Neighbour Discovery from guest a: its own NS/NA (with or without link-layer option, from
    each of its addresses, DAD) pass; another's target, another MAC, another source do not."""
    P, na, ns = Probe, v6.neighbour_advert, v6.neighbour_solicit
    return [
        P("NA for its SLAAC address", a, na(MAC_A, SLAAC_A, SLAAC_A, tll=MAC_A), b, True),
        P("NA for its DHCPv6 address, from its link-local", a, na(MAC_A, LL_A, DHCP_A, tll=MAC_A), b, True),
        P("NA for its link-local, no option (unicast reply)", a,
          na(MAC_A, LL_A, LL_A, dst=LL_B, dst_mac=MAC_B), b, True),
        P("NA for another guest's address", a, na(MAC_A, SLAAC_A, IP6_B, tll=MAC_A), b, False),
        P("NA for another guest's link-local", a, na(MAC_A, LL_A, LL_B, tll=MAC_A), b, False),
        P("NA whose link-layer option is another MAC", a, na(MAC_A, SLAAC_A, SLAAC_A, tll=SPOOF_MAC), b, False),
        P("NA: another MAC after a nonce option", a,
          na(MAC_A, SLAAC_A, DHCP_A, tll=SPOOF_MAC, options_before=(v6.nonce_option(),)), b, False),
        P("NA: its MAC, then another option (not the exact layout)", a,
          na(MAC_A, DHCP_A, DHCP_A, tll=MAC_A, options_after=(v6.nonce_option(),)), b, False),
        P("NA from an address not given", a, na(MAC_A, UNLISTED, SLAAC_A, tll=MAC_A), b, False),
        P("NA from ::", a, na(MAC_A, "::", SLAAC_A, tll=MAC_A), b, False),
        P("NS from its SLAAC address", a, ns(MAC_A, SLAAC_A, IP6_B, sll=MAC_A), b, True),
        P("NS from its link-local, no option", a, ns(MAC_A, LL_A, LL_B), b, True),
        P("NS whose link-layer option is another MAC", a, ns(MAC_A, DHCP_A, IP6_B, sll=SPOOF_MAC), b, False),
        P("NS from an address not given", a, ns(MAC_A, UNLISTED, IP6_B, sll=MAC_A), b, False),
        P("DAD: NS from :: with a nonce", a, ns(MAC_A, "::", "fd00::77", extra_options=(v6.nonce_option(),)), b, True),
    ]


def source_probes(a, b) -> list[Probe]:
    P = Probe
    return [
        P("UDP from the SLAAC address", a, v6.udp6(MAC_A, MAC_B, SLAAC_A, IP6_B), b, True),
        P("UDP from the DHCPv6 address", a, v6.udp6(MAC_A, MAC_B, DHCP_A, IP6_B), b, True),
        P("UDP from the link-local address", a, v6.udp6(MAC_A, MAC_B, LL_A, LL_B), b, True),
        P("UDP from an address not given", a, v6.udp6(MAC_A, MAC_B, UNLISTED, IP6_B), b, False),
        P("UDP from another link-local", a, v6.udp6(MAC_A, MAC_B, "fe80::99", LL_B), b, False),
        P("echo from ::", a, v6.echo(MAC_A, MAC_B, "::", IP6_B), b, False),
        P("MLDv2 report from ::", a, v6.mld_report(MAC_A, "::", v6.solicited_node(SLAAC_A)), b, True),
        P("MLDv2 report from its link-local", a, v6.mld_report(MAC_A, LL_A, v6.solicited_node(DHCP_A)), b, True),
        P("MLDv2 report from an address not given", a, v6.mld_report(MAC_A, "fe80::99", "ff02::1:ff00:99"), b, False),
        P("IPv6 from another MAC", a, v6.udp6(SPOOF_MAC, MAC_B, SLAAC_A, IP6_B, sport=40001), b, False),
        P("in: UDP to the guest", b, v6.udp6(MAC_B, MAC_A, IP6_B, SLAAC_A), a, True),
        P("in: RA to the guest", b, v6.router_advert(MAC_B, LL_B), a, True),
    ]


def test_dualstack_ipv4_exactly_as_clean_traffic(lab, guests, tmp_path):
    """The same IPv4, ARP, RARP and other-ethertype frames get the same verdicts under
    clean-traffic and under clean-traffic-dualstack (the frames differ by random IDs only)."""
    a, b, r = guests
    cli = Cli(lab.host_ns, tmp_path, "nftables")
    results = {}
    for name, params in (("clean-traffic", {"IP": IP_A}), ("clean-traffic-dualstack", DUALSTACK)):
        cli.binding_create(a.port, MAC_A, name, params)
        results[name] = frames(lab, ipv4_probes(a, b))
        cli.binding_delete(a.port)
    assert results["clean-traffic-dualstack"] == results["clean-traffic"]
    assert any(results["clean-traffic"].values()) and not all(results["clean-traffic"].values())


def ipv4_probes(a, b) -> list[Probe]:
    """Observed under each filter and compared; the three that pass under clean-traffic are
    awaited, as the twins of the others (same senders and receivers)."""
    P = Probe
    return [
        P("own MAC and IP", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, True),
        P("another source IP", a, ip_frame(MAC_A, MAC_B, "10.0.0.9", IP_B, "udp"), b),
        P("another source MAC", a, ip_frame(SPOOF_MAC, MAC_B, IP_A, IP_B), b),
        P("DHCP discover", a, dhcp_discover(MAC_A), b),
        P("ARP request, own", a, arp_request(MAC_A, IP_A, IP_B), b, True),
        P("ARP claiming another IP", a, arp_request(MAC_A, "10.0.0.9", IP_B), b),
        P("ARP claiming another MAC", a, arp_request(MAC_A, IP_A, "10.0.0.78", sha=SPOOF_MAC), b),
        P("RARP announce-self", a, rarp(MAC_A, MAC_A, MAC_A), b),
        P("RARP for another MAC", a, rarp(MAC_A, MAC_B, MAC_B), b),
        P("other ethertype", a, raw(MAC_A, MAC_B, 0x88B5), b),
        P("in: IPv4", b, ip_frame(MAC_B, MAC_A, IP_B, IP_A, "udp"), a, True),
        P("in: ARP reply", b, arp_reply(MAC_B, MAC_A, IP_B, IP_A), a),
        P("in: other ethertype", b, raw(MAC_B, MAC_A, 0x88B6), a),
    ]


# ----------------------------------------------------------------------------------------------
# no-nd-spoofing alone


def test_no_nd_spoofing_alone(lab, guests, tmp_path):
    """Only NS/NA are checked: other IPv6, even from addresses not given, is left alone."""
    a, b, r = guests
    cli = Cli(lab.host_ns, tmp_path, "nftables")
    cli.binding_create(a.port, MAC_A, "no-nd-spoofing", {"IPV6": IPV6_A})
    P = Probe
    check_frames(lab, nd_probes(a, b) + [
        P("UDP from an address not given (not ND)", a, v6.udp6(MAC_A, MAC_B, UNLISTED, IP6_B), b, True),
        P("RA (not ND)", a, v6.router_advert(MAC_A, LL_A), b, True),
    ])


def test_no_nd_spoofing_stable_privacy_link_local_given(lab, guests, tmp_path):
    """A guest whose link-local is not derived from its MAC (stable privacy, random) names it in
    IPV6_LINKLOCAL, which then replaces the derived one."""
    a, b, r = guests
    other_ll = "fe80::1234:5678:9abc:def0"
    cli = Cli(lab.host_ns, tmp_path, "nftables")
    cli.binding_create(a.port, MAC_A, "no-nd-spoofing", {"IPV6": IPV6_A, "IPV6_LINKLOCAL": other_ll})
    na = v6.neighbour_advert
    check_frames(lab, [
        Probe("NA for the given link-local", a, na(MAC_A, other_ll, other_ll, tll=MAC_A), b, True),
        Probe("NA for the derived link-local", a, na(MAC_A, LL_A, LL_A, tll=MAC_A), b, False),
    ])


# ----------------------------------------------------------------------------------------------
# RA guard and DHCPv6 server guard on both backends, with real daemons in the guest


def test_no_ipv6_ra_real_rogue_router(lab, guests, backend, tmp_path):
    """Guest a runs radvd for a prefix of its own: its advertisements leave its namespace (seen
    on its port) but never reach b, whose kernel configures only the real router's prefix."""
    a, b, r = guests
    cli = Cli(lab.host_ns, tmp_path, backend)
    cli.binding_create(a.port, MAC_A, "no-ipv6-ra")
    rogue = bytes.fromhex((v6.ALL_NODES_MAC + MAC_A).replace(":", ""))
    real = bytes.fromhex((v6.ALL_NODES_MAC + MAC_R).replace(":", ""))
    with netlab.Capture(ns=lab.host_ns, iface=a.port, prefixes=[rogue], first=True) as sent, \
            netlab.Capture(ns=b.ns, iface=b.iface, prefixes=[rogue]) as reached, \
            netlab.Capture(ns=b.ns, iface=b.iface, prefixes=[real], first=True) as twin:
        v6.start_radvd(a, tmp_path, prefix=v6.ROGUE_PREFIX)  # b's kernel takes unsolicited RAs
        v6.start_radvd(r, tmp_path)
        assert sent.stop(settle=30) and v6.icmpv6_type(sent.frames[0]) == 134, "the rogue sent no RA"
        assert twin.stop(settle=30), "the real router's RA did not reach b"
        reached.stop(settle=1.0)  # both RAs are out; a bridged frame takes microseconds
    assert not reached.frames, "the rogue RA reached b"
    assert v6.wait_for_address(b, v6.eui64(v6.PREFIX, MAC_B))
    assert not any(addr.startswith("fd99:") for addr in v6.addresses(b)), v6.addresses(b)
    check_frames(lab, first_hop_probes(a, b, r)[:4])  # RA and redirect: the guest's dropped, the router's pass


def test_no_dhcpv6_server_real_rogue_server(lab, guests, backend, tmp_path):
    """Guest a runs dnsmasq as a DHCPv6 server: b's dhclient gets no lease from it in 8 s (an
    allowed server answers within about a second, and a's dnsmasq logs that it did answer), and
    then gets one from the real server in r with the same client (a generous wait: a positive)."""
    a, b, r = guests
    a.run(["ip", "-6", "addr", "add", "fd99::1/64", "dev", "eth0", "nodad"])
    cli = Cli(lab.host_ns, tmp_path, backend)
    cli.binding_create(a.port, MAC_A, "no-dhcpv6-server")
    v6.start_dhcpv6_server(a, tmp_path, "fd99::b:1", "fd99::b:1")
    refused = v6.dhcpv6_lease(b, tmp_path, timeout=8)
    assert refused.returncode != 0 and "fd99::b:1" not in v6.addresses(b), refused.stderr[-500:]
    assert "Advertise message" not in refused.stderr, refused.stderr[-500:]
    assert "DHCPADVERTISE" in (tmp_path / "dnsmasq-a.log").read_text(), "the rogue server never answered"
    v6.start_dhcpv6_server(r, tmp_path, "fd00::b:1", "fd00::b:1")  # the rogue keeps running
    leased = v6.dhcpv6_lease(b, tmp_path, timeout=30)
    assert leased.returncode == 0 and "fd00::b:1" in v6.addresses(b), leased.stderr[-500:]
    check_frames(lab, first_hop_probes(a, b, r)[4:9])  # the guest's Advertise/Reply dropped, its Solicit passes


# ----------------------------------------------------------------------------------------------
# ebiptables: the ND fields are refused, with one line, and nothing changes


@pytest.mark.parametrize("filter_name, params", [("no-nd-spoofing", {"IPV6": IPV6_A}),
                                                 ("clean-traffic-dualstack", DUALSTACK)])
def test_ebiptables_refuses_nd_fields_with_one_line(lab, guests, tmp_path, filter_name, params):
    a, b, r = guests
    cli = Cli(lab.host_ns, tmp_path, "ebiptables")
    cli.binding_create(b.port, MAC_B, "no-ipv6-ra")
    before = kernel_snapshot(lab.host_ns)
    proc = cli.binding_create(a.port, MAC_A, filter_name, params, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert ("filter 'no-nd-spoofing' rule 2: attribute 'nwf:nd-lladdr' cannot be rendered by the "
            "ebiptables backend: ebtables cannot read Neighbour Discovery targets or options") in lines[0]
    assert kernel_snapshot(lab.host_ns) == before
    assert cli.binding_ports() == [b.port]



# ----------------------------------------------------------------------------------------------
# simulate: the offline engine agrees with the kernel on our filters, packet by packet

ND_WORDS = ["out icmpv6 type=136", "out icmpv6 type=136 nwf:nd-lladdr=none", "out icmpv6 type=136 nwf:nd-target=fd00::2",
            "out icmpv6 type=136 nwf:nd-lladdr=52:54:00:99:99:99", "out icmpv6 type=136 srcipaddr=fe80::5054:ff:fe00:1",
            "out icmpv6 type=136 srcipaddr=fd00::99", "out icmpv6 type=135", "out icmpv6 type=135 nwf:nd-lladdr=none",
            "out icmpv6 type=135 srcipaddr=:: dstipaddr=ff02::1:ff00:1 nwf:nd-target=fd00::1",
            "out icmpv6 type=135 nwf:nd-lladdr=52:54:00:99:99:99", "out icmpv6 type=135 srcipaddr=fd00::99",
            "in icmpv6 type=136", "in icmpv6 type=134"]
FIRST_HOP_WORDS = ["out icmpv6 type=134 srcipaddr=fe80::5054:ff:fe00:1 dstipaddr=ff02::1",
                   "out icmpv6 type=137", "out icmpv6 type=133 srcipaddr=fe80::5054:ff:fe00:1 dstipaddr=ff02::2",
                   "out udp-ipv6 srcportstart=547 dstportstart=546", "out udp-ipv6 srcportstart=546 dstportstart=547",
                   "out udp-ipv6", "out udp-ipv6 srcipaddr=fd00::99", "out icmpv6", "in udp-ipv6"]
IPV4_WORDS = ["out udp", "out udp srcipaddr=10.0.0.66", "out arp opcode=Reply", "out arp arpsrcipaddr=10.0.0.9",
              "in tcp dstportstart=22", "out mac protocolid=0x88b5"]


@pytest.mark.parametrize("name, params, words, backends", [
    ("clean-traffic-dualstack", {"IP": ("10.0.0.1",), "IPV6": ("fd00::1",)}, ND_WORDS + FIRST_HOP_WORDS + IPV4_WORDS,
     ("nftables",)),
    ("no-nd-spoofing", {"IPV6": ("fd00::1", "fd00::3")}, ND_WORDS + FIRST_HOP_WORDS, ("nftables",)),
    ("no-ipv6-ra", {}, FIRST_HOP_WORDS + ND_WORDS, ("nftables", "ebiptables")),
    ("no-dhcpv6-server", {}, FIRST_HOP_WORDS, ("nftables", "ebiptables")),
])
def test_simulate_offline_equals_kernel(kernel_env, name, params, words, backends):
    from simdiff import compare, ruleset_of

    packets, problems = compare(ruleset_of(name, params), words, backends)
    assert len(packets) == len(words) and not problems, "\n".join(problems)

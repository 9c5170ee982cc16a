"""IPv6 address learning (issue 15 part 2) with the real kernel and the real service.

The guest ``g`` is bound to ``clean-traffic-dualstack`` with ``IP`` given and no ``IPV6``: its
IPv6 addresses are learned by ``libvirt-nwfilterd``. With a real router (Debian's radvd and
dnsmasq, tests/ipv6lab.py) the guest's kernel does SLAAC and ISC dhclient leases a DHCPv6
address: both are learned (DAD probes, dnsmasq's REPLY from the trusted server); a manual
address (``ip -6 addr add``) is learned from the kernel's DAD; a forged REPLY of another server
teaches nothing; the per-port bound holds under a guest that invents 10,000 addresses. nftables only: ``clean-traffic-dualstack`` needs it (no-nd-spoofing).
Every dropped probe has its passing twin in the same batch.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess

import pytest
from scapy.layers.dhcp6 import DHCP6_Reply, DHCP6OptIA_NA, DHCP6OptIAAddress, DHCP6OptServerId
from scapy.layers.inet import UDP
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6
from scapy.layers.l2 import Ether

import ipv6lab as v6
import netlab
from bindings_helpers import binding_xml, ip_frame, ipv6_udp, wait_until
from libvirt_nwfilter.learning.snoop6 import solicited_node
from service_helpers import Daemon, client_argv, env_for
from traffic import Probe, check_frames

GUEST_MAC, B_MAC, SERVER_MAC = "52:54:00:0d:00:01", "52:54:00:0d:00:02", "52:54:00:0d:00:fe"
IP_G, IP_B = "10.0.0.1", "10.0.0.2"
V6_B, SERVER_LL, ROGUE_LL = "2001:db8::2", "fe80::5054:ff:fe0d:fe", "fe80::bad"
LIMIT = 4
LEARN_TIMEOUT = 30.0


@pytest.fixture
def setup(lab, tmp_path):
    g = lab.add_vm("g", GUEST_MAC, ipv4=f"{IP_G}/24")
    b = lab.add_vm("b", B_MAC, ipv4=f"{IP_B}/24", ipv6=f"{V6_B}/64")
    s = lab.add_vm("s", SERVER_MAC)
    conf, run = tmp_path / "conf", tmp_path / "run"
    conf.mkdir()
    (conf / "libvirt-nwfilter.conf").write_text(f"ipv6-learning-limit = {LIMIT}\n")
    daemon = Daemon(lab.host_ns, conf, run, backend="nftables", options=("--no-libvirt", "--heal-interval", "3600"),
                    log=tmp_path / "service.log").start()
    try:
        yield lab, daemon, g, b, s
    finally:
        daemon.stop()


def nwf(lab, daemon: Daemon, *args: str, input: str = "") -> str:
    done = subprocess.run(client_argv(lab.host_ns, *args), input=input, capture_output=True, text=True, timeout=120,
                          env=env_for(daemon.confdir, daemon.rundir, "nftables"))
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


def learned(lab, daemon, g) -> list[str]:
    return re.findall(r"<nwf:address ip='([^':]*:[^']*)'", nwf(lab, daemon, "binding-dumpxml", g.port))


def wait_learned(lab, daemon, g, expected: list[str]) -> None:
    assert wait_until(lambda: learned(lab, daemon, g) == expected, timeout=LEARN_TIMEOUT, interval=0.2), \
        f"learned {learned(lab, daemon, g)}, expected {expected}:\n{daemon.log_text()[-3000:]}"


def sources(g, b, passing: list[str], dropped: list[str]) -> list[Probe]:
    return [Probe(f"source {address}", g, ipv6_udp(GUEST_MAC, B_MAC, address, V6_B), b, expect)
            for addresses, expect in ((passing, True), (dropped, False)) for address in addresses]


def send(lab, vm, *frames) -> None:
    lab.send_frame(vm, *(bytes(frame) for frame in frames))


def test_dad_teaches_and_dhcpv6_leases_from_the_trusted_server(setup):
    lab, daemon, g, b, s = setup
    nwf(lab, daemon, "binding-create", "-", input=binding_xml(g.port, GUEST_MAC, "clean-traffic-dualstack",
                                                             {"IP": IP_G, "DHCPSERVERV6": SERVER_LL}))
    assert "learn='IPV6' state='learning'" in nwf(lab, daemon, "binding-dumpxml", g.port)
    ipv4 = Probe("IPv4 from its address", g, ip_frame(GUEST_MAC, B_MAC, IP_G, IP_B, "udp"), b, True)
    check_frames(lab, [ipv4, *sources(g, b, [], ["2001:db8::5"])], context="no IPv6 address learned yet")

    netlab.sysctl_in(g.ns, {"net.ipv6.conf.eth0.disable_ipv6": 0, "net.ipv6.conf.eth0.accept_dad": 1})
    g.run(["ip", "-6", "addr", "add", "2001:db8::5/64", "dev", "eth0"])  # the guest kernel's own DAD
    wait_learned(lab, daemon, g, ["2001:db8::5"])
    check_frames(lab, [ipv4, *sources(g, b, ["2001:db8::5"], ["2001:db8::6"])], context="learned from DAD")
    assert f"port {g.port}: learned 2001:db8::5 (IPv6 without end)" in daemon.log_text()

    def reply(src: str, address: str):
        return (Ether(src=SERVER_MAC, dst=GUEST_MAC) / IPv6(src=src, dst="fe80::1") / UDP(sport=547, dport=546)
                / DHCP6_Reply() / DHCP6OptServerId() / DHCP6OptIA_NA(
                    iaid=1, ianaopts=[DHCP6OptIAAddress(addr=address, preflft=300, validlft=600)]))

    send(lab, s, reply(ROGUE_LL, "2001:db8::666"), reply(SERVER_LL, "2001:db8::100"))
    wait_learned(lab, daemon, g, ["2001:db8::5", "2001:db8::100"])
    check_frames(lab, sources(g, b, ["2001:db8::100"], ["2001:db8::666"]), context="leased by the trusted server")
    assert re.search(r"learned 2001:db8::100 \(IPv6 until \d{4}-", daemon.log_text())
    nwf(lab, daemon, "verify")


def test_real_slaac_and_dhcpv6_are_learned(setup, tmp_path):
    lab, daemon, g, b, s = setup
    router_ll = v6.link_local(SERVER_MAC)
    nwf(lab, daemon, "binding-create", "-", input=binding_xml(g.port, GUEST_MAC, "clean-traffic-dualstack",
                                                             {"IP": IP_G, "DHCPSERVERV6": router_ll}))
    s.run(["ip", "-6", "addr", "add", f"{v6.PREFIX}fe/64", "dev", "eth0", "nodad"])
    slaac, leased = v6.eui64(v6.PREFIX, GUEST_MAC), f"{v6.PREFIX}a:1"
    v6.start_radvd(s, tmp_path, managed=True)
    v6.start_dhcpv6_server(s, tmp_path, leased, leased)
    v6.enable_autoconfiguration(g)
    assert v6.wait_for_address(g, slaac), f"no SLAAC address: {v6.addresses(g)}"
    lease = v6.dhcpv6_lease(g, tmp_path)
    assert lease.returncode == 0, f"dhclient -6: {lease.stderr[-800:]}"
    wait_learned(lab, daemon, g, sorted([slaac, leased], key=lambda a: int(ipaddress.IPv6Address(a))))
    b.run(["ip", "-6", "addr", "add", f"{v6.PREFIX}2/64", "dev", "eth0", "nodad"])
    check_frames(lab, [Probe(f"source {a}", g, ipv6_udp(GUEST_MAC, B_MAC, a, f"{v6.PREFIX}2"), b, a != f"{v6.PREFIX}99")
                       for a in (slaac, leased, f"{v6.PREFIX}99")], context="SLAAC and DHCPv6 learned")
    log = daemon.log_text()
    assert f"learned {slaac} (IPv6 without end)" in log and re.search(rf"learned {leased} \(IPv6 until ", log), log

def test_the_bound_holds_under_invented_addresses(setup):
    lab, daemon, g, b, s = setup
    nwf(lab, daemon, "binding-create", "-", input=binding_xml(g.port, GUEST_MAC, "clean-traffic-dualstack",
                                                             {"IP": IP_G}))
    invented = [f"2001:db8::{k:x}:1" for k in range(1, 41)]
    probes = [Ether(src=GUEST_MAC, dst="33:33:ff:00:00:01") / IPv6(src="::", dst=solicited_node(a), hlim=255)
              / ICMPv6ND_NS(tgt=a) for a in invented]
    send(lab, g, *probes)
    flood = [bytes(Ether(src=GUEST_MAC, dst="33:33:ff:00:00:02") / IPv6(src="::", dst=solicited_node(a), hlim=255)
                   / ICMPv6ND_NS(tgt=a)) for a in (f"2001:db8::{k:x}:2" for k in range(10_000))]
    for start in range(0, len(flood), 1000):
        send(lab, g, *flood[start:start + 1000])
    assert len(learned(lab, daemon, g)) <= LIMIT and daemon.proc.poll() is None
    # the guest probes its newest addresses again: sent until the rate limit lets them in
    assert wait_until(lambda: send(lab, g, *probes[-LIMIT:]) or set(learned(lab, daemon, g)) == set(invented[-LIMIT:]),
                      timeout=LEARN_TIMEOUT, interval=1), f"learned {learned(lab, daemon, g)}:\n{daemon.log_text()[-3000:]}"
    check_frames(lab, sources(g, b, [invented[-1]], [invented[0]]), context=f"bound of {LIMIT}")
    assert "the port holds 4 IPv6 addresses: the oldest goes" in daemon.log_text()


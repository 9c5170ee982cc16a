"""The lab itself works: bridging, traffic helpers, frame checks, teardown."""

from __future__ import annotations

import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

import netlab
import traffic
from traffic import Conn, Leaving, Probe

MAC_A = "52:54:00:00:00:01"
MAC_B = "52:54:00:00:00:02"
SPOOFED = "52:54:00:99:99:99"


@pytest.fixture
def pair(lab):
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24", ipv6="fd00::1/64")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24", ipv6="fd00::2/64")
    return lab, a, b


def test_topology(pair):
    lab, a, b = pair
    assert lab.host_ns.startswith(netlab.NS_PREFIX)
    assert {a.ns, b.ns} <= set(netlab.list_namespaces())
    assert (a.port, b.port) == ("vp1", "vp2")
    links = lab.host_run(["ip", "-o", "link", "show", "master", "br0"]).stdout
    assert " vp1@" in links and " vp2@" in links
    mac = a.run(["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    assert mac == MAC_A
    for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
        value = lab.host_run(["cat", f"/proc/sys/net/bridge/{key}"]).stdout.strip()
        assert value == "1", key
    # The root namespace has no lab device.
    root_links = netlab.run(["ip", "-o", "link"]).stdout
    assert " vp1@" not in root_links and " br0:" not in root_links


def test_ping_both_families(pair):
    lab, a, b = pair
    assert lab.ping(a, b.ipv4)
    assert lab.ping(b, a.ipv6)


def test_tcp_and_udp(pair):
    lab, a, b = pair
    assert lab.tcp_connect(a, b.ipv4, 8080)
    assert lab.tcp_connect(b, a.ipv6, 22)
    assert lab.udp_exchange(a, b.ipv4, 5353)


def test_bridge_address_reaches_host(pair):
    lab, a, _ = pair
    lab.set_bridge_address(ipv4="10.0.0.254/24", ipv6="fd00::fe/64")
    assert lab.ping(a, "10.0.0.254")
    assert lab.ping(a, "fd00::fe")
    assert lab.tcp_connect(a, "10.0.0.254", 8081)


def test_spoofed_frame_is_delivered_without_filter(pair):
    lab, a, b = pair
    frame = (Ether(src=SPOOFED, dst=MAC_B) / IP(src="10.9.9.9", dst=b.ipv4) /
             UDP(sport=1234, dport=4321) / Raw(b"spoofed"))
    assert lab.frame_delivered(a, frame, to=b)


def test_frame_checks_are_specific(pair):
    lab, a, b = pair
    arp = lambda pdst: bytes(Ether(src=SPOOFED, dst="ff:ff:ff:ff:ff:ff") /  # noqa: E731
                             ARP(op=1, hwsrc=SPOOFED, psrc="10.0.0.1", pdst=pdst))
    # Broadcast reaches the other VM and the bridge; the sender never receives its own frame.
    traffic.check_frames(lab, [Probe("broadcast to b", a, arp("10.0.0.2"), b, True),
                               Probe("broadcast to the bridge", a, arp("10.0.0.3"), netlab.HOST, True),
                               Probe("broadcast back to a", a, arp("10.0.0.4"), a, False)])
    # A unicast frame to a MAC the bridge learnt on b's port is not delivered to the bridge.
    assert lab.ping(a, b.ipv4)
    ipv6 = lambda data: bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="fd00::1", dst="fd00::2") /  # noqa: E731
                              ICMP() / Raw(data))
    traffic.check_frames(lab, [Probe("unicast to b", a, ipv6(b"b"), b, True),
                               Probe("unicast to b, at the bridge", a, ipv6(b"bridge"), netlab.HOST, False)])


DROP_SPOOFED_TO_B = """
table bridge nwft_probe {{
    chain probe {{
        type filter hook forward priority 0; policy accept;
        oifname "{port}" ether saddr {mac} drop
    }}
}}
"""


def test_dropped_frame_is_reported(pair):
    """A bridge-family nft drop on b's port makes the check say False, next to its twin."""
    lab, a, b = pair
    lab.nft(DROP_SPOOFED_TO_B.format(port=b.port, mac=SPOOFED))
    spoofed = bytes(Ether(src=SPOOFED, dst=MAC_B) / IP(src=a.ipv4, dst=b.ipv4) / ICMP())
    genuine = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=a.ipv4, dst=b.ipv4) / ICMP())
    got = traffic.check_frames(lab, [Probe("spoofed", a, spoofed, b, False), Probe("genuine", a, genuine, b, True)])
    assert got == {"spoofed": False, "genuine": True}
    assert "nwft_probe" not in netlab.run(["nft", "list", "tables"]).stdout


def test_negative_check_without_twin_is_refused(pair):
    lab, a, b = pair
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=a.ipv4, dst=b.ipv4) / ICMP())
    with pytest.raises(traffic.MissingTwin, match="'alone'"):
        traffic.frames(lab, [Probe("alone", a, frame, b, False)])
    with pytest.raises(traffic.MissingTwin, match="'alone'"):
        traffic.connections(lab, [Conn("alone", "tcp", a, b.ipv4, 80, False)])
    # a twin elsewhere (other sender, other receiver) does not count
    with pytest.raises(traffic.MissingTwin):
        traffic.frames(lab, [Probe("alone", a, frame, b, False), Probe("elsewhere", b, frame[::-1], a, True)])


def test_failed_check_whose_twin_failed_is_inconclusive(pair):
    """Everything from a to b dropped: neither the negative nor the observation proves anything."""
    lab, a, b = pair
    lab.nft(DROP_SPOOFED_TO_B.format(port=b.port, mac=MAC_A))
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=a.ipv4, dst=b.ipv4) / ICMP())
    twin = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=a.ipv4, dst=b.ipv4) / ICMP() / Raw(b"twin"))
    probes = [Probe("negative", a, frame, b, False), Probe("twin", a, twin, b, True)]
    with pytest.raises(traffic.Inconclusive, match="negative"):
        traffic.frames(lab, probes, timeout=1.0)
    with pytest.raises(AssertionError, match="twin: expected delivered"):
        traffic.check_frames(lab, probes, timeout=1.0)
    with pytest.raises(traffic.Inconclusive, match="observed"):
        traffic.frames(lab, [Probe("observed", a, frame, b)])


def test_leaving_sees_what_the_bridge_sends_out_of_a_port(pair):
    """A port's egress (as on a guest's tap): the frame to b leaves through b's port; one
    dropped by a rule on that port does not, one to a does not either."""
    lab, a, b = pair
    lab.nft(DROP_SPOOFED_TO_B.format(port=b.port, mac=SPOOFED))
    to_b = bytes(Ether(src=MAC_A, dst=MAC_B, type=0x88B5) / Raw(b"to b"))
    spoofed = bytes(Ether(src=SPOOFED, dst=MAC_B, type=0x88B5) / Raw(b"spoofed"))
    to_a = bytes(Ether(src=MAC_B, dst=MAC_A, type=0x88B5) / Raw(b"to a"))
    assert traffic.check_frames(lab, [Probe("to b", a, to_b, Leaving(b.port), True),
                                      Probe("spoofed", a, spoofed, Leaving(b.port), False),
                                      Probe("to a", b, to_a, Leaving(b.port), False)])


def test_connection_outcomes(pair):
    """Connections of a batch run at once: TCP and UDP listeners answer, ping needs no
    listener, an address nobody has times out."""
    lab, a, b = pair
    got = traffic.check_connections(lab, [
        Conn("tcp", "tcp", a, b.ipv4, 8080, True), Conn("tcp6", "tcp", b, a.ipv6, 22, True),
        Conn("udp", "udp", a, b.ipv4, 5353, True), Conn("ping", "ping", a, b.ipv4, expect=True),
        Conn("ping6", "ping", b, a.ipv6, expect=True), Conn("ping nobody", "ping", a, "10.0.0.77", expect=False),
    ])
    assert got["ping nobody"].outcome == "timeout"


def test_capture_collects_frames(pair):
    lab, a, b = pair
    payload = Ether(src=MAC_A, dst=MAC_B, type=0x88B5) / Raw(b"local experimental ethertype")
    with lab.capture(b, prefixes=[bytes(payload)[:14]]) as cap:
        lab.send_frame(a, payload, payload)
    assert len(cap.frames) == 2
    assert all(Ether(f).type == 0x88B5 for f in cap.frames)


def test_namespaces_are_deleted_on_close(kernel_env):
    lab = netlab.Lab()
    vm = lab.add_vm("x", MAC_A, ipv4="10.0.0.1/24")
    # A process running in the namespace does not keep it alive.
    proc = subprocess.Popen(netlab.ns_argv(vm.ns, ["sleep", "60"]))
    names = {lab.host_ns, vm.ns}
    assert names <= set(netlab.list_namespaces())
    lab.close()
    assert not names & set(netlab.list_namespaces())
    assert proc.wait(timeout=5) != 0
    lab.close()  # idempotent


def test_namespaces_are_deleted_when_a_test_fails(kernel_env):
    names = set()
    with pytest.raises(RuntimeError):
        with netlab.Lab() as lab:
            names |= {lab.host_ns, lab.add_vm("y", MAC_B).ns}
            raise RuntimeError("boom")
    assert not names & set(netlab.list_namespaces())


def test_namespace_names_are_unique(kernel_env):
    with netlab.Lab() as one, netlab.Lab() as two:
        assert one.host_ns != two.host_ns
        assert one.add_vm("a", MAC_A).ns != two.add_vm("a", MAC_A).ns

"""IP address learning with real DHCP, real frames and the real service, on both backends.

The lab: guest ``g`` (port vp1, no address until DHCP gives one), the DHCP server ``s``
(10.0.0.254, Debian's dnsmasq, leases 10.0.0.100-150) and an ordinary VM ``b`` (10.0.0.2) that
receives the probes. ``libvirt-nwfilterd`` runs in the lab's host namespace; bindings are made
through it (binding-create, as an operator would). The guest's DHCP client is ISC dhclient.

Every "dropped" probe has its twin that passes, sent in the same batch (same wait). Lease expiry
is tested with a real short lease here (an ACK of 3 seconds crafted by the test: dnsmasq gives
no lease under two minutes) and with an injected clock in tests/unit/test_learning_snoop.py.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import dhcp_frames as dhcp
import netlab
from bindings_helpers import (BCAST, arp_request, backend, binding_xml, dispatch_entries, ip_frame,  # noqa: F401
                              ipv6_udp, wait_until)
from dhcpd import DhcpServer
from dhcplab import Dhclient
from traffic import Probe, check_frames
from service_helpers import Daemon, client_argv, env_for

GUEST_MAC, B_MAC, SERVER_MAC, ROGUE_MAC = "52:54:00:0c:00:01", "52:54:00:0c:00:02", "52:54:00:0c:00:fe", \
    "52:54:00:0c:00:fd"
SPOOF_MAC = "52:54:00:99:99:99"
IP_B, SERVER, ROGUE = "10.0.0.2", "10.0.0.254", "10.0.0.253"
LEARN_TIMEOUT = 30.0  # generous: the machine is loaded


@dataclass
class Setup:
    lab: netlab.Lab
    backend: str
    tmp: Path
    daemon: Daemon
    g: netlab.VM
    s: netlab.VM
    b: netlab.VM

    def nwf(self, *args: str, input: str = "", check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(client_argv(self.lab.host_ns, *args), input=input, capture_output=True, text=True,
                              env=env_for(self.daemon.confdir, self.daemon.rundir, self.backend), timeout=120)
        assert not check or done.returncode == 0, f"{args}: {done.stderr}"
        return done

    def bind(self, vm: netlab.VM | None = None, **params) -> None:
        vm = vm or self.g
        self.nwf("binding-create", "-", input=binding_xml(vm.port, vm.mac, "clean-traffic", params))

    def learned(self, vm: netlab.VM | None = None) -> list[str]:
        xml = self.nwf("binding-dumpxml", (vm or self.g).port).stdout
        return re.findall(r"<nwf:address ip='([^']+)'", xml)

    def wait_learned(self, expected: list[str], vm: netlab.VM | None = None, timeout: float = LEARN_TIMEOUT) -> None:
        assert wait_until(lambda: self.learned(vm) == expected, timeout=timeout, interval=0.2), \
            f"learned {self.learned(vm)}, expected {expected}; service log:\n{self.log_tail()}"

    def log_tail(self) -> str:
        return "\n".join(line for line in self.daemon.log_text().splitlines() if "request:" not in line)[-4000:]

    def send(self, src: netlab.VM, *frames: bytes) -> None:
        self.lab.send_frame(src, *(frame + bytes(max(0, 60 - len(frame))) for frame in frames))


@pytest.fixture
def setup(lab, backend, tmp_path):
    g = lab.add_vm("g", GUEST_MAC)
    s = lab.add_vm("s", SERVER_MAC, ipv4=f"{SERVER}/24")
    b = lab.add_vm("b", B_MAC, ipv4=f"{IP_B}/24")
    conf, run = tmp_path / "conf", tmp_path / "run"
    conf.mkdir()
    daemon = Daemon(lab.host_ns, conf, run, backend=backend, options=("--no-libvirt", "--heal-interval", "3600"),
                    log=tmp_path / "service.log").start()
    try:
        yield Setup(lab, backend, tmp_path, daemon, g, s, b)
    finally:
        daemon.stop()


@pytest.fixture
def dnsmasq(setup):
    server = DhcpServer(setup.s, setup.tmp / "s", pool=("10.0.0.100", "10.0.0.150"), lease_time="2m").start()
    try:
        yield server
    finally:
        server.stop()


def sources(setup: Setup, passing: list[str], dropped: list[str], vm: netlab.VM | None = None) -> list[Probe]:
    """UDP from the guest to ``b`` with each source address: these pass, those are dropped."""
    vm = vm or setup.g
    return [Probe(f"{vm.name}: source {address}", vm, ip_frame(vm.mac, B_MAC, address, IP_B, "udp"), setup.b, expect)
            for addresses, expect in ((passing, True), (dropped, False)) for address in addresses]


def dhcp_only(setup: Setup) -> list[Probe]:
    """While the guest has no lease: only DHCP, both ways, from the trusted server."""
    g, s, b = setup.g, setup.s, setup.b
    return [Probe("DHCP DISCOVER from the guest", g, dhcp.client(dhcp.DISCOVER, GUEST_MAC), s, True),
            Probe("DHCP OFFER to the guest", s, dhcp.reply(dhcp.OFFER, SERVER_MAC, SERVER, GUEST_MAC, "10.0.0.149"),
                  g, True),
            Probe("IPv4 from the guest", g, ip_frame(GUEST_MAC, B_MAC, "10.0.0.149", IP_B, "udp"), b, False),
            Probe("ARP from the guest", g, arp_request(GUEST_MAC, "10.0.0.149", IP_B), b, False),
            Probe("IPv4 to the guest", b, ip_frame(B_MAC, GUEST_MAC, IP_B, "10.0.0.149", "udp"), g, False)]


# ----------------------------------------------------------------------------------------------
# dhcp


def test_dhcp_lease_second_lease_and_releases(setup, dnsmasq):
    setup.bind(CTRL_IP_LEARNING="dhcp", DHCPSERVER=SERVER)
    assert setup.learned() == [] and "dhcp: learning" in setup.nwf("binding-list").stdout
    check_frames(setup.lab, dhcp_only(setup), context="before the lease: only DHCP")

    first = Dhclient(setup.g, setup.tmp, "first")
    one = first.lease()
    setup.wait_learned([one])
    check_frames(setup.lab, sources(setup, [one], ["10.0.0.151"]), context=f"leased {one}")
    listing = setup.nwf("binding-list").stdout
    assert re.search(rf"dhcp: {re.escape(one)} until \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ", listing), listing
    assert f"port {setup.g.port}: learned {one} (DHCP lease until" in setup.daemon.log_text()
    assert "1 learn their IP address (0 learning, 1 with 1 address(es) learned)" in setup.nwf("status").stdout

    second = Dhclient(setup.g, setup.tmp, "second")
    two = second.lease()
    assert two != one
    setup.wait_learned(sorted([one, two], key=lambda a: int(a.rsplit(".", 1)[1])))
    check_frames(setup.lab, sources(setup, [one, two], ["10.0.0.151"]), context="two leases")

    second.release()
    setup.wait_learned([one])
    check_frames(setup.lab, sources(setup, [one], [two]), context=f"{two} released")
    assert f"dropped {two} (released by the guest)" in setup.daemon.log_text()

    first.release()
    setup.wait_learned([])
    check_frames(setup.lab, dhcp_only(setup) + sources(setup, [], [one]), context="no lease left: DHCP only again")


def test_lease_expiry_removes_the_address(setup):
    setup.bind(CTRL_IP_LEARNING="dhcp", DHCPSERVER=SERVER)
    short, long = "10.0.0.120", "10.0.0.121"
    setup.send(setup.s, dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST_MAC, short, lease=3, dst_mac=GUEST_MAC),
               dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST_MAC, long, lease=3600, dst_mac=GUEST_MAC))
    setup.wait_learned([short, long])
    check_frames(setup.lab, sources(setup, [short, long], ["10.0.0.122"]), context="two leases")
    setup.send(setup.s, dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST_MAC, long, lease=7200, dst_mac=GUEST_MAC))
    setup.daemon.wait_log(f"port {setup.g.port}: renewed {long} (DHCP lease until")
    setup.wait_learned([long], timeout=3 + LEARN_TIMEOUT)
    check_frames(setup.lab, sources(setup, [long], [short]), context=f"the lease of {short} expired")
    assert f"dropped {short} (its lease expired)" in setup.daemon.log_text()


def test_a_rogue_server_is_ignored(setup, dnsmasq):
    rogue = setup.lab.add_vm("r", ROGUE_MAC, ipv4=f"{ROGUE}/24")
    rogue_server = DhcpServer(rogue, setup.tmp / "r", pool=("10.0.0.200", "10.0.0.250"), lease_time="2m").start()
    try:
        setup.bind(CTRL_IP_LEARNING="dhcp", DHCPSERVER=SERVER)
        client = Dhclient(setup.g, setup.tmp)
        leased = client.lease()
        assert 100 <= int(leased.rsplit(".", 1)[1]) <= 150, f"{leased} is not from the trusted server"
        assert wait_until(lambda: "DHCPOFFER" in rogue_server.log(), timeout=10), "the rogue never offered"
        assert f"from {ROGUE}" not in client.output, "a reply of the rogue reached the guest"
        setup.wait_learned([leased])
    finally:
        rogue_server.stop()
    # the full filter lets DHCP replies through now: the learner itself must not believe them
    forged, trusted = "10.0.0.201", "10.0.0.140"
    setup.send(rogue, dhcp.reply(dhcp.ACK, ROGUE_MAC, ROGUE, GUEST_MAC, forged, dst_mac=GUEST_MAC))
    setup.send(setup.s, dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST_MAC, trusted, dst_mac=GUEST_MAC))
    setup.wait_learned(sorted([leased, trusted], key=lambda a: int(a.rsplit(".", 1)[1])))
    assert forged not in setup.learned()


# ----------------------------------------------------------------------------------------------
# any


def test_any_static_guest_and_arp_probe(setup):
    """A static guest's one packet teaches its source; another guest's ARP probe (RFC 5227,
    sender 0.0.0.0) teaches its target."""
    h = setup.lab.add_vm("h", "52:54:00:0c:00:03")
    setup.bind()
    setup.bind(h)
    learning_time = [Probe("IPv4 from 0.0.0.0", setup.g, ip_frame(GUEST_MAC, BCAST, "0.0.0.0", "255.255.255.255",
                                                                   "udp"), setup.b, True),
                     Probe("another source MAC", setup.g, ip_frame(SPOOF_MAC, B_MAC, "10.0.0.1", IP_B, "udp"),
                           setup.b, False),
                     Probe("IPv6", setup.g, ipv6_udp(GUEST_MAC, B_MAC, "fd00::1", "fd00::2"), setup.b, False),
                     Probe("to the guest", setup.b, ip_frame(B_MAC, GUEST_MAC, IP_B, "10.0.0.1", "udp"), setup.g,
                           True)]
    check_frames(setup.lab, learning_time, context="learning (any)")
    assert setup.learned() == [] and setup.learned(h) == []

    setup.send(setup.g, ip_frame(GUEST_MAC, B_MAC, "10.0.0.1", IP_B, "udp"))
    setup.send(h, dhcp.probe(h.mac, "10.0.0.7"))
    setup.wait_learned(["10.0.0.1"])
    setup.wait_learned(["10.0.0.7"], vm=h)
    check_frames(setup.lab, sources(setup, ["10.0.0.1"], ["10.0.0.7"]) + sources(setup, ["10.0.0.7"], ["10.0.0.1"], h)
                 + [Probe("another source MAC", setup.g, ip_frame(SPOOF_MAC, B_MAC, "10.0.0.1", IP_B), setup.b, False)],
                 context="learned")
    log = setup.daemon.log_text()
    assert f"port {setup.g.port}: learned 10.0.0.1 (IPv4 source)" in log and f"port {h.port}: learned 10.0.0.7 (ARP)" in log
    setup.send(setup.g, ip_frame(GUEST_MAC, B_MAC, "10.0.0.9", IP_B, "udp"))  # learning is over: first wins
    time.sleep(1)
    assert setup.learned() == ["10.0.0.1"]


# ----------------------------------------------------------------------------------------------
# The service stopped, restarted, killed


def test_restarted_service_keeps_the_lease(setup, dnsmasq):
    setup.bind(CTRL_IP_LEARNING="dhcp", DHCPSERVER=SERVER)
    leased = Dhclient(setup.g, setup.tmp).lease()
    setup.wait_learned([leased])
    setup.daemon.stop()
    check_frames(setup.lab, sources(setup, [leased], ["10.0.0.151"]), context="service stopped")
    offset = len(setup.daemon.log_text())
    setup.daemon.start()
    setup.daemon.wait_log(f"port {setup.g.port}: learning its IP address (dhcp", start=offset)
    assert setup.learned() == [leased]
    check_frames(setup.lab, sources(setup, [leased], ["10.0.0.151"]), context="service restarted")
    assert setup.nwf("verify").returncode == 0


def _fails_closed(setup: Setup, context: str) -> None:
    assert setup.g.port in dispatch_entries(setup.lab.host_ns, setup.backend), f"{context}: the port is unfiltered"
    check_frames(setup.lab, dhcp_only(setup), context=context)


def test_sigkill_during_learning_fails_closed(setup, dnsmasq):
    seed = int(os.environ.get("NWFT_SEED") or random.SystemRandom().randrange(1 << 30))
    print(f"\nseed {seed} (replay with NWFT_SEED={seed})")
    rng = random.Random(seed)
    setup.bind(CTRL_IP_LEARNING="dhcp", DHCPSERVER=SERVER)
    setup.daemon.kill(signal.SIGKILL)
    setup.daemon.proc.wait(timeout=30)
    _fails_closed(setup, "service killed while learning")
    client = Dhclient(setup.g, setup.tmp)
    leased = client.lease()  # DHCP still passes; nobody learns it
    check_frames(setup.lab, sources(setup, [], [leased]) + dhcp_only(setup)[:1], context="leased, nobody learning")
    client.stop()

    setup.daemon.start()
    setup.daemon.wait_log(f"port {setup.g.port}: learning its IP address (dhcp")
    address = "10.0.0.130"
    setup.send(setup.s, dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST_MAC, address, dst_mac=GUEST_MAC))
    time.sleep(rng.uniform(0.0, 0.6))  # somewhere between the ACK and the applied filter
    setup.daemon.kill(signal.SIGKILL)
    setup.daemon.proc.wait(timeout=30)
    assert setup.g.port in dispatch_entries(setup.lab.host_ns, setup.backend), "killed while applying: unfiltered"
    assert setup.nwf("verify", check=False).returncode == 0  # completes an interrupted change, if any
    learned = setup.learned()
    assert learned in ([], [address])
    if learned:
        check_frames(setup.lab, sources(setup, [address], ["10.0.0.151"]), context="killed after the change")
    else:
        _fails_closed(setup, "killed before the change")


def _malformed(rng: random.Random) -> list[tuple[str, bytes]]:
    """1000 DHCP and ARP frames that must teach nothing: cut, with options that run past their
    end or repeat, a wrong magic cookie, lengths that lie, foreign ARP hardware."""
    ack = dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST_MAC, "10.0.0.77", dst_mac=GUEST_MAC)
    release = dhcp.client(dhcp.RELEASE, GUEST_MAC, "10.0.0.77", ciaddr="10.0.0.77", dst_ip=SERVER,
                          dst_mac=SERVER_MAC)
    probe = dhcp.probe(GUEST_MAC, "10.0.0.78")
    makers = [
        lambda: ("to", ack[:rng.randrange(14, len(ack))]),
        lambda: ("to", dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST_MAC, "10.0.0.77", dst_mac=GUEST_MAC,
                                  opts=dhcp.options(dhcp.ACK, 60, end=False) + bytes([rng.randrange(1, 255), 200]))),
        lambda: ("to", dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST_MAC, "10.0.0.77", dst_mac=GUEST_MAC,
                                  opts=dhcp.options(dhcp.ACK, 60, end=False) + dhcp.options(dhcp.ACK))),
        lambda: ("to", ack.replace(dhcp.MAGIC, bytes(rng.randrange(256) for _ in range(3)) + b"\x00")),
        lambda: ("to", ack[:16] + (len(ack) + rng.randrange(1, 500)).to_bytes(2, "big") + ack[18:]),  # IP length
        lambda: ("to", ack[:38] + (len(ack) + rng.randrange(1, 500)).to_bytes(2, "big") + ack[40:]),  # UDP length
        lambda: ("from", release[:rng.randrange(14, len(release))]),
        lambda: ("from", probe[:18] + bytes([rng.choice([0, 5, 7, 16])]) + probe[19:]),  # hardware address length
        lambda: ("from", probe[:rng.randrange(14, len(probe))]),
    ]
    return [rng.choice(makers)() for _ in range(1000)]


def test_malformed_frames_teach_nothing_and_crash_nothing(setup):
    seed = int(os.environ.get("NWFT_SEED") or random.SystemRandom().randrange(1 << 30))
    print(f"\nseed {seed} (replay with NWFT_SEED={seed})")
    setup.bind(CTRL_IP_LEARNING="dhcp", DHCPSERVER=SERVER)
    frames = _malformed(random.Random(seed))
    for start in range(0, len(frames), 100):  # a burst of 100 every 0.2 s
        batch = frames[start:start + 100]
        setup.send(setup.s, *(frame for way, frame in batch if way == "to"))
        setup.send(setup.g, *(frame for way, frame in batch if way == "from"))
        time.sleep(0.2)
    time.sleep(1)
    log = setup.daemon.log_text()
    assert "internal error" not in log and "watcher process exited" not in log, log[-3000:]
    assert setup.daemon.proc.poll() is None
    assert setup.learned() == []
    assert "could teach an address" in log  # the bursts were rate-limited, and said so
    # the positive twin: one whole ACK, after as long a wait, is learned
    setup.send(setup.s, dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST_MAC, "10.0.0.77", dst_mac=GUEST_MAC))
    setup.wait_learned(["10.0.0.77"])

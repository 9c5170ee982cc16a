"""The learning sockets' kernel filters (learning/bpf.py), run by a small classic-BPF
interpreter: every frame that can teach the port's mode something passes, and the guest's
ordinary traffic does not (the real kernel runs them in tests/kernel/test_learning.py)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import dhcp_frames as dhcp
from bindings_helpers import BCAST, ETH_IPV4, arp_request, ip_frame, ipv6_udp, mac_bytes, vlan_tagged
from libvirt_nwfilter.learning import bpf, snoop, snoop6

GUEST, OTHER = "52:54:00:00:00:01", "52:54:00:00:00:02"
SERVER_MAC, SERVER = "52:54:00:00:00:fe", "10.0.0.254"
MAC = mac_bytes(GUEST)
OUTGOING, HOST = 4, 0


def run(code: bytes, frame: bytes, pkttype: int) -> int:
    """Classic BPF, the instructions learning/bpf.py uses; out-of-bounds loads refuse (as the kernel)."""
    program = [struct.unpack_from("=HBBI", code, i) for i in range(0, len(code), 8)]
    a = x = pc = 0
    while True:
        op, jt, jf, k = program[pc]
        pc += 1

        def load(offset: int, size: int) -> int | None:
            if offset == bpf.SKF_AD_PKTTYPE:
                return pkttype
            if offset + size > len(frame):
                return None
            return int.from_bytes(frame[offset:offset + size], "big")

        if op in (bpf.LD_W_ABS, bpf.LD_H_ABS, bpf.LD_B_ABS, bpf.LD_H_IND):
            size = {bpf.LD_W_ABS: 4, bpf.LD_H_ABS: 2, bpf.LD_B_ABS: 1, bpf.LD_H_IND: 2}[op]
            value = load(k + (x if op == bpf.LD_H_IND else 0), size)
            if value is None:
                return 0
            a = value
        elif op == bpf.LDX_B_MSH:
            if k >= len(frame):
                return 0
            x = (frame[k] & 0x0F) * 4
        elif op == bpf.ALU_AND_K:
            a &= k
        elif op in (bpf.JEQ_K, bpf.JSET_K):
            pc += jt if (a == k if op == bpf.JEQ_K else a & k) else jf
        elif op == bpf.RET_K:
            return k
        else:
            raise AssertionError(f"unexpected instruction {op:#x}")


def passes(mode: str, frame: bytes, to_guest: bool) -> bool:
    return run(bpf.program(mode, MAC), frame, OUTGOING if to_guest else HOST) > 0


def teaches(mode: str, frame: bytes, to_guest: bool) -> bool:
    facts = snoop.inspect(frame, to_guest, MAC)
    if mode == "any":
        return snoop.first_address(facts, ()) is not None
    return any(f.kind in (snoop.ACK, snoop.RELEASE, snoop.DECLINE) for f in facts)


ACK = dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST, "10.0.0.50", lease=600, dst_mac=GUEST, dst_ip="10.0.0.50")
RELEASE = dhcp.client(dhcp.RELEASE, GUEST, src_ip="10.0.0.50", ciaddr="10.0.0.50", dst_ip=SERVER)
SAMPLES = [  # (frame, to the guest)
    (ip_frame(GUEST, OTHER, "10.0.0.5", "10.0.0.2", "tcp"), False),
    (ip_frame(GUEST, OTHER, "0.0.0.0", "10.0.0.2", "udp"), False),
    (ip_frame(GUEST, OTHER, "230.0.0.1", "10.0.0.2"), False),
    (dhcp.probe(GUEST, "10.0.0.7"), False),
    (arp_request(OTHER, "10.0.0.9", "10.0.0.1"), False),
    (dhcp.client(dhcp.DISCOVER, GUEST), False),
    (RELEASE, False),
    (dhcp.client(dhcp.DECLINE, GUEST, requested="10.0.0.51"), False),
    (ACK, True),
    (dhcp.reply(dhcp.OFFER, SERVER_MAC, SERVER, GUEST, "10.0.0.50"), True),
    (dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, OTHER, "10.0.0.50", dst_mac=OTHER), True),
    (ip_frame(OTHER, GUEST, "10.0.0.2", "10.0.0.5", "udp"), True),
    (ipv6_udp(GUEST, OTHER, "fd00::1", "fd00::2"), False),
    (vlan_tagged(GUEST, OTHER, 5, ETH_IPV4, ip_frame(GUEST, OTHER, "10.0.0.5", "10.0.0.2")[14:]), False),
    (vlan_tagged(SERVER_MAC, GUEST, 5, ETH_IPV4, ACK[14:]), True),
]


@pytest.mark.parametrize("mode", ["any", "dhcp"])
def test_every_teaching_frame_passes(mode):
    taught = 0
    for frame, to_guest in SAMPLES:
        if teaches(mode, frame, to_guest):
            taught += 1
            assert passes(mode, frame, to_guest), (mode, frame.hex())
    assert taught >= 4


@pytest.mark.parametrize("mode, frame, to_guest", [
    ("dhcp", ip_frame(GUEST, OTHER, "10.0.0.5", "10.0.0.2", "tcp"), False),
    ("dhcp", dhcp.probe(GUEST, "10.0.0.7"), False),
    ("any", ip_frame(GUEST, OTHER, "0.0.0.0", "10.0.0.2", "udp"), False),
    ("any", ip_frame(GUEST, OTHER, "239.1.1.1", "10.0.0.2", "udp"), False),
    ("any", ip_frame(OTHER, BCAST, "10.0.0.5", "10.0.0.2", "udp"), False),
    ("any", ipv6_udp(GUEST, OTHER, "fd00::1", "fd00::2"), False),
    ("any", ip_frame(OTHER, GUEST, "10.0.0.2", "10.0.0.5", "udp"), True),
    ("dhcp", dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, OTHER, "10.0.0.50", dst_mac=OTHER), True),
    ("dhcp", ACK[:23] + b"\x06" + ACK[24:], True),  # TCP
    ("dhcp", ACK[:20] + b"\x00\x10" + ACK[22:], True),  # a later fragment
], ids=["tcp-from-guest", "arp-probe", "udp-from-0.0.0.0", "udp-from-multicast",
        "udp-not-from-guest", "ipv6-udp", "udp-to-guest", "ack-to-another-mac", "ack-as-tcp",
        "ack-later-fragment"])  # fixed ids: the frames carry random IP ids (pytest-xdist compares)
def test_ordinary_traffic_is_kept_out(mode, frame, to_guest):
    assert not passes(mode, frame, to_guest)


def mutated(data, frame: bytes) -> bytes:
    """``frame`` with up to four bytes changed, then cut anywhere (drawn from ``data``)."""
    changed = bytearray(frame)
    for _ in range(data.draw(st.integers(0, 4))):
        changed[data.draw(st.integers(0, len(changed) - 1))] = data.draw(st.integers(0, 255))
    return bytes(changed[:data.draw(st.integers(0, len(changed)))])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), mode=st.sampled_from(["any", "dhcp"]))
def test_the_filter_never_hides_what_teaches(data, mode):
    frame, to_guest = data.draw(st.sampled_from(SAMPLES))
    frame = mutated(data, frame)
    if teaches(mode, frame, to_guest):
        assert passes(mode, frame, to_guest)


def test_jumps_out_of_range_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        bpf.assemble([bpf.Insn(bpf.JEQ_K, 1, "far"), *[bpf.Insn(bpf.RET_K, 0)] * 300, "far", bpf.Insn(bpf.RET_K, 1)])


# ----------------------------------------------------------------------------------------------
# IPv6 learning (snoop6): DAD probes and DHCPv6


def _ipv6_samples() -> list[tuple[bytes, bool]]:
    from scapy.layers.dhcp6 import DHCP6_Reply, DHCP6OptIA_NA, DHCP6OptIAAddress
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6ND_RA, IPv6, IPv6ExtHdrHopByHop
    from scapy.layers.l2 import Ether

    target = "2001:db8::5"
    group = snoop6.solicited_node(target)
    dad = Ether(src=GUEST, dst="33:33:ff:00:00:05") / IPv6(src="::", dst=group, hlim=255) / ICMPv6ND_NS(tgt=target)
    reply = (Ether(src=SERVER_MAC, dst=GUEST) / IPv6(src="fe80::fe", dst="fe80::1") / UDP(sport=547, dport=546)
             / DHCP6_Reply() / DHCP6OptIA_NA(iaid=1, ianaopts=[DHCP6OptIAAddress(addr="2001:db8::100", preflft=5,
                                                                                 validlft=9)]))
    frames = [(dad, False), (reply, True),
              (Ether(src=GUEST) / IPv6(src="::", dst=group, hlim=255) / IPv6ExtHdrHopByHop() / ICMPv6ND_NS(tgt=target),
               False),
              (Ether(src=GUEST) / IPv6(src="fe80::1", dst=group, hlim=255) / ICMPv6ND_NS(tgt=target), False),
              (Ether(src=GUEST) / IPv6(src="fe80::1", dst="ff02::1", hlim=255) / ICMPv6ND_RA(), False),
              (Ether(src=GUEST) / IPv6(src="2001:db8::5", dst="2001:db8::6") / ICMPv6EchoRequest(), False),
              (Ether(src=OTHER, dst=GUEST) / IPv6(src="2001:db8::6", dst="2001:db8::5") / UDP(sport=1, dport=2), True)]
    return [(bytes(frame), to_guest) for frame, to_guest in frames]


IPV6_SAMPLES = _ipv6_samples()


def passes6(mode: str, frame: bytes, to_guest: bool) -> bool:
    return run(bpf.program(mode, MAC, ipv6=True), frame, OUTGOING if to_guest else HOST) > 0


def teaches6(frame: bytes, to_guest: bool) -> bool:
    return bool(snoop6.inspect6(frame, to_guest, MAC))


@pytest.mark.parametrize("mode", ["any", "dhcp"])
def test_with_ipv6_learning_every_ipv6_teaching_frame_passes_and_ipv4_is_unchanged(mode):
    assert [teaches6(frame, to_guest) for frame, to_guest in IPV6_SAMPLES] == [True, True, True] + [False] * 4
    for frame, to_guest in IPV6_SAMPLES[:3]:
        assert passes6(mode, frame, to_guest) and not passes(mode, frame, to_guest)
    for frame, to_guest in IPV6_SAMPLES[3:]:  # a solicitation from a real address, an RA, ordinary traffic
        assert not passes6(mode, frame, to_guest)
    for frame, to_guest in SAMPLES:
        assert passes6(mode, frame, to_guest) == passes(mode, frame, to_guest) or frame[12:14] == b"\x86\xdd"


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), mode=st.sampled_from(["any", "dhcp"]))
def test_the_ipv6_filter_never_hides_what_teaches(data, mode):
    frame, to_guest = data.draw(st.sampled_from(IPV6_SAMPLES))
    frame = mutated(data, frame)
    if teaches6(frame, to_guest):
        assert passes6(mode, frame, to_guest)

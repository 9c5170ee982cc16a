"""The learning parsers (libvirt_nwfilter/learning/frames.py) and what a frame teaches
(learning/snoop.py ``inspect``): real frame layouts, and anything a guest may send instead --
truncated, oversized, malformed -- fuzzed with hypothesis. Nothing may raise, and a frame that
is not whole teaches nothing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import dhcp_frames as dhcp
from bindings_helpers import BCAST, ETH_IPV4, PROTO_UDP, arp_reply, arp_request, ether, ip_frame, ipv4, mac_bytes, \
    udp, vlan_tagged
from libvirt_nwfilter.learning import frames, snoop

GUEST = "52:54:00:00:00:01"
OTHER = "52:54:00:00:00:02"
SERVER_MAC, SERVER = "52:54:00:00:00:fe", "10.0.0.254"
MAC = mac_bytes(GUEST)


def facts(frame: bytes, to_guest: bool = False) -> list[tuple]:
    return [(f.kind, f.address, f.server, f.lease_time) for f in snoop.inspect(frame, to_guest, MAC)]


# ----------------------------------------------------------------------------------------------
# Layers


def test_ethernet_with_one_and_two_vlan_tags():
    inner = ipv4("10.0.0.1", "10.0.0.2", PROTO_UDP, udp("10.0.0.1", "10.0.0.2", 1, 2))
    one = vlan_tagged(GUEST, OTHER, 10, ETH_IPV4, inner)
    two = one[:12] + struct.pack("!HH", 0x88A8, 20) + one[12:]
    assert frames.ethernet(one).vlans == (10,) and frames.ethernet(one).payload == inner
    assert frames.ethernet(two).vlans == (20, 10) and frames.ethernet(two).ethertype == ETH_IPV4
    three = two[:12] + struct.pack("!HH", 0x8100, 30) + two[12:]
    assert frames.ethernet(three) is None
    assert frames.ethernet(one[:15]) is None  # a tag cut in half


def test_ethernet_length_field_is_not_a_type():
    assert frames.ethernet(ether(BCAST, GUEST, 0x05DC, b"x" * 46)) is None
    assert frames.ethernet(ether(BCAST, GUEST, 0x0600, b"x" * 46)).ethertype == 0x0600


def test_ipv4_lengths_options_and_fragments():
    packet = ipv4("10.0.0.1", "10.0.0.2", PROTO_UDP, b"payload")
    assert frames.ipv4(packet + b"\0" * 10).payload == b"payload"  # Ethernet padding cut
    assert frames.ipv4(packet[:-1]) is None  # total length beyond the data
    with_options = bytes([0x46]) + packet[1:2] + struct.pack("!H", 24 + 7) + packet[4:20] + b"\x01" * 4 + b"payload"
    assert frames.ipv4(with_options).payload == b"payload"
    assert frames.ipv4(bytes([0x44]) + packet[1:]) is None  # header length below 20
    assert frames.ipv4(bytes([0x65]) + packet[1:]) is None  # version 6
    later = packet[:6] + struct.pack("!H", 0x0010) + packet[8:]
    more = packet[:6] + struct.pack("!H", 0x2000) + packet[8:]
    assert frames.ipv4(later).payload == b"" and frames.ipv4(more).payload == b""


def test_udp_length_field_is_respected():
    segment = udp("10.0.0.1", "10.0.0.2", 68, 67, b"data")
    assert frames.udp(segment + b"trailer").payload == b"data"
    assert frames.udp(segment[:-1]) is None
    assert frames.udp(segment[:4] + struct.pack("!H", 7) + segment[6:]) is None


def test_dhcp_options_parsed_and_checked():
    good = dhcp.bootp(2, GUEST, dhcp.options(dhcp.ACK, 600, SERVER, "10.0.0.5"), yiaddr="10.0.0.5")
    message = frames.dhcp(good)
    assert (message.op, message.client_mac, message.yiaddr, message.message_type, message.lease_time,
            message.server_id, message.requested_address) == (2, MAC, "10.0.0.5", dhcp.ACK, 600, SERVER, "10.0.0.5")
    assert frames.dhcp(good[:-1]).message_type == dhcp.ACK  # no END: tolerated
    padded = dhcp.bootp(2, GUEST, b"\0\0\0" + dhcp.options(dhcp.ACK, 600) + b"\xff\x35\x01\x07")
    assert frames.dhcp(padded).message_type == dhcp.ACK  # pads skipped, what follows END ignored
    for bad in (dhcp.options(dhcp.ACK, end=False) + bytes([53, 1, dhcp.NAK, 255]),  # message type twice
                bytes([53, 2, 5, 5, 255]),  # wrong size
                bytes([51, 4, 0, 0]),  # runs past the end
                bytes([12])):  # a code without its length
        assert frames.dhcp(dhcp.bootp(2, GUEST, bad)) is None, bad
    assert frames.dhcp(good.replace(dhcp.MAGIC, b"\x63\x82\x53\x64")) is None
    assert frames.dhcp(dhcp.bootp(2, GUEST, b"\xff", htype=6)).client_mac is None


# ----------------------------------------------------------------------------------------------
# What a frame teaches (libvirt's rules, semantics.md §10, and our documented differences)


def test_ipv4_source_of_the_guest():
    assert facts(ip_frame(GUEST, OTHER, "10.0.0.5", "10.0.0.2", "udp")) == [("IPv4 source", "10.0.0.5", None, None)]
    tagged = vlan_tagged(GUEST, OTHER, 7, ETH_IPV4, ip_frame(GUEST, OTHER, "10.0.0.6", "10.0.0.2")[14:])
    assert facts(tagged) == [("IPv4 source", "10.0.0.6", None, None)]
    for source in ("0.0.0.0", "224.0.0.1", "239.1.2.3", "240.0.0.1", "255.255.255.255"):
        assert facts(ip_frame(GUEST, OTHER, source, "10.0.0.2")) == [], source
    assert facts(ip_frame(OTHER, BCAST, "10.0.0.5", "10.0.0.2")) == []  # another source MAC
    assert facts(ip_frame(OTHER, GUEST, "10.0.0.5", "10.0.0.1"), to_guest=True) == []


def test_arp_claims_of_the_guest():
    assert facts(dhcp.probe(GUEST, "10.0.0.7")) == [("ARP", "10.0.0.7", None, None)]
    assert facts(dhcp.announcement(GUEST, "10.0.0.8")) == [("ARP", "10.0.0.8", None, None)]
    # an ordinary request: the sender's address (libvirt's stated rule would take the target)
    assert facts(arp_request(GUEST, "10.0.0.9", "10.0.0.1")) == [("ARP", "10.0.0.9", None, None)]
    assert facts(arp_reply(GUEST, OTHER, "10.0.0.10", "10.0.0.2")) == [("ARP", "10.0.0.10", None, None)]
    assert facts(dhcp.probe(GUEST, "0.0.0.0")) == []
    assert facts(arp_request(OTHER, "10.0.0.9", "10.0.0.1")) == []


def test_dhcp_replies_to_the_guest():
    offer = dhcp.reply(dhcp.OFFER, SERVER_MAC, SERVER, GUEST, "10.0.0.50", lease=120)
    assert facts(offer, to_guest=True) == [("DHCP OFFER", "10.0.0.50", SERVER, 120)]
    ack = dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST, "10.0.0.50", lease=0xFFFFFFFF, dst_mac=GUEST,
                     dst_ip="10.0.0.50")
    assert facts(ack, to_guest=True) == [("DHCP ACK", "10.0.0.50", SERVER, 0xFFFFFFFF)]
    assert facts(dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, OTHER, "10.0.0.50"), to_guest=True) == []  # chaddr
    assert facts(dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST, "10.0.0.50", dst_mac=OTHER), to_guest=True) == []
    assert facts(dhcp.reply(dhcp.NAK, SERVER_MAC, SERVER, GUEST, "10.0.0.50"), to_guest=True) == []
    assert facts(dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST, "0.0.0.0"), to_guest=True) == []  # INFORM reply
    assert facts(offer) == []  # a reply seen as coming from the guest


def test_dhcp_release_and_decline_from_the_guest():
    release = dhcp.client(dhcp.RELEASE, GUEST, src_ip="10.0.0.50", ciaddr="10.0.0.50", dst_ip=SERVER,
                          dst_mac=SERVER_MAC)
    assert facts(release) == [("IPv4 source", "10.0.0.50", None, None), ("DHCP RELEASE", "10.0.0.50", None, None)]
    decline = dhcp.client(dhcp.DECLINE, GUEST, requested="10.0.0.51")
    assert facts(decline) == [("DHCP DECLINE", "10.0.0.51", None, None)]
    assert facts(dhcp.client(dhcp.DISCOVER, GUEST)) == []
    assert facts(dhcp.client(dhcp.REQUEST, GUEST, requested="10.0.0.51")) == []


# ----------------------------------------------------------------------------------------------
# Anything a guest may send


TEACHING = [
    ("from", ip_frame(GUEST, OTHER, "10.0.0.5", "10.0.0.2", "udp")),
    ("from", dhcp.probe(GUEST, "10.0.0.7")),
    ("from", dhcp.client(dhcp.RELEASE, GUEST, src_ip="10.0.0.50", ciaddr="10.0.0.50", dst_ip=SERVER)),
    ("from", dhcp.client(dhcp.DECLINE, GUEST, requested="10.0.0.51")),
    ("to", dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST, "10.0.0.50", lease=600)),
    ("to", dhcp.reply(dhcp.OFFER, SERVER_MAC, SERVER, GUEST, "10.0.0.50")),
]


@pytest.mark.parametrize("direction, frame", TEACHING, ids=[f"{d}-{i}" for i, (d, _) in enumerate(TEACHING)])
def test_a_frame_cut_anywhere_teaches_nothing(direction, frame):
    assert facts(frame, direction == "to"), "the whole frame teaches"
    for size in range(len(frame)):
        assert facts(frame[:size], direction == "to") == [], f"cut at {size} of {len(frame)}"


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2000), to_guest=st.booleans())
def test_random_bytes_never_raise(data, to_guest):
    for fact in snoop.inspect(data, to_guest, MAC):
        assert snoop.usable(fact.address)


def _mutated(frame: bytes, draw) -> bytes:
    """``frame`` with a few bytes changed, inserted or removed (headers stay plausible)."""
    data = bytearray(frame)
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(("set", "insert", "delete")))
        if action == "set" and where < len(data):
            data[where] = draw(st.integers(0, 255))
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif where < len(data):
            del data[where]
    return bytes(data)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_teaching_frames_never_raise_and_name_only_usable_addresses(data):
    direction, frame = data.draw(st.sampled_from(TEACHING))
    for fact in snoop.inspect(_mutated(frame, data.draw), direction == "to", MAC):
        assert snoop.usable(fact.address)
        assert fact.kind in (snoop.SOURCE, snoop.ARP, snoop.OFFER, snoop.ACK, snoop.RELEASE, snoop.DECLINE)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=40),
       tail=st.binary(max_size=64), end=st.booleans())
def test_arbitrary_dhcp_options(options, tail, end):
    raw = b"".join(bytes([code, len(value)]) + value for code, value in options) + (b"\xff" if end else b"") + tail
    frame = dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST, "10.0.0.50", opts=raw)
    message = frames.dhcp(frames.udp(frames.ipv4(frames.ethernet(frame).payload).payload).payload)
    if message is not None:
        assert message.message_type is None or 0 <= message.message_type <= 255
        assert message.lease_time is None or 0 <= message.lease_time <= 0xFFFFFFFF
    snoop.inspect(frame, True, MAC)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options_size=st.integers(1500, 65000), trailer=st.integers(0, 65535))
def test_oversized_frames(options_size, trailer):
    """Options far beyond an Ethernet MTU, and data after the IPv4 packet (ignored)."""
    opts = dhcp.options(dhcp.ACK, 60, end=False) + b"\0" * options_size + b"\xff"
    frame = dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST, "10.0.0.50", opts=opts) + b"\x01" * trailer
    assert facts(frame, True) == [("DHCP ACK", "10.0.0.50", SERVER, 60)]

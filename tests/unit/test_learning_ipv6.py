"""IPv6 address learning, the pure part (libvirt_nwfilter/learning/frames6.py, snoop6.py):
frames built by scapy (an implementation of the layouts independent of ours), what each teaches,
anything a guest may send instead (fuzzed with hypothesis: nothing raises, a cut frame teaches
nothing), and the per-port bound under a guest that invents 10,000 addresses."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.layers.dhcp6 import (DHCP6_Advertise, DHCP6_Release, DHCP6_Reply, DHCP6OptIA_NA, DHCP6OptIAAddress,
                                DHCP6OptServerId, DHCP6OptStatusCode)
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop)
from scapy.layers.l2 import Ether

from bindings_helpers import mac_bytes
from libvirt_nwfilter.learning import frames6, snoop6
from libvirt_nwfilter.model import Lease

GUEST, OTHER, SERVER_MAC = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:fe"
GUEST_LL, SERVER_LL = "fe80::5054:ff:fe00:1", "fe80::5054:ff:fe00:fe"
MAC = mac_bytes(GUEST)
SLAAC, PRIVACY, LEASED = "2001:db8::5054:ff:fe00:1", "2001:db8::a1b2:c3d4:e5f6:789", "2001:db8::100"


def facts(frame, to_guest: bool = False) -> list[tuple]:
    return [(f.kind, f.address, f.server, f.lease_time) for f in snoop6.inspect6(bytes(frame), to_guest, MAC)]


def dad(target: str, mac: str = GUEST, **changes):
    fields = {"src": "::", "dst": snoop6.solicited_node(target), "hlim": 255, **changes}
    group = "33:33:" + ":".join(f"{b:02x}" for b in ipaddress.IPv6Address(fields["dst"]).packed[-4:])
    return Ether(src=mac, dst=group) / IPv6(**fields) / ICMPv6ND_NS(tgt=target)


def reply(*addresses, valid: int = 3600, preferred: int = 1800, src: str = SERVER_LL, dst_mac: str = GUEST,
          message=DHCP6_Reply, status=None):
    options = [DHCP6OptIAAddress(addr=a, preflft=preferred, validlft=valid) for a in addresses]
    if status is not None:
        options.append(DHCP6OptStatusCode(statuscode=status))
    return (Ether(src=SERVER_MAC, dst=dst_mac) / IPv6(src=src, dst=GUEST_LL) / UDP(sport=547, dport=546)
            / message(trid=7) / DHCP6OptServerId() / DHCP6OptIA_NA(iaid=1, ianaopts=options))


def release(*addresses):
    return (Ether(src=GUEST, dst="33:33:00:01:00:02") / IPv6(src=GUEST_LL, dst="ff02::1:2") / UDP(sport=546, dport=547)
            / DHCP6_Release(trid=8) / DHCP6OptIA_NA(iaid=1, ianaopts=[DHCP6OptIAAddress(addr=a) for a in addresses]))


# ----------------------------------------------------------------------------------------------
# What teaches


def test_a_dad_probe_teaches_its_target():
    assert facts(dad(SLAAC)) == [(snoop6.DAD, SLAAC, None, None)]
    assert facts(dad(PRIVACY)) == [(snoop6.DAD, PRIVACY, None, None)]


@pytest.mark.parametrize("frame, why", [
    (dad(SLAAC, mac=OTHER), "another guest's MAC"),
    (dad(SLAAC, src=GUEST_LL), "not from :: (an ordinary solicitation: resolves someone else's address)"),
    (dad(SLAAC, hlim=64), "hop limit not 255: not from the link"),
    (dad(SLAAC, dst="ff02::1"), "not to the target's solicited-node group"),
    (dad(SLAAC) / ICMPv6NDOptSrcLLAddr(lladdr=GUEST), "a link-layer option, which a probe from :: never has"),
    (dad("fe80::1234"), "link-local: allowed by rule, never learned"),
    (dad("ff0e::1"), "multicast"),
    (dad("::ffff:10.0.0.1"), "IPv4-mapped"),
])
def test_what_is_not_a_dad_probe_teaches_nothing(frame, why):
    assert facts(frame) == [], why


def test_a_dhcpv6_reply_to_the_guest_leases_its_addresses():
    assert facts(reply(LEASED, "2001:db8::101"), to_guest=True) == [
        (snoop6.REPLY6, LEASED, SERVER_LL, 3600), (snoop6.REPLY6, "2001:db8::101", SERVER_LL, 3600)]
    assert facts(reply(LEASED, valid=0, preferred=0), to_guest=True) == [(snoop6.REPLY6, LEASED, SERVER_LL, 0)]


@pytest.mark.parametrize("frame, why", [
    (reply(LEASED, dst_mac=OTHER), "to another guest"),
    (reply(LEASED, message=DHCP6_Advertise), "an ADVERTISE only offers"),
    (reply(LEASED, status=2), "the IA's status is NoAddrsAvail"),
    (reply(LEASED, preferred=7200, valid=3600), "preferred beyond valid: ignored (RFC 8415)"),
])
def test_what_is_not_a_lease_teaches_nothing(frame, why):
    assert facts(frame, to_guest=True) == [], why


def test_a_reply_sent_by_the_guest_teaches_nothing():
    assert facts(Ether(src=GUEST, dst=OTHER) / reply(LEASED)[IPv6]) == []


def test_release_from_the_guest():
    assert facts(release(LEASED)) == [(snoop6.RELEASE6, LEASED, None, None)]


def test_extension_headers_are_skipped_and_fragments_kept_out():
    hop = Ether(src=GUEST) / IPv6(src="::", dst=snoop6.solicited_node(SLAAC), hlim=255) / IPv6ExtHdrHopByHop() \
        / ICMPv6ND_NS(tgt=SLAAC)
    assert facts(hop) == [(snoop6.DAD, SLAAC, None, None)]
    parsed = frames6.ipv6(bytes(hop[IPv6]))
    assert parsed.next_header == frames6.PROTO_ICMPV6
    fragment = Ether(src=GUEST) / IPv6(src="::", dst=snoop6.solicited_node(SLAAC), hlim=255) \
        / IPv6ExtHdrFragment(offset=0, m=1) / ICMPv6ND_NS(tgt=SLAAC)
    assert frames6.ipv6(bytes(fragment[IPv6])).payload == b"" and facts(fragment) == []
    chain = IPv6(src="::", dst="ff02::1")
    for _ in range(frames6.MAX_EXTENSION_HEADERS + 1):
        chain = chain / IPv6ExtHdrHopByHop()
    assert frames6.ipv6(bytes(chain / UDP())) is None


def test_the_payload_length_is_respected():
    packet = bytes(dad(SLAAC)[IPv6])
    assert frames6.ipv6(packet + b"\0" * 20).payload == packet[40:]  # trailing padding cut
    assert frames6.ipv6(packet[:-1]) is None


# ----------------------------------------------------------------------------------------------
# Anything a guest may send instead

TEACHING = [(bytes(dad(SLAAC)), False), (bytes(reply(LEASED)), True), (bytes(release(LEASED)), False)]


@pytest.mark.parametrize("frame, to_guest", TEACHING)
def test_a_frame_cut_anywhere_teaches_nothing(frame, to_guest):
    for size in range(len(frame)):
        assert snoop6.inspect6(frame[:size], to_guest, MAC) == ()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_never_raise(data, to_guest):
    snoop6.inspect6(bytes(Ether(src=GUEST, dst=GUEST, type=0x86DD)) + data, to_guest, MAC)
    snoop6.inspect6(data, to_guest, MAC)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TEACHING), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8))
def test_mutated_teaching_frames_never_raise_and_name_only_usable_addresses(teaching, changes):
    frame, to_guest = teaching
    data = bytearray(frame)
    for index, value in changes:
        data[index % len(data)] = value
    for fact in snoop6.inspect6(bytes(data), to_guest, MAC):
        assert snoop6.usable6(fact.address)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 65535), st.binary(max_size=40)), max_size=10))
def test_arbitrary_dhcpv6_options(options):
    body = b"".join(code.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value for code, value in options)
    message = frames6.dhcpv6(bytes([frames6.REPLY, 0, 0, 7]) + body)
    if all(code != frames6.OPT_IA_NA for code, _ in options):  # whole options around no IA: believed
        assert message is not None and message.message_type == frames6.REPLY and message.addresses == ()


# ----------------------------------------------------------------------------------------------
# The addresses of a port


def test_probes_beyond_the_bound_replace_the_oldest_probed_address():
    port = snoop6.Addresses6(limit=4)
    port.apply([snoop6.Fact(snoop6.REPLY6, LEASED, SERVER_LL, 600)], [SERVER_LL], now=0)
    invented = [f"2001:db8::{k:x}:1" for k in range(10_000)]
    for address in invented:
        port.apply([snoop6.Fact(snoop6.DAD, address)], [], now=0)
        assert len(port.expiry) <= 4
    held = [lease.address for lease in port.leases()]
    assert LEASED in held and set(held) - {LEASED} == set(invented[-3:])  # the lease stays, the newest win


def test_leases_beyond_the_bound_are_refused():
    port = snoop6.Addresses6(limit=2)
    events = port.apply([snoop6.Fact(snoop6.REPLY6, f"2001:db8::{k}", SERVER_LL, 600) for k in range(1, 4)],
                        [], now=0)
    assert [e.what for e in events] == ["learned", "learned", "refused"]
    assert [e.what for e in port.apply([snoop6.Fact(snoop6.DAD, SLAAC)], [], now=0)] == ["refused"]


def test_trusted_servers_lifetimes_release_and_expiry():
    port = snoop6.Addresses6()
    rogue = snoop6.Fact(snoop6.REPLY6, "2001:db8::666", "fe80::bad", 600)
    assert port.apply([rogue], [SERVER_LL], now=0) == []
    port.apply([snoop6.Fact(snoop6.REPLY6, LEASED, SERVER_LL, 600),
                snoop6.Fact(snoop6.REPLY6, "2001:db8::101", SERVER_LL, frames6.INFINITE_LIFETIME),
                snoop6.Fact(snoop6.DAD, SLAAC)], [SERVER_LL], now=100)
    assert port.leases() == (Lease(LEASED, 700), Lease("2001:db8::101"), Lease(SLAAC))
    assert [e.what for e in port.expire(now=700)] == ["expired"]
    assert [e.what for e in port.apply([snoop6.Fact(snoop6.REPLY6, "2001:db8::101", SERVER_LL, 0)], [SERVER_LL],
                                       now=700)] == ["expired"]
    assert [e.what for e in port.apply([snoop6.Fact(snoop6.RELEASE6, SLAAC)], [], now=700)] == ["released"]
    assert port.leases() == () and port.probed == []


def test_a_record_reloaded_keeps_probed_addresses_replaceable():
    port = snoop6.Addresses6([Lease(SLAAC), Lease(LEASED, 700)], limit=2)
    events = port.apply([snoop6.Fact(snoop6.DAD, PRIVACY)], [], now=0)
    assert [(e.what, e.address) for e in events] == [("replaced", SLAAC), ("learned", PRIVACY)]


def test_a_probe_again_makes_an_address_the_newest():
    port = snoop6.Addresses6(limit=2)
    for address in (SLAAC, PRIVACY, SLAAC, LEASED):
        port.apply([snoop6.Fact(snoop6.DAD, address)], [], now=0)
    assert {lease.address for lease in port.leases()} == {SLAAC, LEASED}  # PRIVACY was probed least recently

"""``simulate`` packet descriptions: what the words mean, the one-line errors for bad ones, and
the frames built from them, cross-checked field by field against scapy's dissection."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, STP, Dot1Q, Ether
from scapy.layers.sctp import SCTP

from libvirt_nwfilter.simulate import frames
from libvirt_nwfilter.simulate.packet import Addresses, PacketError, parse_packet, parse_packets, split_packets

ADDR = Addresses("52:54:00:12:34:56", guest_ipv4="10.0.0.5", guest_ipv6="fd00::5")


def one(text: str):
    return parse_packet(text.split(), ADDR)


def mac(value: int) -> str:
    return ":".join(f"{(value >> (8 * (5 - i))) & 0xFF:02x}" for i in range(6))


# ------------------------------------------------------------------------------------------
# Meaning and defaults


def test_out_tcp_defaults_come_from_the_guest_and_a_remote_peer():
    p = one("out tcp dstportstart=22")
    assert (mac(p.src_mac), mac(p.dst_mac)) == ("52:54:00:12:34:56", ADDR.remote_mac)
    assert (ipaddress.IPv4Address(p.ip_src), ipaddress.IPv4Address(p.ip_dst)) == (
        ipaddress.IPv4Address("10.0.0.5"), ipaddress.IPv4Address(ADDR.remote_ipv4))
    assert (p.ip_proto, p.sport, p.dport, p.tcp_flags) == (6, 40000, 22, 0x02)


def test_in_packets_go_to_the_guest_and_established_ones_carry_ack():
    p = one("in tcp srcportstart=22 dstportstart=40000 state=ESTABLISHED")
    assert mac(p.dst_mac) == "52:54:00:12:34:56" and ipaddress.IPv4Address(p.ip_dst) == ipaddress.IPv4Address("10.0.0.5")
    assert (p.tcp_flags, p.state, p.ctdir) == (0x10, "ESTABLISHED", "reply")


def test_broadcast_and_multicast_destinations_get_their_macs():
    assert mac(one("out udp dstipaddr=255.255.255.255").dst_mac) == "ff:ff:ff:ff:ff:ff"
    assert mac(one("out udp dstipaddr=224.0.0.251").dst_mac) == "01:00:5e:00:00:fb"
    assert mac(one("out udp-ipv6 dstipaddr=ff02::1:2").dst_mac) == "33:33:00:01:00:02"


def test_arp_defaults_request_to_broadcast_and_reply_to_the_peer():
    request = one("out arp")
    assert (request.arp_opcode, mac(request.dst_mac), mac(request.arp_sha)) == (1, "ff:ff:ff:ff:ff:ff", "52:54:00:12:34:56")
    reply = one("out arp opcode=Reply arpsrcmacaddr=52:54:00:99:99:99")
    assert (reply.arp_opcode, mac(reply.arp_sha), mac(reply.arp_tha)) == (2, "52:54:00:99:99:99", ADDR.remote_mac)
    assert one("out arp gratuitous=true").arp_tpa == one("out arp").arp_spa


def test_rarp_default_is_qemus_announce_self():
    p = one("out rarp")
    assert (p.arp_opcode, p.arp_sha, p.arp_tha, p.arp_spa, p.arp_tpa) == (3, p.src_mac, p.src_mac, 0, 0)


def test_names_of_the_filter_language_are_accepted():
    assert one("out ip protocol=udp").ip_proto == 17
    assert one("out arp opcode=Reply_Reverse").arp_opcode == 4
    assert one("out mac protocolid=0x88b5").ethertype == 0x88B5
    assert one("out vlan vlanid=10 encap-protocol=arp").vlan_encap == 0x0806
    assert one("out tcp flags=SYN,ACK option=2,8").tcp_options == (2, 8)


def test_packets_split_at_each_direction_word():
    assert split_packets(["out tcp", "dstportstart=22", "in tcp srcportstart=22"]) == [
        ["out", "tcp", "dstportstart=22"], ["in", "tcp", "srcportstart=22"]]
    assert len(parse_packets(["out icmp in icmp type=0 out arp"], ADDR)) == 3


# ------------------------------------------------------------------------------------------
# Bad descriptions: one line, naming the word


@pytest.mark.parametrize("text, word, reason", [
    ("out tcp colour=red", "colour=red", "unknown attribute 'colour'"),
    ("out tcp dstportstart=http", "dstportstart=http", "expected a decimal or hexadecimal number"),
    ("out tcp srcipaddr=fd00::1", "srcipaddr=fd00::1", "IPv4 address"),
    ("out udp srcportend=99", "srcportend=99", "rule attribute"),
    ("out tcp srcipmask=24", "srcipmask=24", "use 'srcipaddr'"),
    ("out icmp dstportstart=22", "dstportstart=22", "no ports"),
    ("out tcp type=8", "type=8", "only icmp, icmpv6 and stp packets have a type"),
    ("out arp srcipaddr=10.0.0.1", "srcipaddr=10.0.0.1", "use arpsrcipaddr"),
    ("out tcp protocol=udp", "protocol=udp", "has protocol 6"),
    ("out ipv6 protocol=icmp", "protocol=icmp", "cannot carry"),
    ("out arp state=NEW", "state=NEW", "only IP packets have a connection state"),
    ("out tcp state=OPEN", "state=OPEN", "expected one of NEW"),
    ("out tcp state=NEW ctdir=reply", "ctdir=reply", "no connection direction"),
    ("out tcp ctdir=reply", "ctdir=reply", "needs state="),
    ("out tcp --from-host", "--from-host", "can only be --to-host"),
    ("out mac protocolid=ipv4", "protocolid=ipv4", "'ip' protocol word"),
    ("out tcp flags=SYN/ACK", "flags=SYN/ACK", "flags set"),
    ("out tcp dstportstart", "dstportstart", "expected name=value"),
    ("out tcp dstportstart=1 dstportstart=2", "dstportstart=2", "given twice"),
    ("out connlimit", "connlimit", "unknown protocol"),
    ("out udp connlimit-above=3", "connlimit-above=3", "rule attribute"),
])
def test_a_bad_description_is_one_line_naming_the_word(text, word, reason):
    with pytest.raises(PacketError) as error:
        one(text)
    message = str(error.value)
    assert "\n" not in message and f"'{word}'" in message and reason in message, message


def test_a_packet_must_start_with_its_direction():
    with pytest.raises(PacketError, match="word 'tcp': a packet starts with its direction"):
        split_packets(["tcp", "dstportstart=22"])


# ------------------------------------------------------------------------------------------
# Frames, dissected by scapy (checksums recomputed by scapy must equal ours)


def _recomputed(layer_class, frame: bytes) -> bytes:
    packet = Ether(frame)
    del packet[layer_class].chksum
    return bytes(Ether(bytes(packet)))


def test_tcp_frame_fields_and_checksums():
    p = one("out tcp srcipaddr=10.0.0.5 dstipaddr=10.0.0.9 srcportstart=1234 dstportstart=22 dscp=46 flags=SYN option=2,8")
    frame = frames.build(p, 7)
    e = Ether(frame)
    assert (e.src, e.dst, e[IP].src, e[IP].dst, e[IP].tos >> 2, e[IP].id) == (
        "52:54:00:12:34:56", ADDR.remote_mac, "10.0.0.5", "10.0.0.9", 46, 7)
    assert (e[TCP].sport, e[TCP].dport, int(e[TCP].flags)) == (1234, 22, 0x02)
    assert [name for name, _ in e[TCP].options][:2] == ["MSS", "Timestamp"]
    assert _recomputed(TCP, frame) == frame and _recomputed(IP, frame) == frame


def test_udp_icmp_sctp_frames_have_the_checksums_scapy_computes():
    udp = frames.build(one("in udp srcportstart=67 dstportstart=68"), 1)
    assert Ether(udp)[UDP].dport == 68 and _recomputed(UDP, udp) == udp
    icmp = frames.build(one("out icmp type=8 code=0"), 2)
    assert Ether(icmp)[ICMP].type == 8 and _recomputed(ICMP, icmp) == icmp
    sctp = frames.build(one("out sctp dstportstart=9"), 3)
    assert Ether(sctp)[SCTP].dport == 9 and _recomputed(SCTP, sctp) == sctp


def test_ipv6_frames():
    frame = frames.build(one("out icmpv6 srcipaddr=fd00::5 dstipaddr=fd00::9"), 5)
    e = Ether(frame)
    assert (e[IPv6].src, e[IPv6].dst, e[IPv6].fl, e[IPv6].nh) == ("fd00::5", "fd00::9", 5, 58)
    assert ICMPv6EchoRequest in e
    packet = Ether(frame)
    del packet[ICMPv6EchoRequest].cksum
    assert bytes(Ether(bytes(packet))) == frame
    udp = frames.build(one("out udp-ipv6 srcportstart=546 dstportstart=547 dstipaddr=ff02::1:2"), 6)
    assert Ether(udp)[UDP].sport == 546 and _recomputed(UDP, udp) == udp


def test_arp_vlan_stp_frames():
    arp = Ether(frames.build(one("out arp opcode=Reply arpsrcipaddr=10.0.0.5 arpdstipaddr=10.0.0.9"), 1))
    assert (arp[ARP].op, arp[ARP].psrc, arp[ARP].pdst, arp[ARP].hwsrc) == (2, "10.0.0.5", "10.0.0.9", "52:54:00:12:34:56")
    tagged = Ether(frames.build(one("out vlan vlanid=42 encap-protocol=0x88b5"), 1))
    assert (tagged[Dot1Q].vlan, tagged[Dot1Q].type) == (42, 0x88B5)
    stp = Ether(frames.build(one("out stp root-priority=4096 root-cost=19 port=0x8002"), 1))
    assert stp.dst == "01:80:c2:00:00:00" and STP in stp
    assert (stp[STP].rootid, stp[STP].pathcost, stp[STP].portid) == (4096, 19, 0x8002)


def test_frames_are_at_least_the_ethernet_minimum():
    assert len(frames.build(one("out mac protocolid=0x88b5"), 1)) == 60

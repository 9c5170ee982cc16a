"""A :class:`~.packet.Packet` as the bytes of a real Ethernet frame (pure).

Ethernet II, 802.1Q, 802.3/LLC with an STP configuration BPDU, ARP/RARP, IPv4 (no options),
IPv6 (no extension headers), TCP (with options), UDP, UDP-Lite, SCTP (one INIT chunk),
ICMP/ICMPv6 (echo layout; Neighbour Solicitation/Advertisement with their target and link-layer
option), IGMPv2, ESP, AH; checksums are correct (the kernel's connection
tracker drops packets with bad ones as INVALID). ``tag`` makes frames of one run unique
without touching a field any rule can match: it goes into the IPv4 identification or IPv6 flow
label and into the payload or padding (never after an SCTP chunk: a second chunk would change
what the tracker thinks of an INIT).
"""

from __future__ import annotations

import struct

from .packet import Packet

ETH_MIN_PAYLOAD = 46
_TCP_OPTION_BODY = {0: b"", 1: b"", 2: b"\x05\xb4", 3: b"\x07", 4: b"", 8: bytes(8)}
_CRC32C_POLY = 0x82F63B78


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as SCTP uses it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mac(value: int) -> bytes:
    return value.to_bytes(6, "big")


def _ip(packet: Packet, value: int) -> bytes:
    return value.to_bytes(4 if packet.family == 4 else 16, "big")


def _pseudo_header(packet: Packet, length: int) -> bytes:
    src, dst = _ip(packet, packet.ip_src), _ip(packet, packet.ip_dst)
    if packet.family == 4:
        return src + dst + struct.pack("!BBH", 0, packet.ip_proto, length)
    return src + dst + struct.pack("!I3xB", length, packet.ip_proto)


def _with_checksum(packet: Packet, segment: bytes, offset: int, zero_as_ffff: bool = False) -> bytes:
    value = checksum(_pseudo_header(packet, len(segment)) + segment)
    if zero_as_ffff and value == 0:
        value = 0xFFFF
    return segment[:offset] + struct.pack("!H", value) + segment[offset + 2:]


def _tcp_options(kinds: tuple[int, ...]) -> bytes:
    data = b""
    for kind in kinds:
        body = _TCP_OPTION_BODY.get(kind, b"")
        data += bytes([kind]) if kind in (0, 1) else bytes([kind, 2 + len(body)]) + body
    return data + bytes(-len(data) % 4)


def _transport(packet: Packet, payload: bytes) -> bytes:
    proto = packet.ip_proto
    if proto == 6:
        options = _tcp_options(packet.tcp_options)
        ack = 1 if packet.tcp_flags & 0x10 else 0
        segment = struct.pack("!HHIIBBHHH", packet.sport, packet.dport, 1000, ack, (5 + len(options) // 4) << 4,
                              packet.tcp_flags, 64240, 0, 0) + options + payload
        return _with_checksum(packet, segment, 16)
    if proto in (17, 136):
        length = 8 + len(payload)
        coverage = length if proto == 17 else 0  # UDP-Lite: 0 = the whole datagram
        segment = struct.pack("!HHHH", packet.sport, packet.dport, coverage, 0) + payload
        return _with_checksum(packet, segment, 6, zero_as_ffff=True)
    if proto == 132:
        init = struct.pack("!BBHIIHHI", 1, 0, 20, 0x4E574653, 65535, 1, 1, 1)
        common = struct.pack("!HHII", packet.sport, packet.dport, 0, 0) + init
        return common[:8] + struct.pack("<I", crc32c(common)) + common[12:]
    if proto == 33:  # DCCP: the ports are all a rule can read
        return struct.pack("!HH", packet.sport, packet.dport) + bytes(12) + payload
    if packet.nd_target is not None:
        return _with_checksum(packet, _neighbour_discovery(packet), 2)
    if packet.icmp_type is not None:
        message = struct.pack("!BBHHH", packet.icmp_type, packet.icmp_code, 0, 1, 1) + payload
        if packet.family == 4:
            return message[:2] + struct.pack("!H", checksum(message)) + message[4:]
        return _with_checksum(packet, message, 2)
    if proto == 2 and packet.family == 4:
        message = struct.pack("!BBH4s", 0x16, 0, 0, _ip(packet, packet.ip_dst)) + payload
        return message[:2] + struct.pack("!H", checksum(message)) + message[4:]
    if proto == 50:
        return struct.pack("!II", 0x100, 1) + payload
    if proto == 51:
        return struct.pack("!BBHII", 59, 4, 0, 0x100, 1) + bytes(12) + payload
    return payload


def _neighbour_discovery(packet: Packet) -> bytes:
    """An NS/NA (RFC 4861 4.3, 4.4; no payload after the options: the tag is in the flow label),
    with its one link-layer address option (source in a solicitation, target in an
    advertisement) unless ``nd_lladdr`` is None."""
    message = struct.pack("!BBHI", packet.icmp_type, packet.icmp_code, 0, 0) + _ip(packet, packet.nd_target)
    if packet.nd_lladdr is not None:
        message += bytes([1 if packet.icmp_type == 135 else 2, 1]) + _mac(packet.nd_lladdr)
    return message


def _ip_packet(packet: Packet, tag: int) -> bytes:
    payload = b"" if packet.ip_proto == 132 else b"nwfs" + tag.to_bytes(4, "big")
    segment = _transport(packet, payload)
    tos = packet.dscp << 2
    if packet.family == 4:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(segment), tag & 0xFFFF, 0, 64,
                             packet.ip_proto, 0, _ip(packet, packet.ip_src), _ip(packet, packet.ip_dst))
        return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + segment
    first = (6 << 28) | (tos << 20) | (tag & 0xFFFFF)
    hop_limit = 255 if packet.ip_proto == 58 else 64
    return struct.pack("!IHBB", first, len(segment), packet.ip_proto, hop_limit) + \
        _ip(packet, packet.ip_src) + _ip(packet, packet.ip_dst) + segment


def _arp(packet: Packet) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", packet.arp_htype, packet.arp_ptype, 6, 4, packet.arp_opcode,
                       _mac(packet.arp_sha), packet.arp_spa.to_bytes(4, "big"), _mac(packet.arp_tha),
                       packet.arp_tpa.to_bytes(4, "big"))


def bpdu(packet: Packet) -> bytes:
    """LLC header and STP BPDU (what follows the 802.3 header)."""
    s = packet.stp
    llc = b"\x42\x42\x03"
    head = struct.pack("!HBB", 0, 0, s.type)
    if s.type == 0x80:  # topology change notification: no body
        return llc + head
    body = struct.pack("!BH6sIH6sHHHHH", s.flags, s.root_priority, _mac(s.root_address), s.root_cost,
                       s.sender_priority, _mac(s.sender_address), s.port, s.age, s.max_age, s.hello_time,
                       s.forward_delay)
    return llc + head + body


def build(packet: Packet, tag: int = 0, pad: bool = True) -> bytes:
    """The frame as it leaves the sender, padded to the Ethernet minimum of 60 bytes unless
    ``pad`` is false (bridge netfilter trims IP packets to their own length in any case)."""
    marker = b"nwfs" + tag.to_bytes(4, "big")
    header = _mac(packet.dst_mac) + _mac(packet.src_mac)
    if packet.family is not None:
        body = struct.pack("!H", packet.ethertype) + _ip_packet(packet, tag)
    elif packet.arp_opcode is not None:
        body = struct.pack("!H", packet.ethertype) + _arp(packet) + marker
    elif packet.stp is not None:
        llc = bpdu(packet)
        body = struct.pack("!H", len(llc)) + llc + marker
    elif packet.vlan_id is not None:
        body = struct.pack("!HHH", 0x8100, packet.vlan_id, packet.vlan_encap) + marker
    else:
        body = struct.pack("!H", packet.ethertype) + marker
    frame = header + body
    return frame + bytes(max(0, 14 + ETH_MIN_PAYLOAD - len(frame))) if pad else frame

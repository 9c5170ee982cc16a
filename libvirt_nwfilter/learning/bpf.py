"""Classic BPF programs for the learning sockets (pure: they are only assembled here).

A learning port's socket (``AF_PACKET``, every protocol, bound to the port) sees every frame
the port receives from the guest and every frame sent to it; the kernel runs the program on
each and hands us only the frames that can teach something, so a guest's ordinary traffic,
or a flood of it, costs no system call:

* from the guest (packet type not OUTGOING) with its own source MAC: ``any`` -- ARP, and IPv4
  from a usable source (not 0.0.0.0 or 224.0.0.0/3); ``dhcp`` -- UDP 68 -> 67 (first fragment);
* to the guest (OUTGOING), to its MAC or to broadcast: IPv4 UDP 67 -> 68 (DHCP replies);
* with IPv6 learning, also: from the guest a Neighbour Solicitation from ``::`` (DAD) and DHCPv6
  546 -> 547; to it DHCPv6 547 -> 546; and IPv6 packets that begin with an extension header
  (rare for these; :mod:`.frames6` skips the headers and decides).

Frames with one in-band VLAN tag are matched inside it (the kernel strips the outer tag of a
received frame before the socket sees it). :func:`program` returns the ``struct sock_filter``
array for ``SO_ATTACH_FILTER``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Instruction classes, sizes, modes and operations (linux/filter.h, linux/bpf_common.h).
LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_H_IND = 0x48
LDX_B_MSH = 0xB1  # X = 4 * (packet[k] & 0x0f)
ALU_AND_K = 0x54
JEQ_K, JSET_K = 0x15, 0x45
RET_K = 0x06
SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # SKF_AD_OFF + SKF_AD_PKTTYPE, as unsigned
PACKET_OUTGOING = 4
ACCEPT, REFUSE = 0x40000, 0
VLAN_TYPES = (0x8100, 0x88A8)
ETHERTYPE_IPV4, ETHERTYPE_ARP, ETHERTYPE_IPV6 = 0x0800, 0x0806, 0x86DD
IPV6_EXTENSION_HEADERS = (0, 43, 44, 60)  # hop-by-hop, routing, fragment, destination options
_INSN = struct.Struct("=HBBI")


@dataclass(frozen=True)
class Insn:
    code: int
    k: int = 0
    jt: str | None = None  # label to go to when the test holds (None: the next instruction)
    jf: str | None = None


def assemble(program: list[Insn | str]) -> bytes:
    """Instructions and labels (strings) -> the ``struct sock_filter`` array. Jumps go
    forward only, at most 255 instructions."""
    labels, position = {}, 0
    for item in program:
        if isinstance(item, str):
            labels[item] = position
        else:
            position += 1
    out, position = [], 0
    for item in program:
        if isinstance(item, str):
            continue
        position += 1

        def offset(label: str | None) -> int:
            distance = 0 if label is None else labels[label] - position
            if not 0 <= distance <= 255:
                raise ValueError(f"jump to {label} out of range ({distance})")
            return distance

        out.append(_INSN.pack(item.code, offset(item.jt), offset(item.jf), item.k & 0xFFFFFFFF))
    return b"".join(out)


def program(mode: str, mac: bytes, ipv6: bool = False) -> bytes:
    """The socket filter of a port learning in ``mode`` (``any``/``dhcp``) for the guest ``mac``;
    with ``ipv6`` also what teaches IPv6 addresses (:mod:`.snoop6`)."""
    high, low = struct.unpack("!IH", mac)
    code: list[Insn | str] = [Insn(LD_W_ABS, SKF_AD_PKTTYPE), Insn(JEQ_K, PACKET_OUTGOING, "to", None),
                              # from the guest: its own source MAC
                              Insn(LD_W_ABS, 6), Insn(JEQ_K, high, None, "refuse"),
                              Insn(LD_H_ABS, 10), Insn(JEQ_K, low, None, "refuse")]
    from_guest = _from_guest_any if mode == "any" else _from_guest_dhcp
    code += _by_tag("from", _or_ipv6("from", from_guest, _from_guest6) if ipv6 else from_guest)
    code += ["to",  # to the guest: its MAC or broadcast
             Insn(LD_W_ABS, 0), Insn(JEQ_K, high, "to-own", None), Insn(JEQ_K, 0xFFFFFFFF, "to-all", "refuse"),
             "to-own", Insn(LD_H_ABS, 4), Insn(JEQ_K, low, "to-type", "refuse"),
             "to-all", Insn(LD_H_ABS, 4), Insn(JEQ_K, 0xFFFF, None, "refuse"),
             "to-type"]
    to_guest = lambda o: _udp(o, 67, 68)  # noqa: E731
    code += _by_tag("to", _or_ipv6("to", to_guest, _to_guest6) if ipv6 else to_guest)
    code += ["accept", Insn(RET_K, ACCEPT), "refuse", Insn(RET_K, REFUSE)]
    return assemble(code)


def _by_tag(name: str, body) -> list[Insn | str]:
    """``body`` for an untagged frame, and again 4 bytes further for one with a VLAN tag."""
    tagged = f"{name}-tagged"
    return [Insn(LD_H_ABS, 12), Insn(JEQ_K, VLAN_TYPES[0], tagged, None), Insn(JEQ_K, VLAN_TYPES[1], tagged, None),
            *body(0), tagged, *body(4)]


def _from_guest_any(o: int) -> list[Insn | str]:
    return [Insn(LD_H_ABS, 12 + o), Insn(JEQ_K, ETHERTYPE_ARP, "accept", None),
            Insn(JEQ_K, ETHERTYPE_IPV4, None, "refuse"),
            Insn(LD_W_ABS, 26 + o), Insn(JEQ_K, 0, "refuse", None),  # source 0.0.0.0
            Insn(ALU_AND_K, 0xE0000000), Insn(JEQ_K, 0xE0000000, "refuse", "accept")]  # 224.0.0.0/3


def _from_guest_dhcp(o: int) -> list[Insn | str]:
    return _udp(o, 68, 67)


def _udp(o: int, sport: int, dport: int) -> list[Insn | str]:
    """IPv4 UDP ``sport`` -> ``dport``, first fragment, the frame's network header at 14 + ``o``."""
    return [Insn(LD_H_ABS, 12 + o), Insn(JEQ_K, ETHERTYPE_IPV4, None, "refuse"),
            Insn(LD_B_ABS, 23 + o), Insn(JEQ_K, 17, None, "refuse"),
            Insn(LD_H_ABS, 20 + o), Insn(JSET_K, 0x1FFF, "refuse", None),  # a later fragment
            Insn(LDX_B_MSH, 14 + o),
            Insn(LD_H_IND, 14 + o), Insn(JEQ_K, sport, None, "refuse"),
            Insn(LD_H_IND, 16 + o), Insn(JEQ_K, dport, "accept", "refuse")]


def _or_ipv6(name: str, ipv4_body, ipv6_body):
    """An IPv6 frame to ``ipv6_body``, any other to ``ipv4_body`` (each ends in a verdict)."""
    def body(o: int) -> list[Insn | str]:
        label = f"{name}-ipv6-{o}"
        return [Insn(LD_H_ABS, 12 + o), Insn(JEQ_K, ETHERTYPE_IPV6, label, None), *ipv4_body(o),
                label, *ipv6_body(name, o)]
    return body


def _ipv6_next(name: str, o: int, icmpv6: bool) -> list[Insn | str]:
    """Dispatch on the IPv6 next header: UDP, ICMPv6 (when ``icmpv6``), and extension headers,
    which the socket passes (the parser skips them; guests rarely put them before these)."""
    return [Insn(LD_B_ABS, 20 + o), Insn(JEQ_K, 17, f"{name}-udp6-{o}", None),
            Insn(JEQ_K, 58, f"{name}-icmp6-{o}" if icmpv6 else "refuse", None),
            *[Insn(JEQ_K, header, "accept", None) for header in IPV6_EXTENSION_HEADERS],
            Insn(RET_K, REFUSE)]


def _from_guest6(name: str, o: int) -> list[Insn | str]:
    """From the guest: a Neighbour Solicitation from :: (DAD), or DHCPv6 546 -> 547."""
    return [*_ipv6_next(name, o, icmpv6=True),
            f"{name}-icmp6-{o}", Insn(LD_B_ABS, 54 + o), Insn(JEQ_K, 135, None, "refuse"),
            *[step for word in range(4) for step in (Insn(LD_W_ABS, 22 + o + 4 * word),
                                                      Insn(JEQ_K, 0, None, "refuse"))],
            Insn(RET_K, ACCEPT),
            f"{name}-udp6-{o}", *_ports6(o, 546, 547)]


def _to_guest6(name: str, o: int) -> list[Insn | str]:
    """To the guest: DHCPv6 547 -> 546."""
    return [*_ipv6_next(name, o, icmpv6=False), f"{name}-udp6-{o}", *_ports6(o, 547, 546)]


def _ports6(o: int, sport: int, dport: int) -> list[Insn | str]:
    return [Insn(LD_H_ABS, 54 + o), Insn(JEQ_K, sport, None, "refuse"),
            Insn(LD_H_ABS, 56 + o), Insn(JEQ_K, dport, "accept", "refuse")]

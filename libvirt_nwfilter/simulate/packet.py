"""Packet descriptions -> :class:`Packet` (pure).

A packet is written ``DIRECTION PROTOCOL [name=value ...] [--to-host | --from-host]``:

* ``DIRECTION``: ``out`` (sent by the guest) or ``in`` (delivered to the guest), as in filters.
* ``PROTOCOL``: a protocol element's name: ``mac``, ``vlan``, ``stp``, ``arp``, ``rarp``, ``ip``,
  ``ipv6``, ``tcp``, ``udp``, ``udplite``, ``esp``, ``ah``, ``sctp``, ``icmp``, ``igmp``, the
  ``-ipv6`` variants and ``icmpv6`` (``all``/``all-ipv6`` mean ``ip``/``ipv6``).
* ``name=value``: nwfilter's attribute names for the header fields the packet has, whichever
  element defines them, with the values filters take (``protocol=udp``, ``opcode=Reply``):
  ``srcmacaddr dstmacaddr protocolid vlanid encap-protocol hwtype protocoltype opcode
  arpsrcmacaddr arpdstmacaddr arpsrcipaddr arpdstipaddr srcipaddr dstipaddr protocol dscp
  srcportstart dstportstart type code flags option`` and the ``stp`` fields. A packet has one
  value per field: ``flags=SYN,ACK`` (the flags set), ``option=2,3`` (the TCP options present).
  An ICMPv6 Neighbour Solicitation or Advertisement (``icmpv6 type=135|136``) also has our
  ``nwf:nd-target`` (default: the remote peer's address for a solicitation from the guest,
  the sender's own otherwise) and ``nwf:nd-lladdr``: a MAC (one link-layer address option, the
  message's kind, holding it; default: the frame's source MAC) or ``none`` (no option; the
  default from ``::``).
  Ranges and masks (``srcportend``, ``srcipmask``...) are rule attributes and refused.
* ``state=NEW|ESTABLISHED|RELATED|INVALID|UNTRACKED`` and ``ctdir=original|reply`` say what the
  connection tracker thinks of the packet; without them it follows from the earlier packets of
  the same run (see ``conntrack``).
* ``--to-host``: an ``out`` packet for the host itself (``HI`` rules instead of ``FI``);
  ``--from-host``: an ``in`` packet the host sends (no L3 rule applies, as in libvirt).

Missing fields get defaults from :class:`Addresses`: the guest's MAC and addresses (from the
binding's ``MAC``, ``IP`` and ``IPV6``), a remote peer and the host; TCP flags ``SYN`` (``ACK``
when ``state`` says the connection exists), ICMP echo requests, ARP requests to broadcast,
RARP as QEMU's announce-self. An ``ip``/``ipv6`` packet without ``protocol=`` carries protocol
253 (reserved for experiments) and no transport header.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..errors import NwfilterError
from ..schema import ND_LLADDR, ND_TARGET, ND_TYPES, PROTOCOLS, decode_uint, parse_literal, tcp_flag_bits

DIRECTIONS = ("out", "in")
BROADCAST = 0xFFFFFFFFFFFF
EXPERIMENTAL_PROTOCOL = 253
PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})  # tcp, udp, dccp, sctp, udplite
ICMP_PROTOCOLS = {4: 1, 6: 58}
STATES = ("NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED")
ETHERTYPE = {"arp": 0x0806, "rarp": 0x8035, "vlan": 0x8100, 4: 0x0800, 6: 0x86DD}

# protocol word -> (IP family or None, transport protocol or None)
WORDS: dict[str, tuple[int | None, int | None]] = {
    "mac": (None, None), "vlan": (None, None), "stp": (None, None), "arp": (None, None),
    "rarp": (None, None), "ip": (4, None), "all": (4, None), "ipv6": (6, None), "all-ipv6": (6, None),
    "tcp": (4, 6), "udp": (4, 17), "udplite": (4, 136), "esp": (4, 50), "ah": (4, 51),
    "sctp": (4, 132), "icmp": (4, 1), "igmp": (4, 2), "tcp-ipv6": (6, 6), "udp-ipv6": (6, 17),
    "udplite-ipv6": (6, 136), "esp-ipv6": (6, 50), "ah-ipv6": (6, 51), "sctp-ipv6": (6, 132),
    "icmpv6": (6, 58),
}
STP_FIELDS = ("type", "flags", "root-priority", "root-address", "root-cost", "sender-priority",
              "sender-address", "port", "age", "max-age", "hello-time", "forward-delay")
_RULE_ONLY = {
    "srcmacmask": "srcmacaddr", "dstmacmask": "dstmacaddr", "srcipmask": "srcipaddr",
    "dstipmask": "dstipaddr", "arpsrcipmask": "arpsrcipaddr", "arpdstipmask": "arpdstipaddr",
    "srcportend": "srcportstart", "dstportend": "dstportstart", "srcipfrom": "srcipaddr",
    "srcipto": "srcipaddr", "dstipfrom": "dstipaddr", "dstipto": "dstipaddr", "typeend": "type",
    "codeend": "code", "root-address-mask": "root-address", "sender-address-mask": "sender-address",
}
_RULE_ONLY.update({f"{name}-hi": name for name in STP_FIELDS})
_NOT_FIELDS = ("connlimit-above", "ipset", "ipsetflags", "comment", "statematch")


class PacketError(NwfilterError):
    """A packet description that cannot be simulated (one line, naming the word)."""


@dataclass(frozen=True)
class Addresses:
    """Defaults for the fields a packet description leaves out."""

    guest_mac: str
    guest_ipv4: str = "192.0.2.2"
    guest_ipv6: str = "2001:db8::2"
    remote_mac: str = "52:54:00:ff:ff:01"
    remote_ipv4: str = "192.0.2.1"
    remote_ipv6: str = "2001:db8::1"
    host_mac: str = "52:54:00:ff:ff:fe"
    host_ipv4: str = "192.0.2.254"
    host_ipv6: str = "2001:db8::fe"


@dataclass(frozen=True)
class Stp:
    """A configuration BPDU (802.1D): the fields nwfilter's ``stp`` element names."""

    type: int = 0
    flags: int = 0
    root_priority: int = 0x8000
    root_address: int = 0x525400000001
    root_cost: int = 0
    sender_priority: int = 0x8000
    sender_address: int = 0x525400000001
    port: int = 0x8001
    age: int = 0
    max_age: int = 20 * 256
    hello_time: int = 2 * 256
    forward_delay: int = 15 * 256


@dataclass(slots=True)
class Packet:
    """One frame and where it goes. Addresses are integers (MAC 48 bits, IPv4 32, IPv6 128)."""

    text: str
    direction: str  # "out" | "in"
    host: bool  # out: addressed to the host itself; in: sent by the host
    protocol: str
    src_mac: int
    dst_mac: int
    ethertype: int  # of the frame (0x8100 when tagged)
    vlan_id: int | None = None
    vlan_encap: int | None = None
    arp_htype: int | None = None
    arp_ptype: int | None = None
    arp_opcode: int | None = None
    arp_sha: int | None = None
    arp_spa: int | None = None
    arp_tha: int | None = None
    arp_tpa: int | None = None
    family: int | None = None  # 4 or 6 for IP packets
    ip_src: int = 0
    ip_dst: int = 0
    ip_proto: int | None = None
    dscp: int = 0
    sport: int | None = None
    dport: int | None = None
    tcp_flags: int = 0
    tcp_options: tuple[int, ...] = ()
    icmp_type: int | None = None
    icmp_code: int | None = None
    stp: Stp | None = None
    nd_target: int | None = None  # Neighbour Solicitation/Advertisement target (None: no ND)
    nd_lladdr: int | None = None  # the one link-layer address option's MAC (None: no option)
    state: str | None = None  # given with state=
    ctdir: str | None = None  # given with ctdir=
    ct_state: str | None = field(default=None, compare=False)  # set while evaluating
    ct_dir: str | None = field(default=None, compare=False)
    ct_key: object = field(default=None, compare=False)


# ------------------------------------------------------------------------------------------
# Words -> packets


def split_packets(words: Iterable[str]) -> list[list[str]]:
    """Group words into packets: a packet starts at each ``in``/``out`` word. A word may hold
    several words separated by blanks (one packet per quoted argument or file line)."""
    tokens = [token for word in words for token in word.split()]
    if not tokens:
        return []
    if tokens[0] not in DIRECTIONS:
        raise PacketError(f"word '{tokens[0]}': a packet starts with its direction, 'out' or 'in'")
    packets: list[list[str]] = []
    for token in tokens:
        if token in DIRECTIONS:
            packets.append([])
        packets[-1].append(token)
    return packets


def parse_packets(words: Iterable[str], addresses: Addresses) -> list[Packet]:
    return [parse_packet(group, addresses) for group in split_packets(words)]


def parse_packet(words: Sequence[str], addresses: Addresses) -> Packet:
    """One packet from its words (``words[0]`` is the direction)."""
    text = " ".join(words)
    if len(words) < 2:
        raise PacketError(f"packet '{text}': the direction must be followed by a protocol "
                          f"({', '.join(WORDS)})")
    direction, word = words[0], words[1]
    if word not in WORDS:
        raise PacketError(f"packet '{text}': word '{word}': unknown protocol (expected one of {', '.join(WORDS)})")
    fields, host = _fields(text, words[2:], direction)
    builder = _Builder(text, direction, host, word, addresses, fields)
    return builder.build()


def _fields(text: str, words: Sequence[str], direction: str) -> tuple[dict[str, tuple[str, str]], bool]:
    fields: dict[str, tuple[str, str]] = {}
    host = False
    for word in words:
        if word in ("--to-host", "--from-host"):
            wanted = "--to-host" if direction == "out" else "--from-host"
            if word != wanted:
                raise PacketError(f"packet '{text}': word '{word}': an '{direction}' packet can only be {wanted}")
            host = True
            continue
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise PacketError(f"packet '{text}': word '{word}': expected name=value")
        if name in fields:
            raise PacketError(f"packet '{text}': word '{word}': '{name}' is given twice")
        fields[name] = (word, value)
    return fields, host


class _Builder:
    """Checks each field against the packet's protocol and fills in the defaults."""

    def __init__(self, text: str, direction: str, host: bool, word: str, addresses: Addresses,
                 fields: dict[str, tuple[str, str]]):
        self.text, self.direction, self.host, self.word = text, direction, host, word
        self.addresses, self.fields, self.used = addresses, fields, set()
        self.family, self.proto = WORDS[word]

    # -- reading fields ---------------------------------------------------------------------
    def fail(self, name: str | None, reason: str) -> PacketError:
        where = f"word '{self.fields[name][0]}'" if name in self.fields else f"'{self.word}'"
        return PacketError(f"packet '{self.text}': {where}: {reason}")

    def raw(self, name: str) -> str | None:
        if name not in self.fields:
            return None
        self.used.add(name)
        return self.fields[name][1]

    def literal(self, name: str, element: str, attribute: str | None = None) -> str | None:
        text = self.raw(name)
        if text is None:
            return None
        try:
            return parse_literal(PROTOCOLS[element].attr(attribute or name), text)
        except ValueError as error:
            raise self.fail(name, str(error)) from None

    def number(self, name: str, element: str, attribute: str | None = None) -> int | None:
        value = self.literal(name, element, attribute)
        return None if value is None else decode_uint(PROTOCOLS[element].attr(attribute or name), value)

    def mac(self, name: str, default: int) -> int:
        value = self.literal(name, "mac", "srcmacaddr")
        return default if value is None else int(value.replace(":", ""), 16)

    def address(self, name: str, family: int, default: str) -> int:
        element = "ip" if family == 4 else "ipv6"
        value = self.literal(name, element, "srcipaddr" if name != ND_TARGET else name)
        return int(ipaddress.ip_address(value if value is not None else default))

    def refuse(self, names: Iterable[str], why: str) -> None:
        for name in names:
            if name in self.fields:
                raise self.fail(name, why)

    # -- building ------------------------------------------------------------------------------
    def build(self) -> Packet:
        for name in self.fields:
            if name in _RULE_ONLY:
                raise self.fail(name, f"'{name}' is a rule attribute (a range or a mask); a packet has one "
                                      f"value: use '{_RULE_ONLY[name]}'")
            if name in _NOT_FIELDS:
                raise self.fail(name, f"'{name}' is a rule attribute, not a field of a packet")
        out = self.direction == "out"
        own = int(self.addresses.guest_mac.replace(":", ""), 16)
        peer = int((self.addresses.host_mac if self.host else self.addresses.remote_mac).replace(":", ""), 16)
        packet = Packet(self.text, self.direction, self.host, self.word, 0, 0, 0)
        if self.word in ("mac", "vlan"):
            self._raw_ethernet(packet)
        elif self.word in ("arp", "rarp"):
            self._arp(packet)
        elif self.word == "stp":
            self._stp(packet)
        else:
            self._ip(packet)
        packet.src_mac = self.mac("srcmacaddr", own if out else peer)
        packet.dst_mac = self.mac("dstmacaddr", self._default_dst_mac(packet, peer if out else own))
        if self.word == "arp" and packet.arp_opcode == 2 and "arpdstmacaddr" not in self.fields:
            packet.arp_tha = packet.dst_mac
        if packet.nd_target is not None:
            self._nd_lladdr(packet)
        if self.word in ("arp", "rarp") and "arpsrcmacaddr" not in self.fields:
            packet.arp_sha = packet.src_mac
            if self.word == "rarp" and "arpdstmacaddr" not in self.fields:
                packet.arp_tha = packet.src_mac
        self._conntrack(packet)
        unused = [name for name in self.fields if name not in self.used]
        if unused:
            raise self.fail(unused[0], self._why_unused(unused[0]))
        return packet

    def _why_unused(self, name: str) -> str:
        where = {"protocolid": "the ethertype is set by the protocol word; use 'mac' for other ethertypes",
                 "vlanid": "only 'vlan' packets carry a VLAN tag", "encap-protocol": "only 'vlan' packets carry a VLAN tag",
                 "srcportstart": "this packet has no ports", "dstportstart": "this packet has no ports",
                 "flags": "only TCP packets have flags", "option": "only TCP packets have options",
                 "code": "only ICMP packets have a type and code", "state": "only IP packets have a connection state",
                 "ctdir": "only IP packets have a connection state"}
        if name in ("srcipaddr", "dstipaddr", "dscp", "protocol"):
            return f"a '{self.word}' packet has no IP header" + ("; use arpsrcipaddr/arpdstipaddr"
                                                                 if self.word in ("arp", "rarp") else "")
        if name.startswith("arp") or name in ("hwtype", "protocoltype", "opcode"):
            return f"only arp and rarp packets have '{name}'"
        if name in (ND_TARGET, ND_LLADDR):
            return f"only icmpv6 neighbour solicitations and advertisements (type=135, 136) have '{name}'"
        if name in STP_FIELDS and self.word != "stp":
            return f"'{name}' is not a field of a '{self.word}' packet" + (
                "" if name != "type" else " (only icmp, icmpv6 and stp packets have a type)")
        return where.get(name, f"unknown attribute '{name}' (see 'simulate --help' for the fields)")

    def _default_dst_mac(self, packet: Packet, peer: int) -> int:
        if self.word == "stp":
            return 0x0180C2000000
        if self.word in ("arp", "rarp") and packet.arp_opcode in (1, 3):
            return BROADCAST
        if packet.family == 4:
            dst = ipaddress.IPv4Address(packet.ip_dst)
            if dst == ipaddress.IPv4Address("255.255.255.255"):
                return BROADCAST
            if dst.is_multicast:
                return 0x01005E000000 | (packet.ip_dst & 0x7FFFFF)
        if packet.family == 6 and packet.ip_dst >> 120 == 0xFF:
            return 0x333300000000 | (packet.ip_dst & 0xFFFFFFFF)
        return peer

    def _raw_ethernet(self, packet: Packet) -> None:
        if self.word == "vlan":
            packet.ethertype = ETHERTYPE["vlan"]
            vid = self.number("vlanid", "vlan")
            encap = self.number("encap-protocol", "vlan")
            packet.vlan_id = 1 if vid is None else vid
            packet.vlan_encap = 0x0800 if encap is None else encap
            return
        ethertype = self.number("protocolid", "mac")
        if ethertype in (0x0800, 0x86DD, 0x0806, 0x8035, 0x8100):
            word = {0x0800: "ip", 0x86DD: "ipv6", 0x0806: "arp", 0x8035: "rarp", 0x8100: "vlan"}[ethertype]
            raise self.fail("protocolid", f"describe this frame with the '{word}' protocol word")
        packet.ethertype = 0x88B5 if ethertype is None else ethertype

    def _arp(self, packet: Packet) -> None:
        """The ARP header; the hardware addresses follow the frame's (see build())."""
        out = self.direction == "out"
        packet.ethertype = ETHERTYPE[self.word]
        opcode = self.number("opcode", "arp")
        packet.arp_opcode = opcode if opcode is not None else (1 if self.word == "arp" else 3)
        htype, ptype = self.number("hwtype", "arp"), self.number("protocoltype", "arp")
        packet.arp_htype = 1 if htype is None else htype
        packet.arp_ptype = 0x0800 if ptype is None else ptype
        rarp = self.word == "rarp"
        own_ip, peer_ip = self.addresses.guest_ipv4, self._peer_ipv4()
        spa_default = "0.0.0.0" if rarp else (own_ip if out else peer_ip)
        tpa_default = "0.0.0.0" if rarp else (peer_ip if out else own_ip)
        packet.arp_spa = int(ipaddress.IPv4Address(self.literal("arpsrcipaddr", "arp") or spa_default))
        gratuitous = self.raw("gratuitous")
        if gratuitous is not None:
            if gratuitous not in ("true", "yes", "1") or "arpdstipaddr" in self.fields:
                raise self.fail("gratuitous", "a packet can only be gratuitous=true (target IP = sender IP), "
                                              "without arpdstipaddr")
            packet.arp_tpa = packet.arp_spa
        else:
            packet.arp_tpa = int(ipaddress.IPv4Address(self.literal("arpdstipaddr", "arp") or tpa_default))
        packet.arp_sha = self.mac("arpsrcmacaddr", 0)
        packet.arp_tha = self.mac("arpdstmacaddr", 0)

    def _stp(self, packet: Packet) -> None:
        values = {}
        for name in STP_FIELDS:
            element_attr = name
            if name in ("root-address", "sender-address"):
                text = self.literal(name, "stp", element_attr)
                if text is not None:
                    values[name.replace("-", "_")] = int(text.replace(":", ""), 16)
                continue
            number = self.number(name, "stp", element_attr)
            if number is not None:
                values[name.replace("-", "_")] = number
        packet.stp = Stp(**values)
        # an 802.3 frame: where the ethertype would be, the length of LLC header + BPDU
        packet.ethertype = 7 if packet.stp.type == 0x80 else 38

    def _peer_ipv4(self) -> str:
        return self.addresses.host_ipv4 if self.host else self.addresses.remote_ipv4

    def _ip(self, packet: Packet) -> None:
        family = self.family
        out = self.direction == "out"
        a = self.addresses
        own = a.guest_ipv4 if family == 4 else a.guest_ipv6
        peer = (a.host_ipv4 if self.host else a.remote_ipv4) if family == 4 else (a.host_ipv6 if self.host else a.remote_ipv6)
        packet.family = family
        packet.ethertype = ETHERTYPE[family]
        packet.ip_src = self.address("srcipaddr", family, own if out else peer)
        packet.ip_dst = self.address("dstipaddr", family, peer if out else own)
        dscp = self.number("dscp", "ip")
        packet.dscp = dscp or 0
        given = self.number("protocol", "ip")
        if given is not None and self.proto is not None and given != self.proto:
            raise self.fail("protocol", f"a '{self.word}' packet has protocol {self.proto}")
        proto = self.proto if self.proto is not None else (given if given is not None else EXPERIMENTAL_PROTOCOL)
        if proto == ICMP_PROTOCOLS[4 if family == 6 else 6]:
            raise self.fail("protocol", f"IPv{family} packets cannot carry "
                                        f"{'ICMPv6' if family == 4 else 'ICMP for IPv4'}; use "
                                        f"{'icmp' if family == 4 else 'icmpv6'}")
        packet.ip_proto = proto
        if proto in PORT_PROTOCOLS:
            sport, dport = self.number("srcportstart", "tcp"), self.number("dstportstart", "tcp")
            packet.sport = 40000 if sport is None else sport
            packet.dport = (53 if proto == 17 else 80) if dport is None else dport
        if proto == 6:
            self._tcp(packet)
        if proto == ICMP_PROTOCOLS[family]:
            itype, code = self.number("type", "icmp"), self.number("code", "icmp")
            packet.icmp_type = (8 if family == 4 else 128) if itype is None else itype
            packet.icmp_code = 0 if code is None else code
            if family == 6 and packet.icmp_type in ND_TYPES:
                self._nd_target(packet, own, peer)

    def _nd_target(self, packet: Packet, own: str, peer: str) -> None:
        """A solicitation asks about the other side; an advertisement speaks for its sender."""
        out = self.direction == "out"
        asks_peer = packet.icmp_type == ND_TYPES[0]
        default = (peer if out else own) if asks_peer else (own if out else peer)
        packet.nd_target = self.address(ND_TARGET, 6, default)

    def _nd_lladdr(self, packet: Packet) -> None:
        value = self.literal(ND_LLADDR, "ipv6")
        if value is None:
            packet.nd_lladdr = None if packet.ip_src == 0 else packet.src_mac
        else:
            packet.nd_lladdr = None if value == "none" else int(value.replace(":", ""), 16)

    def _tcp(self, packet: Packet) -> None:
        flags = self.raw("flags")
        state = (self.fields.get("state") or ("", ""))[1].upper()
        if flags is None:
            packet.tcp_flags = 0x02 if state in ("", "NEW") else 0x10
        else:
            try:
                packet.tcp_flags = tcp_flag_bits(flags)
            except ValueError:
                raise self.fail("flags", "expected the flags set, a comma list of SYN, ACK, FIN, RST, PSH, URG "
                                         "(or NONE, ALL)") from None
        options = self.raw("option")
        if options is not None:
            kinds = []
            for item in options.split(","):
                if not item.isdigit() or int(item) > 255:
                    raise self.fail("option", "expected TCP option kinds (numbers 0..255), comma-separated")
                kinds.append(int(item))
            packet.tcp_options = tuple(kinds)

    def _conntrack(self, packet: Packet) -> None:
        if packet.family is None:
            return  # state= and ctdir= stay unused: refused by build()
        state, ctdir = self.raw("state"), self.raw("ctdir")
        if state is not None:
            if state.upper() not in STATES:
                raise self.fail("state", f"expected one of {', '.join(STATES)}")
            packet.state = state.upper()
        if ctdir is not None:
            if ctdir.lower() not in ("original", "reply"):
                raise self.fail("ctdir", "expected original or reply")
            if packet.state is None:
                raise self.fail("ctdir", "ctdir needs state= (without it the state follows from earlier packets)")
            if packet.state in ("NEW", "INVALID", "UNTRACKED"):
                raise self.fail("ctdir", f"a {packet.state} packet has no connection direction")
            packet.ctdir = ctdir.lower()
        elif packet.state in ("ESTABLISHED", "RELATED"):
            packet.ctdir = "reply"


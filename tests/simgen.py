"""Generated filters and packets for the ``simulate`` tests (offline fuzzing and the kernel
differential test).

* :func:`filter_trees` — a hypothesis strategy for a filter tree: a root filter whose rules use
  every L2 and L3 element the nftables backend can render (no STP fields, ipsets, gratuitous
  ARP; no connlimit, whose counts depend on kernel timing), every action and direction, random
  priorities, ``match='no'``, ``statematch``, ``state``, and references to sub-chain filters.
* :func:`packet_words` — packets for a compiled ruleset, as the words an operator writes:
  field values come from the rules themselves (each value, its neighbours, masked variants) and
  from the guest/remote/host defaults, so most rules are hit and missed. A third of the packets
  answer an earlier one (a conversation: the connection tracker's states matter). Packets are
  kept to what the kernel and the offline tracker agree on by construction: ``--to-host``
  packets go to a host address from a proper source; TCP packets of a new connection get a
  fresh port pair; packets the host sends open no connection later packets could meet.

Everything is driven by a ``random.Random(seed)``: a failing case names its seed and replays.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

from hypothesis import strategies as st

from libvirt_nwfilter.ir import Cond, Field, IcmpType, Icmpv6Range, IpNet, IpRange, Jump, MacMatch, NumRange, PortRuleset
from libvirt_nwfilter.simulate.packet import Addresses

GUEST_MAC = "52:54:00:00:00:01"
ADDRESSES = Addresses(GUEST_MAC, guest_ipv4="10.0.0.1", guest_ipv6="fd00::1")
MACS = ("52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:99:99:99", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:fb",
        "52:54:00:ff:ff:01")
IPV4 = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.0", "0.0.0.0", "192.0.2.1", "255.255.255.255", "224.0.0.251",
        "10.0.1.7")
IPV6 = ("fd00::1", "fd00::2", "fe80::1", "2001:db8::1", "ff02::1:2", "fd00::ffff")
PORTS = (22, 53, 67, 68, 80, 443, 546, 547, 1024, 40000, 65535)


# ------------------------------------------------------------------------------------------
# Filters


def _attr(name: str, values) -> st.SearchStrategy:
    return st.tuples(st.just(name), st.sampled_from(values))


_MAC_ATTRS = [_attr("srcmacaddr", MACS), _attr("dstmacaddr", MACS),
              _attr("srcmacmask", ("ff:ff:ff:00:00:00", "ff:ff:ff:ff:ff:ff"))]
_IP4_ATTRS = [_attr("srcipaddr", IPV4), _attr("dstipaddr", IPV4), _attr("srcipmask", ("8", "24", "32")),
              _attr("dscp", ("0", "10", "46"))]
_IP6_ATTRS = [_attr("srcipaddr", IPV6), _attr("dstipaddr", IPV6), _attr("srcipmask", ("10", "64", "128"))]
_PORT_ATTRS = [_attr("srcportstart", PORTS), _attr("dstportstart", PORTS), _attr("dstportend", (1000, 60000))]
_ELEMENTS = {
    "mac": _MAC_ATTRS + [_attr("protocolid", ("arp", "ipv4", "ipv6", "0x88b5", "0x0835"))],
    "vlan": _MAC_ATTRS + [_attr("vlanid", ("1", "10", "4094")), _attr("encap-protocol", ("arp", "ipv4", "0x88b5"))],
    "arp": _MAC_ATTRS + [_attr("opcode", ("Request", "Reply", "1", "2")), _attr("hwtype", ("1", "6")),
                         _attr("protocoltype", ("0x0800", "0x86dd")), _attr("arpsrcmacaddr", MACS),
                         _attr("arpdstmacaddr", MACS), _attr("arpsrcipaddr", IPV4), _attr("arpdstipaddr", IPV4),
                         _attr("arpsrcipmask", ("24", "32"))],
    "rarp": _MAC_ATTRS + [_attr("opcode", ("Request_Reverse", "Reply_Reverse")), _attr("arpsrcmacaddr", MACS)],
    "ip": _MAC_ATTRS + _IP4_ATTRS + [_attr("protocol", ("tcp", "udp", "icmp", "17"))] + _PORT_ATTRS,
    "ipv6": _MAC_ATTRS + _IP6_ATTRS + [_attr("protocol", ("tcp", "udp", "icmpv6"))] + _PORT_ATTRS
    + [_attr("type", ("128", "135", "1")), _attr("code", ("0", "1"))],
    "stp": [_attr("srcmacaddr", MACS)],
    "tcp": _IP4_ATTRS + _PORT_ATTRS + [_attr("srcmacaddr", MACS), _attr("flags", ("SYN/SYN", "SYN,ACK/SYN,ACK", "ALL/NONE")),
                                       _attr("option", ("2", "8")), _attr("srcipfrom", ("10.0.0.1",)),
                                       _attr("srcipto", ("10.0.0.9",))],
    "udp": _IP4_ATTRS + _PORT_ATTRS + [_attr("srcmacaddr", MACS)],
    "icmp": _IP4_ATTRS + [_attr("type", ("8", "0", "3", "255")), _attr("code", ("0", "1"))],
    "igmp": _IP4_ATTRS, "esp": _IP4_ATTRS, "ah": _IP4_ATTRS, "udplite": _IP4_ATTRS,
    "sctp": _IP4_ATTRS + _PORT_ATTRS,
    "all": _IP4_ATTRS + [_attr("srcmacaddr", MACS)],
    "tcp-ipv6": _IP6_ATTRS + _PORT_ATTRS, "udp-ipv6": _IP6_ATTRS + _PORT_ATTRS,
    "icmpv6": _IP6_ATTRS + [_attr("type", ("128", "129", "135", "1")), _attr("code", ("0",))],
    "all-ipv6": _IP6_ATTRS,
}
_CHAIN_ELEMENTS = {"root": list(_ELEMENTS), "mac": list(_ELEMENTS), "arp": ["arp", "mac"], "rarp": ["rarp", "mac"],
                   "ipv4": ["ip", "mac", "tcp", "udp", "icmp", "all"], "ipv6": ["ipv6", "mac", "tcp-ipv6", "icmpv6"],
                   "vlan": ["vlan", "mac"], "stp": ["stp"]}


@st.composite
def _rule(draw, chain: str) -> str:
    element = draw(st.sampled_from(_CHAIN_ELEMENTS[chain.split("-")[0]]))
    attrs = dict(draw(st.lists(st.one_of(*_ELEMENTS[element]), max_size=4)))
    if element in ("ip", "ipv6") and any(k.startswith(("src", "dst")) and "port" in k for k in attrs):
        attrs["protocol"] = draw(st.sampled_from(("tcp", "udp")))
    if element == "ipv6" and ("type" in attrs or "code" in attrs):
        attrs["protocol"] = "icmpv6"
    for base, companion in (("srcmacaddr", "srcmacmask"), ("srcipaddr", "srcipmask"),
                            ("dstportstart", "dstportend"), ("srcipfrom", "srcipto"), ("type", "code"),
                            ("arpsrcipaddr", "arpsrcipmask")):
        if companion in attrs and base not in attrs:
            del attrs[companion]
    if "dstportend" in attrs and int(attrs["dstportend"]) < int(attrs.get("dstportstart", 0)):
        del attrs["dstportend"]
    if "srcipfrom" in attrs and "srcipaddr" in attrs:
        attrs.pop("srcipfrom"), attrs.pop("srcipto", None)
    extra = ""
    layer3 = element not in ("mac", "vlan", "stp", "arp", "rarp", "ip", "ipv6")
    if layer3 and draw(st.integers(0, 9)) == 0:
        extra = " statematch='false'"
    if layer3 and draw(st.integers(0, 7)) == 0:
        attrs["state"] = draw(st.sampled_from(("NEW", "ESTABLISHED", "NEW,ESTABLISHED", "INVALID", "NONE")))
    # ebtables refuses ports beside a negated protocol (libvirt too): no match='no' there
    ports = any("port" in k for k in attrs)
    negated = draw(st.booleans()) and any(k != "state" for k in attrs) and not (element in ("ip", "ipv6") and ports)
    action = draw(st.sampled_from(("accept", "accept", "drop", "drop", "return", "continue", "reject")))
    direction = draw(st.sampled_from(("out", "in", "inout")))
    priority = draw(st.integers(-1000, 1000))
    body = " ".join(f"{k}='{v}'" for k, v in attrs.items() if k != "state")
    state = f" state='{attrs['state']}'" if "state" in attrs else ""
    match = " match='no'" if negated and body else ""
    return (f"<rule action='{action}' direction='{direction}' priority='{priority}'{extra}>"
            f"<{element}{match} {body}{state}/></rule>")


@st.composite
def filter_trees(draw) -> dict[str, str]:
    """``{name: XML}``; the root filter is ``gen-root``."""
    filters: dict[str, str] = {}
    refs = []
    for index in range(draw(st.integers(0, 2))):
        chain = draw(st.sampled_from(("mac", "arp", "rarp", "ipv4", "ipv6", "vlan", "ipv4-x", "root")))
        priority = draw(st.one_of(st.none(), st.integers(-900, 900)))
        rules = draw(st.lists(_rule(chain), min_size=1, max_size=4))
        name = f"gen-sub{index}"
        head = f"<filter name='{name}' chain='{chain}'" + (f" priority='{priority}'" if priority is not None else "")
        filters[name] = head + ">" + "".join(rules) + "</filter>"
        refs.append(f"<filterref filter='{name}'/>")
    rules = draw(st.lists(_rule("root"), min_size=1, max_size=8))
    entries = rules + refs
    order = draw(st.permutations(entries))
    filters["gen-root"] = "<filter name='gen-root' chain='root'>" + "".join(order) + "</filter>"
    return filters


# ------------------------------------------------------------------------------------------
# Packets


@dataclass
class Pools:
    """Values the rules mention, per kind."""

    macs: set[str] = field(default_factory=set)
    ipv4: set[str] = field(default_factory=set)
    ipv6: set[str] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)
    ethertypes: set[int] = field(default_factory=set)
    numbers: dict[Field, set[int]] = field(default_factory=dict)


def _neighbours(address: str, prefix: int) -> list[str]:
    ip = ipaddress.ip_address(address)
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    out = [str(ip)]
    for candidate in (int(ip) + 1, int(ip) - 1, int(network.broadcast_address) + 1, int(network.network_address)):
        try:
            out.append(str(type(ip)(candidate)))
        except ValueError:  # out of the family's range
            pass
    return out


def _collect(cond: Cond, pools: Pools) -> None:
    v = cond.value
    if isinstance(v, MacMatch):
        pools.macs.add(v.mac)
    elif isinstance(v, str) and cond.field in (Field.SRC_MAC, Field.ARP_SHA, Field.ARP_THA):
        pools.macs.add(v)
    elif isinstance(v, IpNet):
        (pools.ipv4 if v.family == 4 else pools.ipv6).update(_neighbours(v.address, v.prefix))
    elif isinstance(v, IpRange):
        for address in (v.first, v.last):
            (pools.ipv4 if v.family == 4 else pools.ipv6).update(_neighbours(address, 32 if v.family == 4 else 128))
    elif isinstance(v, NumRange):
        pools.ports.update({v.low, v.high, max(0, v.low - 1), min(65535, v.high + 1)})
    elif isinstance(v, IcmpType):
        pools.numbers.setdefault(Field.ICMP_TYPE, set()).update({v.type if v.type != 255 else 8, 0})
    elif isinstance(v, Icmpv6Range):
        pools.numbers.setdefault(Field.ICMP_TYPE, set()).update({v.type_low, v.type_high})
    elif isinstance(v, int) and not isinstance(v, bool):
        if cond.field in (Field.ETHER_TYPE, Field.VLAN_ENCAP):
            pools.ethertypes.add(v)
        pools.numbers.setdefault(cond.field, set()).add(v)


def pools_of(ruleset: PortRuleset) -> Pools:
    pools = Pools(set(MACS), set(IPV4), set(IPV6), set(PORTS))
    rules = list(ruleset.fi + ruleset.fo + ruleset.hi)
    for side in (ruleset.from_vm, ruleset.to_vm):
        rules += [r for r in side.root if not isinstance(r, Jump)]
        for sub in side.subchains:
            rules += list(sub.rules)
    for rule in rules:
        for cond in rule.conds:
            _collect(cond, pools)
    pools.ipv4 = {a for a in pools.ipv4 if ipaddress.ip_address(a).version == 4}
    pools.ipv6 = {a for a in pools.ipv6 if ipaddress.ip_address(a).version == 6}
    return pools


_L3_WORDS = {4: ("tcp", "udp", "icmp", "ip", "udplite", "sctp", "igmp", "esp"),
             6: ("tcp-ipv6", "udp-ipv6", "icmpv6", "ipv6", "sctp-ipv6")}
_TCP_FLAGS = ("SYN", "SYN", "ACK", "SYN,ACK", "FIN,ACK", "RST", "PSH,ACK", "NONE", "SYN,FIN", "URG,ACK")
_REPLY_FLAGS = {0x02: "SYN,ACK", 0x12: "ACK", 0x10: "ACK", 0x18: "PSH,ACK"}
_ICMP4_TYPES = (8, 8, 0, 3, 11, 13, 255)
_ICMP6_TYPES = (128, 128, 129, 135, 136, 1, 143, 200)


class PacketGenerator:
    """Packets for one ruleset (see the module docstring)."""

    def __init__(self, ruleset: PortRuleset, rng: random.Random, host_packets: bool = True):
        self.pools = pools_of(ruleset)
        self.rng = rng
        self.host_packets = host_packets
        self.flows: list[dict] = []  # earlier IP packets a reply can answer
        self.tuples: set[tuple] = set()

    def pick(self, values, default=None):
        values = sorted(values, key=str)
        return self.rng.choice(values) if values else default

    def words(self, count: int) -> list[str]:
        out = []
        for _ in range(count):
            if self.flows and self.rng.random() < 0.33:
                out.append(self._reply(self.rng.choice(self.flows)))
            else:
                out.append(self._fresh())
        return out

    def _mac(self, exclude=()) -> str:
        return self.pick(m for m in self.pools.macs if m not in exclude and m != ADDRESSES.host_mac)

    def _fresh(self) -> str:
        rng = self.rng
        kind = rng.choices(("l3", "arp", "rarp", "mac", "vlan", "stp"), weights=(12, 3, 1, 2, 1, 1))[0]
        direction = rng.choice(("out", "in"))
        if kind != "l3":
            return self._layer2(kind, direction)
        family = rng.choice((4, 4, 6))
        word = rng.choice(_L3_WORDS[family])
        host = self.host_packets and rng.random() < 0.15
        fields = {"srcmacaddr": self._mac(), "dstmacaddr": self._mac()}
        pool = sorted(self.pools.ipv4 if family == 4 else self.pools.ipv6)
        fields["srcipaddr"], fields["dstipaddr"] = rng.choice(pool), rng.choice(pool)
        if rng.random() < 0.2:
            fields["dscp"] = rng.choice((0, 10, 46))
        proto = {"tcp": 6, "udp": 17, "udplite": 136, "sctp": 132}.get(word.removesuffix("-ipv6"))
        if word in ("ip", "ipv6"):
            fields["protocol"] = rng.choice(("253", "tcp", "udp")) if family == 4 else rng.choice(("253", "tcp", "udp"))
            proto = {"tcp": 6, "udp": 17}.get(fields["protocol"])
        if proto is not None:
            fields["srcportstart"] = self.pick(self.pools.ports) if rng.random() < 0.5 else rng.randint(1024, 65535)
            fields["dstportstart"] = self.pick(self.pools.ports)
        if proto == 6:
            fields["flags"] = rng.choice(_TCP_FLAGS)
            if rng.random() < 0.3:
                fields["option"] = rng.choice(("2", "8", "2,8", "3"))
        if word in ("icmp", "icmpv6"):
            types = _ICMP4_TYPES if family == 4 else _ICMP6_TYPES
            fields["type"] = self.pick(self.pools.numbers.get(Field.ICMP_TYPE, set()) | set(types))
            fields["code"] = rng.choice((0, 0, 1))
        if host:
            self._to_host(fields, family, direction)
        if direction == "in" and host:
            self._host_sent(fields, proto, word)
        elif not self._fresh_tuple(fields, proto, family):
            return self._fresh()
        text = _text(direction, word, fields, host)
        if not (direction == "in" and host):
            self.flows.append({"direction": direction, "word": word, "fields": fields, "host": host})
        return text

    def _to_host(self, fields: dict, family: int, direction: str) -> None:
        """A proper exchange with the host: its address and MAC, a unicast source of the pool."""
        host_ip = ADDRESSES.host_ipv4 if family == 4 else ADDRESSES.host_ipv6
        sources = [a for a in (self.pools.ipv4 if family == 4 else self.pools.ipv6)
                   if _unicast_source(a) and a != host_ip]
        own = "srcipaddr" if direction == "out" else "dstipaddr"
        other = "dstipaddr" if direction == "out" else "srcipaddr"
        fields[own] = self.pick(sources, ADDRESSES.guest_ipv4 if family == 4 else ADDRESSES.guest_ipv6)
        fields[other] = host_ip
        fields["dstmacaddr" if direction == "out" else "srcmacaddr"] = ADDRESSES.host_mac

    def _host_sent(self, fields: dict, proto: int | None, word: str) -> None:
        """A packet from the host opens a connection the kernel lab does not see (frames are
        injected below its IP stack): give it a tuple nothing else uses, and no ICMP request."""
        if proto is not None:
            fields["srcportstart"] = self.rng.randint(1024, 65535)
        if word in ("icmp", "icmpv6"):
            fields["type"] = 3 if word == "icmp" else 1
        if proto is None and word not in ("icmp", "icmpv6"):
            fields["srcipaddr"] = f"192.0.2.{self.rng.randint(100, 250)}" if ":" not in fields["srcipaddr"] \
                else f"2001:db8::{self.rng.randint(256, 65535):x}"

    def _fresh_tuple(self, fields: dict, proto: int | None, family: int) -> bool:
        """TCP and SCTP packets of a new connection get a port pair no earlier packet used
        (a closed or half-open TCP connection is not modelled); False to draw again."""
        if proto not in (6, 132):
            return True
        for _ in range(20):
            key = (family, proto, fields["srcipaddr"], fields["dstipaddr"], fields["srcportstart"], fields["dstportstart"])
            back = (family, proto, fields["dstipaddr"], fields["srcipaddr"], fields["dstportstart"], fields["srcportstart"])
            if key not in self.tuples and back not in self.tuples:
                self.tuples.update({key, back})
                if proto == 132:
                    fields.pop("flags", None)
                return True
            fields["srcportstart"] = self.rng.randint(1024, 65535)
        return False

    def _reply(self, flow: dict) -> str:
        f = dict(flow["fields"])
        direction = "in" if flow["direction"] == "out" else "out"
        host = flow["host"] and direction == "out"
        if flow["host"] and direction == "in":  # the host's answer: its conntrack is not in the lab
            return self._fresh()
        word = flow["word"]
        if word in ("sctp", "sctp-ipv6"):
            return self._fresh()
        swapped = {"srcmacaddr": f.get("dstmacaddr"), "dstmacaddr": f.get("srcmacaddr"),
                   "srcipaddr": f.get("dstipaddr"), "dstipaddr": f.get("srcipaddr")}
        if "srcportstart" in f:
            swapped["srcportstart"], swapped["dstportstart"] = f["dstportstart"], f["srcportstart"]
        f.update({k: v for k, v in swapped.items() if v is not None})
        if "flags" in f:
            bits = _flag_bits(f["flags"])
            if bits not in _REPLY_FLAGS:
                return self._fresh()
            f["flags"] = _REPLY_FLAGS[bits]
        if word in ("icmp", "icmpv6"):
            replies = {8: 0, 13: 14, 128: 129}
            if int(f["type"]) not in replies:
                return self._fresh()
            f["type"] = replies[int(f["type"])]
        reply = {"direction": direction, "word": word, "fields": f, "host": host}
        self.flows.append(reply)
        return _text(direction, word, f, host)

    def _layer2(self, kind: str, direction: str) -> str:
        rng = self.rng
        fields: dict = {"srcmacaddr": self._mac(), "dstmacaddr": self._mac()}
        host = False
        if kind in ("arp", "rarp"):
            fields["opcode"] = rng.choice((1, 2, 3, 4) if kind == "rarp" else (1, 1, 2, 2, 3))
            fields["arpsrcmacaddr"] = self._mac()
            fields["arpdstmacaddr"] = self._mac()
            fields["arpsrcipaddr"] = self.pick(self.pools.ipv4)
            fields["arpdstipaddr"] = self.pick(self.pools.ipv4)
            if rng.random() < 0.1:
                fields["hwtype"] = rng.choice((6, 1))
            if rng.random() < 0.1:
                fields["protocoltype"] = "0x86dd"
            host = self.host_packets and direction == "out" and rng.random() < 0.1
            if host:
                fields["dstmacaddr"] = rng.choice((ADDRESSES.host_mac, "ff:ff:ff:ff:ff:ff"))
        elif kind == "mac":
            others = {t for t in self.pools.ethertypes if t >= 0x600 and t not in (0x0800, 0x86DD, 0x0806, 0x8035, 0x8100)}
            fields["protocolid"] = hex(self.pick(others | {0x88B5, 0x0835, 0x9000}))
        elif kind == "vlan":
            fields["vlanid"] = self.pick(self.pools.numbers.get(Field.VLAN_ID, set()) | {1, 10})
            fields["encap-protocol"] = hex(self.pick(self.pools.ethertypes | {0x0800, 0x0806}))
        elif kind == "stp":
            fields["dstmacaddr"] = "01:80:c2:00:00:00"
        return _text(direction, kind, fields, host)


def _flag_bits(text: str) -> int:
    from libvirt_nwfilter.schema import tcp_flag_bits

    return tcp_flag_bits(text)


def _unicast_source(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.is_multicast or ip.is_unspecified or ip.is_loopback or str(ip) == "255.255.255.255"
                or (ip.version == 4 and int(ip) >> 24 == 0))


def _text(direction: str, word: str, fields: dict, host: bool) -> str:
    flag = (" --to-host" if direction == "out" else " --from-host") if host else ""
    return f"{direction} {word} " + " ".join(f"{k}={v}" for k, v in fields.items()) + flag

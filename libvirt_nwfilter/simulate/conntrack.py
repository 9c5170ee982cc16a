"""What the connection tracker makes of each packet of a run (pure).

Packets are classified where the kernel tracks them (after the guest's L2 from-VM rules for
``out`` packets; before anything of the port for ``in`` packets) and a new connection exists
only once a packet of it got through (the kernel confirms a connection at the end of the path;
a dropped first packet leaves nothing behind). A reply-direction packet marks its connection as
answered even if it is dropped later, as the kernel does. The rules of Linux's tracker that
decide the state of our packets:

* TCP: flag combinations other than SYN, SYN+ACK, RST, RST+ACK, FIN+ACK, ACK (each optionally
  with URG, PSH, ECE, CWR) are INVALID; a new connection starts with SYN or, picked up in the
  middle (``nf_conntrack_tcp_loose``, on by default), with ACK; anything else without a
  connection is INVALID. Sequence numbers are not checked (``--kernel`` sets
  ``nf_conntrack_tcp_be_liberal``); closing (FIN, RST) is not modelled.
* ICMP: echo, timestamp, information and address-mask requests open connections, their replies
  answer them; types above 18 and replies without a request are INVALID; error messages are
  RELATED to the connection they quote only when they quote one, which our packets never do
  (INVALID: say ``state=RELATED`` to ask about them). ICMPv6 the same with echo (128) and node
  information (139) requests; neighbour discovery and MLD (130-136, 143) are not tracked at all
  and so match no state.
* SCTP packets are INIT chunks, which open connections. DCCP packets carry ports only and are
  INVALID. UDP-Lite packets are INVALID too: the kernel checks their checksum with UDP's
  pseudo-header (``udplite_error``), so a correct UDP-Lite checksum fails (found by the
  differential test; the check is skipped only for packets whose checksum a device already
  verified). Every other protocol opens a connection per address pair (the generic tracker).
* A packet of a connection in the original direction is NEW until a reply was seen, then
  ESTABLISHED; a reply is ESTABLISHED.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .packet import Packet

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_TCP_VALID = frozenset({TCP_SYN, TCP_SYN | TCP_URG, TCP_SYN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK,
                        TCP_FIN | TCP_ACK, TCP_FIN | TCP_ACK | TCP_URG, TCP_ACK, TCP_ACK | TCP_URG})
_TCP_IGNORED_BITS = TCP_PSH | 0x40 | 0x80  # PSH, ECE, CWR
_ICMP_REPLY = {8: 0, 13: 14, 15: 16, 17: 18}
_ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})
_ICMPV6_REPLY = {128: 129, 139: 140}
_ICMPV6_UNTRACKED = frozenset({130, 131, 132, 133, 134, 135, 136, 143})


@dataclass(eq=False)
class Connection:
    original: tuple
    reply: tuple
    answered: bool = False


@dataclass
class Verdict:
    """The tracker's view of one packet: state, direction, its connection (or the one it would
    open) and whether getting through confirms a new connection."""

    state: str
    direction: str | None
    connection: Connection | None = None
    new: bool = False


def _tuple(p: Packet) -> tuple:
    if p.sport is not None:
        return (p.family, p.ip_proto, p.ip_src, p.ip_dst, p.sport, p.dport)
    if p.icmp_type is not None:
        return (p.family, p.ip_proto, p.ip_src, p.ip_dst, p.icmp_type, p.icmp_code)
    return (p.family, p.ip_proto, p.ip_src, p.ip_dst)


def _reply_tuple(p: Packet) -> tuple:
    if p.sport is not None:
        return (p.family, p.ip_proto, p.ip_dst, p.ip_src, p.dport, p.sport)
    if p.icmp_type is not None:
        replies = _ICMP_REPLY if p.family == 4 else _ICMPV6_REPLY
        return (p.family, p.ip_proto, p.ip_dst, p.ip_src, replies[p.icmp_type], p.icmp_code)
    return (p.family, p.ip_proto, p.ip_dst, p.ip_src)


def _icmp_problem(p: Packet) -> str | None:
    """UNTRACKED/INVALID for ICMP packets the tracker does not follow, else None."""
    if p.family == 4:
        if p.icmp_type > 18 or p.icmp_type in _ICMP_ERRORS:
            return "INVALID"
        return None
    if p.icmp_type in _ICMPV6_UNTRACKED:
        return "UNTRACKED"
    return "INVALID" if p.icmp_type < 128 else None


def _opens(p: Packet) -> bool:
    """Can this packet start a connection?"""
    if p.ip_proto == 6:
        flags = p.tcp_flags & ~_TCP_IGNORED_BITS
        return flags in (TCP_SYN, TCP_SYN | TCP_URG, TCP_ACK, TCP_ACK | TCP_URG)
    if p.icmp_type is not None:
        return p.icmp_type in (_ICMP_REPLY if p.family == 4 else _ICMPV6_REPLY)
    return p.ip_proto != 33


@dataclass
class Tracker:
    """The connections of one run."""

    table: dict[tuple, tuple[Connection, str]] = field(default_factory=dict)
    seen_by_rule: dict[tuple, set[Connection]] = field(default_factory=dict)

    def classify(self, p: Packet) -> Verdict:
        """The state of ``p`` where the kernel tracks it (marks answered connections)."""
        if p.state is not None:
            return Verdict(p.state, p.ctdir)
        if p.ip_proto == 6 and (p.tcp_flags & ~_TCP_IGNORED_BITS) not in _TCP_VALID:
            return Verdict("INVALID", None)
        if p.icmp_type is not None:
            problem = _icmp_problem(p)
            if problem:
                return Verdict(problem, None)
        if p.ip_proto in (33, 136):
            return Verdict("INVALID", None)
        found = self.table.get(_tuple(p))
        if found is not None:
            connection, direction = found
            if direction == "reply":
                connection.answered = True
                return Verdict("ESTABLISHED", "reply", connection)
            return Verdict("ESTABLISHED" if connection.answered else "NEW", "original", connection)
        if not _opens(p):
            return Verdict("INVALID", None)
        return Verdict("NEW", "original", Connection(_tuple(p), _reply_tuple(p)), new=True)

    def confirm(self, verdict: Verdict) -> None:
        """The packet got through: a connection it opened now exists."""
        if verdict.new and verdict.connection is not None:
            connection = verdict.connection
            self.table[connection.original] = (connection, "original")
            self.table[connection.reply] = (connection, "reply")

    def connlimit(self, rule: object, p: Packet, verdict: Verdict) -> int:
        """How many connections from ``p``'s source address ``rule`` has seen, this one
        included (iptables' connlimit / nftables' ``ct count``: per source /32 or /128)."""
        key = (rule, p.family, p.ip_src)
        seen = self.seen_by_rule.setdefault(key, set())
        seen.intersection_update(c for c, _ in self.table.values())
        if verdict.connection is not None:
            seen.add(verdict.connection)
        return len(seen)

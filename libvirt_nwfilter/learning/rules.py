"""The learning-time rules of a port, as a ruleset IR both backends render (pure).

They are libvirt's helpers (semantics.md §7.4, "Learning helpers"), applied through the same
atomic path as any ruleset:

* ``any`` (applyBasicRules): from the guest only frames with its own source MAC, and of those
  only IPv4 and ARP; nothing towards the guest is restricted;
* ``dhcp`` (applyDHCPOnlyRules): from the guest only DHCP requests (UDP 68 -> 67) with its own
  source MAC; towards it only DHCP replies (UDP 67 -> 68) to its MAC or to broadcast, from one
  of the ``DHCPSERVER`` addresses when given; everything else dropped both ways.
"""

from __future__ import annotations

from ..ir import Cond, Field, IpNet, L2Rule, L2Side, MacMatch, NumRange, PortRuleset, Verdict

BROADCAST = "ff:ff:ff:ff:ff:ff"
ETH_IPV4, ETH_ARP = 0x0800, 0x0806
UDP = 17
DHCP_SERVER_PORT, DHCP_CLIENT_PORT = 67, 68


def learning_ruleset(mode: str, mac: str, servers: tuple[str, ...] = ()) -> PortRuleset:
    """The rules a port holds while its address is being learned (``mode`` any or dhcp)."""
    return _basic(mac) if mode == "any" else _dhcp_only(mac, servers)


def _rule(conds: list[Cond], verdict: Verdict, what: str, mode: str) -> L2Rule:
    return L2Rule(tuple(conds), verdict, f"IP learning ({mode}): {what}")


def _basic(mac: str) -> PortRuleset:
    own = Cond(Field.ETHER_SRC, MacMatch(mac))
    rules = (_rule([Cond(own.field, own.value, negated=True)], Verdict.DROP, "another source MAC", "any"),
             _rule([Cond(Field.ETHER_TYPE, ETH_IPV4)], Verdict.ACCEPT, "IPv4", "any"),
             _rule([Cond(Field.ETHER_TYPE, ETH_ARP)], Verdict.ACCEPT, "ARP", "any"),
             _rule([], Verdict.DROP, "anything else", "any"))
    return PortRuleset(from_vm=L2Side(rules))


def _udp(sport: int, dport: int) -> list[Cond]:
    return [Cond(Field.IP_PROTO, UDP), Cond(Field.SPORT, NumRange(sport, sport)),
            Cond(Field.DPORT, NumRange(dport, dport))]


def _dhcp_only(mac: str, servers: tuple[str, ...]) -> PortRuleset:
    ipv4 = Cond(Field.ETHER_TYPE, ETH_IPV4)
    requests = _rule([ipv4, Cond(Field.ETHER_SRC, MacMatch(mac)), *_udp(DHCP_CLIENT_PORT, DHCP_SERVER_PORT)],
                     Verdict.ACCEPT, "DHCP requests", "dhcp")
    replies = []
    for server in servers or (None,):
        source = [Cond(Field.IP_SRC, IpNet(server, 32, 4))] if server else []
        for destination in (mac, BROADCAST):
            replies.append(_rule([ipv4, Cond(Field.ETHER_DST, MacMatch(destination)), *source,
                                  *_udp(DHCP_SERVER_PORT, DHCP_CLIENT_PORT)],
                                 Verdict.ACCEPT, f"DHCP replies from {server or 'any server'}", "dhcp"))
    drop = _rule([], Verdict.DROP, "anything else", "dhcp")
    return PortRuleset(from_vm=L2Side((requests, drop)), to_vm=L2Side((*replies, drop)))

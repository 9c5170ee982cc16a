"""Concrete rules of a port -> :class:`~libvirt_nwfilter.ir.PortRuleset` (pure).

semantics.md §1 (copies and directions), §3 (sub-chains, interleaving), §4 (jump conditions),
§5 (verdicts per layer) and §6 (L3 copies, reversal, connection-state matching).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from . import ir
from .ir import Cond, Field, L2Rule, L2Side, L3Rule, PortRuleset, Side, SubChain, Verdict
from .model import Action, Attr, Direction, Match, Rule, chain_prefix
from .resolve import RuleInstance
from .schema import ND_LLADDR, ND_TARGET, PROTOCOLS, Layer, decode_uint, mask_prefix, tcp_flag_bits

log = logging.getLogger(__name__)

STP_DEST = ir.MacMatch("01:80:c2:00:00:00")
_IMPLICIT_ETHERTYPE = {"vlan": 0x8100, "arp": 0x0806, "rarp": 0x8035, "ip": 0x0800, "ipv6": 0x86DD}
_JUMP_ETHERTYPE = {"vlan": 0x8100, "ipv4": 0x0800, "ipv6": 0x86DD, "arp": 0x0806, "rarp": 0x8035}
_SWAPS = {
    Field.ETHER_SRC: Field.ETHER_DST, Field.IP_SRC: Field.IP_DST, Field.SPORT: Field.DPORT,
    Field.ARP_SHA: Field.ARP_THA, Field.ARP_SPA: Field.ARP_TPA, Field.IP_SRC_RANGE: Field.IP_DST_RANGE,
}
_SWAPS.update({v: k for k, v in list(_SWAPS.items())})
_L2_VERDICT = {Action.ACCEPT: Verdict.ACCEPT, Action.DROP: Verdict.DROP, Action.REJECT: Verdict.DROP,
               Action.RETURN: Verdict.RETURN, Action.CONTINUE: Verdict.CONTINUE}


class Copy(enum.Enum):
    FI = "fi"
    FO = "fo"
    HI = "hi"


# ------------------------------------------------------------------------------------------
# Attribute -> condition translation


def _mac(match: Match, name: str, mask: str) -> ir.MacMatch:
    mask_value = match.value(mask)
    return ir.MacMatch(match.value(name), mask_prefix(mask_value) if mask_value else 48)


def _net(match: Match, name: str, mask: str, family: int) -> ir.IpNet:
    mask_value = match.value(mask)
    return ir.IpNet(match.value(name), int(mask_value) if mask_value else (32 if family == 4 else 128), family)


def _num(match: Match, name: str) -> int:
    return decode_uint(match.spec.attr(name), match.value(name))


def _range(match: Match, low: str, high: str) -> ir.NumRange:
    start = _num(match, low)
    return ir.NumRange(start, _num(match, high) if match.get(high) else start)


Translate = Callable[[Match], object]


@dataclass(frozen=True)
class _Rendering:
    """How one base attribute (with its companions) becomes one condition."""

    attr: str
    field: Field
    value: Translate


def _renderings(protocol: str, family: int | None) -> list[_Rendering]:
    r = _Rendering
    out = [
        r("srcmacaddr", Field.ETHER_SRC, lambda m: _mac(m, "srcmacaddr", "srcmacmask")),
        r("dstmacaddr", Field.ETHER_DST, lambda m: _mac(m, "dstmacaddr", "dstmacmask")),
        r("protocolid", Field.ETHER_TYPE, lambda m: _num(m, "protocolid")),
        r("vlanid", Field.VLAN_ID, lambda m: _num(m, "vlanid")),
        r("encap-protocol", Field.VLAN_ENCAP, lambda m: _num(m, "encap-protocol")),
        r("hwtype", Field.ARP_HTYPE, lambda m: _num(m, "hwtype")),
        r("protocoltype", Field.ARP_PTYPE, lambda m: _num(m, "protocoltype")),
        r("opcode", Field.ARP_OPCODE, lambda m: _num(m, "opcode")),
        r("arpsrcmacaddr", Field.ARP_SHA, lambda m: m.value("arpsrcmacaddr")),
        r("arpdstmacaddr", Field.ARP_THA, lambda m: m.value("arpdstmacaddr")),
        r("arpsrcipaddr", Field.ARP_SPA, lambda m: _net(m, "arpsrcipaddr", "arpsrcipmask", 4)),
        r("arpdstipaddr", Field.ARP_TPA, lambda m: _net(m, "arpdstipaddr", "arpdstipmask", 4)),
        r("gratuitous", Field.ARP_GRATUITOUS, lambda m: True),
        r("srcipaddr", Field.IP_SRC, lambda m: _net(m, "srcipaddr", "srcipmask", family)),
        r("dstipaddr", Field.IP_DST, lambda m: _net(m, "dstipaddr", "dstipmask", family)),
        r("srcipfrom", Field.IP_SRC_RANGE,
          lambda m: ir.IpRange(m.value("srcipfrom"), m.value("srcipto") or m.value("srcipfrom"), family)),
        r("dstipfrom", Field.IP_DST_RANGE,
          lambda m: ir.IpRange(m.value("dstipfrom"), m.value("dstipto") or m.value("dstipfrom"), family)),
        r("protocol", Field.IP_PROTO, lambda m: _num(m, "protocol")),
        r("dscp", Field.DSCP, lambda m: _num(m, "dscp")),
        r("srcportstart", Field.SPORT, lambda m: _range(m, "srcportstart", "srcportend")),
        r("dstportstart", Field.DPORT, lambda m: _range(m, "dstportstart", "dstportend")),
        r("option", Field.TCP_OPTION, lambda m: _num(m, "option")),
        r("flags", Field.TCP_FLAGS, _tcp_flags),
        r("connlimit-above", Field.CONNLIMIT_ABOVE, lambda m: _num(m, "connlimit-above")),
        r("ipset", Field.IPSET, lambda m: ir.IpSet(m.value("ipset"), tuple((m.value("ipsetflags") or "src").split(",")))),
    ]
    if protocol == "stp":
        out = out[:1] + _stp_renderings()
    elif protocol == "ipv6":
        out += [r("type", Field.ICMPV6_TYPE_CODE, _icmpv6_range),
                r(ND_TARGET, Field.ND_TARGET, lambda m: m.value(ND_TARGET)),
                r(ND_LLADDR, Field.ND_LLADDR, _nd_link_layer)]
    elif protocol in ("icmp", "icmpv6"):
        out.append(r("type", Field.ICMP_TYPE,
                     lambda m: ir.IcmpType(_num(m, "type"), _num(m, "code") if m.get("code") else None)))
    if PROTOCOL_LAYER[protocol] is not Layer.L2:
        out[0] = r("srcmacaddr", Field.SRC_MAC, lambda m: m.value("srcmacaddr"))
    return out


def _stp_renderings() -> list[_Rendering]:
    ranges = {"root-priority": Field.STP_ROOT_PRIO, "root-cost": Field.STP_ROOT_COST,
              "sender-priority": Field.STP_SENDER_PRIO, "port": Field.STP_PORT, "age": Field.STP_MSG_AGE,
              "max-age": Field.STP_MAX_AGE, "hello-time": Field.STP_HELLO_TIME,
              "forward-delay": Field.STP_FORWARD_DELAY}
    out = [_Rendering("type", Field.STP_TYPE, lambda m: _num(m, "type")),
           _Rendering("flags", Field.STP_FLAGS, lambda m: _num(m, "flags")),
           _Rendering("root-address", Field.STP_ROOT_ADDR, lambda m: _mac(m, "root-address", "root-address-mask")),
           _Rendering("sender-address", Field.STP_SENDER_ADDR,
                      lambda m: _mac(m, "sender-address", "sender-address-mask"))]
    for name, fld in ranges.items():
        out.append(_Rendering(name, fld, lambda m, n=name: _range(m, n, f"{n}-hi")))
    return out


def _tcp_flags(match: Match) -> ir.TcpFlags:
    mask, flags = match.value("flags").split("/")
    return ir.TcpFlags(tcp_flag_bits(mask), tcp_flag_bits(flags))


def _icmpv6_range(match: Match) -> ir.Icmpv6Range:
    def bounds(low: str, high: str) -> tuple[int, int]:
        if match.get(low) is None and match.get(high) is None:
            return 0, 255
        start = _num(match, low) if match.get(low) else 0
        return start, _num(match, high) if match.get(high) else start

    return ir.Icmpv6Range(*bounds("type", "typeend"), *bounds("code", "codeend"))


# The link-layer address option a Neighbour Solicitation / Advertisement carries (RFC 4861 4.6.1).
_ND_OPTION = {135: 1, 136: 2}


def _nd_link_layer(match: Match) -> ir.NdLinkLayer:
    value = match.value(ND_LLADDR)
    return ir.NdLinkLayer(_ND_OPTION[_num(match, "type")], None if value == "none" else value)


PROTOCOL_LAYER = {name: spec.layer for name, spec in PROTOCOLS.items()}
_RENDERINGS = {name: _renderings(name, spec.family) for name, spec in PROTOCOLS.items()}
_ICMPV6_BASES = ("type", "typeend", "code", "codeend")


def match_conds(match: Match) -> list[Cond]:
    """Conditions of a match as written (no implicit protocol conditions)."""
    present: dict[str, Attr] = {}
    for attr in match.attrs:
        present.setdefault(attr.name, attr)
    conds = []
    for rendering in _RENDERINGS[match.protocol]:
        if rendering.field is Field.ICMPV6_TYPE_CODE:
            attr = next((present[n] for n in _ICMPV6_BASES if n in present), None)
        else:
            attr = present.get(rendering.attr)
        if attr is None or (rendering.field is Field.ARP_GRATUITOUS and attr.value != "true"):
            continue
        conds.append(Cond(rendering.field, rendering.value(match), attr.negated))
    return conds


def _reverse(conds: Sequence[Cond]) -> list[Cond]:
    out = []
    for cond in conds:
        value = cond.value
        if cond.field is Field.IPSET:
            swapped = tuple("dst" if f == "src" else "src" for f in value.flags)
            value = ir.IpSet(value.name, swapped)
        out.append(Cond(_SWAPS.get(cond.field, cond.field), value, cond.negated))
    return out


# ------------------------------------------------------------------------------------------
# L2


def _implicit_l2(protocol: str | None) -> list[Cond]:
    if protocol == "stp":
        return [Cond(Field.ETHER_DST, STP_DEST)]
    if protocol in _IMPLICIT_ETHERTYPE:
        return [Cond(Field.ETHER_TYPE, _IMPLICIT_ETHERTYPE[protocol])]
    return []


# Compiling one rule depends only on its instance (the rule and where it comes from): the copies
# are cached, so a filter tree shared by many ports compiles each rule without variables once
# (bulk changes; such a rule is one instance for every port, see resolve).
RULE_CACHE_SIZE = 1 << 16


@lru_cache(maxsize=RULE_CACHE_SIZE)
def _l2_copies(instance: RuleInstance) -> tuple[tuple[Side, L2Rule], ...]:
    rule = instance.rule
    written = match_conds(rule.match) if rule.match else []
    protocol = rule.match.protocol if rule.match else None
    verdict = _L2_VERDICT[rule.action]

    def make(conds: list[Cond]) -> L2Rule:
        return L2Rule(tuple(_implicit_l2(protocol) + conds), verdict, instance.origin, instance)

    if rule.direction is Direction.OUT:
        return ((Side.FROM_VM, make(written)),)
    if rule.direction is Direction.IN:
        return ((Side.TO_VM, make(written)),)
    return (Side.FROM_VM, make(_reverse(written))), (Side.TO_VM, make(written))


def jump_conds(chain: str) -> tuple[Cond, ...]:
    """The condition under which a root chain enters sub-chain ``chain`` (semantics §4)."""
    prefix = chain_prefix(chain)
    if prefix == "stp":
        return (Cond(Field.ETHER_DST, STP_DEST),)
    if prefix in _JUMP_ETHERTYPE:
        return (Cond(Field.ETHER_TYPE, _JUMP_ETHERTYPE[prefix]),)
    return ()


def _build_side(entries: list[tuple[RuleInstance, L2Rule]]) -> L2Side:
    root: list[tuple[int, L2Rule]] = []
    chains: dict[str, list[L2Rule]] = {}
    priorities: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for instance, rule in entries:
        if instance.in_root:
            root.append((instance.rule.priority, rule))
            continue
        chains.setdefault(instance.chain, []).append(rule)
        old = priorities.get(instance.chain)
        if old is not None and old != instance.chain_priority:
            log.warning("chain '%s' declared with priorities %d and %d; using the last", instance.chain,
                        old, instance.chain_priority)
        priorities[instance.chain] = instance.chain_priority
        first_seen[instance.chain] = min(first_seen.get(instance.chain, instance.position), instance.position)
    order = sorted(chains, key=lambda name: (priorities[name], first_seen[name]))
    interleaved: list[L2Rule | ir.Jump] = []
    pending = list(order)
    for priority, rule in root:
        while pending and priorities[pending[0]] <= priority:
            name = pending.pop(0)
            interleaved.append(ir.Jump(name, jump_conds(name)))
        interleaved.append(rule)
    interleaved += [ir.Jump(name, jump_conds(name)) for name in pending]
    subchains = tuple(SubChain(name, priorities[name], tuple(chains[name])) for name in order)
    return L2Side(tuple(interleaved), subchains)


# ------------------------------------------------------------------------------------------
# L3

_ORIGINAL, _REPLY = "original", "reply"


@lru_cache(maxsize=RULE_CACHE_SIZE)
def _l3_copies(instance: RuleInstance) -> tuple[tuple[Copy, L3Rule], ...]:
    rule, match = instance.rule, instance.rule.match
    spec = match.spec
    family = 6 if spec.layer is Layer.L3V6 else 4
    protocol = match.protocol.removesuffix("-ipv6")
    reversed_copies = {Copy.FO} if rule.direction is Direction.OUT else {Copy.FI, Copy.HI}
    state = match.value("state") if rule.statematch else None
    copies = _selected_copies(rule.direction, state, match, reversed_copies)
    written = match_conds(match)
    result = []
    for copy in copies:
        is_reversed = copy in reversed_copies
        conds = _reverse([c for c in written if c.field is not Field.SRC_MAC]) if is_reversed else list(written)
        if is_reversed and match.get("srcmacaddr") and not _has_real_match(conds):
            continue
        conds = _insert_state(conds, rule, copy, is_reversed, state)
        result.append((copy, L3Rule(family, protocol, tuple(conds), _l3_verdict(rule.action, copy), instance.origin,
                                    match.value("comment"), instance)))
    return tuple(result)


def _selected_copies(direction: Direction, state: str | None, match: Match, reversed_copies: set[Copy]) -> list[Copy]:
    copies = [Copy.FI, Copy.FO, Copy.HI]
    if state is not None:
        keep = {Direction.IN: {Copy.FO}, Direction.OUT: {Copy.FI, Copy.HI}}.get(direction, set(copies))
        copies = [c for c in copies if c in keep]
    icmp_typed = match.protocol in ("icmp", "icmpv6") and match.get("type") is not None
    if (icmp_typed and direction is not Direction.INOUT) or match.get("connlimit-above"):
        copies = [c for c in copies if c not in reversed_copies]
    return copies


def _has_real_match(conds: list[Cond]) -> bool:
    return any(c.field not in (Field.CT_STATE, Field.CT_DIRECTION) for c in conds)


def _insert_state(conds: list[Cond], rule: Rule, copy: Copy, is_reversed: bool, state: str | None) -> list[Cond]:
    if not rule.statematch or any(c.field is Field.CONNLIMIT_ABOVE for c in conds):
        return conds
    if state is not None:
        return conds if state == "NONE" else conds + [Cond(Field.CT_STATE, tuple(state.split(",")))]
    if rule.action is not Action.ACCEPT or rule.direction is Direction.INOUT:
        return conds
    opening = not is_reversed  # the copy that sees the traffic as written opens connections
    states = ("NEW", "ESTABLISHED") if opening else ("ESTABLISHED",)
    extra = [Cond(Field.CT_STATE, states)]
    if not any(c.field is Field.ICMP_TYPE for c in conds):
        extra.append(Cond(Field.CT_DIRECTION, _ORIGINAL if opening else _REPLY))
    return conds + extra


def _l3_verdict(action: Action, copy: Copy) -> Verdict:
    if action is Action.ACCEPT:
        return Verdict.ACCEPT if copy is Copy.FO else Verdict.RETURN
    return {Action.DROP: Verdict.DROP, Action.REJECT: Verdict.REJECT, Action.RETURN: Verdict.RETURN,
            Action.CONTINUE: Verdict.CONTINUE}[action]


# ------------------------------------------------------------------------------------------


def compile_port(instances: Sequence[RuleInstance]) -> PortRuleset:
    """Build the port's ruleset from its resolved rules (in resolver order)."""
    sides: dict[Side, list[tuple[RuleInstance, L2Rule]]] = {Side.FROM_VM: [], Side.TO_VM: []}
    l3: dict[Copy, list[L3Rule]] = {copy: [] for copy in Copy}
    for instance in instances:
        match = instance.rule.match
        if match is None or PROTOCOL_LAYER[match.protocol] is Layer.L2:
            for side, rule in _l2_copies(instance):
                sides[side].append((instance, rule))
        else:
            for copy, rule in _l3_copies(instance):
                l3[copy].append(rule)
    return PortRuleset(_build_side(sides[Side.FROM_VM]), _build_side(sides[Side.TO_VM]),
                       tuple(l3[Copy.FI]), tuple(l3[Copy.FO]), tuple(l3[Copy.HI]))

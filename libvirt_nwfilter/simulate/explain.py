"""Simulation results -> text for operators, or JSON objects for tools (pure).

Each stage names its deciding rule (filter, chain, rule priority, action, the rule as XML) and
says why in the packet's own words: which earlier rule of the chain would have let it through
and the field that made it miss; that no rule matched and the default let it through; that a
sub-chain returned, or ended and accepted the frame; that a rule needs an established
connection first. Conditions are written with the packet's field names (``srcipaddr`` is the
packet's source whatever the rule's direction), so they can be compared with the packet line.
"""

from __future__ import annotations

import ipaddress
from ..ir import (Cond, Field, IcmpType, Icmpv6Range, IpNet, IpRange, Jump, MacMatch, NdLinkLayer, NumRange, TcpFlags,
                  Verdict)
from ..xml import format_rule
from .evaluate import BAD_SOURCE, END, NO_RULES, ROOT_RETURN, RULE, STAGES, SUB_END, CompiledRule, Result, Stage
from .packet import Packet

FIELD_WORDS = {
    Field.ETHER_SRC: "srcmacaddr", Field.SRC_MAC: "srcmacaddr", Field.ETHER_DST: "dstmacaddr",
    Field.ETHER_TYPE: "protocolid", Field.VLAN_ID: "vlanid", Field.VLAN_ENCAP: "encap-protocol",
    Field.ARP_HTYPE: "hwtype", Field.ARP_PTYPE: "protocoltype", Field.ARP_OPCODE: "opcode",
    Field.ARP_SHA: "arpsrcmacaddr", Field.ARP_THA: "arpdstmacaddr", Field.ARP_SPA: "arpsrcipaddr",
    Field.ARP_TPA: "arpdstipaddr", Field.ARP_GRATUITOUS: "gratuitous", Field.IP_SRC: "srcipaddr",
    Field.IP_DST: "dstipaddr", Field.IP_SRC_RANGE: "srcipaddr", Field.IP_DST_RANGE: "dstipaddr",
    Field.IP_PROTO: "protocol", Field.DSCP: "dscp", Field.SPORT: "srcportstart", Field.DPORT: "dstportstart",
    Field.ICMPV6_TYPE_CODE: "type/code", Field.ICMP_TYPE: "type/code", Field.TCP_FLAGS: "flags",
    Field.TCP_OPTION: "option", Field.CT_STATE: "state", Field.CT_DIRECTION: "ctdir",
    Field.CONNLIMIT_ABOVE: "connections from the source", Field.IPSET: "ipset",
    Field.ND_TARGET: "nwf:nd-target", Field.ND_LLADDR: "nwf:nd-lladdr",
}
_CT_FIELDS = (Field.CT_STATE, Field.CT_DIRECTION)
_ACTIONS = {Verdict.ACCEPT: "accept", Verdict.DROP: "drop", Verdict.REJECT: "reject", Verdict.RETURN: "return",
            Verdict.CONTINUE: "continue"}


# ------------------------------------------------------------------------------------------
# Values in the packet's words


def _mac(value: int) -> str:
    return ":".join(f"{(value >> (8 * (5 - i))) & 0xFF:02x}" for i in range(6))


def _ip(value: int, family: int | None) -> str:
    if family is None:
        return "-"
    return str(ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value))


def cond_text(cond: Cond) -> str:
    """``srcipaddr=10.0.0.5``, ``protocolid!=0x0806``, ``state=NEW,ESTABLISHED``."""
    f, v = cond.field, cond.value
    op = "!=" if cond.negated else "="
    if isinstance(v, MacMatch):
        text = v.mac + ("" if v.prefix >= 48 else f"/{v.prefix}")
    elif isinstance(v, IpNet):
        text = v.address + ("" if v.prefix == (32 if v.family == 4 else 128) else f"/{v.prefix}")
    elif isinstance(v, IpRange):
        text = v.first if v.first == v.last else f"{v.first}-{v.last}"
    elif isinstance(v, NumRange):
        text = str(v.low) if v.low == v.high else f"{v.low}-{v.high}"
    elif isinstance(v, IcmpType):
        text = f"{v.type}" + ("" if v.code is None else f"/{v.code}")
    elif isinstance(v, Icmpv6Range):
        text = f"{v.type_low}-{v.type_high}/{v.code_low}-{v.code_high}"
    elif isinstance(v, NdLinkLayer):
        text = v.mac or "none"
    elif isinstance(v, TcpFlags):
        text = f"{v.mask:#04x}/{v.flags:#04x}"
    elif isinstance(v, tuple):
        text = ",".join(v)
    elif f in (Field.ETHER_TYPE, Field.VLAN_ENCAP, Field.ARP_PTYPE):
        text = f"0x{v:04x}"
    elif f is Field.CONNLIMIT_ABOVE:
        return f"{'at most' if cond.negated else 'more than'} {v} connections from the source"
    elif f is Field.ARP_GRATUITOUS:
        return "gratuitous ARP (arpsrcipaddr = arpdstipaddr)" if not cond.negated else "not gratuitous ARP"
    else:
        text = str(v)
    return f"{FIELD_WORDS.get(f, f.value)}{op}{text}"


def packet_value(p: Packet, f: Field) -> str:
    """What the packet has in the field a condition tests."""
    values = {
        Field.ETHER_SRC: lambda: _mac(p.src_mac), Field.SRC_MAC: lambda: _mac(p.src_mac),
        Field.ETHER_DST: lambda: _mac(p.dst_mac), Field.ETHER_TYPE: lambda: f"0x{p.ethertype:04x}",
        Field.VLAN_ID: lambda: str(p.vlan_id), Field.VLAN_ENCAP: lambda: f"0x{p.vlan_encap or 0:04x}",
        Field.ARP_HTYPE: lambda: str(p.arp_htype), Field.ARP_PTYPE: lambda: f"0x{p.arp_ptype or 0:04x}",
        Field.ARP_OPCODE: lambda: str(p.arp_opcode),
        Field.ARP_SHA: lambda: _mac(p.arp_sha or 0), Field.ARP_THA: lambda: _mac(p.arp_tha or 0),
        Field.ARP_SPA: lambda: _ip(p.arp_spa or 0, 4), Field.ARP_TPA: lambda: _ip(p.arp_tpa or 0, 4),
        Field.IP_SRC: lambda: _ip(p.ip_src, p.family), Field.IP_DST: lambda: _ip(p.ip_dst, p.family),
        Field.IP_SRC_RANGE: lambda: _ip(p.ip_src, p.family), Field.IP_DST_RANGE: lambda: _ip(p.ip_dst, p.family),
        Field.IP_PROTO: lambda: str(p.ip_proto), Field.DSCP: lambda: str(p.dscp),
        Field.SPORT: lambda: str(p.sport), Field.DPORT: lambda: str(p.dport),
        Field.ICMP_TYPE: lambda: f"{p.icmp_type}/{p.icmp_code}", Field.ICMPV6_TYPE_CODE: lambda: f"{p.icmp_type}/{p.icmp_code}",
        Field.TCP_FLAGS: lambda: f"{p.tcp_flags:#04x}", Field.TCP_OPTION: lambda: ",".join(map(str, p.tcp_options)) or "none",
        Field.CT_STATE: lambda: p.ct_state or "-", Field.CT_DIRECTION: lambda: p.ct_dir or "none",
        Field.ND_TARGET: lambda: _ip(p.nd_target, 6) if p.nd_target is not None else "no neighbour discovery",
        Field.ND_LLADDR: lambda: ("no neighbour discovery" if p.nd_target is None
                                  else "none" if p.nd_lladdr is None else _mac(p.nd_lladdr)),
    }
    getter = values.get(f)
    if getter is None:
        return "-"
    if f in (Field.ARP_SHA, Field.ARP_THA, Field.ARP_SPA, Field.ARP_TPA, Field.ARP_HTYPE, Field.ARP_PTYPE,
             Field.ARP_OPCODE) and p.arp_opcode is None:
        return "no ARP header"
    if f in (Field.IP_SRC, Field.IP_DST, Field.IP_PROTO, Field.DSCP) and p.family is None:
        return "no IP header"
    if f in (Field.SPORT, Field.DPORT) and p.sport is None:
        return "no ports"
    return getter()


def packet_summary(p: Packet) -> str:
    parts = [f"{_mac(p.src_mac)} > {_mac(p.dst_mac)}"]
    if p.family is not None:
        parts.append(f"IPv{p.family} {_ip(p.ip_src, p.family)} > {_ip(p.ip_dst, p.family)}")
        if p.sport is not None:
            parts.append(f"protocol {p.ip_proto} port {p.sport} > {p.dport}"
                         + (f" flags {p.tcp_flags:#04x}" if p.ip_proto == 6 else ""))
        elif p.icmp_type is not None:
            parts.append(f"ICMP{'v6' if p.family == 6 else ''} type {p.icmp_type} code {p.icmp_code}")
        else:
            parts.append(f"protocol {p.ip_proto}")
    elif p.arp_opcode is not None:
        parts.append(f"{'ARP' if p.ethertype == 0x0806 else 'RARP'} opcode {p.arp_opcode} "
                     f"{_mac(p.arp_sha)} {_ip(p.arp_spa, 4)} > {_mac(p.arp_tha)} {_ip(p.arp_tpa, 4)}")
    elif p.vlan_id is not None:
        parts.append(f"VLAN {p.vlan_id} ethertype 0x{p.vlan_encap:04x}")
    elif p.stp is not None:
        parts.append(f"STP BPDU type {p.stp.type}")
    else:
        parts.append(f"ethertype 0x{p.ethertype:04x}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------
# Rules


def rule_info(rule: CompiledRule) -> dict:
    """Filter, chain, priority, action and XML of the filter rule behind a compiled rule."""
    ir_rule = rule.rule
    if isinstance(ir_rule, Jump):
        return {"jump": ir_rule.chain}
    info = {"port-chain": rule.chain, "position": rule.index + 1, "verdict": _ACTIONS[ir_rule.verdict]}
    source = ir_rule.source
    if source is not None:
        info.update({"filter": source.filter, "rule": source.rule_number, "chain": source.chain,
                     "priority": source.rule.priority,
                     "action": source.rule.action.value, "xml": format_rule(source.rule)})
    return info


def rule_name(rule: CompiledRule) -> str:
    info = rule_info(rule)
    if "jump" in info:
        return f"the jump to sub-chain '{info['jump']}'"
    if "filter" not in info:
        return f"rule {info['position']} of chain {info['port-chain']}"
    return f"filter '{info['filter']}' rule {info['rule']} (priority {info['priority']}, {info['action']})"


def _first_miss(rule: CompiledRule, p: Packet) -> Cond | None:
    ir_rule = rule.rule
    for cond, pred in zip(ir_rule.conds, rule.preds[-len(ir_rule.conds):] if ir_rule.conds else ()):
        if not pred(p):
            return cond
    return None


def _needs_state_only(rule: CompiledRule, p: Packet) -> bool:
    conds = rule.rule.conds
    preds = rule.preds[len(rule.preds) - len(conds):]
    protocol_ok = all(pred(p) for pred in rule.preds[:len(rule.preds) - len(conds)])
    misses = [c for c, pred in zip(conds, preds) if not pred(p)]
    return protocol_ok and bool(misses) and all(c.field in _CT_FIELDS for c in misses)


def _misses(stage: Stage, p: Packet) -> list[str]:
    """Rules of the deciding chain before the decision that would have let the packet through,
    and why they missed."""
    lines = []
    for chain, last in stage.visited[-1:]:
        decided = chain.rules[last] if 0 <= last < len(chain.rules) else None
        for rule in chain.rules[:last + 1]:
            if rule is decided and stage.how != END:
                continue
            if isinstance(rule.rule, Jump) or rule.verdict in (Verdict.DROP, Verdict.REJECT, Verdict.CONTINUE):
                continue
            if rule.matches(p):
                continue
            lines.append(_miss_line(rule, p))
    return lines


def _miss_line(rule: CompiledRule, p: Packet) -> str:
    if _needs_state_only(rule, p):
        wanted = [cond_text(c) for c in rule.rule.conds if c.field in _CT_FIELDS]
        return (f"{rule_name(rule)} would let it through in {' '.join(wanted)}, but the packet is "
                f"{p.ct_state or 'not tracked'}{' (' + p.ct_dir + ')' if p.ct_dir else ''}: "
                "a state rule needs the connection to exist (or be opened from the other side) first")
    miss = _first_miss(rule, p)
    if miss is None:  # the protocol itself differs
        return f"{rule_name(rule)} is for protocol {rule.rule.protocol}"
    return f"{rule_name(rule)} needs {cond_text(miss)} (packet: {packet_value(p, miss.field)})"


# ------------------------------------------------------------------------------------------
# Stages


def _decision(stage: Stage) -> str:
    rule = stage.rule
    if stage.how == BAD_SOURCE:
        return ("the bridge drops frames whose source MAC is not a unicast address (multicast, broadcast "
                "or zero) before any rule")
    if stage.how == NO_RULES:
        return "no rules for this traffic: it passes"
    if stage.how == END:
        chain = stage.chain.name if stage.chain else ""
        where = "the root chain" if chain == "root" else f"chain {chain}"
        return f"no rule of {where} decided: it passes (the default is accept)"
    if stage.how == SUB_END:
        return (f"no rule of sub-chain '{rule.rule.chain}' decided and it ended: the frame is accepted "
                "(libvirt's sub-chains have policy ACCEPT)")
    if stage.how == ROOT_RETURN:
        return f"returned by {rule_name(rule)}: the frame leaves the port's rules and continues"
    verdict = rule.verdict
    if verdict is Verdict.REJECT:
        return f"rejected by {rule_name(rule)} (dropped; the sender gets an ICMP error)"
    if verdict is Verdict.RETURN:
        return f"accepted by {rule_name(rule)} (it returns to the host's own rules, which let it continue)"
    return f"{'accepted' if verdict is Verdict.ACCEPT else 'dropped'} by {rule_name(rule)}"


def _returns(stage: Stage) -> list[str]:
    lines = []
    for chain, last in stage.visited:
        if chain.name in ("root", "FI", "FO", "HI") or not 0 <= last < len(chain.rules):
            continue
        rule = chain.rules[last]
        if rule.verdict is Verdict.RETURN and rule is not stage.rule:
            lines.append(f"sub-chain '{chain.name}' returned ({rule_name(rule)})")
    return lines


def stage_lines(stage: Stage, p: Packet) -> list[str]:
    lines = [f"{stage.name}: {'pass' if stage.passed else 'DROP'} - {_decision(stage)}"]
    for text in _returns(stage):
        lines.append(f"    {text}")
    if stage.rule is not None and stage.how in (RULE, ROOT_RETURN):
        info = rule_info(stage.rule)
        if "filter" in info:
            lines.append(f"    rule: filter '{info['filter']}' rule {info['rule']}, chain '{info['chain']}', "
                         f"priority {info['priority']}, action {info['action']}")
            lines += ["      " + line for line in info["xml"].splitlines()]
    misses = [] if stage.passed else _misses(stage, p)
    if misses:
        lines.append("    passed over:")
        lines += [f"      - {text}" for text in misses]
    return lines


def text_report(number: int, result: Result) -> str:
    p = result.packet
    lines = [f"packet {number}: {p.text}", f"  frame: {packet_summary(p)}"]
    if result.conntrack is not None:
        ct = result.conntrack
        lines.append(f"  connection: {ct.state}" + (f" ({ct.direction})" if ct.direction else ""))
    for stage in result.stages:
        lines += ["  " + line for line in stage_lines(stage, p)]
    for key in result.unreached:
        lines.append(f"  {STAGES[key]}: not reached")
    lines.append(f"  verdict: {result.verdict}")
    return "\n".join(lines) + "\n"


def stage_json(stage: Stage, p: Packet) -> dict:
    out = {"stage": stage.key, "name": stage.name, "verdict": "pass" if stage.passed else "drop",
           "how": stage.how, "explanation": _decision(stage)}
    if stage.rule is not None:
        out["rule"] = rule_info(stage.rule)
    misses = [] if stage.passed else _misses(stage, p)
    if misses:
        out["passed-over"] = misses
    return out


def json_report(result: Result) -> dict:
    p = result.packet
    out = {"packet": p.text, "verdict": result.verdict, "frame": packet_summary(p),
           "stages": [stage_json(s, p) for s in result.stages]
           + [{"stage": key, "name": STAGES[key], "verdict": "not-reached"} for key in result.unreached]}
    if result.conntrack is not None:
        out["connection"] = {"state": result.conntrack.state, "direction": result.conntrack.direction}
    return out

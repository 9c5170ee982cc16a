"""One IR rule → the text of one nft rule (pure; knows nothing of ports, chains or batches).

Rendering of conditions (``!=`` when negated)
=============================================

* Ethernet: ``ether saddr|daddr MAC`` or ``ether saddr & MASK == MAC&MASK``; ``ether type 0xNNNN``;
  ``vlan id N``; ``vlan type 0xNNNN``.
* ARP (ethertype 0x0806): ``arp htype|ptype|operation|saddr ether|daddr ether|saddr ip|daddr ip``;
  ebtables reads sender/target addresses only of Ethernet/IPv4 ARP, so address fields add the
  checks ``arp ptype 0x0800 arp hlen 6 arp plen 4`` (IP) / ``arp htype 1 arp hlen 6`` (MAC).
  RARP (0x8035): the same fields as raw ``@nh,offset,length`` matches (nft's ``arp`` expressions
  would add ``ether type arp``). ``gratuitous`` is refused (no field-to-field comparison).
* IP (L2 ``ip``/``ipv6`` and L3): ``ip|ip6 saddr|daddr A[/P]`` (host bits cleared), ranges
  ``A-B``; L2 protocol ``ip protocol N`` (IPv4) / ``meta l4proto N`` (IPv6: after extension
  headers); ports ``th sport|dport N[-M]``; ``ip|ip6 dscp N`` (the 6-bit field, spec R3); L2
  ICMPv6 ``icmpv6 type T1-T2 [icmpv6 code C1-C2]``, negated as a whole (ebtables) with
  ``icmpv6 type . icmpv6 code != { T . C }`` when both ranges matter.
* Neighbour Discovery (our extension, docs/filter-language-extensions.md): the target address
  ``@th,64,128 0x…`` (ICMPv6 bytes 8..23; ``!=`` when negated); the options ``ip6 nexthdr 58
  ip6 length 24`` (none) or ``ip6 nexthdr 58 ip6 length 32 @th,192,64 0xTT01MMMMMMMMMMMM`` (one
  link-layer address option of type TT holding MAC M, and nothing else).
* L3 prefix: ``meta nfproto ipv4|ipv6`` (inet mode) or ``ether type 0x0800|0x86dd`` (bridge
  mode), then ``meta l4proto N`` unless the protocol is ``all``. ``srcmacaddr``: ``ether saddr``.
  ICMP: ``icmp|icmpv6 type T [code C]``; negated with a code: ``type . code != { T . C }``; IPv4
  type 255 means "any type" as in iptables. TCP: ``tcp flags & (mask) == (flags)``, ``tcp option
  N exists|missing``. ``ct state a,b``, ``ct direction original|reply``. connlimit: a per-rule
  dynamic set keyed by the source address, ``add @CL-… { ip saddr ct count [over] N }`` after
  every match (iptables' connlimit: per source /32 or /128). ``ipset`` is refused (nft cannot
  reference kernel ipsets). Comments: ``comment "…"`` after the verdict, ``"`` → ``'``, control
  characters → space, cut to 128 bytes.
* STP BPDU fields are refused (see ``_STP_WHY``); the ``stp`` element's destination MAC and
  source MAC render normally.
* Verdicts: accept/drop/return as such; continue → ``counter`` (no verdict); reject → ``reject``
  at L3 in the inet mode (and in the bridge mode when ``l2_reject``), else ``drop``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

from ...errors import NwfilterError, UnsupportedError
from ...ir import Cond, Field, Icmpv6Range, IcmpType, IpNet, IpRange, L2Rule, L3Rule
from ...ir import MacMatch, NdLinkLayer, NumRange, TcpFlags, Verdict
from ..text import clean_comment, mac_int, mac_mask, mac_text, range_text, tcp_flag_names
from .names import hex_text, quote

COMMENT_MAX_BYTES = 128
# Rules are rendered once per distinct rule (many ports share a filter tree): texts are cached.
CACHE_SIZE = 1 << 16
# libvirt creates its ebtables chains with policy ACCEPT: a frame that falls off the end of a
# sub-chain is accepted (observed: tests/ORACLE.md, every chain ends with "counter accept").
SUBCHAIN_END_VERDICT = "accept"

_L4PROTO = {"tcp": 6, "udp": 17, "udplite": 136, "esp": 50, "ah": 51, "sctp": 132, "icmp": 1,
            "igmp": 2, "icmpv6": 58}
_ETHERTYPE_IP = {4: 0x0800, 6: 0x86DD}

# XML attribute names, for messages about refused fields.
_ATTRIBUTE = {
    Field.IPSET: "ipset",
    Field.ND_TARGET: "nwf:nd-target",
    Field.ND_LLADDR: "nwf:nd-lladdr",
    Field.ARP_GRATUITOUS: "gratuitous",
    Field.STP_TYPE: "type",
    Field.STP_FLAGS: "flags",
    Field.STP_ROOT_PRIO: "root-priority",
    Field.STP_ROOT_ADDR: "root-address",
    Field.STP_ROOT_COST: "root-cost",
    Field.STP_SENDER_PRIO: "sender-priority",
    Field.STP_SENDER_ADDR: "sender-address",
    Field.STP_PORT: "port",
    Field.STP_MSG_AGE: "age",
    Field.STP_MAX_AGE: "max-age",
    Field.STP_HELLO_TIME: "hello-time",
    Field.STP_FORWARD_DELAY: "forward-delay",
}
_STP_FIELDS = frozenset(f for f in Field if f.name.startswith("STP_"))
_REFUSED_WHY = {
    Field.IPSET: "nftables cannot reference kernel ipsets (ipset(8) sets)",
    Field.ARP_GRATUITOUS: "nftables cannot compare the ARP sender IP with the target IP",
}
_STP_WHY = ("nftables has no STP match; ebtables' stp match reads the BPDU at offsets of its own "
            "(its 6-byte header check covers the protocol id and version, so its 'type' is the "
            "version byte and the config fields are read one byte late), which raw payload "
            "matches would either reproduce or silently correct")

# ARP header fields (Ethernet/IPv4 ARP, offsets from the network header in bits) for raw
# payload matches, used where nft's ``arp`` expressions would force ``ether type arp`` (RARP).
_ARP_RAW = {"htype": (0, 16), "ptype": (16, 16), "hlen": (32, 8), "plen": (40, 8),
            "operation": (48, 16), "saddr ether": (64, 48), "saddr ip": (112, 32),
            "daddr ether": (144, 48), "daddr ip": (192, 32)}

NewSet = Callable[[int], str]  # family → the name of a new connlimit set of the rule's port


# ----------------------------------------------------------------------------------------------
# Values


def _num_range(value: NumRange | int) -> str:
    if isinstance(value, int):
        return str(value)
    return range_text(value.low, value.high, "-")


@lru_cache(maxsize=1 << 12)
def _net_text(net: IpNet) -> str:
    network = ipaddress.ip_network(f"{net.address}/{net.prefix}", strict=False)
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _range_text(value: IpRange) -> str:
    first = ipaddress.ip_address(value.first)
    last = ipaddress.ip_address(value.last)
    return str(first) if first == last else f"{first}-{last}"


def _op(negated: bool) -> str:
    return "!= " if negated else ""


def _mac_match(expr: str, value: MacMatch | str, negated: bool) -> str:
    if isinstance(value, str):
        value = MacMatch(value)
    mac = value.mac.lower()
    if value.prefix >= 48:
        return f"{expr} {_op(negated)}{mac}"
    mask = mac_mask(value.prefix)
    masked = mac_text(mac_int(mac) & mac_int(mask))
    return f"{expr} & {mask} {'!=' if negated else '=='} {masked}"


def _tcp_flags_text(bits: int) -> str:
    names = [name.lower() for name in tcp_flag_names(bits)]
    if not names:
        return "0x0"
    return names[0] if len(names) == 1 else "(" + "|".join(names) + ")"


def comment_text(text: str) -> str:
    """A comment nft accepts: no ``"`` (not expressible), no control characters, ≤128 bytes."""
    return clean_comment(text.replace('"', "'"), COMMENT_MAX_BYTES)


class _NeverMatches(Exception):
    """A rule that can never match (omitted from the output)."""


# ----------------------------------------------------------------------------------------------
# Conditions


@dataclass
class _RuleContext:
    origin: str
    layer: str  # "l2" or "l3"
    family: int | None  # 4, 6 or None (unknown / not IP)
    ethertype: int | None  # positive ETHER_TYPE of an L2 rule
    new_set: NewSet | None = None  # for connlimit (L3 only)


def _refuse(cond: Cond, ctx: _RuleContext, why: str) -> UnsupportedError:
    attribute = _ATTRIBUTE.get(cond.field, cond.field.value)
    return UnsupportedError(f"{ctx.origin}: attribute '{attribute}' cannot be rendered by the "
                            f"nftables backend: {why}")


def _ip_expr(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def _arp_expr(key: str, ctx: _RuleContext) -> tuple[str, bool]:
    """The nft expression for an ARP header field and whether it is a raw payload match."""
    if ctx.ethertype == 0x0806:
        return f"arp {key}", False
    offset, length = _ARP_RAW[key]
    return f"@nh,{offset},{length}", True


def _arp_guards(conds: Sequence[Cond], ctx: _RuleContext) -> dict[Field, list[str]]:
    """ebtables' arp match only reads sender/target addresses of Ethernet/IPv4 ARP; nft reads
    fixed offsets, so add the header checks ebtables makes (and hlen 6, which nft assumes)."""
    guards: dict[Field, list[str]] = {}
    ip_fields = [c for c in conds if c.field in (Field.ARP_SPA, Field.ARP_TPA)]
    mac_fields = [c for c in conds if c.field in (Field.ARP_SHA, Field.ARP_THA)]
    wanted: list[tuple[str, int]] = []
    if ip_fields:
        wanted += [("ptype", 0x0800), ("hlen", 6), ("plen", 4)]
    if mac_fields:
        wanted += [("htype", 1), ("hlen", 6)]
    texts: list[str] = []
    for key, value in wanted:
        expr, raw = _arp_expr(key, ctx)
        text = f"{expr} {hex_text(value) if key == 'ptype' or raw else value}"
        if text not in texts:
            texts.append(text)
    if texts:
        first = (ip_fields + mac_fields)
        first_field = next(c.field for c in conds if c in first)
        guards[first_field] = texts
    return guards


def _render_cond(cond: Cond, ctx: _RuleContext) -> str:
    f, v, neg = cond.field, cond.value, cond.negated
    op = _op(neg)
    if f in _STP_FIELDS:
        raise _refuse(cond, ctx, _STP_WHY)
    if f in _REFUSED_WHY:
        raise _refuse(cond, ctx, _REFUSED_WHY[f])

    if f is Field.ETHER_SRC:
        return _mac_match("ether saddr", v, neg)
    if f is Field.ETHER_DST:
        return _mac_match("ether daddr", v, neg)
    if f is Field.SRC_MAC:
        return _mac_match("ether saddr", v, neg)
    if f is Field.ETHER_TYPE:
        return f"ether type {op}{hex_text(v)}"
    if f is Field.VLAN_ID:
        return f"vlan id {op}{v}"
    if f is Field.VLAN_ENCAP:
        return f"vlan type {op}{hex_text(v)}"

    if f in (Field.ARP_HTYPE, Field.ARP_PTYPE, Field.ARP_OPCODE):
        key = {Field.ARP_HTYPE: "htype", Field.ARP_PTYPE: "ptype", Field.ARP_OPCODE: "operation"}[f]
        expr, raw = _arp_expr(key, ctx)
        value = hex_text(v) if (raw or f is Field.ARP_PTYPE) else str(v)
        return f"{expr} {op}{value}"
    if f in (Field.ARP_SHA, Field.ARP_THA):
        expr, raw = _arp_expr("saddr ether" if f is Field.ARP_SHA else "daddr ether", ctx)
        mac = v.mac if isinstance(v, MacMatch) else v
        value = hex_text(mac_int(mac), 12) if raw else mac.lower()
        return f"{expr} {op}{value}"
    if f in (Field.ARP_SPA, Field.ARP_TPA):
        expr, raw = _arp_expr("saddr ip" if f is Field.ARP_SPA else "daddr ip", ctx)
        network = ipaddress.ip_network(f"{v.address}/{v.prefix}", strict=False)
        if not raw:
            return f"{expr} {op}{_net_text(v)}"
        address = int(network.network_address)
        if network.prefixlen == 32:
            return f"{expr} {op}{hex_text(address, 8)}"
        mask = int(network.netmask)
        return f"{expr} & {hex_text(mask, 8)} {'!=' if neg else '=='} {hex_text(address, 8)}"

    if f in (Field.IP_SRC, Field.IP_DST):
        direction = "saddr" if f is Field.IP_SRC else "daddr"
        return f"{_ip_expr(v.family)} {direction} {op}{_net_text(v)}"
    if f in (Field.IP_SRC_RANGE, Field.IP_DST_RANGE):
        direction = "saddr" if f is Field.IP_SRC_RANGE else "daddr"
        return f"{_ip_expr(v.family)} {direction} {op}{_range_text(v)}"
    if f is Field.IP_PROTO:
        if ctx.family == 4:
            return f"ip protocol {op}{v}"
        return f"meta l4proto {op}{v}"
    if f is Field.DSCP:
        return f"{_ip_expr(ctx.family or 4)} dscp {op}{v}"
    if f in (Field.SPORT, Field.DPORT):
        return f"th {'sport' if f is Field.SPORT else 'dport'} {op}{_num_range(v)}"
    if f is Field.ICMPV6_TYPE_CODE:
        return _icmpv6_range(v, neg)
    if f is Field.ND_TARGET:
        return f"@th,64,128 {op}{hex_text(int(ipaddress.IPv6Address(v)), 32)}"
    if f is Field.ND_LLADDR:
        if neg:
            raise _refuse(cond, ctx, "the options test has no negation (it is two tests)")
        return _nd_options(v)
    if f is Field.ICMP_TYPE:
        return _icmp_type(v, neg, ctx.family or 4)
    if f is Field.TCP_FLAGS:
        assert isinstance(v, TcpFlags)
        return (f"tcp flags & {_tcp_flags_text(v.mask)} {'!=' if neg else '=='} "
                f"{_tcp_flags_text(v.flags)}")
    if f is Field.TCP_OPTION:
        return f"tcp option {v} {'missing' if neg else 'exists'}"
    if f is Field.CT_STATE:
        return "ct state " + ",".join(s.lower() for s in v)
    if f is Field.CT_DIRECTION:
        return f"ct direction {v}"
    if f is Field.CONNLIMIT_ABOVE:
        if ctx.new_set is None:
            raise _refuse(cond, ctx, "connlimit is only available on L3 rules")
        family = ctx.family or 4
        name = ctx.new_set(family)
        return (f"add @{name} {{ {_ip_expr(family)} saddr ct count {'' if neg else 'over '}{v} }}")
    raise UnsupportedError(f"{ctx.origin}: condition {f.value} is not known to the nftables backend")


def _icmpv6_range(v: Icmpv6Range, negated: bool) -> str:
    types = NumRange(v.type_low, v.type_high)
    codes = NumRange(v.code_low, v.code_high)
    all_codes = (v.code_low, v.code_high) == (0, 255)
    all_types = (v.type_low, v.type_high) == (0, 255)
    if not negated:
        text = f"icmpv6 type {_num_range(types)}"
        return text if all_codes else f"{text} icmpv6 code {_num_range(codes)}"
    # ebtables negates the whole (type range AND code range) test
    if all_codes:
        return f"icmpv6 type != {_num_range(types)}"
    if all_types:
        return f"icmpv6 code != {_num_range(codes)}"
    return f"icmpv6 type . icmpv6 code != {{ {_num_range(types)} . {_num_range(codes)} }}"


def _nd_options(v: NdLinkLayer) -> str:
    """The whole options area of an ND message: its ICMPv6 header must follow the IPv6 header
    (so the payload length is the ICMPv6 length); 24 bytes = no option, 32 = exactly one."""
    if v.mac is None:
        return "ip6 nexthdr 58 ip6 length 24"
    option = (v.option << 56) | (1 << 48) | mac_int(v.mac)
    return f"ip6 nexthdr 58 ip6 length 32 @th,192,64 {hex_text(option, 16)}"


def _icmp_type(v: IcmpType, negated: bool, family: int) -> str:
    proto = "icmp" if family == 4 else "icmpv6"
    if family == 4 and v.type == 255:
        # iptables' icmp match: type 255 means "any type" (whatever the code)
        if negated:
            raise _NeverMatches()
        return ""
    if not negated:
        text = f"{proto} type {v.type}"
        return text if v.code is None else f"{text} {proto} code {v.code}"
    if v.code is None:
        return f"{proto} type != {v.type}"
    return f"{proto} type . {proto} code != {{ {v.type} . {v.code} }}"


# nft 1.0.6 merges negated compares of neighbouring header fields into ONE compare of both
# (``arp operation != 1 arp saddr ether != M`` becomes "not (operation 1 and sender M)"), which
# matches when either field differs. A no-op all-ones mask keeps each compare on its own; it is
# added when a rule has two or more negated plain compares (found by simulate's differential
# test against the kernel).
_FIELD_BITS = {Field.ETHER_SRC: 48, Field.ETHER_DST: 48, Field.SRC_MAC: 48, Field.ETHER_TYPE: 16,
               Field.VLAN_ENCAP: 16, Field.ARP_HTYPE: 16, Field.ARP_PTYPE: 16, Field.ARP_OPCODE: 16,
               Field.ARP_SHA: 48, Field.ARP_THA: 48, Field.ARP_SPA: 32, Field.ARP_TPA: 32, Field.IP_PROTO: 8,
               Field.SPORT: 16, Field.DPORT: 16, Field.ICMP_TYPE: 8, Field.IP_SRC: 0, Field.IP_DST: 0}
_PLAIN_NEGATED_RE = re.compile(r"^(?P<expr>(?!meta |ct )[^&{}]+?) != (?P<value>[^\s&{}/-]+)$")


def _all_ones(value: str, bits: int) -> str:
    """A mask of all ones written like ``value`` (MAC, IPv4, IPv6 or a number of ``bits``)."""
    if re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", value):
        return "ff:ff:ff:ff:ff:ff"
    if re.fullmatch(r"[0-9.]+", value) and value.count(".") == 3:
        return "255.255.255.255"
    if ":" in value:
        return ":".join(["ffff"] * 8)
    return "0x" + "f" * (bits // 4)


def _unmerged(cond: Cond, text: str) -> str:
    found = _PLAIN_NEGATED_RE.match(text)
    if not cond.negated or cond.field not in _FIELD_BITS or not found:
        return text
    return f"{found['expr']} & {_all_ones(found['value'], _FIELD_BITS[cond.field])} != {found['value']}"


def _render_conds(conds: Sequence[Cond], ctx: _RuleContext) -> list[str]:
    guards = _arp_guards(conds, ctx) if ctx.layer == "l2" else {}
    out: list[str] = []
    tail: list[str] = []  # statements with side effects (connlimit) come after every match
    rendered = [(cond, _render_cond(cond, ctx)) for cond in conds]
    if sum(1 for cond, text in rendered if _unmerged(cond, text) != text) >= 2:
        rendered = [(cond, _unmerged(cond, text)) for cond, text in rendered]
    for cond, text in rendered:
        for guard in guards.get(cond.field, ()):
            if guard not in out:
                out.append(guard)
        if not text:
            continue
        (tail if cond.field is Field.CONNLIMIT_ABOVE else out).append(text)
    return out + tail


def _l2_context(conds: Sequence[Cond], origin: str) -> _RuleContext:
    ethertype = next((c.value for c in conds if c.field is Field.ETHER_TYPE and not c.negated), None)
    family = {0x0800: 4, 0x86DD: 6}.get(ethertype)
    if family is None:
        family = next((c.value.family for c in conds
                       if c.field in (Field.IP_SRC, Field.IP_DST, Field.IP_SRC_RANGE, Field.IP_DST_RANGE)),
                      None)
    return _RuleContext(origin, "l2", family, ethertype)


def _verdict_text(verdict: Verdict, *, reject: str) -> str:
    if verdict is Verdict.ACCEPT:
        return "accept"
    if verdict is Verdict.DROP:
        return "drop"
    if verdict is Verdict.RETURN:
        return "return"
    if verdict is Verdict.REJECT:
        return reject
    return "counter"  # CONTINUE: a rule without verdict (counted, so it stays visible)


def _join(parts: Iterable[str]) -> str:
    return " ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------
# Rules


def l2_jump(conds: Sequence[Cond], sub: str, target: str) -> str:
    """A root-chain rule jumping to the sub-chain ``target`` (the IR's ``sub``) under ``conds``."""
    return _join([*_jump_conditions(tuple(conds), sub), f"jump {target}"])


@lru_cache(maxsize=CACHE_SIZE)
def _jump_conditions(conds: tuple[Cond, ...], sub: str) -> tuple[str, ...]:
    return tuple(_render_conds(conds, _l2_context(conds, f"jump to chain '{sub}'")))


@lru_cache(maxsize=CACHE_SIZE)
def l2_rule(rule: L2Rule) -> str | None:
    """An L2 rule (reject is drop at L2: ebtables cannot reject); None if it never matches."""
    ctx = _l2_context(rule.conds, rule.origin)
    try:
        parts = _render_conds(rule.conds, ctx)
    except _NeverMatches:
        return None
    return _join(parts + [_verdict_text(rule.verdict, reject="drop")])


def l3_rule(rule: L3Rule, *, inet: bool, reject: str, new_set: NewSet) -> str | None:
    """An L3 rule for the inet table (``inet``) or the bridge table; None if it never matches."""
    if any(cond.field is Field.CONNLIMIT_ABOVE for cond in rule.conds):
        return _l3_rule(rule, inet, reject, new_set)  # names a set of its port: not shared
    return _shared_l3_rule(rule, inet, reject)


@lru_cache(maxsize=CACHE_SIZE)
def _shared_l3_rule(rule: L3Rule, inet: bool, reject: str) -> str | None:
    return _l3_rule(rule, inet, reject, None)


def _l3_rule(rule: L3Rule, inet: bool, reject: str, new_set: NewSet | None) -> str | None:
    if rule.family not in (4, 6):
        raise NwfilterError(f"{rule.origin}: unknown IP family {rule.family}")
    if rule.protocol != "all" and rule.protocol not in _L4PROTO:
        raise UnsupportedError(f"{rule.origin}: protocol '{rule.protocol}' is not known to the nftables backend")
    ctx = _RuleContext(rule.origin, "l3", rule.family, None, new_set)
    if inet:
        parts = [f"meta nfproto {'ipv4' if rule.family == 4 else 'ipv6'}"]
    else:
        parts = [f"ether type {hex_text(_ETHERTYPE_IP[rule.family])}"]
    if rule.protocol != "all":
        parts.append(f"meta l4proto {_L4PROTO[rule.protocol]}")
    try:
        parts += _render_conds(rule.conds, ctx)
    except _NeverMatches:
        return None
    parts.append(_verdict_text(rule.verdict, reject=reject))
    if rule.comment:
        parts.append(f"comment {quote(comment_text(rule.comment))}")
    return _join(parts)


def mark_rule(mask: int, value: int) -> str:
    """Sets the ``mask`` bits of the packet mark to ``value``, keeping the others."""
    return f"meta mark set meta mark & {hex_text(0xFFFFFFFF ^ mask, 8)} | {hex_text(value, 8)}"

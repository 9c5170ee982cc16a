"""nftables backend (the default): :class:`~libvirt_nwfilter.ir.PortRuleset` → one ``nft -f -``.

Pure: :meth:`NftablesBackend.plan` turns a batch of port changes into ONE ``nft -f -`` step (one
kernel transaction) and a per-port record; nothing here runs a process or lists the ruleset, so
the text of a change does not depend on how many other ports exist.

Layout (semantics.md §1, §14)
=============================

Only our own tables are touched: ``table bridge libvirt_nwfilter`` always, and in the ``inet``
conntrack mode also ``table inet libvirt_nwfilter``. Base chains (policy accept) and verdict maps:

================ ======= ===================== ============================================
chain            table   hook, priority         rules
================ ======= ===================== ============================================
``l2-from-vm``   bridge  prerouting, -300       ``iifname vmap @l2_from_vm``  (libvirt-I)
``l2-to-vm``     bridge  postrouting, 300       ``oifname vmap @l2_to_vm``    (libvirt-O)
*conntrack="bridge"* (needs nf_conntrack_bridge):
``l3-fwd``       bridge  forward, 0             ``iifname vmap @fi``, ``oifname vmap @fo``
``l3-input``     bridge  input, 0               ``iifname vmap @hi``
*conntrack="inet"* (br_netfilter, bridge-nf-call-ip(6)tables=1):
``mark-out``     bridge  forward, -200          ``oifname vmap @mark_out``
``l3-fwd``       inet    forward, 0             ``meta mark & IN vmap @fi``, ``meta mark & OUT vmap @fo``
``l3-input``     inet    input, 0               ``meta mark & IN vmap @hi``
================ ======= ===================== ============================================

Every map element is a ``jump`` to a per-port chain, so ``return`` (and falling off the end) goes
back to the base chain: a port's L2 root chain falling off = the frame continues (accepted at this
hook); FI falling off or returning continues with the destination port's FO (libvirt's
``accept`` = RETURN in FI/HI). ``accept`` inside any of our chains ends our base chain only.

In the inet mode the inet family cannot see bridge ports (``iifname`` there is the bridge), so a
port with L3 rules gets a small numeric id (1..4095) carried in the packet mark: the ingress id
is set (with a mask, other bits preserved) by the first rule of the port's L2 from-VM root chain at
bridge prerouting, the egress id by the port's ``MO-`` chain at bridge forward -200 (before
br_netfilter calls the inet forward hook). Layout with the defaults (``mark_shift=8``,
``id_bits=12``): ingress id in bits 20..31 (``0xfff00000``), egress id in bits 8..19
(``0x000fff00``); bits 0..7 are left to others. ``port_ids`` (``type mark : ifname``) registers
each id with its port, so a batch that would give an id in use to another port is refused by the
kernel instead of silently sharing it.

Per-port chains carry a generation number (a chain cannot be renamed in the batch that creates
it): ``I-<gen>/<port>`` (from-VM root), ``I-<gen>/<port>/<sub>`` (sub-chains), ``O-…`` (to-VM),
``FI-``, ``FO-``, ``HI-`` (L3 copies), ``MO-`` (egress mark), sets ``CL-<gen>/<port>/<n>``
(connlimit). In names ``_`` is written ``__`` and ``:`` ``_c`` (a quoted chain name is not
accepted by nft 1.0.6; ``/`` cannot occur in port or chain names, so names never collide).

A change, in one transaction: ensure tables, maps and base chains (``add`` is idempotent; each
base chain is flushed and refilled with its 1-2 dispatch rules), add the new chains and sets,
their rules, ``delete element`` the elements the old record lists, ``add element`` the new ones,
then flush and delete the old chains and sets. A refused batch changes nothing.

Drift detection and recovery (``verify``, ``reapply``, hook ``reconnect``)
==========================================================================

* :meth:`NftablesBackend.survey_steps`: one ``nft list ruleset`` (never fails because a table of
  ours is missing; foreign tables are skipped unparsed).
* :meth:`~NftablesBackend.kernel_digests`: parses the survey into one view of our tables and
  digests each port (:func:`port_digest`). Digests compare the live kernel with a reference
  kernel built from the records (:meth:`~NftablesBackend.rebuild_plan` in a throw-away network
  namespace), never with what a change applied: plans stay plain ``nft -f -`` (``nft -e`` would
  make every change load nft's whole cache, 22 → 142 ms for a one-port change at 1000 ports).
  So a port's digest is independent of its generation (chain and set names become roles), of
  the other ports and of its mark id (the id, which each kernel may assign differently, becomes
  a role token in the map keys and the mark rules; an id that differs between them does not).
* :meth:`~NftablesBackend.rebuild_plan`: deletes both tables and re-creates every port in one
  transaction.

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
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from ..errors import NwfilterError, UnsupportedError, ValidationError
from ..ir import (
    Cond,
    Field,
    Icmpv6Range,
    IcmpType,
    IpNet,
    IpRange,
    Jump,
    L2Rule,
    L3Rule,
    MacMatch,
    NumRange,
    PortRuleset,
    TcpFlags,
    Verdict,
)
from .base import Plan, PortChange, PortRecord, Step, canonical_digest

TABLE = "libvirt_nwfilter"
PROBE_TABLE = "libvirt_nwfilter_probe"
RECORD_FORMAT = 1
DEFAULT_NFT = "/usr/sbin/nft"
CONNTRACK_MODES = ("inet", "bridge")
PORT_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,15}\Z")
_CHAIN_PART_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
COMMENT_MAX_BYTES = 128

# Base-chain priorities (see the module docstring).
PRIO_L2_FROM_VM = -300  # like ebtables' nat PREROUTING (dstnat)
PRIO_L2_TO_VM = 300  # like ebtables' nat POSTROUTING (srcnat)
# libvirt creates its ebtables chains with policy ACCEPT: a frame that falls off the end of a
# sub-chain is accepted (observed: tests/ORACLE.md, every chain ends with "counter accept").
SUBCHAIN_END_VERDICT = "accept"
PRIO_MARK_OUT = -200  # before br_netfilter's forward hook (-1)
PRIO_L3 = 0  # like iptables' filter FORWARD / INPUT

_L4PROTO = {"tcp": 6, "udp": 17, "udplite": 136, "esp": 50, "ah": 51, "sctp": 132, "icmp": 1,
            "igmp": 2, "icmpv6": 58}
_ETHERTYPE_IP = {4: 0x0800, 6: 0x86DD}
_TCP_FLAG_NAMES = ((0x01, "fin"), (0x02, "syn"), (0x04, "rst"), (0x08, "psh"), (0x10, "ack"),
                   (0x20, "urg"))

# XML attribute names, for messages about refused fields.
_ATTRIBUTE = {
    Field.IPSET: "ipset",
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


# ----------------------------------------------------------------------------------------------
# Names


def check_port_name(port: str) -> str:
    """``port`` if it is a safe interface name ([A-Za-z0-9_.:-]{1,15}), else ValidationError."""
    if not isinstance(port, str) or not PORT_NAME_RE.match(port) or port in (".", ".."):
        raise ValidationError([f"port name {port!r} is not a valid interface name "
                               "(1-15 characters of A-Z a-z 0-9 _ . : -)"])
    return port


def _encode(part: str) -> str:
    """An identifier-safe, injective spelling of a port or chain name part."""
    return part.replace("_", "__").replace(":", "_c")


def _chain_name(kind: str, gen: int, port: str, sub: str | None = None) -> str:
    name = f"{kind}-{gen}/{_encode(port)}"
    if sub is not None:
        if not _CHAIN_PART_RE.match(sub):
            raise ValidationError([f"sub-chain name {sub!r} contains characters nft cannot take"])
        name += "/" + _encode(sub)
    return name


def _quote(text: str) -> str:
    """A double-quoted nft string (callers guarantee there is no ``"``)."""
    assert '"' not in text
    return f'"{text}"'


def _sanitize_comment(text: str) -> str:
    """A comment nft accepts: no ``"`` (not expressible), no control characters, ≤128 bytes."""
    cleaned = "".join("'" if ch == '"' else (" " if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                      for ch in text)
    data = cleaned.encode("utf-8")
    if len(data) > COMMENT_MAX_BYTES:
        data = data[:COMMENT_MAX_BYTES]
        cleaned = data.decode("utf-8", errors="ignore")
    return cleaned


# ----------------------------------------------------------------------------------------------
# Values


def _hex(value: int, width: int = 4) -> str:
    return f"0x{value:0{width}x}"


def _num_range(value: NumRange | int) -> str:
    if isinstance(value, int):
        return str(value)
    return str(value.low) if value.low == value.high else f"{value.low}-{value.high}"


def _mac_mask(prefix: int) -> str:
    bits = ((1 << 48) - 1) ^ ((1 << (48 - prefix)) - 1) if prefix else 0
    return ":".join(f"{(bits >> (8 * (5 - i))) & 0xFF:02x}" for i in range(6))


def _mac_int(mac: str) -> int:
    return int(mac.replace(":", ""), 16)


def _mac_text(value: int) -> str:
    return ":".join(f"{(value >> (8 * (5 - i))) & 0xFF:02x}" for i in range(6))


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
    masked = _mac_text(_mac_int(mac) & _mac_int(_mac_mask(value.prefix)))
    return f"{expr} & {_mac_mask(value.prefix)} {'!=' if negated else '=='} {masked}"


def _tcp_flags_text(bits: int) -> str:
    names = [name for bit, name in _TCP_FLAG_NAMES if bits & bit]
    if not names:
        return "0x0"
    return names[0] if len(names) == 1 else "(" + "|".join(names) + ")"


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
    new_set: object = None  # callable(family) -> set name, for connlimit (L3 only)


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
        text = f"{expr} {_hex(value) if key == 'ptype' or raw else value}"
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
        return f"ether type {op}{_hex(v)}"
    if f is Field.VLAN_ID:
        return f"vlan id {op}{v}"
    if f is Field.VLAN_ENCAP:
        return f"vlan type {op}{_hex(v)}"

    if f in (Field.ARP_HTYPE, Field.ARP_PTYPE, Field.ARP_OPCODE):
        key = {Field.ARP_HTYPE: "htype", Field.ARP_PTYPE: "ptype", Field.ARP_OPCODE: "operation"}[f]
        expr, raw = _arp_expr(key, ctx)
        value = _hex(v) if (raw or f is Field.ARP_PTYPE) else str(v)
        return f"{expr} {op}{value}"
    if f in (Field.ARP_SHA, Field.ARP_THA):
        expr, raw = _arp_expr("saddr ether" if f is Field.ARP_SHA else "daddr ether", ctx)
        mac = v.mac if isinstance(v, MacMatch) else v
        value = _hex(_mac_int(mac), 12) if raw else mac.lower()
        return f"{expr} {op}{value}"
    if f in (Field.ARP_SPA, Field.ARP_TPA):
        expr, raw = _arp_expr("saddr ip" if f is Field.ARP_SPA else "daddr ip", ctx)
        network = ipaddress.ip_network(f"{v.address}/{v.prefix}", strict=False)
        if not raw:
            return f"{expr} {op}{_net_text(v)}"
        address = int(network.network_address)
        if network.prefixlen == 32:
            return f"{expr} {op}{_hex(address, 8)}"
        mask = int(network.netmask)
        return f"{expr} & {_hex(mask, 8)} {'!=' if neg else '=='} {_hex(address, 8)}"

    if f in (Field.IP_SRC, Field.IP_DST):
        family = v.family
        direction = "saddr" if f is Field.IP_SRC else "daddr"
        return f"{_ip_expr(family)} {direction} {op}{_net_text(v)}"
    if f in (Field.IP_SRC_RANGE, Field.IP_DST_RANGE):
        direction = "saddr" if f is Field.IP_SRC_RANGE else "daddr"
        return f"{_ip_expr(v.family)} {direction} {op}{_range_text(v)}"
    if f is Field.IP_PROTO:
        if ctx.family == 4:
            return f"ip protocol {op}{v}"
        return f"meta l4proto {op}{v}"
    if f is Field.DSCP:
        family = ctx.family or 4
        return f"{_ip_expr(family)} dscp {op}{v}"
    if f in (Field.SPORT, Field.DPORT):
        return f"th {'sport' if f is Field.SPORT else 'dport'} {op}{_num_range(v)}"
    if f is Field.ICMPV6_TYPE_CODE:
        return _icmpv6_range(v, neg)
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


def _render_conds(conds: Sequence[Cond], ctx: _RuleContext) -> list[str]:
    guards = _arp_guards(conds, ctx) if ctx.layer == "l2" else {}
    out: list[str] = []
    tail: list[str] = []  # statements with side effects (connlimit) come after every match
    for cond in conds:
        for guard in guards.get(cond.field, ()):
            if guard not in out:
                out.append(guard)
        text = _render_cond(cond, ctx)
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
# Per-port objects


@dataclass
class _Obj:
    """What one port puts into the kernel for one generation."""

    chains: list[tuple[str, str]] = field(default_factory=list)  # (family, name)
    rules: list[tuple[str, str, str]] = field(default_factory=list)  # (family, chain, rule)
    sets: list[tuple[str, str, str]] = field(default_factory=list)  # (family, name, spec)
    elements: list[tuple[str, str, object, str]] = field(default_factory=list)  # (family, map, key, data)


def port_id(record: PortRecord | None) -> int | None:
    """The mark id a record holds (None when the port has none)."""
    if not record:
        return None
    value = record.get("id")
    return int(value) if value is not None else None


class NftablesBackend:
    """Renders port changes as one nftables transaction (see the module docstring)."""

    name = "nftables"
    rebuild_reads_kernel = False  # rebuild_plan deletes and re-creates our tables

    def __init__(self, conntrack: str = "inet", l2_reject: bool = False, nft: str = DEFAULT_NFT,
                 *, mark_shift: int = 8, id_bits: int = 12):
        if conntrack not in CONNTRACK_MODES:
            raise ValueError(f"conntrack must be one of {CONNTRACK_MODES}, not {conntrack!r}")
        if id_bits < 1 or mark_shift < 0 or mark_shift + 2 * id_bits > 32:
            raise ValueError("mark layout does not fit in 32 bits")
        self.conntrack = conntrack
        self.l2_reject = l2_reject
        self.nft = nft
        self.mark_shift = mark_shift
        self.id_bits = id_bits
        self.max_id = (1 << id_bits) - 1
        self.out_shift = mark_shift
        self.in_shift = mark_shift + id_bits
        self.out_mask = self.max_id << self.out_shift
        self.in_mask = self.max_id << self.in_shift

    # -- public ----------------------------------------------------------------------------------
    @property
    def needs_br_netfilter(self) -> bool:
        """True when L3 rules only work with br_netfilter and bridge-nf-call-ip(6)tables=1."""
        return self.conntrack == "inet"

    def plan(self, changes: Sequence[PortChange], ids_in_use: Iterable[int] | None = None,
             others: Mapping[str, PortRecord] | Iterable[PortRecord] | None = None,
             ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """One ``nft -f -`` step for all ``changes`` and each changed port's new record.

        ``others``: the records of ports NOT in ``changes`` (a mapping port → record, or just the
        records); ``ids_in_use``: further mark ids to avoid. Both only matter in the inet mode,
        where a port with L3 rules needs an id no other port uses. ``ids_in_use`` given (even
        empty) means every id in use is known, as with ``others``. With ``others`` (even empty)
        a new port gets the lowest id free of every known record; with ``others=None`` (the other
        ports are unknown) the search starts at a position derived from the port name, so that
        ports created one by one rarely clash. A clash is refused by the kernel (the
        ``port_ids`` map), never shared.
        """
        if ids_in_use is not None and others is None:
            others = {}
        text, records = self.render(changes, others, ids_in_use=ids_in_use or ())
        return self._plan_for(text), records

    def rebuild_plan(self, changes: Sequence[PortChange], survey: Sequence[str] = (),
                     ids_in_use: Iterable[int] | None = None,
                     ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """Like :meth:`plan`, but the transaction first deletes our tables and re-creates only the
        ports in ``changes`` (which must therefore be ALL filtered ports; ``old`` records only keep
        ids and generations, and may be stale, missing or of another backend). For ``reapply``
        when the kernel may not match the records (e.g. after ``nft flush ruleset``): atomic, and
        never fails because of missing old objects. ``survey`` (the outputs of
        :meth:`survey_steps`) is not needed: deleting both tables removes whatever is left."""
        del survey  # deleting the tables makes the plan independent of what the kernel has
        cleaned: list[PortChange] = []
        claimed: set[int] = set()
        for change in changes:
            old = _reusable(change.old, self.name, self.conntrack)
            if old is not None:
                pid = port_id(old)
                if pid is not None and (pid in claimed or not 1 <= pid <= self.max_id):
                    old["id"] = None  # a corrupt state gave two ports one id: renumber
                elif pid is not None:
                    claimed.add(pid)
            cleaned.append(PortChange(change.port, old, change.new))
        text, records = self.render(cleaned, {}, ids_in_use=ids_in_use or (), rebuild=True)
        return self._plan_for(text), records

    # -- reading the kernel back: survey and digests ------------------------------------------
    def survey_steps(self) -> tuple[Step, ...]:
        """One read-only step listing the whole ruleset (never fails for missing tables of ours;
        foreign tables are skipped by the parser)."""
        return (Step((self.nft, "list", "ruleset"), ignore_errors=True),)

    def kernel_digests(self, outputs: Sequence[str], records: Mapping[str, PortRecord | None],
                       ) -> dict[str, str | None]:
        """Per recorded port, the digest of what the kernel has for it (see :func:`port_digest`),
        from the outputs of :meth:`survey_steps` ("" for a failed step). None: nothing of the
        port was found although its record expects something. Equal for the same port in two
        kernels holding the same rules for it, whatever its generation and mark id there."""
        index = _Index.build(parse_listing("".join(outputs)))
        out: dict[str, str | None] = {}
        for port, record in records.items():
            if record is None:
                continue
            structure = _port_structure(index, port, record, self._id_forms(record))
            if structure is None and not _expects_nothing(record):
                out[port] = None
            else:
                out[port] = port_digest(structure)
        return out

    def render(self, changes: Sequence[PortChange], others=None, *, ids_in_use: Iterable[int] = (),
               rebuild: bool = False) -> tuple[str, dict[str, PortRecord | None]]:
        """The batch text and the new records (pure; what :meth:`plan` wraps in a Step)."""
        seen: set[str] = set()
        for change in changes:
            check_port_name(change.port)
            if change.port in seen:
                raise NwfilterError(f"port {change.port} appears twice in one batch")
            seen.add(change.port)
            if change.old is not None:
                _check_record(change.port, change.old)

        taken = {int(i) for i in ids_in_use}
        if others is not None:
            values = others.values() if isinstance(others, Mapping) else others
            taken |= {i for i in (port_id(r) for r in values) if i is not None}
        taken |= {i for i in (port_id(c.old) for c in changes) if i is not None}

        lines: list[str] = [f"# libvirt-nwfilter: nftables batch (conntrack={self.conntrack})"]
        if rebuild:
            for family in ("bridge", "inet"):
                lines.append(f"add table {family} {TABLE}")
                lines.append(f"delete table {family} {TABLE}")
        lines += self._ensure_lines()

        news: list[tuple[PortChange, _Obj]] = []
        records: dict[str, PortRecord | None] = {}
        for change in changes:
            if change.new is None:
                records[change.port] = None
                continue
            old_id = port_id(change.old) if (change.old or {}).get("mode", "inet") == "inet" else None
            needs_id = self.conntrack == "inet" and bool(change.new.fi or change.new.fo or change.new.hi)
            pid = None
            if needs_id:
                pid = old_id if old_id is not None else self._allocate(taken, change.port, others is not None)
                taken.add(pid)
            gen = int((change.old or {}).get("gen", 0)) + 1
            obj = self._port_objects(change.port, gen, pid, change.new)
            news.append((change, obj))
            records[change.port] = {
                "backend": self.name,
                "format": RECORD_FORMAT,
                "mode": self.conntrack,
                "gen": gen,
                "id": pid,
                "chains": [[fam, name] for fam, name in obj.chains],
                "sets": [[fam, name] for fam, name, _ in obj.sets],
                "elements": [[fam, m, key] for fam, m, key, _ in obj.elements],
            }

        # 1. new chains and sets, then their rules (jumps need their targets to exist)
        for change, obj in news:
            lines.append(f"# port {change.port}: generation {records[change.port]['gen']}")
            lines += [f"add chain {fam} {TABLE} {name}" for fam, name in obj.chains]
            lines += [f"add set {fam} {TABLE} {name} {{ {spec} }}" for fam, name, spec in obj.sets]
            lines += [f"add rule {fam} {TABLE} {chain} {rule}" for fam, chain, rule in obj.rules]
        olds = [c for c in changes if c.old is not None and not rebuild]
        # 2. switch the dispatch: old elements out, new elements in
        if olds or news:
            lines.append("# switch")
        for change in olds:
            for fam, map_name, key in change.old.get("elements", ()):
                lines.append(f"delete element {fam} {TABLE} {map_name} {{ {_key_text(key)} }}")
        for change, obj in news:
            for fam, map_name, key, data in obj.elements:
                lines.append(f"add element {fam} {TABLE} {map_name} {{ {_key_text(key)} : {data} }}")
        # 3. remove the old generation
        if olds:
            lines.append("# remove old generations")
        for change in olds:
            lines += [f"flush chain {fam} {TABLE} {name}" for fam, name in change.old.get("chains", ())]
        for change in olds:
            lines += [f"delete chain {fam} {TABLE} {name}" for fam, name in change.old.get("chains", ())]
            lines += [f"delete set {fam} {TABLE} {name}" for fam, name in change.old.get("sets", ())]
        return "\n".join(lines) + "\n", records

    def teardown_plan(self) -> Plan:
        """Remove all our tables (both families); succeeds whether they exist or not."""
        return Plan(apply=remove_all_steps(self.nft))

    # -- internals -------------------------------------------------------------------------------
    def _plan_for(self, text: str) -> Plan:
        return Plan(apply=(Step((self.nft, "-f", "-"), text),))

    def _id_forms(self, record: PortRecord) -> _IdForms:
        """How the mark id of ``record`` shows in a listing, per role token (nothing when the
        record has no sane id)."""
        try:
            pid = port_id(record) if record.get("mode", "inet") == "inet" else None
        except (TypeError, ValueError):
            pid = None
        if pid is None or isinstance(record.get("id"), bool) or not 1 <= pid <= self.max_id:
            return _IdForms()
        ingress, egress = pid << self.in_shift, pid << self.out_shift
        keep_in, keep_out = 0xFFFFFFFF ^ self.in_mask, 0xFFFFFFFF ^ self.out_mask
        return _IdForms(
            keys={("fi", ingress): "<id:in>", ("hi", ingress): "<id:in>", ("fo", egress): "<id:out>",
                  ("port_ids", pid): "<id>"},
            # nft lists ``& KEEP | V`` as ``& (KEEP | V) | V``; both forms are the same statement
            marks={(keep_in, ingress): "<keep:in> | <id:in>", (keep_in | ingress, ingress): "<keep:in> | <id:in>",
                   (keep_out, egress): "<keep:out> | <id:out>",
                   (keep_out | egress, egress): "<keep:out> | <id:out>"},
        )

    def _allocate(self, taken: set[int], port: str, know_others: bool) -> int:
        start = 0 if know_others else zlib.crc32(port.encode()) % self.max_id
        for offset in range(self.max_id):
            candidate = (start + offset) % self.max_id + 1
            if candidate not in taken:
                return candidate
        raise UnsupportedError(f"no free port id: the nftables backend's inet mode supports at most "
                               f"{self.max_id} ports with L3 rules")

    def _ensure_lines(self) -> list[str]:
        b = f"bridge {TABLE}"
        lines = [
            f"add table {b}",
            f"add map {b} l2_from_vm {{ type ifname : verdict; }}",
            f"add map {b} l2_to_vm {{ type ifname : verdict; }}",
            f"add chain {b} l2-from-vm {{ type filter hook prerouting priority {PRIO_L2_FROM_VM}; policy accept; }}",
            f"add chain {b} l2-to-vm {{ type filter hook postrouting priority {PRIO_L2_TO_VM}; policy accept; }}",
            f"flush chain {b} l2-from-vm",
            f"add rule {b} l2-from-vm iifname vmap @l2_from_vm",
            f"flush chain {b} l2-to-vm",
            f"add rule {b} l2-to-vm oifname vmap @l2_to_vm",
        ]
        if self.conntrack == "bridge":
            lines += [
                f"add map {b} fi {{ type ifname : verdict; }}",
                f"add map {b} fo {{ type ifname : verdict; }}",
                f"add map {b} hi {{ type ifname : verdict; }}",
                f"add chain {b} l3-fwd {{ type filter hook forward priority {PRIO_L3}; policy accept; }}",
                f"add chain {b} l3-input {{ type filter hook input priority {PRIO_L3}; policy accept; }}",
                f"flush chain {b} l3-fwd",
                f"add rule {b} l3-fwd iifname vmap @fi",
                f"add rule {b} l3-fwd oifname vmap @fo",
                f"flush chain {b} l3-input",
                f"add rule {b} l3-input iifname vmap @hi",
            ]
        else:
            i = f"inet {TABLE}"
            lines += [
                f"add map {b} mark_out {{ type ifname : verdict; }}",
                f"add chain {b} mark-out {{ type filter hook forward priority {PRIO_MARK_OUT}; policy accept; }}",
                f"flush chain {b} mark-out",
                f"add rule {b} mark-out oifname vmap @mark_out",
                f"add table {i}",
                f"add map {i} fi {{ type mark : verdict; }}",
                f"add map {i} fo {{ type mark : verdict; }}",
                f"add map {i} hi {{ type mark : verdict; }}",
                f"add map {i} port_ids {{ type mark : ifname; }}",
                f"add chain {i} l3-fwd {{ type filter hook forward priority {PRIO_L3}; policy accept; }}",
                f"add chain {i} l3-input {{ type filter hook input priority {PRIO_L3}; policy accept; }}",
                f"flush chain {i} l3-fwd",
                f"add rule {i} l3-fwd meta mark & {_hex(self.in_mask, 8)} vmap @fi",
                f"add rule {i} l3-fwd meta mark & {_hex(self.out_mask, 8)} vmap @fo",
                f"flush chain {i} l3-input",
                f"add rule {i} l3-input meta mark & {_hex(self.in_mask, 8)} vmap @hi",
            ]
        return lines

    def _port_objects(self, port: str, gen: int, pid: int | None, rs: PortRuleset) -> _Obj:
        obj = _Obj()
        qport = _quote(port)
        inet = self.conntrack == "inet"
        l3_family = "inet" if inet else "bridge"

        # L2, both sides
        for kind, side, map_name, mark in (
            ("I", rs.from_vm, "l2_from_vm", pid is not None and bool(rs.fi or rs.hi)),
            ("O", rs.to_vm, "l2_to_vm", False),
        ):
            if side.empty and not mark:
                continue
            root = _chain_name(kind, gen, port)
            obj.chains.append(("bridge", root))
            subs = {sub.name: _chain_name(kind, gen, port, sub.name) for sub in side.subchains}
            obj.chains += [("bridge", name) for name in subs.values()]
            if mark:
                obj.rules.append(("bridge", root, self._mark_rule(self.in_mask, pid << self.in_shift)))
            self._l2_rules(obj, root, side.root, subs)
            for sub in side.subchains:
                self._l2_rules(obj, subs[sub.name], sub.rules, subs)
                obj.rules.append(("bridge", subs[sub.name], SUBCHAIN_END_VERDICT))
            obj.elements.append(("bridge", map_name, port, f"jump {root}"))

        # L3 copies
        reject = "reject" if (inet or self.l2_reject) else "drop"
        set_counter = [0]

        def new_set(family: int) -> str:
            set_counter[0] += 1
            name = _chain_name("CL", gen, port, str(set_counter[0]))
            kind = "ipv4_addr" if family == 4 else "ipv6_addr"
            obj.sets.append((l3_family, name, f"type {kind}; size 65535; flags dynamic;"))
            return name

        for kind, rules, map_name, shift in (("FI", rs.fi, "fi", "in"), ("FO", rs.fo, "fo", "out"),
                                             ("HI", rs.hi, "hi", "in")):
            if not rules:
                continue
            chain = _chain_name(kind, gen, port)
            obj.chains.append((l3_family, chain))
            for rule in rules:
                text = self._l3_rule(rule, reject, new_set)
                if text is not None:
                    obj.rules.append((l3_family, chain, text))
            if inet:
                key = pid << (self.in_shift if shift == "in" else self.out_shift)
            else:
                key = port
            obj.elements.append((l3_family, map_name, key, f"jump {chain}"))

        if inet and pid is not None:
            if rs.fo:
                chain = _chain_name("MO", gen, port)
                obj.chains.append(("bridge", chain))
                obj.rules.append(("bridge", chain, self._mark_rule(self.out_mask, pid << self.out_shift)))
                obj.elements.append(("bridge", "mark_out", port, f"jump {chain}"))
            obj.elements.append(("inet", "port_ids", pid, qport))
        return obj

    @staticmethod
    def _mark_rule(mask: int, value: int) -> str:
        return f"meta mark set meta mark & {_hex(0xFFFFFFFF ^ mask, 8)} | {_hex(value, 8)}"

    def _l2_rules(self, obj: _Obj, chain: str, entries, subs: Mapping[str, str]) -> None:
        for entry in entries:
            if isinstance(entry, Jump):
                if entry.chain not in subs:
                    raise NwfilterError(f"jump to unknown sub-chain '{entry.chain}'")
                ctx = _l2_context(entry.conds, f"jump to chain '{entry.chain}'")
                obj.rules.append(("bridge", chain, _join(_render_conds(entry.conds, ctx) + [f"jump {subs[entry.chain]}"])))
                continue
            assert isinstance(entry, L2Rule)
            ctx = _l2_context(entry.conds, entry.origin)
            try:
                parts = _render_conds(entry.conds, ctx)
            except _NeverMatches:
                continue
            verdict = _verdict_text(entry.verdict, reject="drop")
            obj.rules.append(("bridge", chain, _join(parts + [verdict])))

    def _l3_rule(self, rule: L3Rule, reject: str, new_set) -> str | None:
        if rule.family not in (4, 6):
            raise NwfilterError(f"{rule.origin}: unknown IP family {rule.family}")
        if rule.protocol != "all" and rule.protocol not in _L4PROTO:
            raise UnsupportedError(f"{rule.origin}: protocol '{rule.protocol}' is not known to the nftables backend")
        ctx = _RuleContext(rule.origin, "l3", rule.family, None, new_set)
        if self.conntrack == "inet":
            parts = [f"meta nfproto {'ipv4' if rule.family == 4 else 'ipv6'}"]
        else:
            parts = [f"ether type {_hex(_ETHERTYPE_IP[rule.family])}"]
        if rule.protocol != "all":
            parts.append(f"meta l4proto {_L4PROTO[rule.protocol]}")
        try:
            parts += _render_conds(rule.conds, ctx)
        except _NeverMatches:
            return None
        parts.append(_verdict_text(rule.verdict, reject=reject))
        if rule.comment:
            parts.append(f"comment {_quote(_sanitize_comment(rule.comment))}")
        return _join(parts)


def _reusable(record: PortRecord | None, backend: str, mode: str) -> dict | None:
    """What a rebuild keeps of a stored record: its generation and mark id, when the record is
    one of ours in this mode and those are sane (anything else: start afresh)."""
    if not isinstance(record, Mapping) or record.get("backend") != backend or record.get("mode", "inet") != mode:
        return None
    try:
        gen = int(record.get("gen", 0))
        pid = record.get("id")
        pid = None if pid is None or isinstance(pid, bool) else int(pid)
    except (TypeError, ValueError):
        return None
    return {"backend": backend, "format": RECORD_FORMAT, "mode": mode, "gen": max(gen, 0), "id": pid}


def _key_text(key: object) -> str:
    if isinstance(key, bool):
        raise NwfilterError(f"bad map key {key!r} in a record")
    if isinstance(key, int):
        return _hex(key, 8)
    if isinstance(key, str):
        return _quote(check_port_name(key))
    raise NwfilterError(f"bad map key {key!r} in a record")


_FAMILIES = ("bridge", "inet")
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_./-]{0,254}\Z")
_MAPS = frozenset({"l2_from_vm", "l2_to_vm", "mark_out", "fi", "fo", "hi", "port_ids"})


def _check_record(port: str, record: PortRecord) -> None:
    """Refuse records that are not ours or could inject text into the batch."""
    problems = []
    if record.get("backend") != "nftables":
        problems.append(f"port {port}: record of backend {record.get('backend')!r}, not nftables")
    for entry in list(record.get("chains", ())) + list(record.get("sets", ())):
        if (len(entry) != 2 or entry[0] not in _FAMILIES or not isinstance(entry[1], str)
                or not _NAME_RE.match(entry[1])):
            problems.append(f"port {port}: bad chain/set entry {entry!r} in record")
    for entry in record.get("elements", ()):
        if len(entry) != 3 or entry[0] not in _FAMILIES or entry[1] not in _MAPS:
            problems.append(f"port {port}: bad element entry {entry!r} in record")
    if problems:
        raise NwfilterError("; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Reading the kernel back: listings and digests
#
# ``nft list ruleset`` (the survey) is parsed into one view of our two tables:
#
#   {family: _Table(chains={name: _Chain(spec, [rule, ...])}, sets={name: (spec, ...)},
#                   maps={name: [(key, value), ...]})}
#
# Layout: ``table bridge libvirt_nwfilter {`` / ``\tchain NAME {`` / ``\t\t<rule>`` / ``\t}``;
# a base chain's first line is its spec (``type filter hook … policy accept;``), a set's or map's
# lines are ``type …``, ``size …``, ``flags …`` and ``elements = { k : v, … }`` (wrapped over
# several lines).
#
# Normalisation: counters lose their numbers (``counter packets N bytes M`` → ``counter``),
# handles (``nft -a``) are dropped, chain specs become tuples of ``;``-separated statements,
# dynamic sets' elements (addresses counted by ``ct count``) are ignored. Per port, its chain and
# set names become roles and its mark id a role token (:func:`_port_structure`).

_PORT_OBJECT_RE = re.compile(r"(I|O|FI|FO|HI|MO|CL)-(\d+)/([^/\s]+)(?:/(\S+))?\Z")
_NAME_TOKEN_RE = re.compile(r"(?<![^\s@])([A-Z]{1,2}-\d+/[^\s,{}]+)")
_COUNTER_RE = re.compile(r"\bcounter packets \d+ bytes \d+")
_HANDLE_COMMENT_RE = re.compile(r"\s+# handle \d+\s*\Z")
_MARK_SET_RE = re.compile(r"\bmeta mark set meta mark & (0x[0-9a-fA-F]+) \| (0x[0-9a-fA-F]+)\b")
DIGEST_FORMAT = 2


@dataclass
class _Chain:
    spec: tuple[str, ...] | None = None  # base chains: ("type filter hook … priority …", "policy accept")
    rules: list[str] = field(default_factory=list)


@dataclass
class _Table:
    chains: dict[str, _Chain] = field(default_factory=dict)
    sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    maps: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def _unquote(name: str) -> str:
    return name[1:-1] if len(name) >= 2 and name[0] == name[-1] == '"' else name


def _brace_depth(text: str) -> int:
    """``{`` minus ``}`` outside double-quoted strings."""
    depth, quoted = 0, False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted:
            depth += (ch == "{") - (ch == "}")
    return depth


def _logical_lines(lines: Iterable[str]) -> Iterable[str]:
    """Stripped lines, continuation lines (an open ``{ …``) joined with a space."""
    pending: list[str] = []
    depth = 0
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        pending.append(line)
        depth += _brace_depth(line)
        if depth <= 0:
            yield " ".join(pending)
            pending, depth = [], 0
    if pending:
        yield " ".join(pending)


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` characters outside quotes and braces, parts stripped."""
    parts, current, depth, quoted = [], [], 0, False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == sep and depth == 0:
                parts.append("".join(current).strip())
                current = []
                continue
        current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def _braced(text: str) -> str:
    """The inside of ``{ … }`` (text without braces is returned stripped)."""
    text = text.strip()
    if text.startswith("{") and text.endswith("}"):
        return text[1:-1].strip()
    return text


def _spec(text: str) -> tuple[str, ...]:
    return tuple(" ".join(part.split()) for part in _split_top(_braced(text), ";"))


def _norm_rule(text: str) -> str:
    text = _HANDLE_COMMENT_RE.sub("", text.strip())
    return _COUNTER_RE.sub("counter", text)


def _elements(text: str) -> list[tuple[str, str]]:
    out = []
    for item in _split_top(_braced(text), ","):
        key, sep, value = item.partition(" : ")
        out.append((key.strip(), value.strip()) if sep else (item, ""))
    return out


def _skip_block(lines: list[str], i: int) -> int:
    """Index after the ``}`` closing the top-level block opened on line ``i - 1``."""
    while i < len(lines) and lines[i].rstrip() != "}":
        i += 1
    return i + 1


def parse_listing(text: str) -> dict[str, _Table]:
    """Our tables in ``nft list ruleset`` (or ``nft list table``) output: family → table."""
    view: dict[str, _Table] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith("table "):
            continue
        words = line.split()
        if len(words) < 3 or _unquote(words[2]) != TABLE or words[1] not in _FAMILIES:
            i = _skip_block(lines, i)
            continue
        table = view.setdefault(words[1], _Table())
        body: list[str] = []
        while i < len(lines) and lines[i].rstrip() != "}":
            body.append(lines[i])
            i += 1
        i += 1
        _parse_table_body(table, body)
    return view


def _parse_table_body(table: _Table, body: list[str]) -> None:
    kind = name = None
    content: list[str] = []
    for raw in body:
        stripped = raw.strip()
        if kind is None:
            words = stripped.split()
            if len(words) == 3 and words[2] == "{":
                kind, name, content = words[0], _unquote(words[1]), []
            continue
        if raw.rstrip() == "\t}" or (stripped == "}" and not raw.startswith("\t\t")):
            _add_listed(table, kind, name, list(_logical_lines(content)))
            kind = None
            continue
        content.append(raw)


def _add_listed(table: _Table, kind: str, name: str, lines: list[str]) -> None:
    if kind == "chain":
        chain = table.chains.setdefault(name, _Chain())
        for line in lines:
            if chain.spec is None and not chain.rules and line.startswith("type ") and " hook " in line:
                chain.spec = _spec(line)
            else:
                chain.rules.append(_norm_rule(line))
    elif kind == "set":
        table.sets[name] = tuple(" ".join(line.rstrip(";").split()) for line in lines
                                 if not line.startswith("elements "))
    elif kind == "map":
        elements = table.maps.setdefault(name, [])
        for line in lines:
            if line.startswith("elements "):
                elements += _elements(line.partition("=")[2])


@dataclass(frozen=True)
class _IdForms:
    """How one port's mark id shows in a listing (:meth:`NftablesBackend._id_forms`): map keys
    ``(map, value)`` and mark rules ``(mask, value)`` → the role token written instead."""

    keys: Mapping[tuple[str, int], str] = field(default_factory=dict)
    marks: Mapping[tuple[int, int], str] = field(default_factory=dict)

    def key(self, map_name: str, key: str) -> str:
        try:
            value = int(key, 16) if key.lower().startswith("0x") else None
        except ValueError:
            value = None
        return self.keys.get((map_name, value), key) if value is not None else key

    def rule(self, text: str) -> str:
        def mark(m: re.Match) -> str:
            token = self.marks.get((int(m.group(1), 16), int(m.group(2), 16)))
            return f"meta mark set meta mark & {token}" if token else m.group(0)
        return _MARK_SET_RE.sub(mark, text) if self.marks else text


@dataclass
class _Index:
    """A view indexed by port (the encoded port name in our object names)."""

    view: dict[str, _Table]
    objects: dict[str, list[tuple[str, str, str, str]]] = field(default_factory=dict)  # enc → (fam, kind, name, role)
    by_target: dict[str, list[tuple[str, str, str, str]]] = field(default_factory=dict)  # enc → elements
    by_key: dict[tuple[str, str, str], list[tuple[str, str, str, str]]] = field(default_factory=dict)
    dispatch: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (fam, map) → base chains
    id_owner: dict[str, list[tuple[str, str, str, str]]] = field(default_factory=dict)  # '"port"' → port_ids elements

    @classmethod
    def build(cls, view: dict[str, _Table]) -> "_Index":
        index = cls(view)
        for family, table in view.items():
            for kind, names in (("chain", table.chains), ("set", table.sets)):
                for name in names:
                    m = _PORT_OBJECT_RE.match(name)
                    if m:
                        role = m.group(1) + ("/" + m.group(4) if m.group(4) else "")
                        index.objects.setdefault(m.group(3), []).append((family, kind, name, role))
            for map_name, elements in table.maps.items():
                for key, value in elements:
                    element = (family, map_name, key, value)
                    index.by_key.setdefault((family, map_name, key), []).append(element)
                    if map_name == "port_ids":
                        index.id_owner.setdefault(value, []).append(element)
                    for token in _NAME_TOKEN_RE.findall(value):
                        m = _PORT_OBJECT_RE.match(token)
                        if m:
                            index.by_target.setdefault(m.group(3), []).append(element)
            for chain_name, chain in table.chains.items():
                if chain.spec is None:
                    continue
                for rule in chain.rules:
                    for word in rule.split():
                        if word.startswith("@"):
                            index.dispatch.setdefault((family, word[1:]), []).append(chain_name)
        return index


def _element_keys(port: str, record: PortRecord) -> list[tuple[str, str, str]]:
    keys = []
    for entry in record.get("elements", ()) or ():
        try:
            family, map_name, key = entry
            keys.append((family, map_name, _key_text(key)))
        except (NwfilterError, ValueError, TypeError):
            continue
    return keys


def _port_structure(index: _Index, port: str, record: PortRecord, ids: _IdForms) -> dict | None:
    """What the kernel has for ``port``, normalised (see :func:`port_digest`; ``ids``: the forms
    of the record's mark id); None when nothing of it is found."""
    enc = _encode(port)
    qport = f'"{port}"'
    objects = index.objects.get(enc, [])
    roles = {name: f"<{role}>" for _, _, name, role in objects}

    def subst(text: str) -> str:
        return ids.rule(_NAME_TOKEN_RE.sub(lambda m: roles.get(m.group(1), m.group(1)), text))

    elements: dict[tuple[str, str, str, str], None] = {}
    for element in index.by_target.get(enc, ()):
        if any(roles.get(t) for t in _NAME_TOKEN_RE.findall(element[3])):
            elements[element] = None
    for family in index.view:
        for map_name in ("l2_from_vm", "l2_to_vm", "mark_out", "fi", "fo", "hi"):
            for element in index.by_key.get((family, map_name, qport), ()):
                elements[element] = None
    for element in index.id_owner.get(qport, ()):
        elements[element] = None
    for key in _element_keys(port, record):
        for element in index.by_key.get(key, ()):
            elements[element] = None
    if not objects and not elements:
        return None

    chains, sets = [], []
    for family, kind, name, role in objects:
        table = index.view[family]
        if kind == "chain":
            chain = table.chains[name]
            chains.append([family, role, list(chain.spec or ()), [subst(r) for r in chain.rules]])
        else:
            sets.append([family, role, list(table.sets[name])])
    dispatch = {}
    for family, map_name, _, _ in elements:
        for chain_name in index.dispatch.get((family, map_name), ()):
            chain = index.view[family].chains[chain_name]
            dispatch[(family, chain_name)] = [family, chain_name, list(chain.spec or ()), list(chain.rules)]
    return {
        "chains": sorted(chains),
        "sets": sorted(sets),
        "elements": sorted([f, m, ids.key(m, k), subst(v)] for f, m, k, v in elements),
        "dispatch": [dispatch[k] for k in sorted(dispatch)],
    }


def _expects_nothing(record: PortRecord) -> bool:
    return not (record.get("chains") or record.get("sets") or record.get("elements"))


def port_digest(structure: dict | None) -> str:
    """sha256 (hex) of a port's normalised structure: its chains (role = kind and sub-chain name,
    generation-free; base-chain spec; rules in order with this port's chain and set names
    replaced by roles, counters without numbers, no handles), its sets (spec), the map elements
    that lead to it or carry its name or record keys (``l2_*``, ``fi``/``fo``/``hi``,
    ``mark_out``, ``port_ids``), and the base chains (spec and every rule) that dispatch through
    those maps. The record's mark id, in map keys and in ``meta mark set`` rules, is replaced by
    role tokens (``<id>``, ``<id:in>``, ``<id:out>``), so the digest does not depend on which id
    a kernel's port has, only on its being the same everywhere."""
    return canonical_digest({"backend": "nftables", "format": DIGEST_FORMAT, "port": structure})


# ----------------------------------------------------------------------------------------------
# Probes and teardown


def probe_bridge_conntrack_text() -> str:
    """A throw-away bridge table using ``ct`` (state, direction, count), for ``nft -c -f -``:
    accepted only where the kernel has bridge-family conntrack (nf_conntrack_bridge)."""
    t = f"bridge {PROBE_TABLE}"
    return "\n".join([
        f"add table {t}",
        f"add chain {t} fwd {{ type filter hook forward priority 0; policy accept; }}",
        f"add set {t} cl {{ type ipv4_addr; size 65535; flags dynamic; }}",
        f"add rule {t} fwd ether type 0x0800 ct state established,related ct direction reply accept",
        f"add rule {t} fwd ether type 0x0800 meta l4proto 6 add @cl {{ ip saddr ct count over 4 }} drop",
    ]) + "\n"


def probe_l2_reject_text() -> str:
    """A throw-away bridge table with ``reject`` in forward and input chains (where the bridge
    conntrack mode would use it for L3 rules), for ``nft -c -f -``."""
    t = f"bridge {PROBE_TABLE}"
    return "\n".join([
        f"add table {t}",
        f"add chain {t} fwd {{ type filter hook forward priority 0; policy accept; }}",
        f"add chain {t} in {{ type filter hook input priority 0; policy accept; }}",
        f"add rule {t} fwd ether type 0x0800 meta l4proto 6 reject",
        f"add rule {t} fwd ether type 0x86dd meta l4proto 17 reject",
        f"add rule {t} in ether type 0x0800 reject",
    ]) + "\n"


def check_step(text: str, nft: str = DEFAULT_NFT) -> Step:
    """A step that only checks ``text`` against the kernel (``nft -c -f -``); commits nothing."""
    return Step((nft, "-c", "-f", "-"), text)


def remove_all_text() -> str:
    """Deletes both of our tables whether they exist or not (``add`` first makes it idempotent)."""
    lines = []
    for family in _FAMILIES:
        lines += [f"add table {family} {TABLE}", f"delete table {family} {TABLE}"]
    return "\n".join(lines) + "\n"


def remove_all_steps(nft: str = DEFAULT_NFT) -> tuple[Step, ...]:
    """The step(s) removing ALL our tables (teardown, tests)."""
    return (Step((nft, "-f", "-"), remove_all_text()),)

"""One IR rule → ebtables or iptables arguments (pure; knows nothing of ports or plans).

Deliberate rendering choices (besides semantics.md §12)
--------------------------------------------------------

* ``--vlan-encap`` is written in hex (``0x0806``): ebtables reads the value as hex, so libvirt's
  decimal ``2054`` matches ethertype 0x2054, not ARP.
* ``-p ipv4``/``-p ipv6`` for L2 rules with IP fields, ``-p 0x<hex>`` otherwise; jumps use
  ``-p 0x%04x``; full option names (``--stp-root-prio``, not libvirt's getopt abbreviation
  ``--stp-root-pri``). Within a rule the options follow libvirt's order for the as-written
  direction (a reversed copy lists ``-s`` before ``-d``; equivalent).
* Comments: control characters become spaces (the restore format is line based), at most 255
  bytes (the kernel limit); ``"`` and ``\\`` are escaped.
* DSCP on an L2 ``ipv6`` rule (not produced by the language) would be ``--ip6-tclass``.
* Neighbour Discovery target addresses and options (our extension ``nwf:nd-target``,
  ``nwf:nd-lladdr``) are refused: ebtables' ip6 match reads only addresses, protocol, ports,
  traffic class and ICMPv6 type/code; moving the rule to ip6tables (whose u32 match reads fixed
  offsets) would take it out of its place among the port's L2 rules.
"""

from __future__ import annotations

import re
from typing import Sequence

from ...errors import UnsupportedError
from ...ir import Cond, Field, Icmpv6Range, IcmpType, IpNet, IpRange, IpSet, Jump, L2Rule, L3Rule
from ...ir import MacMatch, NumRange, TcpFlags, Verdict
from ..text import clean_comment, mac_mask, range_text, tcp_flag_names

BGA_MAC = "01:80:c2:00:00:00"
ETH_P_IPV4 = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
ETH_P_VLAN = 0x8100

# iptables comment match limit (XT_MAX_COMMENT_LEN 256 including the terminating NUL).
COMMENT_MAX_BYTES = 255


# --------------------------------------------------------------------------------------------
# Value formatting


def fmt_mac(value: object) -> str:
    """``MacMatch`` → ``MAC`` or ``MAC/MASK`` (mask as MAC text); a plain string is a MAC."""
    if isinstance(value, MacMatch):
        if value.prefix == 48:
            return value.mac
        return f"{value.mac}/{mac_mask(value.prefix)}"
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a MAC, got {value!r}")


def fmt_ip(value: IpNet, *, always_prefix: bool = False) -> str:
    host = 32 if value.family == 4 else 128
    if value.prefix == host and not always_prefix:
        return value.address
    return f"{value.address}/{value.prefix}"


def fmt_range(value: NumRange) -> str:
    return range_text(value.low, value.high, ":")


def fmt_iprange(value: IpRange) -> str:
    if value.first == value.last:
        return value.first
    return f"{value.first}-{value.last}"


def fmt_tcp_flags(bits: int) -> str:
    """libvirt's spelling: ``NONE``, ``ALL`` or the set bits in the order FIN,SYN,RST,PSH,ACK,URG."""
    bits &= 0x3F
    if bits == 0:
        return "NONE"
    if bits == 0x3F:
        return "ALL"
    return ",".join(tcp_flag_names(bits))


def fmt_icmp(value: IcmpType) -> str:
    return str(value.type) if value.code is None else f"{value.type}/{value.code}"


def fmt_icmpv6_range(value: Icmpv6Range) -> str:
    return f"{value.type_low}:{value.type_high}/{value.code_low}:{value.code_high}"


def fmt_comment(text: str) -> str:
    """Comment text fit for the comment match (restore input is line based; ≤ 255 bytes)."""
    return clean_comment(text, COMMENT_MAX_BYTES)


_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_.,:/+=@%-]+")


def quote(token: str) -> str:
    """Quote one argument for iptables-restore: double quotes, ``\\`` and ``"`` escaped."""
    if token and _PLAIN_TOKEN.fullmatch(token):
        return token
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------------------------
# L2 (ebtables) rule rendering


def _ethertype(value: int) -> str:
    """``-p`` value of a ``mac`` rule: hex without padding (``0x806``), as libvirt writes it."""
    return f"0x{value:x}"


def _neg_after(opt: str, negated: bool, value: str) -> list[str]:
    return [opt, "!", value] if negated else [opt, value]


_STP_OPTS = {
    Field.STP_TYPE: "--stp-type",
    Field.STP_FLAGS: "--stp-flags",
    Field.STP_ROOT_PRIO: "--stp-root-prio",
    Field.STP_ROOT_ADDR: "--stp-root-addr",
    Field.STP_ROOT_COST: "--stp-root-cost",
    Field.STP_SENDER_PRIO: "--stp-sender-prio",
    Field.STP_SENDER_ADDR: "--stp-sender-addr",
    Field.STP_PORT: "--stp-port",
    Field.STP_MSG_AGE: "--stp-msg-age",
    Field.STP_MAX_AGE: "--stp-max-age",
    Field.STP_HELLO_TIME: "--stp-hello-time",
    Field.STP_FORWARD_DELAY: "--stp-forward-delay",
}
# Each element's fields in libvirt's order; a rule's arguments follow the elements' order too.
_VLAN = (Field.VLAN_ID, Field.VLAN_ENCAP)
_ARP = (Field.ARP_HTYPE, Field.ARP_OPCODE, Field.ARP_PTYPE, Field.ARP_SPA, Field.ARP_TPA, Field.ARP_SHA,
        Field.ARP_THA, Field.ARP_GRATUITOUS)
_IP = (Field.IP_SRC, Field.IP_DST, Field.IP_PROTO, Field.SPORT, Field.DPORT, Field.DSCP, Field.ICMPV6_TYPE_CODE)
_L2_RANK = {f: i for i, f in enumerate((Field.ETHER_SRC, Field.ETHER_DST, Field.ETHER_TYPE, *_VLAN, *_STP_OPTS,
                                        *_ARP, *_IP))}
_ARP_FIELDS, _IP_FIELDS, _VLAN_FIELDS = frozenset(_ARP), frozenset(_IP), frozenset(_VLAN)


def _positive_ethertype(conds: Sequence[Cond]) -> int | None:
    for c in conds:
        if c.field is Field.ETHER_TYPE and not c.negated:
            return int(c.value)  # type: ignore[arg-type]
    return None


def _positive_dst_mac(conds: Sequence[Cond]) -> str | None:
    for c in conds:
        if c.field is Field.ETHER_DST and not c.negated:
            return fmt_mac(c.value)
    return None


_ND_ATTRIBUTES = {Field.ND_TARGET: "nwf:nd-target", Field.ND_LLADDR: "nwf:nd-lladdr"}


def _refuse_nd(conds: Sequence[Cond], where: str) -> None:
    for c in conds:
        if c.field in _ND_ATTRIBUTES:
            raise UnsupportedError(
                f"{where}: attribute '{_ND_ATTRIBUTES[c.field]}' cannot be rendered by the ebiptables "
                "backend: ebtables cannot read Neighbour Discovery targets or options (use the "
                "nftables backend)")


def render_l2_conds(conds: Sequence[Cond], *, jump: bool = False, where: str = "") -> list[str]:
    """ebtables match arguments for ``conds`` (``!`` after the option, as ebtables wants).

    ``jump``: the conditions of a root-chain jump, whose ethertype libvirt writes ``0x%04x``.
    Arguments come in libvirt's order for the element (Ethernet header, protocol, payload
    fields); an element's payload fields require the matching positive protocol condition, which
    ebtables' match extensions insist on.
    """
    _refuse_nd(conds, where)
    fields = {c.field for c in conds}
    etype = _positive_ethertype(conds)
    ctx = f" ({where})" if where else ""
    if fields & _ARP_FIELDS and etype not in (ETH_P_ARP, ETH_P_RARP):
        raise UnsupportedError(f"ARP fields need ethertype 0x0806 or 0x8035 in the IR{ctx}")
    if fields & _VLAN_FIELDS and etype != ETH_P_VLAN:
        raise UnsupportedError(f"VLAN fields need ethertype 0x8100 in the IR{ctx}")
    if fields & _IP_FIELDS and etype not in (ETH_P_IPV4, ETH_P_IPV6):
        raise UnsupportedError(f"IP fields at L2 need ethertype 0x0800 or 0x86dd in the IR{ctx}")
    if fields & set(_STP_OPTS) and _positive_dst_mac(conds) != BGA_MAC:
        raise UnsupportedError(f"STP fields need destination MAC {BGA_MAC} in the IR{ctx}")
    ip6 = etype == ETH_P_IPV6
    ipp = "--ip6-" if ip6 else "--ip-"

    args: list[str] = []
    for c in sorted(conds, key=lambda c: _L2_RANK.get(c.field, len(_L2_RANK))):
        f, v, neg = c.field, c.value, c.negated
        if f is Field.ETHER_SRC:
            args += _neg_after("-s", neg, fmt_mac(v))
        elif f is Field.ETHER_DST:
            args += _neg_after("-d", neg, fmt_mac(v))
        elif f is Field.ETHER_TYPE:
            value = int(v)  # type: ignore[arg-type]
            if jump:
                text = f"0x{value:04x}"
            elif value == ETH_P_IPV4 and fields & _IP_FIELDS:
                text = "ipv4"
            elif value == ETH_P_IPV6 and fields & _IP_FIELDS:
                text = "ipv6"
            else:
                text = _ethertype(value)
            args += _neg_after("-p", neg, text)
        elif f is Field.VLAN_ID:
            args += _neg_after("--vlan-id", neg, str(int(v)))  # type: ignore[arg-type]
        elif f is Field.VLAN_ENCAP:
            # ebtables reads --vlan-encap as hex: libvirt's decimal "2054" means 0x2054 there.
            args += _neg_after("--vlan-encap", neg, f"0x{int(v):04x}")  # type: ignore[arg-type]
        elif f in (Field.STP_TYPE, Field.STP_FLAGS):
            args += _neg_after(_STP_OPTS[f], neg, str(int(v)))  # type: ignore[arg-type]
        elif f in (Field.STP_ROOT_ADDR, Field.STP_SENDER_ADDR):
            args += _neg_after(_STP_OPTS[f], neg, fmt_mac(v))
        elif f in _STP_OPTS:
            args += _neg_after(_STP_OPTS[f], neg, fmt_range(v))  # type: ignore[arg-type]
        elif f is Field.ARP_HTYPE:
            args += _neg_after("--arp-htype", neg, str(int(v)))  # type: ignore[arg-type]
        elif f is Field.ARP_OPCODE:
            args += _neg_after("--arp-opcode", neg, str(int(v)))  # type: ignore[arg-type]
        elif f is Field.ARP_PTYPE:
            args += _neg_after("--arp-ptype", neg, f"0x{int(v):x}")  # type: ignore[arg-type]
        elif f is Field.ARP_SPA:
            args += _neg_after("--arp-ip-src", neg, fmt_ip(v, always_prefix=True))  # type: ignore[arg-type]
        elif f is Field.ARP_TPA:
            args += _neg_after("--arp-ip-dst", neg, fmt_ip(v, always_prefix=True))  # type: ignore[arg-type]
        elif f is Field.ARP_SHA:
            args += _neg_after("--arp-mac-src", neg, fmt_mac(v))
        elif f is Field.ARP_THA:
            args += _neg_after("--arp-mac-dst", neg, fmt_mac(v))
        elif f is Field.ARP_GRATUITOUS:
            args += ["!", "--arp-gratuitous"] if neg else ["--arp-gratuitous"]
        elif f is Field.IP_SRC:
            _check_family(v, 6 if ip6 else 4, where)
            args += _neg_after(ipp + "source", neg, fmt_ip(v))  # type: ignore[arg-type]
        elif f is Field.IP_DST:
            _check_family(v, 6 if ip6 else 4, where)
            args += _neg_after(ipp + "destination", neg, fmt_ip(v))  # type: ignore[arg-type]
        elif f is Field.IP_PROTO:
            args += _neg_after(ipp + "protocol", neg, str(int(v)))  # type: ignore[arg-type]
        elif f is Field.SPORT:
            args += _neg_after(ipp + "source-port", neg, fmt_range(v))  # type: ignore[arg-type]
        elif f is Field.DPORT:
            args += _neg_after(ipp + "destination-port", neg, fmt_range(v))  # type: ignore[arg-type]
        elif f is Field.DSCP:
            # semantics.md §12 R3: the 6-bit DSCP, compared via the whole TOS / traffic-class byte
            # (ebtables has no DSCP match), so only packets with ECN bits 0 match.
            tos = (int(v) & 0x3F) << 2  # type: ignore[arg-type]
            args += _neg_after("--ip6-tclass" if ip6 else "--ip-tos", neg, f"0x{tos:02x}")
        elif f is Field.ICMPV6_TYPE_CODE:
            if not ip6:
                raise UnsupportedError(f"ICMPv6 type/code needs ethertype 0x86dd{ctx}")
            args += _neg_after("--ip6-icmp-type", neg, fmt_icmpv6_range(v))  # type: ignore[arg-type]
        else:
            raise UnsupportedError(f"field {f.value!r} cannot be matched at L2{ctx}")
    return args


def _check_family(value: object, family: int, where: str) -> None:
    fam = getattr(value, "family", None)
    if fam is not None and fam != family:
        raise UnsupportedError(f"IPv{fam} address in an IPv{family} match ({where})")


L2_TARGET = {
    Verdict.ACCEPT: "ACCEPT",
    Verdict.DROP: "DROP",
    Verdict.REJECT: "DROP",  # ebtables cannot reject (semantics.md §5)
    Verdict.RETURN: "RETURN",
    Verdict.CONTINUE: "CONTINUE",
}


def render_l2_rule(chain: str, rule: L2Rule) -> str:
    args = render_l2_conds(rule.conds, where=rule.origin)
    return " ".join(["-A", chain, *args, "-j", L2_TARGET[rule.verdict]])


def render_l2_jump(chain: str, jump: Jump, target: str) -> str:
    args = render_l2_conds(jump.conds, jump=True, where=f"jump to {jump.chain!r}")
    return " ".join(["-A", chain, *args, "-j", target])


# --------------------------------------------------------------------------------------------
# L3 (iptables / ip6tables) rule rendering

_L3_ORDER = (
    Field.SRC_MAC,
    Field.IP_SRC,
    Field.IP_SRC_RANGE,
    Field.IP_DST,
    Field.IP_DST_RANGE,
    Field.DSCP,
    Field.TCP_FLAGS,
    Field.SPORT,
    Field.DPORT,
    Field.TCP_OPTION,
    Field.ICMP_TYPE,
    Field.CT_STATE,
    Field.CT_DIRECTION,
    Field.IPSET,
    Field.CONNLIMIT_ABOVE,
)
_L3_RANK = {f: i for i, f in enumerate(_L3_ORDER)}
_PORT_PROTOCOLS = frozenset({"tcp", "udp", "sctp"})

L3_TARGET = {
    Verdict.ACCEPT: "ACCEPT",
    Verdict.DROP: "DROP",
    Verdict.REJECT: "REJECT",
    Verdict.RETURN: "RETURN",
    Verdict.CONTINUE: None,  # §12 R1: a rule without target (counts, goes on)
}


def _neg_before(negated: bool, *args: str) -> list[str]:
    return ["!", *args] if negated else list(args)


def render_l3_args(rule: L3Rule) -> list[str]:
    """iptables arguments for ``rule`` after ``-A CHAIN``, in libvirt's order (semantics.md
    §6.8), ``!`` before the option."""
    where = rule.origin
    if rule.family not in (4, 6):
        raise UnsupportedError(f"unknown IP family {rule.family} ({where})")
    proto = rule.protocol
    if proto == "icmp" and rule.family == 6:
        proto = "icmpv6"
    if proto == "icmpv6" and rule.family == 4:
        raise UnsupportedError(f"icmpv6 in an IPv4 rule ({where})")
    args = ["-p", proto]
    for c in sorted(rule.conds, key=lambda c: _L3_RANK.get(c.field, len(_L3_RANK))):
        f, v, neg = c.field, c.value, c.negated
        if f is Field.SRC_MAC:
            args += ["-m", "mac", *_neg_before(neg, "--mac-source", fmt_mac(v))]
        elif f is Field.IP_SRC:
            _check_family(v, rule.family, where)
            args += _neg_before(neg, "--source", fmt_ip(v))  # type: ignore[arg-type]
        elif f is Field.IP_DST:
            _check_family(v, rule.family, where)
            args += _neg_before(neg, "--destination", fmt_ip(v))  # type: ignore[arg-type]
        elif f is Field.IP_SRC_RANGE:
            _check_family(v, rule.family, where)
            args += ["-m", "iprange", *_neg_before(neg, "--src-range", fmt_iprange(v))]  # type: ignore[arg-type]
        elif f is Field.IP_DST_RANGE:
            _check_family(v, rule.family, where)
            args += ["-m", "iprange", *_neg_before(neg, "--dst-range", fmt_iprange(v))]  # type: ignore[arg-type]
        elif f is Field.DSCP:
            args += ["-m", "dscp", *_neg_before(neg, "--dscp", str(int(v)))]  # type: ignore[arg-type]
        elif f is Field.TCP_FLAGS:
            if proto != "tcp":
                raise UnsupportedError(f"TCP flags on protocol {proto} ({where})")
            assert isinstance(v, TcpFlags)
            args += _neg_before(neg, "--tcp-flags", fmt_tcp_flags(v.mask), fmt_tcp_flags(v.flags))
        elif f in (Field.SPORT, Field.DPORT):
            if proto not in _PORT_PROTOCOLS:
                raise UnsupportedError(f"ports on protocol {proto} ({where})")
            opt = "--sport" if f is Field.SPORT else "--dport"
            if neg and f is Field.DPORT and any(c.field is Field.SPORT and c.negated for c in rule.conds):
                # iptables-nft 1.8.9 turns "! --sport A ! --dport B" of one match into a single
                # compare of both ports ("not (A and B)"); a second match instance keeps them
                # apart (found by simulate's differential test against the kernel)
                args += ["-m", proto]
            args += _neg_before(neg, opt, fmt_range(v))  # type: ignore[arg-type]
        elif f is Field.TCP_OPTION:
            if proto != "tcp":
                raise UnsupportedError(f"TCP option on protocol {proto} ({where})")
            args += _neg_before(neg, "--tcp-option", str(int(v)))  # type: ignore[arg-type]
        elif f is Field.ICMP_TYPE:
            if proto not in ("icmp", "icmpv6"):
                raise UnsupportedError(f"ICMP type on protocol {proto} ({where})")
            opt = "--icmpv6-type" if proto == "icmpv6" else "--icmp-type"
            args += _neg_before(neg, opt, fmt_icmp(v))  # type: ignore[arg-type]
        elif f is Field.CT_STATE:
            states = (v,) if isinstance(v, str) else tuple(v)  # type: ignore[arg-type]
            if neg or not states:
                raise UnsupportedError(f"connection state must be a positive, non-empty list ({where})")
            args += ["-m", "conntrack", "--ctstate", ",".join(s.upper() for s in states)]
        elif f is Field.CT_DIRECTION:
            d = str(v).lower()
            if neg or d not in ("original", "reply"):
                raise UnsupportedError(f"bad connection direction {v!r} ({where})")
            args += ["-m", "conntrack", "--ctdir", "Original" if d == "original" else "Reply"]
        elif f is Field.IPSET:
            assert isinstance(v, IpSet)
            if neg:
                raise UnsupportedError(f"a negated ipset match is not supported ({where})")
            flags = ",".join(v.flags) if v.flags else "src"
            args += ["-m", "set", "--match-set", quote(v.name), flags]
        elif f is Field.CONNLIMIT_ABOVE:
            args += ["-m", "connlimit", *_neg_before(neg, "--connlimit-above", str(int(v)))]  # type: ignore[arg-type]
        else:
            raise UnsupportedError(f"field {f.value!r} cannot be matched at L3 ({where})")
    if rule.comment is not None:
        args += ["-m", "comment", "--comment", quote(fmt_comment(rule.comment))]
    target = L3_TARGET[rule.verdict]
    if target is not None:
        args += ["-j", target]
    return args


def render_l3_rule(chain: str, rule: L3Rule) -> str:
    return " ".join(["-A", chain, *render_l3_args(rule)])


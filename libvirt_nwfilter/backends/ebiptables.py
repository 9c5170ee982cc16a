"""The ``ebiptables`` compatibility backend: libvirt's ebtables/iptables layout, our own names.

Pure: everything here turns :class:`~libvirt_nwfilter.ir.PortRuleset` values into a
:class:`~libvirt_nwfilter.backends.base.Plan` of ``*-restore --noflush`` invocations (argv and
stdin) and per-port records, and reads ``*-save`` outputs it is given. Nothing here runs a
process or reads the system.

Layout (semantics.md §7, with our prefixes so libvirtd's chains are never touched)
------------------------------------------------------------------------------------

=====================  ===========================  ============================================
what                   final name (temporary name)  reached from
=====================  ===========================  ============================================
L2 root, from the VM   ``nwf-I-<port>`` (``nwf-J-``) ebtables nat ``PREROUTING -i <port>``
L2 root, to the VM     ``nwf-O-<port>`` (``nwf-P-``) ebtables nat ``POSTROUTING -o <port>``
L2 sub-chain           ``NI-<port>:<chain>``          the root chain, jump condition from the IR
                       (``NJ-``; to VM ``NO-``/``NP-``)
L3 forwarded, from VM  ``NFI-<port>`` (``NFJ-``)      ``nwf-in -m physdev --physdev-in <port> -g``
L3 forwarded, to VM    ``NFO-<port>`` (``NFP-``)      ``nwf-out -m physdev --physdev-is-bridged
                                                      --physdev-out <port> -g``
L3 from VM to host     ``NHI-<port>`` (``NHJ-``)      ``nwf-host-in -m physdev --physdev-in <port> -g``
global                 ``nwf-in``, ``nwf-out``,       ``-I FORWARD 1/2/3``, ``-I INPUT 1``
                       ``nwf-in-post``, ``nwf-host-in``
=====================  ===========================  ============================================

``nwf-in-post`` holds ``-m physdev --physdev-in <port> -j ACCEPT`` for every port with L3 rules of
that family (libvirt's ``libvirt-in-post``): a packet from a filtered port that its ``NFI`` chain
RETURNed (= accepted) and that no destination port's ``NFO`` decided is accepted in FORWARD.

Name budget (semantics.md §7): port ≤ 15 characters, chain suffix ≤ 12. ebtables chain names
≤ 31: sub-chains use 3 + 15 + 1 + 12 = 31, roots 6 + 15 = 21. iptables chain names ≤ 28: 4 + 15.
libvirt uses ``libvirt-``, ``I-``, ``O-``, ``J-``, ``P-``, ``FI-``…``HJ-`` and ``libvirt-in…``;
none of our names can be one of those. The separator between port and sub-chain name is ``:``,
not libvirt's ``-``: an interface name cannot contain ``:``, so ``NI-a-arp:mac`` (port ``a-arp``,
chain ``mac``) and ``NI-a:arp-mac`` (port ``a``, chain ``arp-mac``) never collide, as
``I-a-arp-mac`` does in libvirt.

Every ebtables chain we create gets policy ACCEPT, as libvirt's do (a bare ``-N`` defaults to
ACCEPT; tests/ORACLE.md shows each of libvirt's chains ending in ``counter accept``): a frame that
falls off a sub-chain is accepted. semantics.md §4 says RETURN; observed libvirt behaviour wins.
iptables user chains always return.

Phases (libvirt's two-phase protocol, one restore invocation per tool and phase for all ports)
-----------------------------------------------------------------------------------------------

Each ``*-restore --noflush`` run on the nf_tables based tools (Debian 12: iptables 1.8.9) is one
kernel transaction: it applies completely or not at all.

``apply``
    per tool: build every port's new chains under the temporary names (declared with ``:NAME``,
    which creates a chain or flushes a leftover one), fill them, and link the temporary roots
    *after* the old ones (``-A``), so old and new are both active, the old first. ip(6)tables also
    get the port's ``nwf-in-post`` ACCEPT if it was not there. Before the ip(6)tables step, an
    "ensure" step (errors ignored) creates the four global chains and their FORWARD/INPUT jumps in
    one transaction: it fails as a whole, changing nothing, when they exist already, so jumps are
    never duplicated.
``commit``
    per tool: delete the old links (from the record), flush and delete the old chains, and rename
    the temporary chains to the final names (libvirt's tearOldRules; jumps follow a rename).
    Removing a port (``new=None``) happens here only (libvirt's allTeardown), so a failing batch
    removes nothing either.
``rollback``
    per tool, errors ignored: unlink and delete the temporary chains, and the ``nwf-in-post`` rule
    if this plan added it (libvirt's tearNewRules). A tool whose apply step failed has nothing to
    roll back (its transaction was not applied), so its rollback fails harmlessly.

Drift detection and recovery (``verify``, ``reapply``, hook ``reconnect``): the three ``*-save``
steps of :meth:`EbiptablesBackend.survey_steps` list the kernel's state, and
:meth:`~EbiptablesBackend.kernel_digests` digests each port from them (:func:`port_structure`).
Digests compare the live kernel with a reference kernel built from the records
(:meth:`~EbiptablesBackend.rebuild_plan` in a throw-away network namespace), never with what a
change applied (plans run no survey): a port's digest depends only on its own chains, rules,
dispatch rules and the global hooks, not on the other ports, and temporary names (an
interrupted change) count as drift. :meth:`~EbiptablesBackend.rebuild_plan` (``reapply``) takes
the old state from a survey instead of the records: leftovers go, every binding is rebuilt, and
the global chains' hooks are repaired.

Record (``PortRecord``, JSON)
-----------------------------

::

    {"format": 1, "backend": "ebiptables", "port": "vnet0",
     "l2": {"from-vm": ["mac", "arp-ip"], "to-vm": null},       # sub-chain names; null = no root
     "l3": [4],                                                  # families with NFI/NFO/NHI
     "ebtables":  {"chains": ["nwf-I-vnet0", "NI-vnet0:mac", …],
                   "rules":  ["-A PREROUTING -i vnet0 -j nwf-I-vnet0"]},
     "iptables":  {"chains": ["NFI-vnet0", "NFO-vnet0", "NHI-vnet0"],
                   "rules":  ["-A nwf-in -m physdev --physdev-in vnet0 -g NFI-vnet0", …,
                              "-A nwf-in-post -m physdev --physdev-in vnet0 -j ACCEPT"]},
     "ip6tables": {"chains": [], "rules": []}}

``chains`` are the chains the port owns, ``rules`` the rules it owns in chains it does not own
(written exactly as they were added, so ``-D`` removes them). Teardown uses only these two lists,
so a later version with other names still removes what an older one created.
:func:`records_from_snapshot` rebuilds records from ``*-save`` output (for recovery: a record
with leftover temporary chains is a valid ``old``; apply removes them first), and
:func:`purge_steps` removes everything of ours found there.

What the restore tools accept (verified on Debian 12, ebtables/iptables 1.8.9 nf_tables)
---------------------------------------------------------------------------------------

* ``ebtables-restore --noflush`` (no ``-w``/``--concurrent`` option): ``*nat``, ``:CHAIN POLICY``
  (creates the chain, or *flushes* an existing one and sets its policy), ``-N`` (fails when the
  chain exists), ``-A``, ``-I``, ``-D`` (rule spec), ``-F``, ``-X``, ``-P``, ``-E``. The whole input
  is one transaction (an error anywhere applies nothing). A chain created and deleted in the same
  transaction makes it fail (``CHAIN_USER_ADD … Operation not supported``), so only chains known to
  exist are removed there. Deleting a chain and creating or renaming another to its name in the
  same transaction works. Jumps follow ``-E``.
* ``iptables-restore -w --noflush`` / ``ip6tables-restore``: ``:CHAIN - [0:0]`` creates or flushes;
  ``-N``, ``-A``, ``-I``, ``-D``, ``-F``, ``-X``, ``-E`` all work; one transaction per ``COMMIT``.
  A rule without ``-j`` is accepted (used for ``continue``, §12 R1). Quoted arguments take ``\\"``
  and ``\\\\`` escapes. Missing ipsets fail at parse time (``Set X doesn't exist``).
* ebtables-nft lists every user chain as ``policy: RETURN`` in ``ebtables -L``, whatever its real
  policy; ``ebtables-save`` and ``nft list`` show the truth. A bare ``-N`` (as libvirt uses)
  creates a chain with policy **ACCEPT** (the documented ebtables default).

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from ..errors import UnsupportedError
from ..ir import (
    Cond,
    Field,
    Icmpv6Range,
    IcmpType,
    IpNet,
    IpRange,
    IpSet,
    Jump,
    L2Rule,
    L2Side,
    L3Rule,
    MacMatch,
    NumRange,
    PortRuleset,
    Side,
    TcpFlags,
    Verdict,
)
from .base import Plan, PortChange, PortRecord, Step, canonical_digest

NAME = "ebiptables"
RECORD_FORMAT = 1

# Tools. One invocation per tool and phase; stdin carries the commands.
EBTABLES = "ebtables"
IPTABLES = "iptables"
IP6TABLES = "ip6tables"
TOOLS = (EBTABLES, IPTABLES, IP6TABLES)
RESTORE_ARGV = {
    EBTABLES: ("ebtables-restore", "--noflush"),
    IPTABLES: ("iptables-restore", "-w", "--noflush"),
    IP6TABLES: ("ip6tables-restore", "-w", "--noflush"),
}
SAVE_ARGV = {
    EBTABLES: ("ebtables-save", "-t", "nat"),
    IPTABLES: ("iptables-save", "-t", "filter"),
    IP6TABLES: ("ip6tables-save", "-t", "filter"),
}
FAMILY_TOOL = {4: IPTABLES, 6: IP6TABLES}

# Policy of every ebtables chain we create (see the module docstring).
EBTABLES_CHAIN_POLICY = "ACCEPT"

# Global ip(6)tables chains and their hooks: (chain, builtin chain, position).
GLOBAL_IN = "nwf-in"
GLOBAL_OUT = "nwf-out"
GLOBAL_IN_POST = "nwf-in-post"
GLOBAL_HOST_IN = "nwf-host-in"
GLOBAL_CHAINS = (GLOBAL_IN, GLOBAL_OUT, GLOBAL_IN_POST, GLOBAL_HOST_IN)
GLOBAL_HOOKS = (
    (GLOBAL_IN, "FORWARD", 1),
    (GLOBAL_OUT, "FORWARD", 2),
    (GLOBAL_IN_POST, "FORWARD", 3),
    (GLOBAL_HOST_IN, "INPUT", 1),
)

# Chain name prefixes: (final, temporary).
L2_ROOT_PREFIX = {Side.FROM_VM: ("nwf-I-", "nwf-J-"), Side.TO_VM: ("nwf-O-", "nwf-P-")}
L2_SUB_PREFIX = {Side.FROM_VM: ("NI-", "NJ-"), Side.TO_VM: ("NO-", "NP-")}
L2_SUB_SEP = ":"
L2_HOOK = {Side.FROM_VM: ("PREROUTING", "-i"), Side.TO_VM: ("POSTROUTING", "-o")}
L3_COPIES = ("fi", "fo", "hi")
L3_PREFIX = {"fi": ("NFI-", "NFJ-"), "fo": ("NFO-", "NFP-"), "hi": ("NHI-", "NHJ-")}
L3_HOOK = {
    "fi": (GLOBAL_IN, ("-m", "physdev", "--physdev-in")),
    "fo": (GLOBAL_OUT, ("-m", "physdev", "--physdev-is-bridged", "--physdev-out")),
    "hi": (GLOBAL_HOST_IN, ("-m", "physdev", "--physdev-in")),
}

EBTABLES_CHAIN_MAX = 31
IPTABLES_CHAIN_MAX = 28
PORT_MAX = 15
SUFFIX_MAX = 12

# Interface names we accept: what the kernel allows, minus what the restore syntax or the
# ebtables/physdev matches would read differently ('+' is a wildcard there, quotes and '!' are
# syntax, '#' starts a comment).
_PORT_RE = re.compile(r"[A-Za-z0-9_.=@%-]{1,15}")
_SUFFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,12}")

BGA_MAC = "01:80:c2:00:00:00"
ETH_P_IPV4 = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
ETH_P_VLAN = 0x8100

# iptables comment match limit (XT_MAX_COMMENT_LEN 256 including the terminating NUL).
COMMENT_MAX_BYTES = 255


# --------------------------------------------------------------------------------------------
# Names


def check_port(port: str) -> str:
    """Return ``port`` if this backend can use it as an interface name, else raise."""
    if not _PORT_RE.fullmatch(port) or port.startswith("-") or port in (".", ".."):
        raise UnsupportedError(
            f"port name {port!r} cannot be used with the ebiptables backend "
            "(1-15 characters of A-Z a-z 0-9 _ . = @ % -, not starting with '-')"
        )
    return port


def _check_suffix(name: str) -> str:
    if not _SUFFIX_RE.fullmatch(name) or name == "root":
        raise UnsupportedError(f"L2 chain name {name!r} cannot be a sub-chain (1-12 of A-Z a-z 0-9 _ . : -)")
    return name


def l2_root_chain(side: Side, port: str, temp: bool = False) -> str:
    return L2_ROOT_PREFIX[side][temp] + port


def l2_sub_chain(side: Side, port: str, chain: str, temp: bool = False) -> str:
    return L2_SUB_PREFIX[side][temp] + port + L2_SUB_SEP + chain


def l3_chain(copy: str, port: str, temp: bool = False) -> str:
    return L3_PREFIX[copy][temp] + port


def _l2_link(side: Side, port: str, chain: str) -> str:
    hook, opt = L2_HOOK[side]
    return f"-A {hook} {opt} {port} -j {chain}"


def _l3_link(copy: str, port: str, chain: str) -> str:
    base, match = L3_HOOK[copy]
    return f"-A {base} {' '.join(match)} {port} -g {chain}"


def _in_post_rule(port: str) -> str:
    return f"-A {GLOBAL_IN_POST} -m physdev --physdev-in {port} -j ACCEPT"


def _declare(tool: str, chain: str) -> str:
    """Create ``chain``, or flush it if it exists (restore ``--noflush`` semantics)."""
    if tool == EBTABLES:
        return f":{chain} {EBTABLES_CHAIN_POLICY}"
    return f":{chain} - [0:0]"


def _delete_line(add_line: str) -> str:
    if not add_line.startswith("-A "):
        raise ValueError(f"not an append line: {add_line!r}")
    return "-D " + add_line[3:]


# --------------------------------------------------------------------------------------------
# Value formatting


def _mac_mask(prefix: int) -> str:
    if not 0 <= prefix <= 48:
        raise UnsupportedError(f"MAC mask length {prefix} out of range")
    bits = ((1 << prefix) - 1) << (48 - prefix)
    return ":".join(f"{(bits >> (40 - 8 * i)) & 0xFF:02x}" for i in range(6))


def fmt_mac(value: object) -> str:
    """``MacMatch`` → ``MAC`` or ``MAC/MASK`` (mask as MAC text); a plain string is a MAC."""
    if isinstance(value, MacMatch):
        if value.prefix == 48:
            return value.mac
        return f"{value.mac}/{_mac_mask(value.prefix)}"
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a MAC, got {value!r}")


def fmt_ip(value: IpNet, *, always_prefix: bool = False) -> str:
    host = 32 if value.family == 4 else 128
    if value.prefix == host and not always_prefix:
        return value.address
    return f"{value.address}/{value.prefix}"


def fmt_range(value: NumRange, sep: str = ":") -> str:
    if value.low == value.high:
        return str(value.low)
    return f"{value.low}{sep}{value.high}"


def fmt_iprange(value: IpRange) -> str:
    if value.first == value.last:
        return value.first
    return f"{value.first}-{value.last}"


_TCP_FLAG_NAMES = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"), (0x20, "URG"))


def fmt_tcp_flags(bits: int) -> str:
    """libvirt's spelling: ``NONE``, ``ALL`` or the set bits in the order FIN,SYN,RST,PSH,ACK,URG."""
    bits &= 0x3F
    if bits == 0:
        return "NONE"
    if bits == 0x3F:
        return "ALL"
    return ",".join(name for bit, name in _TCP_FLAG_NAMES if bits & bit)


def fmt_icmp(value: IcmpType) -> str:
    return str(value.type) if value.code is None else f"{value.type}/{value.code}"


def fmt_icmpv6_range(value: Icmpv6Range) -> str:
    return f"{value.type_low}:{value.type_high}/{value.code_low}:{value.code_high}"


def fmt_comment(text: str) -> str:
    """Comment text fit for the comment match: control characters become spaces (the restore
    format is line based), at most 255 bytes (cut at a character boundary)."""
    text = "".join(" " if (ord(c) < 0x20 or ord(c) == 0x7F) else c for c in text)
    raw = text.encode("utf-8")
    if len(raw) > COMMENT_MAX_BYTES:
        text = raw[:COMMENT_MAX_BYTES].decode("utf-8", errors="ignore")
    return text


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


_L2_ORDER = (
    Field.ETHER_SRC,
    Field.ETHER_DST,
    Field.ETHER_TYPE,
    Field.VLAN_ID,
    Field.VLAN_ENCAP,
    Field.STP_TYPE,
    Field.STP_FLAGS,
    Field.STP_ROOT_PRIO,
    Field.STP_ROOT_ADDR,
    Field.STP_ROOT_COST,
    Field.STP_SENDER_PRIO,
    Field.STP_SENDER_ADDR,
    Field.STP_PORT,
    Field.STP_MSG_AGE,
    Field.STP_MAX_AGE,
    Field.STP_HELLO_TIME,
    Field.STP_FORWARD_DELAY,
    Field.ARP_HTYPE,
    Field.ARP_OPCODE,
    Field.ARP_PTYPE,
    Field.ARP_SPA,
    Field.ARP_TPA,
    Field.ARP_SHA,
    Field.ARP_THA,
    Field.ARP_GRATUITOUS,
    Field.IP_SRC,
    Field.IP_DST,
    Field.IP_PROTO,
    Field.SPORT,
    Field.DPORT,
    Field.DSCP,
    Field.ICMPV6_TYPE_CODE,
)
_L2_RANK = {f: i for i, f in enumerate(_L2_ORDER)}

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
_ARP_FIELDS = frozenset(
    {
        Field.ARP_HTYPE,
        Field.ARP_OPCODE,
        Field.ARP_PTYPE,
        Field.ARP_SPA,
        Field.ARP_TPA,
        Field.ARP_SHA,
        Field.ARP_THA,
        Field.ARP_GRATUITOUS,
    }
)
_IP_FIELDS = frozenset(
    {Field.IP_SRC, Field.IP_DST, Field.IP_PROTO, Field.SPORT, Field.DPORT, Field.DSCP, Field.ICMPV6_TYPE_CODE}
)
_VLAN_FIELDS = frozenset({Field.VLAN_ID, Field.VLAN_ENCAP})


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


def render_l2_conds(conds: Sequence[Cond], *, jump: bool = False, where: str = "") -> list[str]:
    """ebtables match arguments for ``conds`` (``!`` after the option, as ebtables wants).

    ``jump``: the conditions of a root-chain jump, whose ethertype libvirt writes ``0x%04x``.
    Arguments come in libvirt's order for the element (Ethernet header, protocol, payload
    fields); an element's payload fields require the matching positive protocol condition, which
    ebtables' match extensions insist on.
    """
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


# --------------------------------------------------------------------------------------------
# One port's parts per tool


@dataclass
class ToolPart:
    """What one port puts into one tool's tables (names are the temporary ones)."""

    chains: list[tuple[str, str]] = field(default_factory=list)  # (temporary, final)
    rules: list[str] = field(default_factory=list)  # -A lines into our temporary chains
    links: list[tuple[str, str]] = field(default_factory=list)  # (-A line to temp, to final)
    permanent: list[str] = field(default_factory=list)  # rules kept across updates (in-post)

    @property
    def empty(self) -> bool:
        return not self.chains and not self.permanent


@dataclass
class PortParts:
    port: str
    tools: dict[str, ToolPart]
    l2: dict[str, list[str] | None]
    l3: list[int]


def _render_l2_side(port: str, side: Side, l2: L2Side, part: ToolPart) -> list[str] | None:
    if l2.empty:
        if l2.subchains:
            raise UnsupportedError(f"sub-chains without a root chain on the {side.value} side of {port}")
        return None
    root_t = l2_root_chain(side, port, temp=True)
    names = [sc.name for sc in l2.subchains]
    if len(set(names)) != len(names):
        raise UnsupportedError(f"duplicate sub-chain names on the {side.value} side of {port}: {names}")
    for name in names:
        _check_suffix(name)
        if len(l2_sub_chain(side, port, name)) > EBTABLES_CHAIN_MAX:  # pragma: no cover - budget
            raise UnsupportedError(f"chain name too long for port {port!r} and chain {name!r}")
    part.chains.append((root_t, l2_root_chain(side, port)))
    for name in names:
        part.chains.append((l2_sub_chain(side, port, name, temp=True), l2_sub_chain(side, port, name)))
    for item in l2.root:
        if isinstance(item, Jump):
            if item.chain not in names:
                raise UnsupportedError(f"jump to unknown sub-chain {item.chain!r} on port {port}")
            part.rules.append(render_l2_jump(root_t, item, l2_sub_chain(side, port, item.chain, temp=True)))
        else:
            part.rules.append(render_l2_rule(root_t, item))
    for sc in l2.subchains:
        sub_t = l2_sub_chain(side, port, sc.name, temp=True)
        for rule in sc.rules:
            part.rules.append(render_l2_rule(sub_t, rule))
    part.links.append((_l2_link(side, port, root_t), _l2_link(side, port, l2_root_chain(side, port))))
    return names


def render_port(port: str, ruleset: PortRuleset) -> PortParts:
    """Everything ``ruleset`` puts on ``port``, per tool, under the temporary names."""
    check_port(port)
    tools = {t: ToolPart() for t in TOOLS}
    l2 = {
        Side.FROM_VM.value: _render_l2_side(port, Side.FROM_VM, ruleset.from_vm, tools[EBTABLES]),
        Side.TO_VM.value: _render_l2_side(port, Side.TO_VM, ruleset.to_vm, tools[EBTABLES]),
    }
    families = []
    copies = {"fi": ruleset.fi, "fo": ruleset.fo, "hi": ruleset.hi}
    for family in (4, 6):
        per_copy = {c: [r for r in copies[c] if r.family == family] for c in L3_COPIES}
        if not any(per_copy.values()):
            continue
        families.append(family)
        part = tools[FAMILY_TOOL[family]]
        for c in L3_COPIES:
            part.chains.append((l3_chain(c, port, temp=True), l3_chain(c, port)))
        for c in L3_COPIES:
            for rule in per_copy[c]:
                part.rules.append(render_l3_rule(l3_chain(c, port, temp=True), rule))
        for c in L3_COPIES:
            part.links.append((_l3_link(c, port, l3_chain(c, port, temp=True)), _l3_link(c, port, l3_chain(c, port))))
        part.permanent.append(_in_post_rule(port))
    for rule in ruleset.fi + ruleset.fo + ruleset.hi:
        if rule.family not in (4, 6):
            raise UnsupportedError(f"unknown IP family {rule.family} ({rule.origin})")
    return PortParts(port=port, tools=tools, l2=l2, l3=families)


def record_for(parts: PortParts) -> dict:
    """The record of a port once ``parts`` are committed."""
    rec: dict = {"format": RECORD_FORMAT, "backend": NAME, "port": parts.port, "l2": parts.l2, "l3": parts.l3}
    for tool in TOOLS:
        part = parts.tools[tool]
        rec[tool] = {
            "chains": [final for _, final in part.chains],
            "rules": [final for _, final in part.links] + list(part.permanent),
        }
    return rec


# --------------------------------------------------------------------------------------------
# Old records


def _is_temp_chain(name: str) -> bool:
    """Whether ``name`` is one of our temporary chain names."""
    return name.startswith(("nwf-J-", "nwf-P-", "NJ-", "NP-", "NFJ-", "NFP-", "NHJ-"))


def _rule_target(line: str) -> str | None:
    m = re.search(r"\s-[jg]\s+(\S+)\s*$", line)
    return m.group(1) if m else None


@dataclass
class _Old:
    final_chains: list[str]
    final_rules: list[str]
    temp_chains: list[str]
    temp_rules: list[str]


def _old_items(record: PortRecord | None, tool: str) -> _Old:
    if not record:
        return _Old([], [], [], [])
    if record.get("backend", NAME) != NAME:
        raise UnsupportedError(f"record of backend {record.get('backend')!r} given to the {NAME} backend")
    data = record.get(tool) or {}
    chains = [str(c) for c in data.get("chains", ())]
    rules = [str(r) for r in data.get("rules", ())]
    tc = [c for c in chains if _is_temp_chain(c)]
    fc = [c for c in chains if not _is_temp_chain(c)]
    tr = [r for r in rules if _is_temp_chain(_rule_target(r) or "")]
    fr = [r for r in rules if r not in tr]
    return _Old(fc, fr, tc, tr)


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for i in items:
        seen.setdefault(i, None)
    return list(seen)


# --------------------------------------------------------------------------------------------
# The plan


def _wrap(tool: str, lines: list[str]) -> str:
    if tool == EBTABLES:
        return "*nat\n" + "".join(line + "\n" for line in lines)
    return "*filter\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"


def ensure_globals_text() -> str:
    """Creates the four global chains and their hooks in one transaction; fails without any
    change when any of them exists (hence run with errors ignored)."""
    lines = [f"-N {c}" for c in GLOBAL_CHAINS]
    lines += [f"-I {hook} {pos} -j {chain}" for chain, hook, pos in GLOBAL_HOOKS]
    return _wrap(IPTABLES, lines)


def _remove_chains(tool: str, chains: Sequence[str]) -> list[str]:
    # Declaring first makes the removal independent of whether each chain still exists and
    # drops every reference between the chains (the root's jumps into its sub-chains).
    return [_declare(tool, c) for c in chains] + [f"-X {c}" for c in chains]


class EbiptablesBackend:
    """libvirt-compatible layout with ebtables/iptables/ip6tables restore transactions."""

    name = NAME
    rebuild_reads_kernel = True  # rebuild_plan removes what the survey found

    def __init__(self, restore_argv: Mapping[str, Sequence[str]] | None = None,
                 save_argv: Mapping[str, Sequence[str]] | None = None):
        argv = dict(RESTORE_ARGV)
        if restore_argv:
            argv.update({k: tuple(v) for k, v in restore_argv.items()})
        self.restore_argv = {k: tuple(v) for k, v in argv.items()}
        saves = dict(SAVE_ARGV)
        if save_argv:
            saves.update({k: tuple(v) for k, v in save_argv.items()})
        self.save_argv = {k: tuple(v) for k, v in saves.items()}

    # The Backend protocol --------------------------------------------------------------------

    def plan(self, changes: Sequence[PortChange], ids_in_use: Iterable[int] | None = None,
             ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """One plan for all changes (``ids_in_use`` is for backends that number ports; unused)."""
        return self._plan(changes)

    def _plan(self, changes: Sequence[PortChange], globals_repair: Mapping[str, "_Save"] | None = None,
              ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """:meth:`plan`; with ``globals_repair`` (a survey per tool: :meth:`rebuild_plan`), each
        ip(6)tables apply transaction that needs the global chains first makes them and their
        FORWARD/INPUT hooks exactly right, instead of the "ensure" step that changes nothing
        when any of them exists."""
        seen: set[str] = set()
        rendered: list[tuple[PortChange, PortParts | None]] = []
        for ch in changes:
            check_port(ch.port)
            if ch.port in seen:
                raise UnsupportedError(f"port {ch.port!r} appears twice in one change")
            seen.add(ch.port)
            rendered.append((ch, render_port(ch.port, ch.new) if ch.new is not None else None))

        apply_lines: dict[str, list[str]] = {t: [] for t in TOOLS}
        commit_lines: dict[str, list[str]] = {t: [] for t in TOOLS}
        rollback_lines: dict[str, list[str]] = {t: [] for t in TOOLS}
        needs_globals = {IPTABLES: False, IP6TABLES: False}
        records: dict[str, PortRecord | None] = {}

        for ch, parts in rendered:
            for tool in TOOLS:
                old = _old_items(ch.old, tool)
                part = parts.tools[tool] if parts else ToolPart()
                a, c, r = apply_lines[tool], commit_lines[tool], rollback_lines[tool]
                # apply: drop leftovers of an interrupted earlier change, then build the new set.
                a += [_delete_line(x) for x in old.temp_rules]
                a += _remove_chains(tool, old.temp_chains)
                a += [_declare(tool, temp) for temp, _ in part.chains]
                a += part.rules
                a += [temp for temp, _ in part.links]
                added = [p for p in part.permanent if p not in old.final_rules]
                a += added
                if part.chains and tool in needs_globals:
                    needs_globals[tool] = True
                # commit: tear the old set, move the new one to the final names.
                c += [_delete_line(x) for x in old.final_rules if x not in part.permanent]
                # iptables also clears the final names (orphans of a lost record) first; in
                # ebtables-nft, creating and deleting a chain in one transaction fails, so there
                # only chains known to exist are removed.
                clear = old.final_chains
                if tool != EBTABLES:
                    clear = _unique(clear + [final for _, final in part.chains])
                c += _remove_chains(tool, clear)
                c += [f"-E {temp} {final}" for temp, final in part.chains]
                # rollback: remove what apply added.
                r += [_delete_line(temp) for temp, _ in part.links]
                r += [_delete_line(x) for x in added]
                r += _remove_chains(tool, [temp for temp, _ in part.chains])
            records[ch.port] = record_for(parts) if parts else None

        apply: list[Step] = []
        for tool in TOOLS:
            if tool in needs_globals and needs_globals[tool]:
                if globals_repair is None:
                    apply.append(Step(self.restore_argv[tool], ensure_globals_text(), ignore_errors=True))
                else:
                    apply_lines[tool][:0] = _repair_globals_lines(globals_repair.get(tool) or _Save())
            if apply_lines[tool]:
                apply.append(Step(self.restore_argv[tool], _wrap(tool, apply_lines[tool])))
        commit = [
            Step(self.restore_argv[tool], _wrap(tool, commit_lines[tool]))
            for tool in (IPTABLES, IP6TABLES, EBTABLES)
            if commit_lines[tool]
        ]
        rollback = [
            Step(self.restore_argv[tool], _wrap(tool, rollback_lines[tool]), ignore_errors=True)
            for tool in (IP6TABLES, IPTABLES, EBTABLES)
            if rollback_lines[tool]
        ]
        return Plan(apply=tuple(apply), commit=tuple(commit), rollback=tuple(rollback)), records

    def rebuild_plan(self, changes: Sequence[PortChange], survey: Sequence[str],
                     ids_in_use: Iterable[int] | None = None,
                     ) -> tuple[Plan, dict[str, PortRecord | None]]:
        """For ``reapply``: ``changes`` lists EVERY port that should have rules; ``survey`` is
        the output of :meth:`survey_steps`. The stored records (``old``) are ignored: what the
        survey shows is the old state (:func:`records_from_snapshot`), so objects a record lists
        but the kernel lost are never deleted, and leftovers (damaged chains, temporary chains,
        ports without a binding) are removed. The two-phase protocol is kept: apply builds the
        new chains beside whatever is left and repairs the global chains and their hooks
        (ip(6)tables), commit removes the old ones and renames; a refused apply rolls back."""
        del ids_in_use  # ports are not numbered here
        snapshots = _survey_map(survey)
        found = records_from_snapshot(snapshots)
        wanted = {c.port for c in changes}
        rebuilt = [PortChange(c.port, found.get(c.port), c.new) for c in changes]
        # leftovers: ports with objects of ours but no binding (names we cannot have made are
        # someone else's chains that merely look like ours: left alone)
        rebuilt += [PortChange(port, rec, None) for port, rec in sorted(found.items())
                    if port not in wanted and _PORT_RE.fullmatch(port) and not port.startswith("-")]
        saves = {tool: _parse_save_full(snapshots.get(tool, ""), _table(tool)) for tool in (IPTABLES, IP6TABLES)}
        return self._plan(rebuilt, globals_repair=saves)

    def survey_steps(self) -> tuple[Step, ...]:
        """``ebtables-save -t nat``, ``iptables-save -t filter``, ``ip6tables-save -t filter``
        (errors ignored), in the order :meth:`kernel_digests` expects their outputs."""
        return tuple(Step(self.save_argv[t], ignore_errors=True) for t in TOOLS)

    def kernel_digests(self, outputs: Sequence[str], records: Mapping[str, PortRecord | None],
                       ) -> dict[str, str | None]:
        """Per recorded port, the digest of what the kernel has for it (:func:`port_structure`)
        from the survey outputs; None when nothing of it is found but its record expects rules.
        Equal for the same port in two kernels holding the same rules for it, whatever else
        they hold."""
        saves = {tool: _parse_save_full(text, _table(tool)) for tool, text in _survey_map(outputs).items()}
        out: dict[str, str | None] = {}
        for port, record in records.items():
            if record is None:
                continue
            structure = port_structure(saves, port)
            if structure is None and not _expects_nothing(record):
                out[port] = None
            else:
                out[port] = port_digest(structure)
        return out

    # Extras for status, recovery and tests --------------------------------------------------

    def purge_steps(self, snapshots: Mapping[str, str], *, globals: bool = True) -> tuple[Step, ...]:
        return purge_steps(snapshots, globals=globals, restore_argv=self.restore_argv)

    @staticmethod
    def sysctl_requirements(families: Iterable[int] = (4, 6)) -> tuple["SysctlRequirement", ...]:
        return sysctl_requirements(families)


# --------------------------------------------------------------------------------------------
# Kernel prerequisites (semantics.md §13), as data for `status`


@dataclass(frozen=True)
class SysctlRequirement:
    family: int
    path: str  # the file under /proc/sys
    value: str  # required content
    message: str  # what to tell the operator when it differs (or the file is missing)

    @property
    def name(self) -> str:
        """The sysctl as ``executor.read_sysctl`` takes it (``net/bridge/…``)."""
        return self.path.removeprefix("/proc/sys/")


SYSCTL_REQUIREMENTS = (
    SysctlRequirement(
        4,
        "/proc/sys/net/bridge/bridge-nf-call-iptables",
        "1",
        "IPv4 (L3) rules of the ebiptables backend have no effect on bridged traffic unless "
        "br_netfilter is loaded and net.bridge.bridge-nf-call-iptables=1 "
        "(echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables)",
    ),
    SysctlRequirement(
        6,
        "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
        "1",
        "IPv6 (L3) rules of the ebiptables backend have no effect on bridged traffic unless "
        "br_netfilter is loaded and net.bridge.bridge-nf-call-ip6tables=1 "
        "(echo 1 > /proc/sys/net/bridge/bridge-nf-call-ip6tables)",
    ),
)


def sysctl_requirements(families: Iterable[int] = (4, 6)) -> tuple[SysctlRequirement, ...]:
    """The sysctls L3 rules of these families need (none for L2-only rulesets)."""
    fams = set(families)
    return tuple(r for r in SYSCTL_REQUIREMENTS if r.family in fams)


def global_check_steps() -> tuple[Step, ...]:
    """Queries (exit status 0 = present) for the global chains' hooks, for `status`."""
    steps = []
    for tool in (IPTABLES, IP6TABLES):
        for chain, hook, _ in GLOBAL_HOOKS:
            steps.append(Step((tool, "-w", "-C", hook, "-j", chain)))
    return tuple(steps)


# --------------------------------------------------------------------------------------------
# Reading the kernel back (recovery, purge, tests)

_EB_ROOT_RE = re.compile(r"nwf-([IOJP])-(.+)")
_EB_SUB_RE = re.compile(r"N([IOJP])-([^:]+):(.+)")
_IPT_RE = re.compile(r"N(FI|FO|HI|FJ|FP|HJ)-(.+)")


def owner_of_chain(tool: str, chain: str) -> str | None:
    """The port a chain of ours belongs to (None: not a per-port chain of ours)."""
    if tool == EBTABLES:
        m = _EB_SUB_RE.fullmatch(chain) or _EB_ROOT_RE.fullmatch(chain)
        return m.group(2) if m else None
    m = _IPT_RE.fullmatch(chain)
    return m.group(2) if m else None


@dataclass
class Snapshot:
    """The chains and rules of one table in a tool's ``*-save`` output."""

    chains: list[str]  # every chain in the table
    rules: list[str]  # every "-A ..." line


def parse_save(text: str, table: str) -> Snapshot:
    chains: list[str] = []
    rules: list[str] = []
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = line[1:]
            continue
        if current != table:
            continue
        if line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            rules.append(line)
    return Snapshot(chains, rules)


def _table(tool: str) -> str:
    return "nat" if tool == EBTABLES else "filter"


def records_from_snapshot(snapshots: Mapping[str, str]) -> dict[str, dict]:
    """Records of every port that has objects of ours in the kernel, from ``*-save`` output
    (keys: tool names; missing tools count as empty). Temporary chains left by an interrupted
    change are included: passing such a record as ``old`` makes the next plan remove them."""
    recs: dict[str, dict] = {}

    def rec(port: str) -> dict:
        if port not in recs:
            recs[port] = {"format": RECORD_FORMAT, "backend": NAME, "port": port, "l2": {}, "l3": []}
            for t in TOOLS:
                recs[port][t] = {"chains": [], "rules": []}
        return recs[port]

    for tool in TOOLS:
        snap = parse_save(snapshots.get(tool, ""), _table(tool))
        ours = {c: owner_of_chain(tool, c) for c in snap.chains}
        ours = {c: p for c, p in ours.items() if p is not None}
        # roots and L3 chains first, so they are removed before their sub-chains are re-declared
        for chain in sorted(ours, key=lambda c: (c.startswith("N") and tool == EBTABLES, c)):
            rec(ours[chain])[tool]["chains"].append(chain)
        for line in snap.rules:
            src = line.split()[1]
            if src in ours:
                continue  # inside a chain of ours: removed with the chain
            target = _rule_target(line)
            if target in ours:
                rec(ours[target])[tool]["rules"].append(line)
            elif tool != EBTABLES and src == GLOBAL_IN_POST:
                m = re.search(r"--physdev-in\s+(\S+)", line)
                if m:
                    rec(m.group(1))[tool]["rules"].append(line)
    for port, r in recs.items():
        for side, letter in ((Side.FROM_VM, "I"), (Side.TO_VM, "O")):
            root = f"nwf-{letter}-{port}"
            if root in r[EBTABLES]["chains"]:
                subs = [m.group(3) for c in r[EBTABLES]["chains"] if (m := _EB_SUB_RE.fullmatch(c)) and m.group(1) == letter]
                r["l2"][side.value] = subs
            else:
                r["l2"][side.value] = None
        r["l3"] = [f for f in (4, 6) if f"NFI-{port}" in r[FAMILY_TOOL[f]]["chains"]]
    return recs


def purge_steps(
    snapshots: Mapping[str, str],
    *,
    globals: bool = True,
    restore_argv: Mapping[str, Sequence[str]] = RESTORE_ARGV,
) -> tuple[Step, ...]:
    """Steps that remove every object of ours found in ``snapshots`` (``*-save`` output per
    tool): per-port chains (final, temporary, orphaned) and their links, and with ``globals``
    the global chains and their hooks. One transaction per tool."""
    steps = []
    for tool in TOOLS:
        snap = parse_save(snapshots.get(tool, ""), _table(tool))
        ours = [c for c in snap.chains if owner_of_chain(tool, c) is not None]
        glob = [c for c in GLOBAL_CHAINS if c in snap.chains] if tool != EBTABLES else []
        lines = []
        for line in snap.rules:
            src = line.split()[1]
            if src in ours or src in glob:
                continue  # goes with its chain (global chains are flushed)
            target = _rule_target(line)
            if target in ours or (globals and target in glob):
                lines.append(_delete_line(line))
        lines += [_declare(tool, g) for g in glob]
        lines += _remove_chains(tool, ours)
        if globals:
            lines += [f"-X {g}" for g in glob]
        if lines:
            steps.append(Step(tuple(restore_argv[tool]), _wrap(tool, lines)))
    return tuple(steps)


# --------------------------------------------------------------------------------------------
# Digests of what the kernel has per port (verify, reapply, reconnect)
#
# From the ``*-save`` outputs of the survey, per port: its chains (role = the chain's kind and
# sub-chain name, e.g. ``I``, ``I:arp-ip``, ``FI``, temporary ones ``J``…; policy; rules in order,
# this port's chain names replaced by their roles), the rules elsewhere that lead to them
# (``PREROUTING -i P -j nwf-I-P``, ``nwf-in … --physdev-in P -g NFI-P``) and its ``nwf-in-post``
# ACCEPT, and for ip(6)tables the FORWARD/INPUT hooks into the global chains. Counters are
# dropped (``[n:m]``, ``-c n m``).

DIGEST_FORMAT = 1
_COUNTERS_PREFIX_RE = re.compile(r"\A\[\d+:\d+\]\s+")
_COUNTERS_SUFFIX_RE = re.compile(r"\s+-c\s+\d+\s+\d+\s*\Z")
_TOKEN_RE = re.compile(r"\S+")
_PHYSDEV_IN_RE = re.compile(r"--physdev-in\s+(\S+)")


@dataclass
class _Save:
    """One table of a ``*-save`` output, with the lookups the digests need."""

    policies: dict[str, str] = field(default_factory=dict)  # chain → policy ("-" for user chains)
    rules: dict[str, list[str]] = field(default_factory=dict)  # chain → "-A …" lines, in order
    lines: list[tuple[str, str | None, str]] = field(default_factory=list)  # (source, target, line)
    owned: dict[str, list[str]] = field(default_factory=dict)  # port → its chains
    by_target: dict[str, list[str]] = field(default_factory=dict)  # target chain → lines outside ours
    in_post: dict[str, list[str]] = field(default_factory=dict)  # port → nwf-in-post lines
    hooks: list[str] = field(default_factory=list)  # lines into the global chains, in order


def _parse_save_full(text: str, table: str, tool: str | None = None) -> _Save:
    save = _Save()
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = line[1:]
            continue
        if current != table or line == "COMMIT":
            continue
        if line.startswith(":"):
            words = line[1:].split()
            save.policies[words[0]] = words[1] if len(words) > 1 else "-"
            save.rules.setdefault(words[0], [])
            continue
        line = _COUNTERS_SUFFIX_RE.sub("", _COUNTERS_PREFIX_RE.sub("", line))
        if not line.startswith("-A "):
            continue
        source = line.split()[1]
        target = _rule_target(line)
        save.rules.setdefault(source, []).append(line)
        save.lines.append((source, target, line))
    tool = tool or (EBTABLES if table == "nat" else IPTABLES)
    owner = {c: owner_of_chain(tool, c) for c in save.rules}
    for chain, port in owner.items():
        if port is not None:
            save.owned.setdefault(port, []).append(chain)
    for source, target, line in save.lines:
        if target is not None and owner.get(target) is not None and owner.get(source) != owner[target]:
            save.by_target.setdefault(target, []).append(line)
        if source == GLOBAL_IN_POST:
            m = _PHYSDEV_IN_RE.search(line)
            if m:
                save.in_post.setdefault(m.group(1), []).append(line)
        if target in GLOBAL_CHAINS and source not in GLOBAL_CHAINS and owner.get(source) is None:
            save.hooks.append(line)
    return save


def _survey_map(outputs: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Survey outputs (a sequence in :data:`TOOLS` order, or a mapping tool → text) as a mapping."""
    if isinstance(outputs, Mapping):
        return {t: outputs.get(t, "") or "" for t in TOOLS}
    outputs = list(outputs)
    return {t: (outputs[i] if i < len(outputs) else "") or "" for i, t in enumerate(TOOLS)}


def _chain_role(tool: str, chain: str) -> str:
    if tool == EBTABLES:
        m = _EB_SUB_RE.fullmatch(chain)
        if m:
            return f"{m.group(1)}:{m.group(3)}"
        m = _EB_ROOT_RE.fullmatch(chain)
        return m.group(1) if m else chain
    m = _IPT_RE.fullmatch(chain)
    return m.group(1) if m else chain


def port_structure(saves: Mapping[str, _Save], port: str) -> dict | None:
    """What the kernel has for ``port`` (see the section comment), None when nothing."""
    chains, dispatch, hooks = [], [], {}
    for tool in TOOLS:
        save = saves.get(tool) or _Save()
        owned = save.owned.get(port, [])
        roles = {c: f"<{_chain_role(tool, c)}>" for c in owned}

        def subst(line: str) -> str:
            return _TOKEN_RE.sub(lambda m: roles.get(m.group(0), m.group(0)), line)

        for chain in owned:
            chains.append([tool, roles[chain], save.policies.get(chain, "-"),
                           [subst(r) for r in save.rules.get(chain, [])]])
        leading = [line for chain in owned for line in save.by_target.get(chain, [])]
        leading += [line for line in save.in_post.get(port, []) if line not in leading]
        dispatch += [[tool, subst(line)] for line in leading]
        if tool != EBTABLES and (owned or leading):
            hooks[tool] = list(save.hooks)
    if not chains and not dispatch:
        return None
    return {"chains": sorted(chains), "dispatch": sorted(dispatch), "hooks": hooks}


def port_digest(structure: dict | None) -> str:
    """sha256 (hex) of a port's normalised structure (``None``: nothing of the port)."""
    return canonical_digest({"backend": NAME, "format": DIGEST_FORMAT, "port": structure})


def _expects_nothing(record: PortRecord) -> bool:
    return not any((record.get(t) or {}).get("chains") or (record.get(t) or {}).get("rules") for t in TOOLS)


def _repair_globals_lines(save: _Save) -> list[str]:
    """Lines making the global chains and their hooks exactly right, given the current state:
    every rule leading into a global chain is deleted, the missing global chains are created
    (``-N``: a stale survey makes the transaction fail rather than flush a chain in use), and
    the hooks are inserted at the top of FORWARD/INPUT."""
    lines = [_delete_line(line) for line in save.hooks]
    lines += [f"-N {chain}" for chain in GLOBAL_CHAINS if chain not in save.policies]
    lines += [f"-I {hook} {pos} -j {chain}" for chain, hook, pos in GLOBAL_HOOKS]
    return lines


def describe_plan(plan: Plan) -> str:
    """Readable text of a plan (golden files, logs)."""
    out = []
    for phase in ("apply", "commit", "rollback"):
        for i, step in enumerate(getattr(plan, phase), 1):
            flag = " (errors ignored)" if step.ignore_errors else ""
            out.append(f"## {phase} {i}: {' '.join(step.argv)}{flag}\n")
            out.append(step.stdin)
    return "".join(out)


__all__ = [
    "EbiptablesBackend",
    "NAME",
    "SysctlRequirement",
    "SYSCTL_REQUIREMENTS",
    "describe_plan",
    "global_check_steps",
    "l2_root_chain",
    "l2_sub_chain",
    "l3_chain",
    "port_digest",
    "port_structure",
    "purge_steps",
    "records_from_snapshot",
    "render_l2_conds",
    "render_l3_args",
    "render_port",
    "sysctl_requirements",
]

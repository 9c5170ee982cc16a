"""What the ebiptables backend's chains and rules are called (pure).

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
``I-a-arp-mac`` does in libvirt. A chain's *role* is its kind letter(s) and sub-chain name
without the port (``I``, ``I:mac``, ``FI``, temporary ``J``…): what digests compare.
"""

from __future__ import annotations

import re

from ...errors import UnsupportedError
from ...ir import Side

NAME = "ebiptables"  # the backend's name, in its records
RECORD_FORMAT = 1
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
TEMP_PREFIXES = tuple(p[1] for p in (*L2_ROOT_PREFIX.values(), *L2_SUB_PREFIX.values(), *L3_PREFIX.values()))

# Our per-port chain names read back: kind letter(s), port, sub-chain (ebtables) or none.
EB_CHAIN_PATTERNS = (re.compile(r"N(?P<kind>[IOJP])-(?P<port>[^:]+):(?P<sub>.+)"),
                     re.compile(r"nwf-(?P<kind>[IOJP])-(?P<port>.+)"))
IP_CHAIN_PATTERNS = (re.compile(r"N(?P<kind>FI|FO|HI|FJ|FP|HJ)-(?P<port>.+)"),)

EBTABLES_CHAIN_MAX = 31
IPTABLES_CHAIN_MAX = 28
PORT_MAX = 15
SUFFIX_MAX = 12

# Interface names we accept: what the kernel allows, minus what the restore syntax or the
# ebtables/physdev matches would read differently ('+' is a wildcard there, quotes and '!' are
# syntax, '#' starts a comment).
_PORT_RE = re.compile(r"[A-Za-z0-9_.=@%-]{1,15}")
_SUFFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,12}")
_TARGET_RE = re.compile(r"\s-[jg]\s+(\S+)\s*$")


def is_port_name(port: str) -> bool:
    return bool(_PORT_RE.fullmatch(port)) and not port.startswith("-") and port not in (".", "..")


def check_port(port: str) -> str:
    """Return ``port`` if this backend can use it as an interface name, else raise."""
    if not is_port_name(port):
        raise UnsupportedError(
            f"port name {port!r} cannot be used with the ebiptables backend "
            "(1-15 characters of A-Z a-z 0-9 _ . = @ % -, not starting with '-')"
        )
    return port


def check_suffix(name: str) -> str:
    if not _SUFFIX_RE.fullmatch(name) or name == "root":
        raise UnsupportedError(f"L2 chain name {name!r} cannot be a sub-chain (1-12 of A-Z a-z 0-9 _ . : -)")
    return name


def l2_root_chain(side: Side, port: str, temp: bool = False) -> str:
    return L2_ROOT_PREFIX[side][temp] + port


def l2_sub_chain(side: Side, port: str, chain: str, temp: bool = False) -> str:
    return L2_SUB_PREFIX[side][temp] + port + L2_SUB_SEP + chain


def l3_chain(copy: str, port: str, temp: bool = False) -> str:
    return L3_PREFIX[copy][temp] + port


def l2_link(side: Side, port: str, chain: str) -> str:
    hook, opt = L2_HOOK[side]
    return f"-A {hook} {opt} {port} -j {chain}"


def l3_link(copy: str, port: str, chain: str) -> str:
    base, match = L3_HOOK[copy]
    return f"-A {base} {' '.join(match)} {port} -g {chain}"


def in_post_rule(port: str) -> str:
    return f"-A {GLOBAL_IN_POST} -m physdev --physdev-in {port} -j ACCEPT"


def is_temp_chain(name: str) -> bool:
    """Whether ``name`` is one of our temporary chain names."""
    return name.startswith(TEMP_PREFIXES)


def rule_target(line: str) -> str | None:
    """The chain a ``-A …`` line jumps or goes to."""
    found = _TARGET_RE.search(line)
    return found.group(1) if found else None


def delete_line(add_line: str) -> str:
    if not add_line.startswith("-A "):
        raise ValueError(f"not an append line: {add_line!r}")
    return "-D " + add_line[3:]

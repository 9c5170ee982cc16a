"""Checks shared by the parser (literal values) and the resolver (substituted values).

Pure functions over the model: names, variable references, and the cross-attribute rules of
filter-language.md §8 that need the whole merged match.
"""

from __future__ import annotations

import re

from .model import CHAIN_PREFIXES, Direction, Match, VarRef
from .schema import ICMPV6_GROUP, IP_PROTOCOLS, ND_TYPES, PORT_PROTOCOLS, decimal, decode_uint

NAMESPACE = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"  # ours, in domain metadata and binding records
FILTER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,199}\Z")
PARAM_NAME_RE = re.compile(r"^[A-Za-z0-9_]+\Z")
PARAM_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:]+\Z")
PORT_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}\Z")
CHAIN_CHARS_RE = re.compile(r"^[A-Za-z0-9_.:-]+\Z")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z")
_VAR_RE = re.compile(r"^\$([A-Za-z0-9_]+)(?:\[\s*(@?)\s*([0-9]+)\s*\])?\s*$")
MAX_ITERATOR = 1000
CHAIN_NAME_MAX = 12


def parse_varref(text: str) -> VarRef:
    """``$NAME``, ``$NAME[N]`` or ``$NAME[@ID]`` (ValueError with the reason otherwise)."""
    found = _VAR_RE.match(text)
    if not found:
        raise ValueError("malformed variable reference (expected $NAME, $NAME[N] or $NAME[@ID])")
    name, at, number = found.groups()
    if number is None:
        return VarRef(name)
    if at:
        if decimal(number) > MAX_ITERATOR:
            raise ValueError(f"iterator id exceeds the maximum of {MAX_ITERATOR}")
        return VarRef(name, iterator=decimal(number))
    return VarRef(name, index=decimal(number))


def chain_name_problem(chain: str) -> str | None:
    """Why ``chain`` is not a valid chain name, or None."""
    if len(chain) > CHAIN_NAME_MAX:
        return f"chain name '{chain}' is longer than {CHAIN_NAME_MAX} characters"
    if not CHAIN_CHARS_RE.match(chain):
        return f"chain name '{chain}' contains invalid characters (allowed: A-Z a-z 0-9 _ . : -)"
    if chain == "root" or any(chain.startswith(prefix) for prefix in CHAIN_PREFIXES):
        return None
    if chain.startswith("root"):
        return f"chain name '{chain}' is invalid: 'root' must be the whole name"
    return (f"invalid chain name '{chain}': use 'root' or a name starting with one of "
            + ", ".join(CHAIN_PREFIXES))


def normalise_uuid(text: str) -> str:
    """Dashed lower-case UUID (ValueError if malformed)."""
    raw = text.strip()
    if not UUID_RE.match(raw) or len(raw.replace("-", "")) != 32 or raw.count("-") not in (0, 4):
        raise ValueError(f"malformed UUID '{text}'")
    h = raw.replace("-", "").lower()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _literal_number(match: Match, name: str) -> int | None:
    attr = match.get(name)
    if attr is None or isinstance(attr.value, VarRef):
        return None
    return decode_uint(match.spec.attr(name), attr.value)


def match_problems(match: Match, direction: Direction) -> list[str]:
    """Cross-attribute problems of a merged match (§8); variables are skipped where unknown."""
    problems: list[str] = []
    names = {attr.name for attr in match.attrs}
    spec = match.spec
    for attr in match.attrs:
        base = spec.attr(attr.name).base
        if base and base not in names and not (match.protocol == "ipv6" and attr.name in ICMPV6_GROUP):
            problems.append(f"attribute '{attr.name}' requires '{base}'")
    for side in ("src", "dst"):
        if f"{side}ipaddr" in names and f"{side}ipfrom" in names and spec.attr(f"{side}ipfrom"):
            problems.append(f"'{side}ipaddr' and '{side}ipfrom' exclude each other")
    if match.protocol in ("ip", "ipv6"):
        problems += _ip_element_problems(match, names)
    if match.protocol == "stp" and "srcmacaddr" in names and direction is Direction.INOUT:
        problems.append("stp with 'srcmacaddr' is not supported on direction 'inout'")
    return problems


def _ip_element_problems(match: Match, names: set[str]) -> list[str]:
    problems = []
    kind = "IP" if match.protocol == "ip" else "IPv6"
    protocol = _literal_number(match, "protocol")
    protocol_var = isinstance(match.value("protocol"), VarRef)
    if names & {"srcportstart", "srcportend", "dstportstart", "dstportend"} and not protocol_var:
        if protocol not in PORT_PROTOCOLS:
            problems.append(f"{kind} rule with ports requires protocol tcp(6), udp(17), dccp(33) or sctp(132)")
    if names & set(ICMPV6_GROUP) and not protocol_var and protocol != IP_PROTOCOLS["icmpv6"]:
        problems.append("ICMPv6 type/code requires protocol='icmpv6'")
    for name in sorted(n for n in names if match.spec.attr(n).extension):
        problem = _nd_problem(match)
        if problem:
            problems.append(f"attribute '{name}' {problem}")
    return problems


def _nd_problem(match: Match) -> str | None:
    """Why the Neighbour Discovery fields (nwf:nd-*) cannot apply to ``match``, or None: they
    need one ICMPv6 message type, Neighbour Solicitation or Advertisement, matched positively."""
    want = f"requires a positive protocol='icmpv6' and type='{ND_TYPES[0]}' or '{ND_TYPES[1]}' without typeend"
    protocol, icmp_type = match.get("protocol"), match.get("type")
    if protocol is None or icmp_type is None or protocol.negated or icmp_type.negated:
        return want
    end = match.get("typeend")
    if isinstance(icmp_type.value, VarRef) or isinstance(end.value if end else None, VarRef):
        return None  # checked again once the values are known
    number = decode_uint(match.spec.attr("type"), icmp_type.value)
    if number not in ND_TYPES or (end is not None and decode_uint(match.spec.attr("typeend"), end.value) != number):
        return want
    return None

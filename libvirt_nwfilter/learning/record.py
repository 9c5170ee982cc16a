"""The learned state of a binding in its XML: ``<nwf:learning>`` after ``<filterref>``.

Binding records and the journal keep it, ``binding-dumpxml`` shows it::

  <nwf:learning xmlns:nwf='http://libvirt-nwfilter.org/xmlns/nwfilter/1.0' mode='dhcp' state='leased'>
    <nwf:address ip='10.0.0.5' expires='2024-05-01T12:00:00Z'/>
  </nwf:learning>

``expires`` is UTC (absent: never). ``state`` is derived from the rest and checked on reading.
"""

from __future__ import annotations

import datetime
import ipaddress

from ..config import MAX_IPV6_LEARNING_LIMIT
from ..model import Lease, Learning
from ..syntax import NAMESPACE

TAG = f"{{{NAMESPACE}}}learning"
ADDRESS_TAG = f"{{{NAMESPACE}}}address"
MODES = ("any", "dhcp")
MAX_LEASES = 32  # addresses one port may hold (dhcp: a guest with many client identifiers)
MAX_IPV6_ADDRESSES = MAX_IPV6_LEARNING_LIMIT  # the most the configuration may allow
DEFAULT_VARIABLES = ("IP",)


def format_learning(learning: Learning, indent: str = "  ") -> list[str]:
    learns = f" learn='{' '.join(learning.variables)}'" if learning.variables != DEFAULT_VARIABLES else ""
    head = f"{indent}<nwf:learning xmlns:nwf='{NAMESPACE}' mode='{learning.mode}'{learns} state='{learning.state}'"
    if not learning.leases:
        return [head + "/>"]
    lines = [head + ">"]
    for lease in learning.leases:
        expires = f" expires='{format_time(lease.expires)}'" if lease.expires is not None else ""
        lines.append(f"{indent}  <nwf:address ip='{lease.address}'{expires}/>")
    return lines + [f"{indent}</nwf:learning>"]


def format_time(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> int:
    """Seconds since the epoch of ``YYYY-MM-DDTHH:MM:SSZ`` (ValueError otherwise)."""
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    return int(moment.replace(tzinfo=datetime.timezone.utc).timestamp())


def parse_learning(node, problems) -> Learning | None:
    """The ``<nwf:learning>`` element ``node``; every problem goes to ``problems.add(node, text)``."""
    unknown = sorted(set(node.attrib) - {"mode", "learn", "state"})
    if unknown:
        problems.add(node, f"unknown attribute(s) {', '.join(unknown)} (expected mode, learn, state)")
    mode = node.get("mode")
    if mode not in MODES:
        problems.add(node, f"attribute 'mode': '{mode or ''}' is not any or dhcp")
        return None
    variables = tuple((node.get("learn") or " ".join(DEFAULT_VARIABLES)).split())
    if variables not in (("IP",), ("IPV6",), ("IP", "IPV6")):
        problems.add(node, f"attribute 'learn': '{node.get('learn')}' is not IP, IPV6 or 'IP IPV6'")
        return None
    leases = []
    for child in node:
        if not isinstance(child.tag, str):
            continue
        if child.tag != ADDRESS_TAG:
            problems.add(child, "unknown element (expected <nwf:address>)")
            continue
        lease = _parse_address(child, problems, variables)
        if lease is not None:
            leases.append(lease)
    if len({lease.address for lease in leases}) != len(leases):
        problems.add(node, "an address is listed twice")
    for version, limit in ((4, MAX_LEASES), (6, MAX_IPV6_ADDRESSES)):
        if sum(1 for lease in leases if ipaddress.ip_address(lease.address).version == version) > limit:
            problems.add(node, f"more than {limit} IPv{version} addresses")
    learning = Learning(mode, tuple(sorted(leases, key=address_key)), variables)
    if node.get("state") not in (None, learning.state):
        problems.add(node, f"attribute 'state': '{node.get('state')}' contradicts the addresses ({learning.state})")
    return learning


def _parse_address(node, problems, variables: tuple[str, ...]) -> Lease | None:
    unknown = sorted(set(node.attrib) - {"ip", "expires"})
    if unknown:
        problems.add(node, f"unknown attribute(s) {', '.join(unknown)} (expected ip, expires)")
    families = [(ipaddress.IPv4Address, "IPv4")] * ("IP" in variables) + \
        [(ipaddress.IPv6Address, "IPv6")] * ("IPV6" in variables)
    address = None
    for family, _ in families:
        try:
            address = str(family(node.get("ip") or ""))
        except ValueError:
            continue
    if address is None:
        names = " or ".join(name for _, name in families)
        problems.add(node, f"attribute 'ip': '{node.get('ip') or ''}' is not an {names} address")
        return None
    text = node.get("expires")
    if text is None:
        return Lease(address)
    try:
        return Lease(address, parse_time(text))
    except ValueError:
        problems.add(node, f"attribute 'expires': '{text}' is not a time YYYY-MM-DDTHH:MM:SSZ")
        return None


def address_key(lease: Lease) -> int:
    return int(ipaddress.ip_address(lease.address))


def describe(learning: Learning) -> str:
    """One line for listings: ``dhcp: 10.0.0.5 until 2024-05-01T12:00:00Z``, ``any: learning``."""
    if not learning.leases:
        return f"{learning.mode}: learning"
    return f"{learning.mode}: " + ", ".join(
        lease.address + (f" until {format_time(lease.expires)}" if lease.expires is not None else "")
        for lease in learning.leases)

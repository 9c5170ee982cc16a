"""What the nftables backend's kernel objects are called and numbered (pure).

Tables and maps
===============

Only our own tables are touched. The ports are spread over :data:`SHARDS` shards by a hash of
their name (:func:`shard_of`); shard ``k`` is ``table bridge libvirt_nwfilter_k`` and, in the
``inet`` conntrack mode, also ``table inet libvirt_nwfilter_k``, each with its own base chains and
dispatch maps. The kernel checks a whole table for loops each time a transaction adds a verdict
to it (any rule, or a map element that jumps): measured at 1000 ports in one table, ~5 ms per
change against ~0.5 ms for the same change in a small table. A frame meets one map lookup per
shard and hook: 4 shards, because a one-port change with 1000 present measured 3.9 ms in one
table, 2.4 in 2, 1.9 in 4 and 2.0 in 8, while a bridged frame cost 0.2, 0.7 and 1.6 µs more with
2, 4 and 8 shards than with one table (ping -f between two guests, 1000 other ports bound).

Dispatch maps (``ifname`` or ``mark`` → verdict, each element a ``jump`` to a port's chain):
``l2_from_vm``, ``l2_to_vm`` (bridge), ``fi``, ``fo``, ``hi`` (L3 copies; bridge
table keyed by ``ifname`` in the bridge conntrack mode, inet table keyed by the port's mark id in
the inet mode), ``mark_out`` (bridge, inet mode). ``port_ids`` (``mark : ifname``, in the one
``table inet libvirt_nwfilter_ids``, which holds nothing else) registers each mark id with its
port across all shards. ``libvirt_nwfilter`` (both families) is the single table of earlier
versions: listed and deleted like ours, never filled (a change to a port of it fails and is retried
as a rebuild, which deletes it).

Per-port chains and sets
========================

Per-port chains carry a generation number (a chain cannot be renamed in the batch that creates
it): ``I-<gen>/<port>`` (from-VM root), ``I-<gen>/<port>/<sub>`` (sub-chains), ``O-…`` (to-VM),
``FI-``, ``FO-``, ``HI-`` (L3 copies), ``MO-`` (egress mark), sets ``CL-<gen>/<port>/<n>``
(connlimit). In names ``_`` is written ``__`` and ``:`` ``_c`` (a quoted chain name is not
accepted by nft 1.0.6; ``/`` cannot occur in port or chain names, so names never collide and
read back to their port: :func:`parse_object`). A port's *role* for an object is its kind and
sub-chain name without the generation (``I``, ``I/mac``, ``CL/1``): what digests compare.

Mark ids (inet mode)
====================

The inet family cannot see bridge ports (``iifname`` there is the bridge), so a port with L3
rules gets a small numeric id (1..4095) carried in the packet mark: the ingress id is set (with
a mask, other bits preserved) by the first rule of the port's L2 from-VM root chain at bridge
prerouting, the egress id by the port's ``MO-`` chain at bridge forward -200 (before
br_netfilter calls the inet forward hook). Layout with the defaults (``mark_shift=8``,
``id_bits=12``, :class:`MarkLayout`): ingress id in bits 20..31 (``0xfff00000``), egress id in
bits 8..19 (``0x000fff00``); bits 0..7 are left to others.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from ...errors import NwfilterError, ValidationError
from ..base import PortRecord

LEGACY_TABLE = "libvirt_nwfilter"
SHARDS = 4
SHARD_TABLES = tuple(f"{LEGACY_TABLE}_{shard}" for shard in range(SHARDS))
IDS_TABLE = f"{LEGACY_TABLE}_ids"
OUR_TABLES = frozenset((*SHARD_TABLES, IDS_TABLE, LEGACY_TABLE))
PROBE_TABLE = "libvirt_nwfilter_probe"
FAMILIES = ("bridge", "inet")
RECORD_FORMAT = 1
CONNTRACK_MODES = ("inet", "bridge")
DISPATCH_MAPS = ("l2_from_vm", "l2_to_vm", "mark_out", "fi", "fo", "hi")  # element: key → jump
MAPS = frozenset(DISPATCH_MAPS + ("port_ids",))

PORT_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,15}\Z")
_CHAIN_PART_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
_RECORDED_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_./-]{0,254}\Z")
_PORT_OBJECT_RE = re.compile(r"(I|O|FI|FO|HI|MO|CL)-(\d+)/([^/\s]+)(?:/(\S+))?\Z")
_ENCODED_RE = re.compile(r"(?:[^_]|__|_c)+\Z")


def shard_of(port: str) -> str:
    """The table (of either family) that holds ``port``'s chains, sets and dispatch elements."""
    return SHARD_TABLES[zlib.crc32(port.encode()) % SHARDS]


def table_of(port: str, map_name: str | None = None) -> str:
    """The table of a port's object: ``port_ids`` elements in :data:`IDS_TABLE`, all else in
    the port's shard."""
    return IDS_TABLE if map_name == "port_ids" else shard_of(port)


def check_port_name(port: str) -> str:
    """``port`` if it is a safe interface name ([A-Za-z0-9_.:-]{1,15}), else ValidationError."""
    if not isinstance(port, str) or not PORT_NAME_RE.match(port) or port in (".", ".."):
        raise ValidationError([f"port name {port!r} is not a valid interface name "
                               "(1-15 characters of A-Z a-z 0-9 _ . : -)"])
    return port


def encode(part: str) -> str:
    """An identifier-safe, injective spelling of a port or chain name part."""
    return part.replace("_", "__").replace(":", "_c")


def decode(text: str) -> str | None:
    """The name :func:`encode` spelled as ``text``; None for a spelling it never makes."""
    if "_" not in text:
        return text
    if not _ENCODED_RE.match(text):
        return None
    return re.sub(r"_(.)", lambda m: "_" if m.group(1) == "_" else ":", text)


def chain_name(kind: str, gen: int, port: str, sub: str | None = None) -> str:
    name = f"{kind}-{gen}/{encode(port)}"
    if sub is not None:
        if not _CHAIN_PART_RE.match(sub):
            raise ValidationError([f"sub-chain name {sub!r} contains characters nft cannot take"])
        name += "/" + encode(sub)
    return name


class ObjectName(NamedTuple):
    """A per-port chain or set name read back: its port, generation and role."""

    port: str
    gen: int
    role: str  # kind and sub-chain name (or set number): ``I``, ``I/mac``, ``CL/1``


@lru_cache(maxsize=4096)
def parse_object(name: str) -> ObjectName | None:
    """The port, generation and role of one of our per-port object names (None: not one)."""
    found = _PORT_OBJECT_RE.match(name)
    port = decode(found.group(3)) if found else None
    if port is None:
        return None
    kind, sub = found.group(1), found.group(4)
    return ObjectName(port, int(found.group(2)), kind + ("/" + sub if sub else ""))


def quote(text: str) -> str:
    """A double-quoted nft string (callers guarantee there is no ``"``)."""
    assert '"' not in text
    return f'"{text}"'


def hex_text(value: int, width: int = 4) -> str:
    return f"0x{value:0{width}x}"


def key_text(key: object) -> str:
    """A map key of a record (port name or mark value) as nft reads it."""
    if isinstance(key, bool):
        raise NwfilterError(f"bad map key {key!r} in a record")
    if isinstance(key, int):
        return hex_text(key, 8)
    if isinstance(key, str):
        return quote(check_port_name(key))
    raise NwfilterError(f"bad map key {key!r} in a record")


@dataclass(frozen=True)
class MarkLayout:
    """Where the ingress and egress ids sit in the 32-bit packet mark (see the docstring)."""

    mark_shift: int = 8
    id_bits: int = 12

    def __post_init__(self) -> None:
        if self.id_bits < 1 or self.mark_shift < 0 or self.mark_shift + 2 * self.id_bits > 32:
            raise ValueError("mark layout does not fit in 32 bits")

    @property
    def max_id(self) -> int:
        return (1 << self.id_bits) - 1

    @property
    def out_shift(self) -> int:
        return self.mark_shift

    @property
    def in_shift(self) -> int:
        return self.mark_shift + self.id_bits

    @property
    def out_mask(self) -> int:
        return self.max_id << self.out_shift

    @property
    def in_mask(self) -> int:
        return self.max_id << self.in_shift


def port_id(record: PortRecord | None) -> int | None:
    """The mark id a record holds (None when the port has none)."""
    if not record:
        return None
    value = record.get("id")
    return int(value) if value is not None else None


def check_record(port: str, record: PortRecord) -> None:
    """Refuse records that are not ours or could inject text into the batch."""
    problems = []
    if record.get("backend") != "nftables":
        problems.append(f"port {port}: record of backend {record.get('backend')!r}, not nftables")
    for entry in list(record.get("chains", ())) + list(record.get("sets", ())):
        if (len(entry) != 2 or entry[0] not in FAMILIES or not isinstance(entry[1], str)
                or not _RECORDED_NAME_RE.match(entry[1])):
            problems.append(f"port {port}: bad chain/set entry {entry!r} in record")
    for entry in record.get("elements", ()):
        if len(entry) != 3 or entry[0] not in FAMILIES or entry[1] not in MAPS:
            problems.append(f"port {port}: bad element entry {entry!r} in record")
    if problems:
        raise NwfilterError("; ".join(problems))

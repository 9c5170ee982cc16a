"""The kernel's nf_tables notifications, read for self-healing (pure: bytes in, transactions out).

Every committed nf_tables transaction is announced on the netlink group ``NFNLGRP_NFTABLES``:
one message per object it added or deleted (table, chain, rule, set, set elements, ...), then
``NFT_MSG_NEWGEN`` with the new generation number and the PID and name (``comm``) of the
process that committed it. :class:`Transactions` groups the messages of one transaction and
keeps only what concerns our tables: the ports whose objects it touched (a per-port chain or set
by its name, a rule by its chain, a dispatch element by the chain it jumps to or the port name
it holds) and whether it touched anything else of ours (base chains, maps, the tables
themselves) or deleted one of our tables.

Our own changes are told apart by the process name: the executor runs ``nft`` under the name
:data:`~libvirt_nwfilter.executor.MARKED_NFT` (``nft`` is anyone's).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import lru_cache

from .names import FAMILIES, OUR_TABLES, PORT_NAME_RE, parse_object

NFNL_SUBSYS_NFTABLES = 10
NFNLGRP_NFTABLES = 7
# NFT_MSG_* (linux/netfilter/nf_tables.h)
NEWTABLE, DELTABLE, NEWCHAIN, DELCHAIN, NEWRULE, DELRULE = 0, 2, 3, 5, 6, 8
NEWSET, DELSET, NEWSETELEM, DELSETELEM, NEWGEN, GETGEN = 9, 11, 12, 14, 15, 16
DESTROYTABLE = 26
_FAMILY_NUMBERS = {"inet": 1, "bridge": 7}
OUR_FAMILIES = frozenset(_FAMILY_NUMBERS[family] for family in FAMILIES)

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NLATTR = struct.Struct("=HH")
_NFGENMSG_SIZE = 4
_NLA_TYPE_MASK = 0x3FFF
IFNAMSIZ = 16


@dataclass
class Transaction:
    """One committed transaction, as far as our tables are concerned."""

    generation: int = 0
    pid: int = 0
    process: str = ""  # the committing task's name (comm)
    ports: set[str] = field(default_factory=set)  # ports whose objects it touched
    shared: bool = False  # it touched our tables, base chains or maps
    deleted_table: bool = False  # it deleted one of our tables

    @property
    def ours(self) -> bool:
        """Whether it touched anything of ours at all."""
        return bool(self.ports) or self.shared


class Transactions:
    """Feed raw notification datagrams in order; complete transactions come out.

    A rebuild or a flush of a thousand ports is some 45000 messages: the common ones (rules,
    chains of other tables) are decided from their first attributes without decoding the rest."""

    def __init__(self) -> None:
        self._open = Transaction()

    def feed(self, data: bytes) -> list[Transaction]:
        done = []
        offset, end = 0, len(data)
        while offset + _NLMSG.size <= end:
            length, kind = _HEAD.unpack_from(data, offset)
            if length < _NLMSG.size or offset + length > end:
                break
            if kind >> 8 == NFNL_SUBSYS_NFTABLES:
                if (kind & 0xFF) == NEWGEN:
                    self._generation(memoryview(data)[offset + _BODY:offset + length])
                    done.append(self._open)
                    self._open = Transaction()
                elif data[offset + _NLMSG.size] in OUR_FAMILIES:
                    self._message(kind & 0xFF, data, offset + _BODY, offset + length)
            offset += (length + 3) & ~3
        return done

    def _generation(self, body: memoryview) -> None:
        attrs = _attributes(body)
        self._open.generation = _u32(attrs.get(1))
        self._open.pid = _u32(attrs.get(2))
        self._open.process = _text(attrs.get(3))

    def _message(self, message: int, data: bytes, start: int, end: int) -> None:
        """One message of a bridge or inet table: accounted when the table is ours (its name
        is always the first attribute)."""
        length, kind = _NLATTR.unpack_from(data, start)
        if kind & _NLA_TYPE_MASK != 1 or data[start + 4:start + length] not in _TABLE_ATTRS:
            return
        txn = self._open
        if message in (NEWRULE, DELRULE):
            self._object(_string(data, start, end, 2))
        elif message in (NEWCHAIN, DELCHAIN):
            self._object(_string(data, start, end, 3))
        elif message in (NEWSET, DELSET):
            self._object(_string(data, start, end, 2))
        elif message in (NEWSETELEM, DELSETELEM):
            self._elements(_attributes(memoryview(data)[start:end]).get(3))
        elif message in (NEWTABLE, DELTABLE, DESTROYTABLE):
            txn.shared = True
            txn.deleted_table |= message != NEWTABLE
        else:  # objects, flowtables, anything newer: not ours to have
            txn.shared = True

    def _object(self, name: bytes | None) -> None:
        port = _port_of(name) if name is not None else None
        if port is None:
            self._open.shared = True  # base chains, maps, or names we never make
        else:
            self._open.ports.add(port)

    def _elements(self, elements: memoryview | None) -> None:
        """Each element's port: the chain it jumps to, else the interface name it holds."""
        for element in _list(elements):
            parts = _attributes(element)
            port = _verdict_port(parts.get(2)) or _ifname(parts.get(2)) or _ifname(parts.get(1))
            if port is None:
                self._open.shared = True
            else:
                self._open.ports.add(port)


_HEAD = struct.Struct("=IH")
_BODY = _NLMSG.size + _NFGENMSG_SIZE
_TABLE_ATTRS = frozenset(table.encode() + b"\0" for table in OUR_TABLES)


def _string(data: bytes, offset: int, end: int, wanted: int) -> bytes | None:
    """The string attribute ``wanted`` of a message's attributes from ``offset`` (without NUL)."""
    while offset + _NLATTR.size <= end:
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            return None
        if kind & _NLA_TYPE_MASK == wanted:
            return data[offset + _NLATTR.size:offset + length].split(b"\0", 1)[0]
        offset += (length + 3) & ~3
    return None


@lru_cache(maxsize=1 << 14)
def _port_of(name: bytes) -> str | None:
    found = parse_object(name.decode("utf-8", "replace"))
    return found.port if found is not None else None


def _attributes(data: memoryview) -> dict[int, memoryview]:
    """Netlink attributes by type."""
    return dict(_each(data))


def _list(data: memoryview | None) -> list[memoryview]:
    """The values of a nested attribute list (NFTA_LIST_ELEM, repeated)."""
    return [value for _, value in _each(data)] if data is not None else []


def _each(data: memoryview):
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            return
        yield kind & _NLA_TYPE_MASK, data[offset + _NLATTR.size:offset + length]
        offset += (length + 3) & ~3


def _u32(value: memoryview | None) -> int:
    return int.from_bytes(value[:4], "big") if value is not None and len(value) >= 4 else 0


def _text_bytes(value: memoryview | None) -> bytes:
    return bytes(value).split(b"\0", 1)[0] if value is not None else b""


def _text(value: memoryview | None) -> str:
    return _text_bytes(value).decode("utf-8", "replace")


def _verdict_port(data: memoryview | None) -> str | None:
    """The port of the chain a verdict element jumps to (NFTA_DATA_VERDICT/NFTA_VERDICT_CHAIN)."""
    verdict = _attributes(data).get(2) if data is not None else None
    chain = _attributes(verdict).get(2) if verdict is not None else None
    return _port_of(_text_bytes(chain)) if chain is not None else None


def _ifname(data: memoryview | None) -> str | None:
    """An interface name held as a value (NFTA_DATA_VALUE of IFNAMSIZ bytes)."""
    value = _attributes(data).get(1) if data is not None else None
    if value is None or len(value) != IFNAMSIZ:
        return None
    name = _text(value)
    return name if PORT_NAME_RE.match(name) else None


def generation_request(sequence: int = 1) -> bytes:
    """An ``NFT_MSG_GETGEN`` request: the kernel answers with the current generation."""
    body = bytes((0, 0, 0, 0))  # nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 0
    kind = (NFNL_SUBSYS_NFTABLES << 8) | GETGEN
    return _NLMSG.pack(_NLMSG.size + len(body), kind, 1, sequence, 0) + body  # NLM_F_REQUEST


def generation_answer(data: bytes) -> int | None:
    """The generation in the answer to :func:`generation_request` (None: an error)."""
    if len(data) < _NLMSG.size:
        return None
    length, kind, _, _, _ = _NLMSG.unpack_from(data, 0)
    if kind != (NFNL_SUBSYS_NFTABLES << 8) | NEWGEN:
        return None
    attrs = _attributes(memoryview(data)[_NLMSG.size + _NFGENMSG_SIZE:length])
    return _u32(attrs.get(1)) if 1 in attrs else None

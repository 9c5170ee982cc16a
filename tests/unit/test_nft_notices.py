"""nf_tables notifications → transactions touching our tables (the healer's input), from messages
built here the way the kernel lays them out (the kernel tests read the real ones)."""

from __future__ import annotations

import struct

from libvirt_nwfilter.backends.nftables import notices as n
from libvirt_nwfilter.backends.nftables.names import IDS_TABLE, LEGACY_TABLE, OUR_TABLES, shard_of

BRIDGE, INET, IP = 7, 1, 2
SHARD = shard_of("vnet0")


def attr(kind: int, value: bytes, nested: bool = False) -> bytes:
    body = struct.pack("=HH", 4 + len(value), kind | (0x8000 if nested else 0)) + value
    return body + b"\0" * (-len(body) % 4)


def text(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def message(kind: int, family: int, *attrs: bytes) -> bytes:
    body = bytes((family, 0, 0, 0)) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (n.NFNL_SUBSYS_NFTABLES << 8) | kind, 0, 0, 0) + body


def generation(number: int, pid: int, name: str) -> bytes:
    return message(n.NEWGEN, 0, attr(1, number.to_bytes(4, "big")), attr(2, pid.to_bytes(4, "big")), text(3, name))


def rule(chain: str, family: int = BRIDGE, table: str = SHARD, kind: int = n.NEWRULE) -> bytes:
    return message(kind, family, text(1, table), text(2, chain), attr(3, b"\0" * 8))


def chain(name: str, kind: int = n.NEWCHAIN, table: str = SHARD) -> bytes:
    return message(kind, BRIDGE, text(1, table), attr(2, b"\0" * 8), text(3, name))


def ifname(name: str) -> bytes:
    return name.encode().ljust(16, b"\0")


def element(key: bytes, data: bytes) -> bytes:
    return attr(1, attr(1, attr(1, key), nested=True) + attr(2, data, nested=True), nested=True)


def jump(target: str) -> bytes:
    return attr(2, attr(1, (0xFFFFFFFD).to_bytes(4, "big")) + text(2, target), nested=True)


def elements(set_name: str, *items: bytes, family: int = BRIDGE, kind: int = n.NEWSETELEM, table: str = SHARD) -> bytes:
    return message(kind, family, text(1, table), text(2, set_name), attr(3, b"".join(items), nested=True))


def test_a_port_change_names_its_port_and_its_process():
    data = (chain("I-3/vnet0") + rule("I-3/vnet0") + rule("l2-from-vm")
            + elements("l2_from_vm", element(ifname("vnet0"), jump("I-3/vnet0")))
            + generation(42, 1234, "nwfilter-nft"))
    [txn] = n.Transactions().feed(data)
    assert (txn.generation, txn.pid, txn.process) == (42, 1234, "nwfilter-nft")
    assert txn.ports == {"vnet0"} and txn.shared and not txn.deleted_table and txn.ours


def test_mark_keyed_elements_name_the_port_of_the_chain_they_jump_to_or_the_name_they_hold():
    data = (elements("fi", element((5 << 20).to_bytes(4, "big"), jump("FI-2/vnet_c3")), family=INET,
                     table=shard_of("vnet:3"))
            + elements("port_ids", element((5).to_bytes(4, "big"), attr(1, ifname("vnet7"))), family=INET,
                       kind=n.DELSETELEM, table=IDS_TABLE)
            + generation(7, 1, "nft"))
    [txn] = n.Transactions().feed(data)
    assert txn.ports == {"vnet:3", "vnet7"} and not txn.shared


def test_other_tables_and_families_only_end_a_transaction():
    data = (rule("I-3/vnet0", table="filter") + rule("I-3/vnet0", family=IP)
            + generation(9, 77, "nft"))
    [txn] = n.Transactions().feed(data)
    assert txn.generation == 9 and not txn.ours and not txn.ports


def test_a_deleted_table_and_names_we_never_make_are_shared():
    data = (message(n.DELTABLE, BRIDGE, text(1, SHARD)) + generation(10, 5, "nft")
            + chain("not-ours") + generation(11, 5, "nft"))
    first, second = n.Transactions().feed(data)
    assert first.deleted_table and first.shared and not first.ports
    assert second.shared and not second.deleted_table and not second.ports


def test_every_table_of_ours_is_accounted_and_only_those():
    """Each shard, the id registry and the former single table (deleted by a rebuild); not a
    table with a name like ours."""
    for table in sorted(OUR_TABLES):
        [txn] = n.Transactions().feed(rule("I-3/vnet0", table=table) + generation(12, 5, "nft"))
        assert txn.ours and txn.ports == {"vnet0"}, table
        [txn] = n.Transactions().feed(message(n.DELTABLE, INET, text(1, table)) + generation(13, 5, "nft"))
        assert txn.deleted_table, table
    assert LEGACY_TABLE in OUR_TABLES and IDS_TABLE in OUR_TABLES
    for table in ("libvirt_nwfilter_8", "libvirt_nwfilter_probe", "libvirt_nwfilter_", "xlibvirt_nwfilter_0"):
        [txn] = n.Transactions().feed(rule("I-3/vnet0", table=table) + generation(14, 5, "nft"))
        assert not txn.ours and not txn.ports, table


def test_a_transaction_spans_datagrams():
    grouping = n.Transactions()
    assert grouping.feed(rule("O-1/tap1", kind=n.DELRULE)) == []
    assert grouping.feed(rule("O-1/tap2")) == []
    [txn] = grouping.feed(generation(3, 9, "nft") + rule("O-1/tap3"))
    assert txn.ports == {"tap1", "tap2"}
    [later] = grouping.feed(generation(4, 9, "nft"))
    assert later.ports == {"tap3"}


def test_truncated_input_is_ignored_not_misread():
    data = rule("I-3/vnet0") + generation(5, 1, "nft")
    assert n.Transactions().feed(data[:-3]) == []


def test_generation_request_and_answer():
    request = n.generation_request(7)
    length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind & 0xFF, kind >> 8, flags, sequence) == (len(request), n.GETGEN, n.NFNL_SUBSYS_NFTABLES, 1, 7)
    assert n.generation_answer(generation(1234, 1, "nft")) == 1234
    assert n.generation_answer(rule("x")) is None

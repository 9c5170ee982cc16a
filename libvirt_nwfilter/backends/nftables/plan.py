"""Port changes → the text of ONE ``nft -f -`` batch (one kernel transaction) and new records.

Pure: nothing here runs a process or lists the ruleset, so the text of a change does not depend
on how many other ports exist.

Base chains (policy accept) and what dispatches, in every shard
===============================================================

================ ======= ===================== ============================================
chain            table   hook, priority         rules
================ ======= ===================== ============================================
``l2-from-vm``   bridge  prerouting, -300       ``iifname vmap @l2_from_vm``  (libvirt-I)
``l2-to-vm``     bridge  postrouting, 300       ``oifname vmap @l2_to_vm``    (libvirt-O)
*conntrack="bridge"* (needs nf_conntrack_bridge):
``l3-fwd-in``    bridge  forward, 0             ``iifname vmap @fi``
``l3-fwd-out``   bridge  forward, 1             ``oifname vmap @fo``
``l3-input``     bridge  input, 0               ``iifname vmap @hi``
*conntrack="inet"* (br_netfilter, bridge-nf-call-ip(6)tables=1):
``mark-out``     bridge  forward, -200          ``oifname vmap @mark_out``
``l3-fwd-in``    inet    forward, 0             ``meta mark & IN vmap @fi``
``l3-fwd-out``   inet    forward, 1             ``meta mark & OUT vmap @fo``
``l3-input``     inet    input, 0               ``meta mark & IN vmap @hi``
================ ======= ===================== ============================================

Every map element is a ``jump`` to a per-port chain, so ``return`` (and falling off the end) goes
back to the base chain: a port's L2 root chain falling off = the frame continues (accepted at this
hook); FI falling off or returning continues with the destination port's FO, at the next priority
of the same hook (libvirt's ``accept`` = RETURN in FI/HI; the two ports may sit in different
shards). ``accept`` inside any of our chains ends that base chain only; a shard's base chains
let through, untouched, every frame of the ports of other shards.
``port_ids`` registers each mark id with its port, so a batch that would give an id in use to
another port is refused by the kernel instead of silently sharing it.

A change, in one transaction: ensure the tables, maps and base chains of the shards of its ports
(``add`` is idempotent; each base chain is flushed and refilled with its dispatch rule; other
shards are not touched, so the kernel checks only these for loops), add the new chains and sets,
their rules, ``delete element`` the elements the old record lists, ``add element`` the new ones,
then flush and delete the old chains and sets. A refused batch changes nothing. A rebuild
deletes all our tables first and re-creates every port; one that keeps some ports' objects
(:func:`beside`) removes the others' from what the kernel holds instead.

A port whose new rules need exactly the chains and dispatch elements its record lists (a filter
changed, the same shape: what ``define`` of a filter in use mostly does) is refilled in place by
a change made with ``refill``: each of its chains is flushed and filled again in the same
transaction, with no new generation, no switch and no removal (40 % fewer lines for a
clean-traffic port). A rebuild never refills.

Whatever the record says, a change never leaves old rules of its port in front of the new ones,
without listing the kernel: every chain and set it creates is flushed right after its ``add``
(a same-named leftover contributes no old rule or address), and every dispatch slot of the port
that the change neither fills nor empties is probed (``add element … : accept`` then ``delete
element``): a leftover element there, or one the change adds, holding another verdict makes
``add element`` fail ("File exists", nft 1.0.6), so the batch is refused and the caller rebuilds,
which removes what no record names.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from ...errors import NwfilterError, UnsupportedError
from ...ir import Jump, L2Rule, PortRuleset
from ..base import Batch, PortChange, PortRecord
from . import render
from .names import (CONNTRACK_MODES, FAMILIES, IDS_TABLE, OUR_TABLES, PROBE_TABLE, RECORD_FORMAT, SHARD_TABLES,
                    MarkLayout, chain_name, check_port_name, check_record, hex_text, key_text, port_id, quote,
                    shard_of, table_of)

# Base-chain priorities (see the module docstring).
PRIO_L2_FROM_VM = -300  # like ebtables' nat PREROUTING (dstnat)
PRIO_L2_TO_VM = 300  # like ebtables' nat POSTROUTING (srcnat)
PRIO_MARK_OUT = -200  # before br_netfilter's forward hook (-1)
PRIO_L3 = 0  # like iptables' filter FORWARD / INPUT
PRIO_L3_OUT = 1  # every shard's FI before any shard's FO


@dataclass(frozen=True)
class Layout:
    """How this kernel is set up: the conntrack mode, L2 reject, and the mark layout."""

    conntrack: str = "inet"
    l2_reject: bool = False
    marks: MarkLayout = MarkLayout()

    def __post_init__(self) -> None:
        if self.conntrack not in CONNTRACK_MODES:
            raise ValueError(f"conntrack must be one of {CONNTRACK_MODES}, not {self.conntrack!r}")

    @property
    def inet(self) -> bool:
        return self.conntrack == "inet"


@dataclass
class _Objects:
    """What one port puts into the kernel for one generation."""

    chains: list[tuple[str, str]] = field(default_factory=list)  # (family, name)
    rules: list[tuple[str, str, str]] = field(default_factory=list)  # (family, chain, rule)
    sets: list[tuple[str, str, str]] = field(default_factory=list)  # (family, name, spec)
    elements: list[tuple[str, str, object, str]] = field(default_factory=list)  # (family, map, key, data)


def batch(layout: Layout, changes: Sequence[PortChange], *, ids_in_use: Iterable[int] | None = None,
          rebuild: bool = False, refill: bool = False) -> tuple[Batch, dict[str, PortRecord | None]]:
    """The batch for ``changes`` and the new records. ``ids_in_use`` (the mark ids of the ports
    not in ``changes``): given, even empty, a new port gets the lowest free id; None (unknown),
    the search starts at a position derived from the port name, so that ports created one by one
    rarely clash. A clash is refused by the kernel (``port_ids``), never shared. ``rebuild``: the
    batch deletes all our tables first (``old`` records only give generations and ids). ``refill``:
    a port whose new rules need exactly the chains its record lists is refilled in place (see the
    module docstring)."""
    seen: set[str] = set()
    for change in changes:
        check_port_name(change.port)
        if change.port in seen:
            raise NwfilterError(f"port {change.port} appears twice in one batch")
        seen.add(change.port)
        if change.old is not None:
            check_record(change.port, change.old)

    taken = {int(i) for i in ids_in_use or ()}
    taken |= {i for i in (port_id(c.old) for c in changes) if i is not None}
    out = Batch(f"# libvirt-nwfilter: nftables batch (conntrack={layout.conntrack})")
    if rebuild:
        out.add(_removal_lines())
    for shard in sorted({shard_of(change.port) for change in changes}):
        out.add(_ensure_lines(layout, shard))
    if layout.inet and changes:
        out.add([f"add table inet {IDS_TABLE}", f"add map inet {IDS_TABLE} port_ids {{ type mark : ifname; }}"])

    news: list[tuple[PortChange, _Objects]] = []
    refilled: set[str] = set()
    records: dict[str, PortRecord | None] = {}
    for change in changes:
        if change.new is None:
            records[change.port] = None
            continue
        old_id = port_id(change.old) if (change.old or {}).get("mode", "inet") == "inet" else None
        pid = None
        if layout.inet and (change.new.fi or change.new.fo or change.new.hi):
            pid = old_id if old_id is not None else _allocate(layout.marks, taken, change.port, ids_in_use is not None)
            taken.add(pid)
        gen = int((change.old or {}).get("gen", 0))
        objects = _port_objects(layout, change.port, gen, pid, change.new) if refill and gen > 0 else None
        if objects is not None and _fits(layout, change.old, objects):
            refilled.add(change.port)
        else:
            gen += 1
            objects = _port_objects(layout, change.port, gen, pid, change.new)
        news.append((change, objects))
        records[change.port] = {
            "backend": "nftables",
            "format": RECORD_FORMAT,
            "mode": layout.conntrack,
            "gen": gen,
            "id": pid,
            "chains": [[fam, name] for fam, name in objects.chains],
            "sets": [[fam, name] for fam, name, _ in objects.sets],
            "elements": [[fam, m, key] for fam, m, key, _ in objects.elements],
        }

    # 1. new chains and sets (flushed: a same-named leftover keeps nothing), then their rules
    # (jumps need their targets to exist)
    for change, objects in news:
        table = shard_of(change.port)
        if change.port in refilled:
            head = [f"# port {change.port}: generation {records[change.port]['gen']}, refilled in place",
                    *(f"flush chain {fam} {table} {name}" for fam, name in objects.chains)]
        else:
            head = [f"# port {change.port}: generation {records[change.port]['gen']}",
                    *_creation_lines(table, objects, flush=not rebuild)]
        out.add([*head, *(f"add rule {fam} {table} {chain} {rule}" for fam, chain, rule in objects.rules)],
                change.port)
    olds = [c for c in changes if c.old is not None and not rebuild and c.port not in refilled]
    # 2. switch the dispatch: old elements out, new elements in, the port's other slots empty
    if olds or news:
        out.add(["# switch"])
    for change in olds:
        out.add((f"delete element {fam} {table_of(change.port, m)} {m} {{ {key_text(key)} }}"
                 for fam, m, key in change.old.get("elements", ())), change.port)
    for change, objects in news:
        if change.port not in refilled:
            out.add((f"add element {fam} {table_of(change.port, m)} {m} {{ {key_text(key)} : {data} }}"
                     for fam, m, key, data in objects.elements), change.port)
    if not rebuild:
        filled = {change.port: objects.elements for change, objects in news}
        for change in changes:
            out.add((f"{verb} element {fam} {table_of(change.port, m)} {m} {{ {key_text(key)}{value} }}"
                     for fam, m, key in _unused_slots(layout, change, records[change.port], filled.get(change.port, ()))
                     for verb, value in (("add", " : accept"), ("delete", ""))), change.port)
    # 3. remove the old generation: every old chain is flushed before any is deleted
    if olds:
        out.add(["# remove old generations"])
    for change in olds:
        table = shard_of(change.port)
        out.add((f"flush chain {fam} {table} {name}" for fam, name in change.old.get("chains", ())), change.port)
    for change in olds:
        table = shard_of(change.port)
        out.add([*(f"delete chain {fam} {table} {name}" for fam, name in change.old.get("chains", ())),
                 *(f"delete set {fam} {table} {name}" for fam, name in change.old.get("sets", ()))], change.port)
    return out, records


def _fits(layout: Layout, old: PortRecord, objects: _Objects) -> bool:
    """Whether ``objects`` (made at the generation of the record ``old``) can replace what the
    record lists in place: the same chains, the same dispatch elements (which then lead where
    they did), in the same conntrack mode, and no sets on either side (a connlimit set's counts
    would be lost)."""
    return (old.get("mode", "inet") == layout.conntrack and not objects.sets and not old.get("sets")
            and len(old.get("chains", ())) == len(objects.chains)
            and {tuple(entry) for entry in old.get("chains", ())} == set(objects.chains)
            and len(old.get("elements", ())) == len(objects.elements)
            and {tuple(entry) for entry in old.get("elements", ())} == {(f, m, k) for f, m, k, _ in objects.elements})


def _creation_lines(table: str, objects: _Objects, flush: bool) -> list[str]:
    """``add`` every chain and set of ``objects`` to ``table``, each followed by its ``flush``
    (unless the tables were just deleted)."""
    lines = []
    for kind, family, name, spec in ([("chain", fam, name, "") for fam, name in objects.chains]
                                     + [("set", fam, name, f" {{ {spec} }}") for fam, name, spec in objects.sets]):
        lines.append(f"add {kind} {family} {table} {name}{spec}")
        if flush:
            lines.append(f"flush {kind} {family} {table} {name}")
    return lines


def _unused_slots(layout: Layout, change: PortChange, new: PortRecord | None,
                  added: Sequence[tuple[str, str, object, str]]) -> list[tuple[str, str, object]]:
    """The dispatch slots of ``change.port`` this change neither fills nor empties: the
    ``ifname``-keyed maps, and with a new mark id the maps keyed by it (``port_ids`` is always
    filled). A port removed keeps no mark slot to probe: an element left at its old id is only
    reached by a packet some port marks with that id, and a later port given the id fills the
    slot, which a leftover makes fail."""
    port = change.port
    slots = [("bridge", "l2_from_vm", port), ("bridge", "l2_to_vm", port)]
    if not layout.inet:
        slots += [("bridge", m, port) for m in ("fi", "fo", "hi")]
    else:
        slots.append(("bridge", "mark_out", port))
        pid = port_id(new)
        if pid is not None:
            marks = layout.marks
            slots += [("inet", "fi", pid << marks.in_shift), ("inet", "fo", pid << marks.out_shift),
                      ("inet", "hi", pid << marks.in_shift)]
    used = {(fam, m, key) for fam, m, key, _ in added}
    used |= {tuple(entry) for entry in (change.old or {}).get("elements", ()) if len(entry) == 3}
    return [slot for slot in slots if slot not in used]


def reusable(record: PortRecord | None, mode: str) -> dict | None:
    """What a rebuild keeps of a stored record: its generation and mark id, when the record is
    one of ours in this mode and those are sane (anything else: start afresh)."""
    if not isinstance(record, Mapping) or record.get("backend") != "nftables" or record.get("mode", "inet") != mode:
        return None
    try:
        gen = int(record.get("gen", 0))
        pid = record.get("id")
        pid = None if pid is None or isinstance(pid, bool) else int(pid)
    except (TypeError, ValueError):
        return None
    return {"backend": "nftables", "format": RECORD_FORMAT, "mode": mode, "gen": max(gen, 0), "id": pid}


def beside(record: dict | None, held: PortRecord | None, mode: str) -> dict:
    """The ``old`` of a port rebuilt beside kept ones: what the kernel holds of it (``held``, its
    inventory record: removed by the batch), the mark id of its stored ``record`` (a
    :func:`reusable` one) and a generation above both, so no new name meets an old one."""
    held = held or {}
    gen = max(int((record or {}).get("gen", 0)), int(held.get("gen", 0)))
    return {"backend": "nftables", "format": RECORD_FORMAT, "mode": mode, "gen": gen,
            "id": (record or {}).get("id"), "chains": list(held.get("chains", ())),
            "sets": list(held.get("sets", ())), "elements": list(held.get("elements", ()))}


def held_ids(held: Iterable[PortRecord], marks: MarkLayout) -> set[int]:
    """The mark ids the inventory records ``held`` occupy: ``port_ids`` keys, and the ids in the
    keys of the mark-keyed dispatch maps."""
    shifts = {"port_ids": 0, "fi": marks.in_shift, "hi": marks.in_shift, "fo": marks.out_shift}
    return {key >> shifts[m] for record in held for fam, m, key in record.get("elements", ())
            if fam == "inet" and m in shifts and isinstance(key, int) and not isinstance(key, bool)}


def _allocate(marks: MarkLayout, taken: set[int], port: str, know_others: bool) -> int:
    start = 0 if know_others else zlib.crc32(port.encode()) % marks.max_id
    for offset in range(marks.max_id):
        candidate = (start + offset) % marks.max_id + 1
        if candidate not in taken:
            return candidate
    raise UnsupportedError(f"no free port id: the nftables backend's inet mode supports at most "
                           f"{marks.max_id} ports with L3 rules")


def _ensure_lines(layout: Layout, table: str) -> list[str]:
    """A shard's tables, maps and base chains, each base chain refilled with its dispatch rule."""
    b = f"bridge {table}"
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
    if not layout.inet:
        return lines + [
            f"add map {b} fi {{ type ifname : verdict; }}",
            f"add map {b} fo {{ type ifname : verdict; }}",
            f"add map {b} hi {{ type ifname : verdict; }}",
            *_l3_base_lines(b, "iifname", "oifname"),
        ]
    i = f"inet {table}"
    in_mask, out_mask = hex_text(layout.marks.in_mask, 8), hex_text(layout.marks.out_mask, 8)
    return lines + [
        f"add map {b} mark_out {{ type ifname : verdict; }}",
        f"add chain {b} mark-out {{ type filter hook forward priority {PRIO_MARK_OUT}; policy accept; }}",
        f"flush chain {b} mark-out",
        f"add rule {b} mark-out oifname vmap @mark_out",
        f"add table {i}",
        f"add map {i} fi {{ type mark : verdict; }}",
        f"add map {i} fo {{ type mark : verdict; }}",
        f"add map {i} hi {{ type mark : verdict; }}",
        *_l3_base_lines(i, f"meta mark & {in_mask}", f"meta mark & {out_mask}"),
    ]


def _l3_base_lines(table: str, ingress_key: str, egress_key: str) -> list[str]:
    """A shard's L3 base chains in ``table`` ("FAMILY NAME"), each refilled with its dispatch
    rule; the maps' keys are the ingress port (``fi``, ``hi``) and the egress port (``fo``)."""
    lines = []
    for chain, hook, priority, key, map_name in (("l3-fwd-in", "forward", PRIO_L3, ingress_key, "fi"),
                                                 ("l3-fwd-out", "forward", PRIO_L3_OUT, egress_key, "fo"),
                                                 ("l3-input", "input", PRIO_L3, ingress_key, "hi")):
        lines += [f"add chain {table} {chain} {{ type filter hook {hook} priority {priority}; policy accept; }}",
                  f"flush chain {table} {chain}",
                  f"add rule {table} {chain} {key} vmap @{map_name}"]
    return lines


def _port_objects(layout: Layout, port: str, gen: int, pid: int | None, rs: PortRuleset) -> _Objects:
    objects = _Objects()
    marks = layout.marks
    l3_family = "inet" if layout.inet else "bridge"

    # L2, both sides; with a mark id, the from-VM root sets the ingress id first
    for kind, side, map_name, mark in (
        ("I", rs.from_vm, "l2_from_vm", pid is not None and bool(rs.fi or rs.hi)),
        ("O", rs.to_vm, "l2_to_vm", False),
    ):
        if side.empty and not mark:
            continue
        root = chain_name(kind, gen, port)
        objects.chains.append(("bridge", root))
        subs = {sub.name: chain_name(kind, gen, port, sub.name) for sub in side.subchains}
        objects.chains += [("bridge", name) for name in subs.values()]
        if mark:
            objects.rules.append(("bridge", root, render.mark_rule(marks.in_mask, pid << marks.in_shift)))
        _l2_rules(objects, root, side.root, subs)
        for sub in side.subchains:
            _l2_rules(objects, subs[sub.name], sub.rules, subs)
            objects.rules.append(("bridge", subs[sub.name], render.SUBCHAIN_END_VERDICT))
        objects.elements.append(("bridge", map_name, port, f"jump {root}"))

    # L3 copies
    reject = "reject" if (layout.inet or layout.l2_reject) else "drop"
    set_counter = [0]

    def new_set(family: int) -> str:
        set_counter[0] += 1
        name = chain_name("CL", gen, port, str(set_counter[0]))
        kind = "ipv4_addr" if family == 4 else "ipv6_addr"
        objects.sets.append((l3_family, name, f"type {kind}; size 65535; flags dynamic;"))
        return name

    for kind, rules, map_name, shift in (("FI", rs.fi, "fi", marks.in_shift), ("FO", rs.fo, "fo", marks.out_shift),
                                         ("HI", rs.hi, "hi", marks.in_shift)):
        if not rules:
            continue
        chain = chain_name(kind, gen, port)
        objects.chains.append((l3_family, chain))
        for rule in rules:
            text = render.l3_rule(rule, inet=layout.inet, reject=reject, new_set=new_set)
            if text is not None:
                objects.rules.append((l3_family, chain, text))
        objects.elements.append((l3_family, map_name, pid << shift if layout.inet else port, f"jump {chain}"))

    if layout.inet and pid is not None:
        if rs.fo:
            chain = chain_name("MO", gen, port)
            objects.chains.append(("bridge", chain))
            objects.rules.append(("bridge", chain, render.mark_rule(marks.out_mask, pid << marks.out_shift)))
            objects.elements.append(("bridge", "mark_out", port, f"jump {chain}"))
        objects.elements.append(("inet", "port_ids", pid, quote(port)))
    return objects


def _l2_rules(objects: _Objects, chain: str, entries, subs: Mapping[str, str]) -> None:
    for entry in entries:
        if isinstance(entry, Jump):
            if entry.chain not in subs:
                raise NwfilterError(f"jump to unknown sub-chain '{entry.chain}'")
            objects.rules.append(("bridge", chain, render.l2_jump(entry.conds, entry.chain, subs[entry.chain])))
            continue
        assert isinstance(entry, L2Rule)
        text = render.l2_rule(entry)
        if text is not None:
            objects.rules.append(("bridge", chain, text))


# ----------------------------------------------------------------------------------------------
# Whole tables: teardown and probes


def _removal_lines() -> list[str]:
    """Delete every table of ours, whether it exists or not (``add`` first makes it idempotent)."""
    return [f"{verb} table {family} {table}" for family in FAMILIES for table in sorted(OUR_TABLES)
            for verb in ("add", "delete")]


def remove_all_text() -> str:
    """Deletes all our tables (every shard, the id registry, the former single table)."""
    return "".join(line + "\n" for line in _removal_lines())


def cache_warming_text() -> str:
    """For ``nft -c -f -``: a shard's tables and dispatch with a rule and a map element, the kinds
    of command every change holds: the dry run fills libnftables' cache to the level such a change
    needs, whether the shard exists or not."""
    b = f"bridge {SHARD_TABLES[0]}"
    return "\n".join([
        f"add table {b}",
        f"add map {b} l2_from_vm {{ type ifname : verdict; }}",
        f"add chain {b} l2-from-vm {{ type filter hook prerouting priority {PRIO_L2_FROM_VM}; policy accept; }}",
        f"add rule {b} l2-from-vm accept",
        f"add element {b} l2_from_vm {{ \"-\" : accept }}",
    ]) + "\n"


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

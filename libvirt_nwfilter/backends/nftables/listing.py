"""What the kernel holds of ours, read from nft's JSON listing (pure; the survey steps are data).

The survey is ``nft -j list table FAMILY TABLE`` for each of our tables (every shard, the id
registry, the former single table; each fails harmlessly when the table is missing; nothing else
is listed). Their JSON (libnftables' schema: a list of ``{"chain": …}``, ``{"rule": …}``,
``{"set": …}``, ``{"map": …}`` objects) is read into one :class:`View` of our tables, normalised:

* ``handle`` goes everywhere, and counters lose their numbers (``{"counter": null}``);
* a base chain keeps its ``type``, ``hook``, ``prio``, ``policy``; a per-port chain nothing;
* a rule is its ``expr`` list (and ``comment``), in chain order;
* a set is its declaration without elements (a connlimit set's elements are the addresses it
  counts); a map is its declaration and its elements ``[key, value]``.

:func:`inventory` then names, per port, every object of ours the kernel holds — chains and sets
by their names (:func:`~.names.parse_object`), dispatch elements by their key (a port name, or
the port of the chain a mark-keyed element jumps to), ``port_ids`` elements by their value — as
a record a plan can remove (``PortChange(port, inventory[port], None)``) or leave alone. Names
no port of ours can have (only someone else writes them into our tables) name no port. An object
outside its port's table (only someone else, or an earlier version, puts it there) is listed with
the port all the same: the port's digest names that table (so ``verify`` names the port), and a
plan removing it is refused (the caller rebuilds, which deletes every table of ours).
"""

from __future__ import annotations

import contextlib
import gc
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ..base import PortRecord, Step, not_named
from .names import FAMILIES, IDS_TABLE, MAPS, OUR_TABLES, PORT_NAME_RE, RECORD_FORMAT, parse_object, table_of

_STRUCTURAL = frozenset({"family", "table", "name", "chain", "handle"})  # where, not what


def survey_steps(nft: str) -> tuple[Step, ...]:
    """Read-only: each of our tables as JSON (a missing table fails the step: "" output)."""
    return tuple(Step((nft, "-j", "list", "table", family, table), ignore_errors=True)
                 for family in FAMILIES for table in sorted(OUR_TABLES) if family == "inet" or table != IDS_TABLE)


@dataclass
class Chain:
    base: dict[str, Any] | None = None  # base chains: type, hook, prio, policy
    rules: list[dict[str, Any]] = field(default_factory=list)  # expr (and comment), in order


@dataclass(eq=False)
class Element:
    """One map element (compared by identity: one object per element listed)."""

    family: str
    table: str
    map: str
    key: Any
    value: Any


@dataclass
class Table:
    chains: dict[str, Chain] = field(default_factory=dict)
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # declaration
    maps: dict[str, dict[str, Any]] = field(default_factory=dict)  # declaration
    elements: list[Element] = field(default_factory=list)


View = dict  # (family, table name) → Table: our tables as listed


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while a listing is read and digested: the parsed JSON (some
    million objects at 1000 ports, no cycles) would be traversed again and again for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read(outputs: Sequence[str]) -> View:
    """Our tables in the survey outputs ("" for a failed step, or any ``nft -j list`` output:
    other tables are skipped)."""
    view: View = {}
    for item in _items(outputs):
        if len(item) != 1:
            continue
        (kind, body), = item.items()
        if not isinstance(body, dict) or body.get("table") not in OUR_TABLES or body.get("family") not in FAMILIES:
            continue
        table = view.setdefault((body["family"], body["table"]), Table())
        what = {k: v for k, v in body.items() if k not in _STRUCTURAL}
        if kind == "chain":
            table.chains.setdefault(body["name"], Chain()).base = what or None
        elif kind == "rule":
            if isinstance(what.get("expr"), list):
                what["expr"] = [_without_count(statement) for statement in what["expr"]]
            table.chains.setdefault(body["chain"], Chain()).rules.append(what)
        elif kind == "set":
            what.pop("elem", None)
            table.sets[body["name"]] = what
        elif kind == "map":
            elements = what.pop("elem", None) or ()
            table.maps[body["name"]] = what
            table.elements += [Element(body["family"], body["table"], body["name"], pair[0], pair[1])
                               for pair in elements if isinstance(pair, list) and len(pair) == 2]
    return view


def _items(outputs: Sequence[str]) -> Iterator[dict]:
    for text in outputs:
        try:
            items = json.loads(text)["nftables"] if text.strip() else []
        except (ValueError, KeyError, TypeError):
            items = []  # not a listing: nothing of ours is seen (drift, never an exception)
        yield from (item for item in items if isinstance(item, dict)) if isinstance(items, list) else ()


def _without_count(statement: Any) -> Any:
    """A rule's statement, a counter without its packet and byte numbers."""
    return {"counter": None} if isinstance(statement, dict) and "counter" in statement else statement


def jump_targets(value: Any) -> Iterator[str]:
    """The chain names ``jump``/``goto`` verdicts in ``value`` lead to."""
    if isinstance(value, list):
        for item in value:
            yield from jump_targets(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in ("jump", "goto") and isinstance(item, dict) and isinstance(item.get("target"), str):
                yield item["target"]
            else:
                yield from jump_targets(item)


def map_references(value: Any) -> Iterator[str]:
    """The names of the sets and maps ``value`` refers to (``"@name"``)."""
    if isinstance(value, str):
        if value.startswith("@"):
            yield value[1:]
    elif isinstance(value, (list, dict)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from map_references(item)


def element_owner(element: Element) -> str | None:
    """The port a map element serves: the port named by its key (``ifname`` maps) or its value
    (``port_ids``), else the port of the chain it jumps to (maps keyed by mark id)."""
    if element.map == "port_ids":
        return element.value if isinstance(element.value, str) else None
    if isinstance(element.key, str):
        return element.key
    for target in jump_targets(element.value):
        parsed = parse_object(target)
        if parsed is not None:
            return parsed.port
    return None


def inventory(view: View) -> dict[str, PortRecord]:
    """Per port, every object of ours the kernel holds, as a record (see the docstring)."""
    found: dict[str, dict[str, Any]] = {}

    def record(port: str) -> dict[str, Any]:
        return found.setdefault(port, {"backend": "nftables", "format": RECORD_FORMAT, "gen": 0, "id": None,
                                       "chains": [], "sets": [], "elements": []})

    for (family, _), table in view.items():
        for kind, names in (("chains", table.chains), ("sets", table.sets)):
            for name in names:
                parsed = parse_object(name)
                if parsed is not None:
                    entry = record(parsed.port)
                    entry[kind].append([family, name])
                    entry["gen"] = max(entry["gen"], parsed.gen)
        for element in table.elements:
            port = element_owner(element) if element.map in MAPS else None
            if port is not None and isinstance(element.key, (str, int)):
                entry = record(port)
                entry["elements"].append([family, element.map, element.key])
                if element.map == "port_ids":
                    entry["id"] = element.key
    return {port: entry for port, entry in found.items() if PORT_NAME_RE.match(port)}


def misplaced(view: View) -> list[str]:
    """Objects of ours outside the table of their port (see the docstring), as phrases."""
    found = []
    for (family, table_name), table in view.items():
        for kind, names in (("chain", table.chains), ("set", table.sets)):
            found += [f"{kind} {family} {table_name} {name}" for name in names
                      if (parsed := parse_object(name)) is not None and table_of(parsed.port) != table_name]
        for element in table.elements:
            port = element_owner(element) if element.map in MAPS else None
            if port is not None and table_of(port, element.map) != table_name:
                found.append(f"element {family} {table_name} {element.map} of port {port}")
    return found


def unrecorded(held: PortRecord, record: PortRecord | None) -> list[str]:
    """The objects of the inventory record ``held`` that the stored ``record`` does not name."""
    return not_named(((entry, _phrase(entry)) for entry in _named_objects(held)), _named_objects(record))


def _named_objects(record: PortRecord | None) -> list[tuple]:
    """(kind, family, name[, key]) of every chain, set and element a record lists (malformed
    entries skipped)."""
    found = []
    for kind, size in (("chain", 2), ("set", 2), ("element", 3)):
        for entry in (record or {}).get(kind + "s") or ():
            if isinstance(entry, (list, tuple)) and len(entry) == size \
                    and all(isinstance(part, (str, int)) for part in entry):
                found.append((kind, *entry))
    return found


def _phrase(entry: tuple) -> str:
    kind, family, name, *key = entry
    if not key:
        return f"{kind} {family} {name}"
    return f"{kind} {family} {name} " + (f'"{key[0]}"' if isinstance(key[0], str) else f"0x{key[0]:08x}")

"""Per-port digests of what a kernel holds, from the survey's :class:`~.listing.View` (pure).

Digests compare the live kernel with a reference kernel built from the records
(``rebuild_plan`` in a throw-away network namespace), never with what a change applied: plans
stay plain ``nft -f -`` (``nft -e`` would make every change load nft's whole cache, 22 → 142 ms
for a one-port change at 1000 ports). So a port's digest is independent of its generation (chain
and set names become roles in ``jump``/``goto`` targets and ``@set`` references), of the other
ports and of its mark id (the id, which each kernel may assign differently, becomes a role token
in the map keys and the mark rules; an id that differs between them does not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..base import PortRecord, canonical_digest, canonical_json
from .listing import Element, View, jump_targets, map_references
from .names import DISPATCH_MAPS, MarkLayout, parse_object, port_id, table_of

DIGEST_FORMAT = 3  # 3: from nft's JSON listing (2: from its text)
_MARK = {"meta": {"key": "mark"}}


@dataclass(frozen=True)
class IdForms:
    """How one port's mark id shows in a listing: map keys ``(map, value)`` and mark statements
    ``(keep mask, value)`` → the role tokens written instead."""

    keys: Mapping[tuple[str, int], str] = field(default_factory=dict)
    marks: Mapping[tuple[int, int], tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, record: PortRecord, marks: MarkLayout) -> "IdForms":
        """The forms of ``record``'s mark id (none when the record has no sane id)."""
        try:
            pid = port_id(record) if record.get("mode", "inet") == "inet" else None
        except (TypeError, ValueError):
            pid = None
        if pid is None or isinstance(record.get("id"), bool) or not 1 <= pid <= marks.max_id:
            return cls()
        ingress, egress = pid << marks.in_shift, pid << marks.out_shift
        keep_in, keep_out = 0xFFFFFFFF ^ marks.in_mask, 0xFFFFFFFF ^ marks.out_mask
        tokens_in, tokens_out = ("<keep:in>", "<id:in>"), ("<keep:out>", "<id:out>")
        return cls(
            keys={("fi", ingress): "<id:in>", ("hi", ingress): "<id:in>", ("fo", egress): "<id:out>",
                  ("port_ids", pid): "<id>"},
            # nft lists ``& KEEP | V`` as ``& (KEEP | V) | V``; both forms are the same statement
            marks={(keep_in, ingress): tokens_in, (keep_in | ingress, ingress): tokens_in,
                   (keep_out, egress): tokens_out, (keep_out | egress, egress): tokens_out},
        )

    def key(self, map_name: str, key: Any) -> Any:
        if isinstance(key, int) and not isinstance(key, bool):
            return self.keys.get((map_name, key), key)
        return key

    def mark(self, statement: Any) -> dict | None:
        """A ``meta mark set meta mark & KEEP | V`` statement body with this id's tokens."""
        if not self.marks or not isinstance(statement, dict) or statement.get("key") != _MARK:
            return None
        value = statement.get("value")
        try:
            (masked, number), = [value["|"]]
            (mark, keep), = [masked["&"]]
        except (TypeError, KeyError, ValueError):
            return None
        tokens = self.marks.get((keep, number)) if mark == _MARK else None
        return {"key": _MARK, "value": {"|": [{"&": [_MARK, tokens[0]]}, tokens[1]]}} if tokens else None


class Index:
    """A view indexed by port: objects, the elements leading to them, and dispatch."""

    def __init__(self, view: View):
        self.view = view
        self.objects: dict[str, list[tuple[tuple[str, str], str, str, str]]] = {}  # port → (table, kind, name, role)
        self.by_target: dict[str, list[Element]] = {}  # port → elements jumping to its chains
        self.by_key: dict[tuple[str, str, Any], list[Element]] = {}  # (family, map, key) → elements
        self.id_owner: dict[str, list[Element]] = {}  # port → its port_ids elements
        self.dispatch: dict[tuple[str, str, str], list[str]] = {}  # (family, table, map) → base chains using it
        for where, table in view.items():
            family = where[0]
            for kind, names in (("chain", table.chains), ("set", table.sets)):
                for name in names:
                    parsed = parse_object(name)
                    if parsed is not None:
                        self.objects.setdefault(parsed.port, []).append((where, kind, name, parsed.role))
            for element in table.elements:
                if isinstance(element.key, (str, int)):
                    self.by_key.setdefault((family, element.map, element.key), []).append(element)
                if element.map == "port_ids" and isinstance(element.value, str):
                    self.id_owner.setdefault(element.value, []).append(element)
                for target in jump_targets(element.value):
                    parsed = parse_object(target)
                    if parsed is not None:
                        self.by_target.setdefault(parsed.port, []).append(element)
            for chain_name, chain in table.chains.items():
                if chain.base is not None:
                    for name in map_references(chain.rules):
                        self.dispatch.setdefault((*where, name), []).append(chain_name)


def port_structure(index: Index, port: str, record: PortRecord, ids: IdForms) -> dict | None:
    """What the kernel has for ``port``, normalised (see :func:`port_digest`); None when nothing
    of it is found."""
    objects = index.objects.get(port, [])
    roles = {name: f"<{role}>" for _, _, name, role in objects}
    elements: dict[Element, None] = dict.fromkeys(index.by_target.get(port, ()))
    for family in {family for family, _ in index.view}:
        for map_name in DISPATCH_MAPS:
            elements.update(dict.fromkeys(index.by_key.get((family, map_name, port), ())))
    elements.update(dict.fromkeys(index.id_owner.get(port, ())))
    for family, map_name, key in _recorded_elements(record):
        elements.update(dict.fromkeys(index.by_key.get((family, map_name, key), ())))
    if not objects and not elements:
        return None

    chains, sets = [], []
    for (family, table_name), kind, name, role in objects:
        table = index.view[(family, table_name)]
        if kind == "chain":
            chain = table.chains[name]
            chains.append([family, role, chain.base, [_rule(rule, roles, ids) for rule in chain.rules]])
        else:
            sets.append([family, role, table.sets[name]])
    dispatch = {}
    for element in elements:
        for chain_name in index.dispatch.get((element.family, element.table, element.map), ()):
            chain = index.view[(element.family, element.table)].chains[chain_name]
            dispatch[(element.family, chain_name)] = [element.family, chain_name, chain.base, chain.rules]
    structure = {  # chains and sets by family and role, elements by family, map and key: unique
        "chains": sorted(chains, key=lambda c: c[:2]),
        "sets": sorted(sets, key=lambda s: s[:2]),
        "elements": sorted(([e.family, e.map, ids.key(e.map, e.key), _statement(e.value, roles, ids)]
                            for e in elements), key=lambda e: (e[0], e[1], canonical_json(e[2]))),
        "dispatch": [dispatch[k] for k in sorted(dispatch)],
    }
    astray = sorted({f"{family} {table}" for (family, table), *_ in objects if table != table_of(port)}
                    | {f"{e.family} {e.table}" for e in elements if e.table != table_of(port, e.map)})
    if astray:  # the tables holding something of it outside its own (never in a reference kernel)
        structure["astray"] = astray
    return structure


def _recorded_elements(record: PortRecord) -> list[tuple[str, str, Any]]:
    """The map keys a record names (malformed entries and keys skipped)."""
    keys = []
    for entry in record.get("elements", ()) or ():
        if isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[2], (str, int)) \
                and not isinstance(entry[2], bool):
            keys.append(tuple(entry))
    return keys


def _rule(rule: dict, roles: Mapping[str, str], ids: IdForms) -> dict:
    expr = rule.get("expr")
    if not isinstance(expr, list):
        return rule
    return {**rule, "expr": [_statement(statement, roles, ids) for statement in expr]}


def _statement(statement: Any, roles: Mapping[str, str], ids: IdForms) -> Any:
    """A rule's statement (or a map element's verdict) with the port's object names as roles
    (``jump``/``goto`` targets, the set a ``set`` statement updates) and its mark id as tokens
    (``meta mark set``)."""
    if not isinstance(statement, dict) or len(statement) != 1:
        return statement
    (kind, body), = statement.items()
    if kind in ("jump", "goto") and isinstance(body, dict) and body.get("target") in roles:
        return {kind: {**body, "target": roles[body["target"]]}}
    if kind == "set" and isinstance(body, dict) and str(body.get("set"))[1:] in roles:
        return {kind: {**body, "set": "@" + roles[body["set"][1:]]}}
    if kind == "mangle":
        return {kind: ids.mark(body) or body}
    return statement


def expects_nothing(record: PortRecord) -> bool:
    return not (record.get("chains") or record.get("sets") or record.get("elements"))


def port_digest(structure: dict | None) -> str:
    """sha256 (hex) of a port's normalised structure: its chains (role = kind and sub-chain name,
    generation-free; base-chain declaration; rules in order with this port's chain and set names
    replaced by roles, counters without numbers, no handles), its sets (declaration), the map
    elements that lead to it or carry its name or record keys (``l2_*``, ``fi``/``fo``/``hi``,
    ``mark_out``, ``port_ids``), and the base chains (declaration and every rule) that dispatch
    through those maps, and the tables of any of these found outside the port's own (its shard;
    ``port_ids``: the id registry). The record's mark id, in map keys and in mark statements, is replaced by
    role tokens (``<id>``, ``<id:in>``, ``<id:out>``), so the digest does not depend on which id
    a kernel's port has, only on its being the same everywhere."""
    return canonical_digest({"backend": "nftables", "format": DIGEST_FORMAT, "port": structure})

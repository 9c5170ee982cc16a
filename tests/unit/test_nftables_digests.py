"""nftables: kernel digests, the listing, the inventory and rebuild plans, on recorded surveys.

A port's digest must be the same in every kernel holding the same rules for it: the service
compares the live kernel with a reference kernel (a throw-away network namespace) into which
``rebuild_plan`` put the recorded rulesets. ``nft_survey.json`` beside this file holds the
survey outputs (nft 1.0.6) captured by running the plans below in throw-away network namespaces,
in the sharded layout: per scenario a list of 11 outputs, one per step of ``survey_steps()``
and in its order (``nft -j list table FAMILY TABLE`` for bridge then inet, each of our tables
sorted by name: the former single table ``names.LEGACY_TABLE``, the four shards, and for inet
the id registry ``names.IDS_TABLE``), null where the table does not exist. vp1's objects are in
shard ``libvirt_nwfilter_0``, vp2's in ``_2``, vp5's in ``_1``, every ``port_ids`` element in
the id registry; the former single table is absent:

* ``live_1``: after one change (vp1 ``ssh_to_a`` at generation 1, mark id 1; vp2 ``root_only``);
  ``live_2``: after vp1 was changed again (generation 2);
* ``reference_vp1``: ``rebuild_plan`` of vp1 alone (generation 5, mark id 7);
  ``reference_vp2``: vp2 (generation 3) beside a port the live kernel does not have (vp5, id 2).

The records are recomputed here: rendering is deterministic. Damage is simulated by editing the
listings the way the kernel would show it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import pytest

from golden.nftables import cases
from libvirt_nwfilter.backends.base import PortChange, Step
from libvirt_nwfilter.backends.nftables import NftablesBackend
from libvirt_nwfilter.backends.nftables import listing
from libvirt_nwfilter.backends.nftables import plan as planning
from libvirt_nwfilter.backends.nftables.backend import DEFAULT_NFT
from libvirt_nwfilter.backends.nftables.digest import port_digest
from libvirt_nwfilter.backends.nftables.listing import Element, element_owner, read
from libvirt_nwfilter.backends.nftables.names import IDS_TABLE, LEGACY_TABLE, parse_object, shard_of, table_of
from libvirt_nwfilter.errors import NwfilterError
from libvirt_nwfilter.ir import PortRuleset

SURVEYS = json.loads((Path(__file__).resolve().parent / "nft_survey.json").read_text())
NFT = NftablesBackend()
STEPS = [step.argv[-2:] for step in NFT.survey_steps()]  # (family, table) of each survey output
NO_TABLES = [""] * len(STEPS)  # the survey of a kernel without any table of ours


def survey(name: str, edit: Callable[[list], object] | None = None) -> list[str]:
    """The recorded survey outputs ``name`` (one per survey step), after ``edit`` of their items."""
    docs = copy.deepcopy(SURVEYS[name])
    if edit is not None:
        edit(docs)
    return [json.dumps(doc) if doc is not None else "" for doc in docs]


LIVE_1, LIVE_2 = survey("live_1"), survey("live_2")


def items(docs: list, kind: str, **where) -> list[dict]:
    """The bodies of the ``kind`` objects (chain, rule, map…) matching ``where`` (e.g. ``table=``)."""
    return [item[kind] for doc in docs if doc for item in doc["nftables"] if kind in item
            and all(item[kind].get(k) == v for k, v in where.items())]


def listing_of(docs: list, family: str, table: str) -> dict:
    """The output of ``nft -j list table FAMILY TABLE`` in ``docs`` (an empty table made up
    where the recorded kernel has none)."""
    at = STEPS.index((family, table))
    if docs[at] is None:
        docs[at] = {"nftables": [{"table": {"family": family, "name": table, "handle": 90}}]}
    return docs[at]


def elements(docs: list, map_name: str, table: str) -> list:
    """The ``elem`` list of map ``map_name`` of ``table`` (created: nft omits it when empty)."""
    (body,) = items(docs, "map", name=map_name, table=table)
    return body.setdefault("elem", [])


def drop_rule(chain: str, index: int, **where) -> Callable[[list], None]:
    def edit(docs: list) -> None:
        rule = items(docs, "rule", chain=chain, **where)[index]
        for doc in docs:
            if doc:
                doc["nftables"] = [item for item in doc["nftables"] if item.get("rule") is not rule]
    return edit


def drop_element(map_name: str, key, port: str) -> Callable[[list], None]:
    """Remove ``port``'s element ``key`` from ``map_name`` (in the table of the port's elements of it)."""
    def edit(docs: list) -> None:
        (body,) = items(docs, "map", name=map_name, table=table_of(port, map_name))
        assert any(pair[0] == key for pair in body["elem"])
        body["elem"] = [pair for pair in body["elem"] if pair[0] != key]
    return edit


def nft_records():
    """The records of the live kernel's two changes (rendering is deterministic)."""
    _, first = NFT.plan([PortChange("vp1", None, cases.ssh_to_a()), PortChange("vp2", None, cases.root_only())], [])
    # a new generation, as the recorded survey has it (a plan of the same shape refills in place)
    _, second = planning.batch(NFT.layout, [PortChange("vp1", first["vp1"], cases.ssh_to_a())], ids_in_use=[])
    return first, {**first, **second}


def nft_reference_records():
    """The records of the two reference kernels, as ``rebuild_plan`` gave them there."""
    _, ref1 = NFT.rebuild_plan([PortChange("vp1", {"backend": "nftables", "mode": "inet", "gen": 4},
                                           cases.ssh_to_a())], [], ids_in_use=range(1, 7))
    _, ref2 = NFT.rebuild_plan([PortChange("vp2", {"backend": "nftables", "mode": "inet", "gen": 2},
                                           cases.root_only()),
                                PortChange("vp5", None, cases.only_fo())], [], ids_in_use=[1])
    return ref1, ref2


def reference_digests() -> dict:
    ref1, ref2 = nft_reference_records()
    return {**NFT.kernel_digests(survey("reference_vp1"), ref1),
            "vp2": NFT.kernel_digests(survey("reference_vp2"), ref2)["vp2"]}


def test_plans_run_plain_nft_f_and_the_survey_lists_only_our_tables():
    # no -e: an echo would make nft load its whole cache (every port's rules) on every change
    plan, _ = NFT.plan([PortChange("vp1", None, cases.ssh_to_a())])
    assert plan.apply[0].argv == (DEFAULT_NFT, "-f", "-")
    rebuild, _ = NFT.rebuild_plan([PortChange("vp1", None, cases.ssh_to_a())], [])
    assert rebuild.apply[0].argv == (DEFAULT_NFT, "-f", "-")
    tables = ["libvirt_nwfilter", *(f"libvirt_nwfilter_{k}" for k in range(4)), "libvirt_nwfilter_ids"]
    assert NFT.survey_steps() == tuple(Step((DEFAULT_NFT, "-j", "list", "table", family, table), ignore_errors=True)
                                       for family in ("bridge", "inet") for table in tables
                                       if family == "inet" or table != "libvirt_nwfilter_ids")
    with pytest.raises(TypeError):
        NftablesBackend(echo=False)


def test_recorded_surveys_follow_the_survey_steps():
    """Each recorded output lists the table of its step, nothing else; the former single table
    is absent, each port's objects are in its shard, the mark ids in the id registry."""
    assert set(SURVEYS) == {"live_1", "live_2", "reference_vp1", "reference_vp2"}
    present = {}
    for name, docs in SURVEYS.items():
        assert len(docs) == len(STEPS) == 11, name
        for (family, table), doc in zip(STEPS, docs):
            if doc is not None:
                bodies = [body for item in doc["nftables"] for kind, body in item.items() if kind != "metainfo"]
                where = {(b["family"], b["table"] if "table" in b else b["name"]) for b in bodies}
                assert where == {(family, table)}, name
        present[name] = {step for step, doc in zip(STEPS, docs) if doc is not None}
    s1, s2, s5 = shard_of("vp1"), shard_of("vp2"), shard_of("vp5")
    assert len({s1, s2, s5}) == 3
    ports = {("bridge", s1), ("inet", s1), ("bridge", s2), ("inet", s2), ("inet", IDS_TABLE)}
    assert present["live_1"] == present["live_2"] == ports
    assert present["reference_vp1"] == {("bridge", s1), ("inet", s1), ("inet", IDS_TABLE)}
    assert present["reference_vp2"] == {("bridge", s2), ("inet", s2), ("bridge", s5), ("inet", s5), ("inet", IDS_TABLE)}
    assert not any(table == LEGACY_TABLE for steps in present.values() for _, table in steps)


def test_listing_read():
    view = read(LIVE_1)
    s1, s2 = shard_of("vp1"), shard_of("vp2")
    assert set(view) == {("bridge", s1), ("bridge", s2), ("inet", s1), ("inet", s2), ("inet", IDS_TABLE)}
    # each element carries the family and table it is listed in
    assert all((e.family, e.table) == where for where, table in view.items() for e in table.elements)
    assert [(e.key, e.value) for e in view[("bridge", s1)].elements if e.map == "l2_from_vm"] == [
        ("vp1", {"jump": {"target": "I-1/vp1"}})]
    assert [(e.key, e.value) for e in view[("bridge", s2)].elements if e.map == "l2_from_vm"] == [
        ("vp2", {"jump": {"target": "I-1/vp2"}})]
    for shard in (s1, s2):  # every shard has its own base chains
        bridge = view[("bridge", shard)]
        assert bridge.chains["l2-from-vm"].base == {"type": "filter", "hook": "prerouting", "prio": -300,
                                                    "policy": "accept"}
        assert bridge.chains["l2-from-vm"].rules == [
            {"expr": [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@l2_from_vm"}}]}]
        inet = view[("inet", shard)].chains
        assert [(inet[name].base["prio"], inet[name].rules[0]["expr"][0]["vmap"]["data"])
                for name in ("l3-fwd-in", "l3-fwd-out", "l3-input")] == [(0, "@fi"), (1, "@fo"), (0, "@hi")]
        assert "l3-fwd" not in inet
    assert view[("bridge", s2)].chains["I-1/vp2"].base is None
    assert view[("bridge", s2)].chains["I-1/vp2"].rules[2]["expr"][1] == {"counter": None}  # numbers dropped
    ids = view[("inet", IDS_TABLE)]
    assert [(e.map, e.key, e.value) for e in ids.elements] == [("port_ids", 1, "vp1")]
    assert list(ids.maps) == ["port_ids"] and not ids.chains and not ids.sets
    assert not any(e.map == "port_ids" for where, table in view.items() if where[1] != IDS_TABLE
                   for e in table.elements)
    second = read(LIVE_2)
    assert "I-2/vp1" in second[("bridge", s1)].chains
    assert not any("I-1/vp1" in table.chains for table in second.values())
    assert read(["", "not json", '{"nftables": 3}']) == {}
    # each table of ours is read on its own (the former single table too), with the table of
    # each element; others are not read
    sharded = read([json.dumps({"nftables": [
        {"chain": {"family": "bridge", "table": s1, "name": "I-1/vp1", "handle": 1}},
        {"map": {"family": "bridge", "table": s1, "name": "l2_from_vm", "type": "ifname", "map": "verdict",
                 "handle": 2, "elem": [["vp1", {"jump": {"target": "I-1/vp1"}}]]}},
        {"map": {"family": "inet", "table": IDS_TABLE, "name": "port_ids", "type": "mark", "map": "ifname",
                 "handle": 1, "elem": [[1, "vp1"]]}},
        {"chain": {"family": "bridge", "table": LEGACY_TABLE, "name": "O-1/vp2", "handle": 1}},
        {"chain": {"family": "inet", "table": "libvirt_nwfilter_probe", "name": "I-1/vp1", "handle": 1}}]})])
    assert set(sharded) == {("bridge", s1), ("inet", IDS_TABLE), ("bridge", LEGACY_TABLE)}
    assert list(sharded[("bridge", s1)].chains) == ["I-1/vp1"]
    assert list(sharded[("bridge", LEGACY_TABLE)].chains) == ["O-1/vp2"]
    assert [(e.family, e.table, e.map, e.key, e.value) for e in sharded[("inet", IDS_TABLE)].elements] == [
        ("inet", IDS_TABLE, "port_ids", 1, "vp1")]
    assert sharded[("bridge", s1)].elements[0].table == s1


def test_inventory_and_kernel_ports():
    first, both = nft_records()
    assert NFT.kernel_ports(LIVE_1) == {"vp1", "vp2"}
    assert NFT.kernel_ports(NO_TABLES) == set()
    held = NFT.inventory(LIVE_1)
    # the kernel's own account of each port: what its record lists (order aside), id and generation
    for port in ("vp1", "vp2"):
        for key in ("chains", "sets", "elements"):
            assert sorted(held[port][key]) == sorted(first[port][key]), (port, key)
        assert (held[port]["gen"], held[port]["id"]) == (first[port]["gen"], first[port]["id"])
    assert NFT.inventory(LIVE_2)["vp1"]["gen"] == 2
    # a record from the inventory removes exactly what the kernel holds of the port
    plan, _ = NFT.plan([PortChange("vp1", held["vp1"], None)], [])
    removal = plan.apply[0].stdin
    for family, name in first["vp1"]["chains"]:
        assert f"delete chain {family} {shard_of('vp1')} {name}\n" in removal
    for family, map_name, key in first["vp1"]["elements"]:
        assert f"delete element {family} {table_of('vp1', map_name)} {map_name} {{ " in removal
    assert f"delete element inet {IDS_TABLE} port_ids {{ 0x00000001 }}\n" in removal and "vp2" not in removal
    # an element pointing at a port's chain belongs to the port its key names (a mark key: the
    # chain's); here in the table of the chain it jumps to, as the kernel requires
    wrong = survey("live_1", lambda docs: elements(docs, "l2_to_vm", shard_of("vp2")).append(
        ["vp7", {"jump": {"target": "O-1/vp2"}}]))
    assert NFT.kernel_ports(wrong) == {"vp1", "vp2", "vp7"}
    orphan = survey("live_1", lambda docs: elements(docs, "port_ids", IDS_TABLE).append([9, "vp9"]))
    assert NFT.inventory(orphan)["vp9"] == {"backend": "nftables", "format": 1, "gen": 0, "id": 9, "chains": [],
                                              "sets": [], "elements": [["inet", "port_ids", 9]]}


def test_same_port_same_digest_in_a_reference_kernel():
    first, both = nft_records()
    live = NFT.kernel_digests(LIVE_1, first)
    assert set(live) == {"vp1", "vp2"} and None not in live.values() and live["vp1"] != live["vp2"]
    ref1, ref2 = nft_reference_records()
    # another generation, another mark id, the other ports absent or different
    assert (ref1["vp1"]["gen"], ref1["vp1"]["id"]) == (5, 7) and (first["vp1"]["gen"], first["vp1"]["id"]) == (1, 1)
    assert ref2["vp2"]["gen"] == 3 and ref2["vp5"]["id"] == 2
    assert reference_digests() == live
    # generation 2 of vp1 in the live kernel: the same digests
    assert both["vp1"]["gen"] == 2
    assert NFT.kernel_digests(LIVE_2, both) == live
    # the outputs may come in any order, or as one listing of all the tables
    merged = {"nftables": [item for doc in SURVEYS["live_2"] if doc for item in doc["nftables"]]}
    assert NFT.kernel_digests(LIVE_2[::-1], both) == NFT.kernel_digests([json.dumps(merged)], both) == live
    # the id the kernel has must be the record's: vp1 of the live kernel with the reference's record
    assert NFT.kernel_digests(LIVE_1, ref1)["vp1"] not in (None, live["vp1"])


def _renamed(docs: list, old: str, new: str) -> None:
    """Every object name ``old`` (chains, jump targets) becomes ``new``."""
    for doc in docs:
        if doc:
            text = json.dumps(doc).replace(f'"{old}"', f'"{new}"')
            doc.clear()
            doc.update(json.loads(text))


def _foreign(docs: list) -> None:
    """A foreign table in the listing (``nft -j list ruleset``) mentioning our names, and tables
    of another family named like ours."""
    listing_of(docs, "bridge", shard_of("vp1"))["nftables"] += [
        {"table": {"family": "inet", "name": "foreign", "handle": 9}},
        {"chain": {"family": "inet", "table": "foreign", "name": "I-1/vp1", "handle": 1}},
        {"rule": {"family": "inet", "table": "foreign", "chain": "I-1/vp1", "handle": 2, "comment": "I-1/vp1",
                  "expr": [{"accept": None}]}},
        *({kind: body} for table in (LEGACY_TABLE, shard_of("vp1"), IDS_TABLE) for kind, body in (
            ("chain", {"family": "ip", "table": table, "name": "I-1/vp1", "handle": 1}),
            ("rule", {"family": "ip", "table": table, "chain": "I-1/vp1", "handle": 2, "expr": [{"drop": None}]}),
            ("map", {"family": "ip", "table": table, "name": "port_ids", "type": "mark", "map": "ifname",
                     "handle": 3, "elem": [[1, "vp2"]]})))]


def _counted(docs: list) -> None:
    for body in items(docs, "rule"):
        for expr in body["expr"]:
            if "counter" in expr:
                expr["counter"] = {"packets": 12, "bytes": 3456}


def _rehandled(docs: list) -> None:
    for doc in docs:
        for item in doc["nftables"] if doc else ():
            (body,) = item.values()
            if isinstance(body, dict) and "handle" in body:
                body["handle"] += 77


def _keep_mask_unmerged(docs: list) -> None:
    """The mark statement as rendered (``& KEEP | V``; nft lists ``& (KEEP | V) | V``)."""
    (rule,) = [r for r in items(docs, "rule", chain="I-1/vp1") if "mangle" in r["expr"][0]]
    rule["expr"][0]["mangle"]["value"]["|"][0]["&"][1] = 0x000FFFFF


def test_normalisation():
    first, _ = nft_records()
    intact = NFT.kernel_digests(LIVE_1, first)
    for edit in (_counted, _rehandled, _foreign, _keep_mask_unmerged):
        assert NFT.kernel_digests(survey("live_1", edit), first) == intact, edit.__name__
    pretty = [json.dumps(json.loads(text), indent=2) if text else text for text in LIVE_1]
    assert pretty != LIVE_1 and NFT.kernel_digests(pretty, first) == intact
    # generation numbers do not matter, the port's chain names are roles
    regen = survey("live_1", lambda docs: [_renamed(docs, name, name.replace("-1/", "-41/"))
                                           for _, name in first["vp1"]["chains"] + first["vp2"]["chains"]])
    assert regen != LIVE_1 and NFT.kernel_digests(regen, first) == intact


# vp1's mark id 1 in every form the listing shows it, each turned into the same form for id 2:
# the ingress and egress mark statements, the fi / hi / fo keys (vp1's shard), the port_ids key
# (the id registry)
def _mark_statement(chain: str, keep: int, value: int) -> Callable[[list], None]:
    def edit(docs: list) -> None:
        (rule,) = [r for r in items(docs, "rule", chain=chain) if "mangle" in r["expr"][0]]
        bits = rule["expr"][0]["mangle"]["value"]["|"]
        assert (bits[0]["&"][1], bits[1]) == (keep | value, value)
        bits[0]["&"][1], bits[1] = keep | (value << 1), value << 1
    return edit


def _element_key(map_name: str, key: int) -> Callable[[list], None]:
    def edit(docs: list) -> None:
        (pair,) = [p for p in elements(docs, map_name, table_of("vp1", map_name)) if p[0] == key]
        pair[0] = key << 1
    return edit


_ID_FORMS = (_mark_statement("I-1/vp1", 0x000FFFFF, 0x00100000), _mark_statement("MO-1/vp1", 0xFFF000FF, 0x100),
             _element_key("fi", 0x00100000), _element_key("hi", 0x00100000), _element_key("fo", 0x100),
             _element_key("port_ids", 1))


def _renumber(which=range(len(_ID_FORMS))) -> list[str]:
    return survey("live_1", lambda docs: [_ID_FORMS[i](docs) for i in which])


def test_mark_id_is_a_role_but_must_be_consistent():
    first, _ = nft_records()
    intact = NFT.kernel_digests(LIVE_1, first)
    # the kernel gave vp1 id 2 everywhere: equal for a record saying 2, drift for one saying 1
    _, as_two = NFT.plan([PortChange("vp1", None, cases.ssh_to_a())], ids_in_use=[1])
    assert as_two["vp1"]["id"] == 2
    assert NFT.kernel_digests(_renumber(), as_two)["vp1"] == intact["vp1"]
    assert NFT.kernel_digests(_renumber(), first)["vp1"] != intact["vp1"]
    # any single form with another id is drift, also with the record that names it
    for i in range(len(_ID_FORMS)):
        one = _renumber((i,))
        assert NFT.kernel_digests(one, first)["vp1"] != intact["vp1"], i
        assert NFT.kernel_digests(one, as_two)["vp1"] != intact["vp1"], i
        assert NFT.kernel_digests(one, first)["vp2"] == intact["vp2"]


def _insert_accept(chain: str) -> Callable[[list], None]:
    def edit(docs: list) -> None:
        first_rule = items(docs, "rule", chain=chain)[0]
        doc = next(d for d in docs if d and any(item.get("rule") is first_rule for item in d["nftables"]))
        at = next(i for i, item in enumerate(doc["nftables"]) if item.get("rule") is first_rule)
        doc["nftables"].insert(at, {"rule": {**first_rule, "handle": 99, "expr": [{"accept": None}]}})
    return edit


def _set_field(kind: str, where: dict, path: tuple, value) -> Callable[[list], None]:
    def edit(docs: list) -> None:
        node = items(docs, kind, **where)[0]
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
    return edit


def _add_chain(docs: list) -> None:
    table = shard_of("vp2")
    listing_of(docs, "bridge", table)["nftables"].append(
        {"chain": {"family": "bridge", "table": table, "name": "O-3/vp2", "handle": 98}})


def _without(family: str) -> list[str]:
    """live_1 with every table of ``family`` gone."""
    return [text if step[0] != family else "" for step, text in zip(STEPS, LIVE_1)]


NFT_DAMAGE = {
    # name: (edit of the live_1 listing, or the outputs for it; ports that differ; ports that are None)
    "rule deleted": (drop_rule("I-1/vp2", 3), {"vp2"}, set()),
    "sub-chain rule deleted": (drop_rule("I-1/vp1/mac", 1), {"vp1"}, set()),
    "rule added": (_insert_accept("FO-1/vp1"), {"vp1"}, set()),
    "rule changed": (_set_field("rule", {"chain": "O-1/vp2"}, ("expr", 0, "match", "right"), "52:54:00:00:00:02"),
                     {"vp2"}, set()),
    "to-VM element deleted": (drop_element("l2_to_vm", "vp2", "vp2"), {"vp2"}, set()),
    "mark id element deleted": (drop_element("port_ids", 1, "vp1"), {"vp1"}, set()),
    "mark id element of another id": (_ID_FORMS[5], {"vp1"}, set()),
    "ingress mark of another id": (_ID_FORMS[0], {"vp1"}, set()),
    "egress mark of another id": (_ID_FORMS[1], {"vp1"}, set()),
    "L3 key of another id": (_ID_FORMS[4], {"vp1"}, set()),
    "every id form renumbered": (lambda docs: [form(docs) for form in _ID_FORMS], {"vp1"}, set()),  # record: id 1
    "L3 element points elsewhere": (_set_field("map", {"name": "fo", "table": shard_of("vp1")},
                                               ("elem", 0, 1, "jump", "target"), "FI-1/vp1"), {"vp1"}, set()),
    "base chain rule deleted": (drop_rule("l2-to-vm", 0, table=shard_of("vp2")), {"vp2"}, set()),
    # a shard's base chains dispatch its ports only
    "base chain rule of one shard deleted": (drop_rule("l2-from-vm", 0, table=shard_of("vp1")), {"vp1"}, set()),
    "base chain rule without elements deleted": (drop_rule("l2-to-vm", 0, table=shard_of("vp1")), set(), set()),
    "egress L3 base chain rule deleted": (drop_rule("l3-fwd-out", 0, table=shard_of("vp1")), {"vp1"}, set()),
    "base chain policy changed": (_set_field("chain", {"name": "l3-input", "table": shard_of("vp1")}, ("policy",),
                                             "drop"), {"vp1"}, set()),
    "leftover chain of an old generation": (_add_chain, {"vp2"}, set()),
    "everything gone": (NO_TABLES, {"vp1", "vp2"}, {"vp1", "vp2"}),
    "bridge tables gone": (_without("bridge"), {"vp1", "vp2"}, {"vp2"}),  # vp1 still has its L3 chains
    "survey failed": ([], {"vp1", "vp2"}, {"vp1", "vp2"}),
}


@pytest.mark.parametrize("damage", list(NFT_DAMAGE))
def test_damage(damage):
    """Each damage of the live kernel makes exactly the expected ports differ from the
    reference kernels."""
    edit, expect_changed, expect_none = NFT_DAMAGE[damage]
    first, _ = nft_records()
    reference = reference_digests()
    assert NFT.kernel_digests(LIVE_1, first) == reference
    damaged = edit if isinstance(edit, list) else survey("live_1", edit)
    assert damaged != LIVE_1
    after = NFT.kernel_digests(damaged, first)
    assert {p for p in reference if after[p] != reference[p]} == expect_changed
    assert {p for p, d in after.items() if d is None} == expect_none


def test_empty_rulesets_and_none_records():
    first, _ = nft_records()
    records = {**first, "vp7": NFT.plan([PortChange("vp7", None, PortRuleset())])[1]["vp7"], "vp8": None}
    kernel = NFT.kernel_digests(LIVE_1, records)
    assert "vp8" not in kernel and kernel["vp7"] == port_digest(None)
    # an empty ruleset digests alike in every kernel, also one without our tables
    assert NFT.kernel_digests(NO_TABLES, {"vp7": records["vp7"]}) == {"vp7": kernel["vp7"]}
    # a port whose record expects rules and of which nothing is found: None
    vp3 = NFT.plan([PortChange("vp3", None, cases.ssh_to_a())], ids_in_use=[1])[1]["vp3"]
    assert NFT.kernel_digests(LIVE_1, {"vp3": vp3}) == {"vp3": None}
    # a record naming vp1's map keys makes vp1's elements part of vp3's digest (a clash is drift)
    assert NFT.kernel_digests(LIVE_1, {"vp3": first["vp1"]})["vp3"] is not None
    # a malformed id in a record is no id (nothing becomes a role token), never an exception
    for bad in ("x", True, 0, 99999, None):
        assert NFT.kernel_digests(LIVE_1, {"vp1": {**first["vp1"], "id": bad}})["vp1"] != kernel["vp1"]


def test_rebuild_plan():
    first, both = nft_records()
    foreign = {"backend": "ebiptables", "ebtables": {"chains": ["nwf-I-vp3"], "rules": []}}
    changes = [PortChange("vp1", both["vp1"], cases.ssh_to_a()),
               PortChange("vp2", {**both["vp2"]}, cases.ssh_to_a()),
               PortChange("vp3", foreign, cases.only_fo()),
               PortChange("vp4", {**both["vp1"], "id": 1}, cases.only_fo())]  # a corrupt state: id 1 twice
    plan, records = NFT.rebuild_plan(changes, LIVE_2, ids_in_use=[2])
    text = plan.apply[0].stdin
    deletes = [line for line in text.splitlines() if line.startswith("delete table ")]
    assert len(deletes) == 12 and f"delete table inet {LEGACY_TABLE}" in deletes  # both families, every table
    assert {line.split()[-1] for line in deletes} == {LEGACY_TABLE, IDS_TABLE,
                                                      *(f"{LEGACY_TABLE}_{k}" for k in range(4))}
    first_shard = min(shard_of(port) for port in ("vp1", "vp2", "vp3", "vp4"))
    assert text.index(deletes[-1]) < text.index(f"add table bridge {first_shard}\nadd map")
    assert "delete element" not in text and "delete chain" not in text and "nwf-I-vp3" not in text
    assert records["vp1"]["id"] == 1 and records["vp1"]["gen"] == 3
    assert records["vp2"]["id"] == 3  # the lowest id free of ids_in_use and of the kept ones
    assert records["vp3"]["gen"] == 1 and records["vp3"]["id"] == 4 and records["vp4"]["id"] == 5
    # malformed records never make a rebuild fail: only their generation and id are kept
    broken = {**both["vp1"], "elements": [["bridge", "nope", "x"]], "chains": [["ip", "bad name"]]}
    plan2, records2 = NFT.rebuild_plan([PortChange("vp1", broken, cases.ssh_to_a()),
                                        PortChange("vp2", {"backend": "nftables", "gen": "x"}, cases.root_only())],
                                       [])
    assert records2["vp1"]["gen"] == 3 and records2["vp1"]["id"] == 1 and records2["vp2"]["gen"] == 1
    # the survey is not needed: the same plan without it
    assert NFT.rebuild_plan(changes, [], ids_in_use=[2]) == (plan, records)


def test_rebuild_plan_keeping_a_port():
    """A port kept (its record cannot be read): nothing of it is in the batch, its mark id is
    given to no other port, and every other object of ours the survey shows is removed."""
    first, both = nft_records()
    assert shard_of("vp9") == shard_of("vp2")  # the orphan's element jumps to a chain of its own table
    orphan = survey("live_2", lambda docs: (
        elements(docs, "port_ids", IDS_TABLE).append([9, "vp9"]),
        elements(docs, "l2_to_vm", shard_of("vp9")).append(["vp9", {"jump": {"target": "O-1/vp2"}}])))
    assert listing.misplaced(read(orphan)) == []
    changes = [PortChange("vp2", both["vp2"], cases.ssh_to_a()), PortChange("vp3", None, cases.only_fo())]
    plan, records = NFT.rebuild_plan(changes, orphan, [], keep=["vp1"])
    text = plan.apply[0].stdin
    assert "vp1" not in text and "delete table" not in text
    assert set(records) == {"vp2", "vp3", "vp9"} and records["vp9"] is None
    assert 1 not in (records["vp2"]["id"], records["vp3"]["id"])  # vp1's id stays vp1's
    # vp2's objects the kernel holds are removed; the new generation is above them
    for family, name in NFT.inventory(LIVE_2)["vp2"]["chains"]:
        assert f"delete chain {family} {shard_of('vp2')} {name}\n" in text
    assert records["vp2"]["gen"] == both["vp2"]["gen"] + 1
    # the orphan's elements go, whatever their value
    assert f'delete element bridge {shard_of("vp9")} l2_to_vm {{ "vp9" }}\n' in text
    assert f"delete element inet {IDS_TABLE} port_ids {{ 0x00000009 }}\n" in text
    # the kept port's objects survive in what the batch leaves: the inventory minus the deletions
    deleted = {line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("delete ")}
    kept_chains = NFT.inventory(orphan)["vp1"]["chains"]
    assert len(kept_chains) == len(both["vp1"]["chains"]) > 0
    for family, name in kept_chains:
        assert not any(d.startswith(f"{family} ") and d.endswith(f" {name}") for d in deleted)
    # without a survey nothing can be kept: nothing of vp1 is known, nothing of it is touched
    plan, _ = NFT.rebuild_plan(changes, NO_TABLES, [], keep=["vp1"])
    assert "vp1" not in plan.apply[0].stdin and "delete table" not in plan.apply[0].stdin


def _moved(port: str, table: str) -> Callable[[list], None]:
    """Every chain of ``port`` (with its rules) and each of its map elements put in ``table`` of
    the same family (map declarations copied there as needed), as an earlier version's single
    table or someone else's change would hold them."""
    def edit(docs: list) -> None:
        moving = []
        for doc in docs:
            for item in list(doc["nftables"] if doc else ()):
                (kind, body), = item.items()
                if kind in ("chain", "rule") and body["table"] != table:
                    parsed = parse_object(body["name" if kind == "chain" else "chain"])
                    if parsed is not None and parsed.port == port:
                        doc["nftables"].remove(item)
                        moving.append({kind: {**body, "table": table}})
                elif kind == "map" and body["table"] != table:
                    pairs = [pair for pair in body.get("elem", ()) if element_owner(
                        Element(body["family"], body["table"], body["name"], pair[0], pair[1])) == port]
                    if pairs:
                        body["elem"] = [pair for pair in body["elem"] if pair not in pairs]
                        moving.append({"map": {**body, "table": table, "elem": pairs}})
        assert moving
        for item in moving:
            (kind, body), = item.items()
            target = listing_of(docs, body["family"], table)["nftables"]
            if kind == "map" and items([{"nftables": target}], "map", name=body["name"]):
                elements([{"nftables": target}], body["name"], table).extend(body["elem"])
            else:
                target.append(item)
    return edit


def test_misplaced_objects_refuse_a_rebuild_keeping_ports():
    """Objects of ours outside their port's table (the former single table, another shard) are
    named; a rebuild that keeps ports (which removes objects, never tables) is refused with the
    repair, a full rebuild (which deletes every table) is not; digests still see the objects."""
    first, both = nft_records()
    intact = NFT.kernel_digests(LIVE_1, first)
    assert listing.misplaced(read(LIVE_1)) == listing.misplaced(read(LIVE_2)) == []
    legacy = survey("live_1", _moved("vp1", LEGACY_TABLE))  # vp1 left behind in the single table
    other_shard = survey("live_1", _moved("vp2", shard_of("vp1")))  # vp2 in vp1's shard
    expected = {
        "legacy": {*(f"chain {family} {LEGACY_TABLE} {name}" for family, name in first["vp1"]["chains"]),
                   *(f"element {family} {LEGACY_TABLE} {map_name} of port vp1"
                     for family, map_name, _ in first["vp1"]["elements"])},
        "other_shard": {*(f"chain {family} {shard_of('vp1')} {name}" for family, name in first["vp2"]["chains"]),
                        *(f"element {family} {shard_of('vp1')} {map_name} of port vp2"
                          for family, map_name, _ in first["vp2"]["elements"])},
    }
    changes = [PortChange("vp2", both["vp2"], cases.root_only()), PortChange("vp3", None, cases.only_fo())]
    for name, outputs in (("legacy", legacy), ("other_shard", other_shard)):
        # (a) each such object is named (with its table), once; nothing else
        astray = listing.misplaced(read(outputs))
        assert len(astray) == len(set(astray)) and set(astray) == expected[name], name
        # the inventory lists them with their port all the same
        held = NFT.inventory(outputs)
        for port in ("vp1", "vp2"):
            for key in ("chains", "sets", "elements"):
                assert sorted(held[port][key]) == sorted(first[port][key]), (name, port, key)
        # (b) a rebuild keeping a port is refused: its batch could not remove them by table
        for kept in (["vp1"], ["vp1", "vp4"]):
            with pytest.raises(NwfilterError) as refused:
                NFT.rebuild_plan(changes, outputs, [], keep=kept)
            message = str(refused.value)
            assert f"binding-delete --force {' '.join(kept)}'" in message, (name, message)
            assert f"{len(expected[name])} object(s)" in message and astray[0] in message, (name, message)
        # (c) a rebuild without kept ports deletes every table: fine, the survey is not needed
        plan, records = NFT.rebuild_plan([PortChange("vp1", both["vp1"], cases.ssh_to_a()), *changes], outputs, [])
        text = plan.apply[0].stdin
        for family in ("bridge", "inet"):
            for table in (LEGACY_TABLE, shard_of("vp1"), shard_of("vp2")):
                assert f"delete table {family} {table}\n" in text
        assert (plan, records) == NFT.rebuild_plan([PortChange("vp1", both["vp1"], cases.ssh_to_a()), *changes],
                                                   LIVE_1, [])
    # the digests still see such objects (a port's digest names the tables holding something of
    # it outside its own): verify names the port, also where its rules work the same there
    after = NFT.kernel_digests(legacy, first)
    assert after["vp1"] not in (None, intact["vp1"]) and after["vp2"] == intact["vp2"]
    after = NFT.kernel_digests(other_shard, first)
    assert after["vp2"] not in (None, intact["vp2"]) and after["vp1"] == intact["vp1"]


def test_unrecorded_objects_are_named():
    first, both = nft_records()
    held = NFT.inventory(LIVE_1)
    assert NFT.unrecorded(held["vp1"], first["vp1"]) == [] and NFT.unrecorded(held["vp2"], first["vp2"]) == []
    # no record: everything it holds; a record of another generation: the chains it does not list
    assert NFT.unrecorded(held["vp1"], None)[:1] == ["chain bridge I-1/vp1"]
    assert "element inet port_ids 0x00000001" in NFT.unrecorded(held["vp1"], None)
    stale = NFT.unrecorded(held["vp1"], both["vp1"])
    assert "chain bridge I-1/vp1" in stale and not any("element" in phrase for phrase in stale)
    # an element keyed by vp1 that its record does not list (in vp1's shard, jumping to a chain there)
    orphan = survey("live_1", lambda docs: elements(docs, "l2_to_vm", shard_of("vp1")).append(
        ["vp1", {"jump": {"target": "I-1/vp1"}}]))
    assert NFT.unrecorded(NFT.inventory(orphan)["vp1"], first["vp1"]) == ['element bridge l2_to_vm "vp1"']
    # a malformed record names nothing, never an exception
    assert NFT.unrecorded(held["vp2"], {"chains": [["bridge"], 3, None], "elements": "x"}) == \
        NFT.unrecorded(held["vp2"], None)

"""nftables: kernel digests, the listing, the inventory and rebuild plans, on recorded surveys.

A port's digest must be the same in every kernel holding the same rules for it: the service
compares the live kernel with a reference kernel (a throw-away network namespace) into which
``rebuild_plan`` put the recorded rulesets. ``nft_survey.json`` beside this file holds the
survey outputs (``nft -j list table bridge|inet libvirt_nwfilter``, nft 1.0.6) captured from
throw-away network namespaces:

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
from libvirt_nwfilter.backends.nftables.backend import DEFAULT_NFT
from libvirt_nwfilter.backends.nftables.digest import port_digest
from libvirt_nwfilter.backends.nftables.listing import read
from libvirt_nwfilter.ir import PortRuleset

SURVEYS = json.loads((Path(__file__).resolve().parent / "nft_survey.json").read_text())
NFT = NftablesBackend()


def survey(name: str, edit: Callable[[list], object] | None = None) -> list[str]:
    """The recorded survey outputs ``name`` (bridge, inet), after ``edit`` of their items."""
    docs = copy.deepcopy(SURVEYS[name])
    if edit is not None:
        edit(docs)
    return [json.dumps(doc) if doc is not None else "" for doc in docs]


LIVE_1, LIVE_2 = survey("live_1"), survey("live_2")


def items(docs: list, kind: str, **where) -> list[dict]:
    """The bodies of the ``kind`` objects (chain, rule, map…) matching ``where``."""
    return [item[kind] for doc in docs if doc for item in doc["nftables"] if kind in item
            and all(item[kind].get(k) == v for k, v in where.items())]


def drop_rule(chain: str, index: int) -> Callable[[list], None]:
    def edit(docs: list) -> None:
        rule = items(docs, "rule", chain=chain)[index]
        for doc in docs:
            doc["nftables"] = [item for item in doc["nftables"] if item.get("rule") is not rule]
    return edit


def drop_element(map_name: str, key) -> Callable[[list], None]:
    def edit(docs: list) -> None:
        (body,) = items(docs, "map", name=map_name)
        body["elem"] = [pair for pair in body["elem"] if pair[0] != key]
    return edit


def nft_records():
    """The records of the live kernel's two changes (rendering is deterministic)."""
    _, first = NFT.plan([PortChange("vp1", None, cases.ssh_to_a()), PortChange("vp2", None, cases.root_only())], [])
    _, second = NFT.plan([PortChange("vp1", first["vp1"], cases.ssh_to_a())], [])
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
    assert NFT.survey_steps() == tuple(Step((DEFAULT_NFT, "-j", "list", "table", family, "libvirt_nwfilter"),
                                            ignore_errors=True) for family in ("bridge", "inet"))
    with pytest.raises(TypeError):
        NftablesBackend(echo=False)


def test_listing_read():
    view = read(LIVE_1)
    assert set(view) == {"bridge", "inet"}
    bridge, inet = view["bridge"], view["inet"]
    assert [(e.key, e.value) for e in bridge.elements if e.map == "l2_from_vm"] == [
        ("vp1", {"jump": {"target": "I-1/vp1"}}), ("vp2", {"jump": {"target": "I-1/vp2"}})]
    assert bridge.chains["l2-from-vm"].base == {"type": "filter", "hook": "prerouting", "prio": -300,
                                                "policy": "accept"}
    assert bridge.chains["I-1/vp2"].base is None
    assert bridge.chains["l2-from-vm"].rules == [
        {"expr": [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@l2_from_vm"}}]}]
    assert bridge.chains["I-1/vp2"].rules[2]["expr"][1] == {"counter": None}  # numbers dropped
    assert [(e.key, e.value) for e in inet.elements if e.map == "port_ids"] == [(1, "vp1")]
    second = read(LIVE_2)
    assert "I-2/vp1" in second["bridge"].chains and "I-1/vp1" not in second["bridge"].chains
    assert read(["", "not json", '{"nftables": 3}']) == {}


def test_inventory_and_kernel_ports():
    first, both = nft_records()
    assert NFT.kernel_ports(LIVE_1) == {"vp1", "vp2"}
    assert NFT.kernel_ports(["", ""]) == set()
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
        assert f"delete chain {family} libvirt_nwfilter {name}\n" in removal
    assert "delete element inet libvirt_nwfilter port_ids { 0x00000001 }\n" in removal and "vp2" not in removal
    # an element pointing at a port's chain belongs to the port its key names (a mark key: the chain's)
    wrong = survey("live_1", lambda docs: items(docs, "map", name="l2_to_vm")[0]["elem"].append(
        ["vp7", {"jump": {"target": "O-1/vp2"}}]))
    assert NFT.kernel_ports(wrong) == {"vp1", "vp2", "vp7"}
    orphan = survey("live_1", lambda docs: items(docs, "map", name="port_ids")[0]["elem"].append([9, "vp9"]))
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
    # the outputs may come in any order, or as one listing of both tables
    merged = {"nftables": SURVEYS["live_2"][0]["nftables"] + SURVEYS["live_2"][1]["nftables"]}
    assert NFT.kernel_digests(LIVE_2[::-1], both) == NFT.kernel_digests([json.dumps(merged)], both) == live
    # the id the kernel has must be the record's: vp1 of the live kernel with the reference's record
    assert NFT.kernel_digests(LIVE_1, ref1)["vp1"] not in (None, live["vp1"])


def _renamed(docs: list, old: str, new: str) -> None:
    """Every object name ``old`` (chains, jump targets) becomes ``new``."""
    for doc in docs:
        text = json.dumps(doc).replace(f'"{old}"', f'"{new}"')
        doc.clear()
        doc.update(json.loads(text))


def _foreign(docs: list) -> None:
    """A foreign table in the listing (``nft -j list ruleset``) mentioning our names."""
    docs[0]["nftables"] += [
        {"table": {"family": "inet", "name": "foreign", "handle": 9}},
        {"chain": {"family": "inet", "table": "foreign", "name": "I-1/vp1", "handle": 1}},
        {"rule": {"family": "inet", "table": "foreign", "chain": "I-1/vp1", "handle": 2, "comment": "I-1/vp1",
                  "expr": [{"accept": None}]}},
        {"chain": {"family": "ip", "table": "libvirt_nwfilter", "name": "I-1/vp1", "handle": 1}},
        {"rule": {"family": "ip", "table": "libvirt_nwfilter", "chain": "I-1/vp1", "handle": 2,
                  "expr": [{"drop": None}]}}]


def _counted(docs: list) -> None:
    for body in items(docs, "rule"):
        for expr in body["expr"]:
            if "counter" in expr:
                expr["counter"] = {"packets": 12, "bytes": 3456}


def _rehandled(docs: list) -> None:
    for doc in docs:
        for item in doc["nftables"]:
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
    pretty = [json.dumps(json.loads(text), indent=2) for text in LIVE_1]
    assert NFT.kernel_digests(pretty, first) == intact
    # generation numbers do not matter, the port's chain names are roles
    regen = survey("live_1", lambda docs: [_renamed(docs, name, name.replace("-1/", "-41/"))
                                           for _, name in first["vp1"]["chains"] + first["vp2"]["chains"]])
    assert NFT.kernel_digests(regen, first) == intact


# vp1's mark id 1 in every form the listing shows it, each turned into the same form for id 2:
# the ingress and egress mark statements, the fi / hi / fo keys, the port_ids key
def _mark_statement(chain: str, keep: int, value: int) -> Callable[[list], None]:
    def edit(docs: list) -> None:
        (rule,) = [r for r in items(docs, "rule", chain=chain) if "mangle" in r["expr"][0]]
        bits = rule["expr"][0]["mangle"]["value"]["|"]
        assert (bits[0]["&"][1], bits[1]) == (keep | value, value)
        bits[0]["&"][1], bits[1] = keep | (value << 1), value << 1
    return edit


def _element_key(map_name: str, key: int) -> Callable[[list], None]:
    def edit(docs: list) -> None:
        (pair,) = [p for p in items(docs, "map", name=map_name)[0]["elem"] if p[0] == key]
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
        doc = next(d for d in docs if any(item.get("rule") is first_rule for item in d["nftables"]))
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
    docs[0]["nftables"].append({"chain": {"family": "bridge", "table": "libvirt_nwfilter", "name": "O-3/vp2",
                                          "handle": 98}})


NFT_DAMAGE = {
    # name: (edit of the live_1 listing, or the outputs for it; ports that differ; ports that are None)
    "rule deleted": (drop_rule("I-1/vp2", 3), {"vp2"}, set()),
    "sub-chain rule deleted": (drop_rule("I-1/vp1/mac", 1), {"vp1"}, set()),
    "rule added": (_insert_accept("FO-1/vp1"), {"vp1"}, set()),
    "rule changed": (_set_field("rule", {"chain": "O-1/vp2"}, ("expr", 0, "match", "right"), "52:54:00:00:00:02"),
                     {"vp2"}, set()),
    "to-VM element deleted": (drop_element("l2_to_vm", "vp2"), {"vp2"}, set()),
    "mark id element deleted": (drop_element("port_ids", 1), {"vp1"}, set()),
    "mark id element of another id": (_ID_FORMS[5], {"vp1"}, set()),
    "ingress mark of another id": (_ID_FORMS[0], {"vp1"}, set()),
    "egress mark of another id": (_ID_FORMS[1], {"vp1"}, set()),
    "L3 key of another id": (_ID_FORMS[4], {"vp1"}, set()),
    "every id form renumbered": (lambda docs: [form(docs) for form in _ID_FORMS], {"vp1"}, set()),  # record: id 1
    "L3 element points elsewhere": (_set_field("map", {"name": "fo"}, ("elem", 0, 1, "jump", "target"), "FI-1/vp1"),
                                    {"vp1"}, set()),
    "base chain rule deleted": (drop_rule("l2-to-vm", 0), {"vp2"}, set()),
    "base chain policy changed": (_set_field("chain", {"name": "l3-input"}, ("policy",), "drop"), {"vp1"}, set()),
    "leftover chain of an old generation": (_add_chain, {"vp2"}, set()),
    "everything gone": (["", ""], {"vp1", "vp2"}, {"vp1", "vp2"}),
    "bridge table gone": (["", LIVE_1[1]], {"vp1", "vp2"}, {"vp2"}),  # vp1 still has its L3 chains
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
    assert NFT.kernel_digests(["", ""], {"vp7": records["vp7"]}) == {"vp7": kernel["vp7"]}
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
    assert text.index("delete table inet libvirt_nwfilter") < text.index("add table bridge libvirt_nwfilter\nadd map")
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
    orphan = survey("live_2", lambda docs: (
        items(docs, "map", name="port_ids")[0]["elem"].append([9, "vp9"]),
        items(docs, "map", name="l2_to_vm")[0]["elem"].append(["vp9", {"jump": {"target": "O-1/vp2"}}])))
    changes = [PortChange("vp2", both["vp2"], cases.ssh_to_a()), PortChange("vp3", None, cases.only_fo())]
    plan, records = NFT.rebuild_plan(changes, orphan, [], keep=["vp1"])
    text = plan.apply[0].stdin
    assert "vp1" not in text and "delete table" not in text
    assert set(records) == {"vp2", "vp3", "vp9"} and records["vp9"] is None
    assert 1 not in (records["vp2"]["id"], records["vp3"]["id"])  # vp1's id stays vp1's
    # vp2's objects the kernel holds are removed; the new generation is above them
    for family, name in NFT.inventory(LIVE_2)["vp2"]["chains"]:
        assert f"delete chain {family} libvirt_nwfilter {name}\n" in text
    assert records["vp2"]["gen"] == both["vp2"]["gen"] + 1
    # the orphan's elements go, whatever their value
    assert 'delete element bridge libvirt_nwfilter l2_to_vm { "vp9" }\n' in text
    assert "delete element inet libvirt_nwfilter port_ids { 0x00000009 }\n" in text
    # the kept port's objects survive in what the batch leaves: the inventory minus the deletions
    deleted = {line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("delete ")}
    for family, name in NFT.inventory(orphan)["vp1"]["chains"]:
        assert f"{family} libvirt_nwfilter {name}" not in deleted
    # without a survey nothing can be kept: nothing of vp1 is known, nothing of it is touched
    plan, _ = NFT.rebuild_plan(changes, ["", ""], [], keep=["vp1"])
    assert "vp1" not in plan.apply[0].stdin and "delete table" not in plan.apply[0].stdin


def test_unrecorded_objects_are_named():
    first, both = nft_records()
    held = NFT.inventory(LIVE_1)
    assert NFT.unrecorded(held["vp1"], first["vp1"]) == [] and NFT.unrecorded(held["vp2"], first["vp2"]) == []
    # no record: everything it holds; a record of another generation: the chains it does not list
    assert NFT.unrecorded(held["vp1"], None)[:1] == ["chain bridge I-1/vp1"]
    assert "element inet port_ids 0x00000001" in NFT.unrecorded(held["vp1"], None)
    stale = NFT.unrecorded(held["vp1"], both["vp1"])
    assert "chain bridge I-1/vp1" in stale and not any("element" in phrase for phrase in stale)
    orphan = survey("live_1", lambda docs: items(docs, "map", name="l2_to_vm")[0]["elem"].append(
        ["vp1", {"jump": {"target": "O-1/vp2"}}]))
    assert NFT.unrecorded(NFT.inventory(orphan)["vp1"], first["vp1"]) == ['element bridge l2_to_vm "vp1"']
    # a malformed record names nothing, never an exception
    assert NFT.unrecorded(held["vp2"], {"chains": [["bridge"], 3, None], "elements": "x"}) == \
        NFT.unrecorded(held["vp2"], None)

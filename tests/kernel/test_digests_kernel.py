"""Kernel digests of both backends against real kernels, in throw-away namespaces.

The service finds drift by comparing each port's digest in the live kernel with its digest in a
reference kernel (a fresh network namespace) into which ``rebuild_plan`` put the recorded
rulesets. So, for each backend: three ports applied in the lab's host namespace ("live") have
the digests each of them has alone in a fresh namespace ("reference": the other ports absent,
another generation, in the nft inet mode another mark id), and the digests of all of them
rebuilt together from their records (the service's way); re-applying the same rulesets (new
generation / temporary chains and rename) keeps the digests; each kind of damage (a rule deleted,
a dispatch entry deleted, a rule added, a mark id changed, a base chain or global hook lost,
everything flushed) makes exactly the damaged ports differ from their reference (None when
nothing of a port is left); ``rebuild_plan`` from a survey then restores every port to its
reference digest.

Every command runs inside a lab namespace (``ip netns exec``); the ``lab`` fixture deletes the
host namespace and the ``fresh_ns`` fixture the reference namespaces afterwards, also when a
test fails. The root namespace's firewall is never touched.
"""

from __future__ import annotations

import re
from typing import Callable

import pytest

import netlab
from golden.ebiptables import cases as eb_cases
from golden.nftables import cases as nft_cases
from libvirt_nwfilter import executor
from libvirt_nwfilter.backends.base import PortChange
from libvirt_nwfilter.backends.ebiptables import EbiptablesBackend
from libvirt_nwfilter.backends.ebiptables.digest import port_digest as eb_empty_digest
from libvirt_nwfilter.backends.ebiptables.names import GLOBAL_CHAINS, is_temp_chain
from libvirt_nwfilter.backends.ebiptables.tools import TOOLS
from libvirt_nwfilter.backends.nftables import NftablesBackend, probe_bridge_conntrack_text
from libvirt_nwfilter.backends.nftables.digest import port_digest as nft_empty_digest
from libvirt_nwfilter.backends.nftables.names import IDS_TABLE, chain_name, parse_object, shard_of
from libvirt_nwfilter.backends.nftables.plan import remove_all_text

T1, T2, T3 = shard_of("vp1"), shard_of("vp2"), shard_of("vp3")


# ---------------------------------------------------------------------------------------------
# Helpers: everything runs in lab namespaces


def survey(ns: str, backend) -> list[str]:
    """The survey as the service runs it: executor.survey, "" for a failed step."""
    return executor.survey(backend.survey_steps(), ns)


class Ports:
    """The bindings of a test in the live namespace: port → ruleset, and their records."""

    def __init__(self, ns: str, backend, rulesets: dict, fresh_ns: Callable[[], str] | None = None,
                 prepare: Callable[[str], None] | None = None):
        self.ns, self.backend, self.rulesets = ns, backend, rulesets
        self.fresh_ns = fresh_ns
        self.prepare = prepare or (lambda ns: None)  # e.g. ipsets the rules name (per namespace)
        self.records: dict = {}
        self.reference_records: dict = {}

    def apply(self, ports=None) -> None:
        """Plan and run (re)applying ``ports`` (all by default)."""
        ports = list(self.rulesets) if ports is None else ports
        changes = [PortChange(p, self.records.get(p), self.rulesets[p]) for p in ports]
        plan, records = self.backend.plan(changes)
        executor.execute(plan, self.ns)
        self.records.update(records)

    def rebuild(self) -> None:
        changes = [PortChange(p, self.records.get(p), rs) for p, rs in self.rulesets.items()]
        plan, records = self.backend.rebuild_plan(changes, survey(self.ns, self.backend))
        executor.execute(plan, self.ns)
        self.records = dict(records)

    def kernel(self) -> dict[str, str | None]:
        return self.backend.kernel_digests(survey(self.ns, self.backend), self.records)

    def reference(self, together: bool = False) -> dict[str, str | None]:
        """The digests of the ports built by ``rebuild_plan`` in fresh namespaces: each port
        alone, new (generation 1) and with ids the live ports do not use; or (``together``) all
        of them in one namespace from their live records, as the service builds its reference."""
        assert self.fresh_ns is not None
        live_ids = [r["id"] for r in self.records.values() if r and r.get("id") is not None]
        if together:
            groups = [[PortChange(p, self.records.get(p), rs) for p, rs in self.rulesets.items()]]
        else:
            groups = [[PortChange(p, None, rs)] for p, rs in self.rulesets.items()]
        out: dict[str, str | None] = {}
        for changes in groups:
            ns = self.fresh_ns()
            self.prepare(ns)
            ids = [] if together else live_ids
            plan, records = self.backend.rebuild_plan(changes, survey(ns, self.backend), ids)
            executor.execute(plan, ns)
            live = {p: r for p, r in records.items() if r is not None}
            self.reference_records.update(live)
            out.update(self.backend.kernel_digests(survey(ns, self.backend), live))
        return out

    def check_damage(self, do: Callable[["Ports"], object], expect_changed: set, expect_none: set) -> None:
        """``do`` damages the applied ports: exactly the expected ports then differ from their
        references (None: nothing of them left); a rebuild restores them, also when repeated on
        an intact kernel."""
        self.apply()
        reference = self.reference()
        assert self.kernel() == reference
        do(self)
        after = self.kernel()
        assert changed(reference, after) == expect_changed
        assert {p for p, d in after.items() if d is None} == expect_none
        for _ in range(2):
            self.rebuild()
            assert self.kernel() == reference

    def sh(self, *argv: str, input: str | None = None) -> str:
        return netlab.run_in(self.ns, list(argv), input=input).stdout


def changed(before: dict, after: dict) -> set[str]:
    return {p for p in before if before[p] != after[p]}


# ---------------------------------------------------------------------------------------------
# nftables


def nft_handle(ports: Ports, family: str, chain: str, rule_text: str) -> str:
    listing = ports.sh("nft", "-a", "list", "chain", family, shard_of(parse_object(chain).port), chain)
    for line in listing.splitlines():
        text, _, handle = line.strip().rpartition(" # handle ")
        if text == rule_text:
            return handle
    raise AssertionError(f"rule {rule_text!r} not in {chain}:\n{listing}")


def chain_of(ports: Ports, port: str, kind: str, sub: str | None = None) -> str:
    gen = ports.records[port]["gen"]
    return chain_name(kind, gen, port, sub)


def listed_mark_rule(ports: Ports, port: str, pid: int | None = None) -> str:
    """The ingress mark rule of ``port`` (id ``pid``, default its own) as nft lists it."""
    backend = ports.backend
    value = (ports.records[port]["id"] if pid is None else pid) << backend.marks.in_shift
    keep = 0xFFFFFFFF ^ backend.marks.in_mask
    return f"meta mark set meta mark & 0x{keep | value:08x} | 0x{value:08x}"


def free_id(ports: Ports) -> int:
    return max(r["id"] or 0 for r in ports.records.values() if r) + 1


@pytest.fixture
def nft_ports(lab, fresh_ns):
    lab.nft(FOREIGN)  # a foreign table: the survey must skip it, no digest may depend on it
    return Ports(lab.host_ns, NftablesBackend(conntrack="inet"), {
        "vp1": nft_cases.ssh_to_a(),
        "vp2": nft_cases.clean_traffic(),
        "vp3": nft_cases.l3_every_field_v4(),
    }, fresh_ns)


FOREIGN = """\
table inet foreign {
	chain forwarding {
		type filter hook forward priority 10; policy accept;
		counter accept comment "not ours: I-1/vp1"
	}
}
"""


def test_nft_kernel_equals_reference_and_survives_reapply(nft_ports):
    nft_ports.apply()
    live = nft_ports.kernel()
    assert set(live) == {"vp1", "vp2", "vp3"} and None not in live.values() and len(set(live.values())) == 3
    # each port alone in a fresh kernel, with another mark id: the same digest
    assert nft_ports.reference() == live
    for port in ("vp1", "vp3"):  # the ports with L3 rules have mark ids, different there
        assert nft_ports.reference_records[port]["id"] != nft_ports.records[port]["id"]
    # all of them rebuilt together from their records (as the service does): the same
    assert nft_ports.reference(together=True) == live
    # the same rulesets again, port by port: refilled in place (a port with connlimit sets gets a
    # new generation), the same digests
    gens = {p: (r["gen"], bool(r["sets"])) for p, r in nft_ports.records.items()}
    nft_ports.apply(["vp1"])
    nft_ports.apply(["vp2", "vp3"])
    assert {p: nft_ports.records[p]["gen"] for p in gens} == {p: gen + sets for p, (gen, sets) in gens.items()}
    assert any(sets for _, sets in gens.values()) and not all(sets for _, sets in gens.values())
    assert nft_ports.kernel() == live
    # a different ruleset on one port changes that port's digest only, to its new reference
    nft_ports.rulesets["vp2"] = nft_cases.root_only()
    nft_ports.apply(["vp2"])
    after = nft_ports.kernel()
    assert changed(live, after) == {"vp2"}
    assert nft_ports.reference() == after


NFT_DAMAGE = {
    # name: (callable(ports) doing the damage, ports whose digest must change, ports that must be None)
    "rule deleted": (lambda p: p.sh("nft", "delete", "rule", "bridge", T1, chain_of(p, "vp1", "I", "mac"), "handle",
                                    nft_handle(p, "bridge", chain_of(p, "vp1", "I", "mac"), "drop")),
                     {"vp1"}, set()),
    "L3 rule deleted": (lambda p: p.sh("nft", "delete", "rule", "inet", T3, chain_of(p, "vp3", "FO"), "handle",
                                       nft_handle(p, "inet", chain_of(p, "vp3", "FO"), "meta nfproto ipv4 drop")),
                        {"vp3"}, set()),
    "map element deleted": (lambda p: p.sh("nft", "delete", "element", "bridge", T2, "l2_from_vm", '{ "vp2" }'),
                            {"vp2"}, set()),
    "mark id entry deleted": (lambda p: p.sh("nft", "delete", "element", "inet", IDS_TABLE, "port_ids",
                                             f"{{ {p.records['vp1']['id']} }}"),
                              {"vp1"}, set()),
    "mark id entry of another id": (lambda p: p.sh("nft", "-f", "-", input=(
        f"delete element inet {IDS_TABLE} port_ids {{ {p.records['vp1']['id']} }}\n"
        f'add element inet {IDS_TABLE} port_ids {{ {free_id(p)} : "vp1" }}\n')),
                                    {"vp1"}, set()),
    "mark rule of another id": (lambda p: p.sh("nft", "-f", "-", input=(
        f"replace rule bridge {T1} {chain_of(p, 'vp1', 'I')} handle "
        f"{nft_handle(p, 'bridge', chain_of(p, 'vp1', 'I'), listed_mark_rule(p, 'vp1'))} "
        f"{listed_mark_rule(p, 'vp1', free_id(p))}\n")),
                                {"vp1"}, set()),
    "rule added": (lambda p: p.sh("nft", "add", "rule", "inet", T3, chain_of(p, "vp3", "FI"), "accept"),
                   {"vp3"}, set()),
    "rule inserted first": (lambda p: p.sh("nft", "insert", "rule", "bridge", T2, chain_of(p, "vp2", "O"), "accept"),
                            {"vp2"}, set()),
    "rule changed": (lambda p: p.sh("nft", "-f", "-", input=(
        f"replace rule bridge {T1} {chain_of(p, 'vp1', 'I', 'mac')} handle "
        f"{nft_handle(p, 'bridge', chain_of(p, 'vp1', 'I', 'mac'), 'drop')} accept\n")),
                     {"vp1"}, set()),
    # (vp3's chains are in another shard: the element jumps to a chain of vp3's name in vp1's)
    "element points elsewhere": (lambda p: p.sh("nft", "-f", "-", input=(
        f'add chain bridge {T1} {chain_of(p, "vp3", "I")}\n'
        f'delete element bridge {T1} l2_from_vm {{ "vp1" }}\n'
        f'add element bridge {T1} l2_from_vm {{ "vp1" : jump {chain_of(p, "vp3", "I")} }}\n')),
                                 {"vp1", "vp3"}, set()),
    "base chain flushed": (lambda p: p.sh("nft", "flush", "chain", "bridge", T2, "l2-to-vm"),
                           {"vp2"}, set()),  # only vp2 has to-VM rules
    "chain of a port deleted": (lambda p: p.sh("nft", "-f", "-", input=(
        f'delete element inet {T3} fo {{ 0x{p.records["vp3"]["id"] << 8:08x} }}\n'
        f'flush chain inet {T3} {chain_of(p, "vp3", "FO")}\n'
        f'delete chain inet {T3} {chain_of(p, "vp3", "FO")}\n')),
                                {"vp3"}, set()),
    "our tables deleted": (lambda p: p.sh("nft", "-f", "-", input=remove_all_text()),
                           {"vp1", "vp2", "vp3"}, {"vp1", "vp2", "vp3"}),
    "flush ruleset": (lambda p: p.sh("nft", "flush", "ruleset"), {"vp1", "vp2", "vp3"}, {"vp1", "vp2", "vp3"}),
}


@pytest.mark.parametrize("damage", list(NFT_DAMAGE))
def test_nft_damage_is_seen_and_rebuild_restores(nft_ports, damage):
    nft_ports.check_damage(*NFT_DAMAGE[damage])


def test_nft_rebuild_removes_ports_without_binding(nft_ports):
    nft_ports.apply()
    intact = nft_ports.kernel()
    # a port the state no longer knows (e.g. its binding file was lost)
    stray = Ports(nft_ports.ns, nft_ports.backend, {"vp9": nft_cases.only_fo()})
    stray.apply()
    assert nft_ports.kernel() == intact
    nft_ports.rebuild()
    assert nft_ports.kernel() == intact == nft_ports.reference()
    assert stray.kernel() == {"vp9": None}
    assert "vp9" not in nft_ports.sh("nft", "list", "ruleset")


def test_nft_every_golden_ruleset_digests_alike_in_a_reference_kernel(lab, fresh_ns):
    """Every rendering shape we produce lists alike in the live and the reference kernels."""
    rulesets = {"vnet0": nft_cases.root_only(), "vnet1": nft_cases.clean_traffic(),
                "vnet2": nft_cases.l2_every_field(), "vnet3": nft_cases.l3_every_field_v4(),
                "vnet4": nft_cases.l3_every_field_v6(), "vnet5": nft_cases.only_fo(),
                "a:b_c.d-e": nft_cases.odd_names(), "vnet7": nft_cases.l3_no_ct(),
                "vnet8": nft_cases.PortRuleset()}
    ports = Ports(lab.host_ns, NftablesBackend(conntrack="inet"), rulesets, fresh_ns)
    ports.apply()
    live = ports.kernel()
    assert live == ports.reference()
    ports.apply()  # generation 2
    assert ports.kernel() == live
    assert live["vnet8"] == nft_empty_digest(None) and len(set(live.values())) == len(live)


def test_nft_bridge_mode(lab, fresh_ns):
    ns = lab.host_ns
    backend = NftablesBackend(conntrack="bridge")
    rulesets = {"vp1": nft_cases.l3_no_ct(), "vp2": nft_cases.root_only()}
    probe = netlab.run_in(ns, ["nft", "-c", "-f", "-"], input=probe_bridge_conntrack_text(), check=False)
    if probe.returncode == 0:
        rulesets["vp3"] = nft_cases.l3_every_field_v4()
    ports = Ports(ns, backend, rulesets, fresh_ns)
    ports.apply()
    live = ports.kernel()
    assert live == ports.reference()
    ports.sh("nft", "delete", "element", "bridge", T1, "fo", '{ "vp1" }')
    assert changed(live, ports.kernel()) == {"vp1"}
    ports.rebuild()
    assert ports.kernel() == live


def test_nft_one_port_change_and_digests_with_1000_ports(lab, fresh_ns):
    """With 1000 ports, changes of one port (another ruleset and back) change that port's digest
    only, and the live digests of all equal the reference kernel's (rebuilt from the records, as
    the service does). What this costs (binding-create with 1000 present, verify and reapply of
    1000) is measured in bench/."""
    ns = lab.host_ns
    n = 1000
    shapes = [nft_cases.clean_traffic(), nft_cases.ssh_to_a(), nft_cases.root_only(), nft_cases.only_fo()]
    rulesets = {f"vn{i}": shapes[i % len(shapes)] for i in range(n)}
    ports = Ports(ns, NftablesBackend(conntrack="inet"), rulesets, fresh_ns)
    ports.apply()
    first = ports.kernel()
    for shape in (shapes[3], shapes[1]):  # vn1 has L2 and L3 rules
        ports.rulesets["vn1"] = shape
        ports.apply(["vn1"])
        live = ports.kernel()
        assert changed(first, live) == ({"vn1"} if shape is shapes[3] else set())
    assert live == ports.reference(together=True) and None not in live.values()


# ---------------------------------------------------------------------------------------------
# ebiptables


@pytest.fixture
def eb_ports(lab, fresh_ns):
    return Ports(lab.host_ns, EbiptablesBackend(), {
        "vp1": eb_cases.mixed(),  # L2 both sides, IPv4 and IPv6 L3
        "vp2": eb_cases.clean_traffic(),  # L2 only
        "vp3": eb_cases.l3_example(),  # L3 (v4 + v6)
    }, fresh_ns)


def test_eb_kernel_equals_reference_and_survives_reapply(eb_ports):
    eb_ports.apply()
    live = eb_ports.kernel()
    assert set(live) == {"vp1", "vp2", "vp3"} and None not in live.values() and len(set(live.values())) == 3
    assert eb_ports.reference() == live  # each port alone in a fresh kernel
    assert eb_ports.reference(together=True) == live
    eb_ports.apply(["vp1"])
    eb_ports.apply()
    assert eb_ports.kernel() == live
    eb_ports.rulesets["vp2"] = eb_cases.to_vm_only()
    eb_ports.apply(["vp2"])
    after = eb_ports.kernel()
    assert changed(live, after) == {"vp2"} and eb_ports.reference() == after


def test_eb_every_golden_ruleset(lab, fresh_ns):
    rulesets = {case.port: case.build() for case in eb_cases.CASES}

    def prepare(ns: str) -> None:
        for name in eb_cases.IPSETS:  # the kernel ipsets the cases name (per namespace)
            netlab.run_in(ns, ["ipset", "create", name, "hash:ip"])

    prepare(lab.host_ns)
    ports = Ports(lab.host_ns, EbiptablesBackend(), rulesets, fresh_ns, prepare)
    ports.apply()
    live = ports.kernel()
    assert live == ports.reference()
    assert live[next(case.port for case in eb_cases.CASES if case.name == "empty")] == eb_empty_digest(None)
    ports.rebuild()
    assert ports.kernel() == live


def _ipt_all(p: Ports, *args: str) -> None:
    for tool in ("iptables", "ip6tables"):
        p.sh(tool, "-w", *args)


EB_DAMAGE = {
    "L2 rule deleted": (lambda p: p.sh("ebtables", "-t", "nat", "-D", "NI-vp1:mac", "-j", "DROP"), {"vp1"}, set()),
    "L3 rule deleted": (lambda p: p.sh("iptables", "-w", "-D", "NFI-vp3", "-j", "DROP"), {"vp3"}, set()),
    "dispatch jump deleted": (lambda p: p.sh("ebtables", "-t", "nat", "-D", "PREROUTING", "-i", "vp2",
                                             "-j", "nwf-I-vp2"), {"vp2"}, set()),
    "L3 dispatch deleted": (lambda p: p.sh("ip6tables", "-w", "-D", "nwf-out", "-m", "physdev", "--physdev-out", "vp1",
                                           "--physdev-is-bridged", "-g", "NFO-vp1"), {"vp1"}, set()),
    "in-post accept deleted": (lambda p: p.sh("iptables", "-w", "-D", "nwf-in-post", "-m", "physdev",
                                              "--physdev-in", "vp3", "-j", "ACCEPT"), {"vp3"}, set()),
    "rule added": (lambda p: p.sh("iptables", "-w", "-I", "NFO-vp3", "1", "-j", "ACCEPT"), {"vp3"}, set()),
    "L2 rule added": (lambda p: p.sh("ebtables", "-t", "nat", "-A", "nwf-O-vp2", "-j", "ACCEPT"), {"vp2"}, set()),
    "L2 chain policy changed": (lambda p: p.sh("ebtables", "-t", "nat", "-P", "NI-vp1:mac", "DROP"), {"vp1"}, set()),
    "temporary chain left over": (lambda p: p.sh("ebtables", "-t", "nat", "-N", "nwf-J-vp2"), {"vp2"}, set()),
    "global hook deleted": (lambda p: p.sh("iptables", "-w", "-D", "FORWARD", "-j", "nwf-in"), {"vp1", "vp3"}, set()),
    "ebtables flushed": (lambda p: p.sh("ebtables", "-t", "nat", "-F"), {"vp1", "vp2"}, set()),
    "everything flushed": (lambda p: (p.sh("ebtables", "-t", "nat", "-F"), _ipt_all(p, "-F")),
                           {"vp1", "vp2", "vp3"}, set()),
    "everything deleted": (lambda p: (p.sh("ebtables", "-t", "nat", "-F"), p.sh("ebtables", "-t", "nat", "-X"),
                                      _ipt_all(p, "-F"), _ipt_all(p, "-X")),
                           {"vp1", "vp2", "vp3"}, {"vp1", "vp2", "vp3"}),
}


@pytest.mark.parametrize("damage", list(EB_DAMAGE))
def test_eb_damage_is_seen_and_rebuild_restores(eb_ports, damage):
    eb_ports.check_damage(*EB_DAMAGE[damage])
    # exactly our objects: no temporary chains, one hook per global chain
    saved = {tool.name: eb_ports.sh(*tool.save) for tool in TOOLS}
    assert not [c for c in re.findall(r"^:(\S+)", saved["ebtables"], re.M) if is_temp_chain(c)]
    for tool in ("iptables", "ip6tables"):
        assert sorted(re.findall(r"^-A (?:FORWARD|INPUT) -j (nwf-\S+)$", saved[tool], re.M)) == sorted(GLOBAL_CHAINS)


def test_eb_rebuild_removes_ports_without_binding_and_ignores_stale_records(eb_ports):
    eb_ports.apply()
    intact = eb_ports.kernel()
    stray = Ports(eb_ports.ns, eb_ports.backend, {"vp9": eb_cases.mixed()})
    stray.apply()
    # stale records (what the state may hold after a crash): the survey is what counts
    eb_ports.records = {p: {**r, "ebtables": {"chains": ["nwf-I-gone"], "rules": ["-A PREROUTING -i gone -j X"]}}
                        for p, r in eb_ports.records.items()}
    eb_ports.rebuild()
    assert eb_ports.kernel() == intact == eb_ports.reference()
    assert stray.kernel() == {"vp9": None}
    text = "".join(eb_ports.sh(*t.save) for t in TOOLS)
    assert "vp9" not in text


# ---------------------------------------------------------------------------------------------
# Both: the inventory of what the kernel holds per port (orphans: ports no record names)


@pytest.mark.parametrize("ports_fixture, stray_ruleset",
                         [("nft_ports", nft_cases.only_fo), ("eb_ports", eb_cases.mixed)], ids=["nftables", "ebiptables"])
def test_kernel_ports_name_every_port_of_ours_and_the_inventory_removes_one(request, ports_fixture, stray_ruleset):
    ports = request.getfixturevalue(ports_fixture)
    backend = ports.backend
    ports.apply()
    intact = ports.kernel()
    assert backend.kernel_ports(survey(ports.ns, backend)) == set(ports.rulesets)
    # a port no record names: seen all the same
    stray = Ports(ports.ns, backend, {"vp9": stray_ruleset()})
    stray.apply()
    assert backend.kernel_ports(survey(ports.ns, backend)) == set(ports.rulesets) | {"vp9"}
    # its inventory record removes exactly what the kernel holds of it; the others are untouched
    held = backend.inventory(survey(ports.ns, backend))
    assert {"vp1", "vp9"} <= set(held)
    plan, _ = backend.plan([PortChange("vp9", held["vp9"], None)], [])
    executor.execute(plan, ports.ns)
    assert backend.kernel_ports(survey(ports.ns, backend)) == set(ports.rulesets)
    assert ports.kernel() == intact
    assert "vp9" not in "".join(survey(ports.ns, backend))
    # one port's objects deleted behind our back: it is no longer named
    plan, _ = backend.plan([PortChange("vp2", held["vp2"], None)], [])
    executor.execute(plan, ports.ns)
    assert backend.kernel_ports(survey(ports.ns, backend)) == set(ports.rulesets) - {"vp2"}
    ports.rebuild()
    assert backend.kernel_ports(survey(ports.ns, backend)) == set(ports.rulesets) and ports.kernel() == intact

"""The ebiptables backend against the kernel, inside throwaway network namespaces.

Every plan runs through the real executor in the lab's host namespace (``ip netns exec``); the
root namespace's firewall is never touched. The ``lab`` fixture (tests/conftest.py,
tests/netlab.py) deletes every namespace afterwards, also when a test fails.

What the kernel holds is compared by content, rule for rule, with what a fresh kernel (a
``fresh_ns`` namespace) holds after applying the same rulesets, reading ``*-save`` output with the
test's own few lines (:func:`port_lines`), not the backend's parser. Every "dropped" is judged
in one wait with its positive twin (tests/traffic.py).
"""

from __future__ import annotations

import re
import shutil

import pytest

import netlab
from bindings_helpers import port_items
from traffic import Conn, Probe, check_connections, check_frames
from golden.ebiptables import cases
from libvirt_nwfilter import executor
from libvirt_nwfilter.backends.base import PortChange
from libvirt_nwfilter.backends.ebiptables import EbiptablesBackend
from libvirt_nwfilter.backends.ebiptables.names import GLOBAL_CHAINS, GLOBAL_HOOKS, is_temp_chain
from libvirt_nwfilter.backends.ebiptables.tools import TOOLS
from libvirt_nwfilter.errors import FirewallError, PartialChange
from libvirt_nwfilter.ir import Cond, Field, IpSet, Jump, L2Rule, L2Side, L3Rule, MacMatch, NumRange, PortRuleset
from libvirt_nwfilter.ir import SubChain, Verdict

MAC_A = "52:54:00:00:00:01"
MAC_B = "52:54:00:00:00:02"
SPOOFED = "52:54:00:99:99:99"
backend = EbiptablesBackend()
TOOL = {t.name: t for t in TOOLS}

LIBVIRT_SETUP = {
    "ebtables-restore": (
        "*nat\n-N libvirt-I-vp9\n-A libvirt-I-vp9 -j DROP\n-N I-vp9-mac\n"
        "-A libvirt-I-vp9 -j I-vp9-mac\n-A PREROUTING -i vp9 -j libvirt-I-vp9\n"
    ),
    "iptables-restore": (
        "*filter\n-N libvirt-in\n-N libvirt-in-post\n-N FI-vp9\n-A FI-vp9 -j DROP\n"
        "-A libvirt-in -m physdev --physdev-in vp9 -g FI-vp9\n"
        "-A libvirt-in-post -m physdev --physdev-in vp9 -j ACCEPT\n"
        "-I FORWARD 1 -j libvirt-in\n-I FORWARD 2 -j libvirt-in-post\nCOMMIT\n"
    ),
}


# ---------------------------------------------------------------------------------------------
# Helpers


def run_plan(ns: str, changes, records: dict | None = None) -> dict:
    """Plan ``changes`` ((port, ruleset|None) pairs, old records from ``records``) and run it in
    ``ns``; returns the updated records (and updates ``records`` in place)."""
    records = {} if records is None else records
    plan, new = backend.plan([PortChange(p, records.get(p), rs) for p, rs in changes])
    executor.execute(plan, ns)
    for port, rec in new.items():
        if rec is None:
            records.pop(port, None)
        else:
            records[port] = rec
    return records


def save(ns: str, tool: str) -> str:
    """``*-save`` output without comment lines (timestamps) and counters."""
    text = netlab.run_in(ns, list(TOOL[tool].save)).stdout
    lines = [re.sub(r" \[\d+:\d+\]$", "", line) for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(lines) + "\n"


def saves(ns: str) -> dict[str, str]:
    return {tool.name: save(ns, tool.name) for tool in TOOLS}


def eb_chains(ns: str) -> list[str]:
    """Chain names in the nat table as ``ebtables -t nat -L --Lx`` lists them."""
    out = netlab.run_in(ns, ["ebtables", "-t", "nat", "-L", "--Lx"]).stdout
    return re.findall(r"^Bridge chain: ([^,]+),", out, re.M)


def chains(text: str) -> set[str]:
    return {line[1:].split()[0] for line in text.splitlines() if line.startswith(":")}


def ours(names) -> set[str]:
    return {n for n in names if n.startswith(("nwf-", "N"))}


def temps(names) -> set[str]:
    return {n for n in names if is_temp_chain(n)}


def libvirt_lines(snapshot: dict[str, str]) -> dict[str, list[str]]:
    return {t: [l for l in text.splitlines() if re.search(r"libvirt|\bI-vp9|\bFI-vp9", l)] for t, text in snapshot.items()}


def setup_libvirt_dummies(ns: str) -> None:
    for tool, text in LIBVIRT_SETUP.items():
        netlab.run_in(ns, [tool, "--noflush"], input=text)


def names_port(port: str):
    """A search for ``port`` as a whole name (vp1 in ``NI-vp1:mac``, not in ``vp10``)."""
    return re.compile(rf"(?<!\w){re.escape(port)}(?!\w)").search


def port_lines(text: str, port: str) -> dict[str, list[str]]:
    """What one tool's ``*-save`` text (:func:`save`) holds of ``port``, read by the test itself:
    per chain, in kernel order, the declaration (with its policy) of every chain whose name
    names the port and its rules, and the rules of other chains that name the port (dispatch,
    in-post accept)."""
    named, found = names_port(port), {}
    for line in text.splitlines():
        if line.startswith(":") and named(line[1:].split()[0]):
            found.setdefault(line[1:].split()[0], []).append(line)
        elif line.startswith("-A ") and (named(line.split()[1]) or named(line)):
            found.setdefault(line.split()[1], []).append(line)
    return found


def words(rule: str) -> list[str]:
    """A rule's words in a fixed order: a record holds a link rule as it was written, the kernel
    may list a match's options in another order (``--physdev-is-bridged`` last)."""
    return sorted(rule.split())


def reference_saves(fresh_ns, rulesets: dict) -> dict[str, str]:
    """The ``*-save`` texts of a fresh kernel in which one plan applied ``rulesets`` (port →
    ruleset; none: an empty kernel)."""
    ns = fresh_ns()
    if rulesets:
        run_plan(ns, list(rulesets.items()))
    return saves(ns)


def assert_port_as_reference(live: dict[str, str], reference: dict[str, str], port: str) -> None:
    for tool in live:
        assert port_lines(live[tool], port) == port_lines(reference[tool], port), (
            f"{tool} holds other rules of {port} than a fresh kernel given its ruleset:\n"
            f"{port_lines(live[tool], port)}\n!=\n{port_lines(reference[tool], port)}")


def assert_matches_kernel(ns: str, fresh_ns, rulesets: dict, records: dict) -> None:
    """The kernel holds, rule for rule, what a fresh kernel holds after applying ``rulesets``
    (port → ruleset) — nothing missing, nothing stale, no temporary chain, no chain of another
    port — and each record names exactly the chains and link rules the kernel lists for its
    port (``*-save`` read by the test, not by the backend's own parser; link rules compared by
    their words)."""
    live, reference = saves(ns), reference_saves(fresh_ns, rulesets)
    for port in rulesets:
        assert_port_as_reference(live, reference, port)
    for tool in live:
        assert ours(chains(live[tool])) - set(GLOBAL_CHAINS) == ours(chains(reference[tool])) - set(GLOBAL_CHAINS), tool
        assert not temps(chains(live[tool])), f"temporary chains left in {tool}"
    assert {p for p, r in records.items() if r} == set(rulesets)
    for port, rec in records.items():
        held = {tool: port_lines(live[tool], port) for tool in live}
        for tool, lines in held.items():
            own = {chain for chain in lines if names_port(port)(chain)}
            links = sorted(words(line) for chain, rules in lines.items() if chain not in own for line in rules)
            assert set(rec[tool]["chains"]) == own, (port, tool)
            assert sorted(map(words, rec[tool]["rules"])) == links, (port, tool)
        assert rec["l3"] == [family for family, tool in ((4, "iptables"), (6, "ip6tables")) if held[tool]]
        for side, root, sub in (("from-vm", f"nwf-I-{port}", f"NI-{port}:"), ("to-vm", f"nwf-O-{port}", f"NO-{port}:")):
            subs = sorted(chain[len(sub):] for chain in held["ebtables"] if chain.startswith(sub))
            assert rec["l2"][side] is None if root not in held["ebtables"] else sorted(rec["l2"][side]) == subs


def hook_count(ns: str, tool: str, hook: str, chain: str) -> int:
    return save(ns, tool).count(f"-A {hook} -j {chain}\n")


def frame(src: str, dst: str, ethertype: int = 0x88B5, payload: bytes = b"nwft-ebiptables") -> bytes:
    mac = lambda m: bytes.fromhex(m.replace(":", ""))  # noqa: E731
    return mac(dst) + mac(src) + ethertype.to_bytes(2, "big") + payload


def c(field, value, negated=False):
    return Cond(field, value, negated)


def anti_spoof(mac: str) -> PortRuleset:
    """no-mac-spoofing: frames from the VM must carry its MAC (sub-chain 'mac')."""
    side = L2Side(
        root=(Jump("mac", ()),),
        subchains=(SubChain("mac", -800, (L2Rule((c(Field.ETHER_SRC, MacMatch(mac)),), Verdict.RETURN, "t"),
                                           L2Rule((), Verdict.DROP, "t"))),),
    )
    return PortRuleset(from_vm=side)


def ssh_only_in() -> PortRuleset:
    """Remote peers may open TCP 22 on the VM; replies flow back; nothing else (IPv4)."""
    ct_new = (c(Field.CT_STATE, ("NEW", "ESTABLISHED")), c(Field.CT_DIRECTION, "original"))
    ct_reply = (c(Field.CT_STATE, ("ESTABLISHED",)), c(Field.CT_DIRECTION, "reply"))
    fo = (L3Rule(4, "tcp", (c(Field.DPORT, NumRange(22, 22)), *ct_new), Verdict.ACCEPT, "t"),
          L3Rule(4, "all", (), Verdict.DROP, "t"))
    fi = (L3Rule(4, "tcp", (c(Field.SPORT, NumRange(22, 22)), *ct_reply), Verdict.RETURN, "t"),
          L3Rule(4, "all", (), Verdict.DROP, "t"))
    return PortRuleset(fi=fi, fo=fo, hi=fi)


def with_missing_ipset(rs: PortRuleset, family: int) -> PortRuleset:
    bad = L3Rule(family, "all", (c(Field.IPSET, IpSet("nwft-no-such-set", ("src",))),), Verdict.DROP, "t")
    return PortRuleset(from_vm=rs.from_vm, to_vm=rs.to_vm, fi=rs.fi + (bad,), fo=rs.fo, hi=rs.hi)


# ---------------------------------------------------------------------------------------------
# Tests


def test_apply_replace_delete(lab, fresh_ns):
    ns = lab.host_ns
    setup_libvirt_dummies(ns)
    before = libvirt_lines(saves(ns))
    records: dict = {}

    run_plan(ns, [("vp1", cases.clean_traffic(MAC_A))], records)
    names = eb_chains(ns)
    assert {"nwf-I-vp1", "nwf-O-vp1", "NI-vp1:mac", "NI-vp1:ipv4-ip", "NI-vp1:arp-mac", "NI-vp1:arp-ip",
            "NI-vp1:rarp", "NO-vp1:ipv4", "NO-vp1:rarp"} == ours(names)
    ebt = save(ns, "ebtables")
    assert "-A PREROUTING -i vp1 -j nwf-I-vp1\n" in ebt and "-A POSTROUTING -o vp1 -j nwf-O-vp1\n" in ebt
    assert ebt.count("-A nwf-I-vp1 ") == 9 and ebt.count("-A nwf-O-vp1 ") == 4
    assert f"-A NI-vp1:mac -s {MAC_A} -j RETURN\n" in ebt
    # policy ACCEPT, as libvirt's ebtables chains have: a frame falling off a sub-chain is accepted
    assert ":nwf-I-vp1 ACCEPT\n" in ebt and ":NI-vp1:mac ACCEPT\n" in ebt
    assert not ours(chains(save(ns, "iptables")))  # no L3 rules: no iptables chains
    assert_matches_kernel(ns, fresh_ns, {"vp1": cases.clean_traffic(MAC_A)}, records)

    # replace: L2 and L3 of both families
    run_plan(ns, [("vp1", cases.mixed())], records)
    ipt = save(ns, "iptables")
    assert {"NFI-vp1", "NFO-vp1", "NHI-vp1"} <= chains(ipt)
    assert "-A nwf-in -m physdev --physdev-in vp1 -g NFI-vp1\n" in ipt
    assert "-A nwf-in-post -m physdev --physdev-in vp1 -j ACCEPT\n" in ipt
    assert "-A NFO-vp1 -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j ACCEPT" in ipt
    assert "-A NFI-vp1 -j DROP\n" in save(ns, "ip6tables")
    assert_matches_kernel(ns, fresh_ns, {"vp1": cases.mixed()}, records)

    # a second port with L3: the global chains' hooks are not duplicated
    run_plan(ns, [("vp2", cases.l3_example())], records)
    run_plan(ns, [("vp2", cases.l3_example())], records)
    for tool in ("iptables", "ip6tables"):
        for chain, hook, _ in GLOBAL_HOOKS:
            assert hook_count(ns, tool, hook, chain) == 1, (tool, chain)
    assert save(ns, "iptables").count("-A nwf-in-post ") == 2
    assert_matches_kernel(ns, fresh_ns, {"vp1": cases.mixed(), "vp2": cases.l3_example()}, records)

    # replace vp1 by an L3-only ruleset: its L2 chains and IPv6 chains go
    run_plan(ns, [("vp1", cases.l3_example())], records)
    assert not {n for n in ours(eb_chains(ns)) if "vp1" in n}
    assert_matches_kernel(ns, fresh_ns, {"vp1": cases.l3_example(), "vp2": cases.l3_example()}, records)

    # remove everything: only the global chains (and libvirt's) remain
    run_plan(ns, [("vp1", None), ("vp2", None)], records)
    assert records == {}
    snap = saves(ns)
    assert not ours(chains(snap["ebtables"]))
    assert ours(chains(snap["iptables"])) == set(GLOBAL_CHAINS)
    assert "physdev" not in snap["ip6tables"]
    assert libvirt_lines(snap) == before  # libvirt's chains were never touched


@pytest.mark.parametrize("family", [4, 6])
def test_failing_batch_rolls_back(lab, fresh_ns, family):
    """A batch whose ip(6)tables step is refused (missing ipset) leaves the old rules whole and
    no temporary chain behind, in every tool (the earlier tools' steps had succeeded); the error
    names the refused input line and the port it serves."""
    ns = lab.host_ns
    setup_libvirt_dummies(ns)
    records = run_plan(ns, [("vp1", cases.mixed())])
    before = saves(ns)
    changes = [PortChange("vp1", records["vp1"], with_missing_ipset(cases.clean_traffic(MAC_B), family)),
               PortChange("vp2", None, cases.mixed())]
    plan, _ = backend.plan(changes)
    with pytest.raises(FirewallError, match=r"of port vp1 \(input line \d+: -A N[FH]J-vp1 .*nwft-no-such-set"):
        executor.execute(plan, ns)
    assert saves(ns) == before
    assert_matches_kernel(ns, fresh_ns, {"vp1": cases.mixed()}, records)


def test_leftovers_of_a_lost_record_refuse_the_change_and_a_rebuild_keeping_a_port_removes_them(lab):
    """A record lost (the kernel keeps the port's chains, rules and in-post ACCEPT): a change of
    the port is refused in its apply step (``-N`` of a final name that exists) with nothing
    changed, in ebtables and in iptables; a rebuild keeping another port then removes the
    leftovers and leaves that port exactly as it was (``nft -a``: same handles)."""
    ns = lab.host_ns
    for ruleset in (cases.to_vm_only(), cases.l3_example()):  # ebtables, then iptables first
        run_plan(ns, [("vp1", ruleset)])
        before = saves(ns)
        plan, _ = backend.plan([PortChange("vp1", None, ruleset)])
        with pytest.raises(FirewallError) as refused:
            executor.execute(plan, ns)
        assert not isinstance(refused.value, PartialChange) and saves(ns) == before, refused.value
        run_plan(ns, [("vp2", cases.mixed())])
        vp2 = port_items(ns, "vp2")
        survey = executor.survey(backend.survey_steps(), ns)
        plan, records = backend.rebuild_plan([PortChange("vp1", None, cases.mixed())], survey, keep=["vp2"])
        executor.execute(plan, ns)
        assert port_items(ns, "vp2") == vp2
        held = backend.inventory(executor.survey(backend.survey_steps(), ns))
        assert backend.unrecorded(held["vp1"], records["vp1"]) == [] and "vp2" not in records
        executor.execute(backend.teardown_plan(executor.survey(backend.survey_steps(), ns)), ns)


def test_interrupted_change_is_recovered_from_the_kernel(lab, fresh_ns):
    """A change that died between apply and commit leaves temporary chains; a record rebuilt
    from the kernel lets the next change clean them up; purge removes everything of ours."""
    ns = lab.host_ns
    setup_libvirt_dummies(ns)
    before = libvirt_lines(saves(ns))
    records = run_plan(ns, [("vp1", cases.mixed())])
    plan, _ = backend.plan([PortChange("vp1", records["vp1"], cases.clean_traffic())])
    for step in plan.apply:  # crash before commit
        executor.run(step, ns)
    assert temps(eb_chains(ns))
    found = backend.inventory(list(saves(ns).values()))
    run_plan(ns, [("vp1", cases.to_vm_only())], found)
    assert_matches_kernel(ns, fresh_ns, {"vp1": cases.to_vm_only()}, {"vp1": found["vp1"]})
    assert ours(eb_chains(ns)) == {"nwf-O-vp1"}

    executor.execute(backend.teardown_plan(list(saves(ns).values())), ns)
    snap = saves(ns)
    for tool in snap:
        assert not ours(chains(snap[tool])), tool
    assert "nwf" not in "".join(snap.values())
    assert libvirt_lines(snap) == before


def test_spoofed_source_mac_is_dropped(lab):
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24")
    assert lab.frame_delivered(a, frame(SPOOFED, MAC_B), to=b)  # unfiltered: passes
    run_plan(lab.host_ns, [(a.port, anti_spoof(MAC_A))])
    check_frames(lab, [Probe("a's own MAC", a, frame(MAC_A, MAC_B), b, True),
                       Probe("spoofed MAC from a", a, frame(SPOOFED, MAC_B), b, False),
                       Probe("any MAC to a", b, frame(SPOOFED, MAC_A), a, True)])  # only frames *from* a are checked
    assert lab.ping(a, b.ipv4)


def test_l3_state_rules_with_real_tcp(lab):
    """A remote peer reaches TCP 22 on the VM (replies pass FI thanks to the state match) but
    not 23; the VM cannot open connections itself."""
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24")
    assert lab.tcp_connect(b, a.ipv4, 23)
    records = run_plan(lab.host_ns, [(a.port, ssh_only_in())])
    check_connections(lab, [Conn("b -> a:22", "tcp", b, a.ipv4, 22, True),
                            Conn("b -> a:23", "tcp", b, a.ipv4, 23, False),
                            Conn("a -> b:22", "tcp", a, b.ipv4, 22, False)])
    # replace with the same rules: the established path keeps working through the switch
    run_plan(lab.host_ns, [(a.port, ssh_only_in())], records)
    assert lab.tcp_connect(b, a.ipv4, 22)
    run_plan(lab.host_ns, [(a.port, None)], records)
    assert lab.tcp_connect(b, a.ipv4, 23) and lab.tcp_connect(a, b.ipv4, 22)


def client_out_only(port: int) -> PortRuleset:
    """The VM may open TCP ``port`` anywhere (forwarded and to the host); replies come back."""
    ct_new = (c(Field.CT_STATE, ("NEW", "ESTABLISHED")), c(Field.CT_DIRECTION, "original"))
    ct_reply = (c(Field.CT_STATE, ("ESTABLISHED",)), c(Field.CT_DIRECTION, "reply"))
    fi = (L3Rule(4, "tcp", (c(Field.DPORT, NumRange(port, port)), *ct_new), Verdict.RETURN, "t"),
          L3Rule(4, "all", (), Verdict.DROP, "t"))
    fo = (L3Rule(4, "tcp", (c(Field.SPORT, NumRange(port, port)), *ct_reply), Verdict.ACCEPT, "t"),
          L3Rule(4, "all", (), Verdict.DROP, "t"))
    return PortRuleset(fi=fi, fo=fo, hi=fi)


def test_l3_from_vm_forwarded_and_to_host(lab):
    """accept = RETURN in the from-VM chains: forwarded packets are then accepted by nwf-in-post,
    packets to the host go on in INPUT; the host-input copy filters VM -> host."""
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24")
    lab.set_bridge_address(ipv4="10.0.0.254/24")
    lab.host_run(["iptables", "-P", "FORWARD", "DROP"])  # like Docker: only nwf-in-post lets a's packets pass
    lab.host_run(["iptables", "-A", "FORWARD", "-m", "physdev", "--physdev-in", b.port, "-j", "ACCEPT"])
    check_connections(lab, [Conn("a -> b:8022 (FORWARD policy)", "tcp", a, b.ipv4, 8022, False),
                            Conn("a -> host:8022", "tcp", a, "10.0.0.254", 8022, True)])
    run_plan(lab.host_ns, [(a.port, client_out_only(8022))])
    check_connections(lab, [Conn("a -> b:8022", "tcp", a, b.ipv4, 8022, True),
                            Conn("a -> host:8022", "tcp", a, "10.0.0.254", 8022, True),
                            Conn("a -> b:8023", "tcp", a, b.ipv4, 8023, False),
                            Conn("a -> host:8023", "tcp", a, "10.0.0.254", 8023, False),
                            Conn("b -> a:8022", "tcp", b, a.ipv4, 8022, False)])


def test_ipset_match_is_live(lab):
    """``-m set``: membership changes take effect without re-applying the filter."""
    assert shutil.which("ipset"), "the ipset tool is not installed (scripts/bootstrap installs it)"
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24")
    lab.host_run(["ipset", "create", "nwft-blocked", "hash:ip"])
    lab.host_run(["ipset", "add", "nwft-blocked", b.ipv4])
    rule = L3Rule(4, "tcp", (c(Field.DPORT, NumRange(22, 22)), c(Field.IPSET, IpSet("nwft-blocked", ("src",)))),
                  Verdict.DROP, "t")
    run_plan(lab.host_ns, [(a.port, PortRuleset(fo=(rule,)))])
    check_connections(lab, [Conn("b (in the set) -> a:22", "tcp", b, a.ipv4, 22, False),
                            Conn("b (in the set) -> a:23", "tcp", b, a.ipv4, 23, True)])
    lab.host_run(["ipset", "del", "nwft-blocked", b.ipv4])
    assert lab.tcp_connect(b, a.ipv4, 22), lab.last_exchange


def test_one_port_changes_alone_among_300_ports(lab, fresh_ns):
    """Instantiating, replacing and removing one clean-traffic port (27 L2 rules, 7 sub-chains)
    with 300 such ports present touches that port only: every other line of every tool stays as
    it was, and the port holds what a fresh kernel holds given its ruleset. (What these steps
    cost with 0, 100 and 1000 ports present is measured in bench/: binding-create and -delete.)"""
    ns = lab.host_ns
    records = run_plan(ns, [(f"vnet{i}", cases.clean_traffic(mac=f"52:54:00:00:{i // 256:02x}:{i % 256:02x}"))
                            for i in range(300)])
    named = names_port("vnet999")

    def others() -> dict[str, list[str]]:
        return {tool: [line for line in text.splitlines() if not named(line)] for tool, text in saves(ns).items()}

    before = others()
    assert save(ns, "ebtables").count("-A PREROUTING ") == 300
    for ruleset in (cases.clean_traffic(ips=("10.0.0.5",)), cases.clean_traffic(ips=("10.0.0.6",)), None):
        run_plan(ns, [("vnet999", ruleset)], records)
        assert others() == before
        assert_port_as_reference(saves(ns), reference_saves(fresh_ns, {"vnet999": ruleset} if ruleset else {}),
                                 "vnet999")
    assert "vnet999" not in records

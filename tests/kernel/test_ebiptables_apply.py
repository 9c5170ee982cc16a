"""The ebiptables backend against the kernel, inside throwaway network namespaces.

Every plan runs through the real executor in the lab's host namespace (``ip netns exec``); the
root namespace's firewall is never touched. The ``lab`` fixture (tests/conftest.py,
tests/netlab.py) deletes every namespace afterwards, also when a test fails.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest

import netlab
from bindings_helpers import port_items
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


def assert_matches_kernel(ns: str, records: dict) -> None:
    """The records say exactly which chains of ours exist (and links/in-post rules)."""
    snap = saves(ns)
    found = backend.inventory([snap[t.name] for t in TOOLS])
    records = {p: r for p, r in records.items() if any(r[t.name]["chains"] or r[t.name]["rules"] for t in TOOLS)}
    assert set(found) == set(records)
    for port, rec in records.items():
        for tool in (t.name for t in TOOLS):
            assert set(found[port][tool]["chains"]) == set(rec[tool]["chains"]), (port, tool)
            assert len(found[port][tool]["rules"]) == len(rec[tool]["rules"]), (port, tool)
        assert found[port]["l3"] == rec["l3"]
        assert {k: sorted(v) if v is not None else None for k, v in found[port]["l2"].items()} == {
            k: sorted(v) if v is not None else None for k, v in rec["l2"].items()
        }
    for tool in snap:
        assert not temps(chains(snap[tool])), f"temporary chains left in {tool}"


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


def test_apply_replace_delete(lab):
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
    assert_matches_kernel(ns, records)

    # replace: L2 and L3 of both families
    run_plan(ns, [("vp1", cases.mixed())], records)
    ipt = save(ns, "iptables")
    assert {"NFI-vp1", "NFO-vp1", "NHI-vp1"} <= chains(ipt)
    assert "-A nwf-in -m physdev --physdev-in vp1 -g NFI-vp1\n" in ipt
    assert "-A nwf-in-post -m physdev --physdev-in vp1 -j ACCEPT\n" in ipt
    assert "-A NFO-vp1 -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir ORIGINAL -j ACCEPT" in ipt
    assert "-A NFI-vp1 -j DROP\n" in save(ns, "ip6tables")
    assert_matches_kernel(ns, records)

    # a second port with L3: the global chains' hooks are not duplicated
    run_plan(ns, [("vp2", cases.l3_example())], records)
    run_plan(ns, [("vp2", cases.l3_example())], records)
    for tool in ("iptables", "ip6tables"):
        for chain, hook, _ in GLOBAL_HOOKS:
            assert hook_count(ns, tool, hook, chain) == 1, (tool, chain)
    assert save(ns, "iptables").count("-A nwf-in-post ") == 2
    assert_matches_kernel(ns, records)

    # replace vp1 by an L3-only ruleset: its L2 chains and IPv6 chains go
    run_plan(ns, [("vp1", cases.l3_example())], records)
    assert not {n for n in ours(eb_chains(ns)) if "vp1" in n}
    assert_matches_kernel(ns, records)

    # remove everything: only the global chains (and libvirt's) remain
    run_plan(ns, [("vp1", None), ("vp2", None)], records)
    assert records == {}
    snap = saves(ns)
    assert not ours(chains(snap["ebtables"]))
    assert ours(chains(snap["iptables"])) == set(GLOBAL_CHAINS)
    assert "physdev" not in snap["ip6tables"]
    assert libvirt_lines(snap) == before  # libvirt's chains were never touched


@pytest.mark.parametrize("family", [4, 6])
def test_failing_batch_rolls_back(lab, family):
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
    assert_matches_kernel(ns, records)


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


def test_interrupted_change_is_recovered_from_the_kernel(lab):
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
    assert_matches_kernel(ns, {"vp1": found["vp1"]})
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
    assert lab.frame_delivered(a, frame(MAC_A, MAC_B), to=b)
    assert not lab.frame_delivered(a, frame(SPOOFED, MAC_B), to=b)
    assert lab.frame_delivered(b, frame(SPOOFED, MAC_A), to=a)  # only frames *from* a are checked
    assert lab.ping(a, b.ipv4)


def test_l3_state_rules_with_real_tcp(lab):
    """A remote peer reaches TCP 22 on the VM (replies pass FI thanks to the state match) but
    not 23; the VM cannot open connections itself."""
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24")
    assert lab.tcp_connect(b, a.ipv4, 23)
    records = run_plan(lab.host_ns, [(a.port, ssh_only_in())])
    assert lab.tcp_connect(b, a.ipv4, 22), lab.last_exchange
    assert not lab.tcp_connect(b, a.ipv4, 23)
    assert not lab.tcp_connect(a, b.ipv4, 22)
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
    assert not lab.tcp_connect(a, b.ipv4, 8022)
    run_plan(lab.host_ns, [(a.port, client_out_only(8022))])
    assert lab.tcp_connect(a, b.ipv4, 8022), lab.last_exchange
    assert lab.tcp_connect(a, "10.0.0.254", 8022), lab.last_exchange
    assert not lab.tcp_connect(a, b.ipv4, 8023)
    assert not lab.tcp_connect(a, "10.0.0.254", 8023)
    assert not lab.tcp_connect(b, a.ipv4, 8022)


def test_ipset_match_is_live(lab):
    """``-m set``: membership changes take effect without re-applying the filter."""
    if shutil.which("ipset") is None:
        pytest.skip("the ipset tool is not installed (apt-get install ipset)")
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24")
    lab.host_run(["ipset", "create", "nwft-blocked", "hash:ip"])
    lab.host_run(["ipset", "add", "nwft-blocked", b.ipv4])
    rule = L3Rule(4, "tcp", (c(Field.DPORT, NumRange(22, 22)), c(Field.IPSET, IpSet("nwft-blocked", ("src",)))),
                  Verdict.DROP, "t")
    run_plan(lab.host_ns, [(a.port, PortRuleset(fo=(rule,)))])
    assert not lab.tcp_connect(b, a.ipv4, 22)
    lab.host_run(["ipset", "del", "nwft-blocked", b.ipv4])
    assert lab.tcp_connect(b, a.ipv4, 22), lab.last_exchange


def _timed(ns: str, changes, records) -> float:
    start = time.perf_counter()
    run_plan(ns, changes, records)
    return time.perf_counter() - start


def test_timing_clean_traffic_port_with_0_and_300_ports(lab, capsys):
    """Instantiate, replace and remove one clean-traffic port (27 L2 rules, 7 sub-chains) with 0
    and with 300 other such ports present (median of 5; each is apply + commit, 2 restore runs,
    each wrapped in ``ip netns exec``). Prints the figures."""
    ns = lab.host_ns
    records: dict = {}
    figures = {}
    for label in ("0 ports", "300 ports"):
        runs = []
        for _ in range(5):
            runs.append((
                _timed(ns, [("vnet999", cases.clean_traffic(ips=("10.0.0.5",)))], records),
                _timed(ns, [("vnet999", cases.clean_traffic(ips=("10.0.0.6",)))], records),
                _timed(ns, [("vnet999", None)], records),
            ))
        figures[label] = tuple(sorted(r[i] for r in runs)[2] for i in range(3))
        if label == "0 ports":
            batch = [(f"vnet{i}", cases.clean_traffic(mac=f"52:54:00:00:{i // 256:02x}:{i % 256:02x}"))
                     for i in range(300)]
            batch_time = _timed(ns, batch, records)
    assert save(ns, "ebtables").count("-A PREROUTING ") == 300
    with capsys.disabled():
        print(f"\nebiptables timing: 300 clean-traffic ports in one batch: {batch_time * 1000:.0f} ms")
        for label, (add, replace, remove) in figures.items():
            print(f"ebiptables timing, one port with {label} present: instantiate {add * 1000:.0f} ms, "
                  f"replace {replace * 1000:.0f} ms, remove {remove * 1000:.0f} ms")
    assert max(figures["300 ports"]) < 5

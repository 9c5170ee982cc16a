"""The nftables backend against a real kernel, in throw-away namespaces (tests/netlab.py).

apply → replace → delete of a port (old generations gone, foreign tables byte-identical), a
refused batch leaves everything as it was (its error names the refused line and its port), an id
clash is refused, and real traffic through a
bridge with two veth "VMs": spoofed source MACs are dropped at L2 and only TCP to port 22 reaches
VM A at L3 (default state matching: A may answer), with the inet conntrack mode (br_netfilter).
Every "dropped" is judged in one wait with its positive twin (tests/traffic.py).
"""

from __future__ import annotations

import json
import re

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

import netlab
from bindings_helpers import port_items
from traffic import Conn, Probe, check_connections, check_frames
from golden.nftables import cases as nft_cases
from libvirt_nwfilter import executor
from libvirt_nwfilter.backends.base import PortChange
from libvirt_nwfilter.backends.nftables import NftablesBackend
from libvirt_nwfilter.backends.nftables.names import OUR_TABLES, SHARD_TABLES, parse_object, shard_of
from libvirt_nwfilter.errors import FirewallError
from libvirt_nwfilter.ir import PortRuleset

MAC_A = "52:54:00:00:00:01"
MAC_B = "52:54:00:00:00:02"
SPOOFED = "52:54:00:99:99:99"

FOREIGN = """\
table inet foreign {
	set allowed {
		type ipv4_addr
		elements = { 192.0.2.1 }
	}

	chain forwarding {
		type filter hook forward priority 10; policy accept;
		ip saddr @allowed accept comment "not ours"
	}
}
table bridge nat {
	chain PREROUTING {
		type filter hook prerouting priority dstnat; policy accept;
	}
}
"""


def run_plan(ns: str, plan) -> None:
    for step in plan.apply + plan.commit:
        proc = netlab.run_in(ns, list(step.argv), input=step.stdin, check=False)
        assert proc.returncode == 0 or step.ignore_errors, f"{step.argv} refused:\n{proc.stderr}"


def try_plan(ns: str, plan):
    step, = plan.apply
    return netlab.run_in(ns, list(step.argv), input=step.stdin, check=False)


def listing(ns: str, family: str, table: str) -> str:
    return netlab.run_in(ns, ["nft", "list", "table", family, table]).stdout


def chains(ns: str) -> set[str]:
    """Our per-port (non-base) chains, as "family name"."""
    data = json.loads(netlab.run_in(ns, ["nft", "-j", "list", "chains"]).stdout)
    return {f"{item['chain']['family']} {item['chain']['name']}" for item in data["nftables"]
            if "chain" in item and item["chain"]["table"] in OUR_TABLES
            and "hook" not in item["chain"]}  # per-port chains only


def ruleset(ns: str) -> str:
    return netlab.run_in(ns, ["nft", "list", "ruleset"]).stdout


@pytest.fixture
def host(lab):
    """The lab's host namespace with foreign tables loaded first."""
    lab.nft(FOREIGN)
    return lab


def test_apply_replace_delete(host):
    ns = host.host_ns
    foreign_inet = listing(ns, "inet", "foreign")
    foreign_nat = listing(ns, "bridge", "nat")
    backend = NftablesBackend(conntrack="inet")

    plan, records = backend.plan([PortChange("vp1", None, nft_cases.ssh_to_a())], [])
    run_plan(ns, plan)
    first = records["vp1"]
    assert first["gen"] == 1 and first["id"] == 1
    assert {f"{f} {n}" for f, n in first["chains"]} == chains(ns)
    assert "I-1/vp1" in listing(ns, "bridge", shard_of("vp1"))

    plan, records = backend.plan([PortChange("vp1", first, nft_cases.clean_traffic())])
    run_plan(ns, plan)
    second = records["vp1"]
    assert second["gen"] == 2 and second["id"] is None  # no L3 rules: no id
    assert chains(ns) == {f"{f} {n}" for f, n in second["chains"]}
    text = listing(ns, "bridge", shard_of("vp1"))
    assert "I-1/" not in text and "MO-1/" not in text
    assert '"vp1" : jump I-2/vp1' in text and '"vp1" : jump O-2/vp1' in text
    inet = listing(ns, "inet", shard_of("vp1"))
    assert "FI-1" not in inet and "0x00000001" not in inet

    plan, records = backend.plan([PortChange("vp1", second, None)])
    run_plan(ns, plan)
    assert records == {"vp1": None}
    assert chains(ns) == set()
    assert "vp1" not in listing(ns, "bridge", shard_of("vp1"))

    assert listing(ns, "inet", "foreign") == foreign_inet
    assert listing(ns, "bridge", "nat") == foreign_nat

    run_plan(ns, backend.teardown_plan([]))
    run_plan(ns, backend.teardown_plan([]))  # idempotent
    tables = netlab.run_in(ns, ["nft", "list", "tables"]).stdout
    assert "libvirt_nwfilter" not in tables
    assert "table inet foreign" in tables and "table bridge nat" in tables


def test_refused_batch_leaves_previous_rules(host):
    ns = host.host_ns
    backend = NftablesBackend(conntrack="inet")
    plan, records = backend.plan([PortChange("vp1", None, nft_cases.ssh_to_a()),
                                  PortChange("vp2", None, nft_cases.root_only())])
    run_plan(ns, plan)
    before = ruleset(ns)
    # a stale record (generation 7 never existed): deleting its chains fails the whole batch
    stale = dict(records["vp1"], gen=7, chains=[["bridge", "I-7/vp1"]])
    plan, _ = backend.plan([PortChange("vp2", records["vp2"], nft_cases.clean_traffic()),
                            PortChange("vp1", stale, nft_cases.root_only())])
    proc = try_plan(ns, plan)
    assert proc.returncode != 0
    assert ruleset(ns) == before
    # through the executor, the error names the refused input line and the port it serves
    with pytest.raises(FirewallError, match=r"refused the change of port vp1 \(input line \d+: "
                                            rf"flush chain bridge {shard_of('vp1')} I-7/vp1\): /dev/stdin:"):
        executor.execute(plan, ns)
    assert ruleset(ns) == before
    # a rule the kernel cannot take (bridge-family ct without nf_conntrack_bridge, or a bogus
    # protocol) also leaves everything as it was
    bad = plan.apply[0].stdin + f"add rule bridge {shard_of('vp2')} I-2/vp2 meta l4proto 6 th dport 99999 drop\n"
    proc = netlab.run_in(ns, ["nft", "-f", "-"], input=bad, check=False)
    assert proc.returncode != 0
    assert ruleset(ns) == before


def test_id_clash_is_refused_not_shared(host):
    ns = host.host_ns
    backend = NftablesBackend(conntrack="inet")
    plan, records = backend.plan([PortChange("vp1", None, nft_cases.ssh_to_a())], [])
    run_plan(ns, plan)
    before = ruleset(ns)
    # the caller wrongly claims there are no other ports: vp2 would get id 1 as well
    plan, clash = backend.plan([PortChange("vp2", None, nft_cases.ssh_to_a(MAC_B, "10.0.0.2"))], [])
    assert clash["vp2"]["id"] == 1
    assert try_plan(ns, plan).returncode != 0
    assert ruleset(ns) == before
    # with the records it gets the next free id
    plan, fine = backend.plan([PortChange("vp2", None, nft_cases.ssh_to_a(MAC_B, "10.0.0.2"))],
                              [r["id"] for r in records.values()])
    assert fine["vp2"]["id"] == 2
    run_plan(ns, plan)


def test_leftovers_of_a_lost_record_never_stay_in_front_of_new_rules(host):
    """A record lost (the kernel keeps the port's objects): a change with the same chain names
    flushes them before filling them (no rule doubled, none of the old left); a change that
    leaves a dispatch slot the leftovers hold (their L2 root, their L3 copies at the mark id)
    is refused as a whole; a rebuild keeping another port removes the leftovers and leaves
    that port exactly as it was, its mark id given to nobody else."""
    ns = host.host_ns
    backend = NftablesBackend(conntrack="inet")
    plan, _ = backend.plan([PortChange("vp1", None, nft_cases.ssh_to_a())], [])
    run_plan(ns, plan)
    before = ruleset(ns)
    plan, _ = backend.plan([PortChange("vp1", None, nft_cases.ssh_to_a())], [])
    run_plan(ns, plan)
    assert ruleset(ns) == before  # the same rules once, not twice
    plan, _ = backend.plan([PortChange("vp1", None, nft_cases.only_fo())], [])
    refused = try_plan(ns, plan)
    assert refused.returncode != 0 and "File exists" in refused.stderr and ruleset(ns) == before
    # vp2 is kept (its record cannot be read) while vp1 is rebuilt from a stale record claiming id 1
    plan, kept = backend.plan([PortChange("vp2", None, nft_cases.ssh_to_a(MAC_B, "10.0.0.2"))], [1])
    run_plan(ns, plan)
    vp2 = port_items(ns, "vp2")
    survey = executor.survey(backend.survey_steps(), ns)
    stale = {"backend": "nftables", "mode": "inet", "gen": 0, "id": kept["vp2"]["id"]}
    plan, records = backend.rebuild_plan([PortChange("vp1", stale, nft_cases.only_fo())], survey, [], keep=["vp2"])
    run_plan(ns, plan)
    assert port_items(ns, "vp2") == vp2  # handles included: nothing of it was re-created
    assert records["vp1"]["id"] not in (None, kept["vp2"]["id"]) and records["vp1"]["gen"] == 2
    held = backend.inventory(executor.survey(backend.survey_steps(), ns))
    assert sorted(held["vp1"]["chains"]) == [["bridge", "MO-2/vp1"], ["inet", "FO-2/vp1"]]
    assert held["vp2"] == backend.inventory(survey)["vp2"]


def test_rebuild_after_flush_ruleset(host):
    ns = host.host_ns
    backend = NftablesBackend(conntrack="inet")
    plan, records = backend.plan([PortChange("vp1", None, nft_cases.ssh_to_a()),
                                  PortChange("vp2", None, nft_cases.only_fo())])
    run_plan(ns, plan)
    ids = {r["id"] for r in records.values()}
    expected = chains(ns)
    netlab.run_in(ns, ["nft", "flush", "ruleset"])
    # a normal change now fails (the old elements are gone) ...
    plan, _ = backend.plan([PortChange("vp1", records["vp1"], nft_cases.ssh_to_a())], [records["vp2"]["id"]])
    assert try_plan(ns, plan).returncode != 0
    # ... a rebuild of every port works, keeps ids, and also works on an intact kernel
    for _ in range(2):
        plan, records = backend.rebuild_plan([PortChange(p, r, nft_cases.ssh_to_a() if p == "vp1" else nft_cases.only_fo())
                                              for p, r in records.items()])
        run_plan(ns, plan)
    assert {r["id"] for r in records.values()} == ids
    assert len(chains(ns)) == len(expected)


def chain_rules(ns: str, family: str, chain: str) -> list[str]:
    """The rules of one chain as ``nft list chain`` prints them."""
    text = netlab.run_in(ns, ["nft", "list", "chain", family, shard_of(parse_object(chain).port), chain]).stdout
    return [line.strip() for line in text.split("{", 2)[2].rsplit("}", 2)[0].splitlines() if line.strip()]


def test_odd_port_and_chain_names(lab):
    """Port and sub-chain names with ':', '.', '_', '-' or nft keywords: every port's dispatch
    entry leads, by the kernel's own listing, to a chain of its own holding its rules and jumping
    to sub-chains of its own."""
    ns = lab.host_ns
    backend = NftablesBackend(conntrack="inet")
    names = ["a:b_c.d-e", "0.1", "x__y", "_c", "a-b", "fwd", "ip", "mark", "15charactersxyz"]
    plan, records = backend.plan([PortChange(n, None, nft_cases.odd_names()) for n in names])
    run_plan(ns, plan)
    elements = []
    for table in SHARD_TABLES:
        listed = netlab.run_in(ns, ["nft", "-j", "list", "map", "bridge", table, "l2_from_vm"], check=False).stdout
        for item in json.loads(listed or '{"nftables": []}')["nftables"]:
            if "map" in item:
                assert all(shard_of(key) == table for key, _ in item["map"].get("elem", []))
                elements += item["map"].get("elem", [])
    roots = {key: value["jump"]["target"] for key, value in elements}
    assert set(roots) == set(names) and len(set(roots.values())) == len(names)
    held = set()
    for root in roots.values():
        arp_jump, ip_jump, final = chain_rules(ns, "bridge", root)
        arp, ip = arp_jump.split(" jump ")[1], ip_jump.split(" jump ")[1]
        assert (arp_jump, ip_jump, final) == (f"ether type arp jump {arp}", f"ether type ip jump {ip}", "drop")
        assert arp.startswith(f"{root}/") and ip.startswith(f"{root}/")
        assert chain_rules(ns, "bridge", arp) == ["arp ptype ip arp hlen 6 arp plen 4 arp saddr ip 10.0.0.1 return",
                                                  "ether type arp drop", "accept"]
        assert chain_rules(ns, "bridge", ip) == ["ether type ip accept", "accept"]
        held |= {f"bridge {root}", f"bridge {arp}", f"bridge {ip}"}
    assert chains(ns) == held
    plan, _ = backend.plan([PortChange(n, records[n], None) for n in names])
    run_plan(ns, plan)
    assert chains(ns) == set()


# ----------------------------------------------------------------------------------------------
# Real traffic


MARK_SPY = """\
table bridge spy {
	chain pre {
		type filter hook prerouting priority -400; policy accept;
		ether saddr %s meta mark set 0x000000a5
	}
}
table inet spy {
	chain forwarding {
		type filter hook forward priority 20; policy accept;
		meta mark & 0x000000ff == 0x000000a5 counter
	}
}
"""


def spy_count(lab) -> int:
    text = listing(lab.host_ns, "inet", "spy")
    found = re.search(r"counter packets (\d+)", text)
    return int(found.group(1)) if found else 0


def test_real_traffic_inet_mode(lab):
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24")
    lab.set_bridge_address(ipv4="10.0.0.254/24")
    lab.nft(MARK_SPY % MAC_B)
    ns = lab.host_ns
    assert lab.ping(a, "10.0.0.2") and lab.tcp_connect(b, "10.0.0.1", 80)

    backend = NftablesBackend(conntrack="inet")
    plan, records = backend.plan([PortChange(a.port, None, nft_cases.ssh_to_a(MAC_A, "10.0.0.1"))])
    run_plan(ns, plan)

    check_connections(lab, [
        # L3, to A: only TCP 22 may open a connection; A's answers pass FI (established, reply)
        Conn("b -> a:22", "tcp", b, "10.0.0.1", 22, True),
        Conn("b -> a:80", "tcp", b, "10.0.0.1", 80, False),
        Conn("b -> a ping", "ping", b, "10.0.0.1", expect=False),
        # L3, from A: nothing may start (FI drops), also not towards the host (HI)
        Conn("a -> b ping", "ping", a, "10.0.0.2", expect=False),
        Conn("a -> b:22", "tcp", a, "10.0.0.2", 22, False),
        Conn("a -> host ping", "ping", a, "10.0.0.254", expect=False),
        # B is not filtered: B <-> host is free
        Conn("b -> host ping", "ping", b, "10.0.0.254", expect=True)])

    # L2: a spoofed source MAC from A is dropped, the real one passes (ARP: no L3 involved)
    arp = ARP(op=1, hwsrc=MAC_A, psrc="10.0.0.1", pdst="10.0.0.2")
    spoofed = bytes(Ether(src=SPOOFED, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=SPOOFED, psrc="10.0.0.1",
                                                                    pdst="10.0.0.2"))
    check_frames(lab, [
        Probe("a's ARP", a, bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / arp), b, True),
        Probe("spoofed ARP", a, spoofed, b, False),
        Probe("spoofed IPv4", a, bytes(Ether(src=SPOOFED, dst=MAC_B) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP()),
              b, False)])

    # other users' mark bits survive our mark (B's frames carry 0xa5 in the low byte)
    counted = spy_count(lab)
    assert lab.tcp_connect(b, "10.0.0.1", 22)
    assert spy_count(lab) > counted

    # replace: now also allow ping towards A; no gap, old chains gone
    allow_ping = nft_cases.ssh_to_a(MAC_A, "10.0.0.1")
    icmp_in = nft_cases.l3(4, "icmp", nft_cases.A, nft_cases.c(nft_cases.Field.CT_STATE, ("NEW", "ESTABLISHED")),
                           nft_cases.c(nft_cases.Field.CT_DIRECTION, "original"))
    icmp_out = nft_cases.l3(4, "icmp", nft_cases.R, nft_cases.c(nft_cases.Field.CT_STATE, ("ESTABLISHED",)),
                            nft_cases.c(nft_cases.Field.CT_DIRECTION, "reply"))
    allow_ping = PortRuleset(from_vm=allow_ping.from_vm, fi=(icmp_out,) + allow_ping.fi,
                             fo=(icmp_in,) + allow_ping.fo, hi=allow_ping.hi)
    plan, records = backend.plan([PortChange(a.port, records[a.port], allow_ping)])
    run_plan(ns, plan)
    check_connections(lab, [Conn("b -> a ping", "ping", b, "10.0.0.1", expect=True),
                            Conn("b -> a:22", "tcp", b, "10.0.0.1", 22, True),
                            Conn("b -> a:80", "tcp", b, "10.0.0.1", 80, False),
                            Conn("a -> b ping", "ping", a, "10.0.0.2", expect=False)])

    # delete: everything flows again
    plan, _ = backend.plan([PortChange(a.port, records[a.port], None)])
    run_plan(ns, plan)
    assert lab.ping(a, "10.0.0.2") and lab.tcp_connect(b, "10.0.0.1", 80)
    assert lab.frame_delivered(a, spoofed, b)


def test_real_traffic_both_ports_filtered(lab):
    """A forwarded packet from a filtered port to a filtered port passes FI of the source (accept
    there = return) and then FO of the destination (spec §14.1)."""
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24")
    ns = lab.host_ns
    backend = NftablesBackend(conntrack="inet")
    # A: may open anything (out accept, state NEW,ESTABLISHED original / ESTABLISHED reply)
    out_ok = PortRuleset(
        fi=(nft_cases.l3(4, "all", nft_cases.R, nft_cases.c(nft_cases.Field.CT_STATE, ("NEW", "ESTABLISHED")),
                         nft_cases.c(nft_cases.Field.CT_DIRECTION, "original")), nft_cases.l3(4, "all", nft_cases.D)),
        fo=(nft_cases.l3(4, "all", nft_cases.A, nft_cases.c(nft_cases.Field.CT_STATE, ("ESTABLISHED",)),
                         nft_cases.c(nft_cases.Field.CT_DIRECTION, "reply")), nft_cases.l3(4, "all", nft_cases.D)))
    plan, records = backend.plan([PortChange(a.port, None, out_ok),
                                  PortChange(b.port, None, nft_cases.ssh_to_a(MAC_B, "10.0.0.2"))])
    run_plan(ns, plan)
    assert records[a.port]["id"] != records[b.port]["id"]
    check_connections(lab, [
        Conn("a -> b:22", "tcp", a, "10.0.0.2", 22, True),  # FI(A) returns, FO(B) accepts; replies likewise
        Conn("a -> b:80", "tcp", a, "10.0.0.2", 80, False),  # FI(A) returns, FO(B) drops
        Conn("a -> b ping", "ping", a, "10.0.0.2", expect=False),
        Conn("b -> a:22", "tcp", b, "10.0.0.1", 22, False)])  # FI(B) drops anything B starts


def test_real_traffic_reject(lab):
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24")
    # the host answers with the ICMP error, so it needs a route back to B (as with iptables REJECT)
    lab.set_bridge_address(ipv4="10.0.0.254/24")
    backend = NftablesBackend(conntrack="inet")
    rs = PortRuleset(fo=(nft_cases.l3(4, "tcp", nft_cases.X, nft_cases.c(nft_cases.Field.DPORT, nft_cases.NumRange(81, 81))),))
    plan, _ = backend.plan([PortChange(a.port, None, rs)])
    run_plan(lab.host_ns, plan)
    # a rejected connection is answered (an RST or an ICMP error), a dropped one would time out;
    # 2 s after port 80 connected is ample for the answer, which needs no more than port 80 did
    got = check_connections(lab, [Conn("b -> a:81 (reject)", "tcp", b, "10.0.0.1", 81, False),
                                  Conn("b -> a:80", "tcp", b, "10.0.0.1", 80, True)], wait=2.0)
    assert got["b -> a:81 (reject)"].outcome in ("refused", "unreachable"), got


def test_real_traffic_clean_traffic(lab):
    """clean-traffic's L2 anti-spoofing with real frames (ARP named matches, RARP raw matches)."""
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24")
    backend = NftablesBackend(conntrack="inet")
    plan, _ = backend.plan([PortChange(a.port, None, nft_cases.clean_traffic(MAC_A, ("10.0.0.1",)))])
    run_plan(lab.host_ns, plan)
    bcast = "ff:ff:ff:ff:ff:ff"

    def arp(src_mac, hwsrc, psrc, op=1):
        return Ether(src=src_mac, dst=bcast) / ARP(op=op, hwsrc=hwsrc, psrc=psrc, pdst="10.0.0.2")

    def rarp(src_mac, sha, tha, dst=bcast):
        return Ether(src=src_mac, dst=dst, type=0x8035) / ARP(op=3, hwsrc=sha, hwdst=tha, psrc="0.0.0.0",
                                                              pdst="0.0.0.0")

    assert lab.ping(a, "10.0.0.2") and lab.tcp_connect(b, "10.0.0.1", 80)  # no L3 rules
    P = lambda name, src, frame, dst, expect: Probe(name, src, bytes(frame), dst, expect)  # noqa: E731
    ip = lambda src_ip: Ether(src=MAC_A, dst=MAC_B) / IP(src=src_ip, dst="10.0.0.2") / ICMP()  # noqa: E731
    check_frames(lab, [
        P("a's ARP", a, arp(MAC_A, MAC_A, "10.0.0.1"), b, True),
        P("ARP, other sender IP (arp-ip)", a, arp(MAC_A, MAC_A, "10.0.0.9"), b, False),
        P("ARP, other sender MAC (arp-mac)", a, arp(MAC_A, SPOOFED, "10.0.0.1"), b, False),
        P("ARP, other source MAC (mac)", a, arp(SPOOFED, MAC_A, "10.0.0.1"), b, False),
        P("a's IPv4", a, ip("10.0.0.1"), b, True),
        P("IPv4, other source IP (ipv4-ip)", a, ip("10.0.0.9"), b, False),
        P("qemu's announce-self RARP", a, rarp(MAC_A, MAC_A, MAC_A), b, True),
        P("RARP, other sender MAC", a, rarp(MAC_A, MAC_B, MAC_A), b, False),
        P("other ethertype (final drop)", a, Ether(src=MAC_A, dst=MAC_B, type=0x88B5) / (b"x" * 46), b, False),
        # to A: RARP only the announce shape (raw payload matches on the to-VM side too)
        P("announce RARP to a", b, rarp(MAC_B, MAC_A, MAC_A), a, True),
        P("RARP to a, other sender MAC", b, rarp(MAC_B, MAC_B, MAC_A), a, False),
        P("other ethertype to a (final drop)", b, Ether(src=MAC_B, dst=MAC_A, type=0x88B5) / (b"x" * 46), a, False)])


def test_change_batch_is_the_same_with_many_ports(lab):
    """The batch of a change of one port is the same text with 0 or 500 other ports present
    (nothing of the others is read, listed or rewritten), and the kernel takes it: a change of
    shape (a new generation) and one of the same shape (refilled in place). What the change costs
    with many ports is measured in bench/ (the nft process alone, 0 and 1000 present)."""
    ns = lab.host_ns
    backend = NftablesBackend(conntrack="inet")
    records: dict = {}

    def ids(but: str = "") -> list[int]:
        return [r["id"] for p, r in records.items() if p != but and r["id"] is not None]

    def change(port: str, ruleset) -> str:
        plan, new = backend.plan([PortChange(port, records.get(port), ruleset)], ids(port))
        run_plan(ns, plan)
        records.update(new)
        return plan.apply[0].stdin

    change("tap0", nft_cases.clean_traffic())
    alone = [change("tap0", nft_cases.root_only()), change("tap0", nft_cases.root_only())]
    for start in range(1, 501, 250):
        plan, new = backend.plan([PortChange(f"vnet{i}", None, nft_cases.clean_traffic())
                                  for i in range(start, start + 250)], ids())
        run_plan(ns, plan)
        records.update(new)
    change("tap0", nft_cases.clean_traffic())
    crowded = [change("tap0", nft_cases.root_only()), change("tap0", nft_cases.root_only())]

    def normal(text: str) -> str:
        return re.sub(r"generation \d+", "generation N", re.sub(r"-\d+/", "-N/", text))

    assert [normal(text) for text in crowded] == [normal(text) for text in alone]
    assert "refilled in place" not in crowded[0] and "refilled in place" in crowded[1]
    text = listing(ns, "bridge", shard_of("tap0"))
    assert records["tap0"]["gen"] == 4 and '"tap0" : jump I-4/tap0' in text and "I-3/tap0" not in text


def test_switching_conntrack_mode_keeps_working(lab):
    """Records remember their mode: a port rendered in the inet mode can be replaced by the
    bridge-mode backend (its inet objects are removed from the inet table) and back."""
    ns = lab.host_ns
    inet, bridge = NftablesBackend(conntrack="inet"), NftablesBackend(conntrack="bridge")
    plan, records = inet.plan([PortChange("vp1", None, nft_cases.l3_no_ct())], [])
    run_plan(ns, plan)
    plan, records = bridge.plan([PortChange("vp1", records["vp1"], nft_cases.l3_no_ct())], [])
    run_plan(ns, plan)
    assert records["vp1"]["mode"] == "bridge" and records["vp1"]["id"] is None
    assert {c.split()[0] for c in chains(ns)} == {"bridge"}
    assert "jump" not in listing(ns, "inet", shard_of("vp1")).split("chain l3-fwd")[0]
    plan, records = inet.plan([PortChange("vp1", records["vp1"], nft_cases.l3_no_ct())], [])
    run_plan(ns, plan)
    assert {c.split()[0] for c in chains(ns)} == {"bridge", "inet"}
    assert 'jump FI-3/vp1' in listing(ns, "inet", shard_of("vp1"))

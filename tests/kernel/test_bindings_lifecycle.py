"""Binding lifecycle on real ports: delete restores traffic, refusals change nothing, other
people's firewall objects survive byte-identical, and 20 concurrent ``binding-create`` processes
all land. The CLI runs inside the lab's host namespace, once per backend.
"""

from __future__ import annotations

import re

from bindings_helpers import (  # noqa: F401  (fixtures)
    IP_A, IP_B, MAC_A, MAC_B, SPOOF_MAC, arp_request, backend, cli, raw, dispatch_entries,
    filter_xml, ip_frame, kernel_snapshot, nft_json, pair,
)
from traffic import Conn, Probe, check_connections, check_frames

BOTH = filter_xml("nwft-both", "\n".join([
    "<filterref filter='clean-traffic'/>",
    "<rule action='drop' direction='inout' priority='100'><tcp dstportstart='80'/></rule>",
]))


def spoof_probes(a, b, expect: bool):
    """Spoofed frames (delivered only when ``expect``), and their genuine twin (always)."""
    return [Probe("spoofed MAC", a, ip_frame(SPOOF_MAC, MAC_B, IP_A, IP_B), b, expect),
            Probe("spoofed IP", a, ip_frame(MAC_A, MAC_B, "10.0.0.9", IP_B), b, expect),
            Probe("ARP lie", a, arp_request(MAC_A, "10.0.0.9", IP_B), b, expect),
            Probe("genuine", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B), b, True)]


def port_80(a, b, open_: bool):
    """b -> a:80 (dropped by nwft-both unless ``open_``) and its twin b -> a:81."""
    return [Conn("b -> a:80", "tcp", b, IP_A, 80, open_), Conn("b -> a:81", "tcp", b, IP_A, 81, True)]


def mentions_port(snapshot: dict[str, str], port: str) -> list[str]:
    pattern = re.compile(rf"(?<!\w){re.escape(port)}(?!\w)")
    return [f"{key}: {line.strip()}" for key, text in snapshot.items() for line in text.splitlines()
            if pattern.search(line)]


def test_delete_restores_traffic(lab, cli, pair):
    a, b = pair
    cli.define(BOTH)
    before = kernel_snapshot(lab.host_ns)
    shown = cli.run("render", cli.binding_file(a.port, a.mac, "nwft-both", {"IP": IP_A})).stdout
    assert a.port in shown and kernel_snapshot(lab.host_ns) == before, "render must not apply anything"
    assert cli.binding_ports() == []
    cli.binding_create(a.port, a.mac, "nwft-both", {"IP": IP_A})
    assert cli.binding_ports() == [a.port]
    dumped = cli.run("binding-dumpxml", a.port).stdout
    for fragment in (f"<portdev name='{a.port}'/>", "<filterref filter='nwft-both'>",
                     f"<parameter name='IP' value='{IP_A}'/>", f"<parameter name='MAC' value='{MAC_A}'/>"):
        assert fragment in dumped, dumped
    check_frames(lab, spoof_probes(a, b, False), context="with the binding")
    check_connections(lab, port_80(a, b, False), context="with the binding")

    assert mentions_port(kernel_snapshot(lab.host_ns), a.port), "the port's rules are not visible"
    done = cli.binding_delete(a.port)
    assert done.stderr == ""
    assert cli.binding_ports() == []
    check_frames(lab, spoof_probes(a, b, True), context="after binding-delete")
    check_connections(lab, port_80(a, b, True), context="after binding-delete")
    left = mentions_port(kernel_snapshot(lab.host_ns), a.port)
    assert not left, "rules of the deleted port are left:\n" + "\n".join(left)
    # deleting again is refused (one line), and a new binding works
    again = cli.binding_delete(a.port, check=False)
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    cli.binding_create(a.port, a.mac, "clean-traffic", {"IP": IP_A})
    check_frames(lab, spoof_probes(a, b, False), context="after re-creating")


REFUSALS = {
    "missing-variable": ("clean-traffic", {}, "IP"),
    "unknown-filter": ("nwft-no-such-filter", {"IP": IP_A}, "nwft-no-such-filter"),
    "bad-ip-value": ("clean-traffic", {"IP": [IP_A, "10.0.0.300"]}, "10.0.0.300"),
    "bad-mac-value": ("clean-traffic-gateway", {"IP": IP_A, "GATEWAY_MAC": "52:54:00:zz:00:01"},
                      "52:54:00:zz:00:01"),
    "missing-in-referenced": ("nwft-needs-var", {}, "NWFT_PORTS"),
}


def test_refusals_change_nothing(lab, cli, pair):
    """Each refused binding-create (REFUSALS) exits 1 with one line naming the problem and
    leaves the kernel (nft ruleset, ebtables/iptables/ip6tables) and the binding list as they
    were: first in a fresh namespace, then next to an existing binding. Every case is tried;
    the failures are reported together."""
    a, b = pair
    cli.define(filter_xml("nwft-needs-var", "<filterref filter='allow-arp'/>\n"
                          "<rule action='drop' direction='in' priority='500'>"
                          "<tcp dstportstart='$NWFT_PORTS'/></rule>"))
    problems: list[str] = []

    def attempt(stage: str, case: str, before: dict, listed: list) -> None:
        filter_name, params, mentioned = REFUSALS[case]
        where = f"{case} ({stage})"
        proc = cli.binding_create(a.port, a.mac, filter_name, params, check=False)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        if proc.returncode != 1:
            problems.append(f"{where}: exit {proc.returncode}: {lines}")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"{where}: not one 'error:' line: {lines}")
        elif mentioned not in lines[0] or "internal error" in lines[0]:
            problems.append(f"{where}: {lines[0]!r} does not name {mentioned!r}")
        after = kernel_snapshot(lab.host_ns)
        problems.extend(f"{where}: {key} changed" for key in before if after[key] != before[key])
        if list(cli.rundir.glob(f"**/*{a.port}*")):
            problems.append(f"{where}: state written for {a.port}")

    before = kernel_snapshot(lab.host_ns)
    for case in REFUSALS:
        attempt("fresh namespace", case, before, [])
    if cli.binding_ports() != []:
        problems.append("fresh namespace: binding-list is not empty")
    cli.define(BOTH)
    cli.binding_create(b.port, b.mac, "nwft-both", {"IP": IP_B})
    before = kernel_snapshot(lab.host_ns)
    for case in REFUSALS:
        attempt("next to a binding", case, before, [b.port])
    if cli.binding_ports() != [b.port]:
        problems.append(f"next to a binding: binding-list is not [{b.port}]")
    assert not problems, "\n".join(problems)
    check_frames(lab, spoof_probes(a, b, True), context="nothing applied on the refused port")
    # a port that has a binding refuses a second one and keeps its rules
    before = kernel_snapshot(lab.host_ns)
    proc = cli.binding_create(b.port, b.mac, "no-other-l2-traffic", check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "vp2" in proc.stderr, proc.stderr
    assert kernel_snapshot(lab.host_ns) == before
    assert cli.binding_ports() == [b.port]


FOREIGN_NFT = """\
table inet nwft_foreign {
	set allowed {
		type ipv4_addr
		elements = { 192.0.2.1, 192.0.2.7 }
	}

	chain forwarding {
		type filter hook forward priority 10; policy accept;
		ip saddr @allowed accept comment "not ours"
		meta l4proto tcp tcp dport 9 drop
	}
}
table bridge nwft_foreign_br {
	chain pre {
		type filter hook prerouting priority -400; policy accept;
		ether type 0x88b7 drop
	}
}
"""


def foreign_view(lab) -> dict[str, str]:
    return {
        "inet": lab.host_run(["nft", "list", "table", "inet", "nwft_foreign"]).stdout,
        "bridge": lab.host_run(["nft", "list", "table", "bridge", "nwft_foreign_br"]).stdout,
        "ebtables": lab.host_run(["ebtables", "-t", "nat", "-L", "NWFT-FOREIGN"]).stdout,
        "iptables": lab.host_run(["iptables", "-S", "NWFT-FOREIGN"]).stdout,
    }


def test_foreign_objects_survive_everything(lab, cli, pair):
    """Tables, chains and rules of others (nftables tables, an ebtables chain in ``nat``, an
    iptables chain) stay byte-identical through create, refusal, re-create and delete."""
    a, b = pair
    lab.nft(FOREIGN_NFT)
    lab.host_run(["ebtables", "-t", "nat", "-N", "NWFT-FOREIGN"])
    lab.host_run(["ebtables", "-t", "nat", "-A", "NWFT-FOREIGN", "-p", "0x88b8", "-j", "DROP"])
    lab.host_run(["iptables", "-N", "NWFT-FOREIGN"])
    lab.host_run(["iptables", "-A", "NWFT-FOREIGN", "-p", "udp", "--dport", "9", "-j", "DROP"])
    original = foreign_view(lab)
    assert "not ours" in original["inet"] and "0x88b8" in original["ebtables"].lower()

    def same(step: str) -> None:
        now = foreign_view(lab)
        for key in original:
            assert now[key] == original[key], f"after {step}: foreign {key} changed:\n{now[key]}"

    cli.define(BOTH)
    cli.binding_create(a.port, a.mac, "nwft-both", {"IP": IP_A})
    same("binding-create with L2 and L3 rules")
    cli.binding_create(b.port, b.mac, "clean-traffic", {"IP": IP_B})
    same("second binding-create")
    assert cli.binding_create(a.port, a.mac, "clean-traffic", check=False).returncode == 1
    same("a refused binding-create")
    cli.binding_delete(a.port)
    same("binding-delete")
    cli.binding_create(a.port, a.mac, "nwft-both", {"IP": IP_A})
    same("re-create")
    check_connections(lab, port_80(a, b, False), context="re-created")
    cli.binding_delete(a.port)
    cli.binding_delete(b.port)
    same("deleting every binding")
    assert cli.binding_ports() == []
    check_connections(lab, port_80(a, b, True), context="every binding deleted")


N_PARALLEL = 20
L3_FILTER = filter_xml("nwft-par-l3", "\n".join([
    "<filterref filter='no-mac-spoofing'/>",
    "<rule action='accept' direction='out' priority='100'><tcp dstportstart='22'/></rule>",
    "<rule action='drop' direction='inout' priority='1000'><all/></rule>",
]))


def test_parallel_binding_create(lab, cli):
    """20 binding-create processes started at once on 20 ports (half with L3 rules, which need a
    port id each) all succeed; binding-list shows 20 and the kernel dispatches all 20 ports;
    20 parallel binding-delete processes remove them all again."""
    ports = [f"pp{i}" for i in range(N_PARALLEL)]
    batch = "".join(f"link add {p} type veth peer name {p}x\nlink set {p} master br0\nlink set {p} up\n"
                    for p in ports)
    lab.host_run(["ip", "-batch", "-"], input=batch)
    cli.define(L3_FILTER)
    files = []
    for i, port in enumerate(ports):
        mac = f"52:54:00:00:10:{i:02x}"
        if i % 2:
            files.append(cli.binding_file(port, mac, "nwft-par-l3"))
        else:
            files.append(cli.binding_file(port, mac, "clean-traffic", {"IP": f"10.0.1.{i + 1}"}))
    procs = [cli.popen("binding-create", f) for f in files]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    failed = [f"{port}: exit {rc}: {err.strip()}" for port, (rc, _, err) in zip(ports, results) if rc != 0]
    assert not failed, "\n".join(failed)
    assert sorted(cli.binding_ports()) == sorted(ports)
    assert dispatch_entries(lab.host_ns, cli.backend) == set(ports)
    if cli.backend == "nftables":
        ids = [elem[0] for item in nft_json(lab.host_ns) if (m := item.get("map"))
               and m.get("family") == "inet" and m.get("name") == "port_ids" for elem in m.get("elem", [])]
        assert len(ids) == len(set(ids)) == N_PARALLEL // 2, ids
    else:
        rules = lab.host_run(["iptables", "-S", "nwf-in-post"]).stdout
        assert sorted(re.findall(r"--physdev-in (\S+) -j ACCEPT", rules)) == sorted(ports[1::2]), rules

    procs = [cli.popen("binding-delete", p) for p in ports]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    failed = [f"{port}: exit {rc}: {err.strip()}" for port, (rc, err) in zip(ports, results) if rc != 0]
    assert not failed, "\n".join(failed)
    assert cli.binding_ports() == []
    assert dispatch_entries(lab.host_ns, cli.backend) == set()
    left = [line for port in ports for line in mentions_port(kernel_snapshot(lab.host_ns), port)]
    assert not left, "\n".join(left)


def x_filter(body: str) -> str:
    return filter_xml("nwft-x", body)


def test_redefine_switches_every_binding_or_none(lab, cli, pair):
    """Redefining a filter in use re-instantiates every binding that uses it; a definition that
    one binding cannot instantiate (missing variable) is refused with one line, and every port
    keeps its old rules (semantics.md §9.3)."""
    a, b = pair
    drop_b5 = "<rule action='drop' direction='out' priority='100'><mac protocolid='0x88b5'/></rule>"
    drop_b6 = "<rule action='drop' direction='out' priority='100'><mac protocolid='0x88b6'/></rule>"
    needs = "<rule action='drop' direction='out' priority='100'><ip srcipaddr='$NEEDED'/></rule>"
    cli.define(x_filter(drop_b5))
    cli.binding_create(a.port, a.mac, "nwft-x")
    cli.binding_create(b.port, b.mac, "nwft-x", {"NEEDED": "10.0.0.9"})

    def probes(b5: bool):
        return [Probe(f"{vm.name} 0x88b5", vm, raw(vm.mac, peer.mac, 0x88B5), peer, b5)
                for vm, peer in ((a, b), (b, a))] + \
               [Probe(f"{vm.name} 0x88b6", vm, raw(vm.mac, peer.mac, 0x88B6), peer, not b5)
                for vm, peer in ((a, b), (b, a))]

    check_frames(lab, probes(b5=False), context="first definition")
    cli.define(x_filter(drop_b6))
    check_frames(lab, probes(b5=True), context="after redefining: both ports switched")
    before, stored = kernel_snapshot(lab.host_ns), cli.run("dumpxml", "nwft-x").stdout
    proc = cli.define(x_filter(needs), check=False)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "NEEDED" in lines[0], lines
    assert kernel_snapshot(lab.host_ns) == before
    assert cli.run("dumpxml", "nwft-x").stdout == stored
    check_frames(lab, probes(b5=True), context="after a refused redefinition")


def test_same_port_race_and_delete_after_the_port_vanished(lab, cli, pair):
    """Four concurrent binding-create on one port: exactly one wins, the others are refused with
    one line; after the VM (and its port) is gone, binding-delete still removes the binding."""
    a, b = pair
    f = cli.binding_file(a.port, a.mac, "clean-traffic", {"IP": IP_A})
    procs = [cli.popen("binding-create", f) for _ in range(4)]
    # (a wait of more than 2 s for the lock on a loaded machine adds one notice line naming the holder)
    results = [(p.wait(timeout=120), "\n".join(line for line in p.stderr.read().strip().splitlines()
                                               if "for the lock" not in line)) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1, 1, 1], results
    assert all(len(err.splitlines()) == 1 and "already exists" in err for rc, err in results if rc), results
    assert cli.binding_ports() == [a.port]
    assert dispatch_entries(lab.host_ns, cli.backend) == {a.port}
    check_frames(lab, spoof_probes(a, b, False))

    port = a.port
    lab.remove_vm("a")
    cli.binding_delete(port)
    assert cli.binding_ports() == []
    left = mentions_port(kernel_snapshot(lab.host_ns), port)
    assert not left, "\n".join(left)

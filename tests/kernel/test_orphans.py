"""Kernel objects of ours that no record names (orphans), and records lost by hand. Real kernel,
real frames, both backends side by side (each in a lab of its own, tests/crashlab.py).

The lab: VM ``a`` on vp1 (clean-traffic, its address), VM ``b`` on vp2 (clean-traffic and an
L3 rule dropping UDP to port 9, so the L3 side of each backend is in use), VM ``c`` on vp3 with
no binding, an unfiltered peer on vp4.

* Orphans made by hand: a chain of a port without record dispatched from the L2 map / PREROUTING
  (it drops vp3's traffic: a real effect), a dispatch entry and a mark id / ``nwf-in-post``
  ACCEPT of a port that does not exist, and leftovers of a recorded port (nftables: a chain of an
  older generation; ebiptables: a temporary chain linked after the final one and a sub-chain).
  ``verify`` exits 1 with one line per port naming each object; ``reapply`` removes them (vp3's
  traffic flows again), ``verify`` passes, and the recorded ports' rules are what they were
  (generation numbers aside) with the same verdicts for real frames.
* A record deleted by hand, then ``binding-create`` on the port with another address: the old
  address never passes. Twice: with the leftover chains bearing the names the new binding uses
  (nftables: flushed by the change itself; ebiptables: ``-N`` refuses, the rebuild removes
  them), and after a ``reapply`` moved the lost rules to another generation (nftables: the
  dispatch element holds another verdict, ``add element`` refuses, the rebuild removes them).
"""

from __future__ import annotations

import time

from bindings_helpers import IP_A, IP_A2, IP_B, MAC_A, MAC_B, Cli, filter_xml, ip_frame, kernel_snapshot
from crashlab import normalized, side_by_side
import netlab
from traffic import Probe, check_frames
from libvirt_nwfilter.backends.nftables.names import IDS_TABLE, shard_of

MAC_C, IP_C = "52:54:00:00:00:03", "10.0.0.4"
PEER_MAC, PEER_IP = "52:54:00:00:01:99", "10.0.0.99"
SPOOF = "10.0.0.77"
L3_FILTER = filter_xml("orphan-l3", "<filterref filter='clean-traffic'/>"
                                    "<rule action='drop' direction='out' priority='500'><udp dstportstart='9'/></rule>")


def udp_probe(name: str, vm, peer, source: str, port: int, expect: bool) -> Probe:
    return Probe(name, vm, ip_frame(vm.mac, peer.mac, source, PEER_IP, "udp", dport=port), peer, expect)


def recorded_probes(vms: dict) -> list[Probe]:
    """The recorded ports' verdicts: each address passes, a spoofed one and b's UDP to 9 do not."""
    a, b, peer = vms["a"], vms["b"], vms["p"]
    return [udp_probe("a, its address", a, peer, IP_A, 7, True), udp_probe("a, spoofed", a, peer, SPOOF, 7, False),
            udp_probe("b, its address", b, peer, IP_B, 7, True), udp_probe("b, spoofed", b, peer, SPOOF, 7, False),
            udp_probe("b, to port 9", b, peer, IP_B, 9, False)]


def nft(ns: str, script: str) -> None:
    netlab.run_in(ns, ["nft", "-f", "-"], input=script)


def make_nft_orphans(ns: str) -> dict[str, list[str]]:
    """Orphans in the ports' shards (made first where no binding made them, vp3's with its
    dispatch, so that its traffic meets the orphan) and the id registry."""
    t3, t7, t1, ids = shard_of("vp3"), shard_of("vp7"), shard_of("vp1"), IDS_TABLE
    nft(ns, "".join(f"add table bridge {t}\nadd map bridge {t} {m} {{ type ifname : verdict; }}\n"
                    for t, m in ((t3, "l2_from_vm"), (t7, "l2_to_vm"), (t1, "l2_from_vm")))
            + f"add chain bridge {t3} l2-from-vm {{ type filter hook prerouting priority -300; policy accept; }}\n"
            f"flush chain bridge {t3} l2-from-vm\nadd rule bridge {t3} l2-from-vm iifname vmap @l2_from_vm\n"
            f"add table inet {ids}\nadd map inet {ids} port_ids {{ type mark : ifname; }}\n"
            f"add chain bridge {t3} I-9/vp3\nadd rule bridge {t3} I-9/vp3 drop\n"
            f'add element bridge {t3} l2_from_vm {{ "vp3" : jump I-9/vp3 }}\n'
            f'add element bridge {t7} l2_to_vm {{ "vp7" : accept }}\n'
            f'add element inet {ids} port_ids {{ 0x00000009 : "vp7" }}\n'
            f"add chain bridge {t1} I-1/vp1\nadd rule bridge {t1} I-1/vp1 accept\n")
    return {"vp3": ["chain bridge I-9/vp3", 'element bridge l2_from_vm "vp3"'],
            "vp7": ['element bridge l2_to_vm "vp7"', "element inet port_ids 0x00000009"],
            "vp1": ["chain bridge I-1/vp1"]}


def make_eb_orphans(ns: str) -> dict[str, list[str]]:
    netlab.run_in(ns, ["ebtables-restore", "--noflush"],
                  input="*nat\n:nwf-I-vp3 ACCEPT\n-A nwf-I-vp3 -j DROP\n-A PREROUTING -i vp3 -j nwf-I-vp3\n"
                        ":nwf-J-vp1 ACCEPT\n-A nwf-J-vp1 -j DROP\n-A PREROUTING -i vp1 -j nwf-J-vp1\n"
                        ":NI-vp1:old ACCEPT\n-A NI-vp1:old -j ACCEPT\n")
    netlab.run_in(ns, ["iptables", "-w", "-A", "nwf-in-post", "-m", "physdev", "--physdev-in", "vp7", "-j", "ACCEPT"])
    return {"vp3": ["ebtables chain nwf-I-vp3", "ebtables rule '-A PREROUTING -i vp3 -j nwf-I-vp3'"],
            "vp7": ["iptables rule '-A nwf-in-post -m physdev --physdev-in vp7 -j ACCEPT'"],
            "vp1": ["ebtables chain nwf-J-vp1", "ebtables chain NI-vp1:old",
                    "ebtables rule '-A PREROUTING -i vp1 -j nwf-J-vp1'"]}


def lab_vms(lab) -> dict:
    return {"a": lab.add_vm("a", MAC_A, ipv4=f"{IP_A}/24"), "b": lab.add_vm("b", MAC_B, ipv4=f"{IP_B}/24"),
            "c": lab.add_vm("c", MAC_C, ipv4=f"{IP_C}/24"), "p": lab.add_vm("p", PEER_MAC, ipv4=f"{PEER_IP}/24")}


def orphans_named_and_removed(lab, cli: Cli) -> str:
    started = time.monotonic()
    vms = lab_vms(lab)
    cli.define(L3_FILTER)
    cli.binding_create("vp1", MAC_A, "clean-traffic", {"IP": IP_A})
    cli.binding_create("vp2", MAC_B, "orphan-l3", {"IP": IP_B})
    cli.run("reapply")  # the recorded ports move to generation 2: generation 1 is an old one
    c, peer = vms["c"], vms["p"]
    c_traffic = udp_probe("c, no binding", c, peer, IP_C, 7, True)
    check_frames(lab, recorded_probes(vms) + [c_traffic], context=f"[{cli.backend}] before the orphans")
    intact = normalized(kernel_snapshot(cli.ns))

    expected = (make_nft_orphans if cli.backend == "nftables" else make_eb_orphans)(lab.host_ns)
    check_frames(lab, recorded_probes(vms) + [udp_probe("c, no binding", c, peer, IP_C, 7, False)],
                 context=f"[{cli.backend}] with the orphans (vp3's traffic meets an orphan chain)")
    done = cli.run("verify", check=False)
    report = f"[{cli.backend}] verify exited {done.returncode}\n{done.stdout}{done.stderr}"
    assert done.returncode == 1, report
    for port, phrases in expected.items():
        lines = [line for line in done.stdout.splitlines()
                 if line.startswith(f"{port}: ") and "'reapply' removes them" in line]
        assert lines and all(phrase in lines[0] for phrase in phrases), f"{report}\n{port}: {phrases}"
        if port != "vp1":
            assert "no binding record" in lines[0], report

    cli.run("reapply")
    verified = cli.run("verify", check=False)
    assert verified.returncode == 0, f"[{cli.backend}] after reapply:\n{verified.stdout}{verified.stderr}"
    assert normalized(kernel_snapshot(cli.ns)) == intact, f"[{cli.backend}] the recorded ports' rules changed"
    check_frames(lab, recorded_probes(vms) + [c_traffic], context=f"[{cli.backend}] after reapply")
    return (f"[{cli.backend}] {sum(map(len, expected.values()))} orphans named by verify and removed by reapply, "
            f"{time.monotonic() - started:.1f} s:\n  " + "\n  ".join(done.stdout.splitlines()))


def test_orphans_are_named_by_verify_and_removed_by_reapply(lab, tmp_path):
    side_by_side(lab, tmp_path, orphans_named_and_removed)


def lost_record_never_lets_the_old_address_through(lab, cli: Cli) -> str:
    started = time.monotonic()
    vms = lab_vms(lab)
    a, peer = vms["a"], vms["p"]
    record = cli.rundir / "bindings" / "vp1.json"

    def only(address: str, old: str, context: str) -> None:
        check_frames(lab, [udp_probe(f"a, {address} (new)", a, peer, address, 7, True),
                           udp_probe(f"a, {old} (old)", a, peer, old, 7, False)], context=f"[{cli.backend}] {context}")

    def create_after_losing_the_record(address: str, old: str, context: str) -> str:
        record.unlink()
        done = cli.run("--debug", "binding-create", cli.binding_file("vp1", MAC_A, "clean-traffic", {"IP": address}))
        only(address, old, context)
        verified = cli.run("verify", check=False)
        assert verified.returncode == 0, f"[{cli.backend}] {context}: {verified.stdout}{verified.stderr}"
        return "rebuilt" if "retrying as one rebuild of every binding" in done.stderr else "changed"

    cli.binding_create("vp1", MAC_A, "clean-traffic", {"IP": IP_A})
    only(IP_A, IP_A2, "first binding")
    same_names = create_after_losing_the_record(IP_A2, IP_A, "record lost, leftovers of the same names")
    cli.run("reapply")
    other_gen = create_after_losing_the_record(IP_A, IP_A2, "record lost after reapply")
    # how each backend got there (the frames above are what counts)
    expected = ("changed", "rebuilt") if cli.backend == "nftables" else ("rebuilt", "rebuilt")
    assert (same_names, other_gen) == expected, f"[{cli.backend}] {(same_names, other_gen)}"
    return (f"[{cli.backend}] lost record, new address: {same_names} (same names), {other_gen} (after reapply), "
            f"{time.monotonic() - started:.1f} s")


def test_a_record_lost_never_lets_the_old_address_through(lab, tmp_path):
    side_by_side(lab, tmp_path, lost_record_never_lets_the_old_address_through)

"""nftables shards in a real kernel: the tables of earlier versions, and L3 across shards.

* Upgrade: a port's rules left by an earlier version in the single table ``libvirt_nwfilter``
  (made here from our own rules with the table names folded into it: one port, so one shard and
  the id registry, which hold no name in common) keep filtering; ``verify`` names the port; a
  new binding goes into its shard beside it; the next change of the old port (its removal) is
  refused by the kernel and retried as a rebuild of every binding, after which the single table
  is gone; bound again, ``verify`` passes and real frames get the same verdicts.
* A guest on one shard talking to a guest on another: the source port's FI (forward priority 0
  of its shard) and the destination port's FO (priority 1 of the other) both apply.
"""

from __future__ import annotations

import re

from bindings_helpers import IP_A, IP_B, MAC_A, MAC_B, Cli, filter_xml, ip_frame
from traffic import Probe, check_frames
from libvirt_nwfilter.backends.nftables.names import LEGACY_TABLE, shard_of

PEER_MAC, PEER_IP = "52:54:00:00:01:99", "10.0.0.99"
SPOOF = "10.0.0.77"
L3_FILTER = filter_xml("shard-l3", "<filterref filter='clean-traffic'/>"
                                   "<rule action='drop' direction='out' priority='500'><udp dstportstart='9'/></rule>"
                                   "<rule action='drop' direction='in' priority='500'><udp dstportstart='8'/></rule>")


def udp(name: str, vm, to, source: str, dest: str, port: int, expect: bool) -> Probe:
    return Probe(name, vm, ip_frame(vm.mac, to.mac, source, dest, "udp", dport=port), to, expect)


def our_tables(lab) -> set[str]:
    text = lab.host_run(["nft", "list", "tables"]).stdout
    return {line.split()[-1] for line in text.splitlines() if "libvirt_nwfilter" in line}


def test_a_port_left_in_the_former_single_table_keeps_working_until_its_next_change(lab, tmp_path):
    assert shard_of("vp1") != shard_of("vp2")
    a, b = lab.add_vm("a", MAC_A, ipv4=f"{IP_A}/24"), lab.add_vm("b", MAC_B, ipv4=f"{IP_B}/24")
    peer = lab.add_vm("p", PEER_MAC, ipv4=f"{PEER_IP}/24")
    cli = Cli(lab.host_ns, tmp_path, "nftables")
    cli.define(L3_FILTER)
    cli.binding_create("vp2", MAC_B, "shard-l3", {"IP": IP_B})
    b_probes = [udp("b, its address", b, peer, IP_B, PEER_IP, 7, True),
                udp("b, spoofed", b, peer, SPOOF, PEER_IP, 7, False),
                udp("b, to port 9", b, peer, IP_B, PEER_IP, 9, False)]
    check_frames(lab, b_probes, context="sharded")

    ours = lab.host_run(["nft", "list", "ruleset"]).stdout
    folded = re.sub(r"\blibvirt_nwfilter_(?:\d|ids)\b", LEGACY_TABLE, ours)
    lab.nft("flush ruleset\n" + folded)
    assert our_tables(lab) == {LEGACY_TABLE}
    check_frames(lab, b_probes, context="in the former single table")
    verified = cli.run("verify", check=False)
    assert verified.returncode == 1 and "vp2" in verified.stdout, verified.stdout + verified.stderr

    cli.binding_create("vp1", MAC_A, "shard-l3", {"IP": IP_A})  # a new port: its shard, beside
    assert our_tables(lab) == {LEGACY_TABLE, shard_of("vp1"), "libvirt_nwfilter_ids"}
    a_probes = [udp("a, its address", a, peer, IP_A, PEER_IP, 7, True),
                udp("a, spoofed", a, peer, SPOOF, PEER_IP, 7, False)]
    check_frames(lab, a_probes + b_probes, context="old and new side by side")

    removed = cli.run("--debug", "binding-delete", "vp2")  # the old port's next change
    assert "retrying as one rebuild of every binding" in removed.stderr, removed.stderr
    assert our_tables(lab) == {shard_of("vp1"), "libvirt_nwfilter_ids"}
    cli.binding_create("vp2", MAC_B, "shard-l3", {"IP": IP_B})
    assert cli.run("verify", check=False).returncode == 0
    check_frames(lab, a_probes + b_probes, context="after the rebuild")


def test_l3_rules_of_two_ports_in_different_shards_both_apply(lab, tmp_path):
    """a (vp1) and b (vp2) sit in different shards: a frame from a to b meets a's FI (UDP to 9
    dropped on the way out of a) and b's FO (UDP to 8 dropped on the way into b)."""
    assert shard_of("vp1") != shard_of("vp2")
    a, b = lab.add_vm("a", MAC_A, ipv4=f"{IP_A}/24"), lab.add_vm("b", MAC_B, ipv4=f"{IP_B}/24")
    cli = Cli(lab.host_ns, tmp_path, "nftables")
    cli.define(L3_FILTER)
    cli.binding_create("vp1", MAC_A, "shard-l3", {"IP": IP_A})
    cli.binding_create("vp2", MAC_B, "shard-l3", {"IP": IP_B})
    check_frames(lab, [udp("a to b, port 7", a, b, IP_A, IP_B, 7, True),
                       udp("a to b, port 9 (a's FI)", a, b, IP_A, IP_B, 9, False),
                       udp("a to b, port 8 (b's FO)", a, b, IP_A, IP_B, 8, False),
                       udp("b to a, port 8 (a's FO)", b, a, IP_B, IP_A, 8, False),
                       udp("b to a, port 7", b, a, IP_B, IP_A, 7, True)], context="across shards")

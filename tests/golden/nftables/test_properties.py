"""Hand-written checks of nftables golden files against the spec (shared spec: semantics.md).

The golden test compares the renderer's output with the committed files, so a file regenerated
from a wrong renderer would pass it. These tests read the committed files with a few lines of
their own and check, rule by rule, the properties the spec fixes; the expected rules were
written by hand from the spec, not copied from a rendering. Reviewed this way:

* ``clean_traffic``: libvirt's clean-traffic layout (§3.1): the from-VM and to-VM root chains
  in order (the sub-chain jumps placed by priority among the root rules), every anti-spoofing
  sub-chain (MAC, IPv4 source with the DHCP exception, ARP sender MAC and IP, RARP announce),
  falling off a sub-chain accepts (§4), dispatch from prerouting by ``iifname`` and from
  postrouting by ``oifname`` (§14.1, §14.3);
* ``clean_traffic_two_ips``: every value of ``IP`` returns before the drop (§3.1);
* ``ssh_to_a``: implicit state matching of an ``in`` accept rule (§6.2, §6.4) in FI, FO and
  HI, and the mark plumbing that tells the ports apart in the inet family (§14.2); FI and FO
  dispatched from two base chains of the forward hook, FI's at the lower priority;
* ``root_only``: the actions in a root chain (§5): ``continue`` a rule without a verdict,
  ``return`` leaves the port's chain, a negated MAC match;
* ``l3_only_fo``: a port with to-VM L3 rules only gets its FO chain, selected by the egress mark
  its MO chain sets, and no from-VM chain or dispatch entry (§14.2);
* ``l2_every_field``: every L2 field as nft expressions (§14.5): masked MACs compared after the
  mask, VLAN id and type, ARP fields with the header lengths they need, RARP fields as raw
  offsets of the ARP header (nft's ``arp`` expressions imply ethertype ARP), ports with their
  protocol, ICMPv6 type/code ranges (a negated pair as a concatenation);
* ``l3_every_field_v4``: every IPv4 L3 field as nft expressions (§14.5), ``connlimit-above``
  as a per-source ``ct count`` set per rule and copy (§6.6), ICMP type 255 as iptables' "any"
  type (no type match; negated, the rule can never match and is left out), ``continue`` as a
  rule without a verdict (R1), comments at most 128 characters without ``"`` (§14.4);
* ``l3_every_field_v6``: the IPv6 fields; ICMPv6 type 255 is a type like any other
  (ip6tables has no "any" type 255, unlike iptables);
* ``bridge_mode_l3_every_field_v4``: the same rules as in the inet mode, matched by
  ``ether type 0x0800`` in the bridge table, a reject dropped;
* ``bridge_mode_l3_no_ct``, ``bridge_mode_l3_no_ct_reject``: the bridge conntrack mode's L3
  layout (§14.1): FI from ``forward`` by ``iifname`` (priority 0), FO by ``oifname`` (priority
  1), HI from ``input`` by ``iifname``, all in the port's bridge table; ``reject`` is ``drop`` at
  the bridge unless the kernel can reject there (§14.4);
* ``multi_port_batch``: one batch changing several ports leaves exactly the new ports' entries
  (a port removed, one replaced by an L2-only ruleset loses its mark id, new L3 ports get ids
  of their own; mark values: ingress id << 20, egress id << 8);
* ``rebuild``: deletes every table of ours (each shard, the id registry, the former single
  table; both families) and builds every port anew, in one batch;
* ``odd_port_names``: the dispatch key is the port's own name; its chains get a name without
  ``:`` (escaped), and the escape keeps names apart;
* ``bridge_mode_replace``: L3 rules replaced by L2-only ones in the bridge mode leave no
  L3 dispatch entry;
* ``replace``: one batch adds the new generation, repoints every dispatch entry and then removes
  the old generation (§14.4);
* ``delete``: one batch removes every dispatch entry of the port, then its chains.

Every case: a port's chains, sets and dispatch elements are in its shard's tables
(``libvirt_nwfilter_K``, K = crc32 of the port name mod 4), its ``port_ids`` element in
``inet libvirt_nwfilter_ids``, and a batch creates the tables of its ports' shards only.
"""

from __future__ import annotations

import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAC = "52:54:00:00:00:01"
RARP_ANNOUNCE = ("ether type 0x8035 @nh,0,16 0x0001 @nh,16,16 0x0800 @nh,48,16 0x0003 @nh,32,8 0x0006 "
                 "@nh,40,8 0x0004 @nh,64,48 0x525400000001 @nh,144,48 0x525400000001 @nh,112,32 0x00000000 "
                 "@nh,192,32 0x00000000")
"""RARP (0x8035) request_reverse (opcode 3) of an Ethernet/IPv4 ARP packet (htype 1, ptype
0x0800, hlen 6, plen 4) with sender and target MAC ``MAC`` and sender and target IP 0.0.0.0: the
offsets are those of the ARP header (8 bytes, then SHA 6, SPA 4, THA 6, TPA 4)."""


def shard(port: str) -> str:
    """The table (of either family) of ``port``'s objects."""
    return f"libvirt_nwfilter_{zlib.crc32(port.encode()) % 4}"


IDS = "libvirt_nwfilter_ids"
ALL_TABLES = ["libvirt_nwfilter", *(f"libvirt_nwfilter_{k}" for k in range(4)), IDS]


def batches(case: str) -> list[str]:
    """Every batch of ``case`` in order (setup batches, then the golden one)."""
    return [part.split("\n", 1)[1] for part in (HERE / f"{case}.nft").read_text().split("#### batch ")[1:]]


def golden(case: str) -> str:
    """The golden batch (the last one) of ``case``."""
    return batches(case)[-1]


def dispatch(case: str) -> dict[str, dict[str, str]]:
    """What the dispatch maps hold after every batch of ``case`` ran in order (``family map`` →
    {key: value}, empty maps left out): ``add element`` and ``delete element`` lines replayed
    (a probe, ``add ... : accept`` then ``delete``, leaves nothing)."""
    maps: dict[str, dict[str, str]] = {}
    for line in "\n".join(batches(case)).splitlines():
        verb, _, family, table, name, element = (line.split(" ", 5) + [""] * 6)[:6]
        if line.startswith(("add element ", "delete element ")):
            key, _, value = element.strip("{} ").partition(" : ")
            # each element in its table: the id registry, or the shard of the port it names
            port = key.strip('"') if key.startswith('"') else value.split("/")[1] if value.startswith("jump ") else None
            if name == "port_ids":
                assert (family, table) == ("inet", IDS), line
            elif port is not None:
                assert table == shard(port), line
            entries = maps.setdefault(f"{family} {name}", {})
            if verb == "add":
                entries[key] = value
            else:
                entries.pop(key, None)
    return {name: entries for name, entries in maps.items() if entries}


def rules(text: str, family: str, chain: str, port: str | None = None) -> list[str]:
    """The rules added to ``chain`` in the table of ``port`` (default: the port ``chain`` names);
    a rule of the chain in any other table fails."""
    table = shard(port or chain.split("/")[1])
    prefix = f"add rule {family} {table} {chain} "
    assert not [line for line in text.splitlines()
                if line.startswith(f"add rule {family} ") and line.split()[4] == chain and not line.startswith(prefix)]
    return [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]


def tables(text: str) -> set[str]:
    """``family table`` of every table ``text`` adds."""
    return {" ".join(line.split()[2:4]) for line in lines_starting(text, "add table ")}


def lines_starting(text: str, *starts: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(starts)]


def test_clean_traffic_root_chains_are_libvirts():
    text = golden("clean_traffic")
    assert rules(text, "bridge", "I-1/vnet0") == [
        "jump I-1/vnet0/mac",  # mac -800
        "ether type 0x0800 jump I-1/vnet0/ipv4-ip",  # ipv4-ip -710
        "ether type 0x0800 accept",  # -650 out accept ipv4
        "ether type 0x0806 jump I-1/vnet0/arp-mac",  # arp-mac -520
        "ether type 0x0806 jump I-1/vnet0/arp-ip",  # arp-ip -510
        "ether type 0x0806 accept",  # -500 inout accept arp
        "ether type 0x8035 jump I-1/vnet0/rarp",  # rarp -400
        "ether type 0x0835 accept",  # 500 out accept 0x835 (libvirt's qemu-announce-self)
        "drop",  # 1000 inout drop
    ]
    assert rules(text, "bridge", "O-1/vnet0") == [
        "ether type 0x0800 jump O-1/vnet0/ipv4", "ether type 0x0806 accept",
        "ether type 0x8035 jump O-1/vnet0/rarp", "drop"]


def test_clean_traffic_anti_spoofing_sub_chains():
    """Each sub-chain returns for the allowed value, drops the rest of its traffic; a frame
    falling off its end is accepted (libvirt's ebtables user chains have policy ACCEPT)."""
    text = golden("clean_traffic")
    expected = {
        "I-1/vnet0/mac": [f"ether saddr {MAC} return", "drop"],
        "I-1/vnet0/ipv4-ip": ["ether type 0x0800 ip saddr 0.0.0.0 ip protocol 17 return",  # DHCP
                              "ether type 0x0800 ip saddr 10.0.0.1 return", "ether type 0x0800 drop"],
        "I-1/vnet0/arp-mac": [f"ether type 0x0806 arp htype 1 arp hlen 6 arp saddr ether {MAC} return",
                              "ether type 0x0806 drop"],
        "I-1/vnet0/arp-ip": ["ether type 0x0806 arp ptype 0x0800 arp hlen 6 arp plen 4 arp saddr ip 10.0.0.1 return",
                             "ether type 0x0806 drop"],
        "I-1/vnet0/rarp": [f"ether saddr {MAC} ether daddr ff:ff:ff:ff:ff:ff {RARP_ANNOUNCE} accept",
                           "ether type 0x8035 drop"],
        "O-1/vnet0/ipv4": ["ether type 0x0800 accept"],
        "O-1/vnet0/rarp": [f"ether daddr ff:ff:ff:ff:ff:ff {RARP_ANNOUNCE} accept", "ether type 0x8035 drop"],
    }
    for chain, chain_rules in expected.items():
        assert rules(text, "bridge", chain) == chain_rules + ["accept"], chain


def test_clean_traffic_dispatch():
    text = golden("clean_traffic")
    b = f"bridge {shard('vnet0')}"
    assert lines_starting(text, "add chain bridge libvirt_nwfilter") == [
        f"add chain {b} l2-from-vm {{ type filter hook prerouting priority -300; policy accept; }}",
        f"add chain {b} l2-to-vm {{ type filter hook postrouting priority 300; policy accept; }}",
        f"add chain {b} mark-out {{ type filter hook forward priority -200; policy accept; }}",
        *(f"add chain {b} {chain}" for chain in (
            "I-1/vnet0", "I-1/vnet0/mac", "I-1/vnet0/ipv4-ip", "I-1/vnet0/arp-mac", "I-1/vnet0/arp-ip",
            "I-1/vnet0/rarp", "O-1/vnet0", "O-1/vnet0/ipv4", "O-1/vnet0/rarp"))]
    assert rules(text, "bridge", "l2-from-vm", "vnet0") == ["iifname vmap @l2_from_vm"]
    assert rules(text, "bridge", "l2-to-vm", "vnet0") == ["oifname vmap @l2_to_vm"]
    assert tables(text) == {f"bridge {shard('vnet0')}", f"inet {shard('vnet0')}", f"inet {IDS}"}
    assert dispatch("clean_traffic") == {"bridge l2_from_vm": {'"vnet0"': "jump I-1/vnet0"},
                                         "bridge l2_to_vm": {'"vnet0"': "jump O-1/vnet0"}}
    assert not [line for line in lines_starting(text, "add chain inet ") if " FI-" in line or " FO-" in line]


def test_clean_traffic_every_ip_returns_before_the_drop():
    text = golden("clean_traffic_two_ips")
    assert rules(text, "bridge", "I-1/vnet0/ipv4-ip") == [
        "ether type 0x0800 ip saddr 0.0.0.0 ip protocol 17 return", "ether type 0x0800 ip saddr 10.0.0.1 return",
        "ether type 0x0800 ip saddr 10.0.0.2 return", "ether type 0x0800 drop", "accept"]
    assert rules(text, "bridge", "I-1/vnet0/arp-ip") == [
        f"ether type 0x0806 arp ptype 0x0800 arp hlen 6 arp plen 4 arp saddr ip {ip} return"
        for ip in ("10.0.0.1", "10.0.0.2")] + ["ether type 0x0806 drop", "accept"]


def test_ssh_to_a_state_matching_and_marks():
    """``in`` accept tcp dport 22 then ``inout`` drop all: a peer may open TCP 22 on the VM
    (FO: new,established original, accept), the VM's answers pass (FI and HI: established reply,
    return = libvirt's RETURN for accept), nothing else; the ingress mark set in the port's
    from-VM chain selects its FI and HI chains, the egress mark set in its MO chain its FO chain."""
    text = golden("ssh_to_a")
    fi = ["meta nfproto ipv4 meta l4proto 6 th sport 22 ct state established ct direction reply return",
          "meta nfproto ipv4 drop"]
    assert rules(text, "inet", "FI-1/vp1") == fi == rules(text, "inet", "HI-1/vp1")
    assert rules(text, "inet", "FO-1/vp1") == [
        "meta nfproto ipv4 meta l4proto 6 th dport 22 ct state new,established ct direction original accept",
        "meta nfproto ipv4 drop"]
    assert rules(text, "bridge", "I-1/vp1") == ["meta mark set meta mark & 0x000fffff | 0x00100000",
                                               "jump I-1/vp1/mac"]
    assert rules(text, "bridge", "MO-1/vp1") == ["meta mark set meta mark & 0xfff000ff | 0x00000100"]
    i = f"inet {shard('vp1')}"
    # every shard's FI runs before any shard's FO: two base chains of the forward hook
    assert lines_starting(text, f"add chain {i} l3-") == [
        f"add chain {i} l3-fwd-in {{ type filter hook forward priority 0; policy accept; }}",
        f"add chain {i} l3-fwd-out {{ type filter hook forward priority 1; policy accept; }}",
        f"add chain {i} l3-input {{ type filter hook input priority 0; policy accept; }}"]
    assert rules(text, "inet", "l3-fwd-in", "vp1") == ["meta mark & 0xfff00000 vmap @fi"]
    assert rules(text, "inet", "l3-fwd-out", "vp1") == ["meta mark & 0x000fff00 vmap @fo"]
    assert rules(text, "inet", "l3-input", "vp1") == ["meta mark & 0xfff00000 vmap @hi"]
    assert not [line for line in text.splitlines() if " l3-fwd " in line]
    assert dispatch("ssh_to_a") == {
        "bridge l2_from_vm": {'"vp1"': "jump I-1/vp1"}, "inet fi": {"0x00100000": "jump FI-1/vp1"},
        "inet fo": {"0x00000100": "jump FO-1/vp1"}, "inet hi": {"0x00100000": "jump HI-1/vp1"},
        "bridge mark_out": {'"vp1"': "jump MO-1/vp1"}, "inet port_ids": {"0x00000001": '"vp1"'}}


def test_root_chain_actions():
    text = golden("root_only")
    assert rules(text, "bridge", "I-1/vnet0") == [
        f"ether saddr != {MAC} drop", "ether type 0x0800 accept",
        "ether type 0x0806 counter",  # continue: matched, no verdict, the next rule decides
        "ether type 0x86dd return",  # leaves the port's chain: the base chain's policy accepts
        "drop"]
    assert rules(text, "bridge", "O-1/vnet0") == [f"ether daddr {MAC} accept", "drop"]
    assert dispatch("root_only") == {"bridge l2_from_vm": {'"vnet0"': "jump I-1/vnet0"},
                                     "bridge l2_to_vm": {'"vnet0"': "jump O-1/vnet0"}}


def test_to_vm_l3_rules_only():
    text = golden("l3_only_fo")
    assert {line.split()[2] + " " + line.split()[4] for line in lines_starting(text, "add chain ")
            if "vnet0" in line} == {"inet FO-1/vnet0", "bridge MO-1/vnet0"}
    assert rules(text, "inet", "FO-1/vnet0") == ["meta nfproto ipv4 meta l4proto 6 th dport 80 accept",
                                                 "meta nfproto ipv4 drop"]
    assert rules(text, "bridge", "MO-1/vnet0") == ["meta mark set meta mark & 0xfff000ff | 0x00000100"]
    assert dispatch("l3_only_fo") == {"inet fo": {"0x00000100": "jump FO-1/vnet0"},
                                      "bridge mark_out": {'"vnet0"': "jump MO-1/vnet0"},
                                      "inet port_ids": {"0x00000001": '"vnet0"'}}


def test_l3_fields_v6():
    text = golden("l3_every_field_v6")
    v6 = "meta nfproto ipv6"
    tcp, udp, icmpv6 = (f"{v6} meta l4proto {number}" for number in (6, 17, 58))
    fi = [f"{tcp} ip6 daddr fd00::/64 th dport != 80 ct state new,established ct direction original return",
          f"{udp} ether saddr {MAC} ip6 saddr fd00::1-fd00::9 ip6 dscp != 46 drop",
          f"{icmpv6} icmpv6 type 128 icmpv6 code 0 ct state new,established return",
          f"{icmpv6} icmpv6 type . icmpv6 code != {{ 135 . 0 }} drop",
          f"{icmpv6} icmpv6 type 255 drop",
          f"{tcp} tcp option 8 exists add @CL-1/vnet0/1 {{ ip6 saddr ct count over 2 }} reject",
          f"{v6} meta l4proto 132 th dport 100-200 return",
          f"{v6} meta l4proto 136 return", f"{v6} meta l4proto 50 return",
          f"{v6} meta l4proto 51 counter",  # ah, continue
          f"{v6} drop"]
    assert rules(text, "inet", "FI-1/vnet0") == fi
    assert rules(text, "inet", "HI-1/vnet0") == [rule.replace("CL-1/vnet0/1", "CL-1/vnet0/2") for rule in fi]
    assert rules(text, "inet", "FO-1/vnet0") == [
        f"{tcp} ip6 saddr fd00::/64 th sport != 80 ct state established ct direction reply accept", f"{v6} drop"]


def test_bridge_mode_l3_fields():
    text = golden("bridge_mode_l3_every_field_v4")
    fi = l3_fields_v4("ether type 0x0800", reject="drop")
    assert rules(text, "bridge", "FI-1/vnet0") == fi
    assert rules(text, "bridge", "HI-1/vnet0") == [rule.replace("CL-1/vnet0/1", "CL-1/vnet0/3").replace(
        "CL-1/vnet0/2", "CL-1/vnet0/4") for rule in fi]
    assert not lines_starting(text, "add table inet")


def test_bridge_mode_l3_dispatch_and_reject():
    for case, udp_53 in (("bridge_mode_l3_no_ct", "drop"), ("bridge_mode_l3_no_ct_reject", "reject")):
        text = golden(case)
        b = f"bridge {shard('vnet0')}"
        assert [line for line in lines_starting(text, "add map bridge ", "add chain bridge ")
                if " fi " in line or " fo " in line or " hi " in line or " l3-" in line] == [
            f"add map {b} fi {{ type ifname : verdict; }}",
            f"add map {b} fo {{ type ifname : verdict; }}",
            f"add map {b} hi {{ type ifname : verdict; }}",
            f"add chain {b} l3-fwd-in {{ type filter hook forward priority 0; policy accept; }}",
            f"add chain {b} l3-fwd-out {{ type filter hook forward priority 1; policy accept; }}",
            f"add chain {b} l3-input {{ type filter hook input priority 0; policy accept; }}"], case
        assert rules(text, "bridge", "l3-fwd-in", "vnet0") == ["iifname vmap @fi"], case
        assert rules(text, "bridge", "l3-fwd-out", "vnet0") == ["oifname vmap @fo"], case
        assert rules(text, "bridge", "l3-input", "vnet0") == ["iifname vmap @hi"], case
        assert tables(text) == {b}, case
        fi = ["ether type 0x0800 meta l4proto 6 th dport 22 return",
              f"ether type 0x0800 meta l4proto 17 th dport 53 {udp_53}",
              "ether type 0x86dd meta l4proto 58 icmpv6 type 135 return", "ether type 0x0800 drop"]
        assert rules(text, "bridge", "FI-1/vnet0") == fi == rules(text, "bridge", "HI-1/vnet0"), case
        assert rules(text, "bridge", "FO-1/vnet0") == ["ether type 0x0800 meta l4proto 6 th sport 22 accept",
                                                       "ether type 0x0800 drop"], case
        assert not lines_starting(text, "add table inet"), case
        assert dispatch(case) == {"bridge l2_from_vm": {'"vnet0"': "jump I-1/vnet0"},
                                  "bridge fi": {'"vnet0"': "jump FI-1/vnet0"},
                                  "bridge fo": {'"vnet0"': "jump FO-1/vnet0"},
                                  "bridge hi": {'"vnet0"': "jump HI-1/vnet0"}}, case


def test_l2_fields_as_nft_expressions():
    ip, ip6 = "ether type 0x0800", "ether type 0x86dd"
    assert rules(golden("l2_every_field"), "bridge", "I-1/vnet0") == [
        "ether saddr & ff:ff:ff:00:00:00 == 52:54:00:00:00:00 ether daddr & ff:ff:ff:80:00:00 != 01:00:5e:00:00:00 "
        "accept",
        f"ether type & 0xffff != 0x0800 ether saddr & ff:ff:ff:ff:ff:ff != {MAC} drop",
        "ether type 0x8100 vlan id 10 vlan type 0x0806 accept",
        "ether type 0x8100 vlan id != 4095 vlan type != 0x0800 drop",
        f"ether daddr 01:80:c2:00:00:00 ether saddr {MAC} accept",
        "ether type 0x0806 arp htype 1 arp ptype 0x0800 arp operation 2 arp hlen 6 arp plen 4 "
        f"arp saddr ether {MAC} arp daddr ether & ff:ff:ff:ff:ff:ff != 52:54:00:00:00:02 arp saddr ip 10.0.0.0/8 "
        "arp daddr ip & 255.255.255.255 != 10.1.2.3 return",
        "ether type 0x0806 arp operation & 0xffff != 1 arp htype & 0xffff != 6 arp ptype & 0xffff != 0x86dd drop",
        # RARP: htype 1, ptype IPv4, opcode 3, hlen 6, plen 4, SHA, THA != MAC, SPA 0.0.0.0, TPA not in 192.168/16
        "ether type 0x8035 @nh,0,16 0x0001 @nh,16,16 0x0800 @nh,48,16 0x0003 @nh,32,8 0x0006 @nh,40,8 0x0004 "
        "@nh,64,48 0x525400000001 @nh,144,48 != 0x525400000001 @nh,112,32 0x00000000 "
        "@nh,192,32 & 0xffff0000 != 0xc0a80000 accept",
        f"{ip} ip saddr 10.1.2.0/24 ip daddr & 255.255.255.255 != 10.9.9.9 ip protocol 6 th sport 1024-65535 "
        "th dport & 0xffff != 22 ip dscp 46 return",
        f"{ip} ip protocol != 17 ip dscp != 0 drop",
        f"{ip} ip protocol 33 th dport 5000-5010 accept",
        f"{ip6} ip6 saddr fe80::/10 ip6 daddr != ff02::1 meta l4proto 17 th sport 546 th dport 547 return",
        f"{ip6} meta l4proto 58 icmpv6 type 133-136 icmpv6 code 0 accept",
        f"{ip6} meta l4proto 58 icmpv6 type != 128-129 drop",  # code 0-255: the type alone
        f"{ip6} meta l4proto 58 icmpv6 code != 3-4 drop",  # type 0-255: the code alone
        f"{ip6} meta l4proto 58 icmpv6 type . icmpv6 code != {{ 1-2 . 0-3 }} drop",
        f"{ip6} meta l4proto 58 icmpv6 type 0-255 accept",
        "ether saddr & 00:00:00:00:00:00 == 00:00:00:00:00:00 counter"]  # mask /0, continue


def l3_fields_v4(v4: str = "meta nfproto ipv4", reject: str = "reject") -> list[str]:
    """FI of ``l3_every_field_v4``, written by hand: ``v4`` is the IPv4 match (inet mode, or
    ``ether type 0x0800`` in the bridge mode), ``reject`` what a reject becomes."""
    tcp, udp, icmp = (f"{v4} meta l4proto {number}" for number in (6, 17, 1))
    return [
        f"{tcp} ip daddr 10.1.0.0/16 th dport 22 ct state new,established ct direction original return "
        "comment \"ssh 'out'\"",
        f"{tcp} ether saddr & ff:ff:ff:ff:ff:ff != {MAC} ip saddr & 255.255.255.255 != 10.0.0.5 "
        "ip daddr 10.2.0.1-10.2.0.9 ip dscp 10 tcp flags & (fin|syn|rst|psh|ack|urg) == syn th sport != 1-1023 "
        "th dport 80-90 tcp option 2 exists drop",
        f"{tcp} tcp flags & (syn|ack) != (syn|ack) tcp option 254 missing ip saddr != 10.3.0.1 {reject}",
        f"{udp} th dport 53 add @CL-1/vnet0/1 {{ ip saddr ct count 10 }} return",  # ! connlimit-above 10
        f"{tcp} add @CL-1/vnet0/2 {{ ip saddr ct count over 4 }} drop comment \"{'x' * 128}\"",
        f"{icmp} icmp type 8 ct state new,established return",
        f"{icmp} icmp type 3 icmp code 4 return",
        f"{icmp} icmp type != 5 drop",
        f"{icmp} icmp type . icmp code != {{ 3 . 1 }} drop",
        f"{icmp} return",  # type 255: any type
        f"{v4} meta l4proto 136 counter",  # udplite, continue
        f"{v4} meta l4proto 50 return", f"{v4} meta l4proto 51 return",
        f"{v4} meta l4proto 132 th sport 9 return",
        f"{v4} meta l4proto 2 drop comment \"no igmp\"",
        f"{v4} ct state related,invalid return",
        f"{v4} drop"]


def test_l3_fields_as_nft_expressions():
    text = golden("l3_every_field_v4")
    fi = l3_fields_v4()
    v4, tcp = "meta nfproto ipv4", "meta nfproto ipv4 meta l4proto 6"
    assert rules(text, "inet", "FI-1/vnet0") == fi
    assert rules(text, "inet", "HI-1/vnet0") == [rule.replace("CL-1/vnet0/1", "CL-1/vnet0/3").replace(
        "CL-1/vnet0/2", "CL-1/vnet0/4") for rule in fi]
    assert rules(text, "inet", "FO-1/vnet0") == [
        f"{tcp} ip saddr 10.1.0.0/16 th sport 22 ct state established ct direction reply accept comment \"ssh 'out'\"",
        f"{v4} ct state new accept comment \"st new\"", f"{v4} drop"]
    for number in range(1, 5):
        assert f"add set inet {shard('vnet0')} CL-1/vnet0/{number} {{ type ipv4_addr; size 65535; flags dynamic; }}" \
            in text


def test_several_ports_in_one_batch():
    assert dispatch("multi_port_batch") == {
        "bridge l2_from_vm": {'"vnet1"': "jump I-2/vnet1", '"vnet3"': "jump I-1/vnet3", '"vnet4"': "jump I-1/vnet4"},
        "bridge l2_to_vm": {'"vnet1"': "jump O-2/vnet1"},
        "inet fi": {"0x00300000": "jump FI-1/vnet3", "0x00400000": "jump FI-1/vnet4"},
        "inet fo": {"0x00000200": "jump FO-1/vnet2", "0x00000300": "jump FO-1/vnet3", "0x00000400": "jump FO-1/vnet4"},
        "inet hi": {"0x00300000": "jump HI-1/vnet3", "0x00400000": "jump HI-1/vnet4"},
        "bridge mark_out": {'"vnet2"': "jump MO-1/vnet2", '"vnet3"': "jump MO-1/vnet3", '"vnet4"': "jump MO-1/vnet4"},
        "inet port_ids": {"0x00000002": '"vnet2"', "0x00000003": '"vnet3"', "0x00000004": '"vnet4"'}}
    text = golden("multi_port_batch")
    assert not [line for line in text.splitlines() if "vnet2" in line]  # unchanged: not in the batch
    # the batch creates its ports' shards only (vnet2's, unless another port shares it, is not touched)
    wanted = {shard(port) for port in ("vnet0", "vnet1", "vnet3", "vnet4")}
    assert tables(text) == {f"{family} {table}" for family in ("bridge", "inet") for table in wanted} | {f"inet {IDS}"}
    assert {line.split()[3] for line in text.splitlines() if line.startswith(("add ", "delete ", "flush "))} == \
        wanted | {IDS}
    assert rules(text, "bridge", "I-1/vnet3")[0] == "meta mark set meta mark & 0x000fffff | 0x00300000"


def test_rebuild_starts_from_empty_tables():
    lines = golden("rebuild").splitlines()
    removal = [f"{verb} table {family} {table}" for family in ("bridge", "inet") for table in ALL_TABLES
               for verb in ("add", "delete")]
    assert lines[1:1 + len(removal)] == removal
    rest = lines[1 + len(removal):]
    # nothing deleted after, and no port's chain or set flushed (only base chains are refilled)
    assert not [line for line in rest if line.startswith("delete ") or line.startswith("flush ") and "/" in line]
    assert tables("\n".join(rest)) == {f"{family} {shard(port)}" for family in ("bridge", "inet")
                                       for port in ("vnet0", "vnet1")} | {f"inet {IDS}"}
    assert dispatch("rebuild") == {
        "bridge l2_from_vm": {'"vnet0"': "jump I-2/vnet0"}, "inet fi": {"0x00100000": "jump FI-2/vnet0"},
        "inet fo": {"0x00000100": "jump FO-2/vnet0", "0x00000200": "jump FO-2/vnet1"},
        "inet hi": {"0x00100000": "jump HI-2/vnet0"},
        "bridge mark_out": {'"vnet0"': "jump MO-2/vnet0", '"vnet1"': "jump MO-2/vnet1"},
        "inet port_ids": {"0x00000001": '"vnet0"', "0x00000002": '"vnet1"'}}


def test_odd_port_names():
    text = golden("odd_port_names")
    assert dispatch("odd_port_names") == {"bridge l2_from_vm": {'"a:b_c.d-e"': "jump I-1/a_cb__c.d-e"}}
    chains = [line.split()[4] for line in lines_starting(text, f"add chain bridge {shard('a:b_c.d-e')} I-1/")]
    assert chains == ["I-1/a_cb__c.d-e", "I-1/a_cb__c.d-e/arp-x_cy__z", "I-1/a_cb__c.d-e/ipv4.a_cb__c"]
    assert rules(text, "bridge", "I-1/a_cb__c.d-e", "a:b_c.d-e") == [
        "ether type 0x0806 jump I-1/a_cb__c.d-e/arp-x_cy__z", "ether type 0x0800 jump I-1/a_cb__c.d-e/ipv4.a_cb__c",
        "drop"]


def test_bridge_mode_replace_by_l2_only():
    assert dispatch("bridge_mode_replace") == {"bridge l2_from_vm": {'"vnet0"': "jump I-2/vnet0"},
                                               "bridge l2_to_vm": {'"vnet0"': "jump O-2/vnet0"}}


def test_replace_switches_generations_in_one_batch():
    """Generation 2 (clean-traffic, L2 only) replaced by generation 3 (L2 and L3): new chains
    first, then the dispatch entries point at them (the to-VM entry goes: no to-VM rules now),
    then the old chains are flushed and deleted."""
    lines = golden("replace").splitlines()
    adds = [i for i, line in enumerate(lines) if line.startswith("add chain ") and "-3/vnet0" in line]
    switch = [i for i, line in enumerate(lines) if line.startswith(("delete element", "add element"))]
    old = [i for i, line in enumerate(lines) if "-2/vnet0" in line]
    assert adds and switch and old and max(adds) < min(switch) and max(switch) < min(old)
    assert dispatch("replace") == {
        "bridge l2_from_vm": {'"vnet0"': "jump I-3/vnet0"}, "inet fi": {"0x00100000": "jump FI-3/vnet0"},
        "inet fo": {"0x00000100": "jump FO-3/vnet0"}, "bridge mark_out": {'"vnet0"': "jump MO-3/vnet0"},
        "inet port_ids": {"0x00000001": '"vnet0"'}}
    assert all(lines[i].startswith(("flush chain ", "delete chain ")) for i in old)
    flushed = {lines[i].split()[-1] for i in old if lines[i].startswith("flush")}
    deleted = {lines[i].split()[-1] for i in old if lines[i].startswith("delete")}
    assert flushed == deleted == {"I-2/vnet0", "O-2/vnet0"} | {
        f"I-2/vnet0/{sub}" for sub in ("mac", "ipv4-ip", "arp-mac", "arp-ip", "rarp")} | {
        "O-2/vnet0/ipv4", "O-2/vnet0/rarp"}


def test_delete_removes_the_port_entirely():
    text = golden("delete")
    assert not [line for line in lines_starting(text, "add chain ", "add rule ") if "vnet0" in line]
    assert dispatch("delete") == {}
    chains = {"bridge I-1/vnet0", "bridge I-1/vnet0/mac", "inet FI-1/vnet0", "inet FO-1/vnet0", "inet HI-1/vnet0",
              "bridge MO-1/vnet0"}
    for verb in ("flush", "delete"):
        assert {" ".join(line.split()[2:5:2]) for line in lines_starting(text, f"{verb} chain ")
                if "vnet0" in line} == chains

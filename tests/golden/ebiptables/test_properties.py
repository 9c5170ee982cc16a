"""Hand-written checks of ebiptables golden files against the spec (shared spec: semantics.md).

The golden test compares the renderer's output with the committed files, so a file regenerated
from a wrong renderer would pass it. These tests read the committed files with a few lines of
their own and check, rule by rule, what the spec fixes; the expected rules were written by hand
from the spec (libvirt's layout with our chain prefixes: ``nwf-I``/``nwf-O`` roots, ``NI``/``NO``
sub-chains, ``NFI``/``NFO``/``NHI`` L3 chains, temporary ``J``/``P`` names), not copied from a
rendering. Reviewed this way:

* ``clean-traffic``: the from-VM and to-VM root chains in libvirt's order (§3.1), every
  anti-spoofing sub-chain in ebtables syntax (§7.3), chains with policy ACCEPT (§4), the new
  roots linked last (§7.4 step 5), the commit renaming every temporary chain (§7.4);
* ``clean-traffic-two-ips``: every value of ``IP`` returns before the drop;
* ``l2-fields``: every L2 field in ebtables syntax (§7.3): ``!`` after the option, masks as
  MAC masks, ethertypes in hex without padding, STP options in libvirt's order, ARP addresses
  with their own prefix (R4), DSCP shifted into ``--ip-tos`` (R3), ICMPv6 type/code ranges, and
  ``--vlan-encap`` in hex: ebtables reads that value as hexadecimal (``--vlan-encap 2054``
  becomes ``vlan type 0x2054`` in the kernel), so libvirt's decimal would match another type;
* ``stp-vlan-chains``: sub-chains entered by their name's prefix (§4: ``stp`` by the STP
  destination MAC, ``vlan`` by ethertype 0x8100), on both sides;
* ``to-vm-only``: only the to-VM root chain and its POSTROUTING link, no L3 chains (§7.2);
* ``empty``: no rules, no command at all;
* ``mixed`` (a 15-character port name): every chain name within the tools' limits (§7: ebtables
  31 characters, iptables 28), every tool in one plan;
* ``l3-fields``: every L3 field in libvirt's iptables argument order (§6.8), ``!`` before the
  option, ``continue`` as a rule without a target (R1), REJECT kept at L3 (§5), ipset flags and
  a quoted set name, comments quoted (newline to space) and last;
* ``l3-example``: the verified example of §6.9 — FI, FO and HI with implicit state matching,
  ICMP without ``ctdir``, explicit state without it, the zipped ``$IP``/``$PORTS`` values, our fix
  of libvirt's lost ``! --dport`` — in libvirt's argument order (§6.8), the global chains'
  hooks and the per-port goto links (§7.2).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
MAC = "52:54:00:12:34:56"
RARP_ANNOUNCE = ("-p 0x8035 --arp-opcode 3 --arp-ip-src 0.0.0.0/32 --arp-ip-dst 0.0.0.0/32 "
                 f"--arp-mac-src {MAC} --arp-mac-dst {MAC} -j ACCEPT")


def steps(case: str, section: str) -> list[tuple[str, list[str]]]:
    """The steps of one section (``instantiate``, ``replace``, ``remove``) of a golden file:
    (header after ``## ``, input lines)."""
    text = (HERE / f"{case}.txt").read_text()
    body = next(part for part in text.split("\n# ===== ")[1:] if part.startswith(section))
    return [(chunk.split("\n", 1)[0], chunk.split("\n")[1:]) for chunk in body.split("\n## ")[1:]]


def step(case: str, section: str, header: str) -> list[str]:
    return next(lines for head, lines in steps(case, section) if head == header)


def chain_rules(lines: list[str], chain: str) -> list[str]:
    prefix = f"-A {chain} "
    return [line[len(prefix):] for line in lines if line.startswith(prefix)]


def test_clean_traffic_root_chains_are_libvirts():
    apply = step("clean-traffic", "instantiate", "apply 1: ebtables-restore --noflush")
    assert chain_rules(apply, "nwf-J-vnet0") == [
        "-j NJ-vnet0:mac", "-p 0x0800 -j NJ-vnet0:ipv4-ip", "-p 0x800 -j ACCEPT",
        "-p 0x0806 -j NJ-vnet0:arp-mac", "-p 0x0806 -j NJ-vnet0:arp-ip", "-p 0x806 -j ACCEPT",
        "-p 0x8035 -j NJ-vnet0:rarp", "-p 0x835 -j ACCEPT", "-j DROP"]
    assert chain_rules(apply, "nwf-P-vnet0") == [
        "-p 0x0800 -j NP-vnet0:ipv4", "-p 0x806 -j ACCEPT", "-p 0x8035 -j NP-vnet0:rarp", "-j DROP"]
    # the new roots are linked last, after every chain is complete
    assert [line for line in apply if line][-2:] == ["-A PREROUTING -i vnet0 -j nwf-J-vnet0",
                                                     "-A POSTROUTING -o vnet0 -j nwf-P-vnet0"]


def test_clean_traffic_anti_spoofing_sub_chains():
    apply = step("clean-traffic", "instantiate", "apply 1: ebtables-restore --noflush")
    assert chain_rules(apply, "NJ-vnet0:mac") == [f"-s {MAC} -j RETURN", "-j DROP"]
    assert chain_rules(apply, "NJ-vnet0:ipv4-ip") == [
        "-p ipv4 --ip-source 0.0.0.0 --ip-protocol 17 -j RETURN", "-p ipv4 --ip-source 10.0.0.5 -j RETURN", "-j DROP"]
    assert chain_rules(apply, "NJ-vnet0:arp-mac") == [f"-p 0x806 --arp-mac-src {MAC} -j RETURN", "-j DROP"]
    assert chain_rules(apply, "NJ-vnet0:arp-ip") == ["-p 0x806 --arp-ip-src 10.0.0.5/32 -j RETURN", "-j DROP"]
    assert chain_rules(apply, "NJ-vnet0:rarp") == [f"-s {MAC} -d ff:ff:ff:ff:ff:ff {RARP_ANNOUNCE}", "-j DROP"]
    assert chain_rules(apply, "NP-vnet0:ipv4") == ["-p 0x800 -j ACCEPT"]
    assert chain_rules(apply, "NP-vnet0:rarp") == [f"-d ff:ff:ff:ff:ff:ff {RARP_ANNOUNCE}", "-j DROP"]
    subs = ["NJ-vnet0:mac", "NJ-vnet0:ipv4-ip", "NJ-vnet0:arp-mac", "NJ-vnet0:arp-ip", "NJ-vnet0:rarp",
            "NP-vnet0:ipv4", "NP-vnet0:rarp"]
    # policy ACCEPT: a frame falling off a sub-chain is accepted, as with libvirt's chains
    assert sorted(line for line in apply if line.startswith(":")) == sorted(
        f":{chain} ACCEPT" for chain in ["nwf-J-vnet0", "nwf-P-vnet0", *subs])


def test_clean_traffic_commit_renames_every_temporary_chain():
    commit = step("clean-traffic", "instantiate", "commit 1: ebtables-restore --noflush")
    renames = [line.split()[1:] for line in commit if line.startswith("-E ")]
    assert sorted(renames) == sorted([["nwf-J-vnet0", "nwf-I-vnet0"], ["nwf-P-vnet0", "nwf-O-vnet0"]] + [
        [f"N{t}-vnet0:{sub}", f"N{f}-vnet0:{sub}"] for t, f, sub in (
            ("J", "I", "mac"), ("J", "I", "ipv4-ip"), ("J", "I", "arp-mac"), ("J", "I", "arp-ip"), ("J", "I", "rarp"),
            ("P", "O", "ipv4"), ("P", "O", "rarp"))])


def test_clean_traffic_every_ip_returns_before_the_drop():
    apply = step("clean-traffic-two-ips", "instantiate", "apply 1: ebtables-restore --noflush")
    assert chain_rules(apply, "NJ-vnet1:ipv4-ip") == [
        "-p ipv4 --ip-source 0.0.0.0 --ip-protocol 17 -j RETURN", "-p ipv4 --ip-source 10.0.0.5 -j RETURN",
        "-p ipv4 --ip-source 10.0.0.6 -j RETURN", "-j DROP"]
    assert chain_rules(apply, "NJ-vnet1:arp-ip") == [
        "-p 0x806 --arp-ip-src 10.0.0.5/32 -j RETURN", "-p 0x806 --arp-ip-src 10.0.0.6/32 -j RETURN", "-j DROP"]


EST_REPLY = "-m conntrack --ctstate ESTABLISHED -m conntrack --ctdir Reply"
NEW_ORIGINAL = "-m conntrack --ctstate NEW,ESTABLISHED -m conntrack --ctdir Original"
FI_V4 = [f"-p tcp --sport 22 {EST_REPLY} -j RETURN",
         "-p icmp --icmp-type 8 -m conntrack --ctstate NEW,ESTABLISHED -j RETURN",  # no ctdir with an ICMP type
         f"-p udp --source 10.1.0.2 --dport 53 {NEW_ORIGINAL} -j RETURN",
         f"-p udp --source 10.1.0.3 --dport 123 {NEW_ORIGINAL} -j RETURN",  # zipped, not the product
         "-p all -j DROP"]
FO_V4 = [f"-p tcp --dport 22 {NEW_ORIGINAL} -j ACCEPT",
         '-p all -m conntrack --ctstate NEW -m comment --comment "st new" -j ACCEPT',  # explicit state: no ctdir
         f"-p udp --destination 10.1.0.2 --sport 53 {EST_REPLY} -j ACCEPT",
         f"-p udp --destination 10.1.0.3 --sport 123 {EST_REPLY} -j ACCEPT",
         "-p all -j DROP"]
LINKS = ["-A nwf-in -m physdev --physdev-in vp2 -g NFJ-vp2",
         "-A nwf-out -m physdev --physdev-is-bridged --physdev-out vp2 -g NFP-vp2",
         "-A nwf-host-in -m physdev --physdev-in vp2 -g NHJ-vp2",
         "-A nwf-in-post -m physdev --physdev-in vp2 -j ACCEPT"]


def test_l3_example_is_the_verified_example():
    ipv4 = step("l3-example", "instantiate", "apply 2: iptables-restore -w --noflush")
    assert chain_rules(ipv4, "NFJ-vp2") == FI_V4 == chain_rules(ipv4, "NHJ-vp2")
    assert chain_rules(ipv4, "NFP-vp2") == FO_V4
    assert [line for line in ipv4 if line.startswith("-A nwf-")] == LINKS
    ipv6 = step("l3-example", "instantiate", "apply 4: ip6tables-restore -w --noflush")
    # libvirt loses match='no' on the destination port here; we keep the negation
    fi_v6 = [f"-p tcp ! --dport 80 {NEW_ORIGINAL} -j RETURN"]
    assert chain_rules(ipv6, "NFJ-vp2") == fi_v6 == chain_rules(ipv6, "NHJ-vp2")
    assert chain_rules(ipv6, "NFP-vp2") == [f"-p tcp ! --sport 80 {EST_REPLY} -j ACCEPT"]
    assert [line for line in ipv6 if line.startswith("-A nwf-")] == LINKS


def test_l3_global_chains_hook_where_libvirts_do():
    for header in ("apply 1: iptables-restore -w --noflush (errors ignored)",
                   "apply 3: ip6tables-restore -w --noflush (errors ignored)"):
        lines = step("l3-example", "instantiate", header)
        assert [line for line in lines if line.startswith("-I ")] == [
            "-I FORWARD 1 -j nwf-in", "-I FORWARD 2 -j nwf-out", "-I FORWARD 3 -j nwf-in-post",
            "-I INPUT 1 -j nwf-host-in"], header
    for header in ("commit 1: iptables-restore -w --noflush", "commit 2: ip6tables-restore -w --noflush"):
        renames = [line for line in step("l3-example", "instantiate", header) if line.startswith("-E ")]
        assert renames == ["-E NFJ-vp2 NFI-vp2", "-E NFP-vp2 NFO-vp2", "-E NHJ-vp2 NHI-vp2"], header


def test_l2_fields_in_ebtables_syntax():
    apply = step("l2-fields", "instantiate", "apply 1: ebtables-restore --noflush")
    assert chain_rules(apply, "nwf-J-vp3") == [
        "-s ! 52:54:00:aa:bb:cc -j DROP",
        "-s 52:54:00:00:00:00/ff:ff:ff:00:00:00 -d ! 01:00:5e:00:00:00/ff:ff:ff:80:00:00 -j CONTINUE",
        "-p 0x806 -j ACCEPT",
        "-p ! 0x600 -j ACCEPT",
        "-p 0x8100 --vlan-id ! 10 --vlan-encap 0x0806 -j ACCEPT",
        "-d 01:80:c2:00:00:00 --stp-type 0 --stp-flags ! 1 --stp-root-prio 1:2 "
        "--stp-root-addr 52:54:00:00:00:01/ff:ff:ff:ff:ff:00 --stp-root-cost ! 3:4 --stp-sender-prio 5 "
        "--stp-sender-addr 52:54:00:00:00:02 --stp-port 6:7 --stp-msg-age 8 --stp-max-age 9 --stp-hello-time 10 "
        "--stp-forward-delay 11:15 -j DROP",
        "-p 0x806 --arp-htype 1 --arp-opcode ! 1 --arp-ptype 0x800 --arp-ip-src 10.0.0.1/32 "
        "--arp-ip-dst ! 10.0.0.0/24 --arp-mac-src 52:54:00:aa:bb:cc --arp-mac-dst ! ff:ff:ff:ff:ff:ff "
        "--arp-gratuitous -j RETURN",
        "-p 0x8035 --arp-opcode 3 ! --arp-gratuitous -j DROP",
        "-p ipv4 --ip-source 10.0.0.1 --ip-destination ! 10.0.0.0/8 --ip-protocol 6 --ip-source-port 10:20 "
        "--ip-destination-port ! 22 --ip-tos 0xb8 -j ACCEPT",  # DSCP 46 << 2
        "-p ipv4 --ip-tos ! 0x0c -j ACCEPT",  # DSCP 3 << 2
        "-p ipv6 --ip6-source fe80::/10 --ip6-destination ! ff02::1:2 --ip6-protocol 58 --ip6-icmp-type 1:2/0:255 "
        "-j ACCEPT",
        "-p ipv6 --ip6-protocol 17 --ip6-source-port 546 --ip6-destination-port 547 -j ACCEPT",
        "-p ipv6 --ip6-protocol 58 --ip6-icmp-type ! 128:128/0:0 -j DROP",
        "-j DROP"]


def test_l3_fields_in_libvirts_argument_order():
    ipv4 = step("l3-fields", "instantiate", "apply 2: iptables-restore -w --noflush")
    expected_v4 = [
        "-p tcp -m mac ! --mac-source 52:54:00:00:00:01 --source 10.0.0.0/24 ! --destination 10.0.1.1 "
        "-m dscp --dscp 10 ! --tcp-flags SYN,ACK SYN --sport 1024:65535 --dport 22 ! --tcp-option 5 "
        f"{NEW_ORIGINAL} -j RETURN",
        "-p tcp --tcp-flags ALL NONE -j DROP",
        "-p tcp --tcp-flags ALL ALL -j DROP",
        "-p udp -m iprange --src-range 10.0.0.1-10.0.0.9 -m iprange ! --dst-range 10.0.1.1 ! --sport 53 -j REJECT",
        "-p sctp --dport 5000:5010 -j DROP",
        "-p udplite -j DROP", "-p esp -j DROP", "-p ah -j DROP", "-p igmp -j DROP",
        "-p icmp --icmp-type 8/0 -m conntrack --ctstate NEW,ESTABLISHED -j RETURN",
        "-p icmp ! --icmp-type 13 -j DROP",
        "-p all -m set --match-set trusted src,dst -m connlimit ! --connlimit-above 10 -j ACCEPT",
        '-p all -m connlimit --connlimit-above 5 -m comment --comment "count: \\"many\\" \\\\ conns "',  # continue
        '-p all -m set --match-set "my set" dst -j DROP']
    assert chain_rules(ipv4, "NFJ-vp4") == expected_v4 == chain_rules(ipv4, "NHJ-vp4")
    ipv6 = step("l3-fields", "instantiate", "apply 4: ip6tables-restore -w --noflush")
    expected_v6 = [
        "-p tcp -m mac --mac-source 52:54:00:00:00:01 --source fd00::/64 -m iprange --dst-range fd00::1-fd00::9 "
        "--dport 80:88 --tcp-option 2 -j RETURN",
        "-p icmpv6 --icmpv6-type 128 -m conntrack --ctstate NEW,ESTABLISHED -j RETURN",
        "-p icmpv6 ! --icmpv6-type 1/3 -j DROP",
        '-p all -m dscp ! --dscp 46 -m comment --comment "v6 dscp" -j DROP']
    assert chain_rules(ipv6, "NFJ-vp4") == expected_v6 == chain_rules(ipv6, "NHJ-vp4")
    assert not chain_rules(ipv4, "NFP-vp4") and not chain_rules(ipv6, "NFP-vp4")


def test_sub_chains_entered_by_their_prefix():
    apply = step("stp-vlan-chains", "instantiate", "apply 1: ebtables-restore --noflush")
    for root, sub in (("nwf-J-vp5", "NJ-vp5"), ("nwf-P-vp5", "NP-vp5")):
        assert chain_rules(apply, root) == [f"-d 01:80:c2:00:00:00 -j {sub}:stp", f"-p 0x8100 -j {sub}:vlan-x",
                                            "-j ACCEPT"]
        assert chain_rules(apply, f"{sub}:stp") == ["-d 01:80:c2:00:00:00 --stp-type 128 -j DROP"]
        assert chain_rules(apply, f"{sub}:vlan-x") == ["-p 0x8100 --vlan-id 42 -j ACCEPT", "-j DROP"]


def test_to_vm_rules_only():
    instantiate = steps("to-vm-only", "instantiate")
    assert all(" ebtables-restore " in header for header, _ in instantiate)  # no ip(6)tables step
    apply = step("to-vm-only", "instantiate", "apply 1: ebtables-restore --noflush")
    assert chain_rules(apply, "nwf-P-tap-a.1") == ["-d 52:54:00:12:34:56 -j ACCEPT", "-d ff:ff:ff:ff:ff:ff -j ACCEPT",
                                                   "-j DROP"]
    assert [line for line in apply if line.startswith(("-A PREROUTING", "-A POSTROUTING"))] == [
        "-A POSTROUTING -o tap-a.1 -j nwf-P-tap-a.1"]
    assert not [line for line in apply if "nwf-J-" in line or "NJ-" in line]


def test_empty_ruleset_runs_nothing():
    for section in ("instantiate", "replace", "remove"):
        assert steps("empty", section) == [], section


def test_chain_names_of_the_longest_port_name_fit():
    port = "vnet123456789ab"
    assert len(port) == 15
    named = {}
    for header, lines in steps("mixed", "instantiate"):
        names = {line[1:].split()[0] for line in lines if line.startswith(":")} | {
            line.split()[1] for line in lines if line.startswith("-N ")}
        named.setdefault(header.split()[2], set()).update(name for name in names if port in name)
    assert set(named) == {"ebtables-restore", "iptables-restore", "ip6tables-restore"}
    for tool, names in named.items():
        limit = 31 if tool == "ebtables-restore" else 28
        assert names and all(len(name) <= limit for name in names), (tool, names)

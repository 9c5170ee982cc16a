"""The test libvirtd works: it runs in its namespace, starts disk-less guests whose taps are
on the lab bridge, and its own nwfilter engine (the oracle) filters lab ports."""

from __future__ import annotations

import re
from pathlib import Path

from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

import libvirtd as lv
import netlab
from traffic import Probe, check_frames

ORACLE_MD = Path(__file__).resolve().parents[1] / "ORACLE.md"
MAC_A = "52:54:00:00:00:01"
MAC_B = "52:54:00:00:00:02"


def normalize(ruleset: str) -> str:
    """Counters zeroed, so rulesets can be compared as text."""
    return re.sub(r"counter packets \d+ bytes \d+", "counter packets 0 bytes 0", ruleset)


def nft_chains(ruleset: str, family: str, table: str) -> dict[str, str]:
    """Chain name -> body of one table of ``nft list ruleset`` (listing order varies)."""
    match = re.search(rf"^table {family} {table} {{\n(.*?)^}}\n", ruleset, re.S | re.M)
    assert match, f"no table {family} {table} in:\n{ruleset}"
    return dict(re.findall(r"^\tchain (\S+) {\n(.*?)^\t}\n", match.group(1), re.S | re.M))


def ebtables_chains(listing: str) -> dict[str, str]:
    """Chain header line -> rules of an ``ebtables -L`` listing."""
    sections = re.split(r"\n(?=Bridge chain: )", listing.strip())
    return {sec.splitlines()[0]: "\n".join(sec.splitlines()[1:]) for sec in sections}


def oracle_block(title: str) -> str:
    """The fenced block following the heading ``title`` in tests/ORACLE.md."""
    text = ORACLE_MD.read_text()
    match = re.search(rf"^#+ {re.escape(title)}\n.*?```\w*\n(.*?)```", text, re.S | re.M)
    assert match, f"no block {title!r} in {ORACLE_MD}"
    return match.group(1)


def test_libvirtd_runs_in_its_namespace(libvirtd):
    assert netlab.run(["ip", "netns", "identify", str(libvirtd.pid)]).stdout.strip() == \
        libvirtd.lab.host_ns
    assert lv.virsh("version").returncode == 0
    assert lv.QEMU_CONF.read_text() == lv.TEST_QEMU_CONF
    assert lv.QEMU_CONF_BACKUP.exists()
    # The shipped filters are there: they are the oracle's input.
    names = lv.virsh("-q", "nwfilter-list").stdout
    assert "clean-traffic" in names


def test_diskless_guest_tap_on_lab_bridge(libvirt_lab, libvirtd):
    guest = libvirtd.start_guest("nwft-fixture-guest", "52:54:00:12:34:56")
    assert guest.tap and guest.tap.startswith("vnet")
    assert re.fullmatch(r"[0-9a-f-]{36}", guest.uuid)
    assert lv.virsh("domstate", guest.name).stdout.strip() == "running"
    enslaved = libvirt_lab.host_run(["ip", "-o", "link", "show", "master", "br0"]).stdout
    assert f" {guest.tap}:" in enslaved
    mac = libvirt_lab.host_run(["cat", f"/sys/class/net/{guest.tap}/address"]).stdout.strip()
    assert mac == "fe:54:00:12:34:56"  # libvirt's tap MAC for guest MAC 52:54:00:12:34:56
    # Not in the root namespace.
    assert netlab.run(["ip", "link", "show", guest.tap], check=False).returncode != 0
    libvirtd.remove_guest(guest.name)
    assert guest.name not in lv.virsh("list", "--all", "--name").stdout.split()


def test_metadata_reaches_the_domain_xml(libvirt_lab, libvirtd):
    meta = ('<nwf:nwfilter xmlns:nwf="http://libvirt-nwfilter.org/xmlns/nwfilter/1.0">'
            '<nwf:interface mac="52:54:00:12:34:57"/></nwf:nwfilter>')
    guest = libvirtd.define_guest("nwft-fixture-meta", "52:54:00:12:34:57", metadata=meta)
    xml = lv.virsh("dumpxml", guest.name).stdout
    assert "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0" in xml
    assert 'mac="52:54:00:12:34:57"' in xml


def test_oracle_clean_traffic_on_veth(libvirt_lab, libvirtd):
    lab = libvirt_lab
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24", port="vp1")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24", port="vp2")
    root_before = netlab.run(["nft", "list", "ruleset"]).stdout

    lv.libvirt_oracle_binding(lab, "vp1", MAC_A, "clean-traffic", {"IP": "10.0.0.1"})
    assert "vp1" in libvirtd.bindings()
    ruleset = lab.ruleset()
    assert "libvirt-I-vp1" in ruleset and "libvirt-O-vp1" in ruleset
    assert nft_chains(normalize(ruleset), "bridge", "nat") == \
        nft_chains(oracle_block("clean-traffic on vp1: nft list ruleset"), "bridge", "nat")
    ebtables = lab.host_run(["ebtables", "-t", "nat", "-L"]).stdout
    assert ebtables_chains(ebtables) == \
        ebtables_chains(oracle_block("clean-traffic on vp1: ebtables -t nat -L"))
    # Nothing happened in the root namespace.
    assert netlab.run(["nft", "list", "ruleset"]).stdout == root_before

    # Verdicts: genuine traffic passes, a spoofed source MAC or IP does not; b's port is
    # unfiltered.
    assert lab.ping(a, b.ipv4)
    genuine = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=a.ipv4, dst=b.ipv4) / ICMP())
    spoofed_mac = bytes(Ether(src="52:54:00:99:99:99", dst=MAC_B) / IP(src=a.ipv4, dst=b.ipv4) / ICMP())
    spoofed_ip = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.0.99", dst=b.ipv4) / ICMP())
    from_b = bytes(Ether(src="52:54:00:99:99:98", dst=MAC_A) / IP(src="10.0.0.98", dst=a.ipv4) / ICMP())
    check_frames(lab, [Probe("genuine", a, genuine, b, True), Probe("spoofed MAC", a, spoofed_mac, b, False),
                       Probe("spoofed IP", a, spoofed_ip, b, False), Probe("spoofed from b", b, from_b, a, True)])

    lv.libvirt_oracle_unbind("vp1")
    assert "vp1" not in libvirtd.bindings()
    assert "libvirt-I-vp1" not in lab.ruleset()
    check_frames(lab, [Probe("spoofed MAC", a, spoofed_mac, b, True), Probe("spoofed IP", a, spoofed_ip, b, True)])


def test_libvirt_lab_fixture_cleans_up(libvirt_lab, libvirtd):
    # The earlier tests' VMs, guests and bindings are gone.
    assert libvirt_lab.vms == {}
    assert libvirtd.bindings() == []
    assert not [n for n in lv.virsh("list", "--all", "--name").stdout.split()
                if n.startswith(lv.GUEST_PREFIX)]

"""The offline engine of ``simulate`` against libvirt's own nwfilter engine (the oracle).

A subset of the reference filters, and a stateless L3 filter of ours, are bound with
``virsh nwfilter-binding-create`` to VM ``a``'s port in the test libvirtd's lab; generated
packets (tests/simgen.py) are sent as real frames between VMs ``a`` (the guest, MAC
52:54:00:00:00:01) and ``b`` and must arrive exactly when the offline engine says they pass.
Only traffic between the two VMs, and no connection state: the VMs' own IP stacks answer some
frames, which would open connections the offline engine does not see (the kernel differential
test covers state). Learning is off on both ports and what they learned is flushed, so the
bridge floods every unicast frame (a frame to the sender's own MAC would otherwise stay on its
port). Seeds: filter N uses ``random.Random(N)``.
"""

from __future__ import annotations

import random

import pytest

import libvirtd as lv
import netlab
from bindings_helpers import MAC_A, MAC_B, ether, untagged
from libvirt_nwfilter.simulate import frames
from libvirt_nwfilter.simulate.evaluate import Simulator
from libvirt_nwfilter.simulate.packet import parse_packets

from simdiff import BUILTIN_PARAMS, ruleset_of
from simgen import ADDRESSES, PacketGenerator
from traffic import Probe, frames as delivered

PACKETS = 60
STATELESS_L3 = """<filter name='nwft-sim-l3' chain='root'>
  <rule action='accept' direction='out' priority='100' statematch='false'><udp dstportstart='53'/></rule>
  <rule action='drop' direction='out' priority='200' statematch='false'><tcp match='no' dstportstart='22'/></rule>
  <rule action='accept' direction='in' priority='300' statematch='false'><icmp type='8'/></rule>
  <rule action='drop' direction='inout' priority='400' statematch='false'><all srcipaddr='10.0.0.0' srcipmask='24'/></rule>
  <filterref filter='no-mac-spoofing'/>
</filter>
"""
CASES = ["clean-traffic", "clean-traffic-gateway", "no-arp-spoofing", "allow-dhcp-server", "no-mac-broadcast",
         "no-ip-multicast", "allow-incoming-ipv4", "qemu-announce-self", "nwft-sim-l3"]


@pytest.fixture(scope="module")
def l3_filter_defined(libvirtd, tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "nwft-sim-l3.xml"
    path.write_text(STATELESS_L3)
    lv.virsh("nwfilter-define", str(path))
    yield
    lv.virsh("nwfilter-undefine", "nwft-sim-l3", check=False)


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASES)
def test_offline_verdicts_equal_libvirts(libvirt_lab, l3_filter_defined, index):
    lab, name = libvirt_lab, CASES[index]
    params = BUILTIN_PARAMS.get(name, {})
    ruleset = ruleset_of(name, params, {"nwft-sim-l3": STATELESS_L3} if name == "nwft-sim-l3" else {})
    words = PacketGenerator(ruleset, random.Random(index), host_packets=False).words(PACKETS)
    packets = parse_packets(words, ADDRESSES)
    offline = Simulator(ruleset).run(parse_packets(words, ADDRESSES))
    a = lab.add_vm("a", MAC_A, ipv4="10.0.0.1/24")
    b = lab.add_vm("b", MAC_B, ipv4="10.0.0.2/24")
    for port in (a.port, b.port):
        netlab.run_in(lab.host_ns, ["bridge", "link", "set", "dev", port, "learning", "off", "flood", "on"])
        netlab.run_in(lab.host_ns, ["ip", "link", "set", "dev", port, "type", "bridge_slave", "fdb_flush"])
    probes = []
    for number, p in enumerate(packets, 1):
        frame = frames.build(p, number, pad=False)  # br_netfilter trims IP packets to their length
        seen = untagged(frame) if p.vlan_id is not None else None
        src, dst = (a, b) if p.direction == "out" else (b, a)
        probes.append(Probe(f"{number}: {p.text}", src, frame, dst, seen_as=seen))
    # twins for the frames libvirt drops: b's port is not filtered, so these pass both ways
    controls = [Probe("control: host to b", netlab.HOST, ether(MAC_B, lab.bridge_mac, 0x88B5, b"to b"), b, True),
                Probe("control: b to host", b, ether(lab.bridge_mac, MAC_B, 0x88B5, b"to host"), netlab.HOST, True)]
    lv.libvirt_oracle_binding(lab, a.port, MAC_A, name, {k: list(v) for k, v in params.items()})
    try:
        theirs = delivered(lab, probes + controls)
    finally:
        lv.libvirt_oracle_unbind(a.port)
    for control in controls:
        del theirs[control.name]
    ours = {probe.name: result.passed for probe, result in zip(probes, offline)}
    wrong = [f"{probe}: libvirt {'delivered' if theirs[probe] else 'dropped'}, offline {'pass' if ours[probe] else 'drop'}"
             for probe in theirs if theirs[probe] != ours[probe]]
    assert len(set(theirs.values())) == 2, f"{name}: libvirt gave one verdict for every packet: the case proves nothing"
    assert not wrong, f"{name} (seed {index}): {len(wrong)} of {len(probes)} differ:\n" + "\n".join(wrong)


def test_domain_target_reads_a_defined_guests_metadata_through_libvirt(libvirtd, tmp_path, capsys):
    """``simulate --domain GUEST --mac MAC``: the guest is defined, not running."""
    from libvirt_nwfilter.cli import main

    metadata = (f"<nwf:nwfilter xmlns:nwf='http://libvirt-nwfilter.org/xmlns/nwfilter/1.0'>"
                f"<nwf:interface mac='{MAC_A}'><nwf:filterref filter='clean-traffic'>"
                "<nwf:parameter name='IP' value='10.0.0.1'/></nwf:filterref></nwf:interface></nwf:nwfilter>")
    guest = libvirtd.define_guest("nwft-sim-guest", MAC_A, metadata=metadata)
    try:
        argv = ["--confdir", str(tmp_path / "conf"), "--rundir", str(tmp_path / "run"), "simulate", "--json",
                "--domain", guest.name, "--mac", MAC_A, "out udp srcipaddr=10.0.0.9", "out udp srcipaddr=10.0.0.1"]
        assert main(argv) == 0
    finally:
        libvirtd.remove_guest(guest.name)
    import json

    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["verdict"] for r in reports] == ["drop", "pass"]
    assert reports[0]["stages"][0]["rule"]["filter"] == "no-ip-spoofing"

"""What a host throws at the tool besides crashes: a backend change in the configuration file, and
domain XML far larger than any filter (a 17 MiB ``<description>``). Real kernel, real frames.

* Backend change: bindings made with nftables (a guest's through the hook, one through the CLI);
  ``backend = ebiptables`` is written into CONFDIR/libvirt-nwfilter.conf. ``verify`` names each
  binding as applied with the other backend; the next change (an unrelated guest's ``start``)
  moves every binding: the records say ebiptables, ebtables holds every port, nftables holds
  none, the frames are filtered as before and ``verify`` passes. Then back to nftables with
  ``reapply``.
* A guest whose domain XML has a 17 MiB description: ``start`` filters its tap and ``stopped``
  (inactive XML, as big) removes the rules; a guest without our metadata and such XML starts
  and stops without a word. Both backends side by side.
"""

from __future__ import annotations

import json

from bindings_helpers import IP_A, IP_B, MAC_A, MAC_B, Cli, dispatch_entries, ip_frame
from crashlab import KillLab, side_by_side
from traffic import Probe, check_frames
from libvirt_nwfilter.backends.nftables.names import SHARD_TABLES

NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
MAC_C, IP_C = "52:54:00:00:00:03", "10.0.0.4"
PEER_MAC, PEER_IP = "52:54:00:00:01:99", "10.0.0.99"
SPOOF = "10.0.0.77"
UUIDS = {"one": "3d0c9a56-64a1-4b8e-8f0e-0c3f9b1d2e01", "other": "3d0c9a56-64a1-4b8e-8f0e-0c3f9b1d2e02",
         "plain": "3d0c9a56-64a1-4b8e-8f0e-0c3f9b1d2e03"}


def domain_xml(name: str, vm, running: bool = True, metadata: bool = True, description: int = 0) -> bytes:
    meta = (f"<metadata><nwf:nwfilter xmlns:nwf='{NS}'><nwf:interface mac='{vm.mac}'>"
            f"<nwf:filterref filter='clean-traffic'><nwf:parameter name='IP' value='{vm.ipv4}'/></nwf:filterref>"
            "</nwf:interface></nwf:nwfilter></metadata>" if metadata else "")
    text = f"<description>{'x' * description}</description>" if description else ""
    target = f"<target dev='{vm.port}'/>" if running else ""
    return (f"<domain type='kvm'><name>{name}</name><uuid>{UUIDS[name]}</uuid>{text}{meta}<devices>"
            f"<interface type='bridge'><mac address='{vm.mac}'/><source bridge='br0'/>{target}</interface>"
            "</devices></domain>").encode()


def hook(run: KillLab, name: str, operation: str, xml: bytes) -> None:
    done = run.run([name, operation, "begin", "-"], hook=True, stdin=xml)
    assert done.returncode == 0 and not done.stderr, f"hook {operation} of {name}: {done.stderr.decode()[:500]}"


def probes(vms: dict, names=("a", "b", "c"), filtered: bool = True) -> list[Probe]:
    peer, found = vms["p"], []
    for name in names:
        vm = vms[name]
        found += [Probe(f"{name}, its address", vm, ip_frame(vm.mac, peer.mac, vm.ipv4, PEER_IP, "udp"), peer, True),
                  Probe(f"{name}, spoofed", vm, ip_frame(vm.mac, peer.mac, SPOOF, PEER_IP, "udp"), peer,
                        not filtered)]
    return found


def lab_vms(lab) -> dict:
    return {"a": lab.add_vm("a", MAC_A, ipv4=f"{IP_A}/24"), "b": lab.add_vm("b", MAC_B, ipv4=f"{IP_B}/24"),
            "c": lab.add_vm("c", MAC_C, ipv4=f"{IP_C}/24"), "p": lab.add_vm("p", PEER_MAC, ipv4=f"{PEER_IP}/24")}


def record_backends(cli: Cli) -> set[str]:
    return {json.loads(p.read_text())["backend"] for p in (cli.rundir / "bindings").glob("*.json")}


def nft_ports(lab) -> bool:
    """Whether nftables holds per-port objects of ours (any ``vpN``)."""
    text = lab.host_run(["nft", "list", "tables"], check=False).stdout + "".join(
        lab.host_run(["nft", "list", "table", "bridge", table], check=False).stdout for table in SHARD_TABLES)
    return any(f"vp{n}" in text for n in range(1, 5))


def ebtables_ports(lab) -> bool:
    return "nwf-I-vp" in lab.host_run(["ebtables-save"], check=False).stdout


def test_backend_change_in_the_configuration_file_moves_every_binding(lab, tmp_path):
    vms = lab_vms(lab)
    cli = Cli(lab.host_ns, tmp_path, "nftables")
    run = KillLab(cli)
    hook(run, "one", "start", domain_xml("one", vms["a"]))
    cli.binding_create("vp2", MAC_B, "clean-traffic", {"IP": IP_B})
    check_frames(lab, probes(vms, ("a", "b")), context="nftables")
    assert nft_ports(lab) and not ebtables_ports(lab)

    (cli.confdir / "libvirt-nwfilter.conf").write_text("backend = ebiptables\n")
    cli.backend = ""  # no LIBVIRT_NWFILTER_BACKEND: the file decides
    drifted = cli.run("verify", check=False)
    assert drifted.returncode == 1, drifted
    for port in ("vp1", "vp2"):
        assert f"{port}: applied with backend nftables, configured ebiptables" in drifted.stdout, drifted.stdout
    hook(run, "other", "start", domain_xml("other", vms["c"]))
    assert record_backends(cli) == {"ebiptables"}
    assert ebtables_ports(lab) and not nft_ports(lab), lab.ruleset()
    assert dispatch_entries(lab.host_ns, "ebiptables") == {"vp1", "vp2", "vp3"}
    check_frames(lab, probes(vms), context="after the move to ebiptables")
    assert cli.run("verify").returncode == 0

    (cli.confdir / "libvirt-nwfilter.conf").write_text("backend = nftables\n")
    moved = cli.run("reapply")
    assert "moving all 3 to nftables" in moved.stderr, moved.stderr
    assert record_backends(cli) == {"nftables"}
    assert nft_ports(lab) and not ebtables_ports(lab)
    assert dispatch_entries(lab.host_ns, "nftables") == {"vp1", "vp2", "vp3"}
    check_frames(lab, probes(vms), context="after the move back to nftables")
    assert cli.run("verify").returncode == 0


def test_domain_xml_of_17_mib(lab, tmp_path):
    side_by_side(lab, tmp_path, huge_domains)


def huge_domains(lab, cli: Cli) -> str:
    vms = lab_vms(lab)
    run = KillLab(cli)
    size = 17 << 20
    hook(run, "one", "start", domain_xml("one", vms["a"], description=size))
    assert dispatch_entries(lab.host_ns, cli.backend) == {"vp1"}
    check_frames(lab, probes(vms, ("a",)), context=f"[{cli.backend}] a guest with a 17 MiB description")
    for operation in ("prepare", "start", "reconnect", "stopped", "release"):
        hook(run, "plain", operation, domain_xml("plain", vms["c"], metadata=False, description=size,
                                                 running=operation != "stopped"))
    hook(run, "one", "stopped", domain_xml("one", vms["a"], running=False, description=size))
    assert dispatch_entries(lab.host_ns, cli.backend) == set()
    assert not list((cli.rundir / "bindings").glob("*.json"))
    check_frames(lab, probes(vms, ("a", "c"), filtered=False), context=f"[{cli.backend}] after stopped")
    return f"[{cli.backend}] 17 MiB domain XML: start, stopped and a guest without metadata"

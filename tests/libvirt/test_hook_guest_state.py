"""The real hook under a real libvirtd, beyond start and stop: ``virsh save``/``restore`` and
``managedsave`` (the hook's ``restore`` operation), ``attach-filter`` rolling back after the kernel
refused the rules, and real frames from a real QEMU guest: network-booting guests whose
firmware (SeaBIOS, iPXE) asks a DHCP server behind the bridge for an address through the
guest's own tap and filter. Every test runs on both backends, except managedsave (the same
``restore`` hook as ``virsh restore``: nftables only).

Fixtures and checks: tests/hook_helpers.py; the DHCP server: tests/dhcpd.py.
"""

from __future__ import annotations

import re
import struct

import libvirtd as lv
import netlab
from bindings_helpers import BCAST, filter_xml, mac_bytes
from dhcpd import DhcpServer
from hook_helpers import (  # noqa: F401  (fixtures)
    FILTERS, NFTABLES_ONLY, NS, assert_ports_run, backend, bindings, clean, dirs, libvirtd_hook, metadata, nwf,
    peer, port_lines, syslog,
)


def state(name: str) -> str:
    return lv.virsh("domstate", name).stdout.strip()


def hook_log_count(dirs, text: str) -> int:
    return dirs["log"].read_text().count(text) if dirs["log"].exists() else 0


# ------------------------------------------------------------------------------------------
# save / restore / managedsave


def test_save_and_restore(clean, libvirtd, nwf, dirs, tmp_path):
    """``virsh save`` unbinds like a stop; ``virsh restore`` runs the ``restore`` hook, which
    refuses while the guest's filter is missing here (the guest stays off, nothing applied) and
    passes once it is back; the restored guest's new tap runs the filter."""
    mac = "52:54:00:a8:00:01"
    guest = libvirtd.start_guest("nwft-hook-save", mac, metadata=metadata(mac, "nwft-in-b5", params={}))
    assert_ports_run(clean, {guest.tap: (mac, "nwft-in-b5")}, "started")
    image = tmp_path / "guest.save"
    lv.virsh("save", guest.name, str(image))
    assert state(guest.name) == "shut off"
    assert bindings(nwf) == {} and port_lines(clean.host_ns, guest.tap) == []

    nwf("undefine", "nwft-in-b5")
    refused = lv.virsh("restore", str(image), check=False)
    assert refused.returncode != 0
    assert f"libvirt-nwfilter: domain '{guest.name}': interface {mac}: referenced filter 'nwft-in-b5' is missing" \
        in refused.stderr, refused.stderr
    assert f"domain '{guest.name}' restore: ERROR: restore refused" in dirs["log"].read_text()
    assert state(guest.name) == "shut off"
    assert bindings(nwf) == {} and port_lines(clean.host_ns, r"vnet\d+") == []

    nwf("define", "-", input=FILTERS["nwft-in-b5"])
    checked = f"domain '{guest.name}' restore: INFO: filters of 1 interface(s) checked"
    before = hook_log_count(dirs, checked)
    lv.virsh("restore", str(image))
    assert hook_log_count(dirs, checked) == before + 1
    assert state(guest.name) == "running"
    tap = libvirtd.guest_tap(guest.name)
    assert bindings(nwf) == {tap: ("nwft-in-b5", guest.name)}
    assert_ports_run(clean, {tap: (mac, "nwft-in-b5")}, "restored")


@NFTABLES_ONLY
def test_managedsave_and_start(clean, libvirtd, nwf, dirs):
    """``virsh managedsave`` unbinds; the next ``virsh start`` restores the image through the
    ``restore`` hook and filters the new tap."""
    mac = "52:54:00:a8:00:11"
    guest = libvirtd.start_guest("nwft-hook-managed", mac, metadata=metadata(mac))
    lv.virsh("managedsave", guest.name)
    assert state(guest.name) == "shut off"
    assert re.search(r"Managed save:\s+yes", lv.virsh("dominfo", guest.name).stdout)
    assert bindings(nwf) == {} and port_lines(clean.host_ns, guest.tap) == []

    checked = f"domain '{guest.name}' restore: INFO: filters of 1 interface(s) checked"
    before = hook_log_count(dirs, checked)
    lv.virsh("start", guest.name)
    assert hook_log_count(dirs, checked) == before + 1, "the start did not go through the restore hook"
    tap = libvirtd.guest_tap(guest.name)
    assert bindings(nwf) == {tap: ("clean-traffic", guest.name)}
    assert_ports_run(clean, {tap: (mac, "clean-traffic")}, "restored from the managed save image")


# ------------------------------------------------------------------------------------------
# attach-filter after a kernel refusal

REVERSED_RANGE = filter_xml("nwft-reversed-range", "<rule action='drop' direction='in' priority='500'>"
                                                   "<tcp dstportstart='9000' dstportend='8000'/></rule>")


def test_attach_filter_rolls_back_after_a_kernel_refusal(clean, libvirtd, nwf):
    """A filter that compiles but that nft / iptables-restore refuses (a reversed port range):
    attach-filter fails with one line and puts the live metadata back; the persistent
    definition, the binding and the tap's rules stay as they were."""
    mac = "52:54:00:a8:00:21"
    guest = libvirtd.start_guest("nwft-hook-rollback", mac, metadata=metadata(mac, "nwft-in-b5", params={}))
    nwf("define", "-", input=REVERSED_RANGE)
    views = {flag: lv.virsh("metadata", guest.name, "--uri", NS, flag).stdout for flag in ("--live", "--config")}
    rules = port_lines(clean.host_ns, guest.tap)

    refused = nwf("attach-filter", guest.name, mac, "nwft-reversed-range", check=False)
    assert refused.returncode == 1 and refused.stdout == "", refused
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0], refused.stderr
    assert {flag: lv.virsh("metadata", guest.name, "--uri", NS, flag).stdout for flag in views} == views
    assert bindings(nwf) == {guest.tap: ("nwft-in-b5", guest.name)}
    assert port_lines(clean.host_ns, guest.tap) == rules
    assert_ports_run(clean, {guest.tap: (mac, "nwft-in-b5")}, "after the refused attach-filter")
    nwf("undefine", "nwft-reversed-range")


# ------------------------------------------------------------------------------------------
# DHCP from a real guest's firmware

SERVER_MAC, SERVER_IP = "52:54:00:a9:00:fd", "10.0.0.1"
GUESTS = {"a": ("52:54:00:a9:00:01", "10.0.0.101"), "b": ("52:54:00:a9:00:02", "10.0.0.102")}


def dhcp_requests(frames, mac: str) -> int:
    """How many of ``frames`` are DHCP client messages (UDP 68 -> 67, BOOTREQUEST) of ``mac``."""
    count = 0
    for frame in frames:
        if frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        ihl = (frame[14] & 0x0F) * 4
        udp = frame[14 + ihl:]
        sport, dport = struct.unpack("!HH", udp[:4])
        bootp = udp[8:]
        if (sport, dport) == (68, 67) and bootp[:1] == b"\x01" and bootp[28:34] == mac_bytes(mac):
            count += 1
    return count


def test_guest_firmware_dhcp_through_its_filter(clean, libvirtd, nwf, tmp_path):
    """Two network-booting guests ask for an address at the same time. ``a`` (clean-traffic with
    its future address as IP) gets its lease: its DHCPDISCOVER/REQUEST left through its filter,
    the OFFER/ACK came back in. ``b`` (no-mac-broadcast: IPv4 to the broadcast MAC is dropped)
    sends DHCPDISCOVERs, seen on its tap, of which none reaches the server behind the bridge,
    in the same wait in which a's did. Once b's filter is clean-traffic too (attach-filter
    --live) and b is reset, b gets its lease."""
    server_vm = clean.add_vm("dhcp", SERVER_MAC, ipv4=f"{SERVER_IP}/24")
    (mac_a, ip_a), (mac_b, ip_b) = GUESTS["a"], GUESTS["b"]
    with DhcpServer(server_vm, tmp_path / "dhcp", hosts={mac_a: ip_a, mac_b: ip_b}) as server:
        a = libvirtd.start_guest("nwft-dhcp-a", mac_a, metadata=metadata(mac_a, params={"IP": ip_a}),
                                 network_boot=True, paused=True)
        b = libvirtd.start_guest("nwft-dhcp-b", mac_b, metadata=metadata(mac_b, "no-mac-broadcast", params={}),
                                 network_boot=True, paused=True)
        assert bindings(nwf) == {a.tap: ("clean-traffic", a.name), b.tap: ("no-mac-broadcast", b.name)}
        broadcast_from = {name: mac_bytes(BCAST) + mac_bytes(mac) for name, mac in (("a", mac_a), ("b", mac_b))}
        on_b_tap = netlab.Capture(clean.host_ns, b.tap, prefixes=[broadcast_from["b"]]).start()
        at_server = netlab.Capture(server_vm.ns, server_vm.iface, prefixes=list(broadcast_from.values())).start()
        for guest in (a, b):
            lv.virsh("resume", guest.name)
        leased = server.wait_lease(mac_a, timeout=90)
        sent_by_b, seen_at_server = on_b_tap.stop(settle=1.0), at_server.stop(settle=1.0)
        assert leased == ip_a, f"no lease for a:\n{server.log()[-3000:]}"
        assert dhcp_requests(seen_at_server, mac_a) >= 2, "a's DISCOVER and REQUEST did not reach the server"
        assert dhcp_requests(sent_by_b, mac_b) >= 1, "b's firmware sent no DHCP request in the same wait"
        assert dhcp_requests(seen_at_server, mac_b) == 0, "b's DHCP requests crossed no-mac-broadcast"
        assert mac_b not in server.leases()

        nwf("attach-filter", b.name, mac_b, "clean-traffic", "--param", f"IP={ip_b}", "--live")
        lv.virsh("reset", b.name)
        assert server.wait_lease(mac_b, timeout=90) == ip_b, f"no lease for b:\n{server.log()[-3000:]}"

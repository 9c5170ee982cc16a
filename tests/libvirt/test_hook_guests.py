"""The real hook under a real libvirtd: disk-less guests whose metadata names our filters.

Fixtures and checks: tests/hook_helpers.py (the wrapper install-hook writes, the backend read from
the configuration file at each run, syslog received through a private /dev/log, which filter a
tap runs told from real frames). Tests marked ``NFTABLES_ONLY`` run on the nftables backend
only; the others on both (the ebiptables subset: start/destroy with syslog, ``reapply --all``
and ``reapply DOMAIN`` restoring wiped rules, libvirtd restart, attach/detach live and
persistent; tests/libvirt/test_hook_guest_state.py adds save/restore, attach-filter's
rollback and the firmware's DHCP).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import re
import time
import uuid

import pytest

import libvirtd as lv
import netlab
from hook_helpers import (  # noqa: F401  (fixtures)
    NFTABLES_ONLY, NS, GUEST_IP, REPO, assert_ports_run, backend, bindings, clean, dirs, libvirtd_hook, metadata,
    nwf, peer, port_lines, syslog, wipe_rules,
)


def start_error(name: str) -> str:
    done = lv.virsh("start", name, check=False)
    assert done.returncode != 0, f"{name} started"
    return done.stderr


def running(name: str) -> bool:
    return lv.virsh("domstate", name).stdout.strip() == "running"


# ------------------------------------------------------------------------------------------


def test_start_binds_the_tap_and_destroy_unbinds(clean, libvirtd, nwf, dirs, syslog):
    """The start hook filters the tap (frames tell: clean-traffic), logs to its file and to
    syslog; destroy removes the binding and every rule naming the tap."""
    mac = "52:54:00:a1:00:01"
    guest = libvirtd.start_guest("nwft-hook-one", mac, metadata=metadata(mac, prefix="x"))
    assert bindings(nwf) == {guest.tap: ("clean-traffic", guest.name)}
    dump = nwf("binding-dumpxml", guest.tap).stdout
    assert f"<uuid>{guest.uuid}</uuid>" in dump and f"<mac address='{mac}'/>" in dump
    assert f"<parameter name='IP' value='{GUEST_IP}'/>" in dump and "<parameter name='MAC'" in dump
    assert_ports_run(clean, {guest.tap: (mac, "clean-traffic")})
    line = f"domain '{guest.name}' start: interface {mac}: port {guest.tap} filtered by 'clean-traffic'"
    assert line.replace(": interface", ": INFO: interface") in dirs["log"].read_text()
    # syslog: facility daemon, severity info (<30>), ident with the hook's PID
    syslog.wait_for(rf"^<30>libvirt-nwfilter-hook\[\d+\]: {re.escape(line)}\x00?$")

    lv.virsh("destroy", guest.name)
    assert bindings(nwf) == {}
    assert port_lines(clean.host_ns, guest.tap) == []
    syslog.wait_for(rf"^<30>libvirt-nwfilter-hook\[\d+\]: domain '{guest.name}' stopped: bindings removed from "
                    rf"{guest.tap}\x00?$")


def readme_dualstack_example() -> str:
    """The README's example domain metadata for clean-traffic-dualstack (inside <metadata>)."""
    blocks = re.findall(r"```xml\n<metadata>\n(.*?)</metadata>\n```", (REPO / "README.md").read_text(), re.S)
    return next(block for block in blocks if "clean-traffic-dualstack" in block)


@NFTABLES_ONLY  # the ND fields are refused by the ebiptables backend
def test_readme_dualstack_example_binds_the_nd_rules(clean, libvirtd, nwf, dirs):
    """The README's dual-stack guest, started by the real hook: its tap is bound to
    clean-traffic-dualstack with both IPV6 values, and the kernel holds the Neighbour Discovery
    checks for them, its MAC-derived link-local address and its MAC."""
    mac = "52:54:00:12:34:56"
    guest = libvirtd.start_guest("nwft-hook-dualstack", mac, metadata=readme_dualstack_example())
    assert bindings(nwf) == {guest.tap: ("clean-traffic-dualstack", guest.name)}
    dump = nwf("binding-dumpxml", guest.tap).stdout
    for value in ("10.0.0.5", "2001:db8::5054:ff:fe12:3456", "2001:db8::a:5"):
        assert f"value='{value}'/>" in dump, dump
    rules = clean.host_run(["nft", "list", "ruleset"]).stdout
    targets = ("2001:db8::5054:ff:fe12:3456", "2001:db8::a:5", "fe80::5054:ff:fe12:3456")
    for target in targets:  # nft prints raw payloads in hex without leading zeros
        assert f"@th,64,128 0x{int(ipaddress.IPv6Address(target)):x} " in rules, f"no NA for {target}:\n{rules}"
    for option_type in (1, 2):  # source (NS) and target (NA) link-layer option: type, length 1, the MAC
        assert f"@th,192,64 0x{option_type:x}01525400123456 " in rules, rules
    assert nwf("verify").returncode == 0
    lv.virsh("destroy", guest.name)
    assert bindings(nwf) == {}
    assert port_lines(clean.host_ns, guest.tap) == []


@NFTABLES_ONLY
def test_guest_without_metadata_is_not_touched(clean, libvirtd, nwf):
    guest = libvirtd.start_guest("nwft-hook-plain", "52:54:00:a1:00:02")
    assert bindings(nwf) == {}
    assert port_lines(clean.host_ns, guest.tap) == []
    assert_ports_run(clean, {guest.tap: (guest.mac, None)})


@pytest.mark.parametrize("meta, expected", [
    # without learning (a missing IP is learned otherwise: tests/libvirt/test_learning.py)
    (metadata("52:54:00:a1:00:03", params={"CTRL_IP_LEARNING": "none"}), r"missing variables: IP"),
    (metadata("52:54:00:a1:00:03", filter="nwft-no-such-filter"), r"'nwft-no-such-filter' is missing"),
    (metadata("52:54:00:a1:00:03", params={"IP": "10.0.0.5;"}), r"parameter 'IP': value '10.0.0.5;' is invalid"),
], ids=["missing-parameter", "unknown-filter", "bad-parameter"])
@NFTABLES_ONLY
def test_refused_start_names_the_problem_and_leaves_nothing(clean, libvirtd, nwf, meta, expected):
    name = "nwft-hook-refused"
    libvirtd.define_guest(name, "52:54:00:a1:00:03", metadata=meta)
    error = start_error(name)
    assert "Hook script execution failed" in error
    assert re.search(r"libvirt-nwfilter: domain 'nwft-hook-refused'.*" + expected, error), error
    assert lv.virsh("domstate", name).stdout.strip() == "shut off"
    assert bindings(nwf) == {}
    assert port_lines(clean.host_ns, r"vnet\d+") == []


@NFTABLES_ONLY
def test_entries_for_absent_macs_never_refuse_a_start(clean, libvirtd, nwf, dirs):
    """Entries naming MACs the guest has no interface with prepare hot-plugs: even broken ones
    (missing variable, invalid value) are only logged; the present interface is filtered."""
    mac = "52:54:00:a1:00:04"
    absent = {"52:54:00:a1:00:98": ("clean-traffic", {"CTRL_IP_LEARNING": "none"}),
              "52:54:00:a1:00:99": ("allow-arp", {"X": "1;"})}
    meta = metadata(mac).replace("</nwf:nwfilter>", "".join(
        f'<nwf:interface mac="{m}"><nwf:filterref filter="{f}">'
        + "".join(f'<nwf:parameter name="{n}" value="{v}"/>' for n, v in p.items())
        + "</nwf:filterref></nwf:interface>" for m, (f, p) in absent.items()) + "</nwf:nwfilter>")
    guest = libvirtd.start_guest("nwft-hook-absent", mac, metadata=meta)
    assert bindings(nwf) == {guest.tap: ("clean-traffic", guest.name)}
    assert_ports_run(clean, {guest.tap: (mac, "clean-traffic")})
    log = dirs["log"].read_text()
    assert re.search(r"prepare: WARNING: interface 52:54:00:a1:00:98 \(not present\).*missing variables: IP", log)
    assert re.search(r"prepare: WARNING: interface 52:54:00:a1:00:99 \(not present\).*value '1;' is invalid", log)


@NFTABLES_ONLY
def test_six_guests_started_and_destroyed_in_parallel(clean, libvirtd, nwf):
    guests = {f"nwft-hook-par{i}": f"52:54:00:a2:00:{i:02x}" for i in range(6)}
    for i, (name, mac) in enumerate(guests.items()):
        libvirtd.define_guest(name, mac, metadata=metadata(mac, params={"IP": f"10.0.1.{i + 1}"}))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda n: lv.virsh("start", n, check=False), guests))
    assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
    taps = {name: libvirtd.guest_tap(name) for name in guests}
    assert bindings(nwf) == {taps[name]: ("clean-traffic", name) for name in guests}
    for i, name in enumerate(guests):
        assert f"value='10.0.1.{i + 1}'" in nwf("binding-dumpxml", taps[name]).stdout
    assert_ports_run(clean, {taps[name]: (mac, "clean-traffic") for name, mac in guests.items()})
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda n: lv.virsh("destroy", n, check=False), guests))
    assert [r.returncode for r in results] == [0] * 6
    assert bindings(nwf) == {}
    assert port_lines(clean.host_ns, r"vnet\d+") == []


@NFTABLES_ONLY
def test_reapply_domain_and_all_rebind_running_guests(clean, libvirtd, nwf, dirs):
    mac = "52:54:00:a3:00:01"
    guest = libvirtd.start_guest("nwft-hook-reapply", mac, metadata=metadata(mac))
    done = nwf("reapply", guest.name)
    assert done.stdout == f"domain '{guest.name}': filtered {guest.tap}\n"
    # the repair of an unreadable record: the binding is derived again from the running guest
    record = dirs["run"] / "bindings" / f"{guest.tap}.json"
    record.write_text(record.read_text()[:40])
    damaged = nwf("verify", check=False)
    assert damaged.returncode == 1 and f"binding record {record} is not valid JSON" in damaged.stdout, damaged
    assert f"'libvirt-nwfilter reapply GUEST'" in damaged.stdout
    assert nwf("reapply", guest.name).stdout == f"domain '{guest.name}': filtered {guest.tap}\n"
    assert nwf("verify").returncode == 0
    assert_ports_run(clean, {guest.tap: (mac, "clean-traffic")}, "after the record's repair")
    done = nwf("reapply", "--all")
    assert f"domain '{guest.name}': filtered {guest.tap}" in done.stdout
    assert bindings(nwf) == {guest.tap: ("clean-traffic", guest.name)}
    assert_ports_run(clean, {guest.tap: (mac, "clean-traffic")})
    refused = nwf("reapply", "nwft-hook-no-such-guest", check=False)
    assert refused.returncode == 1 and "not found" in refused.stderr


@NFTABLES_ONLY
def test_reapply_all_removes_orphans_and_keeps_foreign_bindings(clean, libvirtd, nwf):
    mac = "52:54:00:a3:00:11"
    guest = libvirtd.start_guest("nwft-hook-orphans", mac, metadata=metadata(mac))
    # A binding made with the CLI on a port that is no guest's (e.g. a container's veth).
    clean.host_run(["ip", "link", "add", "nwftorph", "type", "veth", "peer", "name", "nwftorphp"])
    nwf("binding-create", "-", input=lv.binding_xml("nwftorph", "52:54:00:a3:00:12", "allow-arp", owner="nwft-gone"))
    assert "kept the binding on nwftorph" in nwf("reapply", "--all").stdout
    assert set(bindings(nwf)) == {guest.tap, "nwftorph"}
    # Once its port is gone, it is an orphan.
    clean.host_run(["ip", "link", "del", "nwftorph"])
    assert "removed the binding on nwftorph" in nwf("reapply", "--all").stdout
    assert set(bindings(nwf)) == {guest.tap}
    # A guest that went away without the stopped hook (here: forgotten by hand) leaves an
    # orphan too: its owner is a domain libvirt knows that is not running.
    lv.virsh("destroy", guest.name)
    nwf("binding-create", "-", input=lv.binding_xml("nwftorph2", mac, "allow-arp", owner=guest.name,
                                                    owner_uuid=guest.uuid))
    assert "removed the binding on nwftorph2" in nwf("reapply", "--all").stdout
    assert bindings(nwf) == {}


def test_reapply_all_restores_wiped_rules(clean, libvirtd, nwf):
    mac = "52:54:00:a3:00:21"
    guest = libvirtd.start_guest("nwft-hook-wipe", mac, metadata=metadata(mac))
    applied = port_lines(clean.host_ns, guest.tap)
    wipe_rules(clean)
    assert_ports_run(clean, {guest.tap: (mac, None)}, "wiped")
    done = nwf("reapply", "--all", check=False)
    assert done.returncode == 0, done.stderr
    assert f"domain '{guest.name}': filtered {guest.tap}" in done.stdout
    assert_ports_run(clean, {guest.tap: (mac, "clean-traffic")}, "restored by reapply --all")
    assert bindings(nwf) == {guest.tap: ("clean-traffic", guest.name)}
    assert len(port_lines(clean.host_ns, guest.tap)) == len(applied)
    wipe_rules(clean)
    nwf("reapply", guest.name)
    assert_ports_run(clean, {guest.tap: (mac, "clean-traffic")}, "restored by reapply DOMAIN")


@NFTABLES_ONLY
def test_guests_stop_and_start_after_rules_were_wiped(clean, libvirtd, nwf, dirs):
    """The stopped hook must forget a binding whose rules vanished, and a guest that gets the
    same tap name next must start."""
    mac, mac2 = "52:54:00:a3:00:31", "52:54:00:a3:00:32"
    first = libvirtd.start_guest("nwft-hook-wipe1", mac, metadata=metadata(mac))
    wipe_rules(clean)
    lv.virsh("destroy", first.name)
    assert bindings(nwf) == {}, dirs["log"].read_text()
    second = libvirtd.start_guest("nwft-hook-wipe2", mac2, metadata=metadata(mac2, params={"IP": "10.0.0.6"}))
    assert bindings(nwf) == {second.tap: ("clean-traffic", second.name)}
    assert_ports_run(clean, {second.tap: (mac2, "clean-traffic")})
    # Wiped while a guest runs, then another starts: the new one is filtered at once (a start
    # does not survey the kernel); reapply --all restores the running one.
    wipe_rules(clean)
    lv.virsh("start", first.name)
    tap = libvirtd.guest_tap(first.name)
    assert bindings(nwf) == {second.tap: ("clean-traffic", second.name), tap: ("clean-traffic", first.name)}
    assert_ports_run(clean, {tap: (mac, "clean-traffic"), second.tap: (mac2, None)}, "the new guest only")
    nwf("reapply", "--all")
    assert_ports_run(clean, {tap: (mac, "clean-traffic"), second.tap: (mac2, "clean-traffic")})


def wait_for_log(dirs, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = dirs["log"].read_text()
        if text in log or time.monotonic() > deadline:
            return log
        time.sleep(0.2)


def test_libvirtd_restart_reconnects_and_keeps_guests_filtered(clean, libvirtd, nwf, dirs):
    mac = "52:54:00:a4:00:01"
    guest = libvirtd.start_guest("nwft-hook-reconnect", mac, metadata=metadata(mac))
    libvirtd.restart()
    line = f"domain '{guest.name}' reconnect: INFO: interface {mac}: port {guest.tap} filtered by 'clean-traffic'"
    assert line in wait_for_log(dirs, line)
    assert running(guest.name)
    assert_ports_run(clean, {guest.tap: (mac, "clean-traffic")})
    assert bindings(nwf) == {guest.tap: ("clean-traffic", guest.name)}


@NFTABLES_ONLY
def test_libvirtd_restart_with_wiped_rules_reconnect_restores_them(clean, libvirtd, nwf, dirs):
    mac = "52:54:00:a4:00:11"
    guest = libvirtd.start_guest("nwft-hook-reconnect2", mac, metadata=metadata(mac))
    wipe_rules(clean)
    libvirtd.restart()
    line = f"domain '{guest.name}' reconnect: INFO: interface {mac}: port {guest.tap} filtered by 'clean-traffic'"
    assert line in wait_for_log(dirs, line)
    assert running(guest.name)
    assert_ports_run(clean, {guest.tap: (mac, "clean-traffic")})
    assert bindings(nwf) == {guest.tap: ("clean-traffic", guest.name)}


def test_attach_and_detach_filter_live_and_persistent(clean, libvirtd, nwf):
    mac = "52:54:00:a5:00:01"
    guest = libvirtd.start_guest("nwft-hook-attach", mac)
    assert bindings(nwf) == {}

    done = nwf("attach-filter", guest.name, mac.upper(), "clean-traffic", "--param", "IP=10.0.2.1",
               "--param", "IP=10.0.2.2")
    assert "live and persistent configuration" in done.stdout
    assert bindings(nwf) == {guest.tap: ("clean-traffic", guest.name)}
    assert_ports_run(clean, {guest.tap: (mac, "clean-traffic")})
    for flag in ("--live", "--config"):
        text = lv.virsh("metadata", guest.name, "--uri", NS, flag).stdout
        assert f"<interface mac=\"{mac}\">" in text.replace("'", '"') and "10.0.2.2" in text
    assert f'xmlns:nwf="{NS}"' in lv.virsh("dumpxml", "--inactive", guest.name).stdout

    # Refusals change nothing.
    refused = nwf("attach-filter", guest.name, mac, "clean-traffic", "--param", "CTRL_IP_LEARNING=none", check=False)
    assert refused.returncode == 1 and "missing variables: IP" in refused.stderr
    refused = nwf("attach-filter", guest.name, "52:54:00:a5:00:99", "nwft-in-b5", check=False)
    assert refused.returncode == 1 and "no bridge/network/ethernet interface with MAC" in refused.stderr
    assert "10.0.2.2" in nwf("binding-dumpxml", guest.tap).stdout

    done = nwf("detach-filter", guest.name, mac)
    assert f"Removed the binding on {guest.tap}" in done.stdout
    assert bindings(nwf) == {}
    assert port_lines(clean.host_ns, guest.tap) == []
    assert_ports_run(clean, {guest.tap: (mac, None)}, "detached")
    for flag in ("--live", "--config"):
        assert lv.virsh("metadata", guest.name, "--uri", NS, flag, check=False).returncode != 0
    assert nwf("detach-filter", guest.name, mac, check=False).returncode == 1

    # --config only: nothing now, applied at the next start.
    nwf("attach-filter", guest.name, mac, "nwft-in-b5", "--config")
    assert bindings(nwf) == {}
    assert_ports_run(clean, {guest.tap: (mac, None)}, "--config only")
    lv.virsh("destroy", guest.name)
    lv.virsh("start", guest.name)
    tap = libvirtd.guest_tap(guest.name)
    assert bindings(nwf) == {tap: ("nwft-in-b5", guest.name)}
    assert_ports_run(clean, {tap: (mac, "nwft-in-b5")}, "started again")

    # --live only: the persistent definition keeps nwft-in-b5.
    nwf("attach-filter", guest.name, mac, "nwft-in-b6", "--live")
    assert bindings(nwf) == {tap: ("nwft-in-b6", guest.name)}
    assert_ports_run(clean, {tap: (mac, "nwft-in-b6")}, "--live only")
    assert "nwft-in-b5" in lv.virsh("metadata", guest.name, "--uri", NS, "--config").stdout
    lv.virsh("destroy", guest.name)
    nwf("detach-filter", guest.name, mac)  # not running: the persistent definition
    assert lv.virsh("metadata", guest.name, "--uri", NS, "--config", check=False).returncode != 0


@NFTABLES_ONLY
def test_hot_plugged_interface_is_covered_by_reapply(clean, libvirtd, nwf):
    """libvirt runs no hook for hot-plug: the metadata names the new NIC, reapply filters it."""
    mac, mac2 = "52:54:00:a6:00:01", "52:54:00:a6:00:02"
    name = "nwft-hook-hotplug"
    xml = libvirtd.guest_xml(name, mac, metadata=metadata(mac)).replace("</os>", "</os>\n  <features><acpi/></features>")  # PCI hotplug
    libvirtd.define_guest(name, mac, xml=xml)
    lv.virsh("start", name)
    both = metadata(mac).replace("</nwf:interface>", f'</nwf:interface><nwf:interface mac="{mac2}">'
                                 '<nwf:filterref filter="nwft-in-b5"/></nwf:interface>', 1)
    both = both.replace("nwf:", "").replace(f' xmlns:nwf="{NS}"', "")
    lv.virsh("metadata", name, "--uri", NS, "--key", "nwf", "--live", "--set", both)
    nic = (f"<interface type='bridge'><mac address='{mac2}'/><source bridge='{netlab.BRIDGE}'/>"
           "<model type='virtio'/></interface>")
    lv.virsh("attach-device", name, "/dev/stdin", "--live", input=nic)
    taps = re.findall(r"<target dev='([^']+)'", lv.virsh("dumpxml", name).stdout)
    assert len(taps) == 2
    assert bindings(nwf) == {taps[0]: ("clean-traffic", name)}
    done = nwf("reapply", name)
    assert done.stdout == f"domain '{name}': filtered {', '.join(sorted(taps))}\n"
    assert bindings(nwf) == {taps[0]: ("clean-traffic", name), taps[1]: ("nwft-in-b5", name)}
    assert_ports_run(clean, {taps[0]: (mac, "clean-traffic"), taps[1]: (mac2, "nwft-in-b5")})


@NFTABLES_ONLY
def test_convert_domain_moves_native_filterref(clean, libvirtd, nwf):
    mac = "52:54:00:a7:00:01"
    name = "nwft-hook-convert"
    native = "      <filterref filter='clean-traffic'><parameter name='IP' value='10.0.3.1'/></filterref>\n"
    libvirtd.define_guest(name, mac, interface_extra=native)
    done = nwf("convert-domain", name)
    assert f"interface {mac}: filter 'clean-traffic' moved" in done.stdout
    xml = lv.virsh("dumpxml", "--inactive", name).stdout
    assert "<filterref" not in xml.split("<devices>")[1] and NS in xml
    lv.virsh("start", name)
    tap = libvirtd.guest_tap(name)
    assert libvirtd.bindings() == []  # not libvirt's any more
    assert bindings(nwf) == {tap: ("clean-traffic", name)}
    assert_ports_run(clean, {tap: (mac, "clean-traffic")})
    assert "no native <filterref> to convert" in nwf("convert-domain", name).stdout


@NFTABLES_ONLY
def test_import_libvirt_filters(libvirtd, nwf, tmp_path):
    own = tmp_path / "nwft-imported.xml"
    own.write_text("<filter name='nwft-imported' chain='ipv4'>\n"
                   "  <rule action='drop' direction='out' priority='100'><ip protocol='udp' dstportstart='9'/></rule>\n"
                   "</filter>\n")
    lv.virsh("nwfilter-define", str(own))
    try:
        done = nwf("import-libvirt")
        lines = done.stdout.splitlines()
        assert "clean-traffic: identical, skipped" in lines
        assert "nwft-imported: imported" in lines
        assert lines[-1] == f"{len(lines) - 1} filter(s) in libvirt: 1 imported, {len(lines) - 2} identical, 0 not imported"
        assert "dstportstart='9'" in nwf("dumpxml", "nwft-imported").stdout
        assert "nwft-imported: identical, skipped" in nwf("import-libvirt").stdout.splitlines()
    finally:
        lv.virsh("nwfilter-undefine", "nwft-imported", check=False)


def libvirt_filter(name: str, uuid: str, port: int) -> str:
    return (f"<filter name='{name}' chain='ipv4'>\n  <uuid>{uuid}</uuid>\n"
            f"  <rule action='drop' direction='out' priority='100'><ip protocol='udp' dstportstart='{port}'/></rule>\n"
            "</filter>\n")


@NFTABLES_ONLY
def test_import_libvirt_conflicts_change_nothing_here(libvirtd, nwf):
    """libvirt's filter of a name defined here with other content, and one whose UUID a filter
    of another name has here, are not imported (one line each, exit 1); the rest is, and the
    filters defined here stay as they were."""
    ids = {name: str(uuid.uuid4()) for name in ("clash-theirs", "clash-ours", "uuid-theirs", "new")}
    theirs = {"nwft-imp-clash": libvirt_filter("nwft-imp-clash", ids["clash-theirs"], 9),
              "nwft-imp-uuid": libvirt_filter("nwft-imp-uuid", ids["uuid-theirs"], 10),
              "nwft-imp-new": libvirt_filter("nwft-imp-new", ids["new"], 11)}
    ours = {"nwft-imp-clash": libvirt_filter("nwft-imp-clash", ids["clash-ours"], 12),
            "nwft-imp-other": libvirt_filter("nwft-imp-other", ids["uuid-theirs"], 13)}
    try:
        for xml in theirs.values():
            lv.virsh("nwfilter-define", "/dev/stdin", input=xml)
        for xml in ours.values():
            nwf("define", "-", input=xml)
        before = {name: nwf("dumpxml", name).stdout for name in ours}

        done = nwf("import-libvirt", check=False)
        lines = done.stdout.splitlines()
        assert done.returncode == 1, done
        assert f"nwft-imp-clash: not imported: defined here with another content and UUID {ids['clash-ours']}; " \
               "not replaced (undefine it first to import libvirt's)" in lines, lines
        assert "nwft-imp-uuid: not imported: filter with same UUID but different name ('nwft-imp-other') " \
               "already exists" in lines, lines
        assert "nwft-imp-new: imported" in lines
        assert re.fullmatch(r"\d+ filter\(s\) in libvirt: 1 imported, \d+ identical, 2 not imported", lines[-1])
        assert {name: nwf("dumpxml", name).stdout for name in ours} == before
        assert nwf("dumpxml", "nwft-imp-uuid", check=False).returncode == 1
        assert f"<uuid>{ids['new']}</uuid>" in nwf("dumpxml", "nwft-imp-new").stdout
    finally:
        for name in theirs:
            lv.virsh("nwfilter-undefine", name, check=False)
        for name in [*ours, "nwft-imp-new"]:
            nwf("undefine", name, check=False)

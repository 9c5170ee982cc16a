"""The resident service against a real libvirtd and real QEMU guests: hot-plug, unplug, live
metadata edits and self-healing.

The hook wrapper is the one ``install-hook`` writes; ``libvirt-nwfilterd`` runs as a process in
libvirtd's namespace, connected to it. The guest's metadata names its own MAC, a MAC it does
not have yet (filter complete) and another one whose filter lacks a variable (IP, learning off).
"""

from __future__ import annotations

import re
import subprocess

import pytest

import libvirtd as lv
import netlab
from bindings_helpers import dispatch_entries, wait_until
from service_helpers import Daemon, client_argv, env_for

NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
MAC, HOTPLUG, BROKEN = "52:54:00:b1:00:01", "52:54:00:b1:00:02", "52:54:00:b1:00:03"
NO_IP = {"CTRL_IP_LEARNING": "none"}  # IP missing and not to be learned: the filter cannot be instantiated


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("nwf-service")
    paths = {"conf": base / "conf", "run": base / "run", "hooks": base / "hooks", "log": base / "hook.log",
             "base": base}
    paths["conf"].mkdir()
    return paths


@pytest.fixture(scope="module")
def libvirtd_hook(dirs):
    done = subprocess.run(client_argv(None, "--backend", "nftables", "install-hook", "--no-service", "--hooks-dir", str(dirs["hooks"]),
                                      "--log-file", str(dirs["log"])),
                          capture_output=True, text=True, timeout=60, env=env_for(dirs["conf"], dirs["run"]))
    assert done.returncode == 0, done.stderr
    return (dirs["hooks"] / "qemu.d" / "libvirt-nwfilter").read_text()


@pytest.fixture(scope="module")
def service(libvirtd, dirs):
    daemon = Daemon(libvirtd.lab.host_ns, dirs["conf"], dirs["run"], options=("--heal-interval", "3600"),
                    log=dirs["base"] / "service.log").start()
    try:
        daemon.wait_log("libvirt: connected to qemu:///system")
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def nwf(libvirtd, dirs):
    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(client_argv(libvirtd.lab.host_ns, *args), capture_output=True, text=True, timeout=120,
                              env=env_for(dirs["conf"], dirs["run"]))
        assert not check or done.returncode == 0, done.stderr
        return done
    return run


def bindings(nwf) -> dict[str, str]:
    rows = [line.split() for line in nwf("-q", "binding-list").stdout.splitlines() if line.strip()]
    return {cols[0]: cols[1] for cols in rows}


def entry(mac: str, filter: str, params: dict[str, str]) -> str:
    inner = "".join(f'<nwf:parameter name="{n}" value="{v}"/>' for n, v in params.items())
    return f'<nwf:interface mac="{mac}"><nwf:filterref filter="{filter}">{inner}</nwf:filterref></nwf:interface>'


def metadata(*entries: str) -> str:
    return f'    <nwf:nwfilter xmlns:nwf="{NS}">{"".join(entries)}</nwf:nwfilter>'


def nic(mac: str) -> str:
    """A hot-pluggable NIC. USB (``usb-net``): a disk-less guest runs only firmware, which does
    not acknowledge an ACPI PCI unplug, so a virtio NIC could be attached but never detached."""
    return (f"<interface type='bridge'><mac address='{mac}'/><source bridge='{netlab.BRIDGE}'/>"
            "<model type='usb-net'/></interface>")


def taps(name: str) -> dict[str, str]:
    xml = lv.virsh("dumpxml", name).stdout
    return {mac: tap for mac, tap in re.findall(r"<mac address='([^']+)'/>.*?<target dev='([^']+)'", xml, re.S)}


def test_hotplug_unplug_live_metadata_and_flush(libvirt_lab, libvirtd, service, nwf):
    name = "nwft-svc-hotplug"
    meta = metadata(entry(MAC, "clean-traffic", {"IP": "10.0.5.1"}), entry(HOTPLUG, "clean-traffic", {"IP": "10.0.5.2"}),
                    entry(BROKEN, "clean-traffic", NO_IP))
    xml = libvirtd.guest_xml(name, MAC, metadata=meta).replace("</os>", "</os>\n  <features><acpi/></features>")
    libvirtd.define_guest(name, MAC, xml=xml)
    lv.virsh("start", name)  # the entries for absent MACs (one broken) do not refuse the start
    first = taps(name)[MAC]
    assert bindings(nwf) == {first: "clean-traffic"}

    # Hot-plug of the prepared MAC: bound on its tap.
    offset = len(service.log_text())
    lv.virsh("attach-device", name, "/dev/stdin", "--live", input=nic(HOTPLUG))
    service.wait_log(f"interface {HOTPLUG} attached: port", start=offset)
    second = taps(name)[HOTPLUG]
    assert bindings(nwf) == {first: "clean-traffic", second: "clean-traffic"}
    assert "value='10.0.5.2'" in nwf("binding-dumpxml", second).stdout
    assert dispatch_entries(libvirt_lab.host_ns, "nftables") == {first, second}

    # The MAC whose filter lacks a variable: detached again, the guest keeps running.
    offset = len(service.log_text())
    lv.virsh("attach-device", name, "/dev/stdin", "--live", input=nic(BROKEN))
    log = service.wait_log(f"interface {BROKEN}", start=offset)
    assert wait_until(lambda: BROKEN not in taps(name), timeout=30), log
    assert re.search(rf"interface {BROKEN} \(\S+\) detached again: its filter cannot be instantiated: .*IP", log), log
    assert lv.virsh("domstate", name).stdout.strip() == "running"
    assert set(bindings(nwf)) == {first, second}

    # Unplug: the binding goes.
    offset = len(service.log_text())
    lv.virsh("detach-device", name, "/dev/stdin", "--live", input=nic(HOTPLUG))
    assert wait_until(lambda: set(bindings(nwf)) == {first}, timeout=60), service.log_text()[offset:]
    assert dispatch_entries(libvirt_lab.host_ns, "nftables") == {first}

    # Live metadata edit: the kernel follows (another filter and parameter); a refused one
    # (missing variable) leaves the rules.
    offset = len(service.log_text())
    changed = metadata(entry(MAC, "clean-traffic", {"IP": "10.0.5.9"})).replace("nwf:", "").replace(' xmlns:nwf="' + NS + '"', "")
    lv.virsh("metadata", name, "--uri", NS, "--key", "nwf", "--live", "--set", changed.strip())
    assert wait_until(lambda: "value='10.0.5.9'" in nwf("binding-dumpxml", first).stdout, timeout=30), \
        service.log_text()[offset:]
    ruleset = libvirt_lab.host_run(["nft", "list", "ruleset"]).stdout
    assert "10.0.5.9" in ruleset and "10.0.5.1" not in ruleset
    offset = len(service.log_text())
    refused = metadata(entry(MAC, "clean-traffic", NO_IP)).replace("nwf:", "").replace(' xmlns:nwf="' + NS + '"', "")
    lv.virsh("metadata", name, "--uri", NS, "--key", "nwf", "--live", "--set", refused.strip())
    service.wait_log("metadata change refused, the rules stay as they were", start=offset)
    assert "value='10.0.5.9'" in nwf("binding-dumpxml", first).stdout
    assert "10.0.5.9" in libvirt_lab.host_run(["nft", "list", "ruleset"]).stdout

    # A foreign flush: the guest's port is filtered again.
    offset = len(service.log_text())
    libvirt_lab.host_run(["nft", "flush", "ruleset"])
    service.wait_log("repaired: 1 binding(s) rebuilt in one transaction", start=offset)
    assert dispatch_entries(libvirt_lab.host_ns, "nftables") == {first}
    assert "10.0.5.9" in libvirt_lab.host_run(["nft", "list", "ruleset"]).stdout
    status = nwf("status").stdout
    assert "connected to qemu:///system" in status and "restored" in status
    lv.virsh("destroy", name)
    assert bindings(nwf) == {}

"""Recovering from rules removed behind our back (``nft flush ruleset``), on both backends.

The hook's ``reconnect`` and the CLI's ``reapply`` call ``Service.bind_owner`` to make the kernel
match the state again; the ``stopped`` hook and ``binding-delete`` must be able to forget a
binding whose rules are gone. (Once, both failed with the nftables backend: the plan deleted the
map elements the old record listed, and nft refused the whole transaction because they no
longer existed. Under libvirtd a failing ``reconnect`` hook kills the running guest.)

Each test checks what the kernel holds — the port's rules, compared with the ones the first
binding applied (generation numbers in chain names aside) — and what it does to real frames:
VM ``a``'s genuine frame passes, its spoofed ones are dropped while it is filtered and pass when
the rules are gone.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import netlab
from bindings_helpers import BACKENDS, IP_B, MAC_B, SPOOF_MAC, arp_request, ip_frame, kernel_snapshot
from traffic import Probe, check_frames

MAC, IP = "52:54:00:b1:00:01", "10.0.0.5"
UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"

SCRIPT = """
from libvirt_nwfilter.config import Config
from libvirt_nwfilter.model import Binding, FilterRef
from libvirt_nwfilter.service import Service
service = Service(Config.load())
binding = Binding("owner", "{uuid}", "{port}", "{mac}", FilterRef("clean-traffic", (("IP", ("{ip}",)),)))
{step}
"""
STEPS = {"bind": "service.bind_owner([binding])", "unbind": "service.unbind_owner(binding.owner_uuid)"}


@pytest.fixture(params=BACKENDS)
def service(request, lab, tmp_path):
    """``service(step)`` runs one Service call (bind/unbind of clean-traffic on VM a's port) in
    the lab's host namespace, where the port and the rules are; a failure fails the test."""
    def call(port: str, step: str) -> None:
        code = SCRIPT.format(uuid=UUID, port=port, mac=MAC, ip=IP, step=STEPS[step])
        env = ["env", f"LIBVIRT_NWFILTER_CONFDIR={tmp_path / 'conf'}",
               f"LIBVIRT_NWFILTER_RUNDIR={tmp_path / 'run'}", f"LIBVIRT_NWFILTER_BACKEND={request.param}"]
        done = netlab.run_in(lab.host_ns, [*env, sys.executable, "-c", code], check=False, timeout=120)
        assert done.returncode == 0, f"{step} failed ({request.param}): {done.stderr}"
    call.rundir = tmp_path / "run"
    return call


@pytest.fixture
def vms(lab):
    return lab.add_vm("a", MAC, ipv4=f"{IP}/24"), lab.add_vm("b", MAC_B, ipv4=f"{IP_B}/24")


def probes(a, b, filtered: bool) -> list[Probe]:
    """a's spoofed frames (dropped only when ``filtered``) and their genuine twins."""
    return [Probe("genuine IPv4", a, ip_frame(MAC, MAC_B, IP, IP_B), b, True),
            Probe("genuine ARP", a, arp_request(MAC, IP, IP_B), b, True),
            Probe("spoofed MAC", a, ip_frame(SPOOF_MAC, MAC_B, IP, IP_B), b, not filtered),
            Probe("spoofed IP", a, ip_frame(MAC, MAC_B, "10.0.0.9", IP_B), b, not filtered),
            Probe("ARP lie", a, arp_request(MAC, "10.0.0.9", IP_B), b, not filtered)]


def port_rules(ns: str, port: str) -> dict[str, list[str]]:
    """The port's rules as content: every line of the firewall listings (nft, ebtables,
    iptables, ip6tables) that names ``port`` or lies in a chain whose name does, prefixed with
    its chain, generation numbers in our chain names (``I-<gen>/port``) masked, sorted."""
    named = re.compile(rf"(?<!\w){re.escape(port)}(?!\w)")
    found = {}
    for tool, text in kernel_snapshot(ns).items():
        chain, lines = "", []
        for line in text.splitlines():
            line = re.sub(r"\b([IO])-\d+/", r"\1-#/", line.strip())
            if line.startswith("chain ") and line.endswith("{"):
                chain = line
            elif line == "}":
                chain = ""
            if named.search(chain) or named.search(line):
                lines.append(f"{chain} {line}")
        found[tool] = sorted(lines)
    return found


def wipe(lab) -> None:
    lab.host_run(["nft", "flush", "ruleset"])
    assert lab.ruleset().strip() == ""


def test_rebind_with_rules_in_place(lab, service, vms):
    a, b = vms
    service(a.port, "bind")
    applied = port_rules(lab.host_ns, a.port)
    assert any(applied.values()), "no rule names the port"
    check_frames(lab, probes(a, b, filtered=True), context="bound")
    service(a.port, "bind")
    assert port_rules(lab.host_ns, a.port) == applied
    check_frames(lab, probes(a, b, filtered=True), context="bound again")
    service(a.port, "unbind")
    assert not any(port_rules(lab.host_ns, a.port).values())
    check_frames(lab, probes(a, b, filtered=False), context="unbound")


def test_rebind_after_rules_were_wiped_restores_them(lab, service, vms):
    a, b = vms
    service(a.port, "bind")
    applied = port_rules(lab.host_ns, a.port)
    wipe(lab)
    check_frames(lab, probes(a, b, filtered=False), context="wiped")
    service(a.port, "bind")
    assert port_rules(lab.host_ns, a.port) == applied
    check_frames(lab, probes(a, b, filtered=True), context="restored")


def test_unbind_after_rules_were_wiped_forgets_the_binding(lab, service, vms):
    a, b = vms
    service(a.port, "bind")
    applied = port_rules(lab.host_ns, a.port)
    wipe(lab)
    service(a.port, "unbind")
    assert not list((service.rundir / "bindings").glob("*.json"))
    assert not any(port_rules(lab.host_ns, a.port).values())
    check_frames(lab, probes(a, b, filtered=False), context="unbound")
    # forgotten for good: binding the port again starts from scratch and filters it
    service(a.port, "bind")
    assert port_rules(lab.host_ns, a.port) == applied
    check_frames(lab, probes(a, b, filtered=True), context="bound anew")

"""Self-healing with real frames: a foreign change to our rules is repaired by the service.

Two VMs (a, b) behind the lab bridge; ``a``'s port runs ``clean-traffic`` (IP 10.0.0.1).
Probes: ``a`` sending with its own MAC and IP reaches ``b`` (the positive twin); ``a`` spoofing
its source MAC, or its source IP, is dropped. After ``nft flush ruleset`` (or the deletion of
one of our port chains' rules) the service rebuilds the rules and the same probes give the
same verdicts again; meanwhile ``status`` reports the repair. With the ebiptables backend the
service finds ``ebtables -t nat -F`` and ``iptables -F`` by its periodic check and repairs them
the same way.
"""

from __future__ import annotations

import json

import pytest

from bindings_helpers import IP_A, IP_B, MAC_A, MAC_B, binding_xml, dispatch_entries, ip_frame, wait_until
from service_helpers import Daemon, client_argv, env_for
from traffic import Probe, check_frames
from libvirt_nwfilter.backends.nftables.names import shard_of

SPOOF_MAC = "52:54:00:00:00:99"


def probes(a, b) -> list[Probe]:
    return [Probe("own MAC and IP", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B, "udp"), b, True),
            Probe("spoofed MAC", a, ip_frame(SPOOF_MAC, MAC_B, IP_A, IP_B, "udp"), b, False),
            Probe("spoofed IP", a, ip_frame(MAC_A, MAC_B, "10.0.0.77", IP_B, "udp"), b, False)]


@pytest.fixture
def healed(lab, tmp_path, request):
    """The nftables service (watching notifications), or with ``indirect`` parametrization
    ``"ebiptables"``: the ebiptables service checking every second."""
    backend = getattr(request, "param", "nftables")
    interval = "1" if backend == "ebiptables" else "3600"
    a = lab.add_vm("a", MAC_A, ipv4=f"{IP_A}/24")
    b = lab.add_vm("b", MAC_B, ipv4=f"{IP_B}/24")
    conf, run = tmp_path / "conf", tmp_path / "run"
    conf.mkdir()
    daemon = Daemon(lab.host_ns, conf, run, backend=backend, options=("--no-libvirt", "--heal-interval", interval),
                    log=tmp_path / "service.log").start()

    def cli(*args: str, input: str = ""):
        import subprocess

        return subprocess.run(client_argv(lab.host_ns, *args), input=input, capture_output=True, text=True,
                              env=env_for(conf, run, backend), timeout=120)
    try:
        assert cli("binding-create", "-", input=binding_xml(a.port, MAC_A, "clean-traffic", {"IP": IP_A})).returncode == 0
        yield lab, a, b, daemon, cli
    finally:
        daemon.stop()


def test_flush_ruleset_is_repaired_and_frames_are_filtered_again(healed):
    lab, a, b, daemon, cli = healed
    check_frames(lab, probes(a, b), context="before the flush")
    offset = len(daemon.log_text())
    lab.host_run(["nft", "flush", "ruleset"])
    daemon.wait_log("repaired: 1 binding(s) rebuilt in one transaction", start=offset)
    assert dispatch_entries(lab.host_ns, "nftables") == {a.port}
    check_frames(lab, probes(a, b), context="after the repair")
    assert f"rules of 1 port(s) changed behind our back ({a.port})" in daemon.log_text()[offset:]
    status = cli("status").stdout
    assert "Service:" in status and "running" in status and f"1 port(s) restored ({a.port})" in status
    assert cli("verify").returncode == 0


def test_a_rule_removed_from_a_port_chain_is_repaired(healed):
    lab, a, b, daemon, cli = healed
    tables = json.loads(lab.host_run(["nft", "-j", "list", "table", "bridge", shard_of(a.port)]).stdout)
    rules = [item["rule"] for item in tables["nftables"]
             if "rule" in item and a.port in item["rule"]["chain"] and "drop" in json.dumps(item["rule"]["expr"])]
    assert rules, "no drop rule in the port's chains"
    offset = len(daemon.log_text())
    for rule in rules:
        lab.host_run(["nft", "delete", "rule", "bridge", shard_of(a.port), rule["chain"], "handle",
                      str(rule["handle"])])
    daemon.wait_log("repaired: 1 binding(s) rebuilt", start=offset)
    check_frames(lab, probes(a, b), context="after the repair")
    assert cli("verify").returncode == 0


def test_changes_through_the_tool_are_not_repairs(healed):
    lab, a, b, daemon, cli = healed
    offset = len(daemon.log_text())
    assert cli("binding-delete", a.port).returncode == 0
    assert cli("binding-create", "-", input=binding_xml(a.port, MAC_A, "no-mac-spoofing")).returncode == 0
    assert wait_until(lambda: (daemon.rundir / "kernel-intact.json").exists(), timeout=30)
    assert "repaired" not in daemon.log_text()[offset:]
    got = check_frames(lab, probes(a, b)[:2])
    assert got == {"own MAC and IP": True, "spoofed MAC": False}


L3_FILTER = """<filter name='nwft-heal-l3' chain='root'>
  <filterref filter='clean-traffic'/>
  <rule action='drop' direction='out' priority='500'><udp dstportstart='9'/></rule>
</filter>
"""


def l3_probes(a, b) -> list[Probe]:
    return [Probe("UDP to port 7", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B, "udp", dport=7), b, True),
            Probe("UDP to port 9", a, ip_frame(MAC_A, MAC_B, IP_A, IP_B, "udp", dport=9), b, False)]


@pytest.mark.parametrize("healed", ["ebiptables"], indirect=True)
def test_ebiptables_flushes_are_found_by_the_periodic_check_and_repaired(healed):
    """``ebtables -t nat -F`` takes the MAC/IP checks (ebtables), ``iptables -F`` the UDP rule
    (iptables): each is found by the next check and repaired, verdicts checked with frames."""
    lab, a, b, daemon, cli = healed
    assert cli("define", "-", input=L3_FILTER).returncode == 0
    assert cli("binding-delete", a.port).returncode == 0
    created = cli("binding-create", "-", input=binding_xml(a.port, MAC_A, "nwft-heal-l3", {"IP": IP_A}))
    assert created.returncode == 0, created.stderr
    for flush, frames in ((["ebtables", "-t", "nat", "-F"], probes), (["iptables", "-F"], l3_probes)):
        check_frames(lab, frames(a, b), context=f"before {' '.join(flush)}")
        offset = len(daemon.log_text())
        lab.host_run(flush)
        daemon.wait_log("repaired: 1 binding(s) rebuilt in one transaction", start=offset)
        assert f"rules of 1 port(s) changed behind our back ({a.port})" in daemon.log_text()[offset:]
        check_frames(lab, frames(a, b), context=f"after {' '.join(flush)} was repaired")
        assert cli("verify").returncode == 0

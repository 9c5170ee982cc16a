"""``libvirt-nwfilter simulate --kernel`` end to end, on both backends: the real frames go
through the port's real rules in a throw-away namespace, and the report names the deciding rule
from the kernel's own trace (its chain and rule text, and the filter rule it came from)."""

from __future__ import annotations

import json
import os

import pytest

from libvirt_nwfilter.cli import main
from libvirt_nwfilter.executor import SIMULATION_PREFIX

BINDING = """<filterbinding>
  <owner><name>guest1</name><uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid></owner>
  <portdev name='vnet3'/>
  <mac address='52:54:00:12:34:56'/>
  <filterref filter='clean-traffic'><parameter name='IP' value='10.0.0.5'/></filterref>
</filterbinding>
"""
PACKETS = ["out tcp srcipaddr=10.0.0.66 dstportstart=22", "out tcp srcipaddr=10.0.0.5 dstportstart=22",
           "out arp opcode=Reply arpsrcmacaddr=52:54:00:66:66:66", "out arp opcode=Reply",
           "out udp srcipaddr=0.0.0.0 dstipaddr=255.255.255.255 srcportstart=68 dstportstart=67 --to-host",
           "in udp srcportstart=53 dstportstart=40000 --from-host"]


def _own_namespaces() -> list[str]:
    import subprocess

    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines()
            if line.startswith(f"{SIMULATION_PREFIX}{os.getpid()}-")]


@pytest.mark.parametrize("backend", ["nftables", "ebiptables"])
def test_kernel_report_names_the_rules_from_the_trace(kernel_env, backend, tmp_path, capsys):
    binding = tmp_path / "binding.xml"
    binding.write_text(BINDING)
    argv = ["--confdir", str(tmp_path / "conf"), "--rundir", str(tmp_path / "run"), "--backend", backend,
            "simulate", "--kernel", "--json", str(binding), *PACKETS]
    assert main(argv) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["verdict"] for r in reports] == ["drop", "pass", "drop", "pass", "pass", "pass"]
    assert [r["kernel"]["verdict"] for r in reports] == [r["verdict"] for r in reports]
    named = [(r["kernel"]["stages"][0].get("rule", {}).get("filter"), r["kernel"]["stages"][0].get("rule", {}).get("rule"))
             for r in reports[:4]]
    assert named == [("no-ip-spoofing", 3), ("clean-traffic", 1), ("no-arp-mac-spoofing", 2), ("clean-traffic", 2)]
    first = reports[0]["kernel"]["stages"][0]
    assert first["kernel-verdict"] == "drop" and first["chain"] and first["handle"]
    assert not _own_namespaces(), "the throw-away namespace must be gone"


def test_kernel_text_report_says_whether_the_kernel_agrees(kernel_env, tmp_path, capsys):
    binding = tmp_path / "binding.xml"
    binding.write_text(BINDING)
    argv = ["--confdir", str(tmp_path / "conf"), "--rundir", str(tmp_path / "run"), "--backend", "nftables",
            "simulate", str(binding), PACKETS[0], "--kernel"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "kernel (nftables): drop (agrees with the offline engine)" in out
    assert "= filter 'no-ip-spoofing' rule 3 (priority 1000, drop)" in out

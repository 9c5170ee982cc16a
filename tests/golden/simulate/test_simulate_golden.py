"""Golden outputs of ``libvirt-nwfilter simulate``: the explanations operators read.

Each case runs the CLI in-process on a binding file (offline engine) and compares its standard
output with ``<case>.txt`` beside this file. ``LIBVIRT_NWFILTER_REGEN_GOLDEN=1`` rewrites the
files instead (review the diff before committing).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from libvirt_nwfilter.cli import main

HERE = Path(__file__).resolve().parent
REGEN = os.environ.get("LIBVIRT_NWFILTER_REGEN_GOLDEN") == "1"
CLEAN = ("clean-traffic", {"IP": "10.0.0.5"})
STATEFUL = ("guest-opens-tcp", {})
STATEFUL_XML = """<filter name='guest-opens-tcp' chain='root'>
  <rule action='accept' direction='out' priority='100'><tcp/></rule>
  <rule action='drop' direction='inout' priority='1000'><all/></rule>
</filter>
"""

CASES = {
    "clean_traffic_dhcp_passes": (CLEAN, [
        "out udp srcipaddr=0.0.0.0 dstipaddr=255.255.255.255 srcportstart=68 dstportstart=67",
        "in udp srcipaddr=10.0.0.254 dstipaddr=255.255.255.255 srcportstart=67 dstportstart=68"]),
    "clean_traffic_forged_source_ip": (CLEAN, ["out tcp srcipaddr=10.0.0.66 dstportstart=22"]),
    "clean_traffic_arp_reply_foreign_mac": (CLEAN, ["out arp opcode=Reply arpsrcmacaddr=52:54:00:66:66:66"]),
    "clean_traffic_ipv6_dropped": (CLEAN, ["out tcp-ipv6 dstportstart=443"]),
    "state_needs_a_connection": (STATEFUL, [
        "in tcp srcportstart=443 dstportstart=40000 flags=SYN,ACK",
        "out tcp srcportstart=40000 dstportstart=443",
        "in tcp srcportstart=443 dstportstart=40000 flags=SYN,ACK"]),
    "json_forged_source_ip": (CLEAN, ["--json", "out tcp srcipaddr=10.0.0.66 dstportstart=22"]),
}


def binding_file(tmp_path: Path, target) -> Path:
    name, params = target
    parameters = "".join(f"<parameter name='{k}' value='{v}'/>" for k, v in params.items())
    path = tmp_path / "binding.xml"
    path.write_text(f"""<filterbinding>
  <owner><name>guest1</name><uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid></owner>
  <portdev name='vnet3'/>
  <mac address='52:54:00:12:34:56'/>
  <filterref filter='{name}'>{parameters}</filterref>
</filterbinding>
""")
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_golden(case, tmp_path, capsys):
    target, words = CASES[case]
    base = ["--confdir", str(tmp_path / "conf"), "--rundir", str(tmp_path / "run")]
    (tmp_path / "stateful.xml").write_text(STATEFUL_XML)
    assert main(base + ["define", str(tmp_path / "stateful.xml")]) == 0
    capsys.readouterr()
    assert main(base + ["simulate", str(binding_file(tmp_path, target)), *words]) == 0
    text = capsys.readouterr().out
    path = HERE / f"{case}.txt"
    if REGEN:
        path.write_text(text)
        return
    assert path.exists(), f"{path.name} missing: run with LIBVIRT_NWFILTER_REGEN_GOLDEN=1 and review it"
    assert text == path.read_text(), (f"{path.name} differs from simulate's output; if the change is "
                                      "intended, regenerate with LIBVIRT_NWFILTER_REGEN_GOLDEN=1")


def test_no_stray_golden_files():
    stray = sorted(p.name for p in HERE.glob("*.txt") if p.stem not in CASES)
    assert not stray, f"golden files without a case: {stray}"

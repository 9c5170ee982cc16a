"""The ``simulate`` verb: its targets (a bound port's record, a binding file, a guest's
metadata through libvirt), its options wherever they are written, JSON lines, and usage
errors (exit 2) versus refused packets (exit 1, one line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libvirt_nwfilter.cli import main
from libvirt_nwfilter.model import Binding, FilterRef
from libvirt_nwfilter.state import AppliedBinding, State

MAC = "52:54:00:12:34:56"
BINDING = f"""<filterbinding>
  <owner><name>guest1</name><uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid></owner>
  <portdev name='vnet3'/>
  <mac address='{MAC}'/>
  <filterref filter='clean-traffic'><parameter name='IP' value='10.0.0.5'/></filterref>
</filterbinding>
"""
FORGED, TWIN = "out tcp srcipaddr=10.0.0.66 dstportstart=22", "out tcp srcipaddr=10.0.0.5 dstportstart=22"


@pytest.fixture
def cli(tmp_path, capsys):
    base = ["--confdir", str(tmp_path / "conf"), "--rundir", str(tmp_path / "run")]

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(base + list(argv))
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def binding_file(tmp_path) -> Path:
    path = tmp_path / "binding.xml"
    path.write_text(BINDING)
    return path


def verdicts(text: str) -> list[str]:
    return [line.split()[-1] for line in text.splitlines() if line.startswith("  verdict:")]


def test_binding_file_target_with_packets_as_separate_or_quoted_words(cli, binding_file):
    code, out, _ = cli("simulate", str(binding_file), *FORGED.split(), TWIN)
    assert code == 0 and verdicts(out) == ["drop", "pass"]


def test_bound_port_target_reads_the_recorded_binding(cli, tmp_path):
    ref = FilterRef("clean-traffic", (("IP", ("10.0.0.5",)),))
    applied = AppliedBinding(Binding("guest1", "c7a5fdbd-cdaf-9455-926a-d65c16db1809", "vnet3", MAC, ref),
                             "nftables", {}, "0")
    State(tmp_path / "run").write([applied])
    code, out, _ = cli("simulate", "vnet3", FORGED, TWIN)
    assert code == 0 and verdicts(out) == ["drop", "pass"]
    code, _, err = cli("simulate", "vnet9", FORGED)
    assert code == 1 and "no nwfilter binding for port dev 'vnet9'" in err


def test_domain_target_uses_the_guests_metadata(cli, mocker):
    domain_xml = f"""<domain type='kvm'><name>guest1</name><uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid>
  <metadata><nwf:nwfilter xmlns:nwf='http://libvirt-nwfilter.org/xmlns/nwfilter/1.0'>
    <nwf:interface mac='{MAC}'><nwf:filterref filter='clean-traffic'>
      <nwf:parameter name='IP' value='10.0.0.5'/></nwf:filterref></nwf:interface>
  </nwf:nwfilter></metadata>
  <devices><interface type='bridge'><mac address='{MAC}'/><source bridge='br0'/></interface></devices>
</domain>"""
    client = mocker.MagicMock()
    client.__enter__.return_value = client
    client.xml.return_value = domain_xml
    client.is_active.return_value = False
    mocker.patch("libvirt_nwfilter.libvirt_client.LibvirtClient", return_value=client)
    code, out, _ = cli("simulate", "--domain", "guest1", "--mac", MAC.upper(), FORGED, TWIN)
    assert code == 0 and verdicts(out) == ["drop", "pass"]
    assert client.xml.call_args.kwargs == {"inactive": True}  # the guest need not run
    code, _, err = cli("simulate", "--domain", "guest1", "--mac", "52:54:00:00:00:99", FORGED)
    assert code == 1 and "has no filterable interface with MAC 52:54:00:00:00:99" in err


def test_json_is_one_object_per_packet_whatever_the_option_position(cli, binding_file):
    code, out, _ = cli("simulate", str(binding_file), FORGED, TWIN, "--json")
    objects = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [o["verdict"] for o in objects] == ["drop", "pass"]
    drop = objects[0]["stages"][0]
    assert (drop["rule"]["filter"], drop["rule"]["rule"], drop["rule"]["priority"]) == ("no-ip-spoofing", 3, 1000)
    assert objects[0]["stages"][1] == {"stage": "l3-fi", "name": "L3 forwarded from the guest", "verdict": "not-reached"}


def test_packets_from_a_file_with_comments(cli, binding_file, tmp_path):
    packets = tmp_path / "packets"
    packets.write_text(f"# a conversation\n{FORGED}\n\n{TWIN}  # the twin\n")
    code, out, _ = cli("simulate", "--file", str(packets), str(binding_file))
    assert code == 0 and verdicts(out) == ["drop", "pass"]


@pytest.mark.parametrize("argv, message", [
    (["simulate"], "a TARGET"),
    (["simulate", "BINDING"], "no PACKET given"),
    (["simulate", "BINDING", "out", "tcp", "--colour"], "unknown option '--colour'"),
    (["simulate", "--domain", "g", "out", "tcp"], "--domain needs --mac"),
])
def test_usage_errors_exit_2(cli, binding_file, argv, message):
    argv = [str(binding_file) if word == "BINDING" else word for word in argv]
    code, out, err = cli(*argv)
    assert code == 2 and message in err and not out


def test_a_bad_packet_is_refused_with_one_line_and_nothing_else_is_printed(cli, binding_file):
    code, out, err = cli("simulate", str(binding_file), TWIN, "out tcp dstportend=80")
    assert code == 1 and not out
    assert err.count("\n") == 1 and "word 'dstportend=80'" in err

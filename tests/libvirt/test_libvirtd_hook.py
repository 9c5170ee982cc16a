"""A hook installed through the libvirtd_hook fixture is discovered and called."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

import libvirtd as lv
import netlab

HOOK_DIR_NAME = "nwft-hook-calls"


@pytest.fixture(scope="module")
def hook_calls_dir(tmp_path_factory):
    return tmp_path_factory.mktemp(HOOK_DIR_NAME)


@pytest.fixture(scope="module")
def libvirtd_hook(hook_calls_dir):
    """Records every call (arguments, stdin, one environment variable) in hook_calls_dir."""
    recorder = hook_calls_dir / "record.sh"
    recorder.write_text(
        "#!/bin/sh\n"
        f'd={hook_calls_dir}\n'
        'n=$(ls "$d" | grep -c "\\.args$")\n'
        'printf "%s\\n" "$*" > "$d/call-$n.args"\n'
        'printf "%s\\n" "$NWFT_PROBE" > "$d/call-$n.env"\n'
        'readlink /proc/self/ns/net > "$d/call-$n.netns"\n'
        'cat > "$d/call-$n.xml"\n')
    recorder.chmod(0o755)
    return lv.hook_wrapper([str(recorder)], env={"NWFT_PROBE": "it's set"},
                           log=hook_calls_dir / "log")


def test_hook_sees_guest_lifecycle(libvirt_lab, libvirtd, hook_calls_dir):
    assert libvirtd.hook_path is not None and libvirtd.hook_path.exists()
    guest = libvirtd.start_guest("nwft-hook-guest", "52:54:00:12:34:58")
    libvirtd.remove_guest(guest.name)

    log = (hook_calls_dir / "log").read_text().splitlines()
    assert log == [
        f"{guest.name} prepare begin -",
        f"{guest.name} start begin -",
        f"{guest.name} started begin -",
        f"{guest.name} stopped end -",
        f"{guest.name} release end -",
    ]
    calls = sorted(hook_calls_dir.glob("call-*.args"), key=lambda p: int(p.stem.split("-")[1]))
    assert [c.read_text().split()[1] for c in calls] == \
        ["prepare", "start", "started", "stopped", "release"]
    assert (hook_calls_dir / "call-0.env").read_text().strip() == "it's set"
    start_xml = ET.fromstring((hook_calls_dir / "call-1.xml").read_text())
    assert start_xml.find("./uuid").text == guest.uuid
    assert start_xml.find("./devices/interface/target").get("dev") == guest.tap
    stopped_xml = ET.fromstring((hook_calls_dir / "call-3.xml").read_text())
    assert stopped_xml.find("./devices/interface/target") is None
    # Hooks are children of libvirtd: they run in its network namespace.
    libvirtd_netns = netlab.run(["readlink", f"/proc/{libvirtd.pid}/ns/net"]).stdout
    assert (hook_calls_dir / "call-1.netns").read_text() == libvirtd_netns

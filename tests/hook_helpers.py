"""The real hook under a real libvirtd: fixtures and checks shared by tests/libvirt/test_hook_*.py.

* The hook is the wrapper ``libvirt-nwfilter install-hook`` writes, without a backend (the
  configuration file decides at each run, so one libvirtd serves both backends: the ``backend``
  fixture writes it), with configuration and run directories in the module's temporary
  directory and a log file. The CLI (``nwf``) runs in libvirtd's namespace, with the same
  directories and backend.
* libvirtd runs a test hook that puts the wrapper in a private mount namespace (``unshare``)
  whose ``/dev`` is a small tmpfs with ``null``, ``zero``, ``urandom``, ... bound from the real
  one and ``log`` bound to a datagram socket of the test (:class:`Syslog`): the hook's syslog
  messages arrive there, and nothing of the host's ``/dev`` changes.
* :func:`assert_ports_run` tells which filter a guest's tap runs from real frames: frames from a
  peer VM to the guest's MAC, captured as they leave the bridge through the tap (after every
  bridge hook). The filters used (:data:`SIGNATURES`) each drop a different set of them; the
  IPv4 frame passes all of them and is the twin of the drops.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import libvirtd as lv
import netlab
from bindings_helpers import BACKENDS, filter_xml, ip_frame, ipv6_udp, kernel_snapshot, raw
from traffic import Leaving, Probe, check_frames

NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
REPO = Path(__file__).resolve().parents[1]
PEER_MAC, PEER_IP, GUEST_IP = "52:54:00:a0:00:fe", "10.0.0.250", "10.0.0.5"

#: Filters defined in every module's store: each drops one ethertype towards the guest.
FILTERS = {name: filter_xml(name, f"<rule action='drop' direction='in' priority='500'>"
                                  f"<mac protocolid='{ethertype}'/></rule>")
           for name, ethertype in (("nwft-in-b5", "0x88b5"), ("nwft-in-b6", "0x88b6"))}

#: Per filter on a guest's tap: which frames from the peer to the guest's MAC leave through it.
SIGNATURES = {
    None: {"IPv4": True, "IPv6": True, "0x88b5": True, "0x88b6": True},
    "clean-traffic": {"IPv4": True, "IPv6": False, "0x88b5": False, "0x88b6": False},
    "nwft-in-b5": {"IPv4": True, "IPv6": True, "0x88b5": False, "0x88b6": True},
    "nwft-in-b6": {"IPv4": True, "IPv6": True, "0x88b5": True, "0x88b6": False},
}

# In the hook's private mount namespace: a tmpfs /dev with what a process needs, and /dev/log.
PRIVATE_DEV = r'''set -e
mount --rbind /dev "$NWFT_SAVE"
mount -t tmpfs -o mode=0755 nwft-dev /dev
for node in null zero full random urandom tty; do
    touch "/dev/$node"; mount --bind "$NWFT_SAVE/$node" "/dev/$node"
done
ln -s /proc/self/fd /dev/fd; ln -s fd/0 /dev/stdin; ln -s fd/1 /dev/stdout; ln -s fd/2 /dev/stderr
touch /dev/log; mount --bind "$NWFT_SYSLOG" /dev/log
umount -l "$NWFT_SAVE"
exec "$@"
'''


class Syslog:
    """A datagram socket standing in for ``/dev/log``: collects every message sent to it."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[str] = []
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            self.received.append(data.decode(errors="replace"))

    def wait_for(self, pattern: str, timeout: float = 30.0) -> str:
        """The first message matching the regular expression ``pattern`` (AssertionError after
        ``timeout`` seconds, listing what arrived)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.received):
                if re.search(pattern, message):
                    return message
            time.sleep(0.1)
        raise AssertionError(f"no syslog message matches {pattern!r}; received:\n" + "\n".join(self.received))

    def close(self) -> None:
        self.sock.close()


def nwf_argv(dirs: dict, *args: str) -> list[str]:
    return [sys.executable, "-m", "libvirt_nwfilter", "--confdir", str(dirs["conf"]), "--rundir",
            str(dirs["run"]), *args]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("nwf-hook")
    paths = {name: base / name for name in ("conf", "run", "hooks", "devsave")}
    paths["conf"].mkdir()
    paths["devsave"].mkdir()
    paths["log"] = base / "hook.log"
    paths["syslog"] = base / "syslog.sock"
    return paths


@pytest.fixture(scope="module")
def syslog(dirs):
    receiver = Syslog(dirs["syslog"])
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def libvirtd_hook(dirs, syslog):
    """The wrapper as install-hook writes it, run by libvirtd inside a private mount namespace
    whose /dev/log is :class:`Syslog`'s socket."""
    done = subprocess.run(nwf_argv(dirs, "install-hook", "--no-service", "--hooks-dir", str(dirs["hooks"]),
                                   "--log-file", str(dirs["log"])),
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    wrapper = dirs["hooks"] / "qemu.d" / "libvirt-nwfilter"
    assert "LIBVIRT_NWFILTER_BACKEND" not in wrapper.read_text()
    return lv.hook_wrapper(["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_DEV, "sh",
                            str(wrapper)], env={"NWFT_SAVE": dirs["devsave"], "NWFT_SYSLOG": dirs["syslog"]})


@pytest.fixture(params=BACKENDS)
def backend(request, dirs) -> str:
    """The backend the hook and the CLI use (the configuration file both read)."""
    (dirs["conf"] / "libvirt-nwfilter.conf").write_text(f"backend = {request.param}\n")
    return request.param


@pytest.fixture
def nwf(libvirtd, dirs, backend):
    """Run the CLI in libvirtd's namespace: nwf(*args, check=True) -> CompletedProcess."""
    def run(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        return netlab.run_in(libvirtd.lab.host_ns, nwf_argv(dirs, *args), check=check, input=input, timeout=180)
    for name, xml in FILTERS.items():
        if not (dirs["conf"] / "filters" / f"{name}.xml").exists():
            run("define", "-", input=xml)
    return run


@pytest.fixture(scope="module")
def peer(libvirtd):
    """The VM that sends the frames of :func:`assert_ports_run` (one per module)."""
    return libvirtd.lab.add_vm("peer", PEER_MAC, ipv4=f"{PEER_IP}/24")


@pytest.fixture
def clean(peer, libvirt_lab, libvirtd, nwf, dirs):
    """Every test must end without our bindings and without libvirt's (so the next one starts
    without); the lab has the ``peer`` VM."""
    assert not list((dirs["run"] / "bindings").glob("*.json")), "a binding is left from before"
    yield libvirt_lab
    for name in list(libvirtd.guests):
        lv.virsh("destroy", name, check=False)
    assert bindings(nwf) == {}, (dirs["log"].read_text() if dirs["log"].exists() else "")
    assert libvirtd.bindings() == []  # libvirt's own engine was never involved


def bindings(nwf) -> dict[str, tuple[str, str]]:
    """Our binding-list: port -> (filter, owner)."""
    rows = nwf("-q", "binding-list").stdout.splitlines()
    return {cols[0]: (cols[1], cols[2]) for cols in (row.split() for row in rows) if cols}


def metadata(mac: str, filter: str = "clean-traffic", params: dict | None = None, prefix: str = "nwf") -> str:
    params = {"IP": GUEST_IP} if params is None else params
    inner = "".join(f'<{prefix}:parameter name="{n}" value="{v}"/>' for n, v in params.items())
    return (f'    <{prefix}:nwfilter xmlns:{prefix}="{NS}">\n      <{prefix}:interface mac="{mac}">'
            f'<{prefix}:filterref filter="{filter}">{inner}</{prefix}:filterref></{prefix}:interface>\n'
            f'    </{prefix}:nwfilter>')


def port_lines(ns: str, port: str) -> list[str]:
    """Every firewall line (nft, ebtables, iptables, ip6tables listings) naming ``port``
    (a regular expression: ``vnet\\d+`` finds every tap's)."""
    named = re.compile(rf"(?<!\w){port}(?!\w)")
    return [f"{tool}: {line.strip()}" for tool, text in kernel_snapshot(ns).items()
            for line in text.splitlines() if named.search(line)]


def wipe_rules(lab) -> None:
    """Remove every firewall rule of libvirtd's namespace behind our back."""
    lab.host_run(["nft", "flush", "ruleset"])
    assert lab.ruleset().strip() == ""


def assert_ports_run(lab, ports: dict[str, tuple[str, str | None]], context: str = "") -> None:
    """Each tap in ``ports`` (tap -> (guest MAC, filter or None)) runs that filter: the frames
    of :data:`SIGNATURES` from the peer VM to the guest's MAC leave through the tap or not,
    as the filter says (one batch for every tap)."""
    peer = lab.vms["peer"]
    probes = []
    for tap, (mac, filter) in sorted(ports.items()):
        frames = {"IPv4": ip_frame(PEER_MAC, mac, PEER_IP, GUEST_IP, "udp"),
                  "IPv6": ipv6_udp(PEER_MAC, mac, "fd00::fe", "fd00::5"),
                  "0x88b5": raw(PEER_MAC, mac, 0x88B5), "0x88b6": raw(PEER_MAC, mac, 0x88B6)}
        probes += [Probe(f"{tap} {kind}", peer, frame, Leaving(tap), SIGNATURES[filter][kind])
                   for kind, frame in frames.items()]
    check_frames(lab, probes, context=context or f"ports should run {ports}")


#: For tests that run on the nftables backend only (``@NFTABLES_ONLY``).
NFTABLES_ONLY = pytest.mark.parametrize("backend", ["nftables"], indirect=True)

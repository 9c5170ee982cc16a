"""IP address learning against libvirt's own engine (the oracle), and with a real QEMU guest.

Oracle: the same exchanges run on the same veth port of the test libvirtd's lab, first with
libvirt's binding (``virsh nwfilter-binding-create``, no ``IP``, ``CTRL_IP_LEARNING`` set),
then with ours (through ``libvirt-nwfilterd``, both backends). After each step both engines'
learned addresses (libvirt's read from its ebtables rules, ours from ``binding-dumpxml``) and
the verdicts of the same probes are compared. Where they differ on purpose the difference is
pinned both ways (:data:`DIFFERENCES`, README "IP address learning").

End to end: a disk-less guest under TCG boots from the network (SeaBIOS, iPXE: a real DHCP
client on its own tap); its metadata omits ``IP``; the hook starts it in the learning state,
dnsmasq behind the bridge leases it an address and the service applies the full filter.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

import dhcp_frames as dhcp
import libvirtd as lv
import netlab
from bindings_helpers import BCAST, arp_request, backend, binding_xml, ip_frame, ipv6_udp, wait_until  # noqa: F401
from dhcpd import DhcpServer
from dhcplab import Dhclient
from traffic import Probe, frames
from service_helpers import Daemon, client_argv, env_for

NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
MAC_A, MAC_B, MAC_S, MAC_R = "52:54:00:0e:00:01", "52:54:00:0e:00:02", "52:54:00:0e:00:fe", "52:54:00:0e:00:fd"
SPOOF_MAC = "52:54:00:99:99:99"
IP_B, SERVER, ROGUE = "10.0.0.2", "10.0.0.254", "10.0.0.253"
GUEST_MAC = "52:54:00:0e:01:01"
SPOOFED = "10.0.0.77"  # never leased: outside the server's range

#: (case, step) -> (libvirt, ours): the learned addresses (as roles) where we differ on purpose.
DIFFERENCES = {
    # libvirt 9.0.0 never learns from ARP (its ethertype switch skips ARP before the ARP branch);
    # we learn the address the guest claims: here the target of its probe.
    ("arp-probe", "probe sent"): ([], ["10.0.0.7"]),
    ("arp-probe", "IPv4 sent"): (["10.0.0.11"], ["10.0.0.7"]),
    # libvirt 9.0.0 never applies a second lease: traffic from its address stays dropped.
    ("dhcp", "second lease"): (["first"], ["first", "second"]),
    # libvirt reads the address of a RELEASE from yiaddr, which is 0.0.0.0 in a RELEASE: it
    # keeps the address; we remove the address of ciaddr (and the DHCP-only rules return).
    ("dhcp", "first released"): (["first"], []),
}


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("nwf-learning")
    paths = {"base": base, "conf": base / "conf", "run": base / "run", "hooks": base / "hooks"}
    paths["conf"].mkdir()
    return paths


@pytest.fixture(scope="module")
def libvirtd_hook(dirs):
    """Our hook, reading the backend from the configuration file at each run."""
    env = {k: v for k, v in env_for(dirs["conf"], dirs["run"]).items() if k != "LIBVIRT_NWFILTER_BACKEND"}
    done = subprocess.run(client_argv(None, "install-hook", "--no-service", "--hooks-dir", str(dirs["hooks"]),
                                      "--log-file", str(dirs["base"] / "hook.log")),
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return (dirs["hooks"] / "qemu.d" / "libvirt-nwfilter").read_text()


def new_service(libvirtd, dirs, backend: str) -> Daemon:
    """``libvirt-nwfilterd`` in the libvirtd's namespace, with the backend the hook reads too."""
    (dirs["conf"] / "libvirt-nwfilter.conf").write_text(f"backend = {backend}\n")
    return Daemon(libvirtd.lab.host_ns, dirs["conf"], dirs["run"], backend=backend,
                  options=("--heal-interval", "3600"), log=dirs["base"] / f"service-{backend}.log")


@pytest.fixture
def service(libvirtd, dirs, backend):
    daemon = new_service(libvirtd, dirs, backend).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def nwf(daemon: Daemon, *args: str, input: str = "", check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(client_argv(daemon.ns, *args), input=input, capture_output=True, text=True, timeout=120,
                          env=env_for(daemon.confdir, daemon.rundir, daemon.backend))
    assert not check or done.returncode == 0, f"{args}: {done.stderr}"
    return done


# ----------------------------------------------------------------------------------------------
# The two engines


class Libvirt:
    name = "libvirt"

    def __init__(self, lab: netlab.Lab):
        self.lab = lab

    def bind(self, vm: netlab.VM, params: dict) -> None:
        """libvirt's binding; in mode any its learning thread installs the learning-time rules
        some time after the binding exists (the port is unfiltered until then): waited for."""
        lv.libvirt_oracle_binding(self.lab, vm.port, vm.mac, "clean-traffic", params)
        assert wait_until(lambda: f"-A PREROUTING -i {vm.port} -j libvirt-I-{vm.port}" in
                          self.lab.host_run(["ebtables-save", "-t", "nat"]).stdout, timeout=10)

    def unbind(self, vm: netlab.VM) -> None:
        lv.libvirt_oracle_unbind(vm.port, missing_ok=True)

    def learned(self, vm: netlab.VM) -> list[str]:
        """The addresses in libvirt's rules for the port (clean-traffic's no-ip-spoofing)."""
        rules = self.lab.host_run(["ebtables-save", "-t", "nat"]).stdout
        found = re.findall(rf"^-A I-{re.escape(vm.port)}-ipv4-ip -p IPv4 --ip-src (\S+) -j RETURN$", rules, re.M)
        return sorted((a for a in found if a != "0.0.0.0"), key=_order)


class Ours:
    name = "ours"

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def bind(self, vm: netlab.VM, params: dict) -> None:
        nwf(self.daemon, "binding-create", "-", input=binding_xml(vm.port, vm.mac, "clean-traffic", params))

    def unbind(self, vm: netlab.VM) -> None:
        nwf(self.daemon, "binding-delete", vm.port, check=False)

    def learned(self, vm: netlab.VM) -> list[str]:
        done = nwf(self.daemon, "binding-dumpxml", vm.port, check=False)
        return re.findall(r"<nwf:address ip='([^']+)'", done.stdout)


def _order(address: str) -> tuple[int, ...]:
    return tuple(int(part) for part in address.split("."))


# ----------------------------------------------------------------------------------------------
# The exchanges


class Run:
    """One engine through one case: the steps observed, (learned roles, verdicts) each."""

    def __init__(self, engine, lab: netlab.Lab, vms: dict, workdir: Path):
        self.engine, self.lab, self.vms, self.workdir = engine, lab, vms, workdir
        self.steps: dict[str, tuple[list[str], dict[str, bool]]] = {}
        self.roles: dict[str, str] = {}  # address -> role in this run

    def send(self, vm: netlab.VM, *frames: bytes) -> None:
        self.lab.send_frame(vm, *(f + bytes(max(0, 60 - len(f))) for f in frames))

    def observe(self, step: str, settled, probes: list[Probe], timeout: float = 15.0) -> None:
        """Wait until ``settled(learned)`` holds (at most ``timeout`` s: libvirt may never get
        there), then record the learned addresses (as roles) and the probes' verdicts."""
        a = self.vms["a"]
        wait_until(lambda: settled(self.engine.learned(a)), timeout=timeout, interval=0.25)

        learned = [self.roles.get(address, address) for address in self.engine.learned(a)]
        self.steps[step] = (learned, frames(self.lab, probes) if probes else {})


def sources(run: Run, *addresses: str) -> list[Probe]:
    """UDP from the guest to ``b`` from each address (named by its role in the run)."""
    a, b = run.vms["a"], run.vms["b"]
    return [Probe(f"source {run.roles.get(address, address)}", a, ip_frame(MAC_A, MAC_B, address, IP_B, "udp"), b)
            for address in addresses]


def learning_time_any(vms: dict) -> list[Probe]:
    a, b = vms["a"], vms["b"]
    return [Probe("IPv4 from 0.0.0.0", a, ip_frame(MAC_A, BCAST, "0.0.0.0", "255.255.255.255", "udp"), b),
            Probe("another source MAC", a, ip_frame(SPOOF_MAC, MAC_B, "10.0.0.11", IP_B, "udp"), b),
            Probe("IPv6", a, ipv6_udp(MAC_A, MAC_B, "fd00::1", "fd00::2"), b),
            Probe("to the guest", b, ip_frame(MAC_B, MAC_A, IP_B, "10.0.0.11", "udp"), a)]


def learning_time_dhcp(vms: dict) -> list[Probe]:
    a, b, s = vms["a"], vms["b"], vms["s"]
    return [Probe("DHCP DISCOVER", a, dhcp.client(dhcp.DISCOVER, MAC_A), s),
            Probe("DHCP OFFER to the guest", s, dhcp.reply(dhcp.OFFER, MAC_S, SERVER, MAC_A, "10.0.0.149"), a),
            Probe("IPv4 from the guest", a, ip_frame(MAC_A, MAC_B, "10.0.0.149", IP_B, "udp"), b),
            Probe("ARP from the guest", a, arp_request(MAC_A, "10.0.0.149", IP_B), b),
            Probe("IPv4 to the guest", b, ip_frame(MAC_B, MAC_A, IP_B, "10.0.0.149", "udp"), a)]


def case_packet(run: Run) -> None:
    run.observe("learning", lambda got: True, learning_time_any(run.vms), timeout=0)
    run.send(run.vms["a"], ip_frame(MAC_A, MAC_B, "10.0.0.11", IP_B, "udp"))
    run.observe("IPv4 sent", bool, sources(run, "10.0.0.11", "10.0.0.12"))


def case_arp_probe(run: Run) -> None:
    run.send(run.vms["a"], dhcp.probe(MAC_A, "10.0.0.7"))
    run.observe("probe sent", bool, [], timeout=5)
    run.send(run.vms["a"], ip_frame(MAC_A, MAC_B, "10.0.0.11", IP_B, "udp"))
    run.observe("IPv4 sent", bool, sources(run, "10.0.0.7", "10.0.0.11"))


def case_arp_request(run: Run) -> None:
    run.send(run.vms["a"], arp_request(MAC_A, "10.0.0.11", IP_B))
    run.send(run.vms["a"], ip_frame(MAC_A, MAC_B, "10.0.0.11", IP_B, "udp"))
    run.observe("request and IPv4 sent", bool, sources(run, "10.0.0.11", IP_B))


def case_dhcp_any(run: Run) -> None:
    leased = Dhclient(run.vms["a"], run.workdir, "anymode").lease()
    run.roles[leased] = "leased"
    run.observe("leased", bool, sources(run, leased, "10.0.0.151"))


def case_dhcp(run: Run) -> None:
    """dhcp mode with a rogue server beside the trusted one (DHCPSERVER names the trusted)."""
    run.observe("learning", lambda got: True, learning_time_dhcp(run.vms), timeout=0)
    first, second = Dhclient(run.vms["a"], run.workdir, "first"), Dhclient(run.vms["a"], run.workdir, "second")
    rogue = DhcpServer(run.vms["r"], run.workdir / "rogue", pool=("10.0.0.200", "10.0.0.250")).start()
    try:
        one = first.lease()
    finally:
        rogue.stop()  # the full filter lets its offers through: the next one must be the trusted server's
    assert f"from {ROGUE}" not in first.output, "a reply of the rogue server reached the guest while learning"
    run.roles[one] = "first"
    run.observe("first lease", lambda got: len(got) == 1, sources(run, one, "10.0.0.151"))
    two = second.lease()
    run.roles[two] = "second"
    run.observe("second lease", lambda got: len(got) == 2, sources(run, one, two, "10.0.0.151"))
    second.release()
    run.observe("second released", lambda got: len(got) == 1, sources(run, one, two), timeout=10)
    first.release()
    run.observe("first released", lambda got: not got, sources(run, one) + learning_time_dhcp(run.vms), timeout=10)


CASES = {  # name -> (binding parameters, exchange)
    "packet": ({}, case_packet),
    "arp-probe": ({}, case_arp_probe),
    "arp-request": ({}, case_arp_request),
    "dhcp-any": ({}, case_dhcp_any),
    "dhcp": ({"CTRL_IP_LEARNING": "dhcp", "DHCPSERVER": SERVER}, case_dhcp),
}
_ORACLE: dict[str, dict] = {}


@pytest.fixture
def lab_vms(libvirt_lab, tmp_path):
    lab = libvirt_lab
    vms = {"a": lab.add_vm("a", MAC_A), "b": lab.add_vm("b", MAC_B, ipv4=f"{IP_B}/24"),
           "s": lab.add_vm("s", MAC_S, ipv4=f"{SERVER}/24"), "r": lab.add_vm("r", MAC_R, ipv4=f"{ROGUE}/24")}
    server = DhcpServer(vms["s"], tmp_path / "server", pool=("10.0.0.100", "10.0.0.150")).start()
    try:
        yield lab, vms
    finally:
        server.stop()


def _run(engine, lab, vms, case: str, workdir: Path) -> dict:
    params, exchange = CASES[case]
    run = Run(engine, lab, vms, workdir)
    engine.bind(vms["a"], params)
    try:
        exchange(run)
    finally:
        engine.unbind(vms["a"])
        for vm in vms.values():
            netlab.kill_in_namespace(vm.ns, "dhclient")
            vm.run(["ip", "-4", "addr", "flush", "dev", "eth0"], check=False) if vm.name == "a" else None
    return run.steps


@pytest.mark.parametrize("case", list(CASES))
def test_same_learning_as_libvirt(lab_vms, service, tmp_path, case):
    lab, vms = lab_vms
    if case not in _ORACLE:
        _ORACLE[case] = _run(Libvirt(lab), lab, vms, case, tmp_path / "libvirt")
    theirs = _ORACLE[case]
    ours = _run(Ours(service), lab, vms, case, tmp_path / "ours")
    print(f"\n{case}: libvirt {theirs}\nours {ours}")
    assert list(ours) == list(theirs)
    mismatches = []
    for step, (their_learned, their_verdicts) in theirs.items():
        our_learned, our_verdicts = ours[step]
        documented = DIFFERENCES.get((case, step))
        if documented is not None:
            assert (their_learned, our_learned) == documented, f"{case}/{step}: the documented difference changed"
            continue
        if our_learned != their_learned:
            mismatches.append(f"{step}: learned libvirt {their_learned}, ours {our_learned}")
        mismatches += [f"{step}: {name}: libvirt {'passes' if passed else 'drops'}, ours the other way"
                       for name, passed in their_verdicts.items() if our_verdicts[name] != passed]
    assert not mismatches, f"{case}: differences from libvirt:\n" + "\n".join(mismatches)
    assert any(learned for learned, _ in theirs.values()), f"{case}: libvirt learned nothing: the case proves nothing"


# ----------------------------------------------------------------------------------------------
# A real guest


def guest_metadata(params: dict[str, str]) -> str:
    """Our metadata: the guest's interface with clean-traffic and ``params`` (never ``IP``)."""
    inner = "".join(f'<nwf:parameter name="{n}" value="{v}"/>' for n, v in params.items())
    return (f'    <nwf:nwfilter xmlns:nwf="{NS}"><nwf:interface mac="{GUEST_MAC}">'
            f'<nwf:filterref filter="clean-traffic">{inner}</nwf:filterref></nwf:interface></nwf:nwfilter>')


def pxe_guest_xml(libvirtd, name: str, params: dict[str, str]) -> str:
    xml = libvirtd.guest_xml(name, GUEST_MAC, metadata=guest_metadata(params))
    xml = re.sub(r"<domain type='\w+'>", "<domain type='qemu'>", xml)  # TCG: iPXE halts under KVM here
    return xml.replace("hvm</type>", "hvm</type><boot dev='network'/>").replace("      <rom enabled='no'/>\n", "")


def test_a_learning_guest_needs_the_service(libvirt_lab, libvirtd, dirs, backend):
    """Without libvirt-nwfilterd the guest does not start (one line in virsh's error, nothing
    applied); with it, the same guest starts on the learning-time rules."""
    daemon = new_service(libvirtd, dirs, backend)
    name = "nwft-learn-noservice"
    libvirtd.define_guest(name, GUEST_MAC, metadata=guest_metadata({}))
    try:
        refused = lv.virsh("start", name, check=False)
        assert refused.returncode != 0, "a learning guest started without the service"
        assert re.search(r"port \S+: its IP address is to be learned \(CTRL_IP_LEARNING 'any'\), which needs the "
                         r"resident service libvirt-nwfilterd, and it is not running: start it, or give IP as a "
                         r"parameter", refused.stderr), refused.stderr
        assert "Traceback" not in refused.stderr
        assert lv.virsh("domstate", name).stdout.strip() == "shut off"
        assert nwf(daemon, "-q", "binding-list").stdout.strip() == ""
        assert nwf(daemon, "verify").returncode == 0  # nothing half-applied, nothing left in the kernel
        daemon.start()
        lv.virsh("start", name)
        tap = libvirtd.guest_tap(name)
        listing = nwf(daemon, "binding-list").stdout
        assert re.search(rf"^ {re.escape(tap)} .* any: learning", listing, re.M), listing
    finally:
        libvirtd.remove_guest(name)
        daemon.stop()


#: The guest's boot script (iPXE fetches it by TFTP from dnsmasq once leased): a fetch from its
#: leased address, the same fetch from a spoofed address, the leased address again and a last
#: fetch. iPXE runs it in order, so once the last file reached the server the spoofed request
#: was sent before it: its absence at the server needs no timed wait.
BOOT_SCRIPT = f"""#!ipxe
imgfetch --timeout 5000 leased-first || echo leased-first failed
set net0/ip {SPOOFED}
imgfetch --timeout 5000 spoofed || echo spoofed failed
clear net0/ip
imgfetch --timeout 5000 leased-last || echo leased-last failed
shell
"""


def _from_spoofed(frame: bytes) -> bool:
    """An IPv4 packet or ARP frame of the guest whose sender address is the spoofed one."""
    spoofed = bytes(int(part) for part in SPOOFED.split("."))
    return (frame[12:14] == b"\x08\x00" and frame[26:30] == spoofed) or \
        (frame[12:14] == b"\x08\x06" and frame[28:32] == spoofed)


def test_pxe_guest_is_learned_by_dhcp_and_filtered(libvirt_lab, libvirtd, service, backend, tmp_path):
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    (tftp / "boot.ipxe").write_text(BOOT_SCRIPT)
    for name in ("leased-first", "spoofed", "leased-last"):
        (tftp / name).write_text(f"{name}\n")
    server_vm = libvirt_lab.add_vm("srv", MAC_S, ipv4=f"{SERVER}/24")
    server = DhcpServer(server_vm, tmp_path / "server", pool=("10.0.0.100", "10.0.0.150"),
                        options=("--enable-tftp", f"--tftp-root={tftp}", "--dhcp-boot=boot.ipxe")).start()
    name = "nwft-learn-pxe"
    capture = None
    try:
        libvirtd.define_guest(name, GUEST_MAC, xml=pxe_guest_xml(libvirtd, name, {"CTRL_IP_LEARNING": "dhcp",
                                                                                  "DHCPSERVER": SERVER}))
        lv.virsh("start", name)
        tap = libvirtd.guest_tap(name)
        capture = libvirt_lab.capture((libvirt_lab.host_ns, tap)).start()  # what the guest sends
        listing = nwf(service, "binding-list").stdout
        assert re.search(rf"^ {re.escape(tap)} .* dhcp: (learning|10\.0\.0\.1\d\d)", listing, re.M), listing
        leased = server.wait_lease(GUEST_MAC, timeout=180)
        assert leased, f"iPXE got no lease:\n{server.log()[-3000:]}"
        assert wait_until(lambda: f"<nwf:address ip='{leased}'" in nwf(service, "binding-dumpxml", tap).stdout,
                          timeout=30), service.log_text()[-3000:]
        kernel = libvirt_lab.ruleset() if backend == "nftables" else \
            libvirt_lab.host_run(["ebtables-save", "-t", "nat"]).stdout
        assert leased in kernel, "the full filter with the leased address is not in the kernel"
        assert f"port {tap}: learned {leased} (DHCP lease until" in service.log_text()

        # the leased source passes (both fetches before and after), the spoofed one is dropped
        assert wait_until(lambda: f"/leased-last to {leased}" in server.log(), timeout=180, interval=1), \
            f"the guest's last fetch from its leased address never reached the server:\n{server.log()[-3000:]}"
        assert f"/leased-first to {leased}" in server.log()
        assert "/spoofed " not in server.log(), "a request from the spoofed source reached the server"
        sent = capture.stop(settle=0)
        capture = None
        assert any(_from_spoofed(frame) for frame in sent), "the guest never sent from the spoofed source"
        assert nwf(service, "verify").returncode == 0

        # saved and restored: nothing learned is carried over, the address is learned anew
        lv.virsh("save", name, str(tmp_path / "saved"))
        assert nwf(service, "-q", "binding-list").stdout.strip() == ""
        lv.virsh("restore", str(tmp_path / "saved"))
        restored_tap = libvirtd.guest_tap(name)
        restored = nwf(service, "binding-dumpxml", restored_tap).stdout
        assert "state='learning'" in restored and "<nwf:address" not in restored, restored
        offset = len(service.log_text())
    finally:
        if capture is not None:
            capture.stop(settle=0)
        libvirtd.remove_guest(name)
        server.stop()
    assert nwf(service, "-q", "binding-list").stdout.strip() == ""  # stopped: binding and leases forgotten
    service.wait_log(f"port {restored_tap}: IP learning stopped (its binding went)", start=offset)

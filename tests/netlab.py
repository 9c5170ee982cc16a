"""Throwaway network labs in Linux network namespaces, for kernel and libvirt tests.

A :class:`Lab` is one "host" namespace holding a Linux bridge ``br0`` plus any number of
"VMs": each VM is its own namespace whose ``eth0`` is one end of a veth pair; the other end
(the *port*, e.g. ``vp1``) is enslaved to ``br0`` in the host namespace, exactly where libvirt
would put a guest's tap. Filters under test are applied to the ports, in the host namespace.

Rules this module keeps:

* every namespace it creates is named ``nwft-<random>[-<vm>]``, is unique per lab, and is
  deleted by :meth:`Lab.close` (called by the ``lab`` fixture even when the test fails; an
  ``atexit`` safety net catches the rest), after the processes running in it were killed;
  namespaces of a test process that was killed outright are deleted by :func:`reap_orphans`
  at the start of the next session (``kernel_env`` fixture);
* it never touches the root namespace's links or firewall;
* commands are always argument lists (no shell).

Quick tour::

    lab = Lab()
    a = lab.add_vm("a", "52:54:00:00:00:01", ipv4="10.0.0.1/24", ipv6="fd00::1/64")
    b = lab.add_vm("b", "52:54:00:00:00:02", ipv4="10.0.0.2/24")
    assert lab.ping(a, "10.0.0.2")
    assert lab.tcp_connect(a, "10.0.0.2", 8080)
    frame = Ether(src="52:54:00:99:99:99", dst=b.mac) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP()
    assert lab.frame_delivered(a, frame, to=b)
    lab.close()

Traffic checks spawn ``tests/frametool.py`` inside the namespaces (``ip netns exec``), so
they work whatever namespace the test process is in; a negative check costs about
``settle`` seconds (0.25 s by default), a positive one returns as soon as the frame arrived.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

TESTS_DIR = Path(__file__).resolve().parent
FRAMETOOL = TESTS_DIR / "frametool.py"
PYTHON = sys.executable
NS_PREFIX = "nwft-"
BRIDGE = "br0"
#: Pseudo-endpoint: the bridge device itself (``br0`` in the host namespace).
HOST = "host"
DEFAULT_SETTLE = 0.25

#: One file per live lab namespace, holding the creating process's "PID STARTTIME", so that a
#: later session can delete namespaces whose creator died without cleaning up (SIGKILL).
OWNER_DIR = Path("/run/nwft-netlab")

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_VMNAME_RE = re.compile(r"^[a-z0-9]{1,12}$")
_live_namespaces: set[str] = set()


class NetlabError(RuntimeError):
    """A lab command failed; the message carries the command and its output."""


# --------------------------------------------------------------------------------------------
# Running commands


def run(argv: Sequence[str], input: str | bytes | None = None, check: bool = True,
        timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``argv`` (in the current namespace), capturing text output.

    Raises :class:`NetlabError` (with stdout/stderr) when ``check`` and the exit status is not 0.
    """
    argv = [str(a) for a in argv]
    text = not isinstance(input, bytes)
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=text,
                              timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise NetlabError(f"timed out after {timeout}s: {argv}") from exc
    if check and proc.returncode != 0:
        raise NetlabError(f"command failed (exit {proc.returncode}): {argv}\n"
                          f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def ns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed so that it runs in namespace ``ns`` (``None``: as is)."""
    return list(argv) if ns is None else ["ip", "netns", "exec", ns, *argv]


def run_in(ns: str | None, argv: Sequence[str], input: str | bytes | None = None,
           check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``argv`` inside network namespace ``ns`` via ``ip netns exec``; see :func:`run`."""
    return run(ns_argv(ns, argv), input=input, check=check, timeout=timeout)


def sysctl_in(ns: str, settings: dict[str, str | int]) -> None:
    """Write sysctls inside ``ns`` (keys in dotted form, e.g. ``net.ipv6.conf.eth0.accept_dad``)."""
    run_in(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def new_ns_name(suffix: str = "") -> str:
    """A fresh, unused namespace name ``nwft-<8 hex>[-suffix]``."""
    return f"{NS_PREFIX}{secrets.token_hex(4)}" + (f"-{suffix}" if suffix else "")


def create_namespace(name: str) -> str:
    """Create namespace ``name`` (loopback up) and register it for the atexit safety net."""
    if not name.startswith(NS_PREFIX):
        raise ValueError(f"lab namespaces must start with {NS_PREFIX!r}: {name!r}")
    OWNER_DIR.mkdir(mode=0o700, exist_ok=True)
    marker = OWNER_DIR / name
    marker.write_text(_process_identity(os.getpid()) or "")
    try:
        run(["ip", "netns", "add", name])  # fails if the name exists: never adopt another's
    except BaseException:
        marker.unlink(missing_ok=True)
        raise
    _live_namespaces.add(name)
    run(["ip", "-n", name, "link", "set", "lo", "up"])
    return name


def ns_pids(name: str) -> list[int]:
    """PIDs of the processes whose network namespace is ``name``."""
    proc = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_ns_processes(name: str, grace: float = 3.0) -> None:
    """SIGTERM every process in namespace ``name``, then SIGKILL what survives ``grace`` s."""
    pids = ns_pids(name)
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = ns_pids(name)
    for pid in pids:
        _kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while ns_pids(name) and time.monotonic() < deadline:
        time.sleep(0.05)


def kill_in_namespace(name: str, command: str) -> None:
    """SIGTERM the processes named ``command`` whose network namespace is ``name`` (``pkill``
    run in a namespace would see, and kill, every namespace's processes)."""
    for pid in ns_pids(name):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == command:
            _kill(pid, signal.SIGTERM)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def delete_namespace(name: str) -> None:
    """Kill the processes in ``name`` and delete it; no error if it is already gone (also when
    another test process deletes it meanwhile: workers reap a killed run's namespaces at once)."""
    if name in list_namespaces():
        kill_ns_processes(name)
        run(["ip", "netns", "delete", name], check=False)  # the check is that it is gone
    _live_namespaces.discard(name)
    if name in list_namespaces():
        raise NetlabError(f"namespace {name} still exists after deletion")
    (OWNER_DIR / name).unlink(missing_ok=True)


def _process_identity(pid: int) -> str | None:
    """``"PID STARTTIME"`` of a live process (robust against PID reuse), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"


def reap_orphans() -> list[str]:
    """Delete lab namespaces whose creating process is gone (killed before its teardown).

    Only namespaces recorded in :data:`OWNER_DIR` are considered, so labs of other live test
    sessions and namespaces made by anything else are never touched. Returns the names deleted.
    """
    reaped = []
    if not OWNER_DIR.is_dir():
        return reaped
    for marker in OWNER_DIR.iterdir():
        owner = marker.read_text().strip()
        pid = int(owner.split()[0]) if owner else 0
        if owner and _process_identity(pid) == owner:
            continue
        delete_namespace(marker.name)
        reaped.append(marker.name)
    return reaped


def cleanup_all() -> list[str]:
    """Delete every namespace this process created and has not deleted yet; returns them."""
    leftovers = sorted(_live_namespaces)
    for name in leftovers:
        try:
            delete_namespace(name)
        except Exception as exc:  # keep going: this is the last line of defence
            print(f"netlab: could not delete namespace {name}: {exc}", file=sys.stderr)
    return leftovers


atexit.register(cleanup_all)


# --------------------------------------------------------------------------------------------
# Lab objects


def _split_addr(addr: str | None, default_len: int) -> tuple[str | None, str | None]:
    """``"10.0.0.1/24"`` -> ``("10.0.0.1", "10.0.0.1/24")``; a bare address gets ``default_len``."""
    if addr is None:
        return None, None
    if "/" not in addr:
        addr = f"{addr}/{default_len}"
    return addr.split("/", 1)[0], addr


@dataclass
class VM:
    """A lab "VM": namespace ``ns`` with ``eth0`` (``mac``, addresses) cabled to ``port`` on br0."""

    name: str
    ns: str
    port: str
    mac: str
    ipv4: str | None = None
    """IPv4 address without prefix length (or None)."""
    ipv6: str | None = None
    """IPv6 address without prefix length (or None)."""
    iface: str = "eth0"

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` inside this VM's namespace (see :func:`run_in`)."""
        return run_in(self.ns, argv, **kwargs)


Endpoint = Union[VM, str, tuple]
"""Where traffic is sent or captured: a :class:`VM` (its eth0), a VM name, :data:`HOST`
(``br0`` in the host namespace) or an explicit ``(namespace, interface)`` tuple."""


@dataclass
class Capture:
    """A running ``frametool.py sniff`` on one interface; see :meth:`Lab.capture`.

    After the ``with`` block (or :meth:`stop`), ``frames`` holds the captured frames (bytes).
    """

    ns: str
    iface: str
    prefixes: list[bytes] = field(default_factory=list)
    first: bool = False
    settle: float = DEFAULT_SETTLE
    frames: list[bytes] = field(default_factory=list)
    seen: int = 0
    _proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 10.0) -> "Capture":
        """Start the sniffer and wait until it is capturing."""
        self.spawn()
        return self.wait_ready(ready_timeout)

    def spawn(self) -> None:
        """Start the sniffer process without waiting (see :meth:`wait_ready`)."""
        argv = [PYTHON, str(FRAMETOOL), "sniff", self.iface]
        for p in self.prefixes:
            argv += ["--prefix", p.hex()]
        if self.first:
            argv.append("--first")
        self._proc = subprocess.Popen(ns_argv(self.ns, argv), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait_ready(self, ready_timeout: float = 10.0) -> "Capture":
        """Wait until the spawned sniffer reports that its socket is bound."""
        line = _read_line(self._proc, ready_timeout)
        if not line or not json.loads(line).get("ready"):
            err = self._abort()
            raise NetlabError(f"sniffer on {self.ns}/{self.iface} did not start: {err}")
        return self

    def stop(self, settle: float | None = None) -> list[bytes]:
        """Capture ``settle`` more seconds (or until the first match), then collect the frames."""
        proc = self._proc
        if proc is None:
            return self.frames
        self.request_stop(settle)
        self.collect()
        return self.frames

    def request_stop(self, settle: float | None = None) -> None:
        """Ask the sniffer to end ``settle`` seconds from now (see :meth:`collect`)."""
        settle = self.settle if settle is None else settle
        try:
            self._proc.stdin.write(f"stop {settle}\n".encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # already finished (--first matched)

    def collect(self, timeout: float = 30.0) -> list[bytes]:
        """Wait for the sniffer's report and fill ``frames``."""
        proc, self._proc = self._proc, None
        try:
            line = _read_line(proc, timeout)
            if not line:
                raise NetlabError(f"sniffer on {self.ns}/{self.iface} gave no result: "
                                  f"{proc.stderr.read().decode(errors='replace')}")
            report = json.loads(line)
        finally:
            _close_proc(proc)
        self.frames = [bytes.fromhex(h) for h in report["frames"]]
        self.seen = report["seen"]
        return self.frames

    def _abort(self) -> str:
        proc, self._proc = self._proc, None
        _close_proc(proc)
        return proc.stderr.read().decode(errors="replace") if proc.stderr else ""

    def __enter__(self) -> "Capture":
        return self.start() if self._proc is None else self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            if self._proc is not None:
                self._abort()
            return
        self.stop()


def _read_line(proc: subprocess.Popen, timeout: float) -> bytes:
    """Read one line from ``proc``'s stdout, waiting at most ``timeout`` seconds."""
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return b""
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            buf += chunk
    return buf.split(b"\n", 1)[0]


def _close_proc(proc: subprocess.Popen) -> None:
    try:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout:
        proc.stdout.close()


class Lab:
    """A host namespace with bridge ``br0`` (STP off, forward delay 0, br_netfilter calls on),
    plus VMs added with :meth:`add_vm`. Use as a context manager or call :meth:`close`.

    ``host_ns``: the host namespace's name (where ports, the bridge and the firewall live).
    ``bridge``: ``"br0"``; ``bridge_mac``: its (fixed, random unless given) MAC.
    ``vms``: VM name -> :class:`VM`. In the host namespace IPv6 is off for ports and br0
    (they send nothing of their own) until :meth:`set_bridge_address` gives br0 an IPv6 address.
    """

    def __init__(self, bridge_mac: str | None = None):
        self.bridge = BRIDGE
        self.vms: dict[str, VM] = {}
        self._port_counter = 0
        self._bridge_addrs: list[str] = []
        self._closed = False
        self.last_exchange = ""
        """JSON report of the last tcp_connect/udp_exchange client (for failure messages)."""
        self.host_ns = create_namespace(new_ns_name())
        try:
            self._setup_host(bridge_mac or self._random_mac())
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _random_mac() -> str:
        return "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))

    def _setup_host(self, bridge_mac: str) -> None:
        ns = self.host_ns
        if not Path("/proc/sys/net/bridge").is_dir():
            run(["modprobe", "br_netfilter"], check=False)
        # New devices in this namespace: no DAD, no IPv6 unless asked for (keeps the wire quiet).
        sysctl_in(ns, {"net.ipv6.conf.default.accept_dad": 0,
                       "net.ipv6.conf.default.disable_ipv6": 1})
        run(["ip", "-n", ns, "link", "add", BRIDGE, "address", bridge_mac, "type", "bridge",
             "forward_delay", "0", "stp_state", "0"])
        run(["ip", "-n", ns, "link", "set", BRIDGE, "up"])
        bridge_nf = ["net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"]
        proc = run_in(ns, ["sysctl", "-q", "-w", *(f"{k}=1" for k in bridge_nf)], check=False)
        if proc.returncode != 0:
            raise NetlabError("cannot enable bridge-nf-call-iptables/ip6tables in the lab "
                              f"namespace (is br_netfilter available?): {proc.stderr.strip()}")
        self.bridge_mac = bridge_mac

    # -- topology -----------------------------------------------------------------------------

    def add_vm(self, name: str, mac: str, ipv4: str | None = None, ipv6: str | None = None,
               port: str | None = None) -> VM:
        """Create VM ``name`` (own namespace, ``eth0`` with ``mac`` and addresses, up) whose
        veth peer ``port`` (default ``vp1``, ``vp2``, ... in creation order) is enslaved to br0.

        ``ipv4``/``ipv6`` may carry a prefix length (default /24 and /64); IPv6 uses ``nodad``.
        Returns once the port is forwarding.
        """
        if self._closed:
            raise NetlabError("lab is closed")
        if not _VMNAME_RE.match(name):
            raise ValueError(f"VM name must match {_VMNAME_RE.pattern}: {name!r}")
        if name in self.vms:
            raise ValueError(f"VM {name!r} exists already")
        if port is None:
            self._port_counter += 1
            port = f"vp{self._port_counter}"
            while any(v.port == port for v in self.vms.values()):
                self._port_counter += 1
                port = f"vp{self._port_counter}"
        if not _IFNAME_RE.match(port) or port in (BRIDGE, "lo"):
            raise ValueError(f"bad port name {port!r} (at most 15 characters)")
        ip4, cidr4 = _split_addr(ipv4, 24)
        ip6, cidr6 = _split_addr(ipv6, 64)
        vm_ns = create_namespace(f"{self.host_ns}-{name}")
        vm = VM(name=name, ns=vm_ns, port=port, mac=mac.lower(), ipv4=ip4, ipv6=ip6)
        self.vms[name] = vm
        try:
            sysctl_in(vm_ns, {"net.ipv6.conf.default.accept_dad": 0,
                              "net.ipv6.conf.all.accept_dad": 0,
                              "net.ipv6.conf.default.router_solicitations": 0})
            host = ["ip", "-n", self.host_ns]
            run([*host, "link", "add", port, "type", "veth", "peer", "name", vm.iface,
                 "netns", vm_ns])
            guest = ["ip", "-n", vm_ns]
            run([*guest, "link", "set", vm.iface, "address", vm.mac])
            if cidr4:
                run([*guest, "addr", "add", cidr4, "dev", vm.iface])
            if cidr6:
                run([*guest, "-6", "addr", "add", cidr6, "dev", vm.iface, "nodad"])
            run([*guest, "link", "set", vm.iface, "up"])
            run([*host, "link", "set", port, "master", BRIDGE])
            run([*host, "link", "set", port, "up"])
            self._wait_forwarding(port)
        except BaseException:
            self.remove_vm(name)
            raise
        return vm

    def _wait_forwarding(self, port: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = run(["bridge", "-n", self.host_ns, "-j", "link", "show", "dev", port]).stdout
            info = json.loads(out or "[]")
            if info and info[0].get("state") == "forwarding":
                return
            if time.monotonic() > deadline:
                raise NetlabError(f"port {port} not forwarding after {timeout}s: {info}")
            time.sleep(0.02)

    def remove_vm(self, name: str) -> None:
        """Delete VM ``name``'s namespace (its veth pair goes with it)."""
        vm = self.vms.pop(name)
        delete_namespace(vm.ns)
        run(["ip", "-n", self.host_ns, "link", "del", vm.port], check=False)

    def vm(self, name: str) -> VM:
        """The VM called ``name``."""
        return self.vms[name]

    def set_bridge_address(self, ipv4: str | None = None, ipv6: str | None = None) -> None:
        """Give br0 (the "host" side) addresses, so VMs can talk to the host namespace."""
        ip4, cidr4 = _split_addr(ipv4, 24)
        ip6, cidr6 = _split_addr(ipv6, 64)
        if cidr4:
            run(["ip", "-n", self.host_ns, "addr", "add", cidr4, "dev", BRIDGE])
            self._bridge_addrs.append(ip4)
        if cidr6:
            sysctl_in(self.host_ns, {f"net.ipv6.conf.{BRIDGE}.disable_ipv6": 0})
            run(["ip", "-n", self.host_ns, "-6", "addr", "add", cidr6, "dev", BRIDGE, "nodad"])
            self._bridge_addrs.append(ip6)

    def host_run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` in the host namespace (see :func:`run_in`)."""
        return run_in(self.host_ns, argv, **kwargs)

    def nft(self, script: str) -> subprocess.CompletedProcess:
        """Load an nft script (``nft -f -``) in the host namespace."""
        return self.host_run(["nft", "-f", "-"], input=script)

    def ruleset(self) -> str:
        """``nft list ruleset`` of the host namespace (includes ebtables-nft/iptables-nft)."""
        return self.host_run(["nft", "list", "ruleset"]).stdout

    def flush_neighbours(self, vm: VM | str) -> None:
        """Forget ``vm``'s ARP/NDP cache."""
        vm = self._vm(vm)
        run(["ip", "-n", vm.ns, "neigh", "flush", "dev", vm.iface])

    # -- endpoints ----------------------------------------------------------------------------

    def _vm(self, vm: VM | str) -> VM:
        return self.vms[vm] if isinstance(vm, str) else vm

    def where(self, endpoint: Endpoint) -> tuple[str, str]:
        """Resolve an :data:`Endpoint` to ``(namespace, interface)``."""
        if isinstance(endpoint, tuple):
            return endpoint
        if endpoint == HOST:
            return self.host_ns, BRIDGE
        vm = self._vm(endpoint)
        return vm.ns, vm.iface

    def ns_of_ip(self, ip: str) -> str:
        """The namespace owning address ``ip`` (a VM's, or the host's for br0 addresses)."""
        for vm in self.vms.values():
            if ip in (vm.ipv4, vm.ipv6):
                return vm.ns
        if ip in self._bridge_addrs:
            return self.host_ns
        raise KeyError(f"no lab endpoint has address {ip}")

    # -- traffic ------------------------------------------------------------------------------

    def ping(self, src: VM | str, dst_ip: str, count: int = 1, timeout: float = 1.0) -> bool:
        """True if ``count`` ICMP echo requests from ``src`` to ``dst_ip`` got replies
        (each waits at most ``timeout`` seconds)."""
        src = self._vm(src)
        argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(timeout), "-i", "0.05"]
        if ":" in dst_ip:
            argv.append("-6")
        proc = run_in(src.ns, [*argv, dst_ip], check=False, timeout=count * (timeout + 1) + 5)
        return proc.returncode == 0

    def _server(self, kind: str, ns: str, addr: str, port: int) -> subprocess.Popen:
        proc = subprocess.Popen(ns_argv(ns, [PYTHON, str(FRAMETOOL), kind, addr, str(port)]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        line = _read_line(proc, 10.0)
        if not line:
            _close_proc(proc)
            raise NetlabError(f"{kind} {addr}:{port} in {ns} did not start: "
                              f"{proc.stderr.read().decode(errors='replace')}")
        return proc

    def _exchange(self, kind: str, src: VM | str, dst_ip: str, port: int, timeout: float,
                  dst_ns: str | None) -> bool:
        src = self._vm(src)
        dst_ns = dst_ns or self.ns_of_ip(dst_ip)
        server = self._server(f"{kind}-listen", dst_ns, dst_ip, port)
        try:
            proc = run_in(src.ns, [PYTHON, str(FRAMETOOL), f"{kind}-request" if kind == "udp"
                                   else f"{kind}-connect", dst_ip, str(port),
                                   "--timeout", str(timeout)],
                          check=False, timeout=timeout + 10)
        finally:
            _close_proc(server)
        self.last_exchange = proc.stdout.strip()
        return proc.returncode == 0

    def tcp_connect(self, src: VM | str, dst_ip: str, port: int, timeout: float = 0.5,
                    dst_ns: str | None = None) -> bool:
        """True if a TCP connection from ``src`` to ``dst_ip:port`` succeeds and the greeting
        of a listener started (for this call) in the namespace owning ``dst_ip`` arrives."""
        return self._exchange("tcp", src, dst_ip, port, timeout, dst_ns)

    def udp_exchange(self, src: VM | str, dst_ip: str, port: int, timeout: float = 0.5,
                     dst_ns: str | None = None) -> bool:
        """True if a UDP datagram from ``src`` to ``dst_ip:port`` is echoed back by a listener
        started (for this call) in the namespace owning ``dst_ip``."""
        return self._exchange("udp", src, dst_ip, port, timeout, dst_ns)

    def send_frame(self, src: Endpoint, *frames) -> None:
        """Transmit raw Ethernet frames (bytes or scapy packets) on ``src``'s interface."""
        ns, iface = self.where(src)
        run_in(ns, [PYTHON, str(FRAMETOOL), "send", iface, *(bytes(f).hex() for f in frames)])

    def capture(self, where: Endpoint, prefixes: Iterable[bytes] = (), first: bool = False,
                settle: float = DEFAULT_SETTLE) -> Capture:
        """A :class:`Capture` of frames received at ``where`` (use as a context manager:
        the sniffer is ready when the block starts; ``capture.frames`` is filled after it)."""
        ns, iface = self.where(where)
        return Capture(ns=ns, iface=iface, prefixes=[bytes(p) for p in prefixes], first=first,
                       settle=settle)

    def deliveries(self, src: Endpoint, frame, to: Iterable[Endpoint],
                   settle: float = DEFAULT_SETTLE) -> dict:
        """Send ``frame`` from ``src`` and report, for each endpoint in ``to``, whether it
        received it: ``{endpoint: bool}`` (endpoints as given; VMs keyed by name).

        The frame gets a random 8-byte tag appended (Ethernet trailer/padding) so that only
        this very frame counts; a receiver matches when its frame starts with the frame as
        given (bridge netfilter may trim the trailer of IP packets, which still matches).
        """
        core = bytes(frame)
        wire = core + secrets.token_bytes(8)
        if len(wire) < 60:
            wire += bytes(60 - len(wire))
        targets = list(to)
        captures = [self.capture(t, prefixes=[core], first=True, settle=settle) for t in targets]
        try:
            for c in captures:
                c.spawn()
            for c in captures:
                c.wait_ready()
            self.send_frame(src, wire)
            for c in captures:
                c.request_stop(settle)
            for c in captures:
                c.collect()
        finally:
            for c in captures:
                if c._proc is not None:
                    c._abort()
        result = {}
        for t, c in zip(targets, captures):
            key = t.name if isinstance(t, VM) else t
            result[key] = any(f.startswith(core) for f in c.frames)
        return result

    def frame_delivered(self, src: Endpoint, frame, to: Endpoint,
                        settle: float = DEFAULT_SETTLE) -> bool:
        """True if ``frame`` (bytes or scapy packet) sent from ``src`` arrives at ``to``
        (a VM, or :data:`HOST` for the bridge device itself)."""
        return next(iter(self.deliveries(src, frame, [to], settle=settle).values()))

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Delete every VM namespace and the host namespace (killing their processes).

        Idempotent; raises :class:`NetlabError` at the end if something could not be removed.
        """
        if self._closed:
            return
        self._closed = True
        errors = []
        for name in list(self.vms):
            try:
                self.remove_vm(name)
            except Exception as exc:
                errors.append(f"{name}: {exc}")
        try:
            delete_namespace(self.host_ns)
        except Exception as exc:
            errors.append(f"{self.host_ns}: {exc}")
        if errors:
            raise NetlabError("lab teardown incomplete: " + "; ".join(errors))

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

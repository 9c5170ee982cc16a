"""Faults of the resident service: it is SIGKILLed while it runs a request, stopped, hung,
fed malformed or oversized requests, or asked by a non-root process.

The SIGKILL rounds use random moments (the seed is printed; set NWFT_SEED to replay).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from bindings_helpers import binding_xml, dispatch_entries
from service_helpers import Daemon, client_argv, env_for, hook_argv

NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
UUID = "6f0c4f5e-6b1e-4d8a-9c51-0b3c1ae0b0b1"
PORTS = 24


def plain_ports(lab, names: list[str]) -> list[str]:
    lines = [line for name in names for line in (f"link add {name} type veth peer name {name}x",
                                                 f"link set {name} master br0", f"link set {name} up")]
    lab.host_run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")
    return names


def many_interfaces_domain(ports: list[str]) -> str:
    entries = "".join(f"<nwf:interface mac='52:54:00:0b:00:{i:02x}'><nwf:filterref filter='clean-traffic'>"
                      f"<nwf:parameter name='IP' value='10.0.11.{i + 1}'/></nwf:filterref></nwf:interface>"
                      for i in range(len(ports)))
    devices = "".join(f"<interface type='bridge'><mac address='52:54:00:0b:00:{i:02x}'/><source bridge='br0'/>"
                      f"<target dev='{port}'/></interface>" for i, port in enumerate(ports))
    return (f"<domain type='kvm'><name>nwft-kill</name><uuid>{UUID}</uuid><metadata>"
            f"<nwf:nwfilter xmlns:nwf='{NS}'>{entries}</nwf:nwfilter></metadata><devices>{devices}</devices>"
            "</domain>\n")


class Env:
    def __init__(self, lab, tmp_path: Path, rundir: Path | None = None):
        self.lab, self.ns = lab, lab.host_ns
        self.conf, self.run = tmp_path / "conf", rundir or tmp_path / "run"
        self.conf.mkdir()
        self.run.mkdir(exist_ok=True)
        self.tmp = tmp_path

    def daemon(self, **kwargs) -> Daemon:
        return Daemon(self.ns, self.conf, self.run, log=self.tmp / "service.log", **kwargs)

    def env(self, service: bool = True, **extra: str) -> dict:
        return env_for(self.conf, self.run, service=service, **extra)

    def cli(self, *args: str, service: bool = True, input: str = "", timeout: float = 120,
            **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(client_argv(self.ns, *args), input=input, capture_output=True, text=True,
                              env=self.env(service, **extra), timeout=timeout, cwd=self.tmp)

    def hook(self, *args: str, input: str = "", service: bool = True, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(hook_argv(self.ns, *args), input=input, capture_output=True, text=True,
                              env=self.env(service, **extra), timeout=120)


@pytest.fixture
def env(lab, tmp_path) -> Env:
    return Env(lab, tmp_path)


# ------------------------------------------------------------------------------------------
# SIGKILL in the middle of a request


def test_service_killed_during_hook_start_leaves_no_port_half_filtered(env, rng):
    """A hook ``start`` binding 24 interfaces through the service; the service is SIGKILLed at a
    random moment. The client fails (closed) or succeeded before the kill, never runs it again;
    the kernel holds all 24 ports or none; after libvirt's reaction to the failed start (the
    ``stopped`` hook, in-process now; when the kill came between the kernel transaction and the
    last record, after the guest's next start and stop) nothing of the guest is left and
    ``verify`` passes; a new start then filters every port."""
    ports = plain_ports(env.lab, [f"kp{i}" for i in range(PORTS)])
    xml = many_interfaces_domain(ports)
    with env.daemon() as daemon:  # an undisturbed start, for the timing
        began = time.monotonic()
        assert env.hook("nwft-kill", "start", "begin", "-", input=xml).returncode == 0
        duration = time.monotonic() - began
        assert env.hook("nwft-kill", "stopped", "end", "-", input=xml).returncode == 0
    outcomes = []
    for _ in range(6):
        daemon = env.daemon().start()
        client = subprocess.Popen(hook_argv(env.ns, "nwft-kill", "start", "begin", "-"), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.env())
        client.stdin.write(xml)
        client.stdin.close()
        client.stdin = None  # written: communicate() must not touch it
        time.sleep(rng.uniform(0.0, duration * 0.8))
        daemon.kill(signal.SIGKILL)
        out, err = client.communicate(timeout=60)
        daemon.stop()
        filtered = dispatch_entries(env.ns, "nftables")
        outcomes.append((client.returncode, len(filtered)))
        assert filtered in (set(), set(ports)), f"half filtered: {sorted(filtered)}"
        if client.returncode != 0:
            assert err == ("libvirt-nwfilter: the libvirt-nwfilter service ended while running the request; it "
                           "was not run again (see the service's log; 'libvirt-nwfilter verify' checks the rules)\n")
        # libvirt stops a guest whose start failed (and we stop it either way): in-process now.
        assert env.hook("nwft-kill", "stopped", "end", "-", input=xml).returncode == 0
        left = dispatch_entries(env.ns, "nftables")
        # Killed between the kernel transaction and the last record: ports without a record stay
        # (filtered: the transaction was whole). The guest's next start and stop clear them.
        assert left <= set(ports)
        if left:
            assert env.hook("nwft-kill", "start", "begin", "-", input=xml).returncode == 0
            assert env.hook("nwft-kill", "stopped", "end", "-", input=xml).returncode == 0
        assert dispatch_entries(env.ns, "nftables") == set()
        verify = env.cli("verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert env.cli("-q", "binding-list").stdout == ""
    print(f"(exit status, ports filtered at the kill): {outcomes}")
    assert env.hook("nwft-kill", "start", "begin", "-", input=xml).returncode == 0
    assert dispatch_entries(env.ns, "nftables") == set(ports)
    assert env.cli("verify").returncode == 0


VARIANT = """<filter name='nwft-kill' chain='ipv4'>
  <uuid>6f0c4f5e-6b1e-4d8a-9c51-0b3c1ae0b0b2</uuid>
  <rule action='drop' direction='out' priority='100'><udp dstportstart='{port}'/></rule>
  <rule action='drop' direction='out' priority='200'><tcp dstportstart='{port}'/></rule>
</filter>
"""


def test_service_killed_during_define_of_a_filter_in_use(env, rng):
    """24 bindings use a filter; its redefinition through the service is SIGKILLed at random
    moments. The kernel holds all old or all new rules for every port, and after the next
    command (which completes an interrupted update) ``verify`` passes and the stored filter is
    one of the two."""
    ports = plain_ports(env.lab, [f"dp{i}" for i in range(PORTS)])
    (env.tmp / "a.xml").write_text(VARIANT.format(port=7001))
    (env.tmp / "b.xml").write_text(VARIANT.format(port=7002))
    assert env.cli("define", "a.xml", service=False).returncode == 0
    for i, port in enumerate(ports):
        (env.tmp / f"{port}.xml").write_text(binding_xml(port, f"52:54:00:0d:00:{i:02x}", "nwft-kill"))
        assert env.cli("binding-create", f"{port}.xml", service=False).returncode == 0
    with env.daemon():
        began = time.monotonic()
        assert env.cli("define", "b.xml").returncode == 0
        duration = time.monotonic() - began
    seen = []
    for round_ in range(6):
        target = "a.xml" if round_ % 2 else "b.xml"
        daemon = env.daemon().start()
        client = subprocess.Popen(client_argv(env.ns, "define", target), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env.env(), cwd=env.tmp)
        time.sleep(rng.uniform(0.0, duration * 0.8))
        daemon.kill(signal.SIGKILL)
        _, err = client.communicate(timeout=60)
        daemon.stop()
        ruleset = env.lab.host_run(["nft", "list", "ruleset"]).stdout
        variants = {p for p in ("7001", "7002") if f"dport {p}" in ruleset}
        assert len(variants) == 1, f"old and new rules mixed: {variants}"
        seen.append((client.returncode, variants.pop()))
        if client.returncode:
            assert "ended while running the request" in err
        verify = env.cli("verify")  # completes an interrupted update first
        assert verify.returncode == 0, verify.stdout + verify.stderr
        stored = env.cli("dumpxml", "nwft-kill").stdout
        assert ("'7001'" in stored) != ("'7002'" in stored)
        assert env.cli("-q", "binding-list").stdout.count("nwft-kill") == PORTS
        assert dispatch_entries(env.ns, "nftables") == set(ports)
    print(f"(exit status, rules in the kernel at the kill): {seen}")


# ------------------------------------------------------------------------------------------
# Stopped, hung, malformed, not root


def test_clients_fall_back_in_process_when_the_service_is_stopped(env):
    daemon = env.daemon().start()
    assert env.cli("-q", "list").returncode == 0
    daemon.stop()  # the socket file stays; nobody listens
    assert (env.run / "libvirt-nwfilterd.sock").exists()
    plain_ports(env.lab, ["sp0"])
    (env.tmp / "b.xml").write_text(binding_xml("sp0", "52:54:00:0e:00:01", "no-mac-spoofing"))
    done = env.cli("binding-create", "b.xml")
    assert (done.returncode, done.stdout, done.stderr) == (0, "Network filter binding on sp0 created from b.xml\n", "")
    assert dispatch_entries(env.ns, "nftables") == {"sp0"}
    killed = env.daemon().start()
    killed.kill(signal.SIGKILL)  # a stale socket of a dead service
    killed.stop()
    done = env.cli("binding-delete", "sp0")
    assert (done.returncode, done.stderr) == (0, "")
    assert env.hook("g", "started", "begin", "-").returncode == 0
    assert dispatch_entries(env.ns, "nftables") == set()
    assert "sp0" not in (env.tmp / "service.log").read_text().split("stopping")[-1]


def test_client_gives_up_on_a_hung_service_in_the_bounded_time(env):
    with env.daemon() as daemon:
        daemon.kill(signal.SIGSTOP)
        began = time.monotonic()
        done = env.cli("list", LIBVIRT_NWFILTER_SERVICE_TIMEOUT="2")
        waited = time.monotonic() - began
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr == (f"error: the libvirt-nwfilter service ({env.run}/libvirt-nwfilterd.sock) did not take "
                               "the request within 2 s; giving up (set LIBVIRT_NWFILTER_NO_SERVICE=1 to work "
                               "without the service)\n")
        assert 2 <= waited < 30
        daemon.kill(signal.SIGCONT)
        # Taken, then it does not finish (the host lock is held elsewhere): the hook fails closed
        # within the bounded time and its caller's pipes are released.
        (env.run / "lock").touch()
        with open(env.run / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            began = time.monotonic()
            done = env.hook("g", "start", "begin", "-", input=start_xml(), LIBVIRT_NWFILTER_SERVICE_TIMEOUT="2")
            waited = time.monotonic() - began
        assert done.returncode == 1 and 2 <= waited < 30
        assert done.stderr == (f"libvirt-nwfilter: the libvirt-nwfilter service ({env.run}/libvirt-nwfilterd.sock) did "
                               "not finish the request within 2 s; giving up (it may still complete it: see the "
                               "service's log)\n")
        assert env.cli("-q", "binding-list").returncode == 0  # still serving


def start_xml() -> str:
    return (f"<domain type='kvm'><name>g</name><uuid>{UUID}</uuid><metadata><nwf:nwfilter xmlns:nwf='{NS}'>"
            "<nwf:interface mac='52:54:00:0b:01:01'><nwf:filterref filter='no-mac-spoofing'/></nwf:interface>"
            "</nwf:nwfilter></metadata><devices><interface type='bridge'><mac address='52:54:00:0b:01:01'/>"
            "<target dev='hp0'/></interface></devices></domain>")


def raw_exchange(path: Path, data: bytes, fds: list[int] | None = None) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(path))
        if fds:
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer


def test_malformed_and_oversized_requests_are_refused_and_the_service_keeps_serving(env):
    with env.daemon(options=("--no-libvirt", "--max-request", "4096")) as daemon:
        sock = daemon.socket
        netns = os.open(f"/run/netns/{env.ns}", os.O_RDONLY)
        try:
            fds = [0, 1, 2, netns]
            assert raw_exchange(sock, b"GET / HTTP/1.0\r\n\r\n") == b"error not a libvirt-nwfilter request\n"
            assert raw_exchange(sock, b"NWF1" + struct.pack("!I", 1 << 30), fds) == \
                b"error request of 1073741824 bytes refused (at most 4096)\n"
            payload = b"kind=cli\0cwd=/\0arg=" + b"x" * 5000
            assert raw_exchange(sock, b"NWF1" + struct.pack("!I", len(payload)) + payload, fds) == \
                b"error request of 5019 bytes refused (at most 4096)\n"
            ok = b"kind=cli\0cwd=/\0arg=list"
            assert raw_exchange(sock, b"NWF1" + struct.pack("!I", len(ok)) + ok) == \
                b"error expected 4 file descriptors (stdin, stdout, stderr, network namespace), got 0\n"
            for bad, message in ((b"kind=shell\0cwd=/", b"error request kind must be one of cli, hook\n"),
                                 (b"kind=cli\0cwd=rel", b"error the working directory must be an absolute path\n"),
                                 (b"kind=cli\0cwd=/\0env=PATH=/x", b"error a request may carry only "
                                  b"LIBVIRT_NWFILTER_* variables, EDITOR and VISUAL\n"),
                                 (b"kind=cli\0cwd=/\0argv", b"error malformed request field\n"),
                                 (b"NWF1\0\0\0\x10kind", b"error incomplete request\n")):
                data = bad if bad.startswith(b"NWF1") else b"NWF1" + struct.pack("!I", len(bad)) + bad
                assert raw_exchange(sock, data, fds) == message
            assert raw_exchange(sock, b"NWF1" + struct.pack("!I", len(ok)) + ok, [0, 1, 2, 0]) == \
                b"error cannot enter the client's network namespace: [Errno 22] Invalid argument\n"
        finally:
            os.close(netns)
        done = env.cli("-q", "list")
        assert done.returncode == 0 and "clean-traffic" in done.stdout
        log = daemon.log_text()
        assert log.count("request refused") == 10 and daemon.proc.poll() is None


def test_non_root_connections_are_refused(lab, tmp_path):
    rundir = Path(tempfile.mkdtemp(prefix="nwft-service-"))  # mode 0700, in a directory anyone may enter
    env = Env(lab, tmp_path, rundir)
    try:
        _non_root_refused(env)
    finally:
        shutil.rmtree(rundir)


def _non_root_refused(env: Env) -> None:
    with env.daemon() as daemon:
        assert oct(daemon.socket.stat().st_mode & 0o777) == "0o600"
        probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
                 "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print('connect', e.errno); sys.exit()\n"
                 "s.sendall(b'NWF1\\0\\0\\0\\0'); print(s.recv(200).decode().strip())\n")
        nobody = subprocess.run(["/usr/bin/python3", "-c", probe, str(daemon.socket)], capture_output=True, text=True,
                                user=65534, timeout=30)
        assert nobody.stdout.strip() == "connect 13"  # EACCES: the run directory and socket are root's
        os.chmod(env.run, 0o755)  # now let it reach the socket: the service itself must refuse
        os.chmod(daemon.socket, 0o666)
        nobody = subprocess.run(["/usr/bin/python3", "-c", probe, str(daemon.socket)], capture_output=True, text=True,
                                user=65534, timeout=30)
        assert nobody.stdout.strip() == "error permission denied: only root may use the libvirt-nwfilter service"
        assert "connection from uid 65534 refused" in daemon.log_text()
        assert env.cli("-q", "list").returncode == 0

"""A DHCP server behind the bridge, for tests whose guests ask for an address (network boot).

:class:`DhcpServer` runs Debian's ``dnsmasq`` (package dnsmasq-base: DHCP only, no DNS, no
daemon) on a lab VM's ``eth0``, so its traffic crosses the bridge like any guest's. It hands out
fixed addresses to known MACs (``hosts``) and, optionally, a dynamic range; everything it does
goes to its own log file and lease file in a directory of the caller's::

    server = DhcpServer(lab.add_vm("dhcp", "52:54:00:00:00:fd", ipv4="10.0.0.1/24"), workdir,
                        hosts={"52:54:00:aa:00:01": "10.0.0.101"})
    with server:
        ...
        assert server.wait_lease("52:54:00:aa:00:01") == "10.0.0.101"

Stopped by its PID (:meth:`stop`, also on leaving the ``with`` block); the lab deletes the
namespace anyway.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence

import netlab

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


class DhcpServer:
    """dnsmasq serving DHCP on ``vm``'s eth0 (``vm.ipv4`` is the server's address)."""

    def __init__(self, vm: netlab.VM, workdir: Path, hosts: Mapping[str, str] = (),
                 pool: tuple[str, str] | None = None, lease_time: str = "1h", options: Sequence[str] = ()):
        self.vm = vm
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.leasefile = self.workdir / "dnsmasq.leases"
        self.logfile = self.workdir / "dnsmasq.log"
        self.hosts = dict(hosts)
        self.pool = pool
        self.lease_time = lease_time
        self.options = tuple(options)  # more dnsmasq options (e.g. TFTP for network boot)
        self._proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        net = ipaddress.ip_interface(f"{self.vm.ipv4}/24").network
        ranges = [f"--dhcp-range={start},{end},{net.netmask},{self.lease_time}" for start, end in
                  ([self.pool] if self.pool else [])]
        ranges += [f"--dhcp-range={ip},static,{net.netmask},{self.lease_time}"
                   for ip in sorted(set(self.hosts.values()))]
        return [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--no-resolv", "--no-hosts",
                f"--interface={self.vm.iface}", "--bind-interfaces", "--dhcp-authoritative", "--log-dhcp",
                f"--log-facility={self.logfile}", f"--dhcp-leasefile={self.leasefile}",
                f"--pid-file={self.workdir / 'dnsmasq.pid'}", "--user=root", "--group=root",
                *ranges, *(f"--dhcp-host={mac},{ip}" for mac, ip in self.hosts.items()), *self.options]

    def start(self, timeout: float = 15.0) -> "DhcpServer":
        """Start dnsmasq and wait until it serves DHCP (its log says so)."""
        self._proc = subprocess.Popen(netlab.ns_argv(self.vm.ns, self.argv()), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while "DHCP, " not in self.log():
            if self._proc.poll() is not None:
                raise netlab.NetlabError(f"dnsmasq exited with {self._proc.returncode}: "
                                         f"{self._proc.stdout.read()}{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise netlab.NetlabError(f"dnsmasq not serving after {timeout}s: {self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        """dnsmasq's log so far ('' before it wrote one)."""
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def leases(self) -> dict[str, str]:
        """MAC -> IPv4 address of every lease handed out so far."""
        try:
            lines = self.leasefile.read_text().splitlines()
        except FileNotFoundError:
            return {}
        return {fields[1].lower(): fields[2] for fields in (line.split() for line in lines) if len(fields) >= 3}

    def wait_lease(self, mac: str, timeout: float = 60.0) -> str | None:
        """The address leased to ``mac``, waiting up to ``timeout`` seconds (None: no lease)."""
        deadline = time.monotonic() + timeout
        while (ip := self.leases().get(mac.lower())) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        return ip

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def __enter__(self) -> "DhcpServer":
        return self if self._proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

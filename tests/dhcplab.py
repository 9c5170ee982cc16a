"""Real DHCP in lab namespaces: Debian's ``dnsmasq`` as a server on a lab VM, and ISC's
``dhclient`` as the client of another (tests/netlab.py VMs).

Both are processes of the test, known by their PIDs and stopped by them (the lab's teardown
kills whatever is left in its namespaces). Files (leases, logs, the client's configuration and
script) live in a per-test directory. The client's script only sets or removes the leased
address on the interface, so nothing of the host (``/etc/resolv.conf``) is touched.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import netlab

CLIENT_SCRIPT = """#!/bin/sh
# dhclient script of the learning tests: the leased address on the interface, nothing else
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT)
    if [ -n "$old_ip_address" ] && [ "$old_ip_address" != "$new_ip_address" ]; then
      ip -4 addr del "$old_ip_address/24" dev "$interface" 2>/dev/null
    fi
    ip -4 addr replace "$new_ip_address/24" dev "$interface" ;;
  RELEASE|EXPIRE|STOP|FAIL)
    [ -n "$old_ip_address" ] && ip -4 addr del "$old_ip_address/24" dev "$interface" 2>/dev/null ;;
esac
exit 0
"""


class Dnsmasq:
    """``dnsmasq`` serving DHCP (no DNS) on ``vm``'s eth0: ``first``..``last``, /24, leases of
    ``lease`` (dnsmasq's minimum is two minutes); ``options`` are more dnsmasq options (TFTP)."""

    def __init__(self, vm: netlab.VM, workdir: Path, first: str, last: str, lease: str = "2m",
                 options: tuple[str, ...] = ()):
        self.vm, self.workdir = vm, Path(workdir)
        self.range = (first, last, lease)
        self.options = options
        self.log = self.workdir / f"dnsmasq-{vm.name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "Dnsmasq":
        self.workdir.mkdir(parents=True, exist_ok=True)
        first, last, lease = self.range
        argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--pid-file=",
                "--user=root", "--group=root", "--interface=eth0", "--bind-interfaces", "--dhcp-authoritative",
                f"--dhcp-range={first},{last},255.255.255.0,{lease}",
                f"--dhcp-leasefile={self.workdir / f'dnsmasq-{self.vm.name}.leases'}",
                "--log-dhcp", "--log-facility=-", *self.options]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(netlab.ns_argv(self.vm.ns, argv), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log)
        deadline = time.monotonic() + timeout
        while "DHCP, IP range" not in self.log_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dnsmasq did not start:\n{self.log_text()}")
            time.sleep(0.05)
        return self

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None


class Dhclient:
    """ISC ``dhclient`` on ``vm``'s eth0 with client identifier ``client_id`` (a second client
    on the same interface with another identifier gets a second lease)."""

    def __init__(self, vm: netlab.VM, workdir: Path, client_id: str = "first"):
        self.vm, self.workdir, self.client_id = vm, Path(workdir), client_id
        self.workdir.mkdir(parents=True, exist_ok=True)
        stem = self.workdir / f"dhclient-{vm.name}-{client_id}"
        self.conf, self.leases, self.pidfile = (Path(f"{stem}.{suffix}") for suffix in ("conf", "leases", "pid"))
        self.script = self.workdir / "dhclient-script"
        self.conf.write_text(f'timeout 30;\nretry 5;\ninitial-interval 1;\nsend dhcp-client-identifier "{client_id}";\n')
        self.script.write_text(CLIENT_SCRIPT)
        self.script.chmod(0o755)
        self.output = ""

    def _run(self, *options: str, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = ["dhclient", "-4", "-v", *options, "-sf", str(self.script), "-lf", str(self.leases), "-pf",
                str(self.pidfile), "-cf", str(self.conf), "eth0"]
        done = self.vm.run(argv, check=False, timeout=timeout)
        self.output += done.stderr
        return done

    def lease(self) -> str:
        """Obtain a lease (DISCOVER .. ACK); the client then keeps running in the background,
        renewing. Returns the address."""
        done = self._run("-1")
        bound = re.findall(r"bound to (\S+) ", done.stderr)
        if done.returncode != 0 or not bound:
            raise RuntimeError(f"dhclient got no lease (exit {done.returncode}):\n{done.stderr}")
        return bound[-1]

    def release(self) -> None:
        """``dhclient -r``: send a RELEASE and stop the running client."""
        done = self._run("-r")
        if done.returncode != 0 or "DHCPRELEASE" not in done.stderr:
            raise RuntimeError(f"dhclient -r failed (exit {done.returncode}):\n{done.stderr}")

    def stop(self) -> None:
        """End the running client without releasing its lease (by its PID)."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.pidfile.unlink(missing_ok=True)

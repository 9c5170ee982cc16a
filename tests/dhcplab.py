"""A real DHCP client in a lab namespace: ISC's ``dhclient`` on a lab VM (the server is
tests/dhcpd.py's dnsmasq on another).

The client is a process of the test, known by its PID and stopped by it (the lab's teardown
kills whatever is left in its namespaces). Its files (leases, configuration, script) live in a
per-test directory. Its script only sets or removes the leased address on the interface, so
nothing of the host (``/etc/resolv.conf``) is touched.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
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

#!/usr/bin/env python3
"""Benchmark of IP address learning in libvirt-nwfilterd: ``.venv/bin/python bench/learning.py``
(as root, after ``scripts/bootstrap``; ~3 minutes; nftables backend).

In a fresh network namespace (run directory on tmpfs), ``libvirt-nwfilterd`` running there, the
guests are veth pairs: frames "from the guest" are sent on the peer, frames "to the guest" out of
the port itself (as a bridge would send them):

* DHCP ACK -> full filter: a port in ``dhcp`` mode; the ACK of a trusted server is sent, and the
  time until ``nft monitor`` shows the port's rule with the acknowledged address is taken; then
  the guest releases the address (untimed) so that every round is the same. Median and max.
* IPv6 DAD probe -> full filter: a port bound to ``clean-traffic-dualstack`` learning ``IPV6``;
  the guest probes a new address each round, timed the same way.
* 100 guests learning and idle (``any``): CPU time of the service's processes over 30 s.
* A flood of 10,000 DHCP requests a second for 10 s from one ``dhcp`` guest (every one passes
  the kernel socket filter and is rate-limited by the learner): the service's CPU time per frame,
  and ``binding-list`` through the service during the flood against without it.

Writes OUT/learning.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import dhcp_frames as dhcp  # noqa: E402  (the tests' frame builders)
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

from libvirt_nwfilter.learning.snoop6 import solicited_node  # noqa: E402

PY = str(REPO / ".venv" / "bin" / "python")
CLI = str(REPO / ".venv" / "bin" / "libvirt-nwfilter")
SERVER, SERVER_MAC = "10.6.0.254", "52:54:00:06:00:fe"
GUEST, GUEST_MAC = "lg", "52:54:00:06:00:01"
IDLE_GUESTS, IDLE_SECONDS = 100, 30.0
FLOOD_RATE, FLOOD_SECONDS = 10_000, 10.0


def binding_xml(port: str, mac: str, params: dict[str, str], filter_name: str = "clean-traffic") -> str:
    inner = "".join(f"<parameter name='{n}' value='{v}'/>" for n, v in params.items())
    return (f"<filterbinding><owner><name>bench</name><uuid>{uuidlib.uuid4()}</uuid></owner>"
            f"<portdev name='{port}'/><mac address='{mac}'/><filterref filter='{filter_name}'>{inner}</filterref>"
            "</filterbinding>\n")


class RuleMonitor:
    """``nft monitor rules``, read in a thread: how long until a rule names an address."""

    def __enter__(self) -> "RuleMonitor":
        self.lines: queue.Queue = queue.Queue()
        self.proc = subprocess.Popen(["nft", "monitor", "rules"], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=lambda: [self.lines.put((time.perf_counter(), line)) for line in self.proc.stdout],
                         daemon=True).start()
        time.sleep(0.5)
        return self

    def time_until(self, address: str, action) -> float:
        while not self.lines.empty():
            self.lines.get()
        sent = time.perf_counter()
        action()
        while True:
            seen, line = self.lines.get(timeout=60)
            if re.search(rf"(?<![\w:]){re.escape(address)}(?![\w:])", line):
                return seen - sent

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait()


def summary(label: str, samples: list[float], unit: str = "ms", scale: float = 1000.0) -> dict:
    median = statistics.median(samples)
    print(f"{label:<72} {median * scale:9.2f} {unit}  ({min(samples) * scale:.2f}-{max(samples) * scale:.2f}, "
          f"n={len(samples)})", flush=True)
    return {"label": label, "unit": unit, "median": median * scale, "min": min(samples) * scale,
            "max": max(samples) * scale, "n": len(samples)}


def send(iface: str, *frames: bytes) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((iface, 0))
        for frame in frames:
            sock.send(frame + bytes(max(0, 60 - len(frame))))


class Inner:
    """Runs inside the namespace."""

    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="nwf-bench-learn-", dir="/run"))
        self.conf, self.run = self.work / "conf", self.work / "run"
        self.conf.mkdir()
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LIBVIRT_NWFILTER_CONFDIR": str(self.conf),
                    "LIBVIRT_NWFILTER_RUNDIR": str(self.run), "LIBVIRT_NWFILTER_BACKEND": "nftables"}
        self.log = self.work / "service.log"
        self.daemon: subprocess.Popen | None = None
        self.results: dict[str, dict] = {}

    # -- helpers ----------------------------------------------------------------------------
    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
        done = subprocess.run([CLI, *args], input=stdin, capture_output=True, text=True, env=self.env)
        if done.returncode != 0:
            raise RuntimeError(f"{args}: {done.stderr}")
        return done

    def ports(self, names: list[str]) -> None:
        lines = [f"link add {n} type veth peer name {n}x" for n in names]
        lines += [f"link set {n}{side} up" for n in names for side in ("", "x")]
        subprocess.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)

    def start_daemon(self) -> None:
        log = open(self.log, "ab")
        self.daemon = subprocess.Popen([PY, "-m", "libvirt_nwfilter.daemon", "--no-libvirt", "--no-heal"],
                                       env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        for _ in range(600):
            if (self.run / "libvirt-nwfilterd.sock").exists():
                return
            time.sleep(0.05)
        raise RuntimeError(f"the service did not start:\n{self.log.read_text()}")

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(timeout=60)
            self.daemon = None

    def service_cpu(self) -> float:
        """CPU seconds (user + system) of the service's processes so far, reaped children included."""
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.daemon.pid:  # its session (started with start_new_session)
                total += sum(int(f) for f in fields[11:15])
        return total / os.sysconf("SC_CLK_TCK")

    def wait_log(self, text: str, count: int = 1, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.log.read_text(errors="replace").count(text) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service never logged {text!r} x{count}")
            time.sleep(0.1)

    def learned(self, port: str) -> bool:
        return "<nwf:address" in self.cli("binding-dumpxml", port).stdout

    # -- scenarios --------------------------------------------------------------------------
    def ack_to_filter(self, rounds: int) -> None:
        self.cli("binding-create", "-", stdin=binding_xml(GUEST, GUEST_MAC, {"CTRL_IP_LEARNING": "dhcp",
                                                                            "DHCPSERVER": SERVER}))
        self.wait_log(f"port {GUEST}: learning its IP address")
        samples = []
        with RuleMonitor() as monitor:
            for k in range(rounds):
                address = f"10.6.0.{10 + k}"
                ack = dhcp.reply(dhcp.ACK, SERVER_MAC, SERVER, GUEST_MAC, address, dst_mac=GUEST_MAC)
                samples.append(monitor.time_until(address, lambda: send(GUEST, ack)))
                send(f"{GUEST}x", dhcp.client(dhcp.RELEASE, GUEST_MAC, address, ciaddr=address, dst_ip=SERVER,
                                              dst_mac=SERVER_MAC))
                deadline = time.monotonic() + 60
                while self.learned(GUEST):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{address} was never released")
                    time.sleep(0.05)
                time.sleep(0.3)  # the learner's own records settle; not timed
        self.cli("binding-delete", GUEST)
        self.results["ack-to-filter"] = summary("DHCP ACK sent -> the full filter with its address in the kernel",
                                                samples)

    def dad_to_filter(self, rounds: int) -> None:
        """IPv6: a new address's DAD probe -> the full filter with it (clean-traffic-dualstack)."""
        self.cli("binding-create", "-", stdin=binding_xml(GUEST, GUEST_MAC, {"IP": "10.6.0.5"},
                                                          "clean-traffic-dualstack"))
        self.wait_log(f"port {GUEST}: learning its IP address (any")
        samples = []
        with RuleMonitor() as monitor:
            for k in range(rounds):
                address = f"2001:db8::{k + 1:x}:5"
                probe = bytes(Ether(src=GUEST_MAC, dst="33:33:ff:00:00:05")
                              / IPv6(src="::", dst=solicited_node(address), hlim=255) / ICMPv6ND_NS(tgt=address))
                samples.append(monitor.time_until(address, lambda: send(f"{GUEST}x", probe)))
                time.sleep(0.3)  # not timed
        self.cli("binding-delete", GUEST)
        self.results["dad-to-filter"] = summary("IPv6 DAD probe sent -> the full filter with its address", samples)

    def idle(self) -> None:
        names = [f"li{k}" for k in range(IDLE_GUESTS)]
        self.ports(names)
        for k, name in enumerate(names):
            self.cli("binding-create", "-", stdin=binding_xml(name, f"52:54:00:07:{k >> 8:02x}:{k & 255:02x}", {}))
        self.wait_log(": learning its IP address (any", count=IDLE_GUESTS)
        time.sleep(2)
        before, began = self.service_cpu(), time.monotonic()
        time.sleep(IDLE_SECONDS)
        used, took = self.service_cpu() - before, time.monotonic() - began
        print(f"{f'service CPU, {IDLE_GUESTS} guests learning and idle ({took:.0f} s)':<72} {100 * used / took:9.2f} %",
              flush=True)
        self.results["idle-cpu"] = {"label": f"service CPU while {IDLE_GUESTS} guests learn, idle", "unit": "%",
                                    "median": 100 * used / took, "seconds": took}
        for name in names:
            self.cli("binding-delete", name)

    def list_times(self, reps: int) -> list[float]:
        samples = []
        for _ in range(reps):
            began = time.perf_counter()
            self.cli("binding-list")
            samples.append(time.perf_counter() - began)
        return samples

    def flood(self) -> None:
        self.cli("binding-create", "-", stdin=binding_xml(GUEST, GUEST_MAC, {"CTRL_IP_LEARNING": "dhcp"}))
        self.wait_log(f"port {GUEST}: learning its IP address (dhcp", count=2)
        quiet = self.list_times(9)
        frame = dhcp.client(dhcp.DISCOVER, GUEST_MAC)
        frame += bytes(max(0, 60 - len(frame)))
        count = int(FLOOD_RATE * FLOOD_SECONDS)
        code = ("import socket, sys, time\n"
                "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind((sys.argv[1], 0))\n"
                "f = bytes.fromhex(sys.argv[2]); n = int(sys.argv[3]); rate = float(sys.argv[4])\n"
                "t0 = time.perf_counter()\n"
                "for i in range(n):\n"
                "    s.send(f)\n"
                "    if i % 100 == 99:\n"
                "        pause = t0 + (i + 1) / rate - time.perf_counter()\n"
                "        if pause > 0: time.sleep(pause)\n"
                "print(time.perf_counter() - t0)\n")
        before = self.service_cpu()
        sender = subprocess.Popen([PY, "-c", code, f"{GUEST}x", frame.hex(), str(count), str(FLOOD_RATE)],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        during = self.list_times(9)
        took = float(sender.communicate(timeout=FLOOD_SECONDS * 10)[0])
        used = self.service_cpu() - before
        print(f"(flood: {count} frames in {took:.1f} s, {count / took:.0f} a second)", flush=True)
        self.results["flood-per-frame"] = summary(f"service CPU per frame, {FLOOD_RATE} frames/s from one guest",
                                                  [used / count], unit="us", scale=1e6)
        self.results["list-quiet"] = summary("binding-list through the service, no flood", quiet)
        self.results["list-flood"] = summary("binding-list through the service, during the flood", during)
        if "could teach an address" not in self.log.read_text(errors="replace"):
            raise RuntimeError("the flood was not rate-limited (no warning in the service's log)")

    def main(self, rounds: int) -> dict:
        self.ports([GUEST])
        try:
            self.start_daemon()
            self.ack_to_filter(rounds)
            self.dad_to_filter(rounds)
            self.flood()
            self.idle()
        finally:
            self.stop_daemon()
            subprocess.run(["rm", "-rf", str(self.work)])
        return self.results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="output directory")
    parser.add_argument("--rounds", type=int, default=20, help="ACKs timed (default 20)")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        Path(args.inner).write_text(json.dumps(Inner().main(args.rounds)))
        return 0
    ns = f"nwf-bench-learn-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    inner_out = Path(tempfile.mkstemp(prefix="nwf-bench-learn-", suffix=".json")[1])
    try:
        subprocess.run(["ip", "netns", "exec", ns, PY, __file__, "--inner", str(inner_out), "--rounds",
                        str(args.rounds)], check=True)
        results = json.loads(inner_out.read_text())
    finally:
        subprocess.run(["ip", "netns", "delete", ns])
        inner_out.unlink(missing_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

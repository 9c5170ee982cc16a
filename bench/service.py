"""The resident service in the benchmark: ``libvirt-nwfilterd`` running inside the lab namespace,
the CPU time of its whole process tree (request processes, the watcher, every ``nft`` they run)
counted by a cpuacct cgroup of its own, and what is measured through it (nftables backend):

* hook ``start``/``stopped`` through the wrapper ``install-hook`` writes and ``binding-create``/
  ``binding-delete`` through the console script, fresh client processes, with 0 and N bindings
  present;
* hook ``reconnect`` of an intact one-interface guest with N present;
* ``nft flush ruleset`` with N present: from the flush until the repair's transaction is
  committed (the kernel's notification of it), then every dispatch entry is checked;
* ``reapply`` of N and ``define`` of a filter the N use, through the service.

A service run's CPU is the client's (``wait4``) plus what the service's tree used from the
client's start until the service is idle again (its healer included). Without a cgroup (no
cpuacct hierarchy) the service's share comes from ``/proc`` (10 ms ticks, reaped children only).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from .documents import (CUSTOM_FILTER, FILTER, GUEST, HOOK_PORT, MEAS_PORTS, custom_filter_xml, domain_xml,
                        meas_mac, meas_port)
from .measure import VENV_PY, BenchError, Run, _netns, base_env, fmt_time, spawn
from .ours import Ours

CGROUP_ROOT = Path("/sys/fs/cgroup/cpuacct")
SETTLE = 0.3  # seconds after a request for the service's own reactions (healer, warm-up) to be done
FLUSH_TIMEOUT = 120.0


class CpuGroup:
    """A cpuacct cgroup counting the CPU time of the processes put into it and their descendants."""

    def __init__(self) -> None:
        self.path: Path | None = CGROUP_ROOT / f"nwfilter-bench-{os.getpid()}"
        try:
            self.path.mkdir()
        except OSError:
            self.path = None

    def add(self, pid: int) -> bool:
        if self.path is None:
            return False
        try:
            (self.path / "cgroup.procs").write_text(f"{pid}\n")
            return True
        except OSError:
            return False

    def usage(self) -> float:
        assert self.path is not None
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        if self.path is not None:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    break
                except OSError:  # processes still leaving
                    time.sleep(0.1)
            self.path = None


class Daemon:
    """``libvirt-nwfilterd`` for one configuration of ours, inside its namespace (connected to
    the libvirtd there with ``libvirt``)."""

    def __init__(self, ours: Ours, log: Path, libvirt: bool = False):
        self.ours, self.log, self.libvirt = ours, log, libvirt
        self.proc: subprocess.Popen | None = None
        self.group = CpuGroup()
        self.counted = False

    def start(self) -> "Daemon":
        (self.ours.rundir / "kernel-intact.json").unlink(missing_ok=True)
        with open(self.log, "ab") as log, _netns().entered(self.ours.ns):
            self.proc = subprocess.Popen([VENV_PY, "-m", "libvirt_nwfilter.daemon",
                                          *(() if self.libvirt else ("--no-libvirt",))],
                                         env=self.ours.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        self.counted = self.group.add(self.proc.pid)
        deadline = time.monotonic() + 300
        while not self.answers() or not (self.ours.rundir / "kernel-intact.json").exists() or \
                (self.libvirt and "libvirt: connected" not in self.log.read_text(errors="replace")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"libvirt-nwfilterd did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self.ours.rundir / "libvirt-nwfilterd.sock"))
                return True
            except OSError:
                return False

    def cpu(self) -> float:
        """CPU seconds its tree used so far."""
        if self.counted:
            return self.group.usage()
        assert self.proc is not None
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            with contextlib.suppress(OSError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += sum(int(x) for x in fields[11:15]) / ticks
        return total

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=30)
            self.proc = None
        self.group.close()


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


class ServiceScenario:
    """The service's figures, with their own configuration in the lab (see the module docstring)."""

    def __init__(self, bench, size: int):
        self.bench, self.results, self.size = bench, bench.results, size
        self.ours = Ours(bench.lab.host_ns, bench.work, bench.shm, "nftables", "service")
        self.daemon: Daemon | None = None
        self.hook_wrapper: Path | None = None

    # -- running through the service ----------------------------------------------------------
    def timed(self, run: "callable") -> Run:
        """``run()`` (a client process), its CPU being the client's plus the service tree's."""
        assert self.daemon is not None
        before = self.daemon.cpu()
        result = run()
        time.sleep(SETTLE)
        result.cpu += self.daemon.cpu() - before
        return result

    def cli(self, *args: object, what: str) -> Run:
        return self.timed(lambda: self.ours.cli(*args).check(what))

    def hook(self, operation: str, stdin: bytes, what: str) -> Run:
        assert self.hook_wrapper is not None
        return self.timed(lambda: spawn([self.hook_wrapper, GUEST, operation, "begin", "-"], base_env(),
                                        self.ours.ns, stdin).check(what))

    # -- the scenario -------------------------------------------------------------------------
    def run(self) -> None:
        bench = self.bench
        self.ours.cli("status").check("status (warm-up, kernel probe)")
        hooks_dir = self.ours.files / "hooks"
        self.ours.cli("install-hook", "--no-service", "--hooks-dir", hooks_dir).check("install-hook")
        self.hook_wrapper = hooks_dir / "qemu.d" / "libvirt-nwfilter"
        for variant in (0, 1, 2):
            (self.ours.files / f"{CUSTOM_FILTER}-{variant}.xml").write_text(custom_filter_xml(variant))
        self.ours.cli("define", self.ours.files / f"{CUSTOM_FILTER}-0.xml").check("define (initial)")
        self.daemon = Daemon(self.ours, bench.work / "service.log").start()
        if not self.daemon.counted:
            self.results.notes.append("no cpuacct cgroup: the service's CPU comes from /proc (10 ms ticks)")
        try:
            bench.guarded("service at 0", None, lambda: self.per_request(0))
            m = self.results.new("populate", f"set-up: bulk bind of {self.size} to {CUSTOM_FILTER} (one batch, "
                                 "in-process, the service running)", "service", "nftables", self.size)
            m.add(self.ours.populate(0, self.size, CUSTOM_FILTER))
            self._wait_known(self.size)
            bench.guarded(f"service at {self.size}", None, lambda: self.per_request(self.size))
            bench.guarded("service reconnect", None, self.reconnect)
            bench.guarded("service flush", None, self.flush)
            bench.guarded("service bulk", None, self.bulk)
        finally:
            self.daemon.stop()
            self.daemon = None
            bench.flush_firewall()

    def _wait_known(self, ports: int, timeout: float = 120.0) -> None:
        """Until the service knows ``ports`` ports intact (it has read their records), then a
        moment for the request server to compile them (its idle work)."""
        import json

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError):
                if len(json.loads((self.ours.rundir / "kernel-intact.json").read_text())["ports"]) >= ports:
                    time.sleep(3.0)
                    return
            time.sleep(0.1)
        raise BenchError(f"the service did not account for {ports} ports within {timeout:.0f} s")

    def per_request(self, present: int) -> None:
        new = lambda key, label: self.results.new(key, label, "service", "nftables", present)  # noqa: E731
        start = new("hook-start", "hook start through the service (install-hook wrapper, 1 interface)")
        stop = new("hook-stopped", "hook stopped through the service (install-hook wrapper)")
        create = new("binding-create", "binding-create clean-traffic through the service (console script)")
        delete = new("binding-delete", "binding-delete through the service (console script)")
        files = [self.ours.binding_file(meas_port(k), meas_mac(k), f"10.2.0.{k + 1}") for k in range(MEAS_PORTS)]
        start_xml, stop_xml = domain_xml(HOOK_PORT), domain_xml(None)
        self.hook("start", start_xml, "hook start (warm-up)")
        self.hook("stopped", stop_xml, "hook stopped (warm-up)")

        def once(k: int) -> Run:
            run = self.hook("start", start_xml, "hook start")
            if not self.ours.state_has(HOOK_PORT):
                raise BenchError("hook start through the service exited 0 but the port has no binding")
            stop.add(self.hook("stopped", stop_xml, "hook stopped"))
            port = meas_port(k % MEAS_PORTS)
            create.add(self.cli("binding-create", files[k % MEAS_PORTS], what="binding-create"))
            if not self.ours.state_has(port):
                raise BenchError(f"binding-create through the service exited 0 but no state for {port}")
            delete.add(self.cli("binding-delete", port, what="binding-delete"))
            return run

        self.bench.repeat(start, self.bench.reps, once)
        self.bench.log(f"service @{present}: hook start {fmt_time(start.median)}, binding-create "
                       f"{fmt_time(create.median)} (CPU {fmt_time(min(create.cpu))}-)")

    def reconnect(self) -> None:
        m = self.results.new("hook-reconnect", "hook reconnect of an intact guest through the service", "service",
                             "nftables", self.size)
        xml = domain_xml(HOOK_PORT)
        self.hook("start", xml, "hook start")
        self.hook("reconnect", xml, "hook reconnect (warm-up)")
        self.bench.repeat(m, self.bench.reps, lambda k: self.hook("reconnect", xml, "hook reconnect"))
        self.hook("stopped", domain_xml(None), "hook stopped")
        self.bench.log(f"service @{self.size}: reconnect {fmt_time(m.median)}")

    def flush(self) -> None:
        """``nft flush ruleset``: until the repair's transaction is in the kernel."""
        from libvirt_nwfilter import executor

        m = self.results.new("flush-restored", "nft flush ruleset -> every port's rules back (one repair)", "service",
                             "nftables", self.size)
        from libvirt_nwfilter.daemon.healing import REPAIRS_IN_WINDOW

        expected = self._dispatched()
        # more repairs than that within a minute back off by design (a minute's pause): not measured
        for _ in range(min(self.bench.slow_reps, REPAIRS_IN_WINDOW)):
            time.sleep(1.0)  # the service is idle again
            with _netns().entered(self.ours.ns):
                notices = executor.nft_notifications()
            with notices:
                notices.settimeout(1.0)
                before = self.daemon.cpu()
                began = time.perf_counter()
                flushed = spawn(["nft", "flush", "ruleset"], base_env(), self.ours.ns).check("nft flush ruleset")
                wall = _repaired(notices, self.size, began)
            time.sleep(SETTLE)
            if self._dispatched() != expected:
                raise BenchError(f"after the repair {self._dispatched()} ports are dispatched, not {expected}")
            m.add(Run(["nft", "flush", "ruleset"], wall, 0, 0, flushed.cpu + self.daemon.cpu() - before, "", ""))
        self.bench.log(f"service @{self.size}: flush -> restored {fmt_time(m.median)}")

    def _dispatched(self) -> int:
        import json

        listing = spawn(["nft", "-j", "list", "ruleset", "bridge"], base_env(), self.ours.ns)
        if listing.rc != 0:
            return 0
        return sum(len(item["map"].get("elem", [])) for item in json.loads(listing.stdout)["nftables"]
                   if "map" in item and item["map"]["name"] == "l2_from_vm")

    def bulk(self) -> None:
        reapply = self.results.new("reapply", f"reapply of {self.size} bindings through the service", "service",
                                   "nftables", self.size)
        define = self.results.new("redefine", f"define: one rule changed in a filter {self.size} bindings use, "
                                  "through the service", "service", "nftables", self.size)
        self.cli("reapply", what="reapply (warm-up)")
        self.bench.repeat(reapply, self.bench.slow_reps, lambda k: self.cli("reapply", what="reapply"),
                          budget=self.bench.args.slow_budget)
        variants = [self.ours.files / f"{CUSTOM_FILTER}-{v}.xml" for v in (1, 2)]
        self.cli("define", variants[0], what="define (warm-up)")
        self.bench.repeat(define, self.bench.slow_reps,
                          lambda k: self.cli("define", variants[(k + 1) % 2], what="define"),
                          budget=self.bench.args.slow_budget)
        self.bench.log(f"service @{self.size}: reapply {fmt_time(reapply.median)}, define {fmt_time(define.median)}")


def _repaired(notices: socket.socket, ports: int, began: float) -> float:
    """Seconds from ``began`` until the transaction after the flush (the first one to touch our
    tables) that touched at least ``ports`` ports: the repair, whichever process committed it
    (so that any version of the service is measured alike)."""
    seen = []

    def after_flush(txn) -> bool:
        seen.append(txn)
        return len(seen) > 1 and len(txn.ports) >= ports

    return _committed(notices, after_flush) - began


def _committed(notices: socket.socket, wanted, timeout: float = FLUSH_TIMEOUT) -> float:
    """When (``time.perf_counter()``) a transaction touching our tables that is ``wanted`` was
    received."""
    from libvirt_nwfilter.backends.nftables.notices import Transactions

    grouping = Transactions()
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            data = notices.recv(1 << 20)
        except TimeoutError:
            continue
        for txn in grouping.feed(data):
            if txn.ours and wanted(txn):
                return time.perf_counter()
    raise BenchError(f"no such change of our tables within {timeout:.0f} s")


def hotplug(bench, libvirtd, reps: int) -> None:
    """The unfiltered window of a hot-plug, with a service connected to the private libvirtd: a
    guest whose metadata names the MACs of NICs attached one by one (``virsh attach-device``).
    Measured from the new tap appearing in the kernel (its RTM_NEWLINK) until the transaction
    holding its rules is committed (the nf_tables notification); also counted: how often the
    rules were in place before ``attach-device`` returned."""
    import libvirtd as lvd  # tests/libvirtd.py
    from .documents import NWF_NS

    ns = libvirtd.lab.host_ns
    ours = Ours(ns, bench.work, bench.shm, "nftables", "hotplug")
    daemon = Daemon(ours, bench.work / "service-hotplug.log", libvirt=True).start()
    name, base = "nwft-bench-hotplug", "52:54:00:05:00:01"
    macs = [f"52:54:00:05:01:{k:02x}" for k in range(reps)]
    entries = "".join(f"<nwf:interface mac='{mac}'><nwf:filterref filter='{FILTER}'><nwf:parameter name='IP' "
                      f"value='10.5.1.{k + 1}'/></nwf:filterref></nwf:interface>" for k, mac in enumerate(macs))
    m = bench.results.new("hotplug", "hot-plug: the new tap appeared -> its rules committed (unfiltered window)",
                          "service", "nftables", 0)
    try:
        libvirtd.define_guest(name, base, metadata=f"<nwf:nwfilter xmlns:nwf='{NWF_NS}'>{entries}</nwf:nwfilter>")
        lvd.virsh("start", name)
        before_return = 0
        for mac in macs:
            nic = (f"<interface type='bridge'><mac address='{mac}'/><source bridge='br0'/>"
                   "<model type='usb-net'/></interface>")
            window, after_return = _attach(ns, ["virsh", "-c", lvd.URI, "attach-device", name, "/dev/stdin", "--live"],
                                           nic.encode())
            before_return += after_return <= 0
            m.add(Run(["virsh", "attach-device"], window, 0, 0, 0.0, "", ""))
        m.note = f"rules in place before virsh attach-device returned in {before_return} of {len(macs)}"
        bench.log(f"hot-plug window: median {fmt_time(m.median)}, max {fmt_time(max(m.walls))}; {m.note}")
    finally:
        libvirtd.remove_guest(name)
        daemon.stop()


RTMGRP_LINK, RTM_NEWLINK, IFLA_IFNAME = 1, 16, 3
_NLMSG_HEAD, _IFINFOMSG_SIZE, _RTATTR = struct.Struct("=IH"), 16, struct.Struct("=HH")


def _attach(ns: str, argv: list[str], stdin: bytes, timeout: float = 60.0) -> tuple[float, float]:
    """Run ``argv`` (an attach in namespace ``ns``): seconds from the first new link appearing
    until a transaction touching it, and from the command's exit until that transaction."""
    from libvirt_nwfilter import executor
    from libvirt_nwfilter.backends.nftables.notices import Transactions

    with _netns().entered(ns):
        links = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        links.bind((0, RTMGRP_LINK))
        notices = executor.nft_notifications()
        existing = {link for _, link in socket.if_nameindex()}
    grouping, seen = Transactions(), []  # (time, ports) of every transaction of ours
    tap = appeared = returned = None
    with links, notices, tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as ferr:
        fin.write(stdin)
        fin.seek(0)
        proc = subprocess.Popen(argv, stdin=fin, stdout=subprocess.DEVNULL, stderr=ferr)
        exited = os.pidfd_open(proc.pid)
        selector = selectors.DefaultSelector()
        for source in (links, notices, exited):
            selector.register(source, selectors.EVENT_READ)
        deadline = time.perf_counter() + timeout
        try:
            while returned is None or tap is None or not any(tap in ports for _, ports in seen):
                if time.perf_counter() > deadline:
                    raise BenchError(f"{' '.join(argv[3:5])}: no new link with rules within {timeout:.0f} s")
                ready = {key.fileobj for key, _ in selector.select(timeout=1.0)}
                now = time.perf_counter()
                if links in ready:  # before the notices of the same round: the link came first
                    new = [link for link in _new_links(links.recv(1 << 16)) if link not in existing]
                    if new and tap is None:
                        tap, appeared = new[0], now
                if notices in ready:
                    seen += [(now, txn.ports) for txn in grouping.feed(notices.recv(1 << 20)) if txn.ports]
                if exited in ready:
                    returned = now
                    selector.unregister(exited)
                    if proc.wait() != 0:
                        ferr.seek(0)
                        raise BenchError(f"{' '.join(argv[3:5])} failed: {ferr.read().decode(errors='replace')}")
        finally:
            selector.close()
            os.close(exited)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    committed = next(when for when, ports in seen if tap in ports)
    return committed - appeared, committed - returned


def _new_links(data: bytes) -> list[str]:
    """The interface names of the RTM_NEWLINK messages in a datagram."""
    names, offset = [], 0
    while offset + _NLMSG_HEAD.size <= len(data):
        length, kind = _NLMSG_HEAD.unpack_from(data, offset)
        if length < 16:
            break
        attr = offset + 16 + _IFINFOMSG_SIZE
        while kind == RTM_NEWLINK and attr + _RTATTR.size <= offset + length:
            size, name = _RTATTR.unpack_from(data, attr)
            if size < _RTATTR.size:
                break
            if name == IFLA_IFNAME:
                names.append(data[attr + 4:attr + size].split(b"\0", 1)[0].decode(errors="replace"))
            attr += (size + 3) & ~3
        offset += (length + 3) & ~3
    return names

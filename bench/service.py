#!/usr/bin/env python3
"""Benchmark of the resident service libvirt-nwfilterd: ``.venv/bin/python bench/service.py``
(as root, after ``scripts/bootstrap``; ~5 minutes, ~8 with ``--libvirt``).

In a fresh network namespace (run directory on tmpfs), with ``libvirt-nwfilterd`` running
there (self-healing on) and, for comparison, without it (``LIBVIRT_NWFILTER_NO_SERVICE=1``):

* hook ``start`` (the wrapper's command: ``python -I -S -c ...``, one interface) and
  ``binding-create`` (the ``libvirt-nwfilter`` console script), fresh client processes, wall
  time, with 0 and 1000 bindings present;
* hook ``reconnect`` of an intact one-interface guest with 1000 bindings present;
* ``nft flush ruleset`` with 1000 bindings present: time from the flush until the last port's
  dispatch entry is back;
* ``reapply`` of 1000 bindings and ``define`` of a filter 1000 bindings use, through the service;
* with ``--libvirt``: libvirt's own engine per binding (``virsh nwfilter-binding-create`` against
  a private libvirtd, tests/libvirtd.py) and the hot-plug window: from ``virsh attach-device``
  returning until the new tap's rules are in place (negative: in place before it returned).

Every figure is the median (min-max) of fresh processes. Writes OUT/service.json and prints a
table with the issue's targets. The package's .pyc files are compiled first (the machine's
environment may set PYTHONDONTWRITEBYTECODE, which would otherwise make every start compile).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

PY = str(REPO / ".venv" / "bin" / "python")
CLI = str(REPO / ".venv" / "bin" / "libvirt-nwfilter")
NS_URI = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
GUEST_UUID = "6f0c4f5e-6b1e-4d8a-9c51-0b3c1ae0b0ff"
PRESENT = 1000
TARGETS = {"hook-start-0": 0.040, "reconnect": 0.030, "flush": 2.0, "reapply": 1.5, "define": 1.5}
HOOK_CODE = (f"import sys; sys.path.append({str(REPO)!r}); "
             "from libvirt_nwfilter.client import hook_main; sys.exit(hook_main())")

FILTER = """<filter name='bench-ct' chain='root'>
  <uuid>6f0c4f5e-6b1e-4d8a-9c51-0b3c1ae0b001</uuid>
  <filterref filter='clean-traffic'/>
  <rule action='drop' direction='out' priority='500'><udp dstportstart='{port}'/></rule>
</filter>
"""


def binding_xml(port: str, mac: str, ip: str, filter_name: str = "clean-traffic") -> str:
    return (f"<filterbinding><owner><name>bench</name><uuid>{uuidlib.uuid4()}</uuid></owner>"
            f"<portdev name='{port}'/><mac address='{mac}'/><filterref filter='{filter_name}'>"
            f"<parameter name='IP' value='{ip}'/></filterref></filterbinding>\n")


def domain_xml(port: str, mac: str, ip: str) -> str:
    return (f"<domain type='kvm'><name>bench-guest</name><uuid>{GUEST_UUID}</uuid><metadata>"
            f"<nwf:nwfilter xmlns:nwf='{NS_URI}'><nwf:interface mac='{mac}'><nwf:filterref filter='clean-traffic'>"
            f"<nwf:parameter name='IP' value='{ip}'/></nwf:filterref></nwf:interface></nwf:nwfilter></metadata>"
            f"<devices><interface type='bridge'><mac address='{mac}'/><target dev='{port}'/></interface>"
            "</devices></domain>\n")


class Inner:
    """Runs inside the namespace."""

    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="nwf-bench-", dir="/run"))
        self.conf, self.run = self.work / "conf", self.work / "run"
        self.conf.mkdir()
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LIBVIRT_NWFILTER_CONFDIR": str(self.conf),
                    "LIBVIRT_NWFILTER_RUNDIR": str(self.run), "LIBVIRT_NWFILTER_BACKEND": "nftables"}
        self.results: dict[str, dict] = {}
        self.daemon: subprocess.Popen | None = None

    # -- helpers ----------------------------------------------------------------------------
    def timed(self, argv: list[str], stdin: str = "", service: bool = True) -> float:
        env = dict(self.env, **({} if service else {"LIBVIRT_NWFILTER_NO_SERVICE": "1"}))
        began = time.perf_counter()
        done = subprocess.run(argv, input=stdin.encode(), capture_output=True, env=env, cwd=self.work)
        took = time.perf_counter() - began
        if done.returncode != 0:
            raise RuntimeError(f"{argv[-4:]} failed: {done.stderr.decode()}")
        return took

    def record(self, key: str, label: str, samples: list[float]) -> None:
        self.results[key] = {"label": label, "median": statistics.median(samples), "min": min(samples),
                             "max": max(samples), "n": len(samples)}
        print(f"{label:<68} {statistics.median(samples) * 1000:8.1f} ms  ({min(samples) * 1000:.1f}-"
              f"{max(samples) * 1000:.1f}, n={len(samples)})", flush=True)

    def ports(self, names: list[str]) -> None:
        lines = [f"link add {n} type veth peer name {n}x" for n in names]
        subprocess.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)

    def start_daemon(self) -> None:
        log = open(self.work / "service.log", "ab")
        self.daemon = subprocess.Popen([PY, "-m", "libvirt_nwfilter.daemon", "--no-libvirt"], env=self.env,
                                       stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        socket_path = self.run / "libvirt-nwfilterd.sock"
        for _ in range(600):
            if socket_path.exists():
                break
            time.sleep(0.05)
        time.sleep(0.5)

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(timeout=60)
            self.daemon = None

    def dispatch_count(self) -> int:
        done = subprocess.run(["nft", "-j", "list", "map", "bridge", "libvirt_nwfilter", "l2_from_vm"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return 0
        for item in json.loads(done.stdout)["nftables"]:
            if "map" in item:
                return len(item["map"].get("elem", []))
        return 0

    def wait_intact_knowledge(self, port: str | None = None) -> None:
        """Until the service has checked the rules since the last change (and knows ``port``)."""
        path = self.run / "kernel-intact.json"
        for _ in range(1200):
            try:
                if port is None or port in json.loads(path.read_text())["ports"]:
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)

    # -- scenarios --------------------------------------------------------------------------
    def per_request(self, present: int) -> None:
        reps = self.args.reps
        hook = [PY, "-I", "-S", "-c", HOOK_CODE]
        start = domain_xml("bh0", "52:54:00:03:00:01", "10.3.0.1")
        for service in (True, False):
            tag = "service" if service else "in-process"
            starts, creates = [], []
            for k in range(reps):
                starts.append(self.timed([*hook, "bench-guest", "start", "begin", "-"], start, service))
                self.timed([*hook, "bench-guest", "stopped", "end", "-"], start, service)
                port = f"bm{k}"
                creates.append(self.timed([CLI, "binding-create", "-"],
                                          binding_xml(port, f"52:54:00:02:00:{k:02x}", f"10.2.0.{k + 1}"), service))
                self.timed([CLI, "binding-delete", port], "", service)
            self.record(f"hook-start-{present}-{tag}", f"hook start, 1 interface ({tag}, {present} present)", starts)
            self.record(f"binding-create-{present}-{tag}", f"binding-create ({tag}, {present} present)", creates)

    def populate(self) -> None:
        subprocess.run([PY, "-c", "import sys; from libvirt_nwfilter import cli; sys.exit(cli.main(['define', '-']))"],
                       input=FILTER.format(port=7001), text=True, env=self.env, check=True)
        code = ("import sys; from libvirt_nwfilter.config import Config; from libvirt_nwfilter.service import Service\n"
                "from libvirt_nwfilter.model import Binding, FilterRef, make_params\n"
                f"n = {PRESENT}\n"
                "bs = [Binding('bench', '6f0c4f5e-6b1e-4d8a-9c51-0b3c1ae0b0aa', f'bp{i}', f'52:54:00:01:{i >> 8:02x}:{i & 255:02x}',"
                " FilterRef('bench-ct', make_params({'IP': [f'10.1.{i >> 8}.{i & 255}']}))) for i in range(n)]\n"
                "Service(Config.load()).bind_owner(bs)\n")
        began = time.perf_counter()
        subprocess.run([PY, "-c", code], env=self.env, check=True)
        print(f"(set-up: {PRESENT} bindings in one batch in {time.perf_counter() - began:.1f} s)", flush=True)

    def reconnect(self) -> None:
        hook = [PY, "-I", "-S", "-c", HOOK_CODE, "bench-guest"]
        xml = domain_xml("bh0", "52:54:00:03:00:01", "10.3.0.1")
        self.timed([*hook, "start", "begin", "-"], xml)
        for service in (True, False):
            samples = []
            for _ in range(self.args.reps if service else 3):
                self.wait_intact_knowledge("bh0")
                samples.append(self.timed([*hook, "reconnect", "begin", "-"], xml, service))
            tag = "service" if service else "in-process"
            self.record(f"reconnect-{tag}", f"hook reconnect of an intact guest ({tag}, {PRESENT} present)", samples)

    def flush(self) -> None:
        expected = self.dispatch_count()
        samples = []
        for _ in range(3):
            self.wait_intact_knowledge()
            began = time.perf_counter()
            subprocess.run(["nft", "flush", "ruleset"], check=True)
            while self.dispatch_count() < expected:
                if time.perf_counter() - began > 120:
                    raise RuntimeError("the rules were not restored within 120 s")
                time.sleep(0.01)
            samples.append(time.perf_counter() - began)
        self.record("flush", f"nft flush ruleset -> last of {expected} ports restored", samples)

    def bulk(self) -> None:
        reapply, define = [], []
        for k in range(3):
            reapply.append(self.timed([CLI, "reapply"]))
            (self.work / "f.xml").write_text(FILTER.format(port=7002 + k % 2))
            define.append(self.timed([CLI, "define", "f.xml"]))
        self.record("reapply", f"reapply of {PRESENT + 1} bindings (service)", reapply)
        self.record("define", f"define of a filter {PRESENT} bindings use (service)", define)

    def main(self) -> dict:
        self.ports(["bh0", *(f"bm{k}" for k in range(self.args.reps))] + [f"bp{i}" for i in range(PRESENT)])
        try:
            self.start_daemon()
            self.per_request(0)
            self.stop_daemon()
            self.populate()
            self.start_daemon()
            self.per_request(PRESENT)
            self.reconnect()
            self.flush()
            self.bulk()
        finally:
            self.stop_daemon()
            subprocess.run(["rm", "-rf", str(self.work)])
        return self.results


def libvirt_phase(reps: int) -> dict:
    """libvirt's engine per binding, and the hot-plug window, against a private libvirtd."""
    import libvirtd as lv

    results: dict[str, dict] = {}
    daemon = lv.start_libvirtd()
    work = Path(tempfile.mkdtemp(prefix="nwf-bench-lv-", dir="/run"))
    service = None
    try:
        ns = daemon.lab.host_ns
        lines = [f"link add lb{k} type veth peer name lb{k}x" for k in range(reps)]
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)
        samples = [daemon.create_binding(f"lb{k}", f"52:54:00:04:00:{k:02x}", "clean-traffic",
                                         {"IP": f"10.4.0.{k + 1}"}) for k in range(reps)]
        for k in range(reps):
            daemon.delete_binding(f"lb{k}")
        results["libvirt-binding-create"] = _summary("virsh nwfilter-binding-create clean-traffic (libvirt)", samples)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LIBVIRT_NWFILTER_CONFDIR": str(work / "conf"),
               "LIBVIRT_NWFILTER_RUNDIR": str(work / "run")}
        (work / "conf").mkdir()
        log = open(work / "service.log", "ab")
        service = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-m", "libvirt_nwfilter.daemon"], env=env,
                                   stdout=log, stderr=log)
        time.sleep(3)
        results["hotplug"] = _hotplug(daemon, ns, reps)
    finally:
        if service is not None:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)
        daemon.stop()
        subprocess.run(["rm", "-rf", str(work)])
    return results


def _hotplug(daemon, ns: str, reps: int) -> dict:
    import libvirtd as lv

    name, base = "nwft-bench-hotplug", "52:54:00:05:00:01"
    macs = [f"52:54:00:05:01:{k:02x}" for k in range(reps)]
    entries = "".join(f"<nwf:interface mac='{m}'><nwf:filterref filter='clean-traffic'><nwf:parameter name='IP' "
                      f"value='10.5.1.{k + 1}'/></nwf:filterref></nwf:interface>" for k, m in enumerate(macs))
    meta = f"<nwf:nwfilter xmlns:nwf='{NS_URI}'>{entries}</nwf:nwfilter>"
    daemon.define_guest(name, base, xml=daemon.guest_xml(name, base, metadata=meta))
    lv.virsh("start", name)
    samples = []
    for mac in macs:
        nic = (f"<interface type='bridge'><mac address='{mac}'/><source bridge='br0'/>"
               "<model type='usb-net'/></interface>")
        lv.virsh("attach-device", name, "/dev/stdin", "--live", input=nic)
        returned = time.perf_counter()
        tap = None
        while time.perf_counter() - returned < 30:
            xml = lv.virsh("dumpxml", name).stdout
            part = xml.split(f"<mac address='{mac}'/>", 1)
            if tap is None and len(part) == 2 and "<target dev='" in part[1]:
                tap = part[1].split("<target dev='", 1)[1].split("'", 1)[0]
            listing = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "map", "bridge", "libvirt_nwfilter",
                                      "l2_from_vm"], capture_output=True, text=True).stdout
            if tap and f'"{tap}"' in listing:
                break
            time.sleep(0.005)
        samples.append(time.perf_counter() - returned)
    daemon.remove_guest(name)
    return _summary("hot-plug: attach-device returned -> rules in place (polled, includes virsh dumpxml)", samples)


def _summary(label: str, samples: list[float]) -> dict:
    print(f"{label:<68} {statistics.median(samples) * 1000:8.1f} ms  ({min(samples) * 1000:.1f}-"
          f"{max(samples) * 1000:.1f}, n={len(samples)})", flush=True)
    return {"label": label, "median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples)}


def goals(results: dict) -> list[str]:
    lines = []

    def goal(ok: bool, text: str) -> None:
        lines.append(f"  {'MET   ' if ok else 'MISSED'} {text}")

    get = lambda key: results.get(key, {}).get("median")  # noqa: E731
    start0, start1000 = get("hook-start-0-service"), get(f"hook-start-{PRESENT}-service")
    create0, create1000 = get("binding-create-0-service"), get(f"binding-create-{PRESENT}-service")
    for what, zero, full in (("hook start", start0, start1000), ("binding-create", create0, create1000)):
        if zero is not None:
            goal(zero <= 0.040, f"{what} through the service, 0 present: <= 40 ms, measured {zero * 1000:.0f} ms")
        if zero and full is not None:
            goal(full <= 1.3 * zero, f"{what} through the service, {PRESENT} present: <= 1.3x the 0 figure, "
                 f"measured {full / zero:.2f}x ({full * 1000:.0f} ms)")
    engine = get("libvirt-binding-create")
    if engine and create0:
        goal(engine / create0 >= 25, f"per binding vs libvirt's engine: >= 25x faster, measured {engine / create0:.1f}x")
    for key, target, text in (("reconnect-service", 0.030, "hook reconnect of an intact guest"),
                              ("flush", 2.0, "nft flush ruleset -> last port restored"),
                              ("reapply", 1.5, f"reapply of {PRESENT}"), ("define", 1.5, f"define of a filter {PRESENT} use")):
        if get(key) is not None:
            goal(get(key) <= target, f"{text}: <= {target * 1000:.0f} ms, measured {get(key) * 1000:.0f} ms")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="output directory")
    parser.add_argument("--reps", type=int, default=9, help="fresh processes per figure (default 9)")
    parser.add_argument("--libvirt", action="store_true", help="also libvirt's engine and the hot-plug window")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        Path(args.inner).write_text(json.dumps(Inner(args).main()))
        return 0
    compileall.compile_dir(str(REPO / "libvirt_nwfilter"), quiet=1)
    ns = f"nwf-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    inner_out = Path(tempfile.mkstemp(prefix="nwf-bench-", suffix=".json")[1])
    try:
        subprocess.run(["ip", "netns", "exec", ns, PY, __file__, "--inner", str(inner_out), "--reps", str(args.reps)],
                       check=True)
        results = json.loads(inner_out.read_text())
    finally:
        subprocess.run(["ip", "netns", "delete", ns])
        inner_out.unlink(missing_ok=True)
    if args.libvirt:
        results.update(libvirt_phase(min(args.reps, 7)))
    text = "\n".join(["Goals (resident service, nftables):", *goals(results)])
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "service.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    table = "\n".join(f"{r['label']:<80} {r['median'] * 1000:9.1f} ms  ({r['min'] * 1000:.1f}-{r['max'] * 1000:.1f}, "
                      f"n={r['n']})" for r in results.values())
    (out / "service-table.txt").write_text(table + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

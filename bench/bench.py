#!/usr/bin/env python3
"""Benchmark of libvirt-nwfilter, with libvirt's own nwfilter engine as the reference.

Run it through ``bench/run`` (as root): that script bootstraps ``.venv`` and runs this file with
``.venv/bin/python``. What it does, in order (details and figures: bench/README.md):

1. baselines: the bare interpreter, and importing the CLI and the hook modules;
2. a lab namespace (tests/netlab.py: ``nwft-<random>`` with bridge ``br0``) holding one veth pair
   per binding (both ends in the namespace; the bridge end is the filtered port);
3. per backend (nftables, ebiptables), with 0, 100 and 1000 clean-traffic bindings present
   (pre-populated in one batch through ``Service.bind_owner`` inside the namespace): fresh-process
   ``libvirt-nwfilter binding-create`` (and ``binding-delete``) per binding, the qemu hook
   ``hooks/qemu GUEST start begin -`` / ``stopped end`` with a one-interface domain XML on stdin,
   the ``nft`` process alone (nftables), and at the largest count ``reapply`` and ``verify``;
4. per backend: a clean-traffic-like filter of our own used by 1000 bindings, redefined (one rule
   changed) with ``libvirt-nwfilter define``;
5. libvirt's engine (``virsh nwfilter-binding-create`` against a private libvirtd started in its
   own namespace by tests/libvirtd.py) on the same kernel in the same run, when libvirtd is
   installed: at 0 bindings present (and 100 with ``--full``).

Every figure is the median of several fresh processes, with min-max. Peak memory is
``ru_maxrss`` of the measured child as ``wait4`` reports it (the largest process of its tree:
Python or the firewall tool it ran). Processes run with a minimal environment like the one
libvirtd gives hooks (no ``PYTHON*`` variables) directly inside the namespace (``setns``; no
``ip netns exec`` in the timed path). The run directory is on tmpfs as ``/run`` is on Debian.

Writes OUT/results.json, OUT/per-binding.png and prints a table. ``--profile`` also writes
OUT/profile/ (``-X importtime``, cProfile summaries, strace phase timings, nft alone).
Namespaces and the libvirtd it started are always removed (finally blocks, SIGTERM/SIGHUP
handlers, and netlab's atexit net).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
CLI = REPO / ".venv" / "bin" / "libvirt-nwfilter"
HOOK = REPO / "hooks" / "qemu"
TESTS = REPO / "tests"

BACKENDS = ("nftables", "ebiptables")
FILTER = "clean-traffic"
CUSTOM_FILTER = "bench-clean-traffic"
CUSTOM_UUID = "6f0c4f5e-6b1e-4d8a-9c51-0b3c1ae0b001"
GUEST = "bench-guest"
GUEST_UUID = "6f0c4f5e-6b1e-4d8a-9c51-0b3c1ae0b0ff"
NWF_NS = "http://libvirt-nwfilter.org/xmlns/nwfilter/1.0"
MEAS_PORTS = 16  # fresh ports for the timed binding-creates (bm0..bm15)
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLONE_NEWNET = 0x40000000

# Goals of the issue (nftables backend).
GOAL_LIBVIRT_RATIO = 20.0
GOAL_SCALING = 1.5
GOAL_REAPPLY_S = 3.0
GOAL_REDEFINE_S = 3.0
GOAL_HOOK_START_S = 0.100


# ----------------------------------------------------------------------------------------------
# Names and documents


def prepop_port(i: int) -> str:
    return f"bp{i}"


def prepop_mac(i: int) -> str:
    return f"52:54:00:01:{i >> 8:02x}:{i & 0xFF:02x}"


def prepop_ip(i: int) -> str:
    return f"10.1.{i >> 8}.{(i & 0xFF)}"


def prepop_uuid(i: int) -> str:
    return str(uuidlib.UUID(int=(0x6F0C4F5E << 96) | (1 << 64) | i))


def meas_port(k: int) -> str:
    return f"bm{k}"


def meas_mac(k: int) -> str:
    return f"52:54:00:02:00:{k:02x}"


HOOK_PORT, HOOK_MAC, HOOK_IP = "bh0", "52:54:00:03:00:01", "10.3.0.1"


def binding_xml(port: str, mac: str, ip: str, filter_name: str = FILTER,
                owner: str = "bench-owner", owner_uuid: str | None = None) -> str:
    return (
        "<filterbinding>\n"
        "  <owner>\n"
        f"    <name>{owner}</name>\n"
        f"    <uuid>{owner_uuid or uuidlib.uuid4()}</uuid>\n"
        "  </owner>\n"
        f"  <portdev name='{port}'/>\n"
        f"  <mac address='{mac}'/>\n"
        f"  <filterref filter='{filter_name}'>\n"
        f"    <parameter name='IP' value='{ip}'/>\n"
        "  </filterref>\n"
        "</filterbinding>\n"
    )


def domain_xml(target: str | None) -> bytes:
    """A one-interface running guest as libvirt gives it to the qemu hook (``target`` None: the
    inactive form of ``stopped``/``release``, without the auto-generated tap name)."""
    target_el = f"      <target dev='{target}'/>\n" if target else ""
    return (
        "<domain type='kvm' id='7'>\n"
        f"  <name>{GUEST}</name>\n"
        f"  <uuid>{GUEST_UUID}</uuid>\n"
        "  <metadata>\n"
        f"    <nwf:nwfilter xmlns:nwf=\"{NWF_NS}\">\n"
        f"      <nwf:interface mac=\"{HOOK_MAC}\">\n"
        f"        <nwf:filterref filter=\"{FILTER}\">\n"
        f"          <nwf:parameter name=\"IP\" value=\"{HOOK_IP}\"/>\n"
        "        </nwf:filterref>\n"
        "      </nwf:interface>\n"
        "    </nwf:nwfilter>\n"
        "  </metadata>\n"
        "  <memory unit='KiB'>49152</memory>\n"
        "  <currentMemory unit='KiB'>49152</currentMemory>\n"
        "  <vcpu placement='static'>1</vcpu>\n"
        "  <os>\n"
        "    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>\n"
        "    <boot dev='hd'/>\n"
        "  </os>\n"
        "  <on_poweroff>destroy</on_poweroff>\n"
        "  <on_reboot>restart</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        "    <interface type='bridge'>\n"
        f"      <mac address='{HOOK_MAC}'/>\n"
        "      <source bridge='br0'/>\n"
        f"{target_el}"
        "      <model type='virtio'/>\n"
        "      <alias name='net0'/>\n"
        "      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>\n"
        "    </interface>\n"
        "    <memballoon model='none'/>\n"
        "  </devices>\n"
        "</domain>\n"
    ).encode()


def custom_filter_xml(variant: int) -> str:
    """clean-traffic under another name; variants differ in one rule (the ARP rule's comment),
    which changes the rules of every port that uses the filter."""
    comment = f" comment='bench variant {variant}'" if variant else ""
    return (
        f"<filter name='{CUSTOM_FILTER}' chain='root'>\n"
        f"  <uuid>{CUSTOM_UUID}</uuid>\n"
        "  <filterref filter='no-mac-spoofing'/>\n"
        "  <filterref filter='no-ip-spoofing'/>\n"
        "  <rule action='accept' direction='out' priority='-650'>\n"
        "    <mac protocolid='ipv4'/>\n"
        "  </rule>\n"
        "  <filterref filter='allow-incoming-ipv4'/>\n"
        "  <filterref filter='no-arp-spoofing'/>\n"
        "  <rule action='accept' direction='inout' priority='-500'>\n"
        f"    <mac protocolid='arp'{comment}/>\n"
        "  </rule>\n"
        "  <filterref filter='no-other-l2-traffic'/>\n"
        "  <filterref filter='qemu-announce-self'/>\n"
        "</filter>\n"
    )


# ----------------------------------------------------------------------------------------------
# Processes: spawned directly inside a namespace, timed, with their rusage


class Netns:
    """Enter a named network namespace around a spawn (the child inherits it), then come back."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._home: int | None = None

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")

    @contextlib.contextmanager
    def entered(self, name: str | None) -> Iterator[None]:
        if name is None:
            yield
            return
        if self._home is None:
            self._home = os.open("/proc/self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            self._setns(fd)
            try:
                yield
            finally:
                self._setns(self._home)
        finally:
            os.close(fd)


NETNS: Netns | None = None


@dataclass
class Run:
    argv: list[str]
    wall: float
    rc: int
    maxrss_kb: int
    cpu: float
    stdout: str
    stderr: str

    def check(self, what: str) -> "Run":
        if self.rc != 0:
            raise BenchError(f"{what} failed (exit {self.rc}): {' '.join(map(shlex.quote, self.argv))}\n"
                             f"stdout: {self.stdout.strip()[:2000]}\nstderr: {self.stderr.strip()[:2000]}")
        return self


class BenchError(RuntimeError):
    pass


def spawn(argv: Sequence[object], env: dict[str, str], ns: str | None = None, stdin: bytes = b"",
          timeout: float = 900.0) -> Run:
    """Run ``argv`` to completion in namespace ``ns``: wall time from spawn to exit, and the
    child's rusage from wait4 (maxrss of its tree's largest process, CPU of the whole tree)."""
    argv = [str(a) for a in argv]
    if not os.path.isabs(argv[0]):
        found = shutil.which(argv[0], path=env.get("PATH", BASE_PATH))
        if found is None:
            raise BenchError(f"{argv[0]} not found")
        argv[0] = found
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        fin.write(stdin)
        fin.flush()
        fin.seek(0)
        actions = [(os.POSIX_SPAWN_DUP2, fin.fileno(), 0), (os.POSIX_SPAWN_DUP2, fout.fileno(), 1),
                   (os.POSIX_SPAWN_DUP2, ferr.fileno(), 2)]
        assert NETNS is not None
        with NETNS.entered(ns):
            start = time.perf_counter()
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        reaped = False
        try:
            pidfd = os.pidfd_open(pid)
            try:
                ready, _, _ = select.select([pidfd], [], [], timeout)
                end = time.perf_counter()
            finally:
                os.close(pidfd)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.wait4(pid, 0)
                reaped = True
                raise BenchError(f"timed out after {timeout:.0f} s: {' '.join(argv)}")
            _, status, usage = os.wait4(pid, 0)
            reaped = True
        finally:
            if not reaped:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    os.wait4(pid, 0)
        fout.seek(0)
        ferr.seek(0)
        return Run(argv, end - start, os.waitstatus_to_exitcode(status), usage.ru_maxrss,
                   usage.ru_utime + usage.ru_stime, fout.read().decode(errors="replace"),
                   ferr.read().decode(errors="replace"))


def sh(argv: Sequence[object], check: bool = True, input: str | None = None,
       timeout: float = 300) -> subprocess.CompletedProcess:
    """Set-up commands (not timed)."""
    argv = [str(a) for a in argv]
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise BenchError(f"command failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr.strip()}")
    return proc


def base_env() -> dict[str, str]:
    """About what libvirtd gives a hook: LC_ALL=C, PATH, HOME; no PYTHON* variables."""
    return {"PATH": BASE_PATH, "HOME": "/root", "LC_ALL": "C", "USER": "root", "LOGNAME": "root"}


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class Measurement:
    key: str  # stable identifier, e.g. "binding-create"
    label: str  # what the table shows
    engine: str  # "ours", "libvirt", "tool", "python"
    backend: str | None = None
    present: int | None = None
    walls: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    note: str = ""
    error: str | None = None

    def add(self, run: Run, rss: bool = True) -> None:
        self.walls.append(run.wall)
        self.cpu.append(run.cpu)
        if rss:
            self.rss_kb.append(run.maxrss_kb)

    @property
    def median(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None

    def to_json(self) -> dict:
        data = {"key": self.key, "label": self.label, "engine": self.engine, "backend": self.backend,
                "present": self.present, "n": len(self.walls), "walls_s": [round(w, 6) for w in self.walls],
                "cpu_s": [round(c, 6) for c in self.cpu]}
        if self.walls:
            data.update(median_s=round(statistics.median(self.walls), 6), min_s=round(min(self.walls), 6),
                        max_s=round(max(self.walls), 6),
                        stdev_s=round(statistics.stdev(self.walls), 6) if len(self.walls) > 1 else 0.0,
                        cpu_median_s=round(statistics.median(self.cpu), 6) if self.cpu else None)
        if self.rss_kb:
            data.update(peak_rss_kb=max(self.rss_kb), median_rss_kb=int(statistics.median(self.rss_kb)))
        if self.note:
            data["note"] = self.note
        if self.error:
            data["error"] = self.error
        return data


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_rss(kb: int | None) -> str:
    return "-" if not kb else f"{kb / 1024:.1f} MiB"


# ----------------------------------------------------------------------------------------------
# The benchmark


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.reps: int = args.reps
        self.slow_reps: int = args.slow_reps
        self.sizes: tuple[int, ...] = (0, 100) if args.quick else (0, 100, 1000)
        self.max_present = max(self.sizes)
        self.measurements: list[Measurement] = []
        self.notes: list[str] = []
        self.info: dict = {}
        self.lab = None
        self.daemon = None
        self.work = Path(tempfile.mkdtemp(prefix="nwfilter-bench-"))
        shm = Path("/dev/shm") if self._is_tmpfs(Path("/dev/shm")) else Path("/run")
        self.shm = Path(tempfile.mkdtemp(prefix="nwfilter-bench-", dir=shm))
        self.profile_dir = self.out / "profile"
        self.started = time.time()
        self.t0 = time.monotonic()

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _is_tmpfs(path: Path) -> bool:
        proc = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)], capture_output=True, text=True)
        return proc.returncode == 0 and proc.stdout.split()[:1] == ["tmpfs"]  # (one line per stacked mount)

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.t0
        print(f"[{int(elapsed) // 60:2d}:{int(elapsed) % 60:02d}] {message}", flush=True)

    def new(self, key: str, label: str, engine: str, backend: str | None = None,
            present: int | None = None, note: str = "") -> Measurement:
        m = Measurement(key, label, engine, backend, present, note=note)
        self.measurements.append(m)
        return m

    def find(self, key: str, engine: str = "ours", backend: str | None = None,
             present: int | None = None) -> Measurement | None:
        for m in self.measurements:
            if (m.key == key and m.engine == engine and (backend is None or m.backend == backend)
                    and (present is None or m.present == present) and m.walls):
                return m
        return None

    def guarded(self, what: str, measurement: Measurement | None, func: Callable[[], None]) -> bool:
        """Run one measurement group; an error is recorded (and printed), the run goes on."""
        try:
            func()
            return True
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - recorded in the results
            text = f"{type(error).__name__}: {error}"
            self.log(f"ERROR in {what}: {text}")
            if self.args.debug:
                traceback.print_exc()
            if measurement is not None:
                measurement.error = text
            else:
                self.notes.append(f"{what}: {text}")
            return False

    def repeat(self, m: Measurement, reps: int, once: Callable[[int], Run | None], min_reps: int = 3,
               budget: float | None = None) -> None:
        """``reps`` timed runs (``once(i)`` returns the Run to record); when ``budget`` seconds
        are used up, stop after ``min_reps``."""
        began = time.monotonic()
        for i in range(reps):
            run = once(i)
            if run is not None:
                m.add(run, rss=m.engine != "libvirt")
            if budget is not None and i + 1 >= min_reps and time.monotonic() - began > budget:
                m.note = (m.note + "; " if m.note else "") + f"{i + 1} of {reps} runs (time budget)"
                break

    # -- machine -----------------------------------------------------------------------------
    def machine_info(self) -> dict:
        def first(cmd: list[str]) -> str:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
                return (proc.stdout or proc.stderr).strip().splitlines()[0]
            except (OSError, IndexError, subprocess.TimeoutExpired):
                return "not available"

        cpu = "unknown"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        mem_kb = 0
        with contextlib.suppress(OSError, ValueError, IndexError):
            mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        debian = "unknown"
        with contextlib.suppress(OSError):
            debian = Path("/etc/debian_version").read_text().strip()
        commit = first(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return {
            "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "debian": debian,
            "python": first([str(VENV_PY), "-c", "import sys; print(sys.version.split()[0])"]),
            "nft": first(["nft", "--version"]), "iptables": first(["iptables", "-V"]),
            "libvirt": first(["libvirtd", "--version"]) if shutil.which("libvirtd") else "not installed",
            "commit": commit + ("+local changes" if dirty else ""),
            "rundir_fs": "tmpfs" if self._is_tmpfs(self.shm) else "disk",
            "loadavg_start": os.getloadavg(),
        }

    # -- lab -----------------------------------------------------------------------------------
    def make_lab(self):
        import netlab

        self.log("creating the lab namespace and ports")
        self.lab = netlab.Lab()
        ns = self.lab.host_ns
        names = [prepop_port(i) for i in range(self.max_present)] + [meas_port(k) for k in range(MEAS_PORTS)]
        names.append(HOOK_PORT)
        self.add_ports(ns, names)
        self.log(f"lab {ns}: bridge br0 with {len(names)} veth ports")

    @staticmethod
    def add_ports(ns: str, names: Sequence[str]) -> None:
        lines = []
        for i, port in enumerate(names):
            peer = f"bq{i}x{port}"[:15]
            lines += [f"link add {port} type veth peer name {peer}", f"link set {port} master br0",
                      f"link set {port} up", f"link set {peer} up"]
        for start in range(0, len(lines), 2000):
            sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines[start:start + 2000]) + "\n")

    def flush_firewall(self) -> None:
        sh(["ip", "netns", "exec", self.lab.host_ns, "nft", "flush", "ruleset"])

    # -- running -----------------------------------------------------------------------------
    def run(self) -> None:
        self.info = self.machine_info()
        self.log(f"machine: {self.info['cpu']}, {self.info['cores']} cores, kernel {self.info['kernel']}, "
                 f"load {self.info['loadavg_start'][0]:.2f}")
        if self.args.profile:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
        self.guarded("baselines", None, self.baselines)
        self.make_lab()
        for backend in self.args.backends:
            self.guarded(f"{backend} scenario", None, lambda b=backend: self.scenario(b))
            self.guarded(f"{backend} redefinition", None, lambda b=backend: self.redefine_scenario(b))
        self.log("deleting the lab")
        self.lab.close()
        self.lab = None
        if self.args.no_libvirt:
            self.notes.append("libvirt's engine not measured (--no-libvirt)")
        elif not (shutil.which("libvirtd") and shutil.which("virsh")):
            self.notes.append("libvirt's engine not measured: libvirtd/virsh not installed")
        else:
            self.guarded("libvirt", None, self.libvirt_phase)
        self.info["loadavg_end"] = os.getloadavg()

    # -- baselines ------------------------------------------------------------------------------
    def baselines(self) -> None:
        env = base_env()
        for key, label, argv in (
                ("python-bare", "interpreter start-up (python -c pass)", [VENV_PY, "-c", "pass"]),
                ("python-bare-S", "interpreter start-up without site (python -S -c pass)", [VENV_PY, "-S", "-c", "pass"]),
                ("import-cli", "python -c 'import libvirt_nwfilter.cli'", [VENV_PY, "-c", "import libvirt_nwfilter.cli"]),
                ("import-hook", "python -c 'import libvirt_nwfilter.hook'", [VENV_PY, "-c", "import libvirt_nwfilter.hook"]),
                ("import-service", "python -c 'import libvirt_nwfilter.service'",
                 [VENV_PY, "-c", "import libvirt_nwfilter.service, libvirt_nwfilter.backends.nftables"]),
                ("cli-help", "libvirt-nwfilter --help (argparse, all verbs)", [CLI, "--help"])):
            m = self.new(key, label, "python")
            spawn(argv, env).check(label)  # warm-up: writes the .pyc files
            self.repeat(m, self.reps, lambda i, a=argv: spawn(a, env).check(key))
        self.log("baselines: " + ", ".join(f"{m.key} {fmt_time(m.median)}" for m in self.measurements))

    # -- our engine ------------------------------------------------------------------------------
    class Ours:
        """One configuration (conf dir, run dir on tmpfs, backend) of our CLI in the lab."""

        def __init__(self, bench: "Bench", backend: str, tag: str):
            self.bench, self.backend = bench, backend
            self.ns = bench.lab.host_ns
            self.conf = bench.work / f"{backend}-{tag}-conf"
            self.rundir = bench.shm / f"{backend}-{tag}-run"
            self.files = bench.work / f"{backend}-{tag}-files"
            for d in (self.conf, self.files):
                d.mkdir(parents=True, exist_ok=True)
            self.env = {**base_env(), "LIBVIRT_NWFILTER_CONFDIR": str(self.conf),
                        "LIBVIRT_NWFILTER_RUNDIR": str(self.rundir), "LIBVIRT_NWFILTER_BACKEND": backend}

        def cli(self, *args: object, stdin: bytes = b"", prefix: Sequence[object] = (), timeout: float = 900) -> Run:
            argv = [*prefix, CLI, *args] if prefix else [CLI, *args]
            return spawn(argv, self.env, self.ns, stdin, timeout)

        def py(self, *args: object, stdin: bytes = b"", timeout: float = 900) -> Run:
            return spawn([VENV_PY, *args], self.env, self.ns, stdin, timeout)

        def hook(self, operation: str, subop: str, stdin: bytes) -> Run:
            return spawn([VENV_PY, HOOK, GUEST, operation, subop, "-"], self.env, self.ns, stdin)

        def binding_file(self, port: str, mac: str, ip: str, filter_name: str = FILTER) -> Path:
            path = self.files / f"binding-{port}-{filter_name}.xml"
            if not path.exists():
                path.write_text(binding_xml(port, mac, ip, filter_name))
            return path

        def state_has(self, port: str) -> bool | None:
            """Whether our state records a binding on ``port`` (None: layout unknown)."""
            bindings = self.rundir / "bindings"
            if not bindings.is_dir():
                return None
            return any(bindings.glob(f"{port}.*"))

        def populate(self, start: int, end: int, filter_name: str) -> Run:
            return self.py(Path(__file__), "_populate", self.conf, self.rundir, self.backend, start, end,
                           filter_name, timeout=1800).check(f"populate {start}..{end}")

    def scenario(self, backend: str) -> None:
        self.log(f"== {backend}: clean-traffic bindings")
        self.flush_firewall()
        ours = self.Ours(self, backend, "main")
        ours.cli("status").check("status (warm-up, kernel probe)")
        present = 0
        for size in self.sizes:
            if size > present:
                m = self.new("populate", f"set-up: bulk bind of {size - present} more (bind_owner, one batch)",
                             "ours", backend, size)
                run = ours.populate(present, size, FILTER)
                m.add(run)
                present = size
                self.log(f"{backend}: {present} bindings present (bulk bind {fmt_time(run.wall)})")
            self.guarded(f"{backend} binding-create at {size}", None, lambda: self.measure_create(ours, size))
            self.guarded(f"{backend} hook at {size}", None, lambda: self.measure_hook(ours, size))
            if backend == "nftables":
                self.guarded(f"nft alone at {size}", None, lambda: self.measure_nft_alone(ours, size))
            if self.args.profile and backend == "nftables" and size in (0, self.max_present):
                self.guarded(f"profile at {size}", None, lambda: self.profile_state(ours, size))
        size = self.max_present
        m = self.new("reapply", f"reapply of {size} bindings (fresh process)", "ours", backend, size)
        ours.cli("reapply").check("reapply (warm-up)")
        self.guarded(f"{backend} reapply", m, lambda: self.repeat(
            m, self.slow_reps, lambda i: ours.cli("reapply").check("reapply"), budget=self.args.slow_budget))
        self.log(f"{backend}: reapply of {size}: {fmt_time(m.median)}, peak {fmt_rss(max(m.rss_kb, default=0))}")
        m = self.new("verify", f"verify of {size} bindings (fresh process)", "ours", backend, size)
        self.guarded(f"{backend} verify", m, lambda: self.repeat(
            m, self.slow_reps, lambda i: ours.cli("verify").check("verify"), budget=self.args.slow_budget))
        self.log(f"{backend}: verify of {size}: {fmt_time(m.median)}")
        if self.args.profile and backend == "nftables":
            self.guarded("profile reapply", None, lambda: self.profile_cli(ours, f"reapply-{size}",
                                                                           lambda i: ["reapply"]))
        self.flush_firewall()

    def measure_create(self, ours: "Bench.Ours", present: int) -> None:
        files = [ours.binding_file(meas_port(k), meas_mac(k), f"10.2.0.{k + 1}") for k in range(MEAS_PORTS)]
        # warm-up (not timed): first run after a change of the code writes .pyc files
        ours.cli("binding-create", files[0]).check("binding-create (warm-up)")
        ours.cli("binding-delete", meas_port(0)).check("binding-delete (warm-up)")
        create = self.new("binding-create", "binding-create clean-traffic (fresh process)", "ours",
                          ours.backend, present)
        delete = self.new("binding-delete", "binding-delete (fresh process)", "ours", ours.backend, present)

        def once(k: int) -> Run:
            port = meas_port(k % MEAS_PORTS)
            run = ours.cli("binding-create", files[k % MEAS_PORTS]).check("binding-create")
            if ours.state_has(port) is False:
                raise BenchError(f"binding-create exited 0 but no state for {port}")
            delete.add(ours.cli("binding-delete", port).check("binding-delete"))
            return run

        self.repeat(create, self.reps, once)
        self.log(f"{ours.backend} @{present}: binding-create {fmt_time(create.median)} "
                 f"[{fmt_time(min(create.walls))}-{fmt_time(max(create.walls))}], "
                 f"delete {fmt_time(delete.median)}")

    def measure_hook(self, ours: "Bench.Ours", present: int) -> None:
        start_xml, stop_xml = domain_xml(HOOK_PORT), domain_xml(None)
        ours.hook("start", "begin", start_xml).check("hook start (warm-up)")
        ours.hook("stopped", "end", stop_xml).check("hook stopped (warm-up)")
        start = self.new("hook-start", "hook: qemu GUEST start begin - (1 interface)", "ours", ours.backend, present)
        stop = self.new("hook-stopped", "hook: qemu GUEST stopped end -", "ours", ours.backend, present)

        def once(k: int) -> Run:
            run = ours.hook("start", "begin", start_xml).check("hook start")
            if ours.state_has(HOOK_PORT) is False:
                raise BenchError("hook start exited 0 but the port has no binding")
            run2 = ours.hook("stopped", "end", stop_xml).check("hook stopped")
            if ours.state_has(HOOK_PORT):
                raise BenchError("hook stopped exited 0 but the binding is still there")
            stop.add(run2)
            return run

        self.repeat(start, self.reps, once)
        self.log(f"{ours.backend} @{present}: hook start {fmt_time(start.median)}, "
                 f"stopped {fmt_time(stop.median)}, peak {fmt_rss(max(start.rss_kb + stop.rss_kb))}")
        if ours.backend == "nftables" and present in (0, self.max_present):
            self.guarded("hook via installed wrapper", None, lambda: self.measure_wrapper(ours, present))

    def measure_wrapper(self, ours: "Bench.Ours", present: int) -> None:
        """The hook as libvirtd runs it once installed: /bin/sh wrapper, then python -I -m."""
        hooks_dir = ours.files / "hooks"
        ours.cli("install-hook", "--hooks-dir", hooks_dir).check("install-hook")
        wrappers = [p for p in (hooks_dir / "qemu.d").glob("*") if os.access(p, os.X_OK)]
        if not wrappers:
            raise BenchError("install-hook wrote no executable wrapper")
        wrapper = wrappers[0]
        env = base_env()  # the wrapper carries the configuration
        start_xml, stop_xml = domain_xml(HOOK_PORT), domain_xml(None)
        m = self.new("hook-start-wrapper", "hook start via the install-hook wrapper (sh, python -I -m)",
                     "ours", ours.backend, present)

        def once(k: int) -> Run:
            run = spawn([wrapper, GUEST, "start", "begin", "-"], env, ours.ns, start_xml).check("wrapper start")
            spawn([wrapper, GUEST, "stopped", "end", "-"], env, ours.ns, stop_xml).check("wrapper stopped")
            return run

        self.repeat(m, self.reps, once)

    def measure_nft_alone(self, ours: "Bench.Ours", present: int) -> None:
        """The nft process by itself, for one binding's batch (check mode: nothing is changed),
        with and without echo, and the full listing reapply/verify read."""
        rendered = ours.cli("render", ours.binding_file(meas_port(0), meas_mac(0), "10.2.0.1")).check("render")
        lines = rendered.stdout.splitlines(keepends=True)
        if not lines or not lines[0].startswith("# "):
            raise BenchError("unexpected render output")
        argv = shlex.split(lines[0][2:])
        batch = ours.files / "batch.nft"
        batch.write_text("".join(line for line in lines[1:] if not line.startswith("# /")))
        nft = argv[0]
        variants = [("nft-check", "nft -c -f (one binding's batch, no echo)", [nft, "-c", "-f", batch])]
        if "-e" in argv or "--echo" in argv:
            variants.append(("nft-check-echo", "nft -c -e -f (the same with echo, as the backend runs it)",
                             [nft, "-c", "-e", "-f", batch]))
        variants.append(("nft-list", "nft list ruleset (what reapply/verify read)", [nft, "list", "ruleset"]))
        for key, label, cmd in variants:
            m = self.new(key, label, "tool", "nftables", present)
            spawn(cmd, base_env(), ours.ns).check(label)
            self.repeat(m, self.reps, lambda i, c=cmd, lb=label: spawn(c, base_env(), ours.ns).check(lb))
        self.log(f"nft alone @{present}: " + ", ".join(
            f"{key} {fmt_time(self.find(key, 'tool', 'nftables', present).median)}" for key, _, _ in variants))

    # -- redefinition of a filter used by many bindings -----------------------------------------
    def redefine_scenario(self, backend: str) -> None:
        size = self.max_present
        self.log(f"== {backend}: redefinition of a filter used by {size} bindings")
        self.flush_firewall()
        ours = self.Ours(self, backend, "redefine")
        ours.cli("status").check("status (warm-up)")
        variants = []
        for v in (0, 1, 2):
            path = ours.files / f"{CUSTOM_FILTER}-{v}.xml"
            path.write_text(custom_filter_xml(v))
            variants.append(path)
        ours.cli("define", variants[0]).check("define (initial)")
        m = self.new("populate", f"set-up: bulk bind of {size} to {CUSTOM_FILTER} (one batch)", "ours", backend, size,
                     note="redefinition set-up")
        m.add(ours.populate(0, size, CUSTOM_FILTER))
        m = self.new("redefine", f"define: one rule changed in a filter used by {size} bindings", "ours",
                     backend, size)
        ours.cli("define", variants[1]).check("define (warm-up)")

        def once(i: int) -> Run:
            # alternate between two variants that differ from the definition in place
            return ours.cli("define", variants[2 if i % 2 == 0 else 1]).check("define")

        self.guarded(f"{backend} redefine", m, lambda: self.repeat(m, self.slow_reps, once,
                                                                    budget=self.args.slow_budget))
        self.log(f"{backend}: redefinition with {size} users: {fmt_time(m.median)}, "
                 f"peak {fmt_rss(max(m.rss_kb, default=0))}")
        if self.args.profile and backend == "nftables":
            # continue the alternation so that every profiled define changes the filter
            done = len(m.walls) + 1  # the warm-up defined variant 1, then the timed runs alternated
            self.guarded("profile define", None, lambda: self.profile_cli(
                ours, f"define-{size}", lambda i: ["define", variants[1 + (done + i) % 2]]))
        self.flush_firewall()

    # -- libvirt's engine --------------------------------------------------------------------------
    def libvirt_phase(self) -> None:
        sys.path.insert(0, str(TESTS))
        import libvirtd as lvd  # tests/libvirtd.py: private libvirtd in a lab namespace

        lvd.LOCK_WAIT = float(self.args.libvirt_lock_wait)
        self.log("== libvirt's engine: starting a private libvirtd (tests/libvirtd.py)")
        if lock_busy(lvd.LOCK_FILE):
            self.log(f"waiting for {lvd.LOCK_FILE} (a test run is using libvirtd), up to {lvd.LOCK_WAIT:.0f} s")
        began = time.monotonic()
        self.daemon = lvd.start_libvirtd()
        if time.monotonic() - began > 30:
            self.notes.append(f"waited {time.monotonic() - began:.0f} s for the test-libvirtd lock")
        ns = self.daemon.lab.host_ns
        sizes = (0, 100) if self.args.full else (0,)
        extra = max(sizes)
        ports = [f"lv{k}" for k in range(self.args.libvirt_reps)]
        fill = [f"lq{i}" for i in range(extra)]
        self.add_ports(ns, ports + fill)
        self.log(f"libvirtd pid {self.daemon.pid} in {ns}; {len(ports) + len(fill)} ports")
        files = self.work / "libvirt"
        files.mkdir(exist_ok=True)
        env = base_env()
        virsh = [shutil.which("virsh"), "-c", "qemu:///system"]

        def xml_file(port: str, i: int, base: int) -> Path:
            path = files / f"{port}.xml"
            path.write_text(binding_xml(port, f"52:54:00:{base:02x}:{i >> 8:02x}:{i & 0xFF:02x}",
                                        f"10.{base}.{i >> 8}.{i & 0xFF}", owner="bench-libvirt"))
            return path

        spawn([*virsh, "version"], env).check("virsh version")
        present = 0
        for size in sizes:
            if size > present:
                m = self.new("populate", f"set-up: virsh nwfilter-binding-create, {present} to {size} present",
                             "libvirt", None, size)
                began = time.monotonic()
                for i in range(present, size):
                    m.add(spawn([*virsh, "nwfilter-binding-create", xml_file(fill[i], i, 5)], env)
                          .check("virsh nwfilter-binding-create"), rss=False)
                present = size
                self.log(f"libvirt: {size} bindings present ({time.monotonic() - began:.0f} s)")
            create = self.new("binding-create", "virsh nwfilter-binding-create clean-traffic", "libvirt",
                              None, size)
            delete = self.new("binding-delete", "virsh nwfilter-binding-delete", "libvirt", None, size)

            def once(k: int) -> Run:
                run = spawn([*virsh, "nwfilter-binding-create", xml_file(ports[k], k, 4)], env) \
                    .check("virsh nwfilter-binding-create")
                delete.add(spawn([*virsh, "nwfilter-binding-delete", ports[k]], env)
                           .check("virsh nwfilter-binding-delete"), rss=False)
                return run

            self.repeat(create, self.args.libvirt_reps, once)
            self.log(f"libvirt @{size}: binding-create {fmt_time(create.median)} "
                     f"[{fmt_time(min(create.walls))}-{fmt_time(max(create.walls))}]")
        if not self.args.full:
            self.notes.append("libvirt's engine measured at 0 bindings present only (100 present: --full, "
                              "about 2 more minutes)")
        self.stop_libvirtd()

    def stop_libvirtd(self) -> None:
        if self.daemon is not None:
            daemon, self.daemon = self.daemon, None
            self.log(f"stopping libvirtd (pid {daemon.pid}) and deleting its namespace")
            daemon.stop()

    # -- profiling -----------------------------------------------------------------------------
    def profile_state(self, ours: "Bench.Ours", present: int) -> None:
        out = self.profile_dir
        file = ours.binding_file(meas_port(1), meas_mac(1), "10.2.0.2")
        if present == 0:
            run = ours.py("-X", "importtime", "-m", "libvirt_nwfilter", "binding-create", file).check("importtime")
            ours.cli("binding-delete", meas_port(1)).check("binding-delete")
            (out / "importtime-binding-create.txt").write_text(run.stderr)
            (out / "importtime-binding-create-top.txt").write_text(importtime_summary(run.stderr))
            run = ours.py("-X", "importtime", HOOK, GUEST, "start", "begin", "-",
                          stdin=domain_xml(HOOK_PORT)).check("importtime hook")
            ours.hook("stopped", "end", domain_xml(None)).check("hook stopped")
            (out / "importtime-hook-start.txt").write_text(run.stderr)
            (out / "importtime-hook-start-top.txt").write_text(importtime_summary(run.stderr))
        self.profile_cli(ours, f"binding-create-{present}", lambda i: ["binding-create", file],
                         after=lambda: ours.cli("binding-delete", meas_port(1)).check("binding-delete"))
        start_argv = [HOOK, GUEST, "start", "begin", "-"]
        stop_argv = [HOOK, GUEST, "stopped", "end", "-"]
        start_xml, stop_xml = domain_xml(HOOK_PORT), domain_xml(None)
        prof = out / f"hook-start-{present}.prof"
        ours.py("-m", "cProfile", "-o", prof, *start_argv, stdin=start_xml).check("cProfile hook start")
        (out / f"hook-start-{present}.txt").write_text(pstats_summary(prof))
        ours.hook("stopped", "end", stop_xml).check("hook stopped")
        strace_phases(self, ours, f"hook-start-{present}", [VENV_PY, *start_argv], start_xml)
        prof = out / f"hook-stopped-{present}.prof"
        ours.py("-m", "cProfile", "-o", prof, *stop_argv, stdin=stop_xml).check("cProfile hook stopped")
        (out / f"hook-stopped-{present}.txt").write_text(pstats_summary(prof))
        ours.hook("start", "begin", start_xml).check("hook start")
        strace_phases(self, ours, f"hook-stopped-{present}", [VENV_PY, *stop_argv], stop_xml)
        self.log(f"profile @{present}: written to {out}")

    def profile_cli(self, ours: "Bench.Ours", name: str, make_args: Callable[[int], list],
                    after: Callable[[], object] | None = None) -> None:
        """cProfile, strace phases and strace -c of one CLI call; ``make_args(i)`` gives the
        arguments of the i-th of the three runs, ``after`` undoes a run."""
        out = self.profile_dir
        prof = out / f"{name}.prof"
        ours.py("-m", "cProfile", "-o", prof, "-m", "libvirt_nwfilter", *make_args(0)).check(f"cProfile {name}")
        if after:
            after()
        (out / f"{name}.txt").write_text(pstats_summary(prof))
        strace_phases(self, ours, name, [CLI, *make_args(1)], b"")
        if after:
            after()
        if shutil.which("strace"):
            spawn(["strace", "-f", "-c", "-o", out / f"{name}-syscalls.txt", CLI, *make_args(2)], ours.env,
                  ours.ns).check(f"strace -c {name}")
            if after:
                after()

    # -- goals, table, plot, json ----------------------------------------------------------------
    def goals(self) -> list[dict]:
        goals = []
        nft = "nftables"

        def goal(name: str, target: str, measured: str | None, met: bool | None, detail: str = "") -> None:
            goals.append({"goal": name, "target": target, "measured": measured or "not measured",
                          "met": met, "detail": detail})

        for size in (0, 100):
            lv, ours = self.find("binding-create", "libvirt", None, size), self.find("binding-create", "ours", nft, size)
            if size == 0 or lv:
                ratio = lv.median / ours.median if lv and ours else None
                goal(f"per binding vs libvirt's engine ({size} present)", f">= {GOAL_LIBVIRT_RATIO:.0f}x faster",
                     f"{ratio:.1f}x ({fmt_time(lv.median)} / {fmt_time(ours.median)})" if ratio else None,
                     ratio >= GOAL_LIBVIRT_RATIO if ratio else None)
        base, top = self.find("binding-create", "ours", nft, 0), self.find("binding-create", "ours", nft, 1000)
        ratio = top.median / base.median if base and top else None
        goal("per binding with 1000 present vs none", f"<= {GOAL_SCALING}x",
             f"{ratio:.2f}x ({fmt_time(top.median)} / {fmt_time(base.median)})" if ratio else None,
             ratio <= GOAL_SCALING if ratio else None)
        m = self.find("reapply", "ours", nft, 1000)
        goal("reapply of 1000", f"<= {GOAL_REAPPLY_S:.0f} s", fmt_time(m.median) if m else None,
             m.median <= GOAL_REAPPLY_S if m else None)
        m = self.find("redefine", "ours", nft, 1000)
        goal("update of a filter used by 1000", f"<= {GOAL_REDEFINE_S:.0f} s", fmt_time(m.median) if m else None,
             m.median <= GOAL_REDEFINE_S if m else None)
        for size in sorted({0, self.max_present}):
            m = self.find("hook-start", "ours", nft, size)
            goal(f"hook start, wall ({size} present)", f"<= {GOAL_HOOK_START_S * 1000:.0f} ms",
                 fmt_time(m.median) if m else None, m.median <= GOAL_HOOK_START_S if m else None)
        return goals

    def ratio_text(self, m: Measurement) -> str:
        if not m.walls:
            return ""
        parts = []
        if m.key == "binding-create" and m.engine == "ours":
            lv = self.find("binding-create", "libvirt", None, m.present) or self.find("binding-create", "libvirt", None, 0)
            if lv:
                parts.append(f"libvirt/this {lv.median / m.median:.1f}x"
                             + ("" if lv.present == m.present else f" (libvirt @{lv.present})"))
        if m.engine in ("ours", "tool") and m.present and m.key not in ("populate", "reapply", "verify", "redefine"):
            base = self.find(m.key, m.engine, m.backend, 0)
            if base:
                parts.append(f"vs 0 present {m.median / base.median:.2f}x")
        if m.engine == "ours" and m.backend == "ebiptables" and m.key != "populate":
            nft = self.find(m.key, "ours", "nftables", m.present)
            if nft:
                parts.append(f"vs nftables {m.median / nft.median:.2f}x")
        if m.key.startswith(("hook-start", "binding-create")) and m.engine == "ours":
            bare = self.find("python-bare", "python")
            if bare:
                parts.append(f"interpreter {100 * bare.median / m.median:.0f}%")
        return "; ".join(parts)

    def table(self) -> str:
        rows = [("measurement", "backend", "present", "median", "min-max", "n", "CPU", "peak RSS",
                 "ratio to reference")]
        for m in self.measurements:
            if m.error and not m.walls:
                rows.append((m.label, m.backend or m.engine, "" if m.present is None else str(m.present),
                             "ERROR", m.error[:60], "0", "-", "-", ""))
                continue
            if not m.walls:
                continue
            engine = {"ours": m.backend or "", "libvirt": "libvirt", "tool": f"{m.backend} (tool)",
                      "python": "python"}[m.engine]
            label = m.label
            rows.append((label, engine, "" if m.present is None else str(m.present), fmt_time(m.median),
                         f"{fmt_time(min(m.walls))}-{fmt_time(max(m.walls))}", str(len(m.walls)),
                         fmt_time(statistics.median(m.cpu)) if m.cpu and m.engine != "libvirt" else "-",
                         fmt_rss(max(m.rss_kb)) if m.rss_kb else "-", self.ratio_text(m)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for j, r in enumerate(rows):
            cells = [c.rjust(widths[i]) if i in (2, 3, 4, 5, 6, 7) else c.ljust(widths[i]) for i, c in enumerate(r)]
            lines.append("  ".join(cells).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def goals_text(self, goals: list[dict]) -> str:
        lines = ["Goals (nftables backend):"]
        for g in goals:
            mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[g["met"]]
            lines.append(f"  {mark} {g['goal']}: target {g['target']}, measured {g['measured']}")
        return "\n".join(lines)

    def plot(self, path: Path) -> str | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import matplotlib.ticker
        except ImportError:
            return "matplotlib not importable: no plot (bench/run installs it into .venv)"
        sizes = sorted({m.present for m in self.measurements if m.key == "binding-create" and m.walls})
        if not sizes:
            return "no binding-create figures: no plot"
        xs = {s: i for i, s in enumerate(sizes)}
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
        series = [("ours", "nftables", "libvirt-nwfilter, nftables", dict(color="tab:blue", marker="o")),
                  ("ours", "ebiptables", "libvirt-nwfilter, ebiptables", dict(color="tab:green", marker="s")),
                  ("libvirt", None, "libvirt's engine (virsh nwfilter-binding-create)",
                   dict(color="tab:red", marker="^"))]
        drawn = []
        for engine, backend, label, style in series:
            pts = sorted(((xs[m.present], m) for m in self.measurements
                          if m.key == "binding-create" and m.engine == engine and m.walls
                          and (backend is None or m.backend == backend)), key=lambda p: p[0])
            if pts:
                drawn.append((label, style, pts))
        for label, style, pts in drawn:
            x = [p[0] for p in pts]
            y = [p[1].median * 1000 for p in pts]
            lo = [(p[1].median - min(p[1].walls)) * 1000 for p in pts]
            hi = [(max(p[1].walls) - p[1].median) * 1000 for p in pts]
            ax.errorbar(x, y, yerr=[lo, hi], label=label, capsize=4, linewidth=1.8, **style)
            for xi, yi in zip(x, y):
                near = [q[1].median * 1000 for lb, _, qs in drawn for q in qs
                        if q[0] == xi and ("libvirt's" in lb) == ("libvirt's" in label)]
                dy = 8 if yi >= max(near) else -14  # of our two lines at x: the higher labelled above
                ax.annotate(f"{yi:.0f} ms", (xi, yi), textcoords="offset points", xytext=(7, dy), fontsize=8,
                            color=style["color"])
        lv = self.find("binding-create", "libvirt", None, 0)
        if lv:
            goal = lv.median * 1000 / GOAL_LIBVIRT_RATIO
            ax.axhline(goal, color="tab:red", linestyle=":", linewidth=1.2,
                       label=f"goal: {GOAL_LIBVIRT_RATIO:.0f}x faster than libvirt ({goal:.0f} ms)")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
        ax.set_xlim(-0.3, len(sizes) - 0.5)
        ax.set_xlabel("bindings already present")
        ax.set_ylabel("wall time per binding, ms (log scale)")
        ax.set_title("Time per clean-traffic binding, one fresh process each\n"
                     f"median of runs, bars min-max; {self.info.get('cores')} cores, kernel {self.info.get('kernel')}",
                     fontsize=10)
        ax.grid(True, which="both", axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return None

    def report(self, error: str | None = None) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        goals = self.goals()
        table = self.table()
        print()
        print(f"libvirt-nwfilter benchmark, {datetime.datetime.fromtimestamp(self.started):%Y-%m-%d %H:%M}, "
              f"{self.info.get('cpu')} ({self.info.get('cores')} cores, {self.info.get('memory_gib')} GiB), "
              f"kernel {self.info.get('kernel')}, {self.info.get('nft')}, libvirt {self.info.get('libvirt')}, "
              f"commit {self.info.get('commit')}")
        print(table)
        print()
        print(self.goals_text(goals))
        load = self.info.get("loadavg_start"), self.info.get("loadavg_end")
        if load[0]:
            print(f"Load average at start {load[0][0]:.2f}, at end {(load[1] or load[0])[0]:.2f} "
                  f"(other work on the machine inflates the figures)")
        for note in self.notes:
            print(f"note: {note}")
        plot_note = self.plot(self.out / "per-binding.png")
        if plot_note:
            self.notes.append(plot_note)
            print(f"note: {plot_note}")
        data = {
            "generated": datetime.datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started, 1),
            "command": " ".join(map(shlex.quote, sys.argv)),
            "settings": {"quick": self.args.quick, "full": self.args.full, "reps": self.reps,
                         "slow_reps": self.slow_reps, "libvirt_reps": self.args.libvirt_reps,
                         "sizes": list(self.sizes), "backends": list(self.args.backends)},
            "machine": self.info, "goals": goals, "notes": self.notes,
            "measurements": [m.to_json() for m in self.measurements],
        }
        if error:
            data["error"] = error
        (self.out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
        (self.out / "table.txt").write_text(table + "\n\n" + self.goals_text(goals) + "\n")
        print(f"\nwrote {self.out / 'results.json'}, {self.out / 'table.txt'}"
              + ("" if plot_note else f", {self.out / 'per-binding.png'}")
              + (f", {self.profile_dir}/" if self.args.profile else ""))
        print(f"total time {time.time() - self.started:.0f} s")
        return 1 if error else 0

    def cleanup(self) -> None:
        """Always: libvirtd stopped by pid, namespaces deleted, temporary directories removed."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # finish cleaning up whatever arrives now
        problems = []
        try:
            self.stop_libvirtd()
        except Exception as error:  # noqa: BLE001
            problems.append(f"libvirtd: {error}")
        if self.lab is not None:
            try:
                self.lab.close()
            except Exception as error:  # noqa: BLE001
                problems.append(f"lab: {error}")
            self.lab = None
        with contextlib.suppress(Exception):
            import netlab

            left = netlab.cleanup_all()
            if left:
                problems.append(f"namespaces removed late: {left}")
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.shm, ignore_errors=True)
        for problem in problems:
            print(f"bench: cleanup: {problem}", file=sys.stderr)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)


def lock_busy(path: Path) -> bool:
    """Whether another process holds the flock on ``path`` now."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Profiling helpers


def importtime_summary(text: str, top: int = 25) -> str:
    rows = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(2)), int(m.group(1)), len(m.group(3)), m.group(4)))
    total = sum(r[1] for r in rows)
    own = [r for r in rows if r[3].startswith("libvirt_nwfilter")]
    lines = [f"all imports: {total / 1000:.1f} ms self time in {len(rows)} modules",
             f"libvirt_nwfilter modules: {sum(r[1] for r in own) / 1000:.1f} ms self time in {len(own)} modules",
             "", f"top {top} by cumulative time (us, self us, module):"]
    for cumulative, self_us, _, name in sorted(rows, reverse=True)[:top]:
        lines.append(f"{cumulative:9d} {self_us:9d}  {name}")
    lines += ["", f"top {top} by self time:"]
    for cumulative, self_us, _, name in sorted(rows, key=lambda r: -r[1])[:top]:
        lines.append(f"{cumulative:9d} {self_us:9d}  {name}")
    return "\n".join(lines) + "\n"


def pstats_summary(prof: Path) -> str:
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    stats.strip_dirs()
    buf.write("=== by cumulative time ===\n")
    stats.sort_stats("cumulative").print_stats(45)
    buf.write("\n=== by own time ===\n")
    stats.sort_stats("tottime").print_stats(30)
    return buf.getvalue()


def strace_phases(bench: Bench, ours: "Bench.Ours", name: str, argv: list, stdin: bytes) -> None:
    """Where the wall time of one process goes: its own Python time vs each tool it runs
    (strace -f of execve/exit_group; strace slows everything a little)."""
    if not shutil.which("strace"):
        return
    trace = bench.profile_dir / f"{name}-strace.txt"
    spawn(["strace", "-f", "-ttt", "-e", "trace=execve,exit_group", "-o", trace, *argv], ours.env, ours.ns,
          stdin).check(f"strace {name}")
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    names: dict[str, str] = {}
    order: list[str] = []
    for line in trace.read_text().splitlines():
        m = re.match(r"(\d+)\s+([\d.]+)\s+(.*)", line)
        if not m:
            continue
        pid, ts, rest = m.group(1), float(m.group(2)), m.group(3)
        if rest.startswith("execve(") and rest.rstrip().endswith("= 0"):
            if pid not in starts:
                starts[pid] = ts
                order.append(pid)
            names[pid] = os.path.basename(rest.split('"')[1])
        elif rest.startswith("+++ exited") or rest.startswith("exit_group("):
            ends[pid] = ts
    if not order:
        return
    root = order[0]
    total = ends.get(root, 0) - starts[root]
    lines = [f"{name}: {total * 1000:.1f} ms under strace (root process {names.get(root)})"]
    tools = 0.0
    for pid in order[1:]:
        duration = ends.get(pid, starts[pid]) - starts[pid]
        tools += duration
        lines.append(f"  {names.get(pid)}: {duration * 1000:.1f} ms (starts at +{(starts[pid] - starts[root]) * 1000:.1f} ms)")
    lines.append(f"  in tools: {tools * 1000:.1f} ms; in Python (start-up, imports, work, waiting): "
                 f"{(total - tools) * 1000:.1f} ms")
    first_tool = starts[order[1]] - starts[root] if len(order) > 1 else None
    if first_tool is not None:
        lines.append(f"  Python before the first tool: {first_tool * 1000:.1f} ms")
    (bench.profile_dir / f"{name}-phases.txt").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# The pre-population child (runs inside the namespace with the venv's Python)


def populate_child(argv: list[str]) -> int:
    conf, rundir, backend, start, end, filter_name = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5]
    from libvirt_nwfilter.config import Config
    from libvirt_nwfilter.model import Binding, FilterRef
    from libvirt_nwfilter.service import Service

    service = Service(Config(Path(conf), Path(rundir), backend))
    bindings = [Binding(owner_name=f"bench-{i}", owner_uuid=prepop_uuid(i), portdev=prepop_port(i),
                        mac=prepop_mac(i), filterref=FilterRef(filter_name, (("IP", (prepop_ip(i),)),)))
                for i in range(start, end)]
    service.bind_owner(bindings)
    return 0


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description="Benchmark libvirt-nwfilter against libvirt's "
                                "own nwfilter engine (as root; see bench/README.md).")
    p.add_argument("--quick", action="store_true", help="0 and 100 bindings present only, 3 runs each (~3 min)")
    p.add_argument("--full", action="store_true",
                   help="also measure libvirt's engine with 100 of its bindings present (~2 more minutes)")
    p.add_argument("--profile", action="store_true",
                   help="also write OUT/profile/: -X importtime, cProfile, strace phases (nftables)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="output directory (default bench/results)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default nftables,ebiptables)")
    p.add_argument("--reps", type=int, help="runs per fast measurement (default 7; --quick 3)")
    p.add_argument("--slow-reps", type=int, help="runs of reapply/verify/define (default 5; --quick 3)")
    p.add_argument("--slow-budget", type=float, default=90.0,
                   help="seconds after which a slow measurement stops at 3 runs (default 90)")
    p.add_argument("--libvirt-reps", type=int, help="virsh binding-creates per point (default 7; --quick 5)")
    p.add_argument("--libvirt-lock-wait", type=float, default=600.0,
                   help="seconds to wait for the test-libvirtd lock held by a test run (default 600)")
    p.add_argument("--no-libvirt", action="store_true", help="skip libvirt's engine")
    p.add_argument("--replot", action="store_true",
                   help="measure nothing: print the table and redraw the plot from OUT/results.json")
    p.add_argument("--debug", action="store_true", help="tracebacks for errors")
    args = p.parse_args(argv)
    args.backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    for backend in args.backends:
        if backend not in BACKENDS:
            p.error(f"unknown backend {backend!r}")
    args.reps = args.reps or (3 if args.quick else 7)
    args.slow_reps = args.slow_reps or (3 if args.quick else 5)
    args.libvirt_reps = args.libvirt_reps or (5 if args.quick else 7)
    if args.reps < 1 or args.slow_reps < 1 or args.libvirt_reps < 1:
        p.error("run counts must be at least 1")
    if args.libvirt_reps > MEAS_PORTS * 4:
        p.error("too many libvirt runs")
    return args


def replot(args: argparse.Namespace) -> int:
    """Table, goals and plot again from OUT/results.json (no measuring; no root needed)."""
    path = Path(args.out).resolve() / "results.json"
    data = json.loads(path.read_text())
    bench = Bench.__new__(Bench)
    bench.out = path.parent
    bench.info = data.get("machine", {})
    bench.max_present = max(data.get("settings", {}).get("sizes", [1000]))
    bench.measurements = []
    for item in data["measurements"]:
        m = Measurement(item["key"], item["label"], item["engine"], item.get("backend"), item.get("present"),
                        walls=list(item.get("walls_s", [])), note=item.get("note", ""), error=item.get("error"))
        if "peak_rss_kb" in item:
            m.rss_kb = [item["peak_rss_kb"]]
        m.cpu = list(item.get("cpu_s") or ([item["cpu_median_s"]] if item.get("cpu_median_s") is not None else []))
        bench.measurements.append(m)
    table, goals = bench.table(), bench.goals_text(bench.goals())
    print(table)
    print()
    print(goals)
    (bench.out / "table.txt").write_text(table + "\n\n" + goals + "\n")
    note = bench.plot(bench.out / "per-binding.png")
    print(note or f"wrote {bench.out / 'per-binding.png'}")
    return 0


def main(argv: Sequence[str]) -> int:
    global NETNS
    if argv[:1] == ["_populate"]:
        return populate_child(list(argv[1:]))
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    if os.geteuid() != 0:
        print("bench: run as root (network namespaces, nftables, libvirtd)", file=sys.stderr)
        return 2
    if not VENV_PY.exists() or not CLI.exists():
        print("bench: .venv is missing: run bench/run (it runs scripts/bootstrap)", file=sys.stderr)
        return 2
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        print(f"bench: note: running under {sys.executable}, not the project venv", file=sys.stderr)
    sys.path.insert(0, str(TESTS))
    NETNS = Netns()

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    bench = Bench(args)
    error = None
    try:
        bench.run()
    except KeyboardInterrupt:
        error = "interrupted"
    except SystemExit as exc:
        error = f"stopped by signal {int(exc.code) - 128}" if isinstance(exc.code, int) else str(exc)
    except Exception as exc:  # noqa: BLE001 - partial results are still written
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        bench.cleanup()
    if error:
        print(f"bench: {error}; partial results follow", file=sys.stderr)
    return bench.report(error)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

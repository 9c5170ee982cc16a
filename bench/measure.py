"""Measuring: processes spawned directly inside a namespace, timed, with their rusage; the
measurements they make up, and how figures are written.

Every figure is the median of several fresh processes, with min-max. Peak memory comes from one
more, untimed run under GNU ``time`` (:func:`memory_runs`): its ``%M``, the largest process of
the tree (Python or the firewall tool it ran). ``ru_maxrss`` from ``wait4`` in the benchmark
itself would be at least the benchmark's own size: a child spawned with ``vfork`` carries its
parent's memory as its high-water mark into ``exec``, and GNU time in every timed run would add
an exec (~1 ms) to each figure. Processes run with a minimal environment like the one
libvirtd gives hooks (no ``PYTHON*`` variables) directly inside the namespace (``setns``; no
``ip netns exec`` in the timed path).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
# The checkout measured: this one, or another one (with its own .venv) named by
# LIBVIRT_NWFILTER_BENCH_SUBJECT, so that two versions are measured by the same benchmark.
SUBJECT = Path(os.environ.get("LIBVIRT_NWFILTER_BENCH_SUBJECT") or REPO).resolve()
VENV_PY = SUBJECT / ".venv" / "bin" / "python"
CLI = SUBJECT / ".venv" / "bin" / "libvirt-nwfilter"
HOOK = SUBJECT / "hooks" / "qemu"
TESTS = REPO / "tests"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLONE_NEWNET = 0x40000000
GNU_TIME = "/usr/bin/time"
_memory_runs = False  # spawn() runs processes under GNU time for their peak memory (memory_runs)


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


@functools.cache
def _netns() -> Netns:
    return Netns()


@dataclass
class Run:
    argv: list[str]
    wall: float
    rc: int
    maxrss_kb: int
    cpu: float
    stdout: str
    stderr: str
    memory_only: bool = False  # run under GNU time: its peak memory counts, its time does not

    def check(self, what: str) -> "Run":
        if self.rc != 0:
            raise BenchError(f"{what} failed (exit {self.rc}): {' '.join(map(shlex.quote, self.argv))}\n"
                             f"stdout: {self.stdout.strip()[:2000]}\nstderr: {self.stderr.strip()[:2000]}")
        return self


class BenchError(RuntimeError):
    pass


@contextlib.contextmanager
def memory_runs() -> Iterator[None]:
    """Meanwhile, :func:`spawn` runs each process under GNU time and gives its peak memory
    (``Run.memory_only``: the time is not a figure)."""
    global _memory_runs
    _memory_runs = True
    try:
        yield
    finally:
        _memory_runs = False


def spawn(argv: Sequence[object], env: dict[str, str], ns: str | None = None, stdin: bytes = b"",
          timeout: float = 900.0) -> Run:
    """Run ``argv`` to completion in namespace ``ns``: wall time from spawn to exit, and the
    child's rusage from wait4 (CPU of the whole tree); within :func:`memory_runs`, the peak
    memory of the tree's largest process instead."""
    argv = [str(a) for a in argv]
    if not os.path.isabs(argv[0]):
        found = shutil.which(argv[0], path=env.get("PATH", BASE_PATH))
        if found is None:
            raise BenchError(f"{argv[0]} not found")
        argv[0] = found
    if not _memory_runs:
        return _spawn(argv, env, ns, stdin, timeout)
    with tempfile.NamedTemporaryFile("r") as peak:
        run = _spawn([GNU_TIME, "-f", "%M", "-o", peak.name, *argv], env, ns, stdin, timeout)
        lines = peak.read().split()
    run.argv, run.memory_only = argv, True
    run.maxrss_kb = int(lines[-1]) if lines and lines[-1].isdigit() else 0
    return run


def _spawn(argv: list[str], env: dict[str, str], ns: str | None, stdin: bytes, timeout: float) -> Run:
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        fin.write(stdin)
        fin.flush()
        fin.seek(0)
        actions = [(os.POSIX_SPAWN_DUP2, fin.fileno(), 0), (os.POSIX_SPAWN_DUP2, fout.fileno(), 1),
                   (os.POSIX_SPAWN_DUP2, ferr.fileno(), 2)]
        with _netns().entered(ns):
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

    def add(self, run: Run) -> None:
        """A timed run's wall time and CPU, or a memory run's peak memory."""
        if run.memory_only:
            self.rss_kb.append(run.maxrss_kb)
        else:
            self.walls.append(run.wall)
            self.cpu.append(run.cpu)

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


@dataclass
class Results:
    """What a run measured (or what results.json holds): the input of the report."""

    measurements: list[Measurement] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # the machine
    notes: list[str] = field(default_factory=list)
    max_present: int = 1000

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


def is_tmpfs(path: Path) -> bool:
    proc = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)], capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.split()[:1] == ["tmpfs"]  # (one line per stacked mount)


def machine_info(rundir: Path) -> dict:
    """The machine, the tools' versions, the commit measured, and the load now."""
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
    commit = first(["git", "-C", str(SUBJECT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(SUBJECT), "status", "--porcelain", "--untracked-files=no", "--",
                            ".", ":!bench/results"],  # the previous run's results are not the code measured
                           capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(), "debian": debian,
        "python": first([str(VENV_PY), "-c", "import sys; print(sys.version.split()[0])"]),
        "nft": first(["nft", "--version"]), "iptables": first(["iptables", "-V"]),
        "libvirt": first(["libvirtd", "--version"]) if shutil.which("libvirtd") else "not installed",
        "commit": commit + ("+local changes" if dirty else ""),
        "rundir_fs": "tmpfs" if is_tmpfs(rundir) else "disk",
        "loadavg_start": os.getloadavg(),
    }

"""A clean Debian 12 root for the package tests, made with debootstrap and cached.

The first use on a machine runs ``debootstrap --variant=minbase bookworm`` (plus man-db, for
``man --warnings``) and keeps the result as a tarball under :data:`CACHE_DIR`; later uses unpack
it (seconds) into a scratch directory under :data:`SCRATCH` (in memory where it can be).
Packages that apt downloads inside a root are kept in ``CACHE_DIR/archives`` for the next root.

Commands run in the root through ``chroot`` inside a private mount namespace (``unshare
--mount``) that mounts ``/proc``, ``/sys``, ``/dev`` and the archive cache: the mounts exist only
for that command and vanish with it, so nothing is ever left mounted and deleting a root can
never reach into the host's ``/dev``. With ``netns`` the command runs inside that network
namespace (``ip netns exec``), where the installed command meets a real kernel.

The root gets a ``policy-rc.d`` that forbids starting services (as in any chroot) and dpkg's
``force-unsafe-io`` (no fsync: the root is thrown away).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

CACHE_DIR = Path(os.environ.get("LIBVIRT_NWFILTER_TEST_CACHE", "/var/cache/libvirt-nwfilter-tests"))


def _scratch() -> Path:
    """Where roots are unpacked: /dev/shm (memory: unpacking, dpkg and deleting take seconds
    less) unless it is mounted noexec or nodev."""
    shm = Path("/dev/shm")
    if shm.is_dir() and not os.statvfs(shm).f_flag & (os.ST_NOEXEC | os.ST_NODEV):
        return shm
    return Path("/var/tmp")


SCRATCH = _scratch()
MIRROR = os.environ.get("LIBVIRT_NWFILTER_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
INCLUDE = ("man-db",)
RECIPE = "1"  # change it when the making of the base changes: the cache key changes with it
ROOT_PREFIX = "libvirt-nwfilter-root-"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
       "DEBIAN_FRONTEND": "noninteractive", "TERM": "dumb"}
APT = ("apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0")

# mount what the command needs, then chroot; $1 root, $2 archive cache ('' for none)
_ENTER = """set -e
root=$1 archives=$2; shift 2
mount --bind "$root" "$root"  # the root a mount point: 'ip netns' in it remounts /
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
[ -z "$archives" ] || mount --bind "$archives" "$root/var/cache/apt/archives"
exec chroot "$root" "$@"
"""


class RootCommandError(AssertionError):
    """A command in the root failed; the message has its output."""


def _host(argv: Sequence[str], timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=ENV, **kwargs)
    if proc.returncode != 0:
        raise RootCommandError(f"{list(argv)} failed (exit {proc.returncode})\n"
                               f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive lock on ``CACHE_DIR/name`` (test sessions of other worktrees share the cache)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / name, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def base_tarball() -> Path:
    """The cached tarball of the base root, made first when missing."""
    key = hashlib.sha256("\n".join((SUITE, MIRROR, RECIPE, *INCLUDE)).encode()).hexdigest()[:12]
    tarball = CACHE_DIR / f"{SUITE}-minbase-{key}.tar"
    with _locked("base.lock"):
        if not tarball.exists():
            _make_base(tarball)
    return tarball


def _make_base(tarball: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-", dir=SCRATCH))
    try:
        root = work / "root"
        (CACHE_DIR / "debootstrap").mkdir(exist_ok=True)
        _host(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
               f"--cache-dir={CACHE_DIR / 'debootstrap'}", SUITE, root, MIRROR])
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\n# no services start in this test root\nexit 101\n")
        policy.chmod(0o755)
        (root / "etc/dpkg/dpkg.cfg.d/unsafe-io").write_text("force-unsafe-io\n")
        shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
        run_in_root(root, [*APT, "update"])  # package lists in the base: later updates are quick
        partial = tarball.with_name(tarball.name + ".partial")
        _host(["tar", "-C", root, "-cf", partial, "."])
        partial.rename(tarball)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_in_root(root: Path, argv: Sequence[str], netns: str | None = None, input: str | None = None,
                check: bool = True, env: dict[str, str] | None = None, archives: Path | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``argv`` chrooted in ``root`` (in network namespace ``netns`` when given)."""
    variables = [f"{k}={v}" for k, v in {**ENV, **(env or {})}.items()]
    command = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _ENTER, "sh",
               str(root), str(archives or ""), "env", "-i", *variables, *argv]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    proc = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RootCommandError(f"in {root}: {list(argv)} failed (exit {proc.returncode})\n"
                               f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def reap_orphans() -> list[Path]:
    """Delete scratch roots whose test process is gone (killed before its clean-up)."""
    reaped = []
    for path in SCRATCH.glob(f"{ROOT_PREFIX}*"):
        pid = path.name[len(ROOT_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)
            reaped.append(path)
    return reaped


class DebianRoot:
    """A fresh root unpacked from the cached base; :meth:`close` deletes it."""

    def __init__(self) -> None:
        tarball = base_tarball()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-", dir=SCRATCH))
        self.path = self.dir / "root"
        self.path.mkdir()
        _host(["tar", "-C", self.path, "-xf", tarball])
        shutil.copyfile("/etc/resolv.conf", self.path / "etc/resolv.conf")
        self.archives = CACHE_DIR / "archives"
        (self.archives / "partial").mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "DebianRoot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, argv: Sequence[str], netns: str | None = None, input: str | None = None,
            check: bool = True, env: dict[str, str] | None = None, archives: bool = False,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """Run ``argv`` in the root; see :func:`run_in_root`."""
        return run_in_root(self.path, argv, netns, input, check, env, self.archives if archives else None,
                           timeout)

    def apt(self, *args: str, netns: str | None = None) -> subprocess.CompletedProcess:
        """``apt-get -y ARGS`` in the root, downloads cached; one apt at a time on the host's cache."""
        with _locked("archives.lock"):
            return self.run([*APT, *args], netns=netns, archives=True)

    def put(self, source: Path, directory: str = "/tmp") -> str:
        """Copy a host file into the root; returns its path inside the root."""
        inside = f"{directory.rstrip('/')}/{Path(source).name}"
        shutil.copyfile(source, self.path / inside.lstrip("/"))
        return inside

    def file(self, inside: str) -> Path:
        """The host path of ``inside`` (a path in the root)."""
        return self.path / inside.lstrip("/")

    def package_status(self, package: str) -> str:
        """dpkg's status abbreviation (``ii``, ``rc``) or ``""`` when dpkg does not know it."""
        proc = self.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package], check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""


# What changes in any root when packages come and go, what is not the system's content, and
# iproute2's directory of named namespaces ('verify' makes a throw-away one).
SNAPSHOT_IGNORED = ("proc", "sys", "dev", "tmp", "var/lib/dpkg", "var/lib/apt", "var/cache",
                    "var/log", "etc/ld.so.cache", "run/netns")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path in ``root`` (but :data:`SNAPSHOT_IGNORED`) with type, mode and, for files,
    size and modification time: two snapshots differ when anything was added, removed or
    written."""
    found: dict[str, tuple] = {}
    for directory, subdirs, files in os.walk(root):
        relative_dir = os.path.relpath(directory, root)
        subdirs[:] = [d for d in subdirs
                      if os.path.normpath(os.path.join(relative_dir, d)) not in SNAPSHOT_IGNORED]
        for name in subdirs + files:
            relative = os.path.normpath(os.path.join(relative_dir, name))
            info = os.lstat(os.path.join(directory, name))
            if os.path.islink(os.path.join(directory, name)):
                found[relative] = ("link", os.readlink(os.path.join(directory, name)))
            elif name in subdirs:
                found[relative] = ("dir", info.st_mode)
            else:
                found[relative] = ("file", info.st_mode, info.st_size, info.st_mtime_ns)
    return found

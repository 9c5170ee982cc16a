"""A private libvirtd inside a lab network namespace, for libvirt tests.

Recipe: shared/spec/libvirt-facts.md §5. :func:`start_libvirtd` creates a :class:`netlab.Lab`
(host namespace + ``br0``), writes the test ``qemu.conf`` (the original is backed up and
restored), installs an optional hook in ``/etc/libvirt/hooks/qemu.d/`` *before* the daemon
starts (libvirtd discovers hooks only at start), and runs ``ip netns exec NS libvirtd`` in a
new session. Taps of guests and the firewall rules of libvirt's own nwfilter engine therefore
live in ``lab.host_ns``; virsh from anywhere reaches the daemon as ``qemu:///system``.

Only one libvirtd can run per host (it owns ``/run/libvirt``): a host-wide lock serializes
test sessions, a distribution libvirtd found running is stopped (and restarted afterwards when
it was a systemd unit), a daemon left behind by a crashed test run is killed by its PID and
the `nwft-` filters such a run left defined are undefined.

:meth:`Libvirtd.stop` (called by the fixtures, also on failure) removes test guests and every
nwfilter binding, kills the daemon by PID, removes binding leftovers, the hook, restores
``qemu.conf`` and deletes the namespaces.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import subprocess
import tempfile
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence
from xml.sax.saxutils import quoteattr

import netlab

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_CONF_BACKUP = Path("/etc/libvirt/qemu.conf.nwft-backup")
HOOK_DIR = Path("/etc/libvirt/hooks/qemu.d")
HOOK_NAME = "50-nwft-test"
BINDING_DIR = Path("/run/libvirt/nwfilter-binding")
LOCK_FILE = Path("/run/nwft-libvirtd.lock")
PID_FILE = Path("/run/nwft-libvirtd.pid")
GUEST_PREFIX = "nwft-"
ORACLE_OWNER = "nwft-oracle"
LOCK_WAIT = 1200.0
START_TIMEOUT = 30.0

TEST_QEMU_CONF = """\
# Written by tests/libvirtd.py for the test libvirtd; the original is in qemu.conf.nwft-backup.
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
remember_owner = 0
stdio_handler = "file"
"""

SYSTEMD_UNITS = [
    "libvirtd.service", "libvirtd.socket", "libvirtd-ro.socket", "libvirtd-admin.socket",
    "libvirtd-tcp.socket", "libvirtd-tls.socket",
    "virtqemud.service", "virtqemud.socket", "virtqemud-ro.socket", "virtqemud-admin.socket",
    "virtnwfilterd.service", "virtnwfilterd.socket", "virtnwfilterd-ro.socket",
    "virtnwfilterd-admin.socket",
]
DAEMONS = ["libvirtd", "virtqemud", "virtnwfilterd"]

_current: "Libvirtd | None" = None


class LibvirtdError(RuntimeError):
    """The test libvirtd could not be started, used or stopped."""


def virsh(*args: str, check: bool = True, input: str | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``virsh -c qemu:///system ARGS`` (from the root namespace; the socket is shared)."""
    try:
        return netlab.run(["virsh", "-c", URI, *args], check=check, input=input,
                          timeout=timeout)
    except netlab.NetlabError as exc:
        raise LibvirtdError(str(exc)) from None


def kvm_usable() -> bool:
    """True when /dev/kvm can be opened and answers KVM_GET_API_VERSION."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, 0xAE00) == 12  # KVM_GET_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def hook_wrapper(command: Sequence[str], env: Mapping[str, str] | None = None,
                 log: str | os.PathLike | None = None) -> str:
    """Text of a hook script that exports ``env``, optionally appends its arguments to
    ``log`` (one line per call: ``guest op subop extra``), then execs ``command "$@"`` with
    the domain XML still on stdin. libvirtd clears the environment of hooks, so this is how
    tests pass ``LIBVIRT_NWFILTER_*`` settings (libvirt-facts.md §1.1)."""
    lines = ["#!/bin/sh", "# test hook written by tests/libvirtd.py"]
    for key, value in (env or {}).items():
        lines.append(f"export {key}={shlex.quote(str(value))}")
    if log is not None:
        lines.append(f'echo "$*" >> {shlex.quote(str(log))}')
    lines.append("exec " + " ".join(shlex.quote(str(c)) for c in command) + ' "$@"')
    return "\n".join(lines) + "\n"


@dataclass
class Guest:
    """A test guest: ``name``, ``uuid``, ``mac`` and, once running, its tap ``tap``."""

    name: str
    uuid: str
    mac: str
    tap: str | None = None


def _pid_alive_as(pid: int, comm: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == comm
    except OSError:
        return False


def _pgrep(name: str) -> list[int]:
    proc = netlab.run(["pgrep", "-x", name], check=False)
    return [int(p) for p in proc.stdout.split()]


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


class Libvirtd:
    """The running test daemon. Attributes: ``lab`` (its :class:`netlab.Lab`; ``lab.host_ns``
    is libvirtd's namespace), ``pid``, ``log_path``, ``hook_path`` (or None), ``domain_type``
    (``kvm`` or ``qemu``), ``guests`` (name -> :class:`Guest` it created)."""

    def __init__(self, hook_script_text: str | None = None):
        self.lab: netlab.Lab | None = None
        self.pid: int | None = None
        self.hook_path: Path | None = None
        self.guests: dict[str, Guest] = {}
        self.domain_type = "kvm" if kvm_usable() else "qemu"
        self._lock_fd: int | None = None
        self._restart_units: list[str] = []
        self._made_hook_dir = False
        self._qemu_conf_backed_up = False
        self._workdir = Path(tempfile.mkdtemp(prefix="nwft-libvirtd-"))
        self.log_path = self._workdir / "libvirtd.log"
        self._hook_text = hook_script_text
        self._proc: subprocess.Popen | None = None

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> "Libvirtd":
        global _current
        try:
            self._acquire_lock()
            self._stop_other_daemons()
            self._write_qemu_conf()
            if self._hook_text is not None:
                self._install_hook(self._hook_text)
            self._remove_binding_files()
            self.lab = netlab.Lab()
            self._spawn()
            self._remove_stale_guests()
            self._remove_stale_filters()
        except BaseException:
            self.stop()
            raise
        _current = self
        return self

    def _acquire_lock(self) -> None:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LibvirtdError(f"another test session holds {LOCK_FILE} "
                                        f"(waited {LOCK_WAIT:.0f}s)") from None
                time.sleep(0.5)
        self._lock_fd = fd

    def _stop_other_daemons(self) -> None:
        # A daemon left behind by an earlier (crashed) test run: ours, known by its PID.
        try:
            old = int(PID_FILE.read_text().strip())
        except (OSError, ValueError):
            old = None
        if old and _pid_alive_as(old, "libvirtd"):
            self._kill_pid(old)
        PID_FILE.unlink(missing_ok=True)
        # The distribution's daemons.
        if _systemd_running():
            for unit in SYSTEMD_UNITS:
                state = netlab.run(["systemctl", "is-active", unit], check=False).stdout.strip()
                if state in ("active", "activating", "reloading"):
                    self._restart_units.append(unit)
            if self._restart_units:
                netlab.run(["systemctl", "stop", *self._restart_units], check=False, timeout=60)
        elif _pgrep("libvirtd") and Path("/etc/init.d/libvirtd").exists():
            netlab.run(["/etc/init.d/libvirtd", "stop"], check=False, timeout=60)
        running = {d: _pgrep(d) for d in DAEMONS}
        running = {d: p for d, p in running.items() if p}
        if running:
            raise LibvirtdError(f"other libvirt daemons are running ({running}); the test "
                                "libvirtd must be the only one: stop them first")

    def _write_qemu_conf(self) -> None:
        if not QEMU_CONF_BACKUP.exists():
            # (An existing backup is the original left by a crashed run: keep it.)
            data = QEMU_CONF.read_bytes() if QEMU_CONF.exists() else b""
            tmp = QEMU_CONF_BACKUP.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.chmod(tmp, QEMU_CONF.stat().st_mode & 0o7777 if QEMU_CONF.exists() else 0o600)
            os.replace(tmp, QEMU_CONF_BACKUP)
        self._qemu_conf_backed_up = True
        QEMU_CONF.write_text(TEST_QEMU_CONF)

    def _restore_qemu_conf(self) -> None:
        if self._qemu_conf_backed_up and QEMU_CONF_BACKUP.exists():
            os.replace(QEMU_CONF_BACKUP, QEMU_CONF)
            self._qemu_conf_backed_up = False

    def _install_hook(self, text: str) -> None:
        if not HOOK_DIR.is_dir():
            HOOK_DIR.mkdir(parents=True)
            self._made_hook_dir = True
        path = HOOK_DIR / HOOK_NAME
        tmp = path.with_name(f".{HOOK_NAME}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
        self.hook_path = path

    def _remove_binding_files(self) -> None:
        if BINDING_DIR.is_dir():
            for f in BINDING_DIR.glob("*.xml"):
                f.unlink(missing_ok=True)

    def _spawn(self) -> None:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/root", "LC_ALL": "C", "USER": "root", "LOGNAME": "root"}
        with open(self.log_path, "ab") as log:
            # ip netns exec execs libvirtd in place (no fork), so the PID is libvirtd's;
            # start_new_session is the setsid of the recipe.
            self._proc = subprocess.Popen(["ip", "netns", "exec", self.lab.host_ns, "libvirtd"],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          env=env, start_new_session=True)
        self.pid = self._proc.pid
        PID_FILE.write_text(f"{self.pid}\n")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise LibvirtdError(f"libvirtd exited with status {self._proc.returncode}:\n"
                                    f"{self.log_tail()}")
            if virsh("version", check=False, timeout=10).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise LibvirtdError(f"libvirtd not answering after {START_TIMEOUT}s:\n"
                                    f"{self.log_tail()}")
            time.sleep(0.1)
        if not _pid_alive_as(self.pid, "libvirtd"):
            raise LibvirtdError(f"PID {self.pid} is not libvirtd")
        ns = netlab.run(["ip", "netns", "identify", str(self.pid)]).stdout.strip()
        if ns != self.lab.host_ns:
            raise LibvirtdError(f"libvirtd runs in namespace {ns!r}, not {self.lab.host_ns}")

    def restart(self) -> None:
        """Stop the daemon by its PID and start it again in the same namespace. Running
        guests survive; the new daemon reconnects to them (the ``reconnect`` hook runs)."""
        if self.pid is None or self.lab is None:
            raise LibvirtdError("the test libvirtd is not running")
        self._kill_pid(self.pid)
        self._spawn()

    def _remove_stale_guests(self) -> None:
        names = virsh("list", "--all", "--name").stdout.split()
        for name in names:
            if name.startswith(GUEST_PREFIX):
                self._destroy_undefine(name)

    def _remove_stale_filters(self) -> None:
        # Filters a killed test run defined persist in /etc/libvirt/nwfilter: tests name theirs
        # with the guest prefix and expect libvirt to hold none of them when they begin.
        for line in virsh("nwfilter-list").stdout.splitlines()[2:]:
            fields = line.split()
            if len(fields) == 2 and fields[1].startswith(GUEST_PREFIX):
                virsh("nwfilter-undefine", fields[1])

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of libvirtd's stdout/stderr."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- guests ---------------------------------------------------------------------------------

    def guest_xml(self, name: str, mac: str, metadata: str | None = None,
                  bridge: str = netlab.BRIDGE, uuid: str | None = None,
                  interface_extra: str = "", network_boot: bool = False) -> str:
        """Domain XML of a disk-less test guest (48 MiB, machine ``pc``, ``domain_type``) with
        one ``<interface type='bridge'>`` on ``bridge`` in the lab; ``metadata`` is inserted
        verbatim inside ``<metadata>``, ``interface_extra`` inside ``<interface>``.

        ``network_boot``: the guest boots from its NIC (``<boot dev='network'/>``, the NIC's
        iPXE ROM enabled), so SeaBIOS and iPXE send DHCP requests from the guest's MAC through
        its tap, again at every reset; always ``type='qemu'`` (TCG: under KVM on these hosts
        the firmware halts at once with an internal error)."""
        meta = f"  <metadata>\n{metadata}\n  </metadata>\n" if metadata else ""
        uuid_el = f"  <uuid>{uuid}</uuid>\n" if uuid else ""
        domain_type = "qemu" if network_boot else self.domain_type
        boot = "<boot dev='network'/>" if network_boot else ""
        rom = "" if network_boot else "      <rom enabled='no'/>\n"
        return (
            f"<domain type='{domain_type}'>\n"
            f"  <name>{name}</name>\n{uuid_el}{meta}"
            "  <memory unit='MiB'>48</memory>\n"
            "  <vcpu>1</vcpu>\n"
            f"  <os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>\n"
            "  <on_poweroff>destroy</on_poweroff>\n"
            "  <on_reboot>restart</on_reboot>\n"
            "  <on_crash>destroy</on_crash>\n"
            "  <devices>\n"
            "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
            "    <interface type='bridge'>\n"
            f"      <mac address={quoteattr(mac)}/>\n"
            f"      <source bridge={quoteattr(bridge)}/>\n"
            "      <model type='virtio'/>\n"
            f"{rom}"
            f"{interface_extra}"
            "    </interface>\n"
            "    <memballoon model='none'/>\n"
            "  </devices>\n"
            "</domain>\n"
        )

    def define_guest(self, name: str, mac: str, metadata: str | None = None,
                     xml: str | None = None, **kwargs) -> Guest:
        """Define (not start) a guest; ``name`` must start with ``nwft-``. ``xml`` overrides
        the generated :meth:`guest_xml` (other keyword arguments go to it)."""
        if not name.startswith(GUEST_PREFIX):
            raise ValueError(f"test guest names start with {GUEST_PREFIX!r}: {name!r}")
        xml = xml or self.guest_xml(name, mac, metadata=metadata, **kwargs)
        with tempfile.NamedTemporaryFile("w", suffix=".xml", dir=self._workdir,
                                         delete=False) as f:
            f.write(xml)
        virsh("define", f.name)
        guest = Guest(name=name, uuid=virsh("domuuid", name).stdout.strip(), mac=mac.lower())
        self.guests[name] = guest
        return guest

    def start_guest(self, name: str, mac: str, metadata: str | None = None,
                    paused: bool = False, **kwargs) -> Guest:
        """Define and start a guest (see :meth:`define_guest`); fills ``guest.tap``.
        ``paused``: its CPUs wait for ``virsh resume`` (the hooks have run, the tap exists)."""
        guest = self.guests.get(name) or self.define_guest(name, mac, metadata=metadata,
                                                           **kwargs)
        virsh("start", name, *(["--paused"] if paused else []))
        guest.tap = self.guest_tap(name)
        return guest

    def guest_tap(self, name: str) -> str | None:
        """The ``<target dev>`` of the guest's first interface in its live XML."""
        root = ET.fromstring(virsh("dumpxml", name).stdout)
        target = root.find("./devices/interface/target")
        return target.get("dev") if target is not None else None

    def remove_guest(self, name: str) -> None:
        """Destroy (if running) and undefine guest ``name``."""
        self._destroy_undefine(name)
        self.guests.pop(name, None)

    def _destroy_undefine(self, name: str) -> None:
        virsh("destroy", name, check=False)
        virsh("undefine", "--managed-save", name, check=False)

    # -- bindings -------------------------------------------------------------------------------

    def bindings(self) -> list[str]:
        """Ports that have a libvirt nwfilter binding (``virsh nwfilter-binding-list``)."""
        out = virsh("-q", "nwfilter-binding-list").stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def create_binding(self, port: str, mac: str, filter: str,
                       params: Mapping[str, str | Sequence[str]] | None = None,
                       owner: str = ORACLE_OWNER, owner_uuid: str | None = None) -> float:
        """``virsh nwfilter-binding-create`` of ``filter`` on ``port`` (libvirt's own engine);
        list values in ``params`` become repeated parameters. Returns the seconds it took."""
        xml = binding_xml(port, mac, filter, params, owner=owner,
                          owner_uuid=owner_uuid or str(uuidlib.uuid4()))
        with tempfile.NamedTemporaryFile("w", suffix=".xml", dir=self._workdir,
                                         delete=False) as f:
            f.write(xml)
        t0 = time.monotonic()
        virsh("nwfilter-binding-create", f.name)
        return time.monotonic() - t0

    def delete_binding(self, port: str, missing_ok: bool = False) -> None:
        """``virsh nwfilter-binding-delete PORT``."""
        virsh("nwfilter-binding-delete", port, check=not missing_ok)

    # -- stop -----------------------------------------------------------------------------------

    def _kill_pid(self, pid: int, grace: float = 15.0) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while _pid_alive_as(pid, "libvirtd") and time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                try:
                    self._proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.1)
        if _pid_alive_as(pid, "libvirtd"):
            os.kill(pid, signal.SIGKILL)
            if self._proc is not None and self._proc.pid == pid:
                self._proc.wait(timeout=10)

    def stop(self) -> None:
        """Tear everything down (idempotent); raises at the end if a step failed."""
        global _current
        errors: list[str] = []

        def step(what, func, *args):
            try:
                func(*args)
            except Exception as exc:
                errors.append(f"{what}: {exc}")

        if self.pid is not None and _pid_alive_as(self.pid, "libvirtd"):
            step("remove guests", self._remove_stale_guests)
            for port in self._safe_bindings(errors):
                step(f"delete binding {port}", self.delete_binding, port, True)
            step("stop libvirtd", self._kill_pid, self.pid)
        self.guests.clear()
        if self.pid is not None:
            self.pid = None
            PID_FILE.unlink(missing_ok=True)
        step("remove binding files", self._remove_binding_files)
        if self.hook_path is not None:
            step("remove hook", self.hook_path.unlink, True)
            self.hook_path = None
            if self._made_hook_dir:
                step("remove hook dir", HOOK_DIR.rmdir)
                self._made_hook_dir = False
        step("restore qemu.conf", self._restore_qemu_conf)
        if self.lab is not None:
            step("delete namespaces", self.lab.close)
        if self._restart_units:
            step("restart units", netlab.run, ["systemctl", "start", *self._restart_units])
            self._restart_units = []
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if _current is self:
            _current = None
        if errors:
            raise LibvirtdError("test libvirtd teardown incomplete:\n" + "\n".join(errors))

    def _safe_bindings(self, errors: list[str]) -> list[str]:
        try:
            return self.bindings()
        except Exception as exc:
            errors.append(f"list bindings: {exc}")
            return []


def binding_xml(port: str, mac: str, filter: str,
                params: Mapping[str, str | Sequence[str]] | None = None,
                owner: str = ORACLE_OWNER, owner_uuid: str | None = None) -> str:
    """A ``<filterbinding>`` document (libvirt-facts.md §2.1)."""
    lines = ["<filterbinding>", "  <owner>", f"    <name>{owner}</name>",
             f"    <uuid>{owner_uuid or uuidlib.uuid4()}</uuid>", "  </owner>",
             f"  <portdev name={quoteattr(port)}/>", f"  <mac address={quoteattr(mac)}/>",
             f"  <filterref filter={quoteattr(filter)}>"]
    for name, value in (params or {}).items():
        values = [value] if isinstance(value, str) else list(value)
        for v in values:
            lines.append(f"    <parameter name={quoteattr(name)} value={quoteattr(str(v))}/>")
    lines += ["  </filterref>", "</filterbinding>", ""]
    return "\n".join(lines)


def start_libvirtd(hook_script_text: str | None = None) -> Libvirtd:
    """Start the test libvirtd in a fresh lab namespace, with ``hook_script_text`` (if any)
    installed as ``/etc/libvirt/hooks/qemu.d/50-nwft-test`` first. Call ``.stop()`` after."""
    return Libvirtd(hook_script_text).start()


def current() -> Libvirtd:
    """The running test libvirtd (error if none)."""
    if _current is None:
        raise LibvirtdError("no test libvirtd is running (use the libvirtd fixture)")
    return _current


def libvirt_oracle_binding(lab: netlab.Lab, port: str, mac: str, filter: str,
                           params: Mapping[str, str | Sequence[str]] | None = None) -> float:
    """Instantiate ``filter`` on lab port ``port`` with libvirt's own engine (a
    ``virsh nwfilter-binding-create``); ``lab`` must be the test libvirtd's lab. Returns the
    seconds the creation took. Undo with :func:`libvirt_oracle_unbind`."""
    daemon = current()
    if daemon.lab is not lab:
        raise LibvirtdError("libvirt's engine only sees ports in the libvirtd lab "
                            "(use the libvirt_lab fixture)")
    return daemon.create_binding(port, mac, filter, params)


def libvirt_oracle_unbind(port: str, missing_ok: bool = False) -> None:
    """Delete libvirt's binding on ``port`` (``virsh nwfilter-binding-delete``)."""
    current().delete_binding(port, missing_ok=missing_ok)

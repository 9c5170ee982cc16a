"""The systemd unit of the resident service: its text, and installing, enabling and removing it.

``contrib/libvirt-nwfilterd.service`` is :func:`unit_text` for the packaged layout (the command
in ``/usr/bin``, default directories); ``install-hook`` writes the unit for the interpreter and
directories in effect (a unit test keeps the two equal). Processes (``systemctl``) run through
the executor.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from . import executor
from .backends.base import Step
from .config import DEFAULT_CONFDIR, DEFAULT_RUNDIR
from .errors import NwfilterError
from .files import write_atomically

UNIT_NAME = "libvirt-nwfilterd.service"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
PACKAGED_UNIT_DIRS = (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system"))  # the Debian package's
PACKAGED_COMMAND = "/usr/bin/libvirt-nwfilterd"
MARKER = "# libvirt-nwfilter service unit"


def unit_text(command: list[str], confdir: str = str(DEFAULT_CONFDIR), rundir: str = str(DEFAULT_RUNDIR),
              backend: str | None = None) -> str:
    """The unit: restarted on failure, ordered before libvirtd (its hooks find the socket) but
    needing nothing: it waits for libvirtd and reconnects when libvirtd restarts."""
    environment = []
    if confdir != str(DEFAULT_CONFDIR):
        environment.append(f"LIBVIRT_NWFILTER_CONFDIR={confdir}")
    if rundir != str(DEFAULT_RUNDIR):
        environment.append(f"LIBVIRT_NWFILTER_RUNDIR={rundir}")
    if backend:
        environment.append(f"LIBVIRT_NWFILTER_BACKEND={backend}")
    lines = [
        MARKER,
        "[Unit]",
        "Description=libvirt-nwfilter service: hot-plug, live metadata, self-healing, fast path",
        "Documentation=man:libvirt-nwfilterd(8)",
        "After=network-pre.target",
        "Before=libvirtd.service virtqemud.service",
        "",
        "[Service]",
        "Type=simple",
        *(f"Environment={shlex.quote(item)}" for item in environment),
        f"ExecStart={shlex.join(command)}",
        "Restart=on-failure",
        "RestartSec=2",
        "TimeoutStopSec=45",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def systemd_runs() -> bool:
    return Path("/run/systemd/system").is_dir()


def packaged_unit() -> Path | None:
    """The unit the Debian package installed, if any."""
    for directory in PACKAGED_UNIT_DIRS:
        if _ours(directory / UNIT_NAME):
            return directory / UNIT_NAME
    return None


def _ours(path: Path) -> bool:
    return path.is_file() and MARKER in path.read_text(encoding="utf-8", errors="replace")


def install(unit_dir: Path, text: str) -> tuple[Path, bool]:
    """Write the unit (unless the package installed one and ``unit_dir`` has none of ours);
    where systemd runs, reload it and enable and (re)start the service. Returns (the unit's
    path, whether systemd enabled it)."""
    path = Path(unit_dir) / UNIT_NAME
    packaged = packaged_unit()
    if path.exists() and not _ours(path):
        raise NwfilterError(f"{path} exists and was not written by libvirt-nwfilter; not overwritten")
    if packaged is not None and not path.exists():
        path = packaged
    else:
        write_atomically(path, text, mode=0o644)
    if not systemd_runs():
        return path, False
    _systemctl("daemon-reload")
    _systemctl("enable", UNIT_NAME)
    _systemctl("restart", UNIT_NAME)
    return path, True


def uninstall(unit_dir: Path) -> Path | None:
    """Stop, disable and remove our unit (None when there is none of ours)."""
    path = Path(unit_dir) / UNIT_NAME
    if not _ours(path):
        return None
    if systemd_runs():
        _systemctl("disable", "--now", UNIT_NAME)
    path.unlink()
    if systemd_runs():
        _systemctl("daemon-reload")
    return path


def _systemctl(*args: str) -> None:
    result = executor.run(Step(("systemctl", *args)))
    if result.returncode != 0:
        detail = " ".join((result.stderr or result.stdout).split()) or f"exit status {result.returncode}"
        raise NwfilterError(f"systemctl {' '.join(args)} failed: {detail}")

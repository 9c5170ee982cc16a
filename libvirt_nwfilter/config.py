"""Where things live and which backend to use: defaults, environment, options (in that order)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_CONFDIR = Path("/etc/libvirt-nwfilter")
DEFAULT_RUNDIR = Path("/run/libvirt-nwfilter")
BACKENDS = ("nftables", "ebiptables")
DEFAULT_BACKEND = "nftables"
CONFIG_FILE = "libvirt-nwfilter.conf"


@dataclass(frozen=True)
class Config:
    confdir: Path = DEFAULT_CONFDIR
    rundir: Path = DEFAULT_RUNDIR
    backend: str = DEFAULT_BACKEND

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> "Config":
        env = os.environ if environ is None else environ
        confdir = Path(env.get("LIBVIRT_NWFILTER_CONFDIR") or DEFAULT_CONFDIR)
        rundir = Path(env.get("LIBVIRT_NWFILTER_RUNDIR") or DEFAULT_RUNDIR)
        backend = env.get("LIBVIRT_NWFILTER_BACKEND") or _configured_backend(confdir) or DEFAULT_BACKEND
        return cls(confdir, rundir, backend)

    def with_overrides(self, confdir: str | None = None, rundir: str | None = None,
                       backend: str | None = None) -> "Config":
        return replace(self, confdir=Path(confdir) if confdir else self.confdir,
                       rundir=Path(rundir) if rundir else self.rundir, backend=backend or self.backend)


def _configured_backend(confdir: Path) -> str | None:
    """The ``backend = NAME`` line of ``$CONFDIR/libvirt-nwfilter.conf``, if any."""
    path = confdir / CONFIG_FILE
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "backend" and value.strip():
            return value.strip()
    return None

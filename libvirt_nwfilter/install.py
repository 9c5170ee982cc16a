"""Installing the qemu hook: a small wrapper in libvirt's hook directory (file operations only).

libvirtd runs hooks with an almost empty environment (libvirt-facts.md §1.1), so the wrapper
carries the settings in effect at install time (DESIGN.md, contract): it exports
``LIBVIRT_NWFILTER_CONFDIR``, ``LIBVIRT_NWFILTER_RUNDIR`` (and the backend when one was chosen
explicitly) and execs the thin hook client (:func:`client.hook_main`) with the absolute
interpreter the package runs under, in isolated mode without ``site`` (``-I -S``: no ``PYTHON*``
variables, no current directory on the module path, the fastest start) and the directory that
holds the package on the module path. The client hands the call to the resident service when
its socket answers and otherwise runs the hook in-process (loading ``site`` then).

Two layouts:

* ``HOOKS_DIR/qemu.d/libvirt-nwfilter`` (libvirt >= 6.5.0; the default): libvirt runs every
  executable in ``qemu.d`` after the main script, so other hooks are untouched;
* ``HOOKS_DIR/qemu`` (``single_file``, for older libvirt): the main script itself, never
  written over a script that is not ours.

Ours are recognised by :data:`MARKER` on their second line. Only one of the two is kept.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from .errors import NwfilterError
from .files import write_atomically

DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
HOOK_NAME = "libvirt-nwfilter"
MARKER = "# libvirt-nwfilter qemu hook wrapper"
MODE = 0o755


@dataclass(frozen=True)
class HookSettings:
    """What the installed wrapper carries. ``backend`` None: the configuration file decides
    at each run; ``log_file``: also log to this file (``LIBVIRT_NWFILTER_HOOK_LOG``)."""

    python: str
    confdir: str
    rundir: str
    backend: str | None = None
    log_file: str | None = None
    package_dir: str = str(Path(__file__).resolve().parent.parent)  # holds libvirt_nwfilter/
    service_timeout: str | None = None  # LIBVIRT_NWFILTER_SERVICE_TIMEOUT


@dataclass(frozen=True)
class InstallResult:
    path: Path
    replaced: bool  # an older wrapper of ours was there
    removed: tuple[Path, ...]  # our wrapper in the other layout, removed
    other_hooks: tuple[Path, ...]  # qemu hooks that are not ours (libvirtd already knew a hook)


def dropin_path(hooks_dir: Path) -> Path:
    return Path(hooks_dir) / "qemu.d" / HOOK_NAME


def single_path(hooks_dir: Path) -> Path:
    return Path(hooks_dir) / "qemu"


def wrapper_text(settings: HookSettings) -> str:
    """The wrapper script."""
    for name, value in (("interpreter", settings.python), ("configuration directory", settings.confdir),
                        ("run directory", settings.rundir), ("package directory", settings.package_dir)):
        if not os.path.isabs(value):
            raise NwfilterError(f"the {name} must be an absolute path, not '{value}'")
    env = [("LIBVIRT_NWFILTER_CONFDIR", settings.confdir), ("LIBVIRT_NWFILTER_RUNDIR", settings.rundir)]
    if settings.backend:
        env.append(("LIBVIRT_NWFILTER_BACKEND", settings.backend))
    if settings.log_file:
        env.append(("LIBVIRT_NWFILTER_HOOK_LOG", settings.log_file))
    if settings.service_timeout:
        env.append(("LIBVIRT_NWFILTER_SERVICE_TIMEOUT", settings.service_timeout))
    lines = [
        "#!/bin/sh",
        MARKER,
        "# Written by 'libvirt-nwfilter install-hook'; remove it with 'libvirt-nwfilter uninstall-hook'.",
        "# libvirtd runs hooks with an almost empty environment: the settings in effect at install",
        "# time are kept here. Install again to change them.",
    ]
    lines += [f"{key}={shlex.quote(value)}" for key, value in env]
    lines.append("export " + " ".join(key for key, _ in env))
    code = (f"import sys; sys.path.append({json.dumps(settings.package_dir)}); "
            "from libvirt_nwfilter.client import hook_main; sys.exit(hook_main())")
    lines.append(f'exec {shlex.quote(settings.python)} -I -S -c {shlex.quote(code)} "$@"')
    return "\n".join(lines) + "\n"


def is_ours(path: Path) -> bool:
    """True when ``path`` is a wrapper written by :func:`install`."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return MARKER.encode() in head.splitlines()[:3]


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def existing_hooks(hooks_dir: Path) -> tuple[Path, ...]:
    """qemu hooks libvirtd would run that are not ours."""
    found = []
    main = single_path(hooks_dir)
    if _executable(main) and not is_ours(main):
        found.append(main)
    dropins = Path(hooks_dir) / "qemu.d"
    if dropins.is_dir():
        found += [p for p in sorted(dropins.iterdir()) if _executable(p) and not is_ours(p)]
    return tuple(found)


def install(hooks_dir: Path, settings: HookSettings, single_file: bool = False) -> InstallResult:
    """Write the wrapper (atomically, mode 0755); refuse to overwrite a hook that is not ours."""
    hooks_dir = Path(hooks_dir)
    path = single_path(hooks_dir) if single_file else dropin_path(hooks_dir)
    other = dropin_path(hooks_dir) if single_file else single_path(hooks_dir)
    text = wrapper_text(settings)
    if path.is_dir():
        raise NwfilterError(f"{path} is a directory")
    if path.exists() and not is_ours(path):
        raise NwfilterError(f"{path} exists and is not a libvirt-nwfilter hook; not overwritten "
                            + ("(merge it by hand, or use the qemu.d directory without --single-file)"
                               if single_file else "(remove or rename it first)"))
    others = existing_hooks(hooks_dir)
    replaced = path.exists()
    try:
        write_atomically(path, text, mode=MODE)
        removed = []
        if other.exists() and is_ours(other):
            other.unlink()
            removed.append(other)
    except OSError as error:
        raise NwfilterError(f"cannot install {path}: {error.strerror or error}") from None
    return InstallResult(path, replaced, tuple(removed), others)


def uninstall(hooks_dir: Path) -> tuple[Path, ...]:
    """Remove our wrapper from both layouts; returns what was removed (foreign hooks stay)."""
    removed = []
    for path in (dropin_path(hooks_dir), single_path(hooks_dir)):
        if path.is_file() and is_ours(path):
            try:
                path.unlink()
            except OSError as error:
                raise NwfilterError(f"cannot remove {path}: {error.strerror or error}") from None
            removed.append(path)
    return tuple(removed)

"""The verbs that set a host up: ``install-hook`` (the qemu hook and the resident service's
systemd unit) and ``uninstall-hook`` (both removed). Handlers are ``func(service, args)``
returning the exit status; they always run in-process (the thin client never sends them to
the service they install or remove).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import install, unit

if TYPE_CHECKING:
    from .service import Service

EXIT_OK = 0


def _install_service(args: argparse.Namespace, settings) -> None:
    """The resident service: its unit installed, enabled and started where systemd runs."""
    if args.no_service:
        return
    command = [settings.python, "-m", "libvirt_nwfilter.daemon"]
    text = unit.unit_text(command, settings.confdir, settings.rundir, settings.backend)
    path, enabled = unit.install(Path(args.unit_dir), text)
    if enabled:
        print(f"Installed, enabled and started the service {unit.UNIT_NAME} ({path})")
        return
    print(f"Installed the service unit {path}; systemd does not run here, so it was not enabled: start "
          f"the service with '{shlex.join(command)}' (it runs in the foreground; as root, in libvirtd's "
          "network namespace). Without it the hook and the command work as before, in-process.")


def cmd_install_hook(service: "Service", args: argparse.Namespace) -> int:
    config = service.config
    backend = getattr(args, "backend", None) or os.environ.get("LIBVIRT_NWFILTER_BACKEND") or None
    settings = install.HookSettings(
        python=args.python or sys.executable,
        confdir=os.path.abspath(config.confdir),
        rundir=os.path.abspath(config.rundir),
        backend=backend,
        log_file=os.path.abspath(args.log_file) if args.log_file else None,
    )
    result = install.install(Path(args.hooks_dir), settings, single_file=args.single_file)
    verb = "Replaced" if result.replaced else "Installed"
    print(f"{verb} the qemu hook {result.path}")
    print(f"  interpreter:             {settings.python}")
    print(f"  configuration directory: {settings.confdir}")
    print(f"  run directory:           {settings.rundir}")
    if settings.backend:
        print(f"  backend:                 {settings.backend}")
    else:
        print(f"  backend:                 from {settings.confdir}/libvirt-nwfilter.conf at each run "
              f"(now: {config.backend})")
    if settings.log_file:
        print(f"  log file:                {settings.log_file}")
    for path in result.removed:
        print(f"Removed the previous libvirt-nwfilter hook {path}")
    _install_service(args, settings)
    if not result.replaced:
        print("note: libvirtd looks for hooks only when it starts (or reloads): restart it "
              "(e.g. 'systemctl restart libvirtd', or virtqemud with modular daemons) unless a qemu "
              "hook already existed when it started"
              + (f" (found: {', '.join(map(str, result.other_hooks))})" if result.other_hooks else "")
              + ". Guests that are already running get their filters with "
              "'libvirt-nwfilter reapply --all'.")
    return EXIT_OK


def cmd_uninstall_hook(service: "Service", args: argparse.Namespace) -> int:
    removed = install.uninstall(Path(args.hooks_dir))
    if not args.no_service:
        unit_path = unit.uninstall(Path(args.unit_dir))
        if unit_path is not None:
            print(f"Removed the service unit {unit_path}" + (" (stopped and disabled)" if unit.systemd_runs() else ""))
    if not removed:
        print(f"No libvirt-nwfilter hook is installed in {args.hooks_dir}")
        return EXIT_OK
    for path in removed:
        print(f"Removed the qemu hook {path}")
    print("note: bindings of running guests stay applied, and are no longer removed when the guests "
          "stop; see 'libvirt-nwfilter binding-list' and 'binding-delete'.")
    return EXIT_OK



# ------------------------------------------------------------------------------------------
# Registration


def register(sub, verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Add install-hook and uninstall-hook to the ``libvirt-nwfilter`` sub-command parser."""
    from .install import DEFAULT_HOOKS_DIR, HOOK_NAME

    p = verb(sub, "install-hook", cmd_install_hook, "Install the libvirt qemu hook.",
             f"Writes a small executable {DEFAULT_HOOKS_DIR}/qemu.d/{HOOK_NAME} (libvirt >= 6.5.0 runs\n"
             "every executable there after the main 'qemu' hook) that runs this package's hook with\n"
             "the Python interpreter it is installed for. libvirtd runs hooks with an almost empty\n"
             "environment, so the wrapper carries the configuration directory, the run directory and\n"
             "(when chosen with --backend or LIBVIRT_NWFILTER_BACKEND) the backend in effect now; run\n"
             "install-hook again after changing them. Without an explicit backend, the hook reads\n"
             "CONFDIR/libvirt-nwfilter.conf at each run.\n\n"
             "libvirtd discovers hooks when it starts: restart it (or reload it) after installing the\n"
             "first hook. Guests running already are filtered by 'reapply --all'.\n\n"
             "With --single-file the wrapper becomes the main hook script HOOKS_DIR/qemu (for libvirt\n"
             "older than 6.5.0); an existing script that is not ours is never overwritten. Installing\n"
             "one layout removes our wrapper from the other.\n\n"
             f"It also installs the resident service's systemd unit {unit.DEFAULT_UNIT_DIR}/{unit.UNIT_NAME}\n"
             "(libvirt-nwfilterd, with the same interpreter and directories) and, where systemd runs,\n"
             "enables and starts it; where it does not (containers), it says how to start the service.\n"
             "--no-service leaves the unit alone.")
    p.add_argument("--hooks-dir", metavar="DIR", default=str(DEFAULT_HOOKS_DIR),
                   help=f"libvirt's hook directory (default {DEFAULT_HOOKS_DIR})")
    p.add_argument("--single-file", action="store_true", help="install as HOOKS_DIR/qemu (libvirt < 6.5.0)")
    p.add_argument("--log-file", metavar="FILE",
                   help="also log the hook's actions to FILE (besides syslog, when /dev/log exists)")
    p.add_argument("--python", metavar="PATH", help=argparse.SUPPRESS)
    _service_options(p)

    p = verb(sub, "uninstall-hook", cmd_uninstall_hook, "Remove the libvirt qemu hook.",
             "Removes the wrapper written by install-hook (from qemu.d and, when ours, the main 'qemu'\n"
             "script) and the resident service's unit (stopped and disabled first where systemd\n"
             "runs). Hook scripts and units that are not ours are left alone. Bindings stay applied.")
    p.add_argument("--hooks-dir", metavar="DIR", default=str(DEFAULT_HOOKS_DIR),
                   help=f"libvirt's hook directory (default {DEFAULT_HOOKS_DIR})")
    _service_options(p)


def _service_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unit-dir", metavar="DIR", default=str(unit.DEFAULT_UNIT_DIR),
                        help=f"where the service unit goes (default {unit.DEFAULT_UNIT_DIR})")
    parser.add_argument("--no-service", action="store_true", help="leave the resident service's unit alone")


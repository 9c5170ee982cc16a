"""``libvirt-nwfilterd``: the resident service (foreground; systemd unit in contrib/).

Exit status: 0 after SIGTERM/SIGINT, 1 when it cannot start, 2 wrong usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..cli import add_config_options
from ..config import Config
from ..errors import NwfilterError
from . import protocol, server

if TYPE_CHECKING:
    from .warm import Warmer

log = logging.getLogger("libvirt_nwfilter.daemon")

DEFAULT_URI = "qemu:///system"
DEFAULT_HEAL_INTERVAL = 30.0

DESCRIPTION = """\
The resident service of libvirt-nwfilter: hot-plug, live metadata edits, self-healing, IP
address learning, and a fast path for the hook and the command. What it adds:

  * a fast path: the 'libvirt-nwfilter' command and the qemu hook hand their requests to the
    service over RUNDIR/libvirt-nwfilterd.sock (root only) instead of starting Python anew;
    the same code runs them, with the same output and exit status;
  * libvirt events: an interface hot-plugged into a running guest whose metadata names its
    MAC is filtered (and detached again when its filter cannot be instantiated); an
    unplugged interface loses its binding; a change of a running guest's libvirt-nwfilter
    metadata is applied at once, all or nothing;
  * self-healing: a change to our firewall rules that the service did not make (nft flush
    ruleset, a firewall reload) is repaired by rebuilding every binding in one transaction;
  * IP address learning: a port whose filter needs IP without a value (CTRL_IP_LEARNING any,
    the default, or dhcp) holds the learning-time rules while the service watches its
    traffic (raw sockets, rate-limited); the first address seen (any), or each DHCP lease
    acknowledged by a trusted server (dhcp, DHCPSERVER), is applied with the full filter;
    released, declined and expired leases are removed. IPV6 without a value is learned the
    same way: from the guest's duplicate address detection probes and from DHCPv6 replies of
    trusted servers (DHCPSERVERV6), at most ipv6-learning-limit addresses a port.

Everything else works without it: the clients run in-process when its socket does not answer
(a binding that would learn its address is refused then: give IP, or start the service).
Records, host lock and journal in RUNDIR stay the only truth: the service keeps no state of
its own that another process could miss."""

EPILOG = """\
environment:
  LIBVIRT_NWFILTER_CONFDIR, LIBVIRT_NWFILTER_RUNDIR, LIBVIRT_NWFILTER_BACKEND as for
  libvirt-nwfilter(8); the options override them.

exit status:
  0 stopped by SIGTERM or SIGINT; 1 could not start; 2 wrong usage."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="libvirt-nwfilterd", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser)
    parser.add_argument("-c", "--connect", metavar="URI", default=DEFAULT_URI,
                        help=f"libvirt connection URI (default {DEFAULT_URI})")
    parser.add_argument("--no-libvirt", action="store_true",
                        help="do not connect to libvirt (no hot-plug or metadata events)")
    parser.add_argument("--no-heal", action="store_true", help="do not watch and repair the firewall rules")
    parser.add_argument("--heal-interval", metavar="SECONDS", type=_positive, default=DEFAULT_HEAL_INTERVAL,
                        help="ebiptables backend: seconds between checks of the rules "
                        f"(default {DEFAULT_HEAL_INTERVAL:g}); nftables is watched continuously")
    parser.add_argument("--max-request", metavar="BYTES", type=_positive_int, default=protocol.DEFAULT_MAX_REQUEST,
                        help="largest request accepted on the socket: command line and environment; "
                        f"standard input (domain XML) is read directly (default {protocol.DEFAULT_MAX_REQUEST})")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    return parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive integer")
    return int(text)


def _preload(config: Config) -> "Warmer":
    """Import, probe and compile every recorded binding once, so that forked requests start warm;
    the warmer keeps them so (the server runs it when idle)."""
    from .. import cli, hook  # noqa: F401 - the entry points requests run
    from .. import domain, install, resolve, compiler  # noqa: F401 - what they import lazily
    from ..backends.nftables import notices  # noqa: F401 - read by the hook's reconnect
    from . import knowledge  # noqa: F401 - read by the hook's reconnect
    from .. import executor
    from ..service import Service
    from .warm import Warmer

    executor.use_nft_library()
    warm_up = Service(config).backend.warm_up_steps()  # imports the backend, probes the kernel (cached per boot)
    cli.build_parser()
    warmer = Warmer(config, warm_up)
    warmer.run()
    return warmer


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s libvirt-nwfilterd: %(levelname)s: %(message)s")
    try:
        config = Config.load(confdir=args.confdir, rundir=args.rundir, backend=args.backend)
        rundir = Path(os.path.abspath(config.rundir))
        with server.single_instance(rundir):
            warmer = _preload(config)
            from .watcher import Watcher

            watcher = Watcher(config, args, started=time.time())
            sock = server.listen(rundir)
            log.info("listening on %s (backend %s)", protocol.socket_path(str(rundir)), config.backend)
            server.Server(sock, args.max_request, watcher.run, warmer.step, lambda: warmer.passes,
                          warmer.ready_spare).serve()
            log.info("stopped")
            return 0
    except (server.ServiceError, NwfilterError) as error:
        log.error("%s", error)
        return 1

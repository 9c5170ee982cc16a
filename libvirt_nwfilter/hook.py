"""The libvirt qemu hook: ``qemu GUEST OPERATION SUB-OPERATION EXTRA``, domain XML on stdin.

libvirtd runs it synchronously for every guest operation and waits for it, so it never calls
the libvirt API (a deadlock) and imports only what the operation needs. Operations
(DESIGN.md "Hook operations", libvirt-facts.md §1.2):

``prepare``            resolve and compile every filtered interface; refuse the start early.
``start``              instantiate every filtered interface on its ``<target dev>``, all or
                       nothing (the taps exist, QEMU has not run yet); an interface whose
                       address is learned gets the learning-time rules and the resident service
                       learns it (refused when the service does not run).
``stopped``/``release`` remove every binding the guest owns, found by its UUID in our state,
                       with the addresses learned; never fails.
(When the kernel refuses a change because our rules were altered behind our back, ``start``
repairs with ``Service.sync`` and the teardown re-instantiates the recorded rules with
``Service.reapply`` before trying once more.)
``reconnect``/``attach`` make the kernel match the guest again (libvirtd restarted); a failure
                       makes libvirtd kill the guest, as for libvirt's own filters.
``migrate``/``restore``  check that the referenced filters exist here and the parameters are
                       valid; echo the XML unchanged on stdout.
anything else          exit 0 at once.

A refusal is one line on stderr (libvirt shows it in the failed operation's error) and exit
status 1. Everything else goes to syslog (``/dev/log``, ident ``libvirt-nwfilter-hook``) and,
when ``LIBVIRT_NWFILTER_HOOK_LOG`` names a file, to that file. Configuration comes from the
``LIBVIRT_NWFILTER_*`` variables that the installed wrapper sets (``install-hook``).

Metadata entries for MACs the guest has no interface with (yet) prepare a hot-plug: they never
refuse an operation (their problems are logged at ``prepare`` and ``start``). Interface
hot-plug runs no hook: the resident service filters the new interface (libvirt's device-added
event); without it, ``libvirt-nwfilter reapply DOMAIN`` does.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, BinaryIO, Sequence, TextIO

from .config import Config
from .errors import NwfilterError

if TYPE_CHECKING:  # imported lazily: the hook must start fast
    from .domain import Domain
    from .service import Service

log = logging.getLogger("libvirt_nwfilter.hook")

EXIT_OK, EXIT_REFUSED = 0, 1
PREFIX = "libvirt-nwfilter"
SYSLOG_IDENT = "libvirt-nwfilter-hook"
SYSLOG_SOCKET = "/dev/log"
LOG_FILE_VARIABLE = "LIBVIRT_NWFILTER_HOOK_LOG"

CHECK_OPERATIONS = ("prepare",)
START_OPERATIONS = ("start",)
STOP_OPERATIONS = ("stopped", "release")
SYNC_OPERATIONS = ("reconnect", "attach")
FILTER_OPERATIONS = ("migrate", "restore")
OPERATIONS = CHECK_OPERATIONS + START_OPERATIONS + STOP_OPERATIONS + SYNC_OPERATIONS + FILTER_OPERATIONS

USAGE = "usage: qemu GUEST OPERATION SUB-OPERATION EXTRA (domain XML on standard input)"
HELP = f"""\
{USAGE}

libvirt's qemu hook of libvirt-nwfilter. libvirtd runs it for every guest operation, with the
guest's domain XML on standard input, and waits for it. It filters each interface that names a
filter in the guest's libvirt-nwfilter metadata; guests without such metadata are left alone
(never refused, whatever the size of their XML). It waits at most hook-lock-timeout seconds
(CONFDIR/libvirt-nwfilter.conf, default 10) for the host lock, then refuses naming its holder.
Interface hot-plug runs no hook: 'libvirt-nwfilter reapply GUEST' filters a new interface.

operations:
  prepare            check every filtered interface's filter and parameters; refuse the
                     start early
  start              filter every filtered interface on its tap, all or nothing; when a
                     filter needs IP and none is given (CTRL_IP_LEARNING any, the default,
                     or dhcp), the tap gets the learning-time rules and libvirt-nwfilterd
                     learns the address (refused when the service does not run)
  stopped, release   remove every binding the guest owns, and forget the addresses learned
                     (never fails)
  reconnect, attach  make the rules match the guest again (libvirtd restarted)
  migrate, restore   check that the filters exist here; print the domain XML unchanged
  others             nothing (exit status 0)

exit status:
  0  done, or nothing to do
  1  the operation is refused: one line on standard error, which libvirt shows as the error of
     the operation (a guest does not start)

environment:
  LIBVIRT_NWFILTER_CONFDIR    configuration directory (default /etc/libvirt-nwfilter)
  LIBVIRT_NWFILTER_RUNDIR     run-time state directory (default /run/libvirt-nwfilter)
  LIBVIRT_NWFILTER_BACKEND    firewall backend: nftables (default) or ebiptables
  LIBVIRT_NWFILTER_HOOK_LOCK_TIMEOUT
                              seconds to wait for the host lock (default 10)
  {LOG_FILE_VARIABLE}   also log to this file

logging:
  Everything but a refusal goes to syslog (facility daemon, identifier {SYSLOG_IDENT}) and to
  {LOG_FILE_VARIABLE} when set. libvirtd runs hooks with an almost empty environment:
  the wrapper that 'libvirt-nwfilter install-hook' writes sets these variables."""


class Refusal(Exception):
    """The operation must fail: one line for libvirt's error message."""


# ------------------------------------------------------------------------------------------
# Seams (replaced in unit tests)


def make_service(config: Config) -> "Service":
    from .service import Service

    return Service(config)


def has_bindings(config: Config, owner_uuid: str | None = None, ports: Sequence[str] = ()) -> bool:
    """Whether our state may hold a binding on one of ``ports`` or owned by ``owner_uuid``
    (the state's index), read without the lock and without importing the service: a quick way
    out for guests we have nothing to do for. True when in doubt: an interrupted change is
    pending (the index may be behind) or a record cannot be read."""
    from .journal import Journal
    from .state import State

    if Journal(config.rundir).exists():
        return True
    state = State(config.rundir)
    try:
        if any(state.get(port) is not None for port in ports):
            return True
        return owner_uuid is not None and bool(state.owned_ports(owner_uuid))
    except NwfilterError:
        return True


# ------------------------------------------------------------------------------------------
# Operations


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def sync_domain(service: "Service", domain: "Domain", repair: bool = False) -> tuple[list[str], list[str]]:
    """Make the kernel match ``domain`` (a running guest's live XML) and return (the ports
    filtered, the ports unbound).

    Every filtered interface is bound on its tap, all or nothing: with ``bind_owner`` at a
    start (new taps), with ``Service.sync`` when ``repair`` (reconnect, the CLI's reapply: intact
    ports are skipped, rules that drifted or vanished are rebuilt). Then stale bindings are
    removed (a failure there is logged only): any binding left on one of the guest's other taps
    (a guest that went away without a ``stopped`` hook) and, when ``repair``, the bindings the
    guest owns on ports it no longer has (hot-unplug). Shared with the CLI's ``reapply`` and domain-editing commands."""
    from .domain import to_bindings

    bindings = to_bindings(domain)
    if bindings:
        if repair:
            service.sync(bindings)
        else:
            service.bind_owner(bindings)  # rebuilds everything if our recorded rules were wiped
    bound = {b.portdev for b in bindings}
    taps = {i.target for i in domain.interfaces if i.target}
    ports = taps - bound
    if repair:  # every binding of the guest, wherever it is (found in the state's index)
        ports |= set(service.state.owned_ports(domain.uuid)) - bound
    candidates = [a for a in (_binding_on(service, port) for port in sorted(ports)) if a is not None]
    stale = []
    for applied in candidates:
        port, owner = applied.binding.portdev, applied.binding.owner_uuid
        if port in bound:
            continue
        if owner != domain.uuid:
            log.warning("port %s: removing a stale binding of '%s' (%s)", port, applied.binding.owner_name, owner)
        stale.append(port)
    if stale:
        try:
            service.remove_bindings(stale)
        except NwfilterError as error:
            log.warning("stale bindings on %s not removed: %s", ", ".join(stale), error)
            stale = []
    return sorted(bound), stale


def _binding_on(service: "Service", port: str):
    try:
        return service.binding(port)
    except NwfilterError:
        return None


def _parse(stdin: bytes) -> "Domain":
    from .domain import parse_domain

    return parse_domain(stdin, "domain XML")


def _check(service: "Service", domain: "Domain", require_target: bool) -> None:
    """Resolve and compile each filtered interface; Refusal naming the first that fails."""
    from .domain import to_bindings

    for binding in to_bindings(domain, require_target=require_target):
        try:
            service.check([binding])
        except NwfilterError as error:
            raise Refusal(f"domain '{domain.name}': interface {binding.mac}: {_one_line(error)}") from None


def _log_native(domain: "Domain") -> None:
    for interface in domain.interfaces:
        if interface.native_filterref and interface.filterref is None:
            log.info("interface %s has libvirt's own <filterref>: left to libvirt", interface.mac)
        elif interface.native_filterref:
            log.warning("interface %s has libvirt's own <filterref>: left to libvirt; our metadata entry "
                        "for it is ignored", interface.mac)


def _log_absent(domain: "Domain", service: "Service | None" = None) -> None:
    """Entries for MACs the guest has no interface with (yet) refuse nothing: their problems
    (and, given ``service``, those resolving their filters) are logged; they refuse the
    hot-plug of that interface only."""
    from .model import Binding

    for entry in domain.absent:
        problems = list(entry.problems)
        if service is not None and entry.filterref is not None:
            try:
                service.check([Binding(domain.name, domain.uuid, "", entry.mac, entry.filterref)])
            except NwfilterError as error:
                problems.append(_one_line(error))
        if problems:
            log.warning("interface %s (not present) named in the metadata: attaching it will be refused: %s",
                        entry.mac, "; ".join(problems))
        else:
            log.info("interface %s (not present) named in the metadata: filtered when it is attached", entry.mac)


def op_check(config: Config, stdin: bytes, require_target: bool) -> None:
    """``prepare`` (and the check of ``migrate``/``restore``)."""
    domain = _parse(stdin)
    _log_native(domain)
    if not domain.filtered and not domain.absent:
        log.debug("no interface filtered by libvirt-nwfilter")
        return
    service = make_service(config)
    _log_absent(domain, service)
    _check(service, domain, require_target)
    log.info("filters of %d interface(s) checked", len(domain.filtered))


def op_start(config: Config, stdin: bytes, repair: bool = False) -> None:
    """``start`` and (``repair``) ``reconnect``/``attach``: instantiate every filtered interface."""
    domain = _parse(stdin)
    _log_native(domain)
    _log_absent(domain)
    taps = [i.target for i in domain.interfaces if i.target]
    if not domain.filtered and not has_bindings(config, domain.uuid if repair else None, taps):
        log.debug("no interface filtered by libvirt-nwfilter")
        return
    service = None
    try:
        service = make_service(config)
        bound, removed = sync_domain(service, domain, repair)
    except Exception as error:  # noqa: BLE001 - a guest we do not filter is never refused
        if not domain.filtered:
            log.error("stale bindings on the ports of this guest not checked: %s", _one_line(error),
                      exc_info=not isinstance(error, NwfilterError))
            return
        if not isinstance(error, NwfilterError):
            raise
        if service is not None:
            _check(service, domain, require_target=True)  # names the interface when it is the filter
        raise Refusal(f"domain '{domain.name}': {_one_line(error)}") from None
    for interface in domain.filtered:
        log.info("interface %s: port %s filtered by '%s'", interface.mac, interface.target,
                 interface.filterref.filter)
    for port in removed:
        log.info("port %s: stale binding removed", port)


def op_stop(config: Config, stdin: bytes) -> None:
    """``stopped``/``release``: remove the guest's bindings; errors are logged only."""
    from .domain import parse_identity

    _, uuid = parse_identity(stdin, "domain XML")
    if not has_bindings(config, uuid):
        log.debug("no bindings owned by %s", uuid)
        return
    ports = make_service(config).unbind_owner(uuid)  # rebuilds the rest if our rules were wiped
    log.info("bindings removed from %s", ", ".join(ports) if ports else "no port")


def run(argv: Sequence[str], stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO,
        config: Config | None = None) -> int:
    """Run one hook call; returns the exit status (logging is left as the caller set it)."""
    if len(argv) < 2:
        print(f"{PREFIX}: {USAGE}", file=stderr)
        return EXIT_REFUSED
    operation = argv[1]
    if operation not in OPERATIONS:
        return EXIT_OK
    try:
        data = stdin.read()
    except OSError as error:
        data = b""
        log.error("cannot read the domain XML: %s", error)
    try:
        config = (config or Config.load(strict=False)).for_hook()
        if operation in STOP_OPERATIONS:
            op_stop(config, data)
        elif operation in CHECK_OPERATIONS:
            op_check(config, data, require_target=False)
        elif operation in START_OPERATIONS:
            op_start(config, data)
        elif operation in SYNC_OPERATIONS:
            op_start(config, data, repair=True)
        elif operation in FILTER_OPERATIONS:
            op_check(config, data, require_target=False)
            stdout.write(data)
            stdout.flush()
        return EXIT_OK
    except Exception as error:  # noqa: BLE001 - one line for libvirt, the rest to the log
        if operation in STOP_OPERATIONS:
            log.error("teardown failed (ignored): %s", _one_line(error), exc_info=not isinstance(error, NwfilterError))
            return EXIT_OK
        if isinstance(error, Refusal):
            message = str(error)
        elif isinstance(error, NwfilterError):
            message = _one_line(error)
        else:
            log.error("internal error", exc_info=True)
            message = f"internal error: {type(error).__name__}: {_one_line(error)}"
        log.error("%s refused: %s", operation, message)
        print(f"{PREFIX}: {message}", file=stderr)
        stderr.flush()
        return EXIT_REFUSED


def _setup_logging(guest: str, operation: str) -> None:
    """Log to syslog (when ``/dev/log`` exists) and the optional log file; never to stderr,
    which libvirt turns into the error message of a failed operation."""
    root = logging.getLogger("libvirt_nwfilter")
    root.setLevel(logging.INFO)
    root.propagate = False
    formatter = logging.Formatter(f"domain '{guest}' {operation}: %(message)s")
    handlers: list[logging.Handler] = []
    if os.path.exists(SYSLOG_SOCKET):
        from logging.handlers import SysLogHandler

        try:
            handler = SysLogHandler(address=SYSLOG_SOCKET, facility=SysLogHandler.LOG_DAEMON)
            handler.ident = f"{SYSLOG_IDENT}[{os.getpid()}]: "
            handlers.append(handler)
        except OSError:
            pass
    path = os.environ.get(LOG_FILE_VARIABLE)
    if path:
        try:
            handler = logging.FileHandler(path, encoding="utf-8")
            handler.setFormatter(logging.Formatter(f"%(asctime)s {SYSLOG_IDENT}[{os.getpid()}]: "
                                                   f"domain '{guest}' {operation}: %(levelname)s: %(message)s"))
            handlers.append(handler)
        except OSError:
            pass
    for handler in handlers:
        if handler.formatter is None:
            handler.setFormatter(formatter)
        root.addHandler(handler)
    if not handlers:
        root.addHandler(logging.NullHandler())


def main(argv: Sequence[str] | None = None) -> int:
    """The hook process: logging set up, then :func:`run`."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args == ["--help"]:  # libvirtd always passes four arguments
        print(HELP)
        return EXIT_OK
    if len(args) >= 2 and args[1] in OPERATIONS:
        try:
            _setup_logging(args[0], args[1])
        except Exception:  # noqa: BLE001 - logging must never stop the hook
            pass
    return run(args, sys.stdin.buffer, sys.stdout.buffer, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""Thin clients of the resident service: the ``libvirt-nwfilter`` command and the qemu hook.

They import only the standard library (and :mod:`.daemon.protocol`, itself standard library
only). When the service's socket answers, the request (argv, working directory, the
``LIBVIRT_NWFILTER_*``/``EDITOR``/``VISUAL`` environment and the three standard streams) goes to
the service, which runs it through the same code as the in-process path, in the client's
network namespace, and returns its exit status. Otherwise the request runs in this process, exactly as without the service:

* no connection can be made (no socket, nobody listening, ``LIBVIRT_NWFILTER_NO_SERVICE=1``),
  or the service closed the connection before taking the request: in-process;
* the service took the request and the connection ended before its exit status arrived (the
  service died): an error, exit status 1; the request is never run a second time (a hook
  ``start`` therefore fails closed, and libvirt stops the guest);
* no answer within ``LIBVIRT_NWFILTER_SERVICE_TIMEOUT`` seconds (default 300; the service
  must take the request within 10 s of it): the client says so and gives up with exit status 1.
  It never falls back then: a service that is slow, not dead, may still run the request.

``edit`` (interactive), ``install-hook`` and ``uninstall-hook`` (they set the service itself up
or remove it) always run in-process.
"""

from __future__ import annotations

import os
import sys

import _socket

from .daemon import protocol

DEFAULT_RUNDIR = "/run/libvirt-nwfilter"
TIMEOUT_VARIABLE = "LIBVIRT_NWFILTER_SERVICE_TIMEOUT"
BYPASS_VARIABLE = "LIBVIRT_NWFILTER_NO_SERVICE"
DEFAULT_TIMEOUT = 300.0
TAKE_TIMEOUT = 10.0
LOCAL_VERBS = ("edit", "install-hook", "uninstall-hook")
_GLOBAL_VALUE_OPTIONS = ("--confdir", "--rundir", "--backend")


class ServiceFailure(Exception):
    """The service took the request but gave no exit status (one line)."""


def timeout_setting(environ) -> float:
    """Seconds to wait for the service (``LIBVIRT_NWFILTER_SERVICE_TIMEOUT``)."""
    text = environ.get(TIMEOUT_VARIABLE)
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ServiceFailure(f"{TIMEOUT_VARIABLE}='{text}' is not a positive number of seconds")
    return value


def ask_service(kind: str, argv: list[str], rundir: str) -> int | None:
    """Run a request through the service: its exit status, or None when the service did not
    take it (run it in-process then). ServiceFailure when it took it and failed to finish."""
    environ = os.environ
    if environ.get(BYPASS_VARIABLE) == "1":
        return None
    timeout = timeout_setting(environ)
    path = protocol.socket_path(rundir)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(min(timeout, TAKE_TIMEOUT))
        try:
            sock.connect(path)
            data = protocol.encode_request(kind, argv, _cwd(), dict(environ))
            netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                protocol.send_request(sock, data, [0, 1, 2, netns])
            finally:
                os.close(netns)
        except OSError:
            return None  # nobody took it
        return _await_exit(sock, path, timeout)
    finally:
        sock.close()


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return "/"


def _await_exit(sock, path: str, timeout: float) -> int | None:
    buffer = bytearray()
    took = False
    while True:
        try:
            line = protocol.read_line(sock, buffer)
        except TimeoutError:
            raise ServiceFailure(f"the libvirt-nwfilter service ({path}) did not "
                                 f"{'finish the request' if took else 'take the request'} within "
                                 f"{timeout if took else min(timeout, TAKE_TIMEOUT):g} s; giving up"
                                 + (" (it may still complete it: see the service's log)" if took else
                                    f" (set {BYPASS_VARIABLE}=1 to work without the service)")) from None
        except OSError as error:
            if not took:
                return None  # it failed before taking the request: nothing ran
            line = b""
        if not line:
            if not took:
                return None  # it closed before taking the request: nothing ran
            raise ServiceFailure("the libvirt-nwfilter service ended while running the request; "
                                 "it was not run again (see the service's log; 'libvirt-nwfilter verify' "
                                 "checks the rules)")
        word, _, rest = line.decode("utf-8", "replace").partition(" ")
        if word == "exit" and took and rest.isdigit():
            return int(rest)
        if line == protocol.TOOK and not took:
            took = True
            sock.settimeout(timeout)
        elif word == "error":
            raise ServiceFailure(f"the libvirt-nwfilter service refused the request: {rest}")
        else:
            raise ServiceFailure("the libvirt-nwfilter service sent an unexpected answer")


# ------------------------------------------------------------------------------------------
# The libvirt-nwfilter command


def _scan(argv: list[str]) -> tuple[str | None, str | None]:
    """The ``--rundir`` value and the verb of a command line (argparse's rules for the global
    options: long options may be abbreviated, ``--opt=value`` or ``--opt value``)."""
    rundir, i = None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return rundir, argv[i + 1] if i + 1 < len(argv) else None
        if not arg.startswith("-") or arg == "-":
            return rundir, arg
        name, eq, value = arg.partition("=")
        matches = [o for o in _GLOBAL_VALUE_OPTIONS if o.startswith(name)] if name.startswith("--") else []
        if len(matches) == 1 and len(name) > 2:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            if matches[0] == "--rundir":
                rundir = value
        i += 1
    return rundir, None


def _cli_in_process(argv: list[str]) -> int:
    from .cli import main as cli_main

    return cli_main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``libvirt-nwfilter``."""
    args = sys.argv[1:] if argv is None else list(argv)
    rundir, verb = _scan(args)
    if verb in LOCAL_VERBS:
        return _cli_in_process(args)
    try:
        status = ask_service("cli", args, rundir or os.environ.get("LIBVIRT_NWFILTER_RUNDIR") or DEFAULT_RUNDIR)
    except ServiceFailure as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return _cli_in_process(args) if status is None else status


# ------------------------------------------------------------------------------------------
# The qemu hook (the wrapper install-hook writes runs this with python -I -S)


def hook_main(argv: list[str] | None = None) -> int:
    """Entry point of the installed hook wrapper: ``qemu GUEST OPERATION SUB-OPERATION EXTRA``."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        status = ask_service("hook", args, os.environ.get("LIBVIRT_NWFILTER_RUNDIR") or DEFAULT_RUNDIR)
    except ServiceFailure as error:
        print(f"libvirt-nwfilter: {error}", file=sys.stderr)
        return 1
    if status is not None:
        return status
    if sys.flags.no_site:  # started without site (fast path): the package's dependencies need it
        import site

        site.main()
    from .hook import main as hook_run

    return hook_run(args)


if __name__ == "__main__":
    sys.exit(main())

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
    relays = None
    try:
        sock.settimeout(min(timeout, TAKE_TIMEOUT))
        try:
            with protocol.UnixAddress(path) as address:
                sock.connect(address)
        except OSError:
            return None  # nobody listens
        relays = _Relays(copy_stdin=kind == "hook")
        try:
            data = protocol.encode_request(kind, argv, _cwd(), dict(environ))
            netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                protocol.send_request(sock, data, [*relays.passed, netns])
            finally:
                os.close(netns)
        except OSError:
            relays.restore_stdin()
            return None  # nobody took it
        finally:
            relays.sent()
        status = _Exchange(sock, path, timeout, relays).run()
        if status is None:
            relays.restore_stdin()
        return status
    finally:
        if relays is not None:
            relays.close()
        sock.close()


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return "/"


_S_IFMT, _S_IFIFO, _S_IFSOCK = 0o170000, 0o010000, 0o140000


class _Relays:
    """The streams the service gets. An output that is a pipe or socket (what a caller waits on
    for end of file, as libvirtd does with a hook's output) is relayed through a pipe of our
    own, so that giving up on a hung service releases the caller; the hook's domain XML
    (``copy_stdin``) is read here and passed in a memory file, for the same reason. Terminals
    and files are passed as they are; so is the command's standard input (it must not be read
    ahead: the caller may use what the command leaves unread)."""

    def __init__(self, copy_stdin: bool):
        self.passed: list[int] = []
        self.copies: list[tuple[int, int]] = []  # (our read end, real output) pairs to copy
        self._theirs: list[int] = []  # pipe ends that are the service's once sent
        self._stdin_copy: int | None = None
        for fd in (0, 1, 2):
            if not _is_pipe(fd) or (fd == 0 and not copy_stdin):
                self.passed.append(fd)
            elif fd == 0:
                self._stdin_copy = _memory_copy(fd)
                self.passed.append(self._stdin_copy)
            else:
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                self.passed.append(write_end)
                self._theirs.append(write_end)
                self.copies.append((read_end, fd))

    def sent(self) -> None:
        for fd in self._theirs:
            os.close(fd)
        self._theirs = []

    def restore_stdin(self) -> None:
        """Standard input as it was (the request runs in-process after all)."""
        if self._stdin_copy is not None:
            os.lseek(self._stdin_copy, 0, os.SEEK_SET)
            os.dup2(self._stdin_copy, 0)

    def close(self) -> None:
        self.sent()
        for fd in [source for source, _ in self.copies] + ([self._stdin_copy] if self._stdin_copy else []):
            os.close(fd)
        self.copies, self._stdin_copy = [], None


def _is_pipe(fd: int) -> bool:
    try:
        return os.fstat(fd).st_mode & _S_IFMT in (_S_IFIFO, _S_IFSOCK)
    except OSError:
        return False


def _memory_copy(fd: int) -> int:
    """A memory file holding everything ``fd`` gives, positioned at its start."""
    copy = os.memfd_create("libvirt-nwfilter-stdin", os.MFD_CLOEXEC)
    while data := os.read(fd, 1 << 20):
        while data:
            data = data[os.write(copy, data):]
    os.lseek(copy, 0, os.SEEK_SET)
    return copy


class _Exchange:
    """Wait for the service's answers while copying the relayed streams."""

    def __init__(self, sock, path: str, timeout: float, relays: _Relays):
        self.sock, self.path, self.timeout, self.relays = sock, path, timeout, relays
        self.buffer = bytearray()
        self.took = False
        self.status: int | None = None

    def run(self) -> int | None:
        import select
        import time

        poll = select.poll()
        poll.register(self.sock.fileno(), select.POLLIN)
        open_copies = {}
        for source, target in self.relays.copies:
            poll.register(source, select.POLLIN)
            open_copies[source] = target
        deadline = time.monotonic() + min(self.timeout, TAKE_TIMEOUT)
        socket_open = True
        while (socket_open and self.status is None) or open_copies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._gave_up()
            for fd, _ in poll.poll(left * 1000):
                if fd == self.sock.fileno():
                    took = self.took
                    socket_open = self._answers()
                    if self.took and not took:
                        deadline = time.monotonic() + self.timeout
                    if not socket_open:
                        poll.unregister(fd)
                elif not self._copy(fd, open_copies[fd]):
                    poll.unregister(fd)
                    del open_copies[fd]
            if not socket_open and not self.took:
                return None  # it closed before taking the request: nothing ran
        if not self.took:
            return None  # it closed before taking the request: nothing ran
        if self.status is None:
            raise ServiceFailure("the libvirt-nwfilter service ended while running the request; "
                                 "it was not run again (see the service's log; 'libvirt-nwfilter verify' "
                                 "checks the rules)")
        return self.status

    def _gave_up(self) -> ServiceFailure:
        return ServiceFailure(f"the libvirt-nwfilter service ({self.path}) did not "
                              f"{'finish the request' if self.took else 'take the request'} within "
                              f"{self.timeout if self.took else min(self.timeout, TAKE_TIMEOUT):g} s; giving up"
                              + (" (it may still complete it: see the service's log)" if self.took else
                                 f" (set {BYPASS_VARIABLE}=1 to work without the service)"))

    def _answers(self) -> bool:
        """Read what the socket has; False at its end."""
        try:
            chunk = self.sock.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            return False
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, _, rest = bytes(self.buffer).partition(b"\n")
            self.buffer[:] = rest
            word, _, value = line.decode("utf-8", "replace").partition(" ")
            if line == protocol.TOOK and not self.took:
                self.took = True
            elif word == "exit" and self.took and value.isdigit():
                self.status = int(value)
            elif word == "error" and not self.took:
                raise ServiceFailure(f"the libvirt-nwfilter service refused the request: {value}")
            else:
                raise ServiceFailure("the libvirt-nwfilter service sent an unexpected answer")
        return True

    @staticmethod
    def _copy(source: int, target: int) -> bool:
        """Copy what ``source`` has to ``target``; False at its end. Output nobody reads any
        more is dropped (the service must not block on it)."""
        try:
            data = os.read(source, 1 << 16)
        except OSError:
            return False
        if not data:
            return False
        try:
            while data:
                data = data[os.write(target, data):]
        except OSError:
            pass
        return True


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

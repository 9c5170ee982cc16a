"""One request, in a process forked for it: checked, taken, then run through the very entry
points the in-process path uses (``cli.main``, ``hook.main``) with the client's streams,
working directory and environment, and its exit status sent back.

The process is a fork of the service's request server, which is single-threaded and has every
module imported: what the fork saves is the interpreter start and the imports, nothing else.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import signal
import socket
import struct
import sys

from . import protocol

log = logging.getLogger(__name__)

READ_TIMEOUT = 10.0  # seconds a client may take to send its request
_UCRED = struct.Struct("3i")  # pid, uid, gid
_CLONE_NEWNET = 0x40000000


def peer_uid(conn: socket.socket) -> int:
    _, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


def handle(conn: socket.socket, max_request: int) -> int:
    """Serve one connection; returns the request's exit status (or 1 when it was refused)."""
    conn.settimeout(READ_TIMEOUT)
    uid = peer_uid(conn)
    if uid != 0:
        log.warning("connection from uid %d refused: only root may use the service", uid)
        _try_answer(conn, "error permission denied: only root may use the libvirt-nwfilter service")
        _drain(conn)
        return 1
    try:
        request, fds = protocol.receive_request(conn, max_request)
    except protocol.NoRequest:
        log.debug("connection closed without a request")
        return 1
    except protocol.ProtocolError as error:
        log.warning("request refused: %s", error)
        _try_answer(conn, f"error {error}")
        _drain(conn)
        return 1
    except OSError as error:
        log.warning("request not received: %s", error)
        return 1
    *streams, netns = fds
    try:
        _enter_namespace(netns)
    except OSError as error:
        log.warning("request refused: cannot enter the client's network namespace: %s", error)
        _try_answer(conn, f"error cannot enter the client's network namespace: {error}")
        return 1
    try:
        protocol.answer(conn, protocol.TOOK.decode())
    except OSError:  # the client went away: nothing was run
        return 1
    conn.settimeout(None)
    log.debug("%s request: %s", request["kind"], request["argv"])
    status = run(request, streams)
    _try_answer(conn, f"exit {status}")
    return status


def serve_handed(channel: socket.socket, max_request: int) -> int:
    """The spare request process: wait for the connection the server hands over ``channel``,
    then serve it; nothing when the channel closes first (the server dropped the spare)."""
    try:
        _, fds, _, _ = socket.recv_fds(channel, 1, 1)
    except OSError:
        fds = []
    finally:
        channel.close()
    if not fds:
        return 0
    return handle(socket.socket(fileno=fds[0]), max_request)


def _drain(conn: socket.socket, limit: int = 1 << 20) -> None:
    """Read what the client still sends (a little, briefly): closing a socket with unread data
    resets it, and the client would not see our answer."""
    conn.settimeout(1.0)
    try:
        conn.shutdown(socket.SHUT_WR)
        while limit > 0 and (chunk := conn.recv(1 << 16)):
            limit -= len(chunk)
    except OSError:
        pass


def _try_answer(conn: socket.socket, line: str) -> None:
    try:
        protocol.answer(conn, line)
    except OSError:
        pass


def run(request: dict, fds: list[int]) -> int:
    """Become the client's process (streams, directory, environment) and run the request."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    _reset_process(request["env"])
    try:
        os.chdir(request["cwd"])
    except OSError as error:
        print(f"error: cannot change to the directory {request['cwd']}: {error.strerror}", file=sys.stderr)
        return 1
    try:
        if request["kind"] == "cli":
            from ..cli import main as entry
        else:
            from ..hook import main as entry
        status = entry(request["argv"])
    except SystemExit as done:  # argparse: usage errors and --help
        status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if done.code is not None and not isinstance(done.code, int):
            print(done.code, file=sys.stderr)
    finally:
        _release_streams()
    return status


def _release_streams() -> None:
    """Flush and let go of the client's streams (``/dev/null`` in their place): its copies of
    our output end now, so that it need not wait for this process to exit."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _enter_namespace(fd: int) -> None:
    """Move into the network namespace ``fd`` refers to (the client's), when it is not ours:
    the request acts where the in-process path would."""
    try:
        if os.fstat(fd).st_ino != os.stat("/proc/self/ns/net").st_ino:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                number = ctypes.get_errno()
                raise OSError(number, os.strerror(number))
    finally:
        os.close(fd)


def _reset_process(env: dict[str, str]) -> None:
    """What a fresh process of the caller would have: standard streams on fds 0-2, the
    caller's variables, default signal handling and no logging configured."""
    for name in list(os.environ):
        if protocol.carried(name):
            del os.environ[name]
    os.environ.update(env)
    encoding, errors = sys.stdout.encoding, sys.stdout.errors
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding, errors)
    sys.stdout = _writer(1, encoding, errors, line_buffering=os.isatty(1))
    sys.stderr = _writer(2, encoding, "backslashreplace", line_buffering=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.set_wakeup_fd(-1)
    for logger in [logging.getLogger(), *logging.root.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            if logger.level != logging.NOTSET:  # setting a level clears every logger's cache
                logger.setLevel(logging.NOTSET)
            logger.propagate = True
    logging.getLogger().setLevel(logging.WARNING)


def _writer(fd: int, encoding: str, errors: str, line_buffering: bool) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BufferedWriter(io.FileIO(fd, "w", closefd=False)), encoding, errors,
                            line_buffering=line_buffering)
